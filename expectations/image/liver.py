"""The PERCIST liver reference VOI, placed automatically.

PERCIST 1.0 (Wahl et al. 2009) puts a 3 cm sphere in the normal right lobe, away from the edges
and vessels. Automatic methods fit the largest sphere inside the liver found on the PET (Bauer
et al., Med Phys 2012) or threshold, fill holes and erode the fitted sphere by 3 mm (QIICR
PETLiverUptakeMeasurement). Here, on a smoothed, block-averaged working copy:

1. the liver-like region is the body's voxels on the patient's right (``x`` below the body
   centre), below the lungs, whose uptake is in a band relative to the body's soft-tissue level
   (so a calibration error scaling every voxel changes nothing), and of liver-like CT number when
   a CT is given; its largest connected component is kept;
2. the band is then narrowed around that component's own median, holes are filled, and hot
   spots (lesions, kidney) with a margin are cut out;
3. the sphere is centred at the deepest point of the remaining region (Euclidean distance in mm,
   anisotropic voxels) and must be at least radius + margin deep.

The sphere is measured on the full-resolution image. Anything that does not look like a liver
makes the VOI *not assessable* with the reason, rather than a guess.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from corelab.grid import Grid
from expectations.image.alignment import fill_holes_per_plane
from expectations.image.result import LiverVoi

__all__ = ["find_liver_centre", "measure_sphere", "liver_voi"]


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``mask`` (empty if none)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _edt_mm(mask: np.ndarray, voxel_mm) -> np.ndarray:
    """Distance (mm) of each voxel of ``mask`` from the nearest voxel outside it or the grid edge."""
    padded = np.pad(mask, 1, constant_values=False)
    return ndimage.distance_transform_edt(padded, sampling=voxel_mm)[1:-1, 1:-1, 1:-1]


def _lung_z_mm(sm: np.ndarray, body: np.ndarray, work: Grid, level: float, params: dict) -> float | None:
    """Patient ``z`` of the centroid of the lung-like voxels inside the body, or None if too few."""
    filled = fill_holes_per_plane(body)
    # two voxels in from the outline: the blurred skin edge is low too but is not lung
    inner = ndimage.binary_erosion(filled, structure=np.ones((1, 3, 3), bool), iterations=2)
    lungs = inner & (sm < params["lung_frac"] * level)
    if lungs.sum() * float(np.prod(work.voxel_mm)) / 1000.0 < params["min_lung_ml"]:
        return None
    k = float(np.mean(np.nonzero(lungs)[0]))
    return work.index_to_mm((k, 0, 0))[2]


def find_liver_centre(sm: np.ndarray, work: Grid, level: float, ct_work: np.ndarray | None,
                      params: dict) -> tuple[tuple[float, float, float] | None, float | None, float | None, str]:
    """Centre of the liver sphere on the working grid.

    Parameters
    ----------
    sm : ndarray
        Smoothed, block-averaged PET (SUV) on ``work``.
    work : Grid
    level : float
        Soft-tissue level of the body (median uptake in the body), same units as ``sm``.
    ct_work : ndarray or None
        CT (HU) on ``work``, aligned to the PET, NaN outside the CT.
    params : dict
        :data:`expectations.image.DEFAULTS`.

    Returns
    -------
    (centre_mm, depth_mm, region_median, reason)
        ``centre_mm`` patient ``(x, y, z)`` or None with ``reason``.
    """
    r_need = params["liver_radius_mm"] + params["liver_margin_mm"]
    voxel_ml = float(np.prod(work.voxel_mm)) / 1000.0
    extent = [n * v for n, v in zip(work.shape, work.voxel_mm)]
    if min(extent) < 2 * r_need:
        return None, None, None, (f"the image is {min(extent):.0f} mm thick along one axis: too small for a "
                                  f"{2 * params['liver_radius_mm']:.0f} mm sphere")
    if not level > 0:
        return None, None, None, "no body found"
    rel = sm / np.float32(level)
    body = rel > params["body_frac"]
    zax, _, xax = work.axes_mm()
    xs = np.nonzero(body)[2]
    centre_x = float(xax[0] + work.voxel_mm[2] * xs.mean())
    allowed = np.broadcast_to((xax < centre_x)[None, None, :], sm.shape).copy()  # patient right is -x
    lung_z = _lung_z_mm(sm, body, work, level, params)
    if lung_z is not None:
        allowed &= (zax < lung_z)[:, None, None]
    if ct_work is not None:
        lo_hu, hi_hu = params["liver_hu_range"]
        with np.errstate(invalid="ignore"):
            # Outside the CT's field of view (NaN) the CT says nothing: the PET alone decides there.
            allowed &= np.isnan(ct_work) | ((ct_work >= lo_hu) & (ct_work <= hi_hu))
    lo, hi = params["liver_band_coarse"]
    coarse = _largest(allowed & (rel >= lo) & (rel <= hi))
    min_ml = params["min_liver_ml"]
    if coarse.sum() * voxel_ml < min_ml:
        return None, None, None, (f"no liver-like region of {min_ml:.0f} mL on the patient's right "
                                  f"(largest {coarse.sum() * voxel_ml:.0f} mL)")
    # work in the bounding box of the coarse region (plus the hot margin): the distance transforms
    # are the costly part and the liver is a small part of a whole-body volume
    pad = [int(np.ceil(params["hot_margin_mm"] / v)) + 2 for v in work.voxel_mm]
    nz = np.nonzero(coarse)
    box = tuple(slice(max(int(a.min()) - p, 0), int(a.max()) + p + 1) for a, p in zip(nz, pad))
    origin = work.index_to_mm([b.start for b in box])
    sm, allowed, coarse = sm[box], allowed[box], coarse[box]
    work = Grid(sm.shape, work.voxel_mm, origin)
    med = float(np.median(sm[coarse]))
    flo, fhi = params["liver_band_fine"]
    fine = _largest(allowed & (sm >= flo * med) & (sm <= fhi * med))
    fine = ndimage.binary_fill_holes(fine)
    hot = sm > params["hot_factor"] * med
    if hot.any():
        near_hot = _edt_mm(~hot, work.voxel_mm) <= params["hot_margin_mm"]
        fine &= ~near_hot
    fine = _largest(fine)
    if fine.sum() * voxel_ml < min_ml:
        return None, None, None, (f"the liver-like region is {fine.sum() * voxel_ml:.0f} mL once hot spots "
                                  f"are removed (< {min_ml:.0f} mL)")
    region_median = float(np.median(sm[fine]))
    depth = _edt_mm(fine, work.voxel_mm)
    k, j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)
    d = float(depth[k, j, i])
    if d < r_need:
        return None, d, region_median, (f"the liver-like region is {d:.0f} mm deep at most: a "
                                        f"{2 * params['liver_radius_mm']:.0f} mm sphere needs {r_need:.0f} mm")
    return work.index_to_mm((k, j, i)), d, region_median, ""


def measure_sphere(suv: np.ndarray, grid: Grid, centre_mm, radius_mm: float) -> np.ndarray:
    """Values of the voxels whose centres lie within ``radius_mm`` of ``centre_mm`` (patient x, y, z)."""
    c = np.asarray(grid.mm_to_index(centre_mm))
    vox = np.asarray(grid.voxel_mm)
    half = np.ceil(radius_mm / vox).astype(int)
    lo = np.maximum(np.floor(c).astype(int) - half, 0)
    hi = np.minimum(np.ceil(c).astype(int) + half + 1, grid.shape)
    if np.any(hi <= lo):
        return np.empty(0, dtype=np.float32)
    zz, yy, xx = (((np.arange(a, b) - ci) * v) for a, b, ci, v in zip(lo, hi, c, vox))
    d2 = zz[:, None, None] ** 2 + yy[None, :, None] ** 2 + xx[None, None, :] ** 2
    box = suv[lo[0]: hi[0], lo[1]: hi[1], lo[2]: hi[2]]
    return np.asarray(box[d2 <= radius_mm ** 2 + 1e-9], dtype=np.float64)


def liver_voi(suv: np.ndarray, grid: Grid, sm: np.ndarray, work: Grid, level: float,
              ct_work: np.ndarray | None, params: dict, sul_per_suv: float | None) -> LiverVoi:
    """Find the liver VOI on the working copy and measure it on the full-resolution ``suv``."""
    radius = float(params["liver_radius_mm"])
    centre, depth, region_median, reason = find_liver_centre(sm, work, level, ct_work, params)
    if centre is None:
        return LiverVoi(reason=reason, radius_mm=radius, depth_mm=depth)
    idx = tuple(int(round(v)) for v in grid.mm_to_index(centre))
    idx = tuple(int(np.clip(v, 0, n - 1)) for v, n in zip(idx, grid.shape))
    centre_mm = grid.index_to_mm(idx)
    values = measure_sphere(suv, grid, centre_mm, radius)
    base = dict(radius_mm=radius, depth_mm=depth, centre_mm=centre_mm, centre_index=idx, n_voxels=int(values.size))
    if values.size < 2:
        return LiverVoi(reason="the sphere holds fewer than 2 voxels", **base)
    voi_median = float(np.median(values))
    if abs(voi_median / region_median - 1.0) > params["max_voi_vs_region"]:
        return LiverVoi(reason=(f"the VOI median {voi_median:.2f} differs from the liver region's {region_median:.2f} "
                                f"by more than {100 * params['max_voi_vs_region']:.0f} %: inhomogeneous liver"),
                        **base)
    mean = float(values.mean())
    sd = float(values.std(ddof=1))
    return LiverVoi(assessable=True, suv_mean=mean, suv_sd=sd, cov_pct=100.0 * sd / mean if mean > 0 else None,
                    sul_mean=None if sul_per_suv is None else mean * float(sul_per_suv), **base)
