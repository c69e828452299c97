"""The uniform-cylinder calibration check: the mean of a central VOI against the filled
concentration (EARL "SUV bias"), its voxel noise and its axial profile.

Arrays are indexed ``(plane, row, col)``; positions are ``(x, y, z)`` in mm. With a
:class:`~corelab.grid.Grid` they are patient LPS coordinates; without one, ``(0, 0, 0)`` is
the centre of voxel ``[0, 0, 0]`` and ``x, y, z`` run along columns, rows and planes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from corelab.grid import Grid
from phantoms.localise import PhantomLocalisationError
from phantoms.results import CylinderResult
from phantoms.voxels import frame_of

__all__ = ["analyze_uniform_cylinder"]


def analyze_uniform_cylinder(
    volume_kbq_ml: np.ndarray,
    voxel_mm: Sequence[float],
    *,
    concentration_kbq_ml: float,
    grid: Grid | None = None,
    voi_radius_fraction: float = 0.75,
    voi_length_fraction: float = 2.0 / 3.0,
) -> CylinderResult:
    """Calibration check on a uniform cylinder (axis along the image ``z``).

    Parameters
    ----------
    volume_kbq_ml : ndarray, shape (planes, rows, cols)
        Activity concentration, kBq/mL, decay-corrected to the filling reference time.
    voxel_mm : (3,) float
        ``(slice, row, col)`` spacing, mm.
    concentration_kbq_ml : float
        True (filled) concentration, kBq/mL.
    grid : Grid, optional
        Places the volume in patient space (positions then in patient mm).
    voi_radius_fraction, voi_length_fraction : float
        Central VOI: this fraction of the radius found, over this central fraction of the
        length found (defaults 0.75 and 2/3).

    Returns
    -------
    CylinderResult

    Raises
    ------
    PhantomLocalisationError
        No cylinder above half the true concentration, or too short to hold the VOI.

    Notes
    -----
    The cylinder is the largest connected region above half the *true* concentration (robust
    to calibration errors up to about +/-50 %). Planes whose cross-section covers at least half
    of the median cross-section count as inside; the radius comes from the median area of those
    planes, the centre from their centroids (median). ``calibration_bias_pct`` is the EARL
    calibration QC quantity ``(C_measured / C_true - 1) * 100``.
    """
    volume = np.asarray(volume_kbq_ml, dtype=np.float64)
    frame = frame_of(volume, voxel_mm, grid)
    if concentration_kbq_ml <= 0:
        raise ValueError(f"concentration_kbq_ml must be > 0, got {concentration_kbq_ml}")
    labels, n = ndimage.label(volume > 0.5 * concentration_kbq_ml)
    if n == 0:
        raise PhantomLocalisationError(
            f"no voxel above half the true concentration ({0.5 * concentration_kbq_ml:g} kBq/mL): "
            f"image max is {float(volume.max()):g} kBq/mL"
        )
    sizes = ndimage.sum_labels(np.ones_like(volume), labels, np.arange(1, n + 1))
    mask = labels == (int(np.argmax(sizes)) + 1)
    area = mask.sum(axis=(1, 2)).astype(float)
    occupied = area > 0
    full = area >= 0.5 * np.median(area[occupied])
    planes = np.flatnonzero(full)
    dx, dy, dz = frame.spacing
    radius_mm = float(math.sqrt(np.median(area[planes]) * dx * dy / math.pi))
    length_mm = float(len(planes) * dz)
    cents = np.array([ndimage.center_of_mass(mask[k]) for k in planes])  # (row, col)
    cj, ci = np.median(cents, axis=0)
    k_mid = 0.5 * (planes[0] + planes[-1])
    centre = frame.to_mm(np.array([k_mid, cj, ci]))

    voi_r = voi_radius_fraction * radius_mm
    half_len = 0.5 * voi_length_fraction * length_mm
    z_planes = frame.origin[2] + frame.spacing[2] * np.arange(frame.shape[0])
    voi_planes = np.flatnonzero(np.abs(z_planes - centre[2]) <= half_len + 1e-6)
    if len(voi_planes) < 2:
        raise PhantomLocalisationError(
            f"cylinder found is {length_mm:.0f} mm long; too short for a VOI over "
            f"{voi_length_fraction:.2f} of its length at {dz:g} mm slices"
        )
    full_region = (slice(0, 1), slice(0, frame.shape[1]), slice(0, frame.shape[2]))
    x, y, _ = frame.region_mm(full_region)
    disc = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= voi_r**2)[0]
    values = volume[voi_planes][:, disc]
    mean = float(values.mean())
    slice_means = values.mean(axis=1)
    return CylinderResult(
        measured_kbq_ml=mean,
        true_kbq_ml=float(concentration_kbq_ml),
        calibration_bias_pct=(mean / concentration_kbq_ml - 1.0) * 100.0,
        suv_mean=mean / concentration_kbq_ml,
        cov_pct=float(values.std(ddof=1) / mean * 100.0),
        slice_means_kbq_ml=tuple(float(v) for v in slice_means),
        slice_z_mm=tuple(float(v) for v in z_planes[voi_planes]),
        max_nonuniformity_pct=float((slice_means.max() / mean - 1.0) * 100.0),
        min_nonuniformity_pct=float((slice_means.min() / mean - 1.0) * 100.0),
        centre_mm=tuple(float(v) for v in centre),
        radius_mm=radius_mm,
        length_mm=length_mm,
        voi_radius_mm=voi_r,
        voi_length_mm=float(len(voi_planes) * dz),
        voi_voxels=int(values.size),
        coordinates=frame.kind,
    )
