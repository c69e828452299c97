"""The digital patient: an SUV map and a CT map of a trunk with lesions, with known truth.

Pure numpy; no files, no DICOM. Arrays indexed ``(plane, row, col)`` on a
:class:`corelab.grid.Grid`; partial volume as :mod:`synth.shapes` computes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from corelab.grid import Grid
from phantoms.geometry import sphere_volume_ml
from synth.shapes import (SDF, _box_slices, _extrude, _Pose, _sdf_cylinder, _sdf_ellipse_approx, _sdf_ellipsoid,
                          _sdf_sphere, _volume_fraction)

__all__ = ["BLOOD_POOL_SUV", "LIVER_DOME_Z_MM", "LIVER_SUV", "PATIENT_LABELS", "Lesion", "PatientMaps",
           "patient_maps"]

#: SUVbw of the healthy liver and of the blood pool (descending aorta) of the digital trunk:
#: typical FDG values at 60 min (liver 1.3-3.0 per EANM 2.0; blood pool somewhat below liver).
LIVER_SUV = 2.2
BLOOD_POOL_SUV = 1.7

# The liver ellipsoid, relative to the grid centre (x, y, z) in mm; patient right is -x in LPS.
_LIVER_CENTRE_MM = (-65.0, 0.0, -45.0)
_LIVER_SEMI_AXES_MM = (85.0, 75.0, 60.0)
#: Height of the liver dome above the grid centre, mm (patient z).
LIVER_DOME_Z_MM = _LIVER_CENTRE_MM[2] + _LIVER_SEMI_AXES_MM[2]


# --------------------------------------------------------------------------------------------
# Patient-like trunk
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lesion:
    """A spherical lesion.

    Attributes
    ----------
    centre_mm : tuple of float
        Patient LPS ``(x, y, z)``, mm.
    diameter_mm : float
    suv : float
        Uniform SUVbw inside the lesion (not blurred).
    hu : float
        CT number inside the lesion, HU (soft tissue by default).
    """

    centre_mm: tuple[float, float, float]
    diameter_mm: float
    suv: float
    hu: float = 40.0

    @property
    def volume_ml(self) -> float:
        return sphere_volume_ml(self.diameter_mm)


PATIENT_LABELS: dict[str, int] = {
    "air": 0,
    "soft_tissue": 1,
    "lung": 2,
    "liver": 3,
    "kidney": 4,
    "spine": 5,
    "lesion": 6,
    "blood_pool": 7,  # appended: earlier values keep their meaning
}
"""Label values of :attr:`PatientMaps.labels`."""


@dataclass(frozen=True)
class PatientMaps:
    """SUV and CT maps of a simple trunk, with lesion truth.

    Attributes
    ----------
    suv : ndarray of float32
        SUVbw per voxel (partial-volume mean, not blurred).
    hu : ndarray of int16
        CT number per voxel, HU (partial-volume mean, rounded).
    labels : ndarray of uint8
        Majority tissue per voxel, values in :data:`PATIENT_LABELS`.
    lesions : tuple of Lesion
        The lesions painted, in patient coordinates.
    grid : Grid
    """

    suv: np.ndarray
    hu: np.ndarray
    labels: np.ndarray
    lesions: tuple[Lesion, ...]
    grid: Grid


# The descending aorta: left of and in front of the spine, 25 mm across, clear of the lungs,
# kidneys and liver (x, y of its axis relative to the grid centre, mm).
_AORTA_AXIS_XY = (25.0, 42.0)
_AORTA_RADIUS_MM = 12.5


# (label name, signed distance relative to the grid centre, SUV, HU, in-plane half-width of the
# structure's box in mm or None for the whole grid); painted in this order so that later
# structures replace earlier ones (the liver dome pushes into the right lung base).
def _trunk_structures() -> list[tuple[str, SDF, float, float, tuple[float, float, float] | None]]:
    body = _extrude(_sdf_ellipse_approx(170.0, 110.0, (0.0, 0.0)), 1e6)
    return [
        ("soft_tissue", body, 1.0, 40.0, None),
        ("lung", _sdf_ellipsoid((55.0, 70.0, 110.0), (85.0, -5.0, 70.0)), 0.4, -800.0, None),
        ("lung", _sdf_ellipsoid((55.0, 70.0, 110.0), (-85.0, -5.0, 70.0)), 0.4, -800.0, None),
        ("liver", _sdf_ellipsoid(_LIVER_SEMI_AXES_MM, _LIVER_CENTRE_MM), LIVER_SUV, 60.0, None),
        ("kidney", _sdf_ellipsoid((28.0, 28.0, 50.0), (75.0, 55.0, -90.0)), 3.0, 35.0, None),
        ("kidney", _sdf_ellipsoid((28.0, 28.0, 50.0), (-75.0, 55.0, -95.0)), 3.0, 35.0, None),
        ("spine", _sdf_cylinder(16.0, 2e6, (0.0, 80.0)), 1.5, 700.0, None),
        # Unenhanced blood reads as soft tissue on CT. Painted over a small box only: it is a
        # thin cylinder, and evaluating it on the whole grid would cost as much as the body.
        ("blood_pool", _sdf_cylinder(_AORTA_RADIUS_MM, 2e6, _AORTA_AXIS_XY), BLOOD_POOL_SUV, 40.0,
         (*_AORTA_AXIS_XY, _AORTA_RADIUS_MM)),
    ]


def _column_box(grid: Grid, centre_mm: np.ndarray, x: float, y: float, radius_mm: float
                ) -> tuple[slice, slice, slice]:
    """Index slices of all planes and the rows/cols that may touch a z-cylinder (grid-centre frame)."""
    _, rows, cols = _box_slices(grid, centre_mm + np.array([x, y, 0.0]), radius_mm)
    return (slice(0, grid.shape[0]), rows, cols)


def _default_lesions(grid: Grid, rng: np.random.Generator) -> list[Lesion]:
    """Three lesions at random positions: liver, right lung, left lung (grid-centre frame)."""
    c = np.asarray(grid.centre_mm)
    sites = [((-65.0, 0.0, -45.0), (40.0, 35.0, 25.0)), ((-85.0, -5.0, 70.0), (20.0, 30.0, 40.0)),
             ((85.0, -5.0, 70.0), (20.0, 30.0, 40.0))]
    out = []
    for centre, spread in sites:
        pos = c + np.asarray(centre) + rng.uniform(-1.0, 1.0, 3) * np.asarray(spread)
        out.append(
            Lesion(
                centre_mm=tuple(float(v) for v in pos),
                diameter_mm=float(rng.choice([10.0, 15.0, 20.0, 30.0])),
                suv=float(np.round(rng.uniform(4.0, 12.0), 2)),
            )
        )
    return out


def patient_maps(
    grid: Grid,
    *,
    rng: np.random.Generator,
    lesions: list[Lesion] | None = None,
    supersample: int = 2,
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> PatientMaps:
    """SUV and CT maps of a simple, physically sensible trunk centred on the grid centre.

    Body: elliptic cylinder 340 x 220 mm (soft tissue, SUV 1.0, 40 HU) in air (SUV 0,
    -1000 HU); two lungs (SUV 0.4, -800 HU); liver on the patient's right (SUV 2.2, 60 HU);
    two kidneys (SUV 3.0, 35 HU); a spine cylinder posterior (SUV 1.5, 700 HU); the descending
    aorta, 25 mm across, left-anterior of the spine (blood pool, SUV 1.7, 40 HU); then the
    lesions (uniform SUV, soft-tissue HU). Organs are centred on the grid centre in ``x, y``; the
    lungs lie above (``+z``) and the liver below the centre. The liver's right lobe holds a 3 cm
    reference sphere with a wide margin. There is no brain or bladder: the trial PET grids (at
    most 48 planes of 4 mm, 192 mm, about the grid centre) reach neither.

    Parameters
    ----------
    grid : Grid
    rng : numpy.random.Generator
        Draws the default lesions (used only when ``lesions`` is None).
    lesions : list of Lesion, optional
        Lesions in patient coordinates. Default: three random lesions (liver and both lungs).
    supersample : int
        Sub-samples per axis in voxels cut by an organ surface.
    shift_mm : (3,) float
        Moves the whole patient, lesions included, by this vector (patient ``x, y, z``, mm): the
        patient lying elsewhere on the table, e.g. moved between the CT and the PET.

    Returns
    -------
    PatientMaps
    """
    shift = np.asarray(shift_mm, dtype=float)
    centre = np.asarray(grid.centre_mm) + shift
    pose = _Pose(np.eye(3), centre)
    suv = np.zeros(grid.shape)
    hu = np.full(grid.shape, -1000.0)
    labels = np.zeros(grid.shape, dtype=np.uint8)

    def paint(region, frac, label, s_val, h_val):
        suv[region] += frac * (s_val - suv[region])
        hu[region] += frac * (h_val - hu[region])
        # a later structure owns the voxel if it covers at least half of it
        lab = labels[region]
        lab[frac >= 0.5] = PATIENT_LABELS[label]

    for name, sdf, s_val, h_val, column in _trunk_structures():
        box = None if column is None else _column_box(grid, centre, *column)
        region, frac = _volume_fraction(grid, sdf, pose=pose, supersample=supersample, region=box)
        paint(region, frac, name, s_val, h_val)
    lesion_list = list(lesions) if lesions is not None else _default_lesions(grid, rng)
    if np.any(shift):
        lesion_list = [dataclasses.replace(les, centre_mm=tuple(float(v) for v in np.add(les.centre_mm, shift)))
                       for les in lesion_list]
    for les in lesion_list:
        c = np.asarray(les.centre_mm, dtype=float)
        region = _box_slices(grid, c, 0.5 * les.diameter_mm + max(grid.voxel_mm))
        if any(s.stop <= s.start for s in region):
            continue
        region, frac = _volume_fraction(
            grid,
            _sdf_sphere(0.5 * les.diameter_mm, c),
            supersample=max(supersample, 4),
            region=region,
            curvature_per_mm=4.0 / les.diameter_mm,
        )
        paint(region, frac, "lesion", les.suv, les.hu)
    return PatientMaps(
        suv=suv.astype(np.float32),
        hu=np.clip(np.rint(hu), -1024, 3071).astype(np.int16),
        labels=labels,
        lesions=tuple(lesion_list),
        grid=grid,
    )
