"""PET/CT alignment from the body outline, and the CT resampled onto the PET working grid.

The shift is measured per axis from 1-D projections of soft body masks (PET and CT on the same
working grid): the normalised cross-correlation of the two profiles over the planes both cover
peaks at the shift. Projections are insensitive to the other two axes, and comparing profile
*shapes* (not centroids) keeps a CT truncated at the arms, or a PET outline a little wider than
the CT's (blur), from biasing the result. Along ``z`` the outline of a trunk is nearly constant,
so the profile there is the area of dense tissue (outline minus lungs), whose edges are the lung
bases and apices. The PET lung edge is placed halfway between the uptake on either side (the hot
liver under the right lung base would otherwise pull it up by the PET's blur), and the planes of a
failed bed position and the end planes take no part in the ``z`` comparison.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from corelab.grid import Grid

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
"""A Gaussian's FWHM over its sigma (about 2.3548)."""

__all__ = ["fill_holes_per_plane", "block_mean", "resample_linear", "ct_on_grid", "petct_shift"]


def block_mean(volume: np.ndarray, grid: Grid, factors: tuple[int, int, int]) -> tuple[np.ndarray, Grid]:
    """Mean over ``factors``-sized blocks (trailing planes/rows/cols that do not fill a block dropped).

    Returns
    -------
    (ndarray of float32, Grid)
        The reduced volume and its grid (voxel centres at the block centres).
    """
    f = tuple(max(1, int(v)) for v in factors)
    n = tuple(max(1, s // k) for s, k in zip(volume.shape, f))
    f = tuple(min(k, s) for k, s in zip(f, volume.shape))
    out = np.asarray(volume[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]])
    # summing strided slices axis by axis is several times faster than a 6-D reshape mean
    for ax, k in enumerate(f):
        if k > 1:
            idx = [slice(None)] * 3
            acc = None
            for r in range(k):
                idx[ax] = slice(r, None, k)
                part = out[tuple(idx)].astype(np.float32)
                acc = part if acc is None else acc + part
            out = acc
    out = np.asarray(out, dtype=np.float32) / np.float32(f[0] * f[1] * f[2])
    dz, dy, dx = grid.voxel_mm
    origin = grid.index_to_mm([0.5 * (k - 1) for k in f])
    return out, Grid(n, (dz * f[0], dy * f[1], dx * f[2]), origin)


def resample_linear(volume: np.ndarray, src: Grid, dst: Grid, *, offset_mm=(0.0, 0.0, 0.0),
                    fill: float = np.nan) -> np.ndarray:
    """Trilinear resampling between two axis-aligned grids, one axis at a time.

    Samples ``volume`` (on ``src``) at the voxel centres of ``dst`` shifted by ``-offset_mm``
    (patient ``x, y, z``): with ``offset_mm`` = PET minus CT shift this brings the CT onto the PET.
    Points outside ``src`` get ``fill``. Separable, so it costs a few passes over the output,
    not a coordinate array of the full volume as :func:`scipy.ndimage.map_coordinates` would.
    """
    out = np.asarray(volume, dtype=np.float32)
    axes = dst.axes_mm()
    src_axes = src.axes_mm()
    off = (offset_mm[2], offset_mm[1], offset_mm[0])  # (z, y, x) to array-axis order
    valid = []
    for ax in range(3):
        pos = (axes[ax] - off[ax] - src_axes[ax][0]) / src.voxel_mm[ax]
        n = out.shape[ax]
        ok = (pos >= -0.5) & (pos <= n - 0.5)
        p = np.clip(pos, 0.0, n - 1.0)
        i0 = np.minimum(np.floor(p).astype(int), max(n - 2, 0))
        w = (p - i0).astype(np.float32) if n > 1 else np.zeros_like(p, dtype=np.float32)
        i1 = np.minimum(i0 + 1, n - 1)
        shape = [1, 1, 1]
        shape[ax] = -1
        w = w.reshape(shape)
        out = np.take(out, i0, axis=ax) * (1 - w) + np.take(out, i1, axis=ax) * w
        valid.append(ok)
    inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    return np.where(inside, out, np.float32(fill)).astype(np.float32)


def ct_on_grid(ct_hu: np.ndarray, ct_grid: Grid, work: Grid, *, offset_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """The CT (HU) averaged to about the working voxel size and sampled on the working grid.

    Block-averaging first avoids aliasing CT noise and thin structures into the coarse grid.
    Outside the CT's field of view the result is NaN.
    """
    factors = tuple(max(1, int(w // c)) for w, c in zip(work.voxel_mm, ct_grid.voxel_mm))
    if any(k > 1 for k in factors):
        ct, g = block_mean(ct_hu, ct_grid, factors)
    else:
        ct, g = np.asarray(ct_hu, dtype=np.float32), ct_grid
    return resample_linear(ct, g, work, offset_mm=offset_mm)


def _soft(x: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """0 below ``centre - half_width``, 1 above ``centre + half_width``, linear between: sub-voxel edges."""
    return np.clip((x - centre) / (2.0 * half_width) + 0.5, 0.0, 1.0)


def fill_holes_per_plane(mask: np.ndarray) -> np.ndarray:
    """Holes filled plane by plane (lungs and bowel gas are inside the body)."""
    # one labelling of the background with in-plane connectivity: what does not reach the
    # plane's border is a hole
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    lab, _ = ndimage.label(~mask, structure=structure)
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    return mask | ~np.isin(lab, border[border > 0]) & (lab > 0)


def _outline(soft: np.ndarray, binary: np.ndarray) -> np.ndarray:
    """Soft body outline: 1 inside the hole-filled body, the soft ramp at its outer edge."""
    inner = ndimage.binary_erosion(fill_holes_per_plane(binary), iterations=1, border_value=0)
    return np.maximum(soft, inner.astype(np.float32))


def _profile_shift(a: np.ndarray, b: np.ndarray, step_mm: float, max_shift_mm: float,
                   valid: np.ndarray | None = None) -> float | None:
    """Shift (mm) of profile ``a`` relative to ``b`` (``a(x) ~ b(x - s)``) by normalised cross-correlation.

    Profiles are resampled to 0.5 mm, the correlation is computed over their overlap for every
    shift in ``[-max_shift_mm, max_shift_mm]`` and the peak refined by a parabola. Samples of
    ``a`` where ``valid`` is False (planes of a failed bed position, end planes) take no part.
    """
    fine = 0.5
    x = np.arange(a.size) * step_mm
    xf = np.arange(0.0, x[-1] + 1e-9, fine)
    af, bf = np.interp(xf, x, a), np.interp(xf, x, b)
    # a fine sample is usable only when both planes it interpolates between are
    vf = np.ones(xf.size, bool) if valid is None else np.interp(xf, x, np.asarray(valid, float)) > 0.999
    m = int(round(max_shift_mm / fine))
    scores = np.full(2 * m + 1, -np.inf)
    for n, s in enumerate(range(-m, m + 1)):
        # a(x) vs b(x - s): overlap of a[s:] with b[:-s] (s > 0)
        sl_a, sl_b = (slice(s, None), slice(0, af.size - s)) if s >= 0 else (slice(0, s), slice(-s, None))
        ok = vf[sl_a]
        if ok.sum() < 0.5 * vf.sum():
            continue
        aa, bb = af[sl_a][ok], bf[sl_b][ok]
        aa, bb = aa - aa.mean(), bb - bb.mean()
        den = float(np.sqrt(np.dot(aa, aa) * np.dot(bb, bb)))
        if den > 0:
            scores[n] = float(np.dot(aa, bb)) / den
    best = int(np.argmax(scores))
    if not np.isfinite(scores[best]) or scores[best] < 0.5:
        return None
    frac = 0.0
    if 0 < best < scores.size - 1 and np.all(np.isfinite(scores[best - 1: best + 2])):
        y0, y1, y2 = scores[best - 1: best + 2]
        den = y0 - 2 * y1 + y2
        frac = 0.5 * (y0 - y2) / den if den < 0 else 0.0
    return (best - m + frac) * fine


def _pet_lung(rel: np.ndarray, work: Grid, params: dict) -> np.ndarray:
    """Soft lung mask of the PET (0..1), its edges where the blurred uptake is halfway across them.

    A fixed threshold between lung (~0.4 x body level) and soft tissue (1.0) puts the edge right
    only where lung meets soft tissue. Below the right lung base lies the liver (2-3x): the
    scanner's blur spills it upward, the fixed threshold is crossed inside the lung and the PET
    lung base reads one blur-sigma (3-5 mm) too high, a false ``z`` shift that grows with the
    PSF (10 mm FWHM scanners read 6 mm). A local midpoint (Bernsen) threshold, halfway between
    the lowest and highest uptake within ``pet_lung_window_mm``, crosses a blurred step at the
    step whatever the levels on either side.
    """
    # along z only: across a lung base that is lung above and tissue or liver below, while an
    # in-plane window would also reach the spine and aorta (1.5-1.7x) and call soft tissue lung
    size = (2 * int(round(params["pet_lung_window_mm"] / work.voxel_mm[0])) + 1, 1, 1)
    # the levels on either side from an in-plane smoothed copy: the extremes of raw noise would
    # bias them apart (noise peaks raise the midpoint into the tissue below the lung)
    sig = [params["pet_lung_smooth_mm"] / FWHM_PER_SIGMA / v for v in work.voxel_mm]
    sig[0] = 0.0
    env = ndimage.gaussian_filter(rel, sigma=sig, mode="nearest")
    lo = ndimage.minimum_filter(env, size=size, mode="nearest")
    hi = ndimage.maximum_filter(env, size=size, mode="nearest")
    lung_max = params["pet_dense_frac"]
    # near lung (a lung-like minimum in reach) the edge is the local midpoint; elsewhere the fixed one
    t = np.where(lo < lung_max, 0.5 * (lo + hi), lung_max)
    t = np.maximum(t, lung_max)
    return 1.0 - np.clip((rel - t) / (2.0 * params["pet_ramp_frac"] * t) + 0.5, 0.0, 1.0)


def petct_shift(pet_sm: np.ndarray, ct_work: np.ndarray | None, work: Grid, body_level: float,
                params: dict, *, z_excluded: np.ndarray | None = None
                ) -> tuple[tuple[float, float, float] | None, str]:
    """PET minus CT body shift ``(x, y, z)`` in mm, or ``(None, reason)``.

    Parameters
    ----------
    pet_sm : ndarray
        Smoothed PET on the working grid.
    ct_work : ndarray or None
        CT (HU) on the same grid, NaN outside the CT's field of view.
    work : Grid
    body_level : float
        Soft-tissue uptake of the body (same units as ``pet_sm``).
    params : dict
        :data:`expectations.image.DEFAULTS`.
    z_excluded : ndarray of bool, optional
        Working planes left out of the ``z`` comparison (a failed bed position: its PET outline
        is empty while the CT's is whole, which would drag the ``z`` profiles apart).
    """
    if ct_work is None:
        return None, "no CT"
    if not body_level > 0:
        return None, "no body found on the PET"
    common = np.isfinite(ct_work)
    extent = [np.any(common, axis=tuple(a for a in range(3) if a != ax)) for ax in range(3)]
    for ax, name in zip(range(3), "zyx"):
        if extent[ax].sum() * work.voxel_mm[ax] < params["min_overlap_mm"]:
            return None, f"PET and CT overlap less than {params['min_overlap_mm']:.0f} mm along {name}"
    ct = np.where(common, ct_work, -1000.0)
    pet = np.where(common, pet_sm, 0.0)
    rel = pet / body_level
    ct_bin = ct > params["ct_body_hu"]
    pet_bin = rel > params["body_frac"]
    if ct_bin.sum() == 0 or pet_bin.sum() == 0:
        return None, "no body found on the CT" if ct_bin.sum() == 0 else "no body found on the PET"
    ramp_hu = params["ct_ramp_hu"]
    pet_soft = _soft(rel, params["body_frac"], params["pet_ramp_frac"])
    ct_soft = _soft(ct, params["ct_body_hu"], ramp_hu)
    pet_out, ct_out = _outline(pet_soft, pet_bin), _outline(ct_soft, ct_bin)
    # dense tissue (outline minus lung-like interior): lungs are ~0.4x soft tissue on FDG PET and
    # -800 HU on CT; the midpoints are the thresholds
    pet_dense = pet_out * (1.0 - _pet_lung(rel, work, params))
    ct_dense = ct_out * _soft(ct, params["ct_body_hu"], ramp_hu)
    shift = []
    for ax, (p, c) in zip((2, 1, 0), ((pet_out, ct_out), (pet_out, ct_out), (pet_dense, ct_dense))):
        other = tuple(a for a in range(3) if a != ax)
        keep = extent[ax]
        valid = None
        if ax == 0:
            valid = np.ones(work.shape[0], bool)
            n_end = int(np.ceil(params["dip_end_frac"] * work.shape[0]))
            if n_end:  # axial sensitivity falls off at the ends of the field of view
                valid[:n_end] = valid[-n_end:] = False
            if z_excluded is not None:
                valid &= ~np.asarray(z_excluded, bool)
            valid = valid[keep]
            if valid.sum() * work.voxel_mm[0] < params["min_overlap_mm"]:
                return None, "too few usable PET planes to compare along z"
        s = _profile_shift(p.sum(axis=other)[keep], c.sum(axis=other)[keep], work.voxel_mm[ax],
                           params["max_shift_mm"], valid)
        if s is None:
            return None, f"PET and CT outlines do not match along {'zyx'[ax]}"
        shift.append(float(s))
    return (shift[0], shift[1], shift[2]), ""
