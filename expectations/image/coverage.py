"""Axial coverage of a PET image and the search for a failed bed position (a dip in the axial profile).

The profile is the mean uptake inside the body per plane. The body of each plane is found
relative to that plane's own level (voxels above a fraction of the plane's mean over non-air
voxels), so a plane whose counts dropped tenfold still has its body outline and reads low, while a
narrow plane (neck, legs) keeps a normal mean. A dip is a run of planes far below the median of
a wide neighbourhood; runs reaching the ends of the field of view are end fall-off, not dips.
"""

from __future__ import annotations

import numpy as np

from corelab.grid import Grid

__all__ = ["axial_coverage_mm", "axial_profile", "find_bed_dip"]


def axial_coverage_mm(grid: Grid) -> float:
    """Axial extent of the image: planes x slice spacing, mm."""
    return float(grid.shape[0] * grid.voxel_mm[0])


def axial_profile(suv: np.ndarray, body_level: float, params: dict) -> np.ndarray:
    """Mean uptake inside the body of each plane (0 where a plane holds no body).

    Parameters
    ----------
    suv : ndarray, shape (planes, rows, cols)
    body_level : float
        Soft-tissue uptake of the whole body (same units as ``suv``).
    params : dict
        ``dip_floor_frac`` (non-air: above this fraction of ``body_level``) and
        ``dip_plane_body_frac`` (body: above this fraction of the plane's non-air mean).
    """
    v = np.asarray(suv, dtype=np.float32)
    floor = np.float32(params["dip_floor_frac"] * body_level)
    nonair = v > floor
    n = nonair.sum(axis=(1, 2))
    s = np.where(nonair, v, 0).sum(axis=(1, 2), dtype=np.float64)
    plane_mean = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
    body = v > (params["dip_plane_body_frac"] * plane_mean).astype(np.float32)[:, None, None]
    body &= nonair
    nb = body.sum(axis=(1, 2))
    sb = np.where(body, v, 0).sum(axis=(1, 2), dtype=np.float64)
    return np.divide(sb, nb, out=np.zeros_like(sb), where=nb > 0)


def find_bed_dip(profile: np.ndarray, grid: Grid, params: dict) -> dict | None:
    """The longest run of planes whose body uptake drops far below its neighbourhood, or None.

    A plane is low when its profile value is below ``dip_ratio`` x the median of the planes
    within ``dip_window_mm`` (excluding empty planes from the median). A run counts when it has
    at least ``dip_min_planes`` planes and ``dip_min_mm`` length, does not touch the first or last
    plane, and does not lie within the outer ``dip_end_frac`` of the axial extent.

    Returns
    -------
    dict or None
        ``{"z_from_mm", "z_to_mm", "planes", "depth_pct"}``; ``depth_pct`` is 100 x (1 - the
        median ratio over the run).
    """
    p = np.asarray(profile, dtype=float)
    nz = p.size
    if nz < 3 or not np.any(p > 0):
        return None
    dz = grid.voxel_mm[0]
    w = max(1, int(round(params["dip_window_mm"] / dz)))
    ref = np.empty(nz)
    for k in range(nz):
        seg = p[max(0, k - w): k + w + 1]
        seg = seg[seg > 0]
        ref[k] = np.median(seg) if seg.size else 0.0
    ratio = np.divide(p, ref, out=np.ones(nz), where=ref > 0)
    low = ratio < params["dip_ratio"]
    end = max(1, int(np.ceil(params["dip_end_frac"] * nz)))
    best = None
    k = 0
    while k < nz:
        if not low[k]:
            k += 1
            continue
        j = k
        while j + 1 < nz and low[j + 1]:
            j += 1
        n = j - k + 1
        touches_end = k == 0 or j == nz - 1
        in_end_zone = j < end or k >= nz - end
        if (not touches_end and not in_end_zone and n >= params["dip_min_planes"]
                and n * dz >= params["dip_min_mm"] and (best is None or n > best[1] - best[0] + 1)):
            best = (k, j)
        k = j + 1
    if best is None:
        return None
    k, j = best
    z = grid.axes_mm()[0]
    return {"z_from_mm": round(float(min(z[k], z[j])), 1), "z_to_mm": round(float(max(z[k], z[j])), 1),
            "planes": int(j - k + 1), "depth_pct": round(float(100.0 * (1.0 - np.median(ratio[k: j + 1]))), 1)}
