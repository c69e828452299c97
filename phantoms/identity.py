"""The sphere sizes an image shows, and the check of the sphere names against them.

A sphere's activity volume (:func:`activity_volume_ml`) is the integral of ``image - background``
over a ball wide enough to hold the spill-out, divided by the sphere-to-background excess: blur and
edge overshoot move activity about but keep it, so it does not depend on the reconstruction.
:mod:`phantoms.localise` names the spheres of the ring by it; :func:`check_identity` then checks
those names against the image (step 5 of :mod:`phantoms.localise`): each sphere's measured volume
is nearer its own expected volume than any other (beyond :data:`SIGNIFICANCE` noise SDs measured
in the image), sizes grow round the ring, the ring fits, and the naming wins by a clear margin
(:data:`MIN_LABEL_MARGIN`). Any failure makes the localisation uncertain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from phantoms.geometry import NemaIecBodyPhantom, sphere_volume_ml
from phantoms.voxels import Frame, RingPose

__all__ = ["IdentityCheck", "activity_volume_ml", "expected_activity_volume_ml", "check_identity",
           "CHECK_MARGIN_MM", "SHELL_MM", "MIN_LABEL_MARGIN", "SIGNIFICANCE"]


CHECK_MARGIN_MM = 12.0
"""Margin beyond each sphere's own radius of the ball its volume is checked in, mm: wide enough to
hold the negative halo of an edge-enhancing (PSF) reconstruction as well as the spill-out."""

SHELL_MM = 6.0
"""Thickness of the shell outside that ball whose mean is the local background, mm (the mean, not
the median: PET noise is skewed, and the median of a background reads several per cent low)."""

MIN_LABEL_MARGIN = 1.0
"""Smallest accepted difference between the cost of the second-best and the best naming of the
ring (sum of squared natural-log volume ratios). Neighbouring IEC spheres differ by a factor of
about 2.2 in volume (0.79 in log), so one sphere misnamed costs about 0.6 more; two positions
swapped about 1.2."""


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
def activity_volume_ml(volume: np.ndarray, frame: Frame, centre_xyz: Sequence[float], *, radius_mm: float,
                       contrast: float, core_mm: float = 0.0,
                       exclude_axis: tuple[np.ndarray, np.ndarray, float] | None = None) -> tuple[float, float]:
    """Volume a hot sphere fills, from the activity it holds above the local background.

    ``V = sum(image - B_local) * voxel_ml / (B_local * (contrast - 1))`` over a ball of
    ``radius_mm``; ``B_local`` is the mean of a shell :data:`SHELL_MM` thick outside it.
    Independent of the image's calibration (the background is measured) and of the resolution
    (blur and edge overshoot move activity but keep it), provided the ball holds the spill-out.

    Parameters
    ----------
    volume : ndarray, shape (planes, rows, cols)
        Activity concentration (any unit).
    frame : Frame
    centre_xyz : (3,) float
        Ball centre, mm.
    radius_mm : float
        Ball radius, mm.
    contrast : float
        True sphere-to-background concentration ratio (> 1).
    core_mm : float
        Radius about the centre that must lie in the image (the sphere itself); the rest of the
        ball may be cut by the image edge.
    exclude_axis : (point, direction, radius_mm), optional
        A cylinder (the lung insert) whose voxels the background shell leaves out.

    Returns
    -------
    volume_ml, background : float
        The sphere volume, mL, and ``B_local`` in the image's unit (NaN, NaN when the core leaves
        the image or the background is not positive).
    """
    c = np.asarray(centre_xyz, dtype=float)
    region = frame.ball_region(c, radius_mm + SHELL_MM)
    x, y, z = frame.region_mm(region)
    d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
    inside = d2 <= radius_mm**2
    shell = (d2 > radius_mm**2) & (d2 <= (radius_mm + SHELL_MM) ** 2)
    if exclude_axis is not None:
        p0, u, rad = exclude_axis
        rel = np.stack(np.broadcast_arrays(x - p0[0], y - p0[1], z - p0[2]), axis=-1)
        along = rel @ u
        off2 = np.sum(rel**2, axis=-1) - along**2
        shell &= off2 > rad**2
    # The ball may be cut by the image edge (a short axial field of view): what is cut off is
    # background, which adds nothing. The sphere itself (``core_mm``) must be in the image.
    kji = frame.to_index(c)
    reach = core_mm / frame.spacing[::-1]
    within = np.all(kji - reach >= -0.5) and np.all(kji + reach <= np.asarray(frame.shape) - 0.5)
    if not within or not shell.any():
        return math.nan, math.nan
    sub = volume[region]
    background = float(np.mean(sub[shell]))
    if not background > 0:
        return math.nan, math.nan
    excess = float(np.sum(sub[inside] - background)) * float(np.prod(frame.spacing)) / 1000.0
    return excess / (background * (contrast - 1.0)), background


def expected_activity_volume_ml(diameter_mm: float, *, wall_mm: float, contrast: float) -> float:
    """Activity volume a sphere of this inner diameter shows: its volume less the background its
    cold wall displaces, ``V_inner - V_wall / (contrast - 1)``, mL."""
    wall_ml = sphere_volume_ml(diameter_mm + 2.0 * wall_mm) - sphere_volume_ml(diameter_mm)
    return sphere_volume_ml(diameter_mm) - wall_ml / (contrast - 1.0)


# --------------------------------------------------------------------------------------------
# The check of the names
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IdentityCheck:
    """The evidence in the image for the sphere names, and what disagrees with them.

    Attributes
    ----------
    uncertain : bool
        True when any check failed: the verdict must then be withheld.
    reasons : tuple of str
        One sentence per failed check, with the numbers.
    measured_volume_ml, nominal_volume_ml : dict
        ``{diameter_mm: mL}``: activity volume measured at each named sphere, and the one expected
        of it (:func:`expected_activity_volume_ml`: the nominal volume less the background its
        cold glass wall displaces).
    measured_diameter_mm : dict
        ``{diameter_mm: mm}``: diameter of a sphere of the measured volume.
    noise_sd_ml : dict
        ``{diameter_mm: mL}``: how far noise alone moves that measurement in this image (the
        background balls' spread, scaled up for the sphere's own activity, as PET noise variance
        grows with activity).
    order_inversions : int
        Pairs of neighbouring sizes whose measured volumes are in the wrong order.
    naming_margin : float
        Cost of the second-best naming minus the best (see :data:`MIN_LABEL_MARGIN`); NaN with
        given centres.
    ring_rms_mm, max_ring_rms_mm : float
        RMS distance of the detected spheres from the fitted ring, and the limit.
    """

    uncertain: bool
    reasons: tuple[str, ...]
    measured_volume_ml: dict[float, float] = field(default_factory=dict)
    nominal_volume_ml: dict[float, float] = field(default_factory=dict)
    measured_diameter_mm: dict[float, float] = field(default_factory=dict)
    noise_sd_ml: dict[float, float] = field(default_factory=dict)
    order_inversions: int = 0
    naming_margin: float = math.nan
    ring_rms_mm: float = math.nan
    max_ring_rms_mm: float = math.nan


def _equivalent_diameter_mm(volume_ml: float) -> float:
    return (6.0 * volume_ml * 1000.0 / math.pi) ** (1.0 / 3.0) if volume_ml > 0 else 0.0


def _lung_axis(centre: np.ndarray, normal: np.ndarray, geometry: NemaIecBodyPhantom):
    # the ring is centred on the lung insert: keep its cold wall out of the background shells
    return centre, normal, geometry.lung_outer_radius_mm + 4.0


def _noise_ml(volume: np.ndarray, frame: Frame, geometry: NemaIecBodyPhantom, pose: RingPose, *, radius_mm: float,
              contrast: float) -> float:
    """Spread (robust SD, mL) of the activity volume measured with a ball of ``radius_mm`` where
    there is no sphere: at the background ROI positions, 10 and 20 mm either side of the sphere
    plane (those that fit in the image).

    It is how far noise alone moves a sphere's measured volume in this image; NaN when fewer
    than 6 such balls fit in the image.
    """
    ring_c = np.asarray(geometry.ring_centre_mm)
    values = []
    for dz in (-20.0, -10.0, 10.0, 20.0):
        for bx, by in geometry.background_roi_xy_mm:
            p = pose.to_image((bx, by, geometry.sphere_plane_z_mm + dz), ring_c)
            v, _ = activity_volume_ml(volume, frame, p, radius_mm=radius_mm, contrast=contrast, core_mm=radius_mm)
            if math.isfinite(v):
                values.append(v)
    if len(values) < 6:
        return math.nan
    values = np.asarray(values)
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


SIGNIFICANCE = 4.0
"""A measured volume contradicts a sphere's name only when it differs from the expected volume
by more than this many noise SDs (:func:`_noise_ml`) as well as being nearer another size.
Four, not three: the SD is itself estimated from a few dozen correlated balls, and at 3 SD a
sweep of noisy 4:1 phantoms raised false alarms on the 10 and 13 mm spheres; a wrong naming
moves the large spheres by tens of SDs, so nothing is lost."""


def check_identity(volume: np.ndarray, frame: Frame, geometry: NemaIecBodyPhantom, centres: Mapping[float, np.ndarray],
                   pose: RingPose, *, sphere: float, background: float, max_rms_mm: float,
                   naming_margin: float = math.nan) -> IdentityCheck:
    """Check the sphere names against the image (step 5 of :mod:`phantoms.localise`).

    Each named sphere's activity volume is measured in a ball of its own radius plus
    :data:`CHECK_MARGIN_MM` (small balls keep the noise of small spheres low), and compared with
    its nominal volume; the noise of that measurement is read off the same image
    (:func:`_noise_ml`), so a noisy small sphere is not taken for a wrong name.

    Parameters
    ----------
    centres : dict
        ``{diameter_mm: (x, y, z)}`` of every sphere as placed by the ring fit, mm.
    pose : RingPose
        The ring fit (its RMS is checked against ``max_rms_mm``).
    naming_margin : float
        From :func:`localise_spheres`; NaN when the centres were given by hand (not checked).
    """
    lung = _lung_axis(pose.translation, pose.rotation[:, 2], geometry)
    ds = sorted(geometry.sphere_diameters_mm)
    contrast = sphere / background
    measured, noise = {}, {}
    for d in ds:
        radius = 0.5 * d + CHECK_MARGIN_MM
        measured[d] = activity_volume_ml(volume, frame, centres[d], radius_mm=radius, contrast=contrast,
                                         core_mm=0.5 * d, exclude_axis=lung)[0]
        # PET noise variance grows with activity: the hot sphere adds its share to the ball's
        # variance beyond what the background balls show
        inflate = math.sqrt(1.0 + (contrast - 1.0) * sphere_volume_ml(d) / sphere_volume_ml(2.0 * radius))
        noise[d] = inflate * _noise_ml(volume, frame, geometry, pose, radius_mm=radius, contrast=contrast)
    nominal = {d: expected_activity_volume_ml(d, wall_mm=geometry.sphere_wall_mm, contrast=contrast) for d in ds}

    def significant(diff: float, sd: float, expected: float) -> bool:
        if math.isfinite(sd):
            return abs(diff) > SIGNIFICANCE * sd
        # no room in the image to measure the noise: only a gross difference counts
        return abs(diff) > 0.5 * expected

    reasons = []
    for d in ds:
        v = measured[d]
        if not math.isfinite(v):
            reasons.append(f"the {d:g} mm sphere's activity volume cannot be measured (the sphere is cut by the "
                           "edge of the image, or the background is not positive)")
            continue
        nearest = min(ds, key=lambda n: abs(math.log(max(v, 0.05)) - math.log(nominal[n])))
        if nearest != d and significant(v - nominal[d], noise[d], nominal[d]):
            reasons.append(f"the sphere named {d:g} mm holds {v:.2f} mL of activity (a {_equivalent_diameter_mm(v):.1f}"
                           f" mm sphere; noise SD {noise[d]:.2f} mL): nearer the {nearest:g} mm sphere "
                           f"({nominal[nearest]:.2f} mL) than its own {nominal[d]:.2f} mL")
    inversions = [(a, b) for a, b in zip(ds, ds[1:])
                  if math.isfinite(measured[a]) and math.isfinite(measured[b]) and measured[a] >= measured[b]
                  and significant(measured[a] - measured[b], math.hypot(noise[a], noise[b]), nominal[a])]
    if inversions:
        reasons.append("measured sizes are out of order round the ring: " + "; ".join(
            f"{a:g} mm holds {measured[a]:.2f} mL >= {b:g} mm {measured[b]:.2f} mL" for a, b in inversions))
    if pose.rms_mm > max_rms_mm:
        reasons.append(f"the detected spheres sit {pose.rms_mm:.1f} mm RMS from the ring (limit {max_rms_mm:.1f} mm)")
    if math.isfinite(naming_margin) and naming_margin < MIN_LABEL_MARGIN:
        reasons.append(f"another naming of the ring explains the sizes almost as well (margin {naming_margin:.2f}, "
                       f"need {MIN_LABEL_MARGIN:.2f})")
    return IdentityCheck(uncertain=bool(reasons), reasons=tuple(reasons), measured_volume_ml=measured,
                         nominal_volume_ml=nominal,
                         measured_diameter_mm={d: _equivalent_diameter_mm(v) if math.isfinite(v) else math.nan
                                               for d, v in measured.items()},
                         noise_sd_ml=noise, order_inversions=len(inversions), naming_margin=naming_margin,
                         ring_rms_mm=pose.rms_mm, max_ring_rms_mm=max_rms_mm)
