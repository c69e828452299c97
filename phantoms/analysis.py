"""Phantom analysis: the NEMA IEC body phantom (EARL recovery coefficients, NEMA NU 2 percent
contrast, background variability and lung residual) and the uniform-cylinder calibration check.

Arrays are indexed ``(plane, row, col)``; positions are ``(x, y, z)`` in mm. With a
:class:`~phantoms.digital.Grid` they are patient LPS coordinates; without one, ``(0, 0, 0)`` is
the centre of voxel ``[0, 0, 0]`` and ``x, y, z`` run along columns, rows and planes.

Definitions follow ``pet-qc-facts.md`` sections 1-2 (EARL programme description, NEMA NU 2 as
reproduced by public implementations).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from phantoms.digital import Grid
from phantoms.geometry import NEMA_IEC_BODY, NemaIecBodyPhantom
from phantoms.localise import (IdentityCheck, PhantomLocalisationError, check_identity, fit_ring,
                               localise_spheres)
from phantoms.voxels import Frame, ball_weights, disc_weights, frame_of

__all__ = [
    "IdentityCheck",
    "PhantomLocalisationError",
    "SphereResult",
    "NemaIecResult",
    "CylinderResult",
    "analyze_nema_iec",
    "analyze_uniform_cylinder",
    "RC_PEAK_RADIUS_MM",
    "RC_PEAK_PLACEMENTS",
    "LUNG_ROI_DIAMETER_MM",
]

RC_PEAK_RADIUS_MM = (3.0 * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
"""Radius of the 1 mL sphere used for RCpeak, mm (6.2 mm)."""


def _json_safe(value):
    """Plain JSON types: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SphereResult:
    """Measurements of one hot sphere.

    Attributes
    ----------
    diameter_mm : float
        Nominal inner diameter.
    centre_mm : tuple of float
        Sphere centre used for the ROIs, ``(x, y, z)`` mm (from the ring fit).
    detected : bool
        True if the sphere was itself found by thresholding (else placed from the ring fit).
    max_kbq_ml, mean_kbq_ml, peak_kbq_ml : float
        Highest voxel, mean of the A50 VOI, mean of the 1 mL RCpeak sphere (placed as
        :attr:`NemaIecResult.rc_peak_placement` says).
    rc_max, rc_mean, rc_peak : float
        The above divided by the true sphere concentration.
    voi_volume_ml : float
        Volume of the A50 VOI.
    percent_contrast : float
        NEMA percent contrast ``Q_H`` (%).
    background_mean_kbq_ml : float
        ``C_B``: mean of the background ROIs of this sphere's diameter.
    background_variability_pct : float
        NEMA ``N = SD / C_B * 100`` over the background ROIs of this diameter (sample SD).
    hot_plane_index : int
        Image plane of the hot ROI for percent contrast (the plane nearest the sphere centre).
    peak_centre_mm : tuple of float
        Centre of the 1 mL RCpeak sphere, ``(x, y, z)`` mm.
    """

    diameter_mm: float
    centre_mm: tuple[float, float, float]
    detected: bool
    max_kbq_ml: float
    mean_kbq_ml: float
    peak_kbq_ml: float
    rc_max: float
    rc_mean: float
    rc_peak: float
    voi_volume_ml: float
    percent_contrast: float
    background_mean_kbq_ml: float
    background_variability_pct: float
    hot_plane_index: int = -1
    peak_centre_mm: tuple[float, float, float] = (math.nan, math.nan, math.nan)

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN, e.g. a contrast that could not be measured, becomes None)."""
        return _json_safe(asdict(self))


@dataclass(frozen=True)
class NemaIecResult:
    """Result of :func:`analyze_nema_iec`.

    Attributes
    ----------
    spheres : tuple of SphereResult
        One per sphere, by increasing diameter.
    sphere_kbq_ml, background_kbq_ml : float
        True concentrations the recovery is relative to, kBq/mL.
    ring_centre_mm : tuple of float
        Where the lung-insert axis crosses the sphere plane, ``(x, y, z)`` mm.
    phantom_axis : tuple of float
        Unit vector normal to the sphere plane (sign arbitrary).
    fit_rms_mm : float
        RMS distance between the found sphere centres and the fitted ring geometry.
    sphere_plane_index : int
        The image plane used as the central sphere slice for percent contrast.
    n_background_rois : int
        Background ROIs used per diameter (60 when the phantom is fully in the field of view).
    coordinates : str
        ``"patient"`` (a grid was given) or ``"index"`` (mm from voxel ``[0, 0, 0]``).
    rc_peak_placement : str
        How the 1 mL RCpeak sphere was placed: ``"max_voxel"`` (centred on the highest voxel of
        the sphere's A50 VOI) or ``"max_mean"`` (at the voxel centre, within the sphere's
        neighbourhood, where the 1 mL mean is highest).
    lung_residual_pct : float
        NEMA lung residual error, mean over :attr:`lung_residual_planes` of
        ``C_lung,i / C_B,37mm * 100`` (30 mm ROI on the lung insert, background of the 37 mm ROIs).
    lung_residual_per_plane_pct : tuple of float
        ``C_lung,i / C_B,37mm * 100`` on each of those planes.
    lung_residual_planes : tuple of int
        Image planes used: those of the background ROIs (sphere plane, +/-10, +/-20 mm).
    localisation : str
        ``"automatic"`` (spheres found by thresholding, ring fitted, named by their activity
        volumes) or ``"given centres"``.
    identity_check : IdentityCheck or None
        The sphere names checked against the image: measured activity volume of each sphere
        against its nominal volume, size order round the ring, ring fit, naming margin (see
        :mod:`phantoms.localise`).
    """

    spheres: tuple[SphereResult, ...]
    sphere_kbq_ml: float
    background_kbq_ml: float
    ring_centre_mm: tuple[float, float, float]
    phantom_axis: tuple[float, float, float]
    fit_rms_mm: float
    sphere_plane_index: int
    n_background_rois: int
    coordinates: str
    rc_peak_placement: str = "max_voxel"
    lung_residual_pct: float = math.nan
    lung_residual_per_plane_pct: tuple[float, ...] = ()
    lung_residual_planes: tuple[int, ...] = ()
    localisation: str = "automatic"
    identity_check: IdentityCheck | None = None

    @property
    def localisation_uncertain(self) -> bool:
        """True when the image contradicts the automatic sphere names: withhold the verdict.

        Centres given by hand are the physicist's call: the check is still reported in
        :attr:`identity_check` but does not make them uncertain.
        """
        return bool(self.identity_check and self.identity_check.uncertain and self.localisation == "automatic")

    def sphere(self, diameter_mm: float) -> SphereResult:
        """The result of the sphere of this nominal diameter."""
        for s in self.spheres:
            if abs(s.diameter_mm - diameter_mm) < 0.5:
                return s
        raise KeyError(f"no sphere of {diameter_mm} mm; have {[s.diameter_mm for s in self.spheres]}")

    @property
    def rc_max(self) -> dict[float, float]:
        return {s.diameter_mm: s.rc_max for s in self.spheres}

    @property
    def rc_mean(self) -> dict[float, float]:
        return {s.diameter_mm: s.rc_mean for s in self.spheres}

    @property
    def rc_peak(self) -> dict[float, float]:
        return {s.diameter_mm: s.rc_peak for s in self.spheres}

    @property
    def background_variability(self) -> dict[float, float]:
        """NEMA background variability per sphere diameter, ``{diameter_mm: N_j %}``."""
        return {s.diameter_mm: s.background_variability_pct for s in self.spheres}

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN becomes None).

        Besides the fields, it carries the NEMA summary at the top level:
        ``background_variability`` (``{"10": N %, ..., "37": N %}``, keys the sphere diameters
        in mm) and ``lung_residual`` (mean lung residual error, %).
        """
        out = asdict(self)
        out["background_variability"] = {f"{d:g}": v for d, v in self.background_variability.items()}
        out["lung_residual"] = self.lung_residual_pct
        out["localisation_uncertain"] = self.localisation_uncertain
        if self.identity_check is not None:
            ic = out["identity_check"]
            for key in ("measured_volume_ml", "nominal_volume_ml", "measured_diameter_mm", "noise_sd_ml"):
                ic[key] = {f"{d:g}": v for d, v in ic[key].items()}
        return _json_safe(out)


