"""Digital phantoms: voxelised activity (and CT) maps with known truth.

Pure numpy/scipy; no files, no DICOM. Arrays are indexed ``(plane, row, col)``.

Coordinates follow DICOM patient LPS with ``ImageOrientationPatient = [1,0,0, 0,1,0]``: column
index -> ``+x`` (patient left), row index -> ``+y`` (posterior), plane index -> ``+z``
(superior). Positions are given as ``(x, y, z)`` in mm; voxel sizes as
``(slice, row, col)`` spacing in mm, like the array axes.

Partial volume is exact up to the supersampling: every voxel holds the *mean* activity over its
cube. Voxels wholly inside or outside a shape are decided from an exact signed distance; only
voxels cut by a surface are supersampled (``supersample**3`` points), and each sub-sample counts
a linear ramp of the signed distance over one sub-voxel instead of a 0/1 step. The ramp is odd
about the surface, so it removes most of the aliasing of plain point counting without biasing the
volume (sphere volumes are exact to well below 1 % at ``supersample=4``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from phantoms.geometry import NEMA_IEC_BODY, NemaIecBodyPhantom, sphere_volume_ml

__all__ = [
    "Grid",
    "NemaIecTruth",
    "Lesion",
    "PatientMaps",
    "PATIENT_LABELS",
    "nema_iec_phantom",
    "uniform_cylinder",
    "patient_maps",
    "blur_fwhm",
    "psf_blur",
    "block_mean",
    "add_noise",
    "reconstruction_noise",
    "axial_window",
]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548

SDF = Callable[[np.ndarray], np.ndarray]
"""Signed distance (mm, negative inside) of points ``(..., 3)`` given as local ``(x, y, z)``."""


# --------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A voxel grid placed in patient space.

    Attributes
    ----------
    shape : tuple of int
        ``(planes, rows, cols)``, the array shape.
    voxel_mm : tuple of float
        ``(slice spacing, row spacing, col spacing)`` in mm.
    origin_mm : tuple of float
        Patient LPS ``(x, y, z)`` in mm of the centre of voxel ``[0, 0, 0]``. Plane ``k`` lies at
        ``z = origin_z + k * slice spacing``; row ``j`` at ``y = origin_y + j * row spacing``;
        column ``i`` at ``x = origin_x + i * col spacing``.
    """

    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def centred(
        cls,
        shape: Sequence[int],
        voxel_mm: Sequence[float],
        centre_mm: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> "Grid":
        """A grid whose geometric centre lies at ``centre_mm`` (patient ``(x, y, z)``, mm)."""
        nz, ny, nx = (int(n) for n in shape)
        dz, dy, dx = (float(v) for v in voxel_mm)
        cx, cy, cz = (float(c) for c in centre_mm)
        origin = (cx - 0.5 * (nx - 1) * dx, cy - 0.5 * (ny - 1) * dy, cz - 0.5 * (nz - 1) * dz)
        return cls((nz, ny, nx), (dz, dy, dx), origin)

    @property
    def centre_mm(self) -> tuple[float, float, float]:
        """Patient ``(x, y, z)`` of the geometric centre of the grid, mm."""
        nz, ny, nx = self.shape
        dz, dy, dx = self.voxel_mm
        ox, oy, oz = self.origin_mm
        return (ox + 0.5 * (nx - 1) * dx, oy + 0.5 * (ny - 1) * dy, oz + 0.5 * (nz - 1) * dz)

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along each array axis: ``(z, y, x)`` 1-D arrays in mm."""
        nz, ny, nx = self.shape
        dz, dy, dx = self.voxel_mm
        ox, oy, oz = self.origin_mm
        return (oz + dz * np.arange(nz), oy + dy * np.arange(ny), ox + dx * np.arange(nx))

    def index_to_mm(self, index: Sequence[float]) -> tuple[float, float, float]:
        """Patient ``(x, y, z)`` in mm of a (fractional) ``(plane, row, col)`` index."""
        k, j, i = (float(v) for v in index)
        dz, dy, dx = self.voxel_mm
        ox, oy, oz = self.origin_mm
        return (ox + i * dx, oy + j * dy, oz + k * dz)

    def mm_to_index(self, xyz_mm: Sequence[float]) -> tuple[float, float, float]:
        """Fractional ``(plane, row, col)`` index of a patient ``(x, y, z)`` position in mm."""
        x, y, z = (float(v) for v in xyz_mm)
        dz, dy, dx = self.voxel_mm
        ox, oy, oz = self.origin_mm
        return ((z - oz) / dz, (y - oy) / dy, (x - ox) / dx)


# --------------------------------------------------------------------------------------------
# Signed distances (exact, in a local frame)
# --------------------------------------------------------------------------------------------
def _sdf_sphere(radius_mm: float, centre: Sequence[float] = (0.0, 0.0, 0.0)) -> SDF:
    c = np.asarray(centre, dtype=float)

    def f(p: np.ndarray) -> np.ndarray:
        return np.linalg.norm(p - c, axis=-1) - radius_mm

    return f


def _extrude(sdf2: Callable[[np.ndarray, np.ndarray], np.ndarray], half_length_mm: float) -> SDF:
    """Exact signed distance of a 2-D section extruded along ``z`` over ``|z| <= half_length``."""

    def f(p: np.ndarray) -> np.ndarray:
        d2 = sdf2(p[..., 0], p[..., 1])
        dz = np.abs(p[..., 2]) - half_length_mm
        outside = np.hypot(np.maximum(d2, 0.0), np.maximum(dz, 0.0))
        return outside + np.minimum(np.maximum(d2, dz), 0.0)

    return f


def _sdf_cylinder(radius_mm: float, length_mm: float, axis_xy: Sequence[float] = (0.0, 0.0)) -> SDF:
    ax, ay = (float(v) for v in axis_xy)
    return _extrude(lambda x, y: np.hypot(x - ax, y - ay) - radius_mm, 0.5 * length_mm)


def _sdf_iec_section(ph: NemaIecBodyPhantom) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Exact 2-D signed distance of the IEC body *interior* cross-section.

    The section is convex: an arc of radius ``Ra`` about the origin for ``y <= 0``, two corner
    arcs of radius ``Rc`` about ``(+/-w, 0)`` for ``y >= 0``, and the flat base ``y = D`` for
    ``|x| <= w``; so the distance is the smallest distance to these three boundary pieces.
    """
    ra, rc = ph.interior_arc_radius_mm, ph.interior_corner_radius_mm
    w, depth = 0.5 * ph.outer_box_width_mm, ph.interior_box_depth_mm

    def f(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ax = np.abs(x)
        r0 = np.hypot(x, y)
        qx = ax - w
        rq = np.hypot(qx, y)
        inside = np.where(y <= 0.0, r0 <= ra, (y <= depth) & ((ax <= w) | (rq <= rc)))
        end_side = np.hypot(ax - ra, y)  # the tangent points (+/-Ra, 0)
        end_base = np.hypot(qx, y - depth)  # the corners of the flat base (+/-w, D)
        d_arc = np.where(y <= 0.0, np.abs(r0 - ra), end_side)
        d_corner = np.where((qx >= 0.0) & (y >= 0.0), np.abs(rq - rc), np.minimum(end_side, end_base))
        d_base = np.where(ax <= w, np.abs(y - depth), end_base)
        d = np.minimum(np.minimum(d_arc, d_corner), d_base)
        return np.where(inside, -d, d)

    return f


def _sdf_ellipse_approx(a_mm: float, b_mm: float, centre_xy: Sequence[float]) -> Callable:
    """Approximate 2-D signed distance of an ellipse (close to exact near its boundary)."""
    cx, cy = centre_xy

    def f(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = (x - cx) / a_mm, (y - cy) / b_mm
        k0 = np.hypot(u, v)
        k1 = np.hypot(u / a_mm, v / b_mm)
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)

    return f


def _sdf_ellipsoid(semi_axes_mm: Sequence[float], centre: Sequence[float]) -> SDF:
    """Approximate signed distance of an axis-aligned ellipsoid (good near the surface)."""
    r = np.asarray(semi_axes_mm, dtype=float)
    c = np.asarray(centre, dtype=float)

    def f(p: np.ndarray) -> np.ndarray:
        q = p - c
        k0 = np.linalg.norm(q / r, axis=-1)
        k1 = np.linalg.norm(q / (r * r), axis=-1)
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)

    return f


# --------------------------------------------------------------------------------------------
# Voxelisation with exact partial volume
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pose:
    """Rigid placement: patient ``p = R @ local + t`` (mm)."""

    rotation: np.ndarray  # (3, 3), acting on (x, y, z)
    translation: np.ndarray  # (3,)

    def to_local(self, p: np.ndarray) -> np.ndarray:
        return (p - self.translation) @ self.rotation

    def to_patient(self, q: Sequence[float]) -> tuple[float, float, float]:
        v = self.rotation @ np.asarray(q, dtype=float) + self.translation
        return (float(v[0]), float(v[1]), float(v[2]))


_IDENTITY = _Pose(np.eye(3), np.zeros(3))


def _rotation(rotation_deg: float, tilt_deg: float) -> np.ndarray:
    """``R_x(tilt) @ R_z(rotation)``: roll about the phantom axis, then tilt about patient x."""
    a, b = math.radians(rotation_deg), math.radians(tilt_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(b), -math.sin(b)], [0.0, math.sin(b), math.cos(b)]])
    return rx @ rz


