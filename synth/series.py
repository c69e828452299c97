"""Generating a synthetic trial's series: the plan of subjects and visits, their images, their headers.

Every random choice is made in the plan, before any file is written, from one
``numpy.random.SeedSequence`` tree (:func:`_rng`); UIDs derive from the seed (:func:`_uid`).
Patient images are SUV maps from :func:`synth.patient.patient_maps` converted to Bq/mL at the
series start, blurred with the scanner's PSF and given correlated noise whose variance follows
the activity; the image problems (:func:`_image_problems`) then act on the pixels; headers are
:class:`synth.dicom_header.PetSeriesHeader` / :class:`~synth.dicom_header.CtSeriesHeader`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from corelab.grid import Grid
from synth.dicom_header import F18_HALF_LIFE_S, CtSeriesHeader, PetSeriesHeader, format_da, format_dt, format_tm
from synth.imaging import blur_fwhm, reconstruction_noise
from synth.patient import LIVER_SUV, Lesion, patient_maps
from synth.spec import ScannerSpec, TrialSpec

# Fictitious placeholder names (the German "John/Jane Doe"), chosen by sex.
# Each part at least 6 letters: the leak tests search every stored byte (pixel data and base64
# figures included) for each part, and a 3-letter part ("MAX") turns up there by chance.
_PLANTED_NAMES = {"F": "MUSTERMANN^ERIKA", "M": "MUSTERMANN^MAXIMILIAN"}


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
    lesions: list[Lesion]
    seed_key: tuple[int, ...]
    problems: list[str] = field(default_factory=list)
    # Set by the image problems when placed (synth.problems): the patient's move between CT and
    # PET (CT minus PET, patient x, y, z in mm) and the failed bed position's planes [start, stop).
    ct_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bed_gap_planes: tuple[int, int] | None = None

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


def _draw_lesions(rng: np.random.Generator) -> list[Lesion]:
    """Three lesions (liver, right lung, left lung) in the frame of a grid centred at 0 mm.

    Same recipe as ``synth.patient`` uses for its default lesions; drawn here so that the
    baseline and follow-up of a subject share the lesion positions.
    """
    sites = [((-65.0, 0.0, -45.0), (30.0, 25.0, 20.0)), ((-85.0, -5.0, 70.0), (15.0, 25.0, 15.0)),
             ((85.0, -5.0, 70.0), (15.0, 25.0, 15.0))]
    out = []
    for centre, spread in sites:
        pos = np.asarray(centre) + rng.uniform(-1.0, 1.0, 3) * np.asarray(spread)
        out.append(Lesion(
            centre_mm=tuple(float(np.round(v, 2)) for v in pos),
            diameter_mm=float(rng.choice([10.0, 15.0, 20.0, 30.0])),
            suv=float(np.round(rng.uniform(4.0, 12.0), 2)),
        ))
    return out



# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _decay_factor(elapsed_s: float, half_life_s: float = F18_HALF_LIFE_S) -> float:
    """Fraction of F-18 activity left after ``elapsed_s`` seconds."""
    return 2.0 ** (-elapsed_s / half_life_s)


def _pet_grid(spec: TrialSpec, scanner: ScannerSpec) -> Grid:
    # Centred at the origin for every scanner, so a subject's lesions are at the same place.
    return Grid.centred(spec.pet_shape, scanner.pet_voxel_mm, (0.0, 0.0, 0.0))


def _visit_truth(v: _Visit) -> dict[str, float]:
    elapsed_s = (v.series_start - v.injection).total_seconds()
    decayed_dose_bq = v.dose_bq * _decay_factor(elapsed_s)
    return {
        "decayed_dose_bq": decayed_dose_bq,
        "suvbw_factor_g_per_bq": v.weight_kg * 1000.0 / decayed_dose_bq,
    }


def _visit_images(
    spec: TrialSpec, v: _Visit, seed: int
) -> tuple[Grid, np.ndarray, np.ndarray, np.ndarray]:
    """Grid, PET activity (Bq/mL at series start), CT (HU) and true SUV map of one visit.

    The image problems of the visit are in the returned PET and CT; the SUV map is the
    patient's (no calibration error, no gap, not moved).
    """
    scanner = spec.scanner(v.scanner)
    grid = _pet_grid(spec, scanner)
    rng = _rng(seed, *v.seed_key)
    maps = patient_maps(grid, rng=rng, lesions=v.lesions)
    bq_ml_per_suv = 1.0 / _visit_truth(v)["suvbw_factor_g_per_bq"]  # g/mL tissue density 1
    activity = blur_fwhm(maps.suv.astype(np.float64) * bq_ml_per_suv, grid.voxel_mm,
                         scanner.psf_fwhm_mm)
    noise_cov = _visit_noise_cov(spec, v)
    if noise_cov > 0:
        # The noise is set at the liver, where the reference VOI reads it.
        activity = reconstruction_noise(activity, grid.voxel_mm, rng=rng, cov=noise_cov,
                                        level_kbq_ml=LIVER_SUV * bq_ml_per_suv,
                                        fwhm_mm=spec.patient_noise_fwhm_mm)
    activity = np.asarray(activity, dtype=np.float64)
    hu = maps.hu
    if "liver_calibration_error" in v.problems:
        # A dose calibrator or scanner calibration error scales the whole image; nothing in the
        # header shows it.
        activity *= spec.problem_liver_suv / LIVER_SUV
    if v.bed_gap_planes is not None:
        start, stop = v.bed_gap_planes
        activity[start:stop] *= spec.problem_bed_residual
    if any(v.ct_shift_mm):
        # The patient moved between the CT and the PET: the CT shows them elsewhere, under the
        # same frame of reference and geometry.
        hu = patient_maps(grid, rng=rng, lesions=v.lesions, shift_mm=v.ct_shift_mm).hu
    return grid, activity, hu, maps.suv


def _visit_noise_cov(spec: TrialSpec, v: _Visit) -> float:
    """Voxel CoV of the visit's PET noise at the liver: short frames (``noisy_scan``) raise it."""
    return spec.problem_noise_cov if "noisy_scan" in v.problems else spec.patient_noise_cov


def _liver_suv_true(spec: TrialSpec, v: _Visit) -> float:
    """The noise-free liver SUVbw the visit's PET reads (its calibration error included)."""
    return spec.problem_liver_suv if "liver_calibration_error" in v.problems else LIVER_SUV


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


