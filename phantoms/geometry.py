"""Physical phantom geometry, as data.

Each phantom is a frozen dataclass in its own *phantom frame* (mm). Digital phantoms
(:mod:`synth.digital_phantoms`) and analyses (:mod:`phantoms.nema_iec`, :mod:`phantoms.cylinder`) read the numbers from here,
so a corrected dimension is a one-line change.

Phantom frame of the NEMA IEC body phantom
------------------------------------------
* origin: the *body centre*, i.e. the centre of the R 150 mm arc of the cross-section, on the
  interior mid-plane (half-way between the inner faces of the two end walls);
* ``x``: lateral, across the 300 mm width;
* ``y``: from the round top towards the flat base. The phantom lies on its base on the couch, so
  with no rotation ``+y`` is posterior, like DICOM LPS ``+y``; the lung insert and the sphere ring
  sit at negative ``y`` (anterior, "above" the body centre);
* ``z``: along the phantom axis towards the lid end. The sphere plane is placed 27 mm from the
  interior mid-plane towards ``+z`` (the lid, from which the spheres hang; this matches the
  OpenGATE model, see ``pet-qc-facts.md`` section 3).

Sphere order around the ring is a convention of this model (10 mm at 0 deg on ``+x``, then every
60 deg from ``+x`` towards ``+y``, ending with 37 mm at 300 deg); analyses match spheres by size
and accept the mirrored order (e.g. a phantom scanned the other way round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "NemaIecBodyPhantom",
    "UniformCylinderPhantom",
    "NEMA_IEC_BODY",
    "sphere_volume_ml",
]


def sphere_volume_ml(diameter_mm: float) -> float:
    """Volume of a sphere, in mL (1 mL = 1000 mm^3).

    Parameters
    ----------
    diameter_mm : float
        Inner diameter in mm.
    """
    return math.pi * diameter_mm**3 / 6.0 / 1000.0


@dataclass(frozen=True)
class NemaIecBodyPhantom:
    """NEMA NU 2 / IEC 61675-1 body phantom ("IEC body phantom"), fillable volumes only.

    All lengths in mm, in the phantom frame described in the module docstring. Source:
    OpenGATE ``nemaiec`` geometry as summarised in ``pet-qc-facts.md`` sections 1 and 3.

    Attributes
    ----------
    sphere_diameters_mm : tuple of float
        Inner diameters of the six fillable spheres.
    sphere_angles_deg : tuple of float
        Angle of each sphere centre around the lung-insert axis, from ``+x`` towards ``+y``,
        in the order of ``sphere_diameters_mm``.
    sphere_ring_radius_mm : float
        Distance of each sphere centre from the lung-insert axis.
    sphere_plane_z_mm : float
        ``z`` of the plane holding the sphere centres (from the interior mid-plane).
    lung_axis_xy_mm : tuple of float
        ``(x, y)`` of the lung-insert axis; ``y`` negative = towards the round top (anterior).
    lung_inner_radius_mm, lung_outer_radius_mm : float
        The insert's fillable (low density) radius and its outer wall radius.
    outer_arc_radius_mm : float
        Radius of the round upper half of the outer cross-section (``y <= 0``).
    outer_box_width_mm, outer_box_depth_mm : float
        The lower part (``y >= 0``): a box this wide (central flat part) and deep.
    outer_corner_radius_mm : float
        Radius of the two quarter-cylinders at ``x = +/- outer_box_width_mm / 2``.
    outer_length_mm : float
        Outer length along ``z``.
    side_wall_mm, end_wall_mm : float
        Wall thicknesses; the fillable interior is the outer shape inset by ``side_wall_mm``
        across and by ``end_wall_mm`` at each end.
    sphere_wall_mm : float
        Glass wall of the spheres (about 1 mm): cold, it displaces background, which the
        localiser allows for (:func:`phantoms.identity.expected_activity_volume_ml`).
    background_roi_xy_mm : tuple of (float, float)
        Centres of the 12 background ROIs used for percent contrast and background variability.
        NEMA places them at least 15 mm from the phantom edge. This is a simplified set of 12,
        not the drawing of the standard: every 37 mm ROI lies at least 14 mm from the interior
        wall (10 mm for the top one at ``(0, -118)``), at least 12 mm from any sphere (7 mm for
        the top one) and 34 mm from the lung insert. ROIs may overlap.
    background_roi_offsets_z_mm : tuple of float
        Axial offsets from the sphere plane of the slices that carry the background ROIs.
    """

    sphere_diameters_mm: tuple[float, ...] = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)
    sphere_angles_deg: tuple[float, ...] = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
    sphere_ring_radius_mm: float = 57.27
    sphere_plane_z_mm: float = 27.0
    lung_axis_xy_mm: tuple[float, float] = (0.0, -35.0)
    lung_inner_radius_mm: float = 21.0
    lung_outer_radius_mm: float = 25.0
    outer_arc_radius_mm: float = 150.0
    outer_box_width_mm: float = 140.0
    outer_box_depth_mm: float = 80.0
    outer_corner_radius_mm: float = 80.0
    outer_length_mm: float = 214.0
    side_wall_mm: float = 3.0
    end_wall_mm: float = 10.0
    sphere_wall_mm: float = 1.0
    background_roi_xy_mm: tuple[tuple[float, float], ...] = field(
        default=(
            (-110.0, -22.0),
            (110.0, -22.0),
            (-98.0, -54.0),
            (98.0, -54.0),
            (-78.0, -80.0),
            (78.0, -80.0),
            (0.0, -118.0),
            (-92.0, 12.0),
            (92.0, 12.0),
            (-72.0, 42.0),
            (0.0, 43.0),
            (72.0, 42.0),
        )
    )
    background_roi_offsets_z_mm: tuple[float, ...] = (-20.0, -10.0, 0.0, 10.0, 20.0)

    @property
    def interior_length_mm(self) -> float:
        """Fillable length along ``z`` (outer length minus both end walls), mm."""
        return self.outer_length_mm - 2.0 * self.end_wall_mm

    @property
    def interior_arc_radius_mm(self) -> float:
        return self.outer_arc_radius_mm - self.side_wall_mm

    @property
    def interior_corner_radius_mm(self) -> float:
        return self.outer_corner_radius_mm - self.side_wall_mm

    @property
    def interior_box_depth_mm(self) -> float:
        return self.outer_box_depth_mm - self.side_wall_mm

    @property
    def sphere_volumes_ml(self) -> dict[float, float]:
        """``{diameter_mm: volume_ml}`` of the sphere interiors."""
        return {d: sphere_volume_ml(d) for d in self.sphere_diameters_mm}

    def sphere_centres_mm(self) -> dict[float, tuple[float, float, float]]:
        """Sphere centres in the phantom frame, ``{diameter_mm: (x, y, z)}`` in mm."""
        cx, cy = self.lung_axis_xy_mm
        out = {}
        for d, a in zip(self.sphere_diameters_mm, self.sphere_angles_deg):
            t = math.radians(a)
            out[d] = (
                cx + self.sphere_ring_radius_mm * math.cos(t),
                cy + self.sphere_ring_radius_mm * math.sin(t),
                self.sphere_plane_z_mm,
            )
        return out

    @property
    def ring_centre_mm(self) -> tuple[float, float, float]:
        """Where the lung-insert axis crosses the sphere plane (phantom frame, mm)."""
        return (self.lung_axis_xy_mm[0], self.lung_axis_xy_mm[1], self.sphere_plane_z_mm)


NEMA_IEC_BODY = NemaIecBodyPhantom()
"""The default IEC body phantom."""


@dataclass(frozen=True)
class UniformCylinderPhantom:
    """A uniform cylinder for calibration QC (fillable interior only).

    Phantom frame: origin at the centre of the interior, ``z`` along the axis.

    Attributes
    ----------
    radius_mm : float
        Inner radius (default 100 mm, a common 20 cm cylinder).
    length_mm : float
        Inner length.
    """

    radius_mm: float = 100.0
    length_mm: float = 200.0

    @property
    def volume_ml(self) -> float:
        return math.pi * self.radius_mm**2 * self.length_mm / 1000.0