def _orientation(
    rotation_deg: float,
    tilt_deg: float,
    yaw_deg: float = 0.0,
    *,
    mirrored: bool = False,
    axial_flip: bool = False,
) -> np.ndarray:
    """Orthogonal matrix placing the phantom frame in patient space (acting on ``(x, y, z)``).

    ``F @ R_y(yaw) @ R_x(tilt) @ R_z(rotation)``: roll about the phantom axis, tilt about
    patient ``x``, yaw about patient ``y``, then ``F = diag(-1 if mirrored, 1, -1 if
    axial_flip)``, a reflection of patient ``x`` and/or ``z`` (angles in degrees). With either
    reflection alone the matrix is improper (determinant -1): no rigid motion of the phantom
    gives that image. With both it is the proper rotation by 180 deg about ``y``: the phantom
    turned end over end on its base.
    """
    c = math.radians(yaw_deg)
    ry = np.array([[math.cos(c), 0.0, math.sin(c)], [0.0, 1.0, 0.0], [-math.sin(c), 0.0, math.cos(c)]])
    flip = np.diag([-1.0 if mirrored else 1.0, 1.0, -1.0 if axial_flip else 1.0])
    return flip @ ry @ _rotation(rotation_deg, tilt_deg)


def _box_slices(grid: Grid, centre_xyz: np.ndarray, radius_mm: float) -> tuple[slice, slice, slice]:
    """Index slices of the voxels that may touch a ball (patient coordinates)."""
    k, j, i = grid.mm_to_index(centre_xyz)
    out = []
    for c, n, d in zip((k, j, i), grid.shape, grid.voxel_mm):
        half = radius_mm / d + 1.0
        out.append(slice(max(int(math.floor(c - half)), 0), min(int(math.ceil(c + half)) + 1, n)))
    return tuple(out)  # type: ignore[return-value]


