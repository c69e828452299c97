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
                others list one PT series.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synth.dicom_header import PetSeriesHeader
from synth.series import _rng, _Visit
from synth.spec import PROBLEM_CODES, TrialSpec

__all__ = ["GROUND_TRUTH_SCHEMA_VERSION", "GroundTruth"]

GROUND_TRUTH_SCHEMA_VERSION = 1

# Problems that belong to one PET series; the others belong to a whole visit (PT and CT).
_SERIES_PROBLEMS = (
    "uptake_out_of_window",
    "missing_weight",
    "wrong_units",
    "dose_in_mbq",
    "patient_name_in_header",
    "missing_slice",
)


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


