"""Where the IEC spheres are, and which is which: the ring found from the image, each sphere
named by the activity it holds, and a check of that naming against the image.

The template alone cannot name the spheres: the ring is a regular hexagon, so a ring turned by
60 degrees fits the same points, and a phantom turned over (or an image flipped) runs the sizes
round the ring the other way. Uptake cannot name them either: with resolution recovery (PSF)
small spheres read hotter than large ones. What does not depend on the reconstruction is how much
activity each sphere holds above the background: blur and edge overshoot move activity about but
keep it, so the integral of ``image - background`` over a ball wide enough to hold the spill-out,
divided by the sphere-to-background excess, is the sphere's volume. Sizes come from that.

Steps (:func:`localise_spheres`):

1. hot components above the half-way threshold are candidate sphere centres;
2. the unlabelled hexagon of the sphere ring (radius 57.27 mm, 60 degrees apart) is fitted to
   every trio of candidates; the fit that explains most candidates, then the smallest RMS, wins;
3. the activity volume (mL) is measured at each of the six ring positions;
4. the 12 ways to name the positions (6 turns x 2 directions) are scored by the squared log
   ratio of measured to expected volume (nominal, less the background the cold glass wall
   displaces); the best names the spheres;
5. :func:`check_identity` compares the result with the image: each sphere's measured volume is
   nearer its own expected volume than any other (beyond :data:`SIGNIFICANCE` noise SDs
   measured in the image); sizes grow round the ring; the ring fits; the naming wins by a clear
   margin. Any failure makes the localisation uncertain.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from phantoms.geometry import NemaIecBodyPhantom, sphere_volume_ml
from phantoms.voxels import Frame

__all__ = ["PhantomLocalisationError", "IdentityCheck", "RingPose", "SphereLocalisation",
           "HOW_TO_GIVE_CENTRES", "hot_components", "kabsch", "activity_volume_ml", "localise_spheres",
           "fit_ring", "check_identity"]

HOW_TO_GIVE_CENTRES = ("If the phantom is in the image but cannot be localised, give the sphere centres by hand "
                       "(centres_mm; command line: --centres FILE, YAML/JSON {diameter_mm: [x, y, z]} in "
                       "patient mm).")

SEARCH_VOXEL_MM = 4.0
"""Voxel size (about) of the reduced copy the hot-sphere search runs on, mm."""

MAX_CANDIDATES = 12
"""Hot components considered when fitting the sphere ring (largest first)."""

SPILL_MARGIN_MM = 8.0
"""Margin beyond the largest sphere of the ball the activity volume is integrated over, mm: it
holds the spill-out of a PSF of up to about 10 mm FWHM (2 sigma at 8 mm FWHM)."""

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


class PhantomLocalisationError(RuntimeError):
    """The phantom or one of its parts was not found in the image; the message says which."""


# --------------------------------------------------------------------------------------------
# Candidates and rigid fits
# --------------------------------------------------------------------------------------------
def kabsch(template: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Proper rotation R and translation t minimising ``|R @ template + t - found|``.

    Coplanar templates (the sphere ring) are fine: a mirrored ring is the ring turned over,
    which is a proper rotation, so phantoms scanned either way round fit alike.
    """
    ct, cf = template.mean(axis=0), found.mean(axis=0)
    h = (template - ct).T @ (found - cf)
    u, _, vt = np.linalg.svd(h)
    sign = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, sign]) @ u.T
    t = cf - r @ ct
    rms = float(np.sqrt(np.mean(np.sum((template @ r.T + t - found) ** 2, axis=1))))
    return r, t, rms


