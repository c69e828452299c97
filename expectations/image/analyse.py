"""Image QC of one PET series: liver reference VOI, axial coverage, bed dip, PET/CT alignment."""

from __future__ import annotations


import numpy as np
from scipy import ndimage

from corelab.grid import Grid
from expectations.image.alignment import FWHM_PER_SIGMA, block_mean, ct_on_grid, petct_shift
from expectations.image.coverage import axial_coverage_mm, axial_profile, find_bed_dip
from expectations.image.liver import liver_voi
from expectations.image.result import DEFAULTS, ImageQc

__all__ = ["analyse_pet", "body_level"]



def body_level(sm: np.ndarray, params: dict) -> float:
    """Soft-tissue uptake of the body: median over the voxels above a fraction of the volume's mean.

    Independent of the global scale (a calibration error scales it with everything else).
    Returns 0 when the volume is empty.
    """
    mean = float(sm.mean()) if sm.size else 0.0
    if not mean > 0:
        return 0.0
    seed = sm > params["body_seed_frac_of_mean"] * mean
    return float(np.median(sm[seed])) if seed.any() else 0.0


def _dip_planes(dip: dict | None, wgrid: Grid) -> np.ndarray | None:
    """Working planes within one working plane of a bed dip (True), or None without a dip."""
    if not dip:
        return None
    z = wgrid.axes_mm()[0]
    dz = wgrid.voxel_mm[0]
    return (z >= dip["z_from_mm"] - dz) & (z <= dip["z_to_mm"] + dz)


def analyse_pet(suv: np.ndarray, grid: Grid, *, sul_per_suv: float | None = None, ct_hu: np.ndarray | None = None,
                ct_grid: Grid | None = None, params: dict | None = None) -> ImageQc:
    """Image QC of one PET series.

    Parameters
    ----------
    suv : ndarray of float, shape (planes, rows, cols)
        SUVbw on ``grid`` (any global scale works: the liver is found relative to the body).
    grid : Grid
    sul_per_suv : float, optional
        Lean body mass (James) / weight: SUL = SUV x this. None if unknown (then no SULmean).
    ct_hu, ct_grid : ndarray and Grid, optional
        The study's CT in HU on its own grid; None if there is no CT.
    params : dict, optional
        Overrides of :data:`expectations.image.DEFAULTS`.

    Returns
    -------
    ImageQc
    """
    p = {**DEFAULTS, **(params or {})}
    unknown = set(p) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown image-QC parameters: {sorted(unknown)}")
    suv = np.asarray(suv, dtype=np.float32)
    if suv.ndim != 3 or tuple(suv.shape) != tuple(grid.shape):
        raise ValueError(f"suv shape {suv.shape} does not match the grid {grid.shape}")
    if not np.isfinite(suv.sum(dtype=np.float64)):
        suv = np.nan_to_num(suv, nan=0.0, posinf=0.0, neginf=0.0)

    factors = tuple(max(1, int(round(p["work_voxel_mm"] / v))) for v in grid.voxel_mm)
    work, wgrid = block_mean(suv, grid, factors)
    sigma = [p["smooth_fwhm_mm"] / FWHM_PER_SIGMA / v if n > 1 else 0.0 for v, n in zip(wgrid.voxel_mm, wgrid.shape)]
    sm = ndimage.gaussian_filter(work, sigma=sigma, mode="nearest")
    level = body_level(sm, p)

    qc = ImageQc(axial_coverage_mm=axial_coverage_mm(grid))
    if level > 0:
        profile = axial_profile(suv, level, p)
        qc.axial_profile = [float(v) for v in profile]
        qc.bed_dip = find_bed_dip(profile, grid, p)

    ct_work = None
    if ct_hu is None or ct_grid is None:
        qc.petct_reason = "no CT"
    else:
        ct_work = ct_on_grid(ct_hu, ct_grid, wgrid)
        # the unsmoothed working copy: extra blur would move the lung-base edge under the liver dome
        qc.petct_shift_mm, qc.petct_reason = petct_shift(work, ct_work, wgrid, level, p,
                                                         z_excluded=_dip_planes(qc.bed_dip, wgrid))
        if qc.petct_shift_mm is not None and max(abs(s) for s in qc.petct_shift_mm) > 1.0:
            # bring the CT onto the PET before using its HU to confirm the liver
            ct_work = ct_on_grid(ct_hu, ct_grid, wgrid, offset_mm=qc.petct_shift_mm)
    qc.liver = liver_voi(suv, grid, sm, wgrid, level, ct_work, p, sul_per_suv)
    return qc
