"""Results of the image QC of one PET series, and the tunables of the analysis.

Pure data: :class:`LiverVoi` (the PERCIST liver reference region), :class:`ImageQc` (everything
:func:`expectations.image.analyse_pet` measures) and :data:`DEFAULTS` (every threshold, with
its unit and why it has that value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULTS", "LiverVoi", "ImageQc"]

DEFAULTS: dict[str, Any] = {
    # --- working grid -------------------------------------------------------------------
    # Segmentation, body outline and alignment run on a copy block-averaged to about this voxel
    # size (mm): the liver is 15-20 cm wide, so 6-8 mm voxels lose nothing that matters and make
    # the distance transform ~8x cheaper. The VOI itself is measured on the full-resolution image.
    "work_voxel_mm": 6.0,
    # Gaussian smoothing (FWHM, mm) of the working copy before thresholding, so that clinical
    # noise (voxel CoV 10-25 %) does not punch holes in the liver mask.
    "smooth_fwhm_mm": 10.0,
    # --- body ---------------------------------------------------------------------------
    # Voxels above this fraction of the volume's mean are the first guess of the body; the body
    # level is the median uptake over them (soft tissue, whatever the global scale).
    "body_seed_frac_of_mean": 0.5,
    # Body = smoothed uptake above this fraction of the body level (keeps the lungs, drops air).
    "body_frac": 0.3,
    # --- liver reference region (PERCIST 1.0; Bauer et al. Med Phys 2012; QIICR) --------------
    "liver_radius_mm": 15.0,          # PERCIST: 3 cm diameter sphere
    "liver_margin_mm": 3.0,           # QIICR: the fitted sphere is eroded 3 mm
    # Coarse liver band, as a multiple of the body level: FDG liver is ~2-3x soft tissue; the
    # lower bound leaves out marrow/blood (~1.5x), the upper kidneys, heart, brain, bladder hot
    # cores (their blurred rims are too thin to hold the sphere).
    "liver_band_coarse": (1.6, 4.0),
    # Refined band around the median of the coarse region (multiple of that median): a normal
    # liver is homogeneous (CoV ~10 %), kidneys (+35 %) and blood pool (-25 %) fall outside.
    "liver_band_fine": (0.78, 1.25),
    # Hot spots (lesions): smoothed uptake above this multiple of the liver median; they and
    # a margin around them (mm) are removed before the sphere is fitted.
    "hot_factor": 1.25,
    "hot_margin_mm": 10.0,
    # CT number of liver when a CT is given, HU: unenhanced liver 50-65 HU, portal-venous
    # contrast up to ~120 HU; the band removes fat, lung and bone, with room for CT noise.
    "liver_hu_range": (0.0, 130.0),
    "min_liver_ml": 500.0,            # smaller liver-like regions are not trusted as the liver
    # The VOI median must lie within this fraction of the median of the liver region
    # (a VOI on inhomogeneous or diseased liver is withheld, not reported).
    "max_voi_vs_region": 0.15,
    # Lung-like voxels inside the body outline (fraction of body level); the sphere must lie
    # below the centroid of the lungs when lungs are seen.
    "lung_frac": 0.6,
    "min_lung_ml": 300.0,
    # --- axial coverage and bed dip ---------------------------------------------------------
    "dip_floor_frac": 0.02,           # per-plane body: above this fraction of the body level ...
    "dip_plane_body_frac": 0.3,       # ... then above this fraction of the plane's own mean
    "dip_ratio": 0.4,                 # a plane is low below 40 % of the median of its neighbours
    "dip_window_mm": 250.0,           # half-width of that neighbourhood, mm (wider than one bed)
    "dip_min_planes": 3,              # a dip is at least 3 consecutive planes ...
    "dip_min_mm": 10.0,               # ... and at least 10 mm long
    "dip_end_frac": 0.05,             # runs in the outer 5 % of the axial extent are end fall-off
    # --- PET/CT alignment ------------------------------------------------------------------
    "ct_body_hu": -400.0,             # CT body: HU above this (air -1000, lung -800, fat -100)
    "ct_ramp_hu": 300.0,              # half-width of the soft edge of the CT masks, HU
    "pet_ramp_frac": 0.15,            # half-width of the soft edge of the PET masks (x body level)
    # PET dense tissue (for the z profile): above this fraction of the body level, halfway
    # between lung (~0.4) and soft tissue (1.0); the least lung/tissue edge (see pet_lung_window_mm)
    "pet_dense_frac": 0.7,
    # Half-width (mm, along z) of the neighbourhood of the local-midpoint threshold of the PET
    # lung edge: one working plane each way. Wider windows reach the kidneys (3x) below the thin
    # tissue under the posterior lung base, lift the midpoint above soft tissue and read a
    # false shift the other way (-2..-4 mm at 12-18 mm on the synthetic trials).
    "pet_lung_window_mm": 6.0,
    "pet_lung_smooth_mm": 16.0,       # in-plane FWHM of the copy those levels are read from, mm
    "max_shift_mm": 60.0,             # search range of the alignment, mm
    "min_overlap_mm": 60.0,           # PET and CT must share at least this much along each axis
}
"""Tunables of :func:`expectations.image.analyse_pet`; override any with ``params``."""


@dataclass
class LiverVoi:
    """The liver reference VOI (PERCIST: 3 cm sphere in the normal right lobe).

    Attributes
    ----------
    assessable : bool
        False when the liver could not be found with confidence; then the values are None.
    reason : str
        '' when assessable, else why not.
    centre_mm : tuple of float or None
        Patient ``(x, y, z)`` of the sphere centre, mm.
    centre_index : tuple of int or None
        ``(plane, row, col)`` of the sphere centre on the PET grid.
    radius_mm : float
    n_voxels : int
        Voxels whose centres lie inside the sphere.
    suv_mean, suv_sd, cov_pct, sul_mean : float or None
        SUVbw mean and SD (ddof 1) in the sphere, CoV in %, SUL mean (None when the lean-body-mass
        factor is unknown).
    depth_mm : float or None
        Distance of the centre from the edge of the liver-like region, mm.
    """

    assessable: bool = False
    reason: str = ""
    centre_mm: tuple[float, float, float] | None = None
    centre_index: tuple[int, int, int] | None = None
    radius_mm: float = 15.0
    n_voxels: int = 0
    suv_mean: float | None = None
    suv_sd: float | None = None
    cov_pct: float | None = None
    sul_mean: float | None = None
    depth_mm: float | None = None


def _f(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(float(v), nd)


@dataclass
class ImageQc:
    """Image QC of one PET series (see :func:`expectations.image.analyse_pet`).

    Attributes
    ----------
    liver : LiverVoi
    axial_coverage_mm : float
        Planes x slice spacing, mm.
    bed_dip : dict or None
        None, or ``{"z_from_mm", "z_to_mm", "planes", "depth_pct"}``: the run of planes whose mean
        uptake in the body drops below ``dip_ratio`` of its neighbourhood (``depth_pct`` = 100 x
        (1 - median ratio over the run)).
    petct_shift_mm : (3,) float or None
        PET minus CT body position ``(x, y, z)``, mm.
    petct_reason : str
        '' or why the alignment was not assessable.
    axial_profile : list of float
        Mean uptake in the body per plane (for figures).
    """

    liver: LiverVoi = field(default_factory=LiverVoi)
    axial_coverage_mm: float = 0.0
    bed_dip: dict | None = None
    petct_shift_mm: tuple[float, float, float] | None = None
    petct_reason: str = ""
    axial_profile: list[float] = field(default_factory=list)

    def columns(self) -> dict[str, Any]:
        """The header-table columns, JSON-safe (see the module docstring of expectations.image)."""
        lv = self.liver
        shift = self.petct_shift_mm
        return {
            "liver_assessable": bool(lv.assessable),
            "liver_suv_mean": _f(lv.suv_mean),
            "liver_suv_sd": _f(lv.suv_sd),
            "liver_cov_pct": _f(lv.cov_pct, 2),
            "liver_sul_mean": _f(lv.sul_mean),
            "liver_voi_centre_mm": None if lv.centre_mm is None else [round(float(c), 1) for c in lv.centre_mm],
            "axial_coverage_mm": round(float(self.axial_coverage_mm), 1),
            "bed_dip_planes": int(self.bed_dip["planes"]) if self.bed_dip else 0,
            "petct_shift_mm": None if shift is None else round(max(abs(float(s)) for s in shift), 1),
            "petct_shift_x_mm": None if shift is None else round(float(shift[0]), 1),
            "petct_shift_y_mm": None if shift is None else round(float(shift[1]), 1),
            "petct_shift_z_mm": None if shift is None else round(float(shift[2]), 1),
        }