def hot_components(volume: np.ndarray, frame: Frame, threshold: float, geometry: NemaIecBodyPhantom
                   ) -> list[tuple[float, np.ndarray]]:
    """Hot connected components that could be spheres: ``[(volume_ml, centre_xyz), ...]``.

    The search runs on a copy reduced to voxels of about 4 mm (block means; this and a light
    Gaussian smoothing keep noise from splitting a sphere into pieces), so it costs little even
    at 2 mm voxels. Components from a quarter of the smallest sphere to three times the largest
    are kept, largest first; each centre is then refined at full resolution (centroid of
    ``value - threshold`` over the voxels above ``threshold`` near the component).
    """
    f = np.maximum(1, np.floor(SEARCH_VOXEL_MM / frame.spacing[::-1] + 1e-6)).astype(int)  # (k, j, i)
    n = np.array(volume.shape) // f
    if np.any(n < 2):
        f, n = np.ones(3, dtype=int), np.array(volume.shape)
    coarse = volume[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]]
    for axis, k in enumerate(f):  # block means, one axis at a time (strided sums: fast)
        if k > 1:
            parts = [coarse[(slice(None),) * axis + (slice(i, None, k),)] for i in range(k)]
            coarse = sum(parts[1:], parts[0]) / k
    coarse_spacing = frame.spacing[::-1] * f  # (k, j, i)
    smooth = ndimage.gaussian_filter(coarse, np.maximum(0.0, 2.0 / coarse_spacing), truncate=3.0)
    labels, count = ndimage.label(smooth > threshold)
    if count == 0:
        return []
    voxel_ml = float(np.prod(coarse_spacing)) / 1000.0
    volumes_ml = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_ml
    largest_ml = max(geometry.sphere_volumes_ml.values())
    smallest_ml = min(geometry.sphere_volumes_ml.values())
    keep = [(float(v), lab) for lab, v in enumerate(volumes_ml, start=1)
            if 0.25 * smallest_ml <= v <= 3.0 * largest_ml]
    keep.sort(reverse=True)
    boxes = ndimage.find_objects(labels)
    out = []
    for v, lab in keep[:MAX_CANDIDATES]:
        box = boxes[lab - 1]
        # the component's box in full-resolution voxels, one coarse voxel wider each side
        region = tuple(slice(max((b.start - 1) * k, 0), min((b.stop + 1) * k, s))
                       for b, k, s in zip(box, f, volume.shape))
        w = np.clip(volume[region] - threshold, 0.0, None)
        # only the part connected to this component (not a neighbour reaching into the box)
        sub = labels[tuple(slice(r.start // k, -(-r.stop // k)) for r, k in zip(region, f))] == lab
        up = sub.repeat(f[0], 0).repeat(f[1], 1).repeat(f[2], 2)[: w.shape[0], : w.shape[1], : w.shape[2]]
        w = np.where(ndimage.binary_dilation(up, iterations=1), w, 0.0)
        total = w.sum()
        if total <= 0:
            continue
        idx = [np.arange(r.start, r.stop, dtype=float) for r in region]
        kji = np.array([(w.sum(axis=(1, 2)) * idx[0]).sum(), (w.sum(axis=(0, 2)) * idx[1]).sum(),
                        (w.sum(axis=(0, 1)) * idx[2]).sum()]) / total
        out.append((v, frame.to_mm(kji)))
    return out


def _hexagon(geometry: NemaIecBodyPhantom) -> np.ndarray:
    """The six ring positions relative to the ring centre, 60 degrees apart, unlabelled (6, 3)."""
    r = geometry.sphere_ring_radius_mm
    a = np.radians(np.arange(6) * 60.0)
    return np.stack([r * np.cos(a), r * np.sin(a), np.zeros(6)], axis=1)


def _fit_hexagon(points: Sequence[np.ndarray], geometry: NemaIecBodyPhantom, *, max_rms_mm: float,
                 accept_mm: float) -> tuple[np.ndarray, np.ndarray, float, dict[int, int]] | None:
    """Rigid fit of the unlabelled ring to the candidates.

    Returns ``(rotation, ring_centre, rms_mm, {position: candidate})`` or None when no three
    candidates sit on a ring of the IEC size.
    """
    hexagon = _hexagon(geometry)
    pts = [np.asarray(p, dtype=float) for p in points]
    best_key, best = None, None
    for trio in itertools.combinations(range(len(pts)), 3):
        found = np.array([pts[n] for n in trio])
        # position 0 for the first point fixes the hexagon's six-fold symmetry
        for a, b in itertools.permutations(range(1, 6), 2):
            r, t, rms = kabsch(hexagon[[0, a, b]], found)
            if rms > max_rms_mm:
                continue
            chosen = {0: trio[0], a: trio[1], b: trio[2]}
            for pos in range(6):
                if pos in chosen:
                    continue
                pred = r @ hexagon[pos] + t
                free = [(float(np.linalg.norm(p - pred)), n) for n, p in enumerate(pts) if n not in chosen.values()]
                if free and min(free)[0] <= accept_mm:
                    chosen[pos] = min(free)[1]
            ps = sorted(chosen)
            r_all, t_all, rms_all = kabsch(hexagon[ps], np.array([pts[chosen[p]] for p in ps]))
            key = (len(chosen), -round(rms_all, 3))
            if best_key is None or key > best_key:
                best_key, best = key, (r_all, t_all, rms_all, chosen)
    return best


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


def _naming_costs(volumes_ml: Sequence[float], cyclic: Sequence[float], expected: Mapping[float, float]
                  ) -> list[tuple[float, int, int]]:
    """``[(cost, turn, direction), ...]`` of the 12 namings, cheapest first.

    Position ``k`` is named ``cyclic[(turn + direction * k) % 6]``; the cost is the sum of
    squared natural-log ratios of measured to expected activity volume (a measured volume below 0.05 mL
    counts as 0.05 mL, so noise cannot make it minus infinity).
    """
    logs = [math.log(max(v, 0.05)) if math.isfinite(v) else math.nan for v in volumes_ml]
    out = []
    for turn in range(6):
        for direction in (1, -1):
            cost = sum((lv - math.log(expected[cyclic[(turn + direction * k) % 6]])) ** 2
                       for k, lv in enumerate(logs) if math.isfinite(lv))
            out.append((cost, turn, direction))
    return sorted(out)


# --------------------------------------------------------------------------------------------
# The result of localisation and its check
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RingPose:
    """Rigid pose of the phantom: ``image = rotation @ (phantom - ring_centre) + translation``."""

    rotation: np.ndarray
    translation: np.ndarray
    rms_mm: float
    detected: tuple[float, ...]

    def to_image(self, p_phantom: Sequence[float], ring_centre_ph: np.ndarray) -> np.ndarray:
        return self.rotation @ (np.asarray(p_phantom, dtype=float) - ring_centre_ph) + self.translation


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


@dataclass(frozen=True)
class SphereLocalisation:
    """Named sphere positions ``{diameter_mm: (x, y, z)}`` and the evidence for the names."""

    found: dict[float, np.ndarray]
    volumes_ml: dict[float, float]
    naming_margin: float


def _equivalent_diameter_mm(volume_ml: float) -> float:
    return (6.0 * volume_ml * 1000.0 / math.pi) ** (1.0 / 3.0) if volume_ml > 0 else 0.0


def _integration_radius_mm(geometry: NemaIecBodyPhantom) -> float:
    return 0.5 * max(geometry.sphere_diameters_mm) + SPILL_MARGIN_MM


def _lung_axis(centre: np.ndarray, normal: np.ndarray, geometry: NemaIecBodyPhantom):
    # the ring is centred on the lung insert: keep its cold wall out of the background shells
    return centre, normal, geometry.lung_outer_radius_mm + 4.0


def localise_spheres(volume: np.ndarray, frame: Frame, geometry: NemaIecBodyPhantom, *, sphere: float,
                     background: float, max_rms_mm: float, accept_mm: float) -> SphereLocalisation:
    """Find the sphere ring and name its spheres by the activity volume each holds.

    Raises
    ------
    PhantomLocalisationError
        Fewer than three hot objects on a ring of the IEC size.
    """
    threshold = background + 0.5 * (sphere - background)
    candidates = hot_components(volume, frame, threshold, geometry)
    fit = _fit_hexagon([c for _, c in candidates], geometry, max_rms_mm=max_rms_mm, accept_mm=accept_mm)
    if fit is None or len(fit[3]) < 3:
        n = 0 if fit is None else len(fit[3])
        sizes = ", ".join(f"{v:.1f} mL" for v, _ in candidates) or "none"
        raise PhantomLocalisationError(
            f"found {len(candidates)} hot sphere(s) ({sizes}), {n} of them on a ring of the IEC sphere ring's size "
            f"({geometry.sphere_ring_radius_mm} mm radius, 60 degrees apart, RMS <= {max_rms_mm:.1f} mm); "
            "need at least 3 to fit the sphere ring. Check the sphere and background concentrations given, "
            "and that the sphere plane is in the image. " + HOW_TO_GIVE_CENTRES)
    rotation, centre, _, chosen = fit
    hexagon = _hexagon(geometry)
    positions = [rotation @ hexagon[k] + centre for k in range(6)]
    radius = _integration_radius_mm(geometry)
    lung = _lung_axis(centre, rotation[:, 2], geometry)
    core = 0.5 * min(geometry.sphere_diameters_mm)
    vols = [activity_volume_ml(volume, frame, p, radius_mm=radius, contrast=sphere / background, core_mm=core,
                               exclude_axis=lung)[0] for p in positions]
    cyclic = [d for _, d in sorted(zip(geometry.sphere_angles_deg, geometry.sphere_diameters_mm))]
    expected = {d: expected_activity_volume_ml(d, wall_mm=geometry.sphere_wall_mm, contrast=sphere / background)
                for d in cyclic}
    costs = _naming_costs(vols, cyclic, expected)
    _, turn, direction = costs[0]
    names = {k: cyclic[(turn + direction * k) % 6] for k in range(6)}
    # a detected sphere keeps its own measured centre; the others sit where the ring puts them
    pts = [c for _, c in candidates]
    found = {names[k]: pts[chosen[k]] for k in chosen}
    return SphereLocalisation(found=found, volumes_ml={names[k]: vols[k] for k in range(6)},
                              naming_margin=costs[1][0] - costs[0][0])


def fit_ring(found: Mapping[float, np.ndarray], geometry: NemaIecBodyPhantom, *, max_rms_mm: float, given: bool
             ) -> RingPose:
    """Rigid fit of the named ring template to named sphere centres (at least three).

    ``given``: the centres were given by hand (the errors then do not suggest giving them).
    """
    ring_c = np.asarray(geometry.ring_centre_mm)
    template_all = geometry.sphere_centres_mm()
    unknown = [d for d in sorted(found) if not any(abs(d - g) < 0.5 for g in geometry.sphere_diameters_mm)]
    if unknown:
        raise PhantomLocalisationError(
            f"sphere diameter(s) {unknown} mm are not IEC sphere diameters {list(geometry.sphere_diameters_mm)}")
    found = {min(geometry.sphere_diameters_mm, key=lambda g: abs(g - d)): v for d, v in found.items()}
    ds = sorted(found)
    if len(ds) < 3:  # only given centres can be this few: localise_spheres refuses fewer than 3 itself
        raise PhantomLocalisationError(f"{'centres_mm gives' if given else 'found'} {len(ds)} sphere(s); "
                                       "need at least 3")
    template = np.array([np.asarray(template_all[d]) - ring_c for d in ds])
    pts = np.array([np.asarray(found[d], dtype=float) for d in ds])
    r, t, rms = kabsch(template, pts)
    if rms > max_rms_mm:
        raise PhantomLocalisationError(
            f"the sphere centres ({', '.join(f'{d:g} mm' for d in ds)}) do not fit the IEC sphere "
            f"ring: RMS {rms:.1f} mm > {max_rms_mm:.1f} mm. A hot object other than the spheres, "
            "or spheres missing from the field of view, may be present. "
            + ("" if given else HOW_TO_GIVE_CENTRES))
    return RingPose(r, t, rms, tuple(ds))


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
    """Check the sphere names against the image (see the module docstring, step 5).

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