def _volume_fraction(
    grid: Grid,
    sdf: SDF,
    *,
    pose: _Pose = _IDENTITY,
    supersample: int = 4,
    region: tuple[slice, slice, slice] | None = None,
    curvature_per_mm: float = 0.0,
    chunk_voxels: int = 16384,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Fraction of each voxel inside ``sdf < 0`` (shape placed by ``pose``).

    ``curvature_per_mm`` is the sum of the principal curvatures of the surface (``2/r`` for a
    sphere, ``1/r`` for a cylinder side). On a curved surface more area lies outside than
    inside, so the linear ramp over a sub-voxel of width ``w`` overcounts the volume by
    ``curvature * w**2 / 24`` per unit area (relative ``w**2 / (4 r**2)`` for a sphere: 1 % for a
    10 mm sphere at 1 mm sub-voxels); shifting the ramp by that much removes the bias.

    Returns the index region and the float64 fractions over it.
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    if region is None:
        region = tuple(slice(0, n) for n in grid.shape)  # type: ignore[assignment]
    zs, ys, xs = (ax[s] for ax, s in zip(grid.axes_mm(), region))
    zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
    centres = np.stack([xx, yy, zz], axis=-1)
    d = sdf(pose.to_local(centres))
    dz, dy, dx = grid.voxel_mm
    half_diag = 0.5 * math.sqrt(dx * dx + dy * dy + dz * dz)
    ramp_mm = (dx * dy * dz) ** (1.0 / 3.0) / supersample
    frac = (d < 0.0).astype(np.float64)
    cut = np.abs(d) <= half_diag + ramp_mm
    if not np.any(cut):
        return region, frac
    s = supersample
    u = (np.arange(s) + 0.5) / s - 0.5
    oz, oy, ox = np.meshgrid(u * dz, u * dy, u * dx, indexing="ij")
    offsets = np.stack([ox.ravel(), oy.ravel(), oz.ravel()], axis=-1)  # (s^3, 3) as (x, y, z)
    cut_centres = centres[cut]
    shift = curvature_per_mm * ramp_mm**2 / 24.0
    values = np.empty(len(cut_centres))
    for start in range(0, len(cut_centres), chunk_voxels):
        c = cut_centres[start : start + chunk_voxels]
        pts = c[:, None, :] + offsets[None, :, :]
        dsub = sdf(pose.to_local(pts))
        values[start : start + chunk_voxels] = np.clip(0.5 - (dsub + shift) / ramp_mm, 0.0, 1.0).mean(axis=1)
    frac[cut] = values
    return region, frac


def _full_fraction(grid: Grid, sdf: SDF, **kwargs) -> np.ndarray:
    region, frac = _volume_fraction(grid, sdf, **kwargs)
    out = np.zeros(grid.shape)
    out[region] = frac
    return out


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


# --------------------------------------------------------------------------------------------
# Image formation
# --------------------------------------------------------------------------------------------
def blur_fwhm(
    volume: np.ndarray,
    voxel_mm: Sequence[float],
    fwhm_mm: float | Sequence[float],
    *,
    mode: str = "constant",
) -> np.ndarray:
    """Blur with a Gaussian point-spread function.

    Parameters
    ----------
    volume : ndarray, shape (planes, rows, cols)
    voxel_mm : (3,) float
        ``(slice, row, col)`` spacing, mm.
    fwhm_mm : float or (3,) float
        FWHM of the PSF, mm; one value (isotropic) or one per axis ``(plane, row, col)``.
    mode : str
        Edge handling of :func:`scipy.ndimage.gaussian_filter`. The default, ``"constant"``
        (zero outside the grid), conserves total activity when the object lies inside the grid
        with a margin of about 2 FWHM.

    Returns
    -------
    ndarray of float32
        Blurred volume; ``sigma = FWHM / 2.3548`` per axis, in voxels.

    Notes
    -----
    The kernel is the Gaussian sampled at voxel centres and applied to voxel means. A scanner's
    image is the object convolved with the PSF and then integrated over each voxel; the sampled
    kernel approximates that well while the FWHM spans two voxels or more, but at 1.5 voxels
    (6 mm FWHM, 4 mm voxels) recovery coefficients of the small spheres differ by up to 0.03.
    For such cases render the object on a grid ``f`` times finer, blur there and reduce with
    :func:`block_mean`: the result is the voxel-integrated image to the accuracy of the fine
    grid.
    """
    return _gaussian(volume, voxel_mm, fwhm_mm, mode=mode).astype(np.float32)


def _sigma_voxels(voxel_mm: Sequence[float], fwhm_mm: float | Sequence[float]) -> np.ndarray:
    """Gaussian sigma per axis ``(plane, row, col)`` in voxels, from a FWHM in mm."""
    fwhm = np.broadcast_to(np.asarray(fwhm_mm, dtype=float), (3,))
    return fwhm / FWHM_PER_SIGMA / np.asarray(voxel_mm, dtype=float)


def _gaussian(volume: np.ndarray, voxel_mm: Sequence[float], fwhm_mm: float | Sequence[float], *,
              mode: str = "constant") -> np.ndarray:
    """Gaussian blur in float64 (see :func:`blur_fwhm`)."""
    sigma_vox = _sigma_voxels(voxel_mm, fwhm_mm)
    data = np.asarray(volume, dtype=np.float64)
    if not np.any(sigma_vox > 0):
        return data.copy()
    return ndimage.gaussian_filter(data, sigma=sigma_vox, mode=mode, truncate=5.0)


def psf_blur(
    volume: np.ndarray,
    voxel_mm: Sequence[float],
    fwhm_mm: float | Sequence[float],
    *,
    overshoot: float = 0.0,
    halo_fwhm_mm: float | Sequence[float] | None = None,
    mode: str = "constant",
) -> np.ndarray:
    """Blur with the point-spread function of a resolution-recovery (PSF) reconstruction.

    The kernel is a difference of Gaussians, ``(1 + overshoot) G(fwhm) - overshoot G(halo)``:
    it integrates to 1 (uniform regions keep their value) but overshoots at edges (Gibbs-like
    ringing), so small hot spheres read above their true concentration (RCmax > 1) and a dark
    rim lies just outside hot edges, as in PSF reconstructions without a post-filter.

    Parameters
    ----------
    volume : ndarray, shape (planes, rows, cols)
    voxel_mm : (3,) float
        ``(slice, row, col)`` spacing, mm.
    fwhm_mm : float or (3,) float
        FWHM of the Gaussian core, mm (the kernel's own FWHM is a little smaller).
    overshoot : float
        Weight of the subtracted halo, dimensionless; 0 (default) is :func:`blur_fwhm`.
        About 0.3-0.6 makes 10-17 mm spheres read RCmax 1.0-1.3 at 2-4 mm voxels.
    halo_fwhm_mm : float or (3,) float, optional
        FWHM of the halo, mm; default twice ``fwhm_mm``.
    mode : str
        Edge handling, as for :func:`blur_fwhm`.

    Returns
    -------
    ndarray of float32
        May hold small negative values next to hot edges when the background is cold.
    """
    if overshoot < 0:
        raise ValueError(f"overshoot must be >= 0, got {overshoot}")
    core = _gaussian(volume, voxel_mm, fwhm_mm, mode=mode)
    if overshoot == 0:
        return core.astype(np.float32)
    halo_fwhm = 2.0 * np.asarray(fwhm_mm, dtype=float) if halo_fwhm_mm is None else halo_fwhm_mm
    halo = _gaussian(volume, voxel_mm, halo_fwhm, mode=mode)
    return ((1.0 + overshoot) * core - overshoot * halo).astype(np.float32)


def block_mean(volume: np.ndarray, factor: int | Sequence[int]) -> np.ndarray:
    """Mean over ``factor``-sized blocks: a fine-grid image reduced to voxels ``factor`` times larger.

    A grid made with ``Grid.centred(shape * f, voxel_mm / f, centre)`` tiles the voxels of
    ``Grid.centred(shape, voxel_mm, centre)`` exactly, ``f**3`` fine voxels to one.

    Parameters
    ----------
    volume : ndarray, shape (planes, rows, cols)
        Each dimension a multiple of its factor.
    factor : int or (3,) int
        Block size per axis ``(plane, row, col)``.

    Returns
    -------
    ndarray of float32
    """
    f = tuple(int(v) for v in np.broadcast_to(np.asarray(factor), (3,)))
    v = np.asarray(volume, dtype=np.float64)
    if any(n % k for n, k in zip(v.shape, f)):
        raise ValueError(f"shape {v.shape} is not a multiple of the block {f}")
    nz, ny, nx = (n // k for n, k in zip(v.shape, f))
    return v.reshape(nz, f[0], ny, f[1], nx, f[2]).mean(axis=(1, 3, 5)).astype(np.float32)


def add_noise(volume: np.ndarray, *, rng: np.random.Generator, cov: float) -> np.ndarray:
    """Multiplicative Gaussian noise: ``v * (1 + cov * N(0, 1))``, clipped at zero.

    Parameters
    ----------
    volume : ndarray
    rng : numpy.random.Generator
    cov : float
        Coefficient of variation of the noise (e.g. 0.1 for 10 %), dimensionless.

    Returns
    -------
    ndarray of float32
    """
    if cov < 0:
        raise ValueError(f"cov must be >= 0, got {cov}")
    v = np.asarray(volume, dtype=np.float64)
    noisy = v * (1.0 + cov * rng.standard_normal(v.shape))
    return np.clip(noisy, 0.0, None).astype(np.float32)


def _white_noise_sd(sigma_vox: np.ndarray) -> float:
    """SD of unit white noise after :func:`scipy.ndimage.gaussian_filter` with ``sigma_vox``
    (``truncate=4``): the root of the product over axes of the summed squared 1-D weights."""
    var = 1.0
    for s in sigma_vox:
        if s > 0:
            n = 2 * int(4.0 * s + 0.5) + 1
            delta = np.zeros(n)
            delta[n // 2] = 1.0
            var *= float(np.sum(ndimage.gaussian_filter1d(delta, s, mode="constant", truncate=4.0) ** 2))
    return math.sqrt(var)


def reconstruction_noise(
    volume: np.ndarray,
    voxel_mm: Sequence[float],
    *,
    rng: np.random.Generator,
    cov: float,
    level_kbq_ml: float,
    fwhm_mm: float | Sequence[float] = 6.0,
    power: float = 0.5,
) -> np.ndarray:
    """Noise like a reconstructed PET image's: spatially correlated, its SD rising with activity.

    ``out = max(v + sd(v) * n, 0)`` with ``sd(v) = cov * level * (v / level) ** power`` and ``n``
    white Gaussian noise smoothed to ``fwhm_mm`` and scaled to unit variance. A uniform region at
    ``level_kbq_ml`` therefore has a voxel CoV of ``cov`` in the returned image, whatever the
    correlation; with ``power = 0.5`` (variance proportional to the activity, as for counts) a
    sphere 10 times hotter has a CoV ``cov / sqrt(10)``. Where ``v <= 0`` nothing is added.

    Parameters
    ----------
    volume : ndarray, shape (planes, rows, cols)
        The noiseless image (already blurred), kBq/mL.
    voxel_mm : (3,) float
        ``(slice, row, col)`` spacing, mm.
    rng : numpy.random.Generator
        Source of the noise; the same state gives the same image.
    cov : float
        Voxel coefficient of variation at ``level_kbq_ml`` (e.g. 0.10 for 10 %), dimensionless.
    level_kbq_ml : float
        Concentration at which the CoV is ``cov`` (the phantom background), kBq/mL.
    fwhm_mm : float or (3,) float
        FWHM of the noise correlation (the smoothing of the white noise), mm; about the
        reconstruction's resolution. 0 gives white noise.
    power : float
        Exponent of the SD's rise with the activity: 0.5 Poisson-like (default), 1
        multiplicative, 0 uniform.

    Returns
    -------
    ndarray of float32
        Non-negative, like an OSEM image.
    """
    if cov < 0:
        raise ValueError(f"cov must be >= 0, got {cov}")
    if level_kbq_ml <= 0:
        raise ValueError(f"level_kbq_ml must be > 0, got {level_kbq_ml}")
    v = np.asarray(volume, dtype=np.float64)
    sigma_vox = _sigma_voxels(voxel_mm, fwhm_mm)
    white = rng.standard_normal(v.shape)
    if np.any(sigma_vox > 0):
        white = ndimage.gaussian_filter(white, sigma=sigma_vox, mode="wrap", truncate=4.0)
        white /= _white_noise_sd(sigma_vox)
    sd = cov * level_kbq_ml * (np.clip(v, 0.0, None) / level_kbq_ml) ** power
    return np.clip(v + sd * white, 0.0, None).astype(np.float32)


def axial_window(volume: np.ndarray, grid: Grid, z_min_mm: float, z_max_mm: float) -> tuple[np.ndarray, Grid]:
    """The planes of an image whose centres lie within ``[z_min_mm, z_max_mm]`` (patient ``z``).

    Cuts an image axially as a scanner's field of view does: blur the whole object first, then
    cut, so the kept planes see the activity beyond the cut.

    Parameters
    ----------
    volume : ndarray, shape (planes, rows, cols)
    grid : Grid
        The grid of ``volume``.
    z_min_mm, z_max_mm : float
        Patient ``z`` range to keep, mm.

    Returns
    -------
    (ndarray, Grid)
        The kept planes (a view) and their grid.
    """
    z = grid.axes_mm()[0]
    keep = np.flatnonzero((z >= z_min_mm) & (z <= z_max_mm))
    if keep.size == 0:
        raise ValueError(f"no plane of the grid (z {z[0]:.1f} to {z[-1]:.1f} mm) lies in [{z_min_mm}, {z_max_mm}] mm")
    k0, k1 = int(keep[0]), int(keep[-1]) + 1
    ox, oy, oz = grid.origin_mm
    sub = Grid((k1 - k0, grid.shape[1], grid.shape[2]), grid.voxel_mm, (ox, oy, oz + k0 * grid.voxel_mm[0]))
    return volume[k0:k1], sub
