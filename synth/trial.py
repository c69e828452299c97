"""A synthetic multi-site FDG PET/CT trial with known truth.

:func:`generate_trial` writes, for a :class:`synth.spec.TrialSpec`, the DICOM files that sites would send a
core lab (de-identified trial PET/CT studies, NEMA IEC and uniform-cylinder phantom scans with
their fill sheets), a scanner register, and ``ground_truth.json`` recording every value written,
the true values behind them and each injected problem. The same seed gives byte-identical files
and identical UIDs; every random choice comes from one ``numpy.random.SeedSequence`` tree.

Physics, kept simple and stated:

* Patient images are SUV maps from :func:`synth.patient.patient_maps` converted to Bq/mL at
  the series start, ``activity = SUV * decayed_dose_bq / (weight_kg * 1000)`` with
  ``decayed_dose_bq = dose_bq * 2**(-(series_start - injection) / T_half)`` (DecayCorrection
  START), blurred with the scanner's PSF and given correlated noise whose variance follows the
  activity (``TrialSpec.patient_noise_cov`` is the voxel CoV at the liver). The image problems
  (calibration error, CT moved, failed bed position, noisy scan) then act on the pixels only.
* Phantom images are the fill concentrations decayed from the fill reference time to the scan
  start, times ``1 + calibration_error_pct / 100`` of the scanner, blurred with the scanner's
  phantom PSF, with correlated noise whose variance follows the activity
  (:func:`synth.imaging.reconstruction_noise`; ``PhantomSpec.noise_cov`` is the voxel CoV of
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

``ground_truth.json`` and the injected problems are described in :mod:`synth.problems`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import corelab
from corelab.grid import Grid
from phantoms.geometry import NEMA_IEC_BODY
from synth.dicom_header import F18_HALF_LIFE_S
from synth.dicom_writer import write_ct_series, write_pet_series
from synth.digital_phantoms import nema_iec_phantom, uniform_cylinder
from synth.imaging import blur_fwhm, reconstruction_noise
from synth.problems import (GROUND_TRUTH_SCHEMA_VERSION, _SERIES_PROBLEMS, GroundTruth, _place_problems,
                            _problem_details, _problem_entry)
from synth.series import (_ct_header_values, _decay_factor, _pet_header_values, _phantom_header,
                          _liver_suv_true, _plan_subjects, _rng, _trial_headers, _Visit, _visit_images,
                          _visit_noise_cov, _visit_truth, _weekday)
from synth.spec import PhantomSpec, ScannerSpec, TrialSpec, _jsonable

__all__ = ["generate_trial", "visit_activity_bq_ml"]

# NEMA IEC body phantom background (fillable body minus spheres and lung insert), mL: the
# commonly quoted 9.7 L. Used only for the phantom's total activity and "weight" in the header.
_NEMA_BACKGROUND_ML = 9700.0


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
# Generation
# --------------------------------------------------------------------------------------------


def _rel(outdir: Path, path: Path) -> str:
    return path.relative_to(outdir).as_posix()



def _write_visit(outdir: Path, spec: TrialSpec, v: _Visit, seed: int,
                 baseline_scanner: str | None) -> tuple[list[dict], list[dict]]:
    scanner = spec.scanner(v.scanner)
    grid, activity, hu, _ = _visit_images(spec, v, seed)
    pet, ct, when = _trial_headers(spec, v, seed)
    visit_dir = outdir / "sites" / v.site / v.subject / v.visit
    n_planes = grid.shape[0]
    omit = [n_planes // 2] if "missing_slice" in v.problems else []
    pet_paths = write_pet_series(visit_dir / "PT", activity, grid, pet, omit_planes=omit)
    ct_paths = write_ct_series(visit_dir / "CT", hu, grid, ct)
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
        "noise_cov": _visit_noise_cov(spec, v),
        "noise_fwhm_mm": spec.patient_noise_fwhm_mm,
        "liver_suv_true": _liver_suv_true(spec, v),
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
        "truth": {"date_shift_days": v.date_shift_days, "rescale_intercept_hu": -1024.0,
                  "shift_vs_pet_mm": list(v.ct_shift_mm)},
        "problems": [],
    }
    problems = []
    for code in v.problems:
        targets = [pet_entry] if code in _SERIES_PROBLEMS else [pet_entry, ct_entry]
        details = _problem_details(code, v, spec, pet, baseline_scanner)
        if code == "missing_slice":
            details = {"attribute": "NumberOfSlices", "planted_value": len(pet_paths),
                       "expected": n_planes, "missing_instance_numbers": [p + 1 for p in omit]}
        if code == "ct_misaligned":
            # Reported on the PET (the alignment check reads the pair), but the CT is what changed.
            details["ct_series_uid"] = ct.series_uid
            ct_entry["problems"].append(code)
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
        grid = Grid.centred(ps.nema_shape, ps.voxel_mm, (0.0, 0.0, NEMA_IEC_BODY.sphere_plane_z_mm))
        pose = _phantom_pose(ps, seed, spec.scanners.index(scanner))
        phantom = nema_iec_phantom(
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
        grid = Grid.centred(ps.cylinder_shape, ps.voxel_mm, (0.0, 0.0, 0.0))
        kbq_ml = uniform_cylinder(
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
                 "half_life_s": F18_HALF_LIFE_S, "volume_ml": round(volume_ml, 1),
                 "total_activity_bq": round(dose_bq, 0)})
    image_kbq_ml = blur_fwhm(kbq_ml, grid.voxel_mm, fwhm_mm)
    if noise_cov > 0:
        image_kbq_ml = reconstruction_noise(image_kbq_ml, grid.voxel_mm, rng=rng, cov=noise_cov,
                                                    level_kbq_ml=noise_level_kbq_ml, fwhm_mm=ps.noise_fwhm_mm)
    activity = image_kbq_ml.astype(np.float64) * 1000.0
    header = _phantom_header(spec, scanner, kind, seed, reference, scan_start, dose_bq, volume_ml)
    paths = write_pet_series(series_dir, activity, grid, header)
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
        "generator": "synth.trial.generate_trial",
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
