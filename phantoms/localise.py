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
5. :func:`~phantoms.identity.check_identity` compares the result with the image: each sphere's measured volume is
   nearer its own expected volume than any other (beyond :data:`~phantoms.identity.SIGNIFICANCE` noise SDs
   measured in the image); sizes grow round the ring; the ring fits; the naming wins by a clear
   margin. Any failure makes the localisation uncertain.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phantoms.geometry import NemaIecBodyPhantom
from phantoms.identity import _lung_axis, activity_volume_ml, expected_activity_volume_ml
from phantoms.voxels import Frame, RingPose

__all__ = ["PhantomLocalisationError", "SphereLocalisation", "HOW_TO_GIVE_CENTRES", "hot_components", "kabsch",
           "localise_spheres", "fit_ring"]


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
# Naming and the ring pose
# --------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class SphereLocalisation:
    """Named sphere positions ``{diameter_mm: (x, y, z)}`` and the evidence for the names."""

    found: dict[float, np.ndarray]
    volumes_ml: dict[float, float]
    naming_margin: float


def _integration_radius_mm(geometry: NemaIecBodyPhantom) -> float:
    return 0.5 * max(geometry.sphere_diameters_mm) + SPILL_MARGIN_MM


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
