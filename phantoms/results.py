"""What the phantom analyses report: one hot sphere, the NEMA IEC body phantom, the uniform
cylinder; plain frozen dataclasses with a JSON-ready ``to_dict``.

Arrays are indexed ``(plane, row, col)``; positions are ``(x, y, z)`` in mm. With a
:class:`~corelab.grid.Grid` they are patient LPS coordinates; without one, ``(0, 0, 0)`` is
the centre of voxel ``[0, 0, 0]`` and ``x, y, z`` run along columns, rows and planes.

The analyses are :func:`phantoms.nema_iec.analyze_nema_iec` and
:func:`phantoms.cylinder.analyze_uniform_cylinder`; the accreditation judges these results
(:mod:`accreditation.standards`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from phantoms.identity import IdentityCheck

__all__ = ["SphereResult", "NemaIecResult", "CylinderResult"]


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
        :mod:`phantoms.localise`, :mod:`phantoms.identity`).
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
