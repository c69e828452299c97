"""What a synthetic trial is made of: sites, scanners, phantom scans, visits, value ranges, problems.

:class:`TrialSpec` holds everything :func:`synth.trial.generate_trial` needs; :meth:`TrialSpec.demo`
gives the FDG-RESP-01 defaults, :func:`small_spec` the same trial shrunk for tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["PROBLEM_CODES", "SiteSpec", "ScannerSpec", "PhantomSpec", "TrialSpec", "small_spec"]

#: Injected problems, in the order they are placed.
PROBLEM_CODES: tuple[str, ...] = (
    "scanner_not_accredited",
    "followup_on_other_scanner",
    "software_version_changed",
    "uptake_out_of_window",
    "missing_weight",
    "wrong_units",
    "dose_in_mbq",
    "patient_name_in_header",
    "missing_slice",
    # Image problems: the headers stay valid; only the pixels (or the CT's content) are wrong.
    "liver_calibration_error",
    "ct_misaligned",
    "missing_bed_position",
    "noisy_scan",
)


@dataclass
class SiteSpec:
    """A trial site.

    Attributes
    ----------
    code : str
        Site code, e.g. ``"A01"``.
    ae_title : str
        DICOM AE title the site sends from.
    name : str
    n_subjects : int
        Subjects recruited at the site; they are spread over the site's scanners in turn.
    """

    code: str
    ae_title: str
    name: str
    n_subjects: int


@dataclass
class ScannerSpec:
    """A PET/CT scanner as registered, and how it forms images.

    Attributes
    ----------
    id : str
        Scanner id, e.g. ``"A01-1"``.
    site : str
    manufacturer, model, serial, software : str
        As registered (and written unless a problem changes them).
    software_after_upgrade : str
        SoftwareVersions written by the ``software_version_changed`` problem.
    pet_voxel_mm : tuple of float
        (slice, row, col) spacing of trial PET images, mm.
    psf_fwhm_mm : float
        Gaussian PSF of trial images, mm.
    nema_fwhm_mm : float
        Gaussian PSF of the NEMA IEC phantom image, mm (about 10.5 mm makes it fail EARL).
    calibration_error_pct : float
        Scale error of the phantom images, percent.
    reconstruction_method, convolution_kernel, ct_kernel : str or None
    tm_fraction_digits : int
        Digits after the second in TM/DT values (vendor style).
    accredited : bool
        False makes every trial scan on it carry ``scanner_not_accredited``.
    writes_patient_size : bool
        Whether PatientSize is written.
    frame_duration_s : int
        Frame duration per bed position, s.
    """

    id: str
    site: str
    manufacturer: str
    model: str
    serial: str
    software: str
    software_after_upgrade: str = ""
    station_name: str | None = None
    pet_voxel_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    psf_fwhm_mm: float = 6.5
    nema_fwhm_mm: float = 6.5
    calibration_error_pct: float = 0.0
    reconstruction_method: str | None = "OSEM 3i21s"
    convolution_kernel: str | None = None
    ct_kernel: str | None = "STANDARD"
    tm_fraction_digits: int = 0
    accredited: bool = True
    writes_patient_size: bool = False
    frame_duration_s: int = 180


@dataclass
class PhantomSpec:
    """Phantom fills and image formation (shared by all scanners).

    Attributes
    ----------
    sphere_kbq_ml, background_kbq_ml : float
        NEMA IEC fill at the reference time, kBq/mL (10:1 by default).
    cylinder_kbq_ml : float
        Uniform cylinder fill at the reference time, kBq/mL.
    nema_shape, cylinder_shape : tuple of int
        (planes, rows, cols).
    voxel_mm : tuple of float
        (slice, row, col) spacing of phantom images, mm (2-5 mm).
    shift_mm : tuple of float
        Phantom displacement (x, y, z) in mm.
    rotation_deg : float or None
        NEMA phantom roll about its axis, degrees; None: drawn per scanner over the full circle.
    mirrored, axial_flip : bool or None
        NEMA phantom image reflected left-right / head-feet (see
        :func:`synth.digital_phantoms.nema_iec_phantom`); None: drawn per scanner (even odds).
    tilt_deg : float or None
        NEMA phantom tilt about patient ``x``, degrees; None: drawn per scanner within +/-3 deg.
    sphere_wall_mm : float
        Cold glass wall of the NEMA spheres, mm (0 = none; real spheres about 1 mm).
    noise_cov : float or (float, float)
        Voxel coefficient of variation of the background (NEMA) or of the cylinder in the
        final image (0 = none); a pair: drawn per phantom scan within that range. The noise
        is correlated and its variance follows the activity (see
        :func:`synth.imaging.reconstruction_noise`).
    noise_fwhm_mm : float
        Correlation FWHM of the noise, mm.
    scan_delay_min : tuple of float
        Range of the delay between fill reference time and scan start, min.
    days_before_trial : int
        Phantom scans happen this many days before the first trial scan.
    supersample : int
        Partial-volume supersampling of the digital phantoms.
    """

    sphere_kbq_ml: float = 20.0
    background_kbq_ml: float = 2.0
    cylinder_kbq_ml: float = 5.0
    cylinder_radius_mm: float = 100.0
    cylinder_length_mm: float = 200.0
    nema_shape: tuple[int, int, int] = (48, 84, 84)
    cylinder_shape: tuple[int, int, int] = (56, 64, 64)
    voxel_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation_deg: float | None = 0.0
    mirrored: bool | None = False
    axial_flip: bool | None = False
    tilt_deg: float | None = 0.0
    sphere_wall_mm: float = 0.0
    noise_cov: float | tuple[float, float] = 0.0
    noise_fwhm_mm: float = 6.0
    scan_delay_min: tuple[float, float] = (30.0, 60.0)
    days_before_trial: int = 21
    supersample: int = 4


@dataclass
class TrialSpec:
    """Everything :func:`generate_trial` needs; :meth:`demo` gives the FDG-RESP-01 defaults.

    Attributes
    ----------
    trial_code, trial_name, sponsor : str
    pseudonym_prefix : str
        Subject pseudonyms are ``<prefix>-<site>-<nnn>``.
    sites, scanners : list
    phantom : PhantomSpec
    visits : tuple of str
        Visit names; the first is the baseline.
    first_scan_date : str
        ISO date of the earliest baseline (before the date shift).
    enrolment_days : int
        Baselines fall within this many days of ``first_scan_date``.
    followup_days : tuple of int
        Range of days from baseline to follow-up.
    pet_shape : tuple of int
        (planes, rows, cols) of trial PET and CT images.
    weight_kg, dose_mbq_per_kg, dose_mbq_limits, uptake_min, uptake_limits_min : tuple
        Ranges of the clean values; ``uptake_min`` is (mean, sd).
    followup_uptake_max_delta_min : float
        Follow-up uptake stays within this many minutes of the baseline uptake.
    patient_noise_cov : float
        Voxel coefficient of variation of the trial PET noise at the liver's activity
        (dimensionless); the noise is correlated and its variance follows the activity, as in
        the phantoms (:func:`synth.imaging.reconstruction_noise`). 0.10 reads as a liver CoV of
        about 10 % in a 3 cm VOI, as clinical scans show.
    patient_noise_fwhm_mm : float
        Correlation FWHM of the trial PET noise, mm.
    problems : tuple of str
        Problems to inject (see :data:`PROBLEM_CODES`).
    problem_uptake_min : float
        Uptake time written by ``uptake_out_of_window``.
    problem_liver_suv : float
        Liver SUV the ``liver_calibration_error`` scan reads (the image is scaled; headers are
        unchanged).
    problem_ct_shift_mm : float
        How far the patient moved between CT and PET in ``ct_misaligned``, mm (along x or y).
    problem_bed_gap_mm : float
        Axial length of the failed bed position of ``missing_bed_position``, mm (at least
        10 mm; shortened to fit above the liver and inside the central 90 % of the FOV).
    problem_bed_residual : float
        Fraction of the counts the failed planes keep (scatter from the neighbours).
    problem_noise_cov : float
        ``patient_noise_cov`` of the ``noisy_scan`` (short frames).
    date_shift_days : tuple of int
        Range of the per-subject date shift, days.
    software_change_scanner : str or None
        Scanner whose latest follow-up carries ``software_version_changed`` (None: the first
        accredited scanner with ``software_after_upgrade``).
    """

    trial_code: str = "FDG-RESP-01"
    trial_name: str = "FDG PET/CT response trial"
    sponsor: str = "corelab synthetic"
    pseudonym_prefix: str = "FDGR01"
    sites: list[SiteSpec] = field(default_factory=list)
    scanners: list[ScannerSpec] = field(default_factory=list)
    phantom: PhantomSpec = field(default_factory=PhantomSpec)
    visits: tuple[str, ...] = ("baseline", "followup")
    first_scan_date: str = "2025-02-03"
    enrolment_days: int = 120
    followup_days: tuple[int, int] = (42, 56)
    pet_shape: tuple[int, int, int] = (48, 96, 96)
    weight_kg: tuple[float, float] = (50.0, 110.0)
    dose_mbq_per_kg: tuple[float, float] = (3.2, 3.8)
    dose_mbq_limits: tuple[float, float] = (150.0, 450.0)
    uptake_min: tuple[float, float] = (60.0, 5.0)
    uptake_limits_min: tuple[float, float] = (55.0, 75.0)
    followup_uptake_max_delta_min: float = 8.0
    patient_noise_cov: float = 0.10
    patient_noise_fwhm_mm: float = 6.0
    problems: tuple[str, ...] = PROBLEM_CODES
    problem_uptake_min: float = 95.0
    problem_liver_suv: float = 3.6
    problem_ct_shift_mm: float = 15.0
    problem_bed_gap_mm: float = 30.0
    problem_bed_residual: float = 0.03
    problem_noise_cov: float = 0.25
    date_shift_days: tuple[int, int] = (-1500, -400)
    software_change_scanner: str | None = None

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def demo(cls) -> "TrialSpec":
        """FDG-RESP-01: 3 sites, 4 scanners of 3 vendors, 12 subjects x 2 visits; noisy phantom
        scans in varied poses."""
        sites = [
            SiteSpec("A01", "SITE_A01", "Site A01 PET Centre", 5),
            SiteSpec("B02", "SITE_B02", "Site B02 Nuclear Medicine", 5),
            SiteSpec("C03", "SITE_C03", "Site C03 Imaging", 2),
        ]
        scanners = [
            ScannerSpec("A01-1", "A01", "SIEMENS", "Biograph Vision 600", "10147", "VG80B",
                        "VG80C", station_name="PETCT01", pet_voxel_mm=(3.0, 4.0, 4.0),
                        psf_fwhm_mm=5.5, nema_fwhm_mm=7.6,
                        reconstruction_method="PSF+TOF 4i5s", convolution_kernel="XYZGAUSS4.00",
                        ct_kernel="Br38f", tm_fraction_digits=6, frame_duration_s=150),
            ScannerSpec("A01-2", "A01", "GE MEDICAL SYSTEMS", "Discovery MI", "PETMI0482",
                        "pet_dmi.43", "pet_dmi.50", station_name="DMI4R", pet_voxel_mm=(2.79, 4.0, 4.0),
                        psf_fwhm_mm=6.5, nema_fwhm_mm=7.6, reconstruction_method="VPFXS",
                        convolution_kernel="6.4 mm Gaussian", ct_kernel="STANDARD", frame_duration_s=120),
            ScannerSpec("B02-1", "B02", "Philips", "Vereos PET/CT", "760212", "2.0.2.33111",
                        "3.0.1.41020", station_name="VEREOS-B02", pet_voxel_mm=(4.0, 4.0, 4.0),
                        psf_fwhm_mm=6.5, nema_fwhm_mm=8.0, calibration_error_pct=3.0,
                        reconstruction_method="BLOB-OS-TF", convolution_kernel="SMOOTH", ct_kernel="B",
                        writes_patient_size=True, frame_duration_s=120),
            ScannerSpec("C03-1", "C03", "SIEMENS", "Biograph mCT", "30287", "VG60C", "VG62A",
                        station_name="MCT-C03", pet_voxel_mm=(3.0, 4.0, 4.0), psf_fwhm_mm=10.5,
                        nema_fwhm_mm=10.5, reconstruction_method="OSEM3D 2i21s",
                        convolution_kernel="XYZGAUSS5.00", ct_kernel="B30f",
                        tm_fraction_digits=6, accredited=False, frame_duration_s=180),
        ]
        # Phantom scans as sites send them: each scanner's NEMA phantom at its own roll,
        # handedness, axial direction and tilt (drawn from the seed), glass sphere walls, and
        # clinical noise. The NEMA PSFs above put the accredited scanners inside the EARL1 bands
        # under that noise (the narrowest margin at seed 0 is 0.03).
        phantom = PhantomSpec(rotation_deg=None, mirrored=None, axial_flip=None, tilt_deg=None,
                              sphere_wall_mm=1.0, noise_cov=(0.08, 0.12))
        return cls(sites=sites, scanners=scanners, phantom=phantom, software_change_scanner="B02-1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialSpec":
        """Build a spec from plain data (as :meth:`to_dict` gives, or YAML); missing keys
        take the defaults of the dataclass (not of :meth:`demo`)."""
        data = dict(data)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data.pop(f.name)
            if f.name == "sites":
                value = [SiteSpec(**_tuples(SiteSpec, s)) for s in value]
            elif f.name == "scanners":
                value = [ScannerSpec(**_tuples(ScannerSpec, s)) for s in value]
            elif f.name == "phantom":
                value = PhantomSpec(**_tuples(PhantomSpec, value))
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        if data:
            raise ValueError(f"unknown TrialSpec keys: {sorted(data)}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: Path | str) -> "TrialSpec":
        """Load a spec from a YAML file (same keys as :meth:`to_dict`)."""
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML data (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    def scanner(self, scanner_id: str) -> ScannerSpec:
        for s in self.scanners:
            if s.id == scanner_id:
                return s
        raise KeyError(f"no scanner {scanner_id!r} in the spec")

    def site_scanners(self, site: str) -> list[ScannerSpec]:
        return [s for s in self.scanners if s.site == site]


def _tuples(kind: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Lists in ``data`` become tuples (dataclass fields are tuples), unknown keys fail."""
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _jsonable(value: Any) -> Any:
    """Convert dataclasses, numpy scalars/arrays, tuples, paths and datetimes to JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(_jsonable_key(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable_key(key: Any) -> Any:
    # Sphere diameters are float keys (10.0): write "10" rather than "10.0".
    if isinstance(key, (float, np.floating)) and float(key).is_integer():
        return int(key)
    return key




def small_spec() -> TrialSpec:
    """The demo trial shrunk for tests: 9 subjects, coarse grids, all problems still placed,
    and a few clean visits left over."""
    spec = TrialSpec.demo()
    for site, n in zip(spec.sites, (4, 4, 1)):
        site.n_subjects = n
    spec.pet_shape = (20, 48, 48)
    for scanner in spec.scanners:
        scanner.pet_voxel_mm = (6.0, 8.0, 8.0)  # 384 mm across: the whole trunk fits
    spec.phantom = PhantomSpec(nema_shape=(20, 68, 68), cylinder_shape=(20, 44, 44),
                               voxel_mm=(5.0, 5.0, 5.0), supersample=2)
    return spec