@dataclass(frozen=True)
class CylinderResult:
    """Result of :func:`analyze_uniform_cylinder`.

    Attributes
    ----------
    measured_kbq_ml, true_kbq_ml : float
        Mean of the central VOI, and the filled concentration.
    calibration_bias_pct : float
        ``(measured / true - 1) * 100`` (EARL "SUV bias").
    suv_mean : float
        ``measured / true``: the mean SUV of the VOI when the cylinder's SUV normalisation is
        its true concentration (EARL accepts 0.90-1.10). Dimensionless.
    cov_pct : float
        Voxel coefficient of variation in the VOI (sample SD / mean * 100).
    slice_means_kbq_ml : tuple of float
        Mean of the VOI on each plane it covers (axial profile).
    slice_z_mm : tuple of float
        ``z`` of those planes.
    max_nonuniformity_pct, min_nonuniformity_pct : float
        ``(max slice mean / VOI mean - 1) * 100`` and the same for the minimum.
    centre_mm : tuple of float
        Centre of the cylinder found in the image, ``(x, y, z)`` mm.
    radius_mm, length_mm : float
        Radius and length of the cylinder found in the image.
    voi_radius_mm, voi_length_mm : float
        Size of the central VOI.
    voi_voxels : int
    coordinates : str
        ``"patient"`` or ``"index"`` (see the module docstring).
    """

    measured_kbq_ml: float
    true_kbq_ml: float
    calibration_bias_pct: float
    suv_mean: float
    cov_pct: float
    slice_means_kbq_ml: tuple[float, ...]
    slice_z_mm: tuple[float, ...]
    max_nonuniformity_pct: float
    min_nonuniformity_pct: float
    centre_mm: tuple[float, float, float]
    radius_mm: float
    length_mm: float
    voi_radius_mm: float
    voi_length_mm: float
    voi_voxels: int
    coordinates: str

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN becomes None)."""
        return _json_safe(asdict(self))


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
    Localisation (:mod:`phantoms.localise`): voxels above ``B + 0.5 * (S - B)`` (after a 2 mm
    Gaussian smoothing) form connected components; the unlabelled hexagon of the sphere ring is
    fitted to them, and each ring position is named by the activity volume it holds (not by its
    uptake, which PSF reconstructions distort). The named ring template is then fitted rigidly
    in 3-D: any shift, roll, tilt, a mirrored image and the phantom turned end over end fit
    alike. :func:`~phantoms.localise.check_identity` checks the names against the image
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
    ph = geometry
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
    ring_centre = pose.translation
    axis = pose.rotation[:, 2]

    def plane_of(p) -> int:
        return int(round(float(frame.to_index(p)[0])))

    plane0 = plane_of(ring_centre)
    bg_rois = []  # (plane, (x, y)) of each background ROI
    lung_rois = []  # (plane, (x, y)) of the lung-insert ROI on the same planes
    lx, ly = ph.lung_axis_xy_mm
    for dz in ph.background_roi_offsets_z_mm:
        for bx, by in ph.background_roi_xy_mm:
            p = pose.to_image((bx, by, ph.sphere_plane_z_mm + dz), ring_c)
            bg_rois.append((plane_of(p), (float(p[0]), float(p[1]))))
        p = pose.to_image((lx, ly, ph.sphere_plane_z_mm + dz), ring_c)
        lung_rois.append((plane_of(p), (float(p[0]), float(p[1]))))

    spheres = []
    n_bg_used = 0
    disc_cache: dict = {}
    for d in sorted(ph.sphere_diameters_mm):
        c = centres[d]
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
        hot_plane = plane_of(c)
        c_hot = _disc_mean(volume, frame, hot_plane, c[:2], 0.5 * d)
        bg_means = [m for pl, xy in bg_rois
                    if (m := _disc_mean(volume, frame, pl, xy, 0.5 * d, disc_cache)) is not None]
        n_bg_used = max(n_bg_used, len(bg_means))
        if len(bg_means) >= 2:
            c_b = float(np.mean(bg_means))
            n_j = float(np.std(bg_means, ddof=1)) / c_b * 100.0
        else:
            c_b, n_j = math.nan, math.nan
        if c_hot is not None and math.isfinite(c_b):
            q_h = (c_hot / c_b - 1.0) / (sphere_kbq_ml / background_kbq_ml - 1.0) * 100.0
        else:
            q_h = math.nan
        spheres.append(
            SphereResult(
                diameter_mm=float(d),
                centre_mm=tuple(float(v) for v in c),
                detected=d in pose.detected,
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
        )
    c_b37 = spheres[-1].background_mean_kbq_ml if spheres else math.nan
    lung_planes, lung_pct = [], []
    for pl, xy in lung_rois:
        m = _disc_mean(volume, frame, pl, xy, 0.5 * LUNG_ROI_DIAMETER_MM, disc_cache)
        if m is not None and math.isfinite(c_b37):
            lung_planes.append(pl)
            lung_pct.append(m / c_b37 * 100.0)
    return NemaIecResult(
        spheres=tuple(spheres),
        sphere_kbq_ml=float(sphere_kbq_ml),
        background_kbq_ml=float(background_kbq_ml),
        ring_centre_mm=tuple(float(v) for v in ring_centre),
        phantom_axis=tuple(float(v) for v in axis),
        fit_rms_mm=pose.rms_mm,
        sphere_plane_index=plane0,
        n_background_rois=n_bg_used,
        coordinates=frame.kind,
        rc_peak_placement=rc_peak_placement,
        lung_residual_pct=float(np.mean(lung_pct)) if lung_pct else math.nan,
        lung_residual_per_plane_pct=tuple(float(v) for v in lung_pct),
        lung_residual_planes=tuple(lung_planes),
        localisation="automatic" if centres_mm is None else "given centres",
        identity_check=identity,
    )


# --------------------------------------------------------------------------------------------
# Uniform cylinder
# --------------------------------------------------------------------------------------------
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
