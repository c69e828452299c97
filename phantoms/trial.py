"""A synthetic multi-site FDG PET/CT trial with known truth.

:func:`generate_trial` writes, for a :class:`TrialSpec`, the DICOM files that sites would send a
core lab (de-identified trial PET/CT studies, NEMA IEC and uniform-cylinder phantom scans with
their fill sheets), a scanner register, and ``ground_truth.json`` recording every value written,
the true values behind them and each injected problem. The same seed gives byte-identical files
and identical UIDs; every random choice comes from one ``numpy.random.SeedSequence`` tree.

Physics, kept simple and stated:

* Patient images are SUV maps from :func:`phantoms.digital.patient_maps` converted to Bq/mL at
  the series start, ``activity = SUV * decayed_dose_bq / (weight_kg * 1000)`` with
  ``decayed_dose_bq = dose_bq * 2**(-(series_start - injection) / T_half)`` (DecayCorrection
  START), blurred with the scanner's PSF and given multiplicative noise.
* Phantom images are the fill concentrations decayed from the fill reference time to the scan
  start, times ``1 + calibration_error_pct / 100`` of the scanner, blurred with the scanner's
  phantom PSF, with correlated noise whose variance follows the activity
  (:func:`phantoms.digital.reconstruction_noise`; ``PhantomSpec.noise_cov`` is the voxel CoV of
  the background in the final image). The calibration error is applied to phantom scans only.
  The NEMA phantom's roll, handedness (mirrored ring), axial direction and tilt are the spec's,
  or drawn per scanner from the seed where the spec leaves them None (the demo does).
* Dates written to trial scans are shifted per subject by ``date_shift_days`` (DICOM PS3.15
  "retain longitudinal temporal information with modified dates"); times of day and intervals
  are kept, so uptake times and SUVs are unchanged. Phantom scans are not shifted.

Layout of ``outdir``::

    ground_truth.json
    register.yaml
    sites/<SITE>/<SUBJECT>/<visit>/PT/0001.dcm ...
    sites/<SITE>/<SUBJECT>/<visit>/CT/0001.dcm ...
    sites/<SITE>/phantoms/<scanner>-<kind>/0001.dcm ...
    sites/<SITE>/phantoms/<scanner>-<kind>.fill.yaml

``ground_truth.json`` (schema_version 1; JSON types only; datetimes ISO 8601, naive)::

    schema_version, generator, corelab_version, seed, trial_code
    spec        TrialSpec.to_dict() (TrialSpec.from_dict rebuilds it)
    register    as register.yaml: trial_code, sites [code, ae_title, name],
                scanners [id, site, manufacturer, model, serial, software_versions]
    subjects    [pseudonym, site, sex, date_shift_days, visits {visit: scanner, study_uid, ...}]
    series      one entry per series:
        kind (trial | phantom), modality (PT | CT), site, scanner, subject, visit (null for
        phantoms), path (relative folder), study_uid, series_uid, frame_of_reference_uid,
        grid {shape, voxel_mm, origin_mm}, n_files, n_planes_expected,
        missing_instance_numbers, missing_positions_mm, problems [codes],
        header {DICOM keyword: value as written, null = absent}  (DS as float, DA/TM/DT as
            the written strings, multi-valued as lists; RadionuclideTotalDose etc. from the
            RadiopharmaceuticalInformationSequence item)
        truth   (trial PT) weight_kg, height_m, sex, dose_bq, decayed_dose_bq,
                injection_datetime, series_start_datetime (both as written, i.e. shifted),
                injection_datetime_unshifted, uptake_min, suvbw_factor_g_per_bq
                (= weight_kg * 1000 / decayed_dose_bq), date_shift_days, psf_fwhm_mm,
                noise_cov, lesions [centre_mm, diameter_mm, suv, hu]
                (trial CT) date_shift_days, rescale_intercept_hu
        phantom (phantoms) kind, fill {the fill sheet}, fill_sheet (relative path), scan_start,
                decay_factor_to_scan_start, calibration_error_pct, fwhm_mm, voxel_mm, shift_mm,
                noise_cov (as drawn), noise_fwhm_mm, supersample; NEMA: rotation_deg, mirrored,
                axial_flip, tilt_deg (as drawn), sphere_wall_mm, sphere_centres_mm
                {"10": [x, y, z]}, body_centre_mm, intended_earl_result {standard, result};
                cylinder: expected_image_kbq_ml, true_image_kbq_ml
    problems    [code, series_uid, study_uid, modality, path, site, scanner, subject, visit,
                 attribute, planted_value, expected, ...]: one entry per affected series.
                Visit-level problems (scanner_not_accredited, followup_on_other_scanner,
                software_version_changed) list the PT and the CT series of the visit; the
                others list one PT series.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom.uid import generate_uid

import corelab
from corelab import dicomio
from corelab.dicomio import CtSeriesHeader, PetSeriesHeader, format_da, format_dt, format_tm
from phantoms import digital
from phantoms.geometry import NEMA_IEC_BODY

__all__ = [
    "PROBLEM_CODES",
    "SiteSpec",
    "ScannerSpec",
    "PhantomSpec",
    "TrialSpec",
    "GroundTruth",
    "generate_trial",
    "visit_activity_bq_ml",
    "GROUND_TRUTH_SCHEMA_VERSION",
]

GROUND_TRUTH_SCHEMA_VERSION = 1

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
)
# Problems that belong to one PET series; the others belong to a whole visit (PT and CT).
_SERIES_PROBLEMS = (
    "uptake_out_of_window",
    "missing_weight",
    "wrong_units",
    "dose_in_mbq",
    "patient_name_in_header",
    "missing_slice",
)
# Fictitious placeholder names (the German "John/Jane Doe"), chosen by sex.
_PLANTED_NAMES = {"F": "MUSTERMANN^ERIKA", "M": "MUSTERMANN^MAX"}

_F18_HALF_LIFE_S = dicomio.F18_HALF_LIFE_S
# NEMA IEC body phantom background (fillable body minus spheres and lung insert), mL: the
# commonly quoted 9.7 L. Used only for the phantom's total activity and "weight" in the header.
_NEMA_BACKGROUND_ML = 9700.0


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


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
        :func:`phantoms.digital.nema_iec_phantom`); None: drawn per scanner (even odds).
    tilt_deg : float or None
        NEMA phantom tilt about patient ``x``, degrees; None: drawn per scanner within +/-3 deg.
    sphere_wall_mm : float
        Cold glass wall of the NEMA spheres, mm (0 = none; real spheres about 1 mm).
    noise_cov : float or (float, float)
        Voxel coefficient of variation of the background (NEMA) or of the cylinder in the
        final image (0 = none); a pair: drawn per phantom scan within that range. The noise
        is correlated and its variance follows the activity (see
        :func:`phantoms.digital.reconstruction_noise`).
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
    problems : tuple of str
        Problems to inject (see :data:`PROBLEM_CODES`).
    problem_uptake_min : float
        Uptake time written by ``uptake_out_of_window``.
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
    patient_noise_cov: float = 0.05
    problems: tuple[str, ...] = PROBLEM_CODES
    problem_uptake_min: float = 95.0
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


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


@dataclass
class GroundTruth:
    """What :func:`generate_trial` wrote; ``to_dict()`` is the content of ground_truth.json.

    Attributes
    ----------
    outdir : Path
    data : dict
        The JSON document; its schema is in the module docstring.
    """

    outdir: Path
    data: dict[str, Any]

    @property
    def series(self) -> list[dict[str, Any]]:
        return self.data["series"]

    @property
    def problems(self) -> list[dict[str, Any]]:
        return self.data["problems"]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def series_by_uid(self, series_uid: str) -> dict[str, Any]:
        for s in self.series:
            if s["series_uid"] == series_uid:
                return s
        raise KeyError(series_uid)

    @classmethod
    def load(cls, outdir: Path | str) -> "GroundTruth":
        outdir = Path(outdir)
        return cls(outdir, json.loads((outdir / "ground_truth.json").read_text()))


# --------------------------------------------------------------------------------------------
# Plan: every random choice, made before any file is written
# --------------------------------------------------------------------------------------------


@dataclass
class _Visit:
    subject: str
    site: str
    visit: str
    visit_index: int
    scanner: str
    sex: str
    age_y: int
    weight_kg: float
    height_m: float
    dose_bq: float
    injection: dt.datetime  # true (unshifted)
    uptake_min: float
    date_shift_days: int
    lesions: list[digital.Lesion]
    seed_key: tuple[int, ...]
    problems: list[str] = field(default_factory=list)

    @property
    def series_start(self) -> dt.datetime:
        return self.injection + dt.timedelta(seconds=round(self.uptake_min * 60.0))


def _uid(seed: int, *parts: Any) -> str:
    return str(generate_uid(entropy_srcs=["corelab-synth", str(seed), *map(str, parts)]))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _weekday(day: dt.date) -> dt.date:
    while day.weekday() >= 5:  # sites do not scan trial patients at weekends
        day += dt.timedelta(days=1)
    return day


def _plan_subjects(spec: TrialSpec, seed: int) -> list[_Visit]:
    visits: list[_Visit] = []
    first_day = dt.date.fromisoformat(spec.first_scan_date)
    for site_index, site in enumerate(spec.sites):
        scanners = spec.site_scanners(site.code)
        if not scanners:
            raise ValueError(f"site {site.code} has no scanner in the spec")
        for n in range(site.n_subjects):
            rng = _rng(seed, 1, site_index, n)
            subject = f"{spec.pseudonym_prefix}-{site.code}-{n + 1:03d}"
            home = scanners[n % len(scanners)]
            sex = "F" if rng.random() < 0.5 else "M"
            age_y = int(rng.integers(38, 80))
            weight0 = float(np.round(rng.uniform(*spec.weight_kg), 1))
            height = float(np.round(rng.uniform(1.52, 1.70) if sex == "F" else rng.uniform(1.64, 1.92), 2))
            shift = int(rng.integers(spec.date_shift_days[0], spec.date_shift_days[1] + 1))
            base_day = _weekday(first_day + dt.timedelta(days=int(rng.integers(0, spec.enrolment_days))))
            lo, hi = spec.uptake_limits_min
            uptake0 = float(np.clip(rng.normal(*spec.uptake_min), lo + 0.5, hi - 0.5))
            lesion_rng = _rng(seed, 2, site_index, n)
            lesions = _draw_lesions(lesion_rng)
            day = base_day
            for v_index, visit in enumerate(spec.visits):
                if v_index == 0:
                    uptake = uptake0
                    weight = weight0
                    v_lesions = lesions
                else:
                    gap_days = int(rng.integers(spec.followup_days[0], spec.followup_days[1] + 1))
                    day = _weekday(base_day + dt.timedelta(days=gap_days))
                    delta = spec.followup_uptake_max_delta_min
                    uptake = float(np.clip(uptake0 + rng.uniform(-delta, delta), lo + 0.5, hi - 0.5))
                    weight = float(np.round(np.clip(weight0 + rng.uniform(-3.0, 1.5),
                                                    *spec.weight_kg), 1))
                    # A response trial: lesions shrink in SUV at follow-up, by varying amounts.
                    v_lesions = [
                        dataclasses.replace(les, suv=float(np.round(les.suv * rng.uniform(0.3, 1.1), 2)))
                        for les in lesions
                    ]
                injection = dt.datetime.combine(day, dt.time(8, 0)) + dt.timedelta(
                    seconds=int(rng.integers(0, 5 * 3600)))
                dose_mbq = np.clip(weight * rng.uniform(*spec.dose_mbq_per_kg), *spec.dose_mbq_limits)
                visits.append(_Visit(
                    subject=subject, site=site.code, visit=visit, visit_index=v_index,
                    scanner=home.id, sex=sex, age_y=age_y + (day - base_day).days // 365,
                    weight_kg=weight, height_m=height,
                    # Dose calibrators read to 0.1 MBq; keep the Bq value an exact integer.
                    dose_bq=float(round(float(dose_mbq) * 10.0) * 100_000),
                    injection=injection, uptake_min=round(uptake * 60.0) / 60.0,
                    date_shift_days=shift, lesions=list(v_lesions),
                    seed_key=(3, site_index, n, v_index),
                ))
    return visits


def _draw_lesions(rng: np.random.Generator) -> list[digital.Lesion]:
    """Three lesions (liver, right lung, left lung) in the frame of a grid centred at 0 mm.

    Same recipe as ``phantoms.digital`` uses for its default lesions; drawn here so that the
    baseline and follow-up of a subject share the lesion positions.
    """
    sites = [((-65.0, 0.0, -45.0), (30.0, 25.0, 20.0)), ((-85.0, -5.0, 70.0), (15.0, 25.0, 15.0)),
             ((85.0, -5.0, 70.0), (15.0, 25.0, 15.0))]
    out = []
    for centre, spread in sites:
        pos = np.asarray(centre) + rng.uniform(-1.0, 1.0, 3) * np.asarray(spread)
        out.append(digital.Lesion(
            centre_mm=tuple(float(np.round(v, 2)) for v in pos),
            diameter_mm=float(rng.choice([10.0, 15.0, 20.0, 30.0])),
            suv=float(np.round(rng.uniform(4.0, 12.0), 2)),
        ))
    return out


def _place_problems(spec: TrialSpec, visits: list[_Visit], seed: int) -> None:
    """Mark visits with problems: each on distinct visits, so each can be found alone."""
    wanted = set(spec.problems)
    unknown = wanted - set(PROBLEM_CODES)
    if unknown:
        raise ValueError(f"unknown problem codes {sorted(unknown)}; known: {list(PROBLEM_CODES)}")
    rng = _rng(seed, 4)
    by_subject: dict[str, list[_Visit]] = {}
    for v in visits:
        by_subject.setdefault(v.subject, []).append(v)

    if "scanner_not_accredited" in wanted:
        bad = [v for v in visits if not spec.scanner(v.scanner).accredited]
        if not bad:
            raise ValueError("scanner_not_accredited needs a scanner with accredited: false "
                             "that has subjects")
        for v in bad:
            v.problems.append("scanner_not_accredited")
    elif any(not spec.scanner(v.scanner).accredited for v in visits):
        raise ValueError("a scanner is not accredited but scanner_not_accredited is not wanted")

    def clean(v: _Visit) -> bool:
        return not v.problems and spec.scanner(v.scanner).accredited

    if "followup_on_other_scanner" in wanted:
        chosen = None
        for subject, vs in by_subject.items():
            site_scanners = spec.site_scanners(vs[0].site)
            if len(site_scanners) > 1 and len(vs) > 1 and vs[0].scanner == site_scanners[0].id \
                    and clean(vs[1]):
                chosen = vs[1]
                chosen.scanner = site_scanners[1].id
                break
        if chosen is None:
            raise ValueError("followup_on_other_scanner needs a site with two scanners and a "
                             "subject with a follow-up")
        chosen.problems.append("followup_on_other_scanner")

    if "software_version_changed" in wanted:
        # The latest follow-up on the scanner: the upgrade happened shortly before it.
        ids = ([spec.software_change_scanner] if spec.software_change_scanner
               else [s.id for s in spec.scanners if s.software_after_upgrade and s.accredited])
        target = None
        for sid in ids:
            later = [v for v in visits if v.scanner == sid and v.visit_index > 0 and clean(v)]
            if later:
                target = max(later, key=lambda v: (v.injection, v.subject))
                break
        if target is None or not spec.scanner(target.scanner).software_after_upgrade:
            raise ValueError("software_version_changed needs a clean follow-up on a scanner "
                             f"with software_after_upgrade (tried {ids})")
        target.problems.append("software_version_changed")

    series_problems = [p for p in _SERIES_PROBLEMS if p in wanted]
    candidates = [v for v in visits if clean(v)]
    order = rng.permutation(len(candidates))
    candidates = [candidates[i] for i in order]
    # Subjects that already carry a visit-level problem come last, to spread the problems out.
    used_subjects: dict[str, int] = {v.subject: 1 for v in visits if v.problems}
    for code in series_problems:
        pool = candidates
        if code == "uptake_out_of_window":
            # On a follow-up, so the consequent "differs from baseline uptake" finding falls on
            # the same series and the baseline stays clean.
            pool = [v for v in candidates if v.visit_index > 0]
        pool = [v for v in pool if not v.problems]
        if not pool:
            raise ValueError(f"no clean visit left for problem {code}: add subjects to the spec")
        pick = min(pool, key=lambda v: used_subjects.get(v.subject, 0))
        pick.problems.append(code)
        used_subjects[pick.subject] = used_subjects.get(pick.subject, 0) + 1
        if code == "uptake_out_of_window":
            pick.uptake_min = spec.problem_uptake_min


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _decay_factor(elapsed_s: float, half_life_s: float = _F18_HALF_LIFE_S) -> float:
    """Fraction of F-18 activity left after ``elapsed_s`` seconds."""
    return 2.0 ** (-elapsed_s / half_life_s)


def _pet_grid(spec: TrialSpec, scanner: ScannerSpec) -> digital.Grid:
    # Centred at the origin for every scanner, so a subject's lesions are at the same place.
    return digital.Grid.centred(spec.pet_shape, scanner.pet_voxel_mm, (0.0, 0.0, 0.0))


def _visit_truth(v: _Visit) -> dict[str, float]:
    elapsed_s = (v.series_start - v.injection).total_seconds()
    decayed_dose_bq = v.dose_bq * _decay_factor(elapsed_s)
    return {
        "decayed_dose_bq": decayed_dose_bq,
        "suvbw_factor_g_per_bq": v.weight_kg * 1000.0 / decayed_dose_bq,
    }


def _visit_images(
    spec: TrialSpec, v: _Visit, seed: int
) -> tuple[digital.Grid, np.ndarray, np.ndarray, np.ndarray]:
    """Grid, PET activity (Bq/mL at series start), CT (HU) and true SUV map of one visit."""
    scanner = spec.scanner(v.scanner)
    grid = _pet_grid(spec, scanner)
    rng = _rng(seed, *v.seed_key)
    maps = digital.patient_maps(grid, rng=rng, lesions=v.lesions)
    bq_ml_per_suv = 1.0 / _visit_truth(v)["suvbw_factor_g_per_bq"]  # g/mL tissue density 1
    activity = digital.blur_fwhm(maps.suv.astype(np.float64) * bq_ml_per_suv, grid.voxel_mm,
                                 scanner.psf_fwhm_mm)
    if spec.patient_noise_cov > 0:
        activity = digital.add_noise(activity, rng=rng, cov=spec.patient_noise_cov)
    return grid, np.asarray(activity, dtype=np.float64), maps.hu, maps.suv


def visit_activity_bq_ml(spec: TrialSpec, seed: int, subject: str, visit: str) -> np.ndarray:
    """Recompute the PET activity (Bq/mL) written for one visit, for tests.

    Returns
    -------
    ndarray of shape (planes, rows, cols), float64
    """
    visits = _plan_subjects(spec, seed)
    _place_problems(spec, visits, seed)
    for v in visits:
        if v.subject == subject and v.visit == visit:
            return _visit_images(spec, v, seed)[1]
    raise KeyError(f"no visit {visit!r} of subject {subject!r}")


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------


def _pet_header_values(h: PetSeriesHeader) -> dict[str, Any]:
    """The PET header values as written, in the types a pydicom reader compares against."""
    frac = h.tm_fraction_digits
    rp = dict(h.radiopharm_extra)
    values = {
        "Modality": "PT",
        "PatientName": h.patient_name,
        "PatientID": h.patient_id,
        "PatientSex": h.patient_sex,
        "PatientWeight": h.patient_weight_kg,
        "PatientSize": h.patient_size_m,
        "PatientAge": h.patient_age,
        "PatientIdentityRemoved": None if h.patient_identity_removed is None
        else ("YES" if h.patient_identity_removed else "NO"),
        "StudyDate": format_da(h.study_datetime),
        "StudyTime": format_tm(h.study_datetime, fraction_digits=frac),
        "SeriesDate": format_da(h.series_datetime),
        "SeriesTime": format_tm(h.series_datetime, fraction_digits=frac),
        "AcquisitionDate": format_da(h.acquisition),
        "AcquisitionTime": format_tm(h.acquisition, fraction_digits=frac),
        "Units": h.units,
        "DecayCorrection": h.decay_correction,
        "CorrectedImage": list(h.corrected_image),
        "RadionuclideTotalDose": rp.get("RadionuclideTotalDose", h.dose_bq),
        "RadionuclideHalfLife": h.half_life_s,
        "RadiopharmaceuticalStartTime": None if h.injection_datetime is None
        else format_tm(h.injection_datetime, fraction_digits=frac),
        "RadiopharmaceuticalStartDateTime": None if h.injection_datetime is None
        else format_dt(h.injection_datetime, fraction_digits=frac),
        "ActualFrameDuration": int(h.frame_duration_ms),
        "Manufacturer": h.manufacturer,
        "ManufacturerModelName": h.model,
        "DeviceSerialNumber": h.device_serial_number,
        "SoftwareVersions": h.software_versions,
        "StationName": h.station_name,
        "ReconstructionMethod": h.reconstruction_method,
        "ConvolutionKernel": h.convolution_kernel,
    }
    values.update({k: v for k, v in h.extra.items()})
    return values


def _ct_header_values(h: CtSeriesHeader) -> dict[str, Any]:
    frac = h.tm_fraction_digits
    return {
        "Modality": "CT",
        "PatientName": h.patient_name,
        "PatientID": h.patient_id,
        "PatientSex": h.patient_sex,
        "PatientWeight": h.patient_weight_kg,
        "PatientIdentityRemoved": "YES" if h.patient_identity_removed else None,
        "StudyDate": format_da(h.study_datetime),
        "StudyTime": format_tm(h.study_datetime, fraction_digits=frac),
        "SeriesDate": format_da(h.series_datetime),
        "SeriesTime": format_tm(h.series_datetime, fraction_digits=frac),
        "Manufacturer": h.manufacturer,
        "ManufacturerModelName": h.model,
        "DeviceSerialNumber": h.device_serial_number,
        "SoftwareVersions": h.software_versions,
        "KVP": h.kvp,
        "ConvolutionKernel": h.convolution_kernel,
    }


def _equipment(scanner: ScannerSpec, software: str | None = None) -> dict[str, Any]:
    return {
        "manufacturer": scanner.manufacturer,
        "model": scanner.model,
        "device_serial_number": scanner.serial,
        "software_versions": software or scanner.software,
        "station_name": scanner.station_name,
        "tm_fraction_digits": scanner.tm_fraction_digits,
    }


def _trial_headers(spec: TrialSpec, v: _Visit, seed: int) -> tuple[PetSeriesHeader, CtSeriesHeader, dict]:
    scanner = spec.scanner(v.scanner)
    shift = dt.timedelta(days=v.date_shift_days)
    series_start = v.series_start + shift
    ct_start = series_start - dt.timedelta(minutes=3)  # the CT runs just before the PET
    software = scanner.software_after_upgrade if "software_version_changed" in v.problems else None
    site = next(s for s in spec.sites if s.code == v.site)
    common = dict(
        study_uid=_uid(seed, "study", v.subject, v.visit),
        frame_of_reference_uid=_uid(seed, "for", v.subject, v.visit),
        patient_name=v.subject,
        patient_id=v.subject,
        patient_sex=v.sex,
        patient_age=f"{v.age_y:03d}Y",
        patient_weight_kg=v.weight_kg,
        patient_size_m=v.height_m if scanner.writes_patient_size else None,
        study_datetime=ct_start,
        study_id=f"{v.visit_index + 1}",
        accession_number=None,
        study_description=f"{spec.trial_code} {v.visit} PET/CT",
        institution_name=None,
        clinical_trial_sponsor=spec.sponsor,
        clinical_trial_protocol_id=spec.trial_code,
        clinical_trial_protocol_name=spec.trial_name,
        clinical_trial_site_id=site.code,
        clinical_trial_site_name=site.name,
        clinical_trial_subject_id=v.subject,
        clinical_trial_time_point_id=v.visit,
        clinical_trial_time_point_description=(
            "Baseline" if v.visit_index == 0 else f"Follow-up {v.visit_index}"),
        **_equipment(scanner, software),
    )
    pet = PetSeriesHeader(
        **common,
        series_uid=_uid(seed, "series", v.subject, v.visit, "PT"),
        series_datetime=series_start,
        series_number=3,
        series_description="PET WB AC",
        injection_datetime=v.injection + shift,
        dose_bq=v.dose_bq,
        units="BQML",
        frame_duration_ms=scanner.frame_duration_s * 1000,
        reconstruction_method=scanner.reconstruction_method,
        convolution_kernel=scanner.convolution_kernel,
    )
    # Header-level problems touch the PET series only; the CT keeps the clean values.
    if "missing_weight" in v.problems:
        pet.patient_weight_kg = None
    if "wrong_units" in v.problems:
        pet.units = "CNTS"  # and no vendor scale factor
    if "dose_in_mbq" in v.problems:
        pet.dose_bq = v.dose_bq / 1e6  # MBq in a classic PET header, where Bq is required
    if "patient_name_in_header" in v.problems:
        pet.patient_name = _PLANTED_NAMES[v.sex]
    ct = CtSeriesHeader(
        **common,
        series_uid=_uid(seed, "series", v.subject, v.visit, "CT"),
        series_datetime=ct_start,
        series_number=2,
        series_description="CT WB LD",
        convolution_kernel=scanner.ct_kernel,
    )
    return pet, ct, {"series_start": series_start, "injection": v.injection + shift}


def _phantom_header(spec: TrialSpec, scanner: ScannerSpec, kind: str, seed: int,
                    reference: dt.datetime, scan_start: dt.datetime, dose_bq: float,
                    volume_ml: float) -> PetSeriesHeader:
    label = "NEMA" if kind == "nema_iec" else "CYLINDER"
    return PetSeriesHeader(
        study_uid=_uid(seed, "study", scanner.id, kind),
        series_uid=_uid(seed, "series", scanner.id, kind),
        frame_of_reference_uid=_uid(seed, "for", scanner.id, kind),
        patient_name=f"PHANTOM^{label}",
        patient_id=f"{scanner.id}-{label}",
        patient_sex="O",
        # Sites enter the water mass as the weight, so SUV = 1 means "as filled".
        patient_weight_kg=round(volume_ml / 1000.0, 3),
        study_datetime=scan_start,
        series_datetime=scan_start,
        series_number=1,
        study_description=f"{spec.trial_code} phantom QC",
        series_description="NEMA IEC IQ" if kind == "nema_iec" else "Uniform cylinder calibration",
        patient_identity_removed=None,  # a phantom: nothing to de-identify
        injection_datetime=reference,
        dose_bq=round(dose_bq, 0),
        frame_duration_ms=600_000 if kind == "nema_iec" else 300_000,
        series_type=("STATIC", "IMAGE"),
        reconstruction_method=scanner.reconstruction_method,
        convolution_kernel=scanner.convolution_kernel,
        **_equipment(scanner),
    )


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _rel(outdir: Path, path: Path) -> str:
    return path.relative_to(outdir).as_posix()


def _problem_entry(code: str, v: _Visit, series: dict[str, Any], **details: Any) -> dict[str, Any]:
    return {
        "code": code,
        "series_uid": series["series_uid"],
        "study_uid": series["study_uid"],
        "modality": series["modality"],
        "path": series["path"],
        "site": v.site,
        "scanner": v.scanner,
        "subject": v.subject,
        "visit": v.visit,
        **details,
    }


def _problem_details(code: str, v: _Visit, spec: TrialSpec, pet: PetSeriesHeader,
                     baseline_scanner: str | None) -> dict[str, Any]:
    scanner = spec.scanner(v.scanner)
    if code == "scanner_not_accredited":
        return {"attribute": "DeviceSerialNumber", "planted_value": scanner.serial,
                "expected": "a scanner accredited for the trial",
                "note": f"scanner {scanner.id}'s NEMA IEC phantom is made with a "
                        f"{scanner.nema_fwhm_mm} mm PSF and fails EARL"}
    if code == "followup_on_other_scanner":
        base = spec.scanner(baseline_scanner) if baseline_scanner else None
        return {"attribute": "DeviceSerialNumber", "planted_value": scanner.serial,
                "expected": base.serial if base else None,
                "baseline_scanner": baseline_scanner}
    if code == "software_version_changed":
        return {"attribute": "SoftwareVersions", "planted_value": scanner.software_after_upgrade,
                "expected": scanner.software}
    if code == "uptake_out_of_window":
        return {"attribute": "RadiopharmaceuticalStartDateTime", "planted_value": v.uptake_min,
                "expected": list(spec.uptake_limits_min),
                "unit": "min",
                "related_checks": ["followup_uptake_differs_from_baseline"]}
    if code == "missing_weight":
        return {"attribute": "PatientWeight", "planted_value": None, "expected": v.weight_kg}
    if code == "wrong_units":
        return {"attribute": "Units", "planted_value": "CNTS", "expected": "BQML",
                "note": "no vendor scale factor is written; pixel values are Bq/mL"}
    if code == "dose_in_mbq":
        return {"attribute": "RadionuclideTotalDose", "planted_value": pet.dose_bq,
                "expected": v.dose_bq, "unit": "Bq"}
    if code == "patient_name_in_header":
        return {"attribute": "PatientName", "planted_value": pet.patient_name,
                "expected": v.subject}
    if code == "missing_slice":
        return {}  # filled in by the writer, which knows the plane left out
    raise KeyError(code)


def _write_visit(outdir: Path, spec: TrialSpec, v: _Visit, seed: int,
                 baseline_scanner: str | None) -> tuple[list[dict], list[dict]]:
    scanner = spec.scanner(v.scanner)
    grid, activity, hu, _ = _visit_images(spec, v, seed)
    pet, ct, when = _trial_headers(spec, v, seed)
    visit_dir = outdir / "sites" / v.site / v.subject / v.visit
    n_planes = grid.shape[0]
    omit = [n_planes // 2] if "missing_slice" in v.problems else []
    pet_paths = dicomio.write_pet_series(visit_dir / "PT", activity, grid, pet, omit_planes=omit)
    ct_paths = dicomio.write_ct_series(visit_dir / "CT", hu, grid, ct)
    truth = _visit_truth(v)
    true_values = {
        "weight_kg": v.weight_kg,
        "height_m": v.height_m,
        "sex": v.sex,
        "dose_bq": v.dose_bq,
        "decayed_dose_bq": truth["decayed_dose_bq"],
        "injection_datetime": when["injection"].isoformat(),
        "series_start_datetime": when["series_start"].isoformat(),
        "injection_datetime_unshifted": v.injection.isoformat(),
        "uptake_min": v.uptake_min,
        "suvbw_factor_g_per_bq": truth["suvbw_factor_g_per_bq"],
        "date_shift_days": v.date_shift_days,
        "psf_fwhm_mm": scanner.psf_fwhm_mm,
        "noise_cov": spec.patient_noise_cov,
        "units_of_pixels": "BQML",
        "lesions": [_jsonable(les) for les in v.lesions],
    }
    geometry = {"shape": list(grid.shape), "voxel_mm": list(grid.voxel_mm),
                "origin_mm": list(grid.origin_mm)}
    common = {
        "kind": "trial", "site": v.site, "scanner": v.scanner, "subject": v.subject,
        "visit": v.visit, "study_uid": pet.study_uid,
        "frame_of_reference_uid": pet.frame_of_reference_uid, "grid": geometry,
    }
    pet_entry = {
        **common, "modality": "PT", "path": _rel(outdir, visit_dir / "PT"),
        "series_uid": pet.series_uid, "n_files": len(pet_paths), "n_planes_expected": n_planes,
        "missing_instance_numbers": [p + 1 for p in omit],
        "missing_positions_mm": [grid.origin_mm[2] + p * grid.voxel_mm[0] for p in omit],
        "header": _jsonable(_pet_header_values(pet)), "truth": true_values, "problems": [],
    }
    ct_entry = {
        **common, "modality": "CT", "path": _rel(outdir, visit_dir / "CT"),
        "series_uid": ct.series_uid, "n_files": len(ct_paths), "n_planes_expected": n_planes,
        "missing_instance_numbers": [], "missing_positions_mm": [],
        "header": _jsonable(_ct_header_values(ct)),
        "truth": {"date_shift_days": v.date_shift_days, "rescale_intercept_hu": -1024.0},
        "problems": [],
    }
    problems = []
    for code in v.problems:
        targets = [pet_entry] if code in _SERIES_PROBLEMS else [pet_entry, ct_entry]
        details = _problem_details(code, v, spec, pet, baseline_scanner)
        if code == "missing_slice":
            details = {"attribute": "NumberOfSlices", "planted_value": len(pet_paths),
                       "expected": n_planes, "missing_instance_numbers": [p + 1 for p in omit]}
        for entry in targets:
            entry["problems"].append(code)
            problems.append(_problem_entry(code, v, entry, **details))
    return [pet_entry, ct_entry], problems


def _phantom_pose(ps: PhantomSpec, seed: int, scanner_index: int) -> dict[str, Any]:
    """One scanner's NEMA phantom pose: the spec's values, those left None drawn from the seed
    (roll over the full circle, either handedness and axial direction, tilt within +/-3 deg)."""
    rng = _rng(seed, 6, scanner_index)
    drawn = {"rotation_deg": round(float(rng.uniform(0.0, 360.0)), 1),
             "mirrored": bool(rng.integers(2)),
             "axial_flip": bool(rng.integers(2)),
             "tilt_deg": round(float(rng.uniform(-3.0, 3.0)), 1)}
    return {k: v if getattr(ps, k) is None else getattr(ps, k) for k, v in drawn.items()}


def _noise_cov(ps: PhantomSpec, rng: np.random.Generator) -> float:
    """The phantom scan's noise CoV: the spec's value, or drawn within its range."""
    if isinstance(ps.noise_cov, (tuple, list)):
        low, high = ps.noise_cov
        return round(float(rng.uniform(low, high)), 3)
    return float(ps.noise_cov)


def _write_phantom(outdir: Path, spec: TrialSpec, scanner: ScannerSpec, kind: str, seed: int,
                   day: dt.date) -> dict[str, Any]:
    ps = spec.phantom
    rng = _rng(seed, 5, spec.scanners.index(scanner), 0 if kind == "nema_iec" else 1)
    reference = dt.datetime.combine(day, dt.time(9, 0)) + dt.timedelta(
        minutes=int(rng.integers(0, 120)))
    scan_start = reference + dt.timedelta(minutes=round(float(rng.uniform(*ps.scan_delay_min)), 0))
    decay = _decay_factor((scan_start - reference).total_seconds())
    scale = decay * (1.0 + scanner.calibration_error_pct / 100.0)
    site_dir = outdir / "sites" / scanner.site / "phantoms"
    series_dir = site_dir / f"{scanner.id}-{kind}"
    noise_cov = _noise_cov(ps, rng)
    truth: dict[str, Any] = {"kind": kind, "decay_factor_to_scan_start": decay,
                             "calibration_error_pct": scanner.calibration_error_pct,
                             "voxel_mm": list(ps.voxel_mm), "shift_mm": list(ps.shift_mm),
                             "noise_cov": noise_cov, "noise_fwhm_mm": ps.noise_fwhm_mm,
                             "supersample": ps.supersample}
    if kind == "nema_iec":
        grid = digital.Grid.centred(ps.nema_shape, ps.voxel_mm, (0.0, 0.0, NEMA_IEC_BODY.sphere_plane_z_mm))
        pose = _phantom_pose(ps, seed, spec.scanners.index(scanner))
        phantom = digital.nema_iec_phantom(
            grid, sphere_kbq_ml=ps.sphere_kbq_ml * scale, background_kbq_ml=ps.background_kbq_ml * scale,
            lung_kbq_ml=0.0, shift_mm=ps.shift_mm, sphere_wall_mm=ps.sphere_wall_mm,
            supersample=ps.supersample, **pose)
        kbq_ml = phantom.activity_kbq_ml
        fwhm_mm = scanner.nema_fwhm_mm
        noise_level_kbq_ml = ps.background_kbq_ml * scale
        spheres_ml = sum(NEMA_IEC_BODY.sphere_volumes_ml.values())
        volume_ml = _NEMA_BACKGROUND_ML
        dose_bq = 1000.0 * (ps.background_kbq_ml * volume_ml + ps.sphere_kbq_ml * spheres_ml)
        fill = {"kind": kind, "scanner": scanner.id, "site": scanner.site,
                "sphere_kbq_ml": ps.sphere_kbq_ml, "background_kbq_ml": ps.background_kbq_ml,
                "lung_kbq_ml": 0.0}
        truth.update({**pose, "sphere_wall_mm": ps.sphere_wall_mm,
                      "sphere_centres_mm": _jsonable(phantom.sphere_centres_mm),
                      "body_centre_mm": list(phantom.body_centre_mm),
                      # Intent, not a computed verdict: with a Gaussian PSF and little noise in
                      # the spheres RCmax stays near or below 1, so only EARL1 can pass; a
                      # 10.5 mm PSF fails EARL1 for 10-17 mm spheres.
                      "intended_earl_result": {"standard": "EARL1",
                                               "result": "pass" if scanner.accredited else "fail"}})
    else:
        grid = digital.Grid.centred(ps.cylinder_shape, ps.voxel_mm, (0.0, 0.0, 0.0))
        kbq_ml = digital.uniform_cylinder(
            grid, concentration_kbq_ml=ps.cylinder_kbq_ml * scale, radius_mm=ps.cylinder_radius_mm,
            length_mm=ps.cylinder_length_mm, shift_mm=ps.shift_mm, supersample=ps.supersample)
        fwhm_mm = scanner.psf_fwhm_mm
        noise_level_kbq_ml = ps.cylinder_kbq_ml * scale
        volume_ml = math.pi * (ps.cylinder_radius_mm / 10.0) ** 2 * ps.cylinder_length_mm / 10.0
        dose_bq = 1000.0 * ps.cylinder_kbq_ml * volume_ml
        fill = {"kind": kind, "scanner": scanner.id, "site": scanner.site,
                "concentration_kbq_ml": ps.cylinder_kbq_ml,
                "radius_mm": ps.cylinder_radius_mm, "length_mm": ps.cylinder_length_mm}
        truth.update({"expected_image_kbq_ml": ps.cylinder_kbq_ml * scale,
                      "true_image_kbq_ml": ps.cylinder_kbq_ml * decay})
    fill.update({"reference_time": reference.isoformat(), "radionuclide": "F-18",
                 "half_life_s": _F18_HALF_LIFE_S, "volume_ml": round(volume_ml, 1),
                 "total_activity_bq": round(dose_bq, 0)})
    image_kbq_ml = digital.blur_fwhm(kbq_ml, grid.voxel_mm, fwhm_mm)
    if noise_cov > 0:
        image_kbq_ml = digital.reconstruction_noise(image_kbq_ml, grid.voxel_mm, rng=rng, cov=noise_cov,
                                                    level_kbq_ml=noise_level_kbq_ml, fwhm_mm=ps.noise_fwhm_mm)
    activity = image_kbq_ml.astype(np.float64) * 1000.0
    header = _phantom_header(spec, scanner, kind, seed, reference, scan_start, dose_bq, volume_ml)
    paths = dicomio.write_pet_series(series_dir, activity, grid, header)
    fill_path = site_dir / f"{scanner.id}-{kind}.fill.yaml"
    fill_path.write_text(yaml.safe_dump(fill, sort_keys=False))
    truth.update({"fwhm_mm": fwhm_mm, "scan_start": scan_start.isoformat(),
                  "fill_sheet": _rel(outdir, fill_path), "fill": fill})
    return {
        "kind": "phantom", "modality": "PT", "site": scanner.site, "scanner": scanner.id,
        "subject": None, "visit": None, "path": _rel(outdir, series_dir),
        "study_uid": header.study_uid, "series_uid": header.series_uid,
        "frame_of_reference_uid": header.frame_of_reference_uid,
        "grid": {"shape": list(grid.shape), "voxel_mm": list(grid.voxel_mm),
                 "origin_mm": list(grid.origin_mm)},
        "n_files": len(paths), "n_planes_expected": grid.shape[0],
        "missing_instance_numbers": [], "missing_positions_mm": [],
        "header": _jsonable(_pet_header_values(header)), "phantom": truth, "problems": [],
    }


def _register(spec: TrialSpec) -> dict[str, Any]:
    return {
        "trial_code": spec.trial_code,
        "trial_name": spec.trial_name,
        "sites": [{"code": s.code, "ae_title": s.ae_title, "name": s.name} for s in spec.sites],
        "scanners": [{"id": s.id, "site": s.site, "manufacturer": s.manufacturer,
                      "model": s.model, "serial": s.serial, "software_versions": s.software}
                     for s in spec.scanners],
    }


def generate_trial(outdir: Path | str, spec: TrialSpec, *, seed: int = 0) -> GroundTruth:
    """Write a synthetic trial (DICOM, fill sheets, register, ground truth) into ``outdir``.

    Parameters
    ----------
    outdir : path
        Created if needed; must not already hold a ``ground_truth.json`` or ``sites`` folder.
    spec : TrialSpec
    seed : int
        Everything random, and every UID, derives from it: the same seed and spec give
        byte-identical files.

    Returns
    -------
    GroundTruth
        Also written to ``outdir/ground_truth.json``.
    """
    outdir = Path(outdir)
    if (outdir / "ground_truth.json").exists() or (outdir / "sites").exists():
        raise FileExistsError(f"{outdir} already holds a generated trial; use an empty directory")
    outdir.mkdir(parents=True, exist_ok=True)
    visits = _plan_subjects(spec, seed)
    _place_problems(spec, visits, seed)

    series: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    phantom_day = dt.date.fromisoformat(spec.first_scan_date) - dt.timedelta(
        days=spec.phantom.days_before_trial)
    for scanner in spec.scanners:
        for kind in ("nema_iec", "uniform_cylinder"):
            series.append(_write_phantom(outdir, spec, scanner, kind, seed, _weekday(phantom_day)))
    baseline_scanner: dict[str, str] = {}
    subjects: dict[str, dict[str, Any]] = {}
    for v in visits:
        if v.visit_index == 0:
            baseline_scanner[v.subject] = v.scanner
        entries, found = _write_visit(outdir, spec, v, seed, baseline_scanner.get(v.subject))
        series.extend(entries)
        problems.extend(found)
        subj = subjects.setdefault(v.subject, {
            "pseudonym": v.subject, "site": v.site, "sex": v.sex,
            "date_shift_days": v.date_shift_days, "visits": {}})
        subj["visits"][v.visit] = {"scanner": v.scanner, "study_uid": entries[0]["study_uid"],
                                   "uptake_min": v.uptake_min, "weight_kg": v.weight_kg}

    data = {
        "schema_version": GROUND_TRUTH_SCHEMA_VERSION,
        "generator": "phantoms.trial.generate_trial",
        "corelab_version": corelab.__version__,
        "seed": seed,
        "spec": spec.to_dict(),
        "trial_code": spec.trial_code,
        "register": _register(spec),
        "subjects": list(subjects.values()),
        "series": series,
        "problems": problems,
    }
    data = _jsonable(data)
    (outdir / "register.yaml").write_text(yaml.safe_dump(_register(spec), sort_keys=False))
    (outdir / "ground_truth.json").write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return GroundTruth(outdir, data)
