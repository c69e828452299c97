"""Injected problems and the ground truth of a synthetic trial.

:func:`_place_problems` marks the planned visits with the spec's problems, each on distinct visits
so each can be found alone; :func:`_problem_details` says what each one plants in which attribute;
:class:`GroundTruth` is what :func:`synth.trial.generate_trial` wrote.


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
                others list one PT series. The image problems (IMAGE_PROBLEMS) leave every
                header valid:
                liver_calibration_error  PET pixels scaled so the liver reads planted_value
                    (SUVbw, spec.problem_liver_suv) instead of expected (2.2); image_scale
                ct_misaligned  the CT content moved by planted_value [x, y, z] mm (CT minus PET);
                    the CT series also lists the code in its problems, and its truth has
                    shift_vs_pet_mm
                missing_bed_position  planes z_from_mm..z_to_mm (plane centres; planes,
                    instance_numbers) keep residual_fraction of their counts
                noisy_scan  voxel noise CoV at the liver planted_value % instead of expected %
    Trial PT truth also has liver_suv_true (noise-free liver SUVbw the image reads: 2.2, or
    the calibration error's value), noise_fwhm_mm, and noise_cov (as used for that series).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from corelab.grid import Grid
from synth.dicom_header import PetSeriesHeader
from synth.patient import LIVER_DOME_Z_MM, LIVER_SUV
from synth.series import _pet_grid, _rng, _Visit
from synth.spec import PROBLEM_CODES, TrialSpec

__all__ = ["GROUND_TRUTH_SCHEMA_VERSION", "IMAGE_PROBLEMS", "GroundTruth"]

GROUND_TRUTH_SCHEMA_VERSION = 1

# Problems that belong to a whole visit (PT and CT); every other one belongs to one PET series.
_VISIT_PROBLEMS = ("scanner_not_accredited", "followup_on_other_scanner", "software_version_changed")
_SERIES_PROBLEMS = tuple(code for code in PROBLEM_CODES if code not in _VISIT_PROBLEMS)

# Problems that leave a series without a liver SUL to compare (SUV not computable, quarantined,
# or a plane missing from the liver).
_NO_LIVER_SUL = frozenset({"missing_weight", "wrong_units", "patient_name_in_header", "missing_slice"})

#: Problems in the pixels only: every header stays valid, so header checks cannot see them.
IMAGE_PROBLEMS = ("liver_calibration_error", "ct_misaligned", "missing_bed_position", "noisy_scan")


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

    # The problems that must fall on a follow-up go first, while follow-ups with a usable
    # baseline are left.
    followup_only = ("uptake_out_of_window", "liver_calibration_error")
    series_problems = sorted((p for p in _SERIES_PROBLEMS if p in wanted), key=lambda p: p not in followup_only)
    kept_baselines: set[str] = set()  # subjects whose baseline stays clean, as the liver reference
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
        if code == "liver_calibration_error":
            # Likewise, and on a follow-up whose baseline keeps a computable liver SUL: the
            # follow-up versus baseline comparison then has both values and fires on this series.
            usable = {v.subject for v in visits
                      if v.visit_index == 0 and not set(v.problems) & _NO_LIVER_SUL}
            pool = [v for v in candidates if v.visit_index > 0 and v.subject in usable]
        pool = [v for v in pool if not (v.visit_index == 0 and v.subject in kept_baselines)]
        pool = [v for v in pool if not v.problems]
        if not pool:
            raise ValueError(f"no clean visit left for problem {code}: add subjects to the spec")
        pick = min(pool, key=lambda v: used_subjects.get(v.subject, 0))
        pick.problems.append(code)
        used_subjects[pick.subject] = used_subjects.get(pick.subject, 0) + 1
        if code == "uptake_out_of_window":
            pick.uptake_min = spec.problem_uptake_min
        if code == "liver_calibration_error":
            kept_baselines.add(pick.subject)
        if code == "ct_misaligned":
            axis = int(rng.integers(2))  # x or y: the patient slid sideways or sank
            sign = 1.0 if rng.random() < 0.5 else -1.0
            shift = [0.0, 0.0, 0.0]
            shift[axis] = sign * spec.problem_ct_shift_mm
            pick.ct_shift_mm = (shift[0], shift[1], shift[2])
        if code == "missing_bed_position":
            pick.bed_gap_planes = _bed_gap(spec, _pet_grid(spec, spec.scanner(pick.scanner)))


# A failed bed position starts this far above the liver dome, so that the liver and its
# reference VOI stay whole (the liver_suv rules must not fire on it).
_BED_GAP_ABOVE_LIVER_MM = 10.0


def _bed_gap(spec: TrialSpec, grid: Grid) -> tuple[int, int]:
    """Planes ``[start, stop)`` of a failed bed position: ``spec.problem_bed_gap_mm`` long
    (shortened to fit, never below 10 mm), above the liver and inside the central 90 % of the
    field of view, as low as allowed."""
    dz = grid.voxel_mm[0]
    n = grid.shape[0]
    z = grid.axes_mm()[0] - grid.centre_mm[2]  # plane centres relative to the grid centre
    margin = 0.05 * n * dz
    lo_edge = max(-0.5 * n * dz + margin, LIVER_DOME_Z_MM + _BED_GAP_ABOVE_LIVER_MM)
    hi_edge = 0.5 * n * dz - margin
    allowed = np.flatnonzero((z - 0.5 * dz >= lo_edge) & (z + 0.5 * dz <= hi_edge))
    want = max(round(spec.problem_bed_gap_mm / dz), math.ceil(10.0 / dz))
    length = min(want, allowed.size)
    if allowed.size == 0 or length * dz < 10.0:
        raise ValueError(f"missing_bed_position: no 10 mm run of planes above the liver fits in "
                         f"the central 90 % of a {n} x {dz} mm grid")
    start = int(allowed[0])
    return start, start + length


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
    if code == "liver_calibration_error":
        return {"attribute": "liver_suv_mean", "planted_value": spec.problem_liver_suv,
                "expected": LIVER_SUV, "unit": "SUVbw",
                "image_scale": spec.problem_liver_suv / LIVER_SUV,
                "related_checks": ["liver_sul_vs_baseline"],
                "note": "the PET pixel values are scaled (a dose or scanner calibration error); "
                        "the headers are unchanged"}
    if code == "ct_misaligned":
        return {"attribute": "ct_shift_mm", "planted_value": list(v.ct_shift_mm),
                "expected": [0.0, 0.0, 0.0], "unit": "mm",
                "note": "the patient moved between CT and PET: the CT image content is moved by "
                        "planted_value (CT minus PET, patient LPS x, y, z); the CT headers, "
                        "geometry and frame of reference are unchanged"}
    if code == "missing_bed_position":
        grid = _pet_grid(spec, scanner)
        start, stop = v.bed_gap_planes
        z = grid.axes_mm()[0]
        return {"attribute": "bed_position", "planted_value": [float(z[start]), float(z[stop - 1])],
                "expected": "counts in every plane", "unit": "mm",
                "z_from_mm": float(z[start]), "z_to_mm": float(z[stop - 1]),
                "planes": list(range(start, stop)),
                "instance_numbers": list(range(start + 1, stop + 1)),
                "residual_fraction": spec.problem_bed_residual,
                "note": "planes present, counts missing: the planes keep residual_fraction of "
                        "their activity; z_from_mm/z_to_mm are the first and last plane centres"}
    if code == "noisy_scan":
        return {"attribute": "liver_cov_pct", "planted_value": 100.0 * spec.problem_noise_cov,
                "expected": 100.0 * spec.patient_noise_cov, "unit": "%",
                "note": "short frames: the voxel noise CoV at the liver's activity is raised; "
                        "ActualFrameDuration is unchanged"}
    raise KeyError(code)


