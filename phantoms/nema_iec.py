"""The NEMA IEC body phantom: EARL recovery coefficients, NEMA NU 2 percent contrast, background
variability and lung residual.

Arrays are indexed ``(plane, row, col)``; positions are ``(x, y, z)`` in mm. With a
:class:`~corelab.grid.Grid` they are patient LPS coordinates; without one, ``(0, 0, 0)`` is
the centre of voxel ``[0, 0, 0]`` and ``x, y, z`` run along columns, rows and planes.

Definitions follow ``pet-qc-facts.md`` sections 1-2 (EARL programme description, NEMA NU 2 as
reproduced by public implementations). :func:`analyze_nema_iec` runs four steps: localise the
spheres (:mod:`phantoms.localise`, checked by :mod:`phantoms.identity`), place the ROIs from the
ring fit, measure each sphere, measure the lung residual. Results: :mod:`phantoms.results`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from corelab.grid import Grid
from phantoms.geometry import NEMA_IEC_BODY, NemaIecBodyPhantom
from phantoms.identity import check_identity
from phantoms.localise import PhantomLocalisationError, fit_ring, localise_spheres
from phantoms.results import NemaIecResult, SphereResult
from phantoms.voxels import Frame, RingPose, ball_weights, disc_weights, frame_of

__all__ = ["analyze_nema_iec", "RC_PEAK_RADIUS_MM", "RC_PEAK_PLACEMENTS", "LUNG_ROI_DIAMETER_MM"]


RC_PEAK_RADIUS_MM = (3.0 * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
"""Radius of the 1 mL sphere used for RCpeak, mm (6.2 mm)."""


# --------------------------------------------------------------------------------------------
# NEMA IEC measurements
# --------------------------------------------------------------------------------------------
def _a50_voi(volume, frame: Frame, centre_xyz, search_radius_mm: float, background: float):
    """Max voxel and the background-adapted 50 % isocontour VOI around one sphere.

    The VOI is the set of voxels ``>= B + 0.5 * (max - B)`` that are face-connected to the
    highest voxel, within ``search_radius_mm`` of the sphere centre (which keeps neighbouring
    spheres out). Returns ``(max, mean, n_voxels, max_xyz)``, or None if the neighbourhood lies
    outside the image.
    """
    region = frame.ball_region(np.asarray(centre_xyz), search_radius_mm)
    if any(sl.stop <= sl.start for sl in region):
        return None
    x, y, z = frame.region_mm(region)
    cx, cy, cz = centre_xyz
    inside = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= search_radius_mm**2
    if not inside.any():
        return None
    sub = np.where(inside, volume[region], -np.inf)
    kmax = np.unravel_index(int(np.argmax(sub)), sub.shape)
    vmax = float(sub[kmax])
    threshold = background + 0.5 * (vmax - background)
    labels, _ = ndimage.label(sub >= threshold)
    voi = labels == labels[kmax]
    mean = float(volume[region][voi].mean())
    max_kji = np.array([s.start + k for s, k in zip(region, kmax)], dtype=float)
    return vmax, mean, int(voi.sum()), frame.to_mm(max_kji)


def _ball_mean(volume, frame: Frame, centre_xyz, radius_mm: float) -> float:
    region = frame.ball_region(np.asarray(centre_xyz), radius_mm + float(max(frame.spacing)))
    w = ball_weights(frame, region, centre_xyz, radius_mm)
    return float(np.sum(w * volume[region]) / np.sum(w))


def _best_ball(volume, frame: Frame, centre_xyz, within_mm: float, radius_mm: float):
    """Voxel centre within ``within_mm`` of ``centre_xyz`` where the ball mean is highest.

    Returns ``(mean, centre_xyz)``. The ball mean at every voxel centre is a correlation with
    the ball's partial-voxel weights.
    """
    # kernel: partial-voxel weights of the ball centred on a voxel centre
    half = np.ceil(radius_mm / frame.spacing[::-1] + 1.0).astype(int)
    kframe = Frame(-half[::-1] * frame.spacing, frame.spacing, tuple(2 * half + 1), frame.kind)
    kregion = tuple(slice(0, n) for n in kframe.shape)
    kernel = ball_weights(kframe, kregion, (0.0, 0.0, 0.0), radius_mm)
    kernel /= kernel.sum()
    region = frame.ball_region(np.asarray(centre_xyz), within_mm + radius_mm + float(max(frame.spacing)))
    means = ndimage.correlate(volume[region], kernel, mode="nearest")
    x, y, z = frame.region_mm(region)
    cx, cy, cz = centre_xyz
    allowed = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= within_mm**2
    means = np.where(allowed, means, -np.inf)
    k = np.unravel_index(int(np.argmax(means)), means.shape)
    kji = np.array([s.start + i for s, i in zip(region, k)], dtype=float)
    return float(means[k]), frame.to_mm(kji)


def _disc_mean(volume, frame: Frame, plane: int, centre_xy, radius_mm: float, cache: dict | None = None
               ) -> float | None:
    """Area-weighted mean of a circle on one plane; None when the circle leaves the image.

    ``cache`` (a dict) reuses the weights of a circle drawn at the same ``(x, y)`` (to 0.01 mm)
    on several planes, as the background ROIs are.
    """
    if not 0 <= plane < frame.shape[0]:
        return None
    key = (round(float(centre_xy[0]), 2), round(float(centre_xy[1]), 2), radius_mm)
    if cache is not None and key in cache:
        rows, cols, w, total = cache[key]
    else:
        reg, w = disc_weights(frame, 0, centre_xy, radius_mm)
        rows, cols, w, total = reg[1], reg[2], w[0], float(w.sum())
        if cache is not None:
            cache[key] = (rows, cols, w, total)
    # an ROI cut by the edge of the image is not used
    expected = math.pi * radius_mm**2 / (frame.spacing[0] * frame.spacing[1])
    if total < 0.98 * expected:
        return None
    return float(np.sum(w * volume[plane, rows, cols]) / total)


RC_PEAK_PLACEMENTS = ("max_voxel", "max_mean")
"""Documented RCpeak placements (see :func:`analyze_nema_iec`)."""

LUNG_ROI_DIAMETER_MM = 30.0
"""NEMA NU 2 lung-insert ROI diameter, mm."""


def analyze_nema_iec(
    volume_kbq_ml: np.ndarray,
    voxel_mm: Sequence[float],
    *,
    sphere_kbq_ml: float,
    background_kbq_ml: float,
    centres_mm: Mapping[float, Sequence[float]] | None = None,
    grid: Grid | None = None,
    geometry: NemaIecBodyPhantom = NEMA_IEC_BODY,
    search_margin_mm: float = 10.0,
    max_fit_rms_mm: float | None = None,
    rc_peak_placement: str = "max_voxel",
) -> NemaIecResult:
    """Recovery coefficients, percent contrast, background variability and lung residual of an
    IEC body phantom.

    Parameters
    ----------
    volume_kbq_ml : ndarray, shape (planes, rows, cols)
        Activity concentration, kBq/mL, decay-corrected to the filling reference time.
    voxel_mm : (3,) float
        ``(slice, row, col)`` spacing, mm.
    sphere_kbq_ml, background_kbq_ml : float
        True (filled) sphere and background concentrations at the same time, kBq/mL.
    centres_mm : dict, optional
        Known sphere centres ``{diameter_mm: (x, y, z)}`` (at least three spheres), in the
        coordinates described in the module docstring. Skips the automatic search; the ring is
        fitted to them, so the other spheres, the lung insert and the background ROIs follow.
    grid : Grid, optional
        Places the volume in patient space; positions are then patient LPS mm.
    geometry : NemaIecBodyPhantom
        Phantom dimensions.
    search_margin_mm : float
        The max voxel and the A50 VOI of a sphere are searched within ``radius + margin`` of
        its fitted centre, mm. Smaller than the 25 mm gap between neighbouring spheres.
    max_fit_rms_mm : float, optional
        Largest accepted RMS distance between the spheres found and the ring geometry; default
        ``max(4 mm, 1.5 voxel)``.
    rc_peak_placement : {"max_voxel", "max_mean"}
        Where the 1 mL RCpeak sphere goes: centred on the highest voxel of the sphere (default),
        or at the voxel centre within the sphere's radius of its fitted centre where the 1 mL
        mean is highest.

    Returns
    -------
    NemaIecResult

    Raises
    ------
    PhantomLocalisationError
        Fewer than three spheres found, or they do not fit the ring geometry; the message says
        how to give the centres by hand.

    Notes
    -----
    Localisation (step 1, :mod:`phantoms.localise`): voxels above ``B + 0.5 * (S - B)`` (after a 2 mm
    Gaussian smoothing) form connected components; the unlabelled hexagon of the sphere ring is
    fitted to them, and each ring position is named by the activity volume it holds (not by its
    uptake, which PSF reconstructions distort). The named ring template is then fitted rigidly
    in 3-D: any shift, roll, tilt, a mirrored image and the phantom turned end over end fit
    alike. :func:`~phantoms.identity.check_identity` checks the names against the image
    (:attr:`NemaIecResult.identity_check`; with automatic localisation a failed check makes the
    result :attr:`~NemaIecResult.localisation_uncertain`). The ring centre is the lung-insert
    axis, so the insert and the background ROIs follow from the same fit. Spheres not found are
    placed from the fit, not searched for, as NEMA fixes ROIs rather than moving them to the
    hottest spot.

    * ``rc_max``: highest voxel within ``radius + search_margin_mm`` / true sphere conc.
    * ``rc_mean``: mean of the voxels ``>= B + 0.5 * (max - B)`` (``B`` the *known*
      background), face-connected to the highest voxel, within the same neighbourhood (EARL
      A50 background-adapted isocontour).
    * ``rc_peak``: mean of a 1 mL sphere (r = 6.2 mm, partial-voxel weights by 5^3
      sub-samples) placed as ``rc_peak_placement`` says. EARL tools differ here.
    * ``percent_contrast``: ``Q_H = (C_H / C_B - 1) / (S / B - 1) * 100``; ``C_H`` is the mean of
      a circle of the sphere diameter on the image plane nearest the sphere centre (pixel
      weights by area); ``C_B`` the mean over the background circles of the same diameter at the
      12 positions of :attr:`~phantoms.geometry.NemaIecBodyPhantom.background_roi_xy_mm` on the
      planes nearest -20, -10, 0, +10, +20 mm from the sphere plane (a simplified set: see the
      geometry), skipping ROIs cut by the image edge.
    * ``background_variability_pct``: sample SD (ddof = 1) of those ROI means / ``C_B`` * 100.
    * ``lung_residual_pct``: a 30 mm circle on the lung-insert axis on each of the planes of
      the background ROIs; ``C_lung,i / C_B,37mm * 100`` averaged over those planes (NEMA NU 2).
    """
    volume = np.asarray(volume_kbq_ml, dtype=np.float64)
    frame = frame_of(volume, voxel_mm, grid)
    if sphere_kbq_ml <= background_kbq_ml:
        raise ValueError(
            f"sphere_kbq_ml ({sphere_kbq_ml}) must exceed background_kbq_ml ({background_kbq_ml}) "
            "for a hot-sphere analysis"
        )
    if background_kbq_ml <= 0:
        raise ValueError(f"background_kbq_ml must be > 0, got {background_kbq_ml}")
    if rc_peak_placement not in RC_PEAK_PLACEMENTS:
        raise ValueError(f"rc_peak_placement is {rc_peak_placement!r}; use one of {RC_PEAK_PLACEMENTS}")
    pose, centres, identity = _localise(volume, frame, geometry, centres_mm, sphere_kbq_ml, background_kbq_ml,
                                        max_fit_rms_mm)
    bg_rois, lung_rois = _place_rois(frame, geometry, pose)
    spheres = []
    n_bg_used = 0
    disc_cache: dict = {}
    for d in sorted(geometry.sphere_diameters_mm):
        sphere, n_bg = _measure_sphere(volume, frame, float(d), centres[d], d in pose.detected, bg_rois, disc_cache,
                                       sphere_kbq_ml=sphere_kbq_ml, background_kbq_ml=background_kbq_ml,
                                       search_margin_mm=search_margin_mm, rc_peak_placement=rc_peak_placement)
        spheres.append(sphere)
        n_bg_used = max(n_bg_used, n_bg)
    c_b37 = spheres[-1].background_mean_kbq_ml if spheres else math.nan
    lung_planes, lung_pct = _lung_residual(volume, frame, lung_rois, c_b37, disc_cache)
    return NemaIecResult(
        spheres=tuple(spheres),
        sphere_kbq_ml=float(sphere_kbq_ml),
        background_kbq_ml=float(background_kbq_ml),
        ring_centre_mm=tuple(float(v) for v in pose.translation),
        phantom_axis=tuple(float(v) for v in pose.rotation[:, 2]),
        fit_rms_mm=pose.rms_mm,
        sphere_plane_index=_plane_of(frame, pose.translation),
        n_background_rois=n_bg_used,
        coordinates=frame.kind,
        rc_peak_placement=rc_peak_placement,
        lung_residual_pct=float(np.mean(lung_pct)) if lung_pct else math.nan,
        lung_residual_per_plane_pct=tuple(float(v) for v in lung_pct),
        lung_residual_planes=tuple(lung_planes),
        localisation="automatic" if centres_mm is None else "given centres",
        identity_check=identity,
    )


def _plane_of(frame: Frame, p) -> int:
    """Index of the image plane nearest the point ``p`` (x, y, z mm)."""
    return int(round(float(frame.to_index(p)[0])))


def _localise(volume, frame: Frame, ph: NemaIecBodyPhantom, centres_mm, sphere_kbq_ml: float,
              background_kbq_ml: float, max_fit_rms_mm: float | None):
    """Step 1: the sphere ring in the image, every sphere's centre, and the check of their names.

    The spheres are found and named (:func:`~phantoms.localise.localise_spheres`) unless
    ``centres_mm`` gives them; the named ring template is fitted to them
    (:func:`~phantoms.localise.fit_ring`) and the names checked against the image
    (:func:`~phantoms.identity.check_identity`). Returns ``(pose, {diameter_mm: centre_xyz},
    identity_check)``.
    """
    ring_c = np.asarray(ph.ring_centre_mm)
    voxel_max = float(max(frame.spacing))
    rms_limit = max_fit_rms_mm if max_fit_rms_mm is not None else max(4.0, 1.5 * voxel_max)
    if centres_mm is None:
        located = localise_spheres(volume, frame, ph, sphere=sphere_kbq_ml, background=background_kbq_ml,
                                   max_rms_mm=rms_limit, accept_mm=max(5.0, 1.5 * voxel_max))
        found, margin = located.found, located.naming_margin
    else:
        found = {float(d): np.asarray(c, dtype=float) for d, c in centres_mm.items()}
        margin = math.nan
    pose = fit_ring(found, ph, max_rms_mm=rms_limit, given=centres_mm is not None)
    centres = {d: pose.to_image(c, ring_c) for d, c in ph.sphere_centres_mm().items()}
    identity = check_identity(volume, frame, ph, centres, pose, sphere=sphere_kbq_ml,
                              background=background_kbq_ml, max_rms_mm=rms_limit, naming_margin=margin)
    return pose, centres, identity


def _place_rois(frame: Frame, ph: NemaIecBodyPhantom, pose: RingPose):
    """Step 2: the background ROIs and the lung-insert ROIs, placed from the ring fit.

    Returns ``(bg_rois, lung_rois)``, each a list of ``(plane, (x, y))``: the background ROIs at
    every position of :attr:`~phantoms.geometry.NemaIecBodyPhantom.background_roi_xy_mm` on each
    background plane, and the lung-insert ROI on the same planes.
    """
    ring_c = np.asarray(ph.ring_centre_mm)
    bg_rois = []  # (plane, (x, y)) of each background ROI
    lung_rois = []  # (plane, (x, y)) of the lung-insert ROI on the same planes
    lx, ly = ph.lung_axis_xy_mm
    for dz in ph.background_roi_offsets_z_mm:
        for bx, by in ph.background_roi_xy_mm:
            p = pose.to_image((bx, by, ph.sphere_plane_z_mm + dz), ring_c)
            bg_rois.append((_plane_of(frame, p), (float(p[0]), float(p[1]))))
        p = pose.to_image((lx, ly, ph.sphere_plane_z_mm + dz), ring_c)
        lung_rois.append((_plane_of(frame, p), (float(p[0]), float(p[1]))))
    return bg_rois, lung_rois


def _measure_sphere(volume, frame: Frame, d: float, c, detected: bool, bg_rois, disc_cache: dict, *,
                    sphere_kbq_ml: float, background_kbq_ml: float, search_margin_mm: float,
                    rc_peak_placement: str) -> tuple[SphereResult, int]:
    """Step 3: recovery, percent contrast and background variability of the sphere of diameter ``d``
    centred at ``c``; returns the result and the number of background ROIs used (those in the image).
    """
    voi = _a50_voi(volume, frame, c, 0.5 * d + search_margin_mm, background_kbq_ml)
    if voi is None:
        raise PhantomLocalisationError(
            f"the {d:g} mm sphere, placed from the ring fit at ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) mm, "
            "lies outside the image"
        )
    vmax, vmean, nvox, max_xyz = voi
    if rc_peak_placement == "max_voxel":
        peak_xyz = max_xyz
        peak = _ball_mean(volume, frame, peak_xyz, RC_PEAK_RADIUS_MM)
    else:
        peak, peak_xyz = _best_ball(volume, frame, c, 0.5 * d, RC_PEAK_RADIUS_MM)
    hot_plane = _plane_of(frame, c)
    c_hot = _disc_mean(volume, frame, hot_plane, c[:2], 0.5 * d)
    bg_means = [m for pl, xy in bg_rois
                if (m := _disc_mean(volume, frame, pl, xy, 0.5 * d, disc_cache)) is not None]
    if len(bg_means) >= 2:
        c_b = float(np.mean(bg_means))
        n_j = float(np.std(bg_means, ddof=1)) / c_b * 100.0
    else:
        c_b, n_j = math.nan, math.nan
    if c_hot is not None and math.isfinite(c_b):
        q_h = (c_hot / c_b - 1.0) / (sphere_kbq_ml / background_kbq_ml - 1.0) * 100.0
    else:
        q_h = math.nan
    result = SphereResult(
        diameter_mm=float(d),
        centre_mm=tuple(float(v) for v in c),
        detected=detected,
        max_kbq_ml=vmax,
        mean_kbq_ml=vmean,
        peak_kbq_ml=peak,
        rc_max=vmax / sphere_kbq_ml,
        rc_mean=vmean / sphere_kbq_ml,
        rc_peak=peak / sphere_kbq_ml,
        voi_volume_ml=nvox * float(np.prod(frame.spacing)) / 1000.0,
        percent_contrast=float(q_h),
        background_mean_kbq_ml=c_b,
        background_variability_pct=n_j,
        hot_plane_index=hot_plane,
        peak_centre_mm=tuple(float(v) for v in peak_xyz),
    )
    return result, len(bg_means)


def _lung_residual(volume, frame: Frame, lung_rois, c_b37: float, disc_cache: dict):
    """Step 4: ``C_lung,i / C_B,37mm * 100`` on each plane whose lung ROI lies in the image.

    Returns ``(planes, percentages)``; both empty when the 37 mm background is unknown.
    """
    lung_planes, lung_pct = [], []
    for pl, xy in lung_rois:
        m = _disc_mean(volume, frame, pl, xy, 0.5 * LUNG_ROI_DIAMETER_MM, disc_cache)
        if m is not None and math.isfinite(c_b37):
            lung_planes.append(pl)
            lung_pct.append(m / c_b37 * 100.0)
    return lung_planes, lung_pct
