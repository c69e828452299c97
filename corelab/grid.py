"""A voxel grid placed in patient space: the one grid type of corelab.

Arrays are indexed ``(plane, row, col)``. Coordinates follow DICOM patient LPS with
``ImageOrientationPatient = [1,0,0, 0,1,0]``: column index -> ``+x`` (patient left), row index ->
``+y`` (posterior), plane index -> ``+z`` (superior). Positions are ``(x, y, z)`` in mm; voxel sizes
``(slice, row, col)`` spacing in mm, like the array axes. :class:`corelab.dicomio.Volume` carries
one (``Volume.grid``); the phantom analyses and the synthetic images (``synth``) take one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid"]


@dataclass(frozen=True)
class Grid:
    """A voxel grid placed in patient space.

    Attributes
    ----------
    shape : tuple of int
        ``(planes, rows, cols)``, the array shape.
    voxel_mm : tuple of float
        ``(slice spacing, row spacing, col spacing)`` in mm.
    origin_mm : tuple of float
        Patient LPS ``(x, y, z)`` in mm of the centre of voxel ``[0, 0, 0]``. Plane ``k`` lies at
        ``z = origin_z + k * slice spacing``; row ``j`` at ``y = origin_y + j * row spacing``;
        column ``i`` at ``x = origin_x + i * col spacing``.
    """

    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def centred(
        cls,
        shape: Sequence[int],
        voxel_mm: Sequence[float],
        centre_mm: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> "Grid":
        """A grid whose geometric centre lies at ``centre_mm`` (patient ``(x, y, z)``, mm)."""
        nz, ny, nx = (int(n) for n in shape)
        dz, dy, dx = (float(v) for v in voxel_mm)
        cx, cy, cz = (float(c) for c in centre_mm)
        origin = (cx - 0.5 * (nx - 1) * dx, cy - 0.5 * (ny - 1) * dy, cz - 0.5 * (nz - 1) * dz)
        return cls((nz, ny, nx), (dz, dy, dx), origin)

    @property
    def centre_mm(self) -> tuple[float, float, float]:
        """Patient ``(x, y, z)`` of the geometric centre of the grid, mm."""
        nz, ny, nx = self.shape
        dz, dy, dx = self.voxel_mm
        ox, oy, oz = self.origin_mm
        return (ox + 0.5 * (nx - 1) * dx, oy + 0.5 * (ny - 1) * dy, oz + 0.5 * (nz - 1) * dz)

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along each array axis: ``(z, y, x)`` 1-D arrays in mm."""
        nz, ny, nx = self.shape
        dz, dy, dx = self.voxel_mm
        ox, oy, oz = self.origin_mm
        return (oz + dz * np.arange(nz), oy + dy * np.arange(ny), ox + dx * np.arange(nx))

    def index_to_mm(self, index: Sequence[float]) -> tuple[float, float, float]:
        """Patient ``(x, y, z)`` in mm of a (fractional) ``(plane, row, col)`` index."""
        k, j, i = (float(v) for v in index)
        dz, dy, dx = self.voxel_mm
        ox, oy, oz = self.origin_mm
        return (ox + i * dx, oy + j * dy, oz + k * dz)

    def mm_to_index(self, xyz_mm: Sequence[float]) -> tuple[float, float, float]:
        """Fractional ``(plane, row, col)`` index of a patient ``(x, y, z)`` position in mm."""
        x, y, z = (float(v) for v in xyz_mm)
        dz, dy, dx = self.voxel_mm
        ox, oy, oz = self.origin_mm
        return ((z - oz) / dz, (y - oy) / dy, (x - ox) / dx)
