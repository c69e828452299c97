"""Voxel geometry shared by the phantom analyses: index <-> mm, the pose of the phantom in the
image, and partial-voxel weights of balls and discs (exact to a sub-sampling, counted by formula).

Arrays are indexed ``(plane, row, col)``; positions are ``(x, y, z)`` in mm (see
:mod:`phantoms.nema_iec`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from corelab.grid import Grid

__all__ = ["Frame", "RingPose", "frame_of", "chord_counts", "ball_weights", "disc_weights"]


@dataclass(frozen=True)
class Frame:
    """Voxel index <-> mm, as (x, y, z)."""

    origin: np.ndarray  # (x, y, z) of voxel [0,0,0]
    spacing: np.ndarray  # (dx, dy, dz)
    shape: tuple[int, int, int]
    kind: str

    def to_mm(self, kji: np.ndarray) -> np.ndarray:
        kji = np.asarray(kji, dtype=float)
        return self.origin + kji[..., ::-1] * self.spacing

    def to_index(self, xyz: np.ndarray) -> np.ndarray:
        xyz = np.asarray(xyz, dtype=float)
        return ((xyz - self.origin) / self.spacing)[..., ::-1]

    def ball_region(self, centre_xyz: np.ndarray, radius_mm: float) -> tuple[slice, slice, slice]:
        kji = self.to_index(centre_xyz)
        half = radius_mm / self.spacing[::-1]
        return tuple(
            slice(max(int(math.floor(c - h)), 0), min(int(math.ceil(c + h)) + 1, n))
            for c, h, n in zip(kji, half, self.shape)
        )  # type: ignore[return-value]

    def region_mm(self, region: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x, y, z coordinates (mm) of the voxels of an index region."""
        k = np.arange(region[0].start, region[0].stop)[:, None, None]
        j = np.arange(region[1].start, region[1].stop)[None, :, None]
        i = np.arange(region[2].start, region[2].stop)[None, None, :]
        ox, oy, oz = self.origin
        dx, dy, dz = self.spacing
        return ox + i * dx, oy + j * dy, oz + k * dz


@dataclass(frozen=True)
class RingPose:
    """Rigid pose of the phantom: ``image = rotation @ (phantom - ring_centre) + translation``."""

    rotation: np.ndarray
    translation: np.ndarray
    rms_mm: float
    detected: tuple[float, ...]

    def to_image(self, p_phantom: Sequence[float], ring_centre_ph: np.ndarray) -> np.ndarray:
        return self.rotation @ (np.asarray(p_phantom, dtype=float) - ring_centre_ph) + self.translation


def frame_of(volume: np.ndarray, voxel_mm: Sequence[float], grid: Grid | None) -> Frame:
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (plane, row, col), got shape {volume.shape}")
    dz, dy, dx = (float(v) for v in voxel_mm)
    if grid is None:
        return Frame(np.zeros(3), np.array([dx, dy, dz]), volume.shape, "index")
    if tuple(grid.shape) != tuple(volume.shape):
        raise ValueError(f"grid shape {grid.shape} does not match volume shape {volume.shape}")
    if not np.allclose(grid.voxel_mm, (dz, dy, dx)):
        raise ValueError(f"grid voxel_mm {grid.voxel_mm} does not match voxel_mm {tuple(voxel_mm)}")
    return Frame(np.asarray(grid.origin_mm, dtype=float), np.array([dx, dy, dz]), volume.shape, "patient")


def chord_counts(h2: np.ndarray, c: float, x: np.ndarray, dx: float, supersample: int) -> np.ndarray:
    """Sub-samples ``x_i + u_m * dx`` (``u_m = (m + 0.5) / s - 0.5``) lying in ``[c - h, c + h]``.

    ``h2`` (any shape) holds squared half-chords; the result has shape ``h2.shape + x.shape``.
    Counting by formula instead of testing every sub-sample keeps the partial-voxel weights of
    ROIs exact to the sub-sampling at a fraction of the cost.
    """
    s = supersample
    h = np.sqrt(np.clip(h2, 0.0, None))[..., None]
    lo = (c - h - x) / dx * s + 0.5 * s - 0.5
    hi = (c + h - x) / dx * s + 0.5 * s - 0.5
    n = np.minimum(np.floor(hi), s - 1) - np.maximum(np.ceil(lo), 0) + 1
    return np.where(h2[..., None] >= 0.0, np.clip(n, 0, s), 0.0)


def ball_weights(frame: Frame, region, centre_xyz, radius_mm: float, *, supersample: int = 5) -> np.ndarray:
    """Fraction of each voxel of ``region`` inside a ball (``supersample**3`` sub-samples)."""
    x, y, z = frame.region_mm(region)
    s = supersample
    u = (np.arange(s) + 0.5) / s - 0.5
    dx, dy, dz = frame.spacing
    cx, cy, cz = centre_xyz
    zs = z[:, 0, 0, None] + u * dz  # (planes, s)
    ys = y[0, :, 0, None] + u * dy  # (rows, s)
    h2 = radius_mm**2 - (zs[:, :, None, None] - cz) ** 2 - (ys[None, None, :, :] - cy) ** 2  # (k, s, j, s)
    counts = chord_counts(h2, cx, x[0, 0, :], dx, s)  # (k, s, j, s, i)
    return counts.sum(axis=(1, 3)) / s**3


def disc_weights(frame: Frame, plane: int, centre_xy, radius_mm: float, *, supersample: int = 8):
    """Pixel weights (fraction inside a circle, ``supersample**2`` sub-samples) on one plane.

    Returns ``(region, weights)``; ``weights`` has shape ``(1, rows, cols)`` of the region.
    """
    cx, cy = centre_xy
    k = np.array([plane, 0, 0], dtype=float)
    reg = frame.ball_region(np.array([cx, cy, frame.to_mm(k)[2]]), radius_mm + 1.0 * max(frame.spacing[:2]))
    reg = (slice(plane, plane + 1), reg[1], reg[2])
    x, y, _ = frame.region_mm(reg)
    s = supersample
    u = (np.arange(s) + 0.5) / s - 0.5
    dx, dy, _ = frame.spacing
    ys = y[0, :, 0, None] + u * dy  # (rows, s)
    counts = chord_counts(radius_mm**2 - (ys - cy) ** 2, cx, x[0, 0, :], dx, s)  # (rows, s, cols)
    return reg, (counts.sum(axis=1) / s**2)[None]
