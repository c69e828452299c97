"""The digital patient: an SUV map and a CT map of a trunk with lesions, with known truth.

Pure numpy; no files, no DICOM. Arrays indexed ``(plane, row, col)`` on a
:class:`corelab.grid.Grid`; partial volume as :mod:`synth.shapes` computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from corelab.grid import Grid
from phantoms.geometry import sphere_volume_ml
from synth.shapes import (SDF, _box_slices, _extrude, _Pose, _sdf_cylinder, _sdf_ellipse_approx, _sdf_ellipsoid,
                          _sdf_sphere, _volume_fraction)

__all__ = ["Lesion", "PatientMaps", "PATIENT_LABELS", "patient_maps"]


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


# (label name, signed distance relative to the grid centre, SUV, HU); painted in this order so
# that later structures replace earlier ones (the liver dome pushes into the right lung base).
def _trunk_structures() -> list[tuple[str, SDF, float, float]]:
    body = _extrude(_sdf_ellipse_approx(170.0, 110.0, (0.0, 0.0)), 1e6)
    return [
        ("soft_tissue", body, 1.0, 40.0),
        ("lung", _sdf_ellipsoid((55.0, 70.0, 110.0), (85.0, -5.0, 70.0)), 0.4, -800.0),
        ("lung", _sdf_ellipsoid((55.0, 70.0, 110.0), (-85.0, -5.0, 70.0)), 0.4, -800.0),
        # patient right is -x in LPS
        ("liver", _sdf_ellipsoid((85.0, 75.0, 60.0), (-65.0, 0.0, -45.0)), 2.2, 60.0),
        ("kidney", _sdf_ellipsoid((28.0, 28.0, 50.0), (75.0, 55.0, -90.0)), 3.0, 35.0),
        ("kidney", _sdf_ellipsoid((28.0, 28.0, 50.0), (-75.0, 55.0, -95.0)), 3.0, 35.0),
        ("spine", _sdf_cylinder(16.0, 2e6, (0.0, 80.0)), 1.5, 700.0),
    ]


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
) -> PatientMaps:
    """SUV and CT maps of a simple, physically sensible trunk centred on the grid centre.

    Body: elliptic cylinder 340 x 220 mm (soft tissue, SUV 1.0, 40 HU) in air (SUV 0,
    -1000 HU); two lungs (SUV 0.4, -800 HU); liver on the patient's right (SUV 2.2, 60 HU);
    two kidneys (SUV 3.0, 35 HU); a spine cylinder posterior (SUV 1.5, 700 HU); then the lesions
    (uniform SUV, soft-tissue HU). Organs are centred on the grid centre in ``x, y``; the lungs
    lie above (``+z``) and the liver below the centre.

    Parameters
    ----------
    grid : Grid
    rng : numpy.random.Generator
        Draws the default lesions (used only when ``lesions`` is None).
    lesions : list of Lesion, optional
        Lesions in patient coordinates. Default: three random lesions (liver and both lungs).
    supersample : int
        Sub-samples per axis in voxels cut by an organ surface.

    Returns
    -------
    PatientMaps
    """
    pose = _Pose(np.eye(3), np.asarray(grid.centre_mm))
    suv = np.zeros(grid.shape)
    hu = np.full(grid.shape, -1000.0)
    labels = np.zeros(grid.shape, dtype=np.uint8)

    def paint(region, frac, label, s_val, h_val):
        suv[region] += frac * (s_val - suv[region])
        hu[region] += frac * (h_val - hu[region])
        # a later structure owns the voxel if it covers at least half of it
        lab = labels[region]
        lab[frac >= 0.5] = PATIENT_LABELS[label]

    for name, sdf, s_val, h_val in _trunk_structures():
        region, frac = _volume_fraction(grid, sdf, pose=pose, supersample=supersample)
        paint(region, frac, name, s_val, h_val)
    lesion_list = list(lesions) if lesions is not None else _default_lesions(grid, rng)
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
