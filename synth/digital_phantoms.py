"""Digital phantoms with known truth: the NEMA IEC body phantom and a uniform cylinder.

Voxelised activity maps (pure numpy; no files, no DICOM), arrays indexed ``(plane, row, col)`` on
a :class:`corelab.grid.Grid`; partial volume as :mod:`synth.shapes` computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from corelab.grid import Grid
from phantoms.geometry import NEMA_IEC_BODY, NemaIecBodyPhantom
from synth.shapes import (_box_slices, _extrude, _full_fraction, _orientation, _Pose, _sdf_cylinder,
                          _sdf_iec_section, _sdf_sphere, _volume_fraction)

__all__ = ["NemaIecTruth", "nema_iec_phantom", "uniform_cylinder"]


# --------------------------------------------------------------------------------------------
# NEMA IEC body phantom
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NemaIecTruth:
    """A digital IEC body phantom and its ground truth.

    Attributes
    ----------
    activity_kbq_ml : ndarray of float32, shape (planes, rows, cols)
        Mean activity concentration over each voxel, kBq/mL; not blurred.
    sphere_centres_mm : dict
        ``{diameter_mm: (x, y, z)}``, patient LPS mm.
    sphere_kbq_ml, background_kbq_ml, lung_kbq_ml : float
        Fill concentrations, kBq/mL.
    lung_axis_point_mm : tuple of float
        Where the lung-insert axis crosses the sphere plane (the sphere-ring centre), patient mm.
    lung_axis_direction : tuple of float
        Unit vector of the lung-insert axis (towards the phantom's lid end).
    body_centre_mm : tuple of float
        The body centre (see :mod:`phantoms.geometry`), patient mm.
    rotation_deg, tilt_deg : float
        Roll about the phantom axis, then tilt about patient ``x``, degrees.
    shift_mm : tuple of float
        Shift of the sphere-ring centre from the grid centre, ``(x, y, z)`` mm.
    grid : Grid
    geometry : NemaIecBodyPhantom
    yaw_deg : float
        Rotation about patient ``y`` after the tilt, degrees.
    mirrored, axial_flip : bool
        Whether patient ``x`` (left-right) and patient ``z`` (axial direction) were reflected
        about the ring centre after the rotations.
    sphere_wall_mm : float
        Thickness of the cold wall outside each sphere's inner diameter, mm (0: no wall).
    orientation : ndarray, shape (3, 3)
        The orthogonal matrix taking phantom-frame directions to patient directions
        (determinant -1 when exactly one reflection is applied).
    """

    activity_kbq_ml: np.ndarray
    sphere_centres_mm: dict[float, tuple[float, float, float]]
    sphere_kbq_ml: float
    background_kbq_ml: float
    lung_kbq_ml: float
    lung_axis_point_mm: tuple[float, float, float]
    lung_axis_direction: tuple[float, float, float]
    body_centre_mm: tuple[float, float, float]
    rotation_deg: float
    tilt_deg: float
    shift_mm: tuple[float, float, float]
    grid: Grid
    geometry: NemaIecBodyPhantom
    yaw_deg: float = 0.0
    mirrored: bool = False
    axial_flip: bool = False
    sphere_wall_mm: float = 0.0
    orientation: np.ndarray = field(default_factory=lambda: np.eye(3), repr=False)


def _add_sphere(
    act: np.ndarray,
    grid: Grid,
    pose: _Pose,
    centre_ph: Sequence[float],
    diameter_mm: float,
    *,
    inside_kbq_ml: float,
    outside_kbq_ml: float,
    wall_mm: float,
    supersample: int,
) -> None:
    """Paint one sphere into ``act`` (in place): fill inside the inner diameter, a cold wall
    ``wall_mm`` thick around it, replacing the ``outside_kbq_ml`` already painted there."""
    if wall_mm > 0:
        layers = [(0.5 * diameter_mm + wall_mm, -outside_kbq_ml), (0.5 * diameter_mm, inside_kbq_ml)]
    else:
        layers = [(0.5 * diameter_mm, inside_kbq_ml - outside_kbq_ml)]
    for radius, conc in layers:
        region = _box_slices(grid, np.asarray(pose.to_patient(centre_ph)), radius + max(grid.voxel_mm))
        if conc == 0.0 or any(s.stop <= s.start for s in region):
            continue  # nothing to paint, or the sphere lies outside the grid
        region, frac = _volume_fraction(
            grid,
            _sdf_sphere(radius, centre_ph),
            pose=pose,
            supersample=supersample,
            region=region,
            curvature_per_mm=2.0 / radius,
        )
        act[region] += conc * frac


def nema_iec_phantom(
    grid: Grid,
    *,
    sphere_kbq_ml: float = 20.0,
    background_kbq_ml: float = 2.0,
    lung_kbq_ml: float = 0.0,
    shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
    rotation_deg: float = 0.0,
    tilt_deg: float = 0.0,
    yaw_deg: float = 0.0,
    mirrored: bool = False,
    axial_flip: bool = False,
    sphere_wall_mm: float = 0.0,
    supersample: int = 4,
    geometry: NemaIecBodyPhantom = NEMA_IEC_BODY,
) -> NemaIecTruth:
    """Voxelise a filled NEMA IEC body phantom lying head-first supine on the couch.

    With no rotation or reflection the phantom axis runs along patient ``z`` (lid end towards
    ``+z``), its flat base is posterior, and the lung insert and sphere ring are anterior
    (negative ``y`` in LPS). With no shift, the sphere-ring centre (lung axis on the sphere
    plane) is at the grid centre.

    Parameters
    ----------
    grid : Grid
        Output voxel grid.
    sphere_kbq_ml, background_kbq_ml, lung_kbq_ml : float
        Activity concentrations of the six spheres, the body and the lung insert, kBq/mL.
    shift_mm : (3,) float
        Patient ``(x, y, z)`` shift of the sphere-ring centre from the grid centre, mm.
    rotation_deg : float
        Roll of the phantom about its own (lung-insert) axis, from ``+x`` towards ``+y``, deg;
        any value (the full circle).
    tilt_deg : float
        Tilt about patient ``x`` through the sphere-ring centre, applied after the roll, deg.
    yaw_deg : float
        Rotation about patient ``y`` through the sphere-ring centre, after the tilt, deg.
    mirrored : bool
        Reflect patient ``x`` about the ring centre (the image flipped left-right): the sphere
        order round the ring is reversed. A reflection, not a rotation.
    axial_flip : bool
        Reflect patient ``z`` about the sphere plane (the image flipped head-feet): the lid end
        points to ``-z`` and the body's mid-plane lies below the sphere plane. Together with
        ``mirrored`` this is the phantom turned end over end on its base (as when the phantom
        is scanned the other way round): a proper rotation.
    sphere_wall_mm : float
        Cold (glass) wall outside each sphere's inner diameter, mm; the inner diameter stays the
        nominal one. Real spheres have about 1 mm. Default 0: no wall.
    supersample : int
        Sub-samples per axis in voxels cut by a surface.
    geometry : NemaIecBodyPhantom
        Phantom dimensions.

    Returns
    -------
    NemaIecTruth

    Notes
    -----
    The lung-insert wall (between the inner and outer radius) and the rest of the phantom shell
    hold no activity. Sphere walls are cold only when ``sphere_wall_mm > 0``; without them the
    sphere interior meets the background directly, so analytic recovery curves apply
    unchanged. The spheres' filling stems are not modelled.
    """
    ph = geometry
    if sphere_wall_mm < 0:
        raise ValueError(f"sphere_wall_mm must be >= 0, got {sphere_wall_mm}")
    rot = _orientation(rotation_deg, tilt_deg, yaw_deg, mirrored=mirrored, axial_flip=axial_flip)
    ring_c = np.asarray(ph.ring_centre_mm)
    t = np.asarray(grid.centre_mm) + np.asarray(shift_mm, dtype=float) - rot @ ring_c
    pose = _Pose(rot, t)

    body = _extrude(_sdf_iec_section(ph), 0.5 * ph.interior_length_mm)
    act = background_kbq_ml * _full_fraction(grid, body, pose=pose, supersample=supersample)
    # the lung-insert wall (inner to outer radius) is cold: remove background out to the outer
    # radius, then fill the inner radius with the lung concentration
    lung_layers = ((ph.lung_outer_radius_mm, -background_kbq_ml), (ph.lung_inner_radius_mm, lung_kbq_ml))
    for radius, conc in lung_layers:
        if conc != 0.0:
            lung = _sdf_cylinder(radius, ph.interior_length_mm, ph.lung_axis_xy_mm)
            act += conc * _full_fraction(grid, lung, pose=pose, supersample=supersample, curvature_per_mm=1.0 / radius)
    centres = {}
    for d_mm, c_ph in ph.sphere_centres_mm().items():
        centres[d_mm] = pose.to_patient(c_ph)
        _add_sphere(act, grid, pose, c_ph, d_mm, inside_kbq_ml=sphere_kbq_ml, outside_kbq_ml=background_kbq_ml,
                    wall_mm=sphere_wall_mm, supersample=supersample)
    return NemaIecTruth(
        activity_kbq_ml=act.astype(np.float32),
        sphere_centres_mm=centres,
        sphere_kbq_ml=float(sphere_kbq_ml),
        background_kbq_ml=float(background_kbq_ml),
        lung_kbq_ml=float(lung_kbq_ml),
        lung_axis_point_mm=pose.to_patient(ring_c),
        lung_axis_direction=tuple(float(v) for v in rot[:, 2]),
        body_centre_mm=pose.to_patient((0.0, 0.0, 0.0)),
        rotation_deg=float(rotation_deg),
        tilt_deg=float(tilt_deg),
        shift_mm=tuple(float(v) for v in shift_mm),
        grid=grid,
        geometry=ph,
        yaw_deg=float(yaw_deg),
        mirrored=bool(mirrored),
        axial_flip=bool(axial_flip),
        sphere_wall_mm=float(sphere_wall_mm),
        orientation=rot,
    )


def uniform_cylinder(
    grid: Grid,
    *,
    concentration_kbq_ml: float,
    radius_mm: float = 100.0,
    length_mm: float = 200.0,
    shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
    supersample: int = 4,
) -> np.ndarray:
    """Voxelise a uniformly filled cylinder with its axis along patient ``z``.

    Parameters
    ----------
    grid : Grid
    concentration_kbq_ml : float
        Fill concentration, kBq/mL.
    radius_mm, length_mm : float
        Inner radius and inner length, mm.
    shift_mm : (3,) float
        Patient ``(x, y, z)`` of the cylinder centre relative to the grid centre, mm.
    supersample : int
        Sub-samples per axis in voxels cut by the surface.

    Returns
    -------
    ndarray of float32, shape ``grid.shape``
        Mean activity concentration per voxel, kBq/mL.
    """
    pose = _Pose(np.eye(3), np.asarray(grid.centre_mm) + np.asarray(shift_mm, dtype=float))
    cylinder = _sdf_cylinder(radius_mm, length_mm)
    frac = _full_fraction(grid, cylinder, pose=pose, supersample=supersample, curvature_per_mm=1.0 / radius_mm)
    return (concentration_kbq_ml * frac).astype(np.float32)
