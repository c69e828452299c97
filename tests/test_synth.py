"""synth.trial: the synthetic trial's files agree with its ground truth, and only there."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

import corelab
from corelab.dicomio import load_volume
from synth.problems import GroundTruth
from synth.spec import PROBLEM_CODES, TrialSpec
from synth.spec import small_spec
from synth.trial import generate_trial, visit_activity_bq_ml
from tests.synth_fixtures import DCENTVFY, DCIODVFY, dcentvfy_errors, dciodvfy_errors, injection_and_start, series_files, tree_digest

SEED = 7
T_HALF_S = 6586.2
SERIES_LEVEL = ("uptake_out_of_window", "missing_weight", "wrong_units", "dose_in_mbq",
                "patient_name_in_header", "missing_slice")


@pytest.fixture(scope="module")
def trial(tmp_path_factory) -> GroundTruth:
    return generate_trial(tmp_path_factory.mktemp("trial"), small_spec(), seed=SEED)


@pytest.fixture(scope="module")
def headers(trial) -> dict[str, list[pydicom.Dataset]]:
    """Headers of every file, by series UID."""
    return {s["series_uid"]: [pydicom.dcmread(p, stop_before_pixels=True)
                              for p in series_files(trial.outdir, s)] for s in trial.series}


def _trial_pet(trial) -> list[dict]:
    return [s for s in trial.series if s["kind"] == "trial" and s["modality"] == "PT"]


def _value(ds: pydicom.Dataset, keyword: str):
    """A header value in the types the ground truth uses (None when absent or empty)."""
    if keyword in ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime",
                   "RadiopharmaceuticalStartDateTime"):
        ds = ds.RadiopharmaceuticalInformationSequence[0]
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    value = ds[keyword].value
    if isinstance(value, pydicom.valuerep.DSfloat | float):
        return float(value)
    if isinstance(value, pydicom.multival.MultiValue):
        return [str(v) for v in value]
    if isinstance(value, int):
        return int(value)
    return str(value)


# ------------------------------------------------------------------------------------------
# Layout and ground truth document
# ------------------------------------------------------------------------------------------


def test_layout_register_and_fill_sheets(trial):
    out = trial.outdir
    assert (out / "ground_truth.json").is_file() and (out / "register.yaml").is_file()
    register = yaml.safe_load((out / "register.yaml").read_text())
    assert register["trial_code"] == "FDG-RESP-01"
    assert {s["code"]: s["ae_title"] for s in register["sites"]} == {
        "A01": "SITE_A01", "B02": "SITE_B02", "C03": "SITE_C03"}
    assert {s["id"] for s in register["scanners"]} == {"A01-1", "A01-2", "B02-1", "C03-1"}
    for entry in trial.series:
        files = series_files(out, entry)
        assert len(files) == entry["n_files"] > 0
        parts = Path(entry["path"]).parts
        if entry["kind"] == "trial":
            assert parts == ("sites", entry["site"], entry["subject"], entry["visit"], entry["modality"])
        else:
            kind = entry["phantom"]["kind"]
            assert parts == ("sites", entry["site"], "phantoms", f"{entry['scanner']}-{kind}")
            fill_path = out / "sites" / entry["site"] / "phantoms" / f"{entry['scanner']}-{kind}.fill.yaml"
            assert entry["phantom"]["fill_sheet"] == fill_path.relative_to(out).as_posix()
            fill = yaml.safe_load(fill_path.read_text())
            keys = {"sphere_kbq_ml", "background_kbq_ml"} if kind == "nema_iec" else {"concentration_kbq_ml"}
            assert keys | {"kind", "scanner", "reference_time", "radionuclide", "half_life_s"} <= set(fill)
            assert fill["kind"] == kind and fill["scanner"] == entry["scanner"]
            assert fill["radionuclide"] == "F-18" and fill["half_life_s"] == T_HALF_S
            dt.datetime.fromisoformat(fill["reference_time"])
    assert all(f.name[:4].isdigit() for f in (out / "sites").rglob("*.dcm"))


def test_ground_truth_is_plain_json_and_complete(trial):
    on_disk = json.loads((trial.outdir / "ground_truth.json").read_text())
    assert on_disk == trial.data
    assert on_disk["seed"] == SEED and on_disk["corelab_version"] == corelab.__version__
    assert TrialSpec.from_dict(on_disk["spec"]) == small_spec()
    n_visits = 7 * 2
    assert len(_trial_pet(trial)) == n_visits
    assert sum(s["kind"] == "phantom" for s in trial.series) == 4 * 2
    assert len({s["series_uid"] for s in trial.series}) == len(trial.series)
    for s in _trial_pet(trial):
        t = s["truth"]
        assert {"weight_kg", "dose_bq", "injection_datetime", "series_start_datetime", "uptake_min",
                "suvbw_factor_g_per_bq", "date_shift_days", "lesions"} <= set(t)
        assert all({"centre_mm", "diameter_mm", "suv"} <= set(les) for les in t["lesions"])


def test_spec_round_trips_through_yaml(tmp_path):
    spec = TrialSpec.demo()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert TrialSpec.from_yaml(path) == spec
    with pytest.raises(ValueError, match="unknown"):
        TrialSpec.from_dict({"trial_code": "X", "subjects": 3})


# ------------------------------------------------------------------------------------------
# Files agree with the truth
# ------------------------------------------------------------------------------------------


def test_headers_match_ground_truth(trial, headers):
    for entry in trial.series:
        for ds in headers[entry["series_uid"]]:
            assert ds.SeriesInstanceUID == entry["series_uid"]
            assert ds.StudyInstanceUID == entry["study_uid"]
            assert ds.FrameOfReferenceUID == entry["frame_of_reference_uid"]
            assert ds.Modality == entry["modality"]
            for keyword, expected in entry["header"].items():
                assert _value(ds, keyword) == expected, (entry["path"], keyword)
        first = headers[entry["series_uid"]][0]
        if entry["modality"] == "PT":
            assert first.NumberOfSlices == entry["n_planes_expected"]


def test_clean_trial_headers_carry_the_true_values(trial, headers):
    clean = [s for s in _trial_pet(trial) if not s["problems"]]
    assert len(clean) >= 3
    for s in clean:
        ds = headers[s["series_uid"]][0]
        t = s["truth"]
        assert ds.PatientName == ds.PatientID == s["subject"]
        assert float(ds.PatientWeight) == t["weight_kg"]
        item = ds.RadiopharmaceuticalInformationSequence[0]
        assert float(item.RadionuclideTotalDose) == t["dose_bq"]
        assert ds.Units == "BQML" and ds.DecayCorrection == "START"
        injection, start = injection_and_start(ds)
        assert injection.isoformat() == t["injection_datetime"]
        assert start.isoformat() == t["series_start_datetime"]
        uptake_min = (start - injection).total_seconds() / 60
        assert uptake_min == pytest.approx(t["uptake_min"], abs=1e-9)
        decayed_bq = float(item.RadionuclideTotalDose) * 2 ** (-uptake_min * 60 / T_HALF_S)
        factor = float(ds.PatientWeight) * 1000 / decayed_bq
        assert factor == pytest.approx(t["suvbw_factor_g_per_bq"], rel=1e-12)
        scanner = trial.data["spec"]["scanners"]
        registered = next(x for x in scanner if x["id"] == s["scanner"])
        assert ds.DeviceSerialNumber == registered["serial"]
        assert ds.SoftwareVersions == registered["software"]


def test_values_are_physically_sensible(trial):
    by_subject: dict[str, dict[str, dict]] = {}
    for s in _trial_pet(trial):
        by_subject.setdefault(s["subject"], {})[s["visit"]] = s
        t = s["truth"]
        assert 50 <= t["weight_kg"] <= 110
        assert 150e6 <= t["dose_bq"] <= 450e6
        assert 2.5 <= t["dose_bq"] / 1e6 / t["weight_kg"] <= 5.0
        if "uptake_out_of_window" not in s["problems"]:
            assert 55 <= t["uptake_min"] <= 75
    for subject, visits in by_subject.items():
        base, follow = visits["baseline"]["truth"], visits["followup"]["truth"]
        assert base["date_shift_days"] == follow["date_shift_days"] < 0
        days = (dt.datetime.fromisoformat(follow["series_start_datetime"])
                - dt.datetime.fromisoformat(base["series_start_datetime"])).days
        assert 42 <= days <= 60, subject
        if "uptake_out_of_window" not in visits["followup"]["problems"]:
            assert abs(follow["uptake_min"] - base["uptake_min"]) <= 10


def test_pet_pixels_reproduce_the_generated_activity(trial):
    spec = small_spec()
    checked = set()
    for s in _trial_pet(trial):
        if s["problems"] and s["problems"] != ["followup_on_other_scanner"]:
            continue
        checked.add(s["scanner"])
        expected = visit_activity_bq_ml(spec, SEED, s["subject"], s["visit"])
        vol = load_volume(series_files(trial.outdir, s))
        assert vol.array.shape == expected.shape
        for plane in range(expected.shape[0]):
            slope = float(pydicom.dcmread(vol.paths[plane], stop_before_pixels=True).RescaleSlope)
            # Quantisation (half a slope) plus float32 rounding of the volume.
            tolerance = slope * 0.5 + np.abs(expected[plane]).max() * 2.0**-22
            assert np.max(np.abs(vol.array[plane] - expected[plane])) <= tolerance
        # SUV from the header factor: body background about 1 (the digital trunk's soft tissue).
        suv = vol.array * s["truth"]["suvbw_factor_g_per_bq"]
        assert np.median(suv[suv > 0.6]) == pytest.approx(1.0, abs=0.15)
    assert {"A01-1", "A01-2", "B02-1"} <= checked


def test_ge_slopes_vary_per_slice(trial, headers):
    ge = [s for s in _trial_pet(trial) if s["scanner"] == "A01-2"][0]
    slopes = {float(ds.RescaleSlope) for ds in headers[ge["series_uid"]]}
    assert len(slopes) > ge["n_files"] // 2


def test_phantom_images_match_their_fill_sheets(trial, headers):
    for s in trial.series:
        if s["kind"] != "phantom":
            continue
        ph = s["phantom"]
        fill = yaml.safe_load((trial.outdir / ph["fill_sheet"]).read_text())
        ds = headers[s["series_uid"]][0]
        assert str(ds.PatientName).startswith("PHANTOM^") and "PatientIdentityRemoved" not in ds
        item = ds.RadiopharmaceuticalInformationSequence[0]
        reference = dt.datetime.fromisoformat(fill["reference_time"])
        injection, start = injection_and_start(ds)
        assert injection == reference
        decay = 2 ** (-(start - reference).total_seconds() / T_HALF_S)
        assert decay == pytest.approx(ph["decay_factor_to_scan_start"], rel=1e-12)
        assert float(item.RadionuclideTotalDose) == pytest.approx(fill["total_activity_bq"], abs=1)
        gain = 1 + ph["calibration_error_pct"] / 100
        vol = load_volume(series_files(trial.outdir, s))
        nz, ny, nx = vol.array.shape
        if ph["kind"] == "uniform_cylinder":
            centre = vol.array[nz // 2 - 2:nz // 2 + 3, ny // 2 - 4:ny // 2 + 5, nx // 2 - 4:nx // 2 + 5]
            true_bq_ml = fill["concentration_kbq_ml"] * 1000 * decay * gain
            assert centre.mean() == pytest.approx(true_bq_ml, rel=0.005)
        else:
            # The unaccredited scanner's phantom is the blurriest.
            assert (ph["fwhm_mm"] >= 10) == (s["scanner"] == "C03-1")
            k = int(np.argmin(np.abs(vol.positions_mm - ph["sphere_centres_mm"]["37"][2])))
            x, y, _ = ph["sphere_centres_mm"]["37"]
            j = int(round((y - vol.origin_mm[1]) / vol.voxel_mm[1]))
            i = int(round((x - vol.origin_mm[0]) / vol.voxel_mm[2]))
            rc = vol.array[k, j, i] / (fill["sphere_kbq_ml"] * 1000 * decay * gain)
            assert 0.9 < rc < 1.05


# ------------------------------------------------------------------------------------------
# Problems: present where the truth says, absent everywhere else
# ------------------------------------------------------------------------------------------


def _detect(code: str, entry: dict, files: list[pydicom.Dataset], trial) -> bool:
    """Whether ``code`` shows in the files of one trial series, looking only at the files."""
    ds = files[0]
    spec = trial.data["spec"]
    scanners = {s["serial"]: s for s in spec["scanners"]}
    if code == "scanner_not_accredited":
        return not scanners[ds.DeviceSerialNumber]["accredited"]
    if code == "software_version_changed":
        return ds.SoftwareVersions != scanners[ds.DeviceSerialNumber]["software"]
    if code == "followup_on_other_scanner":
        base = next(s for s in trial.series if s["subject"] == entry["subject"]
                    and s["visit"] == "baseline" and s["modality"] == entry["modality"])
        base_ds = pydicom.dcmread(series_files(trial.outdir, base)[0], stop_before_pixels=True)
        return ds.DeviceSerialNumber != base_ds.DeviceSerialNumber
    if ds.Modality != "PT":
        return code == "patient_name_in_header" and ds.PatientName != ds.PatientID
    if code == "uptake_out_of_window":
        injection, start = injection_and_start(ds)
        return not 55 <= (start - injection).total_seconds() / 60 <= 75
    if code == "missing_weight":
        return any("PatientWeight" not in f or not f.PatientWeight for f in files)
    if code == "wrong_units":
        return ds.Units != "BQML" and not any(e.tag.group == 0x7053 for e in ds)
    if code == "dose_in_mbq":
        return float(ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose) < 1e5
    if code == "patient_name_in_header":
        return any(str(f.PatientName) != f.PatientID for f in files)
    if code == "missing_slice":
        return len(files) != int(ds.NumberOfSlices)
    raise KeyError(code)


def test_every_problem_is_present_and_only_where_the_truth_says(trial, headers):
    for entry in (s for s in trial.series if s["kind"] == "trial"):
        files = headers[entry["series_uid"]]
        for code in PROBLEM_CODES:
            if code == "followup_on_other_scanner" and entry["visit"] == "baseline":
                continue
            assert _detect(code, entry, files, trial) == (code in entry["problems"]), (
                entry["path"], code)


def test_problem_list_is_consistent(trial):
    problems = trial.problems
    codes = [p["code"] for p in problems]
    assert set(codes) == set(PROBLEM_CODES)
    for code in SERIES_LEVEL:
        assert codes.count(code) == 1, code
    for code in ("followup_on_other_scanner", "software_version_changed"):
        assert codes.count(code) == 2  # the PET and the CT series of one visit
    c03 = [s for s in trial.series if s["kind"] == "trial" and s["scanner"] == "C03-1"]
    assert sorted(p["series_uid"] for p in problems if p["code"] == "scanner_not_accredited") == \
        sorted(s["series_uid"] for s in c03)
    series_level_uids = [p["series_uid"] for p in problems if p["code"] in SERIES_LEVEL]
    assert len(set(series_level_uids)) == len(series_level_uids)  # one problem per series
    for p in problems:
        entry = trial.series_by_uid(p["series_uid"])
        assert p["code"] in entry["problems"]
        assert {p["subject"], p["visit"], p["site"], p["scanner"], p["path"]} == {
            entry["subject"], entry["visit"], entry["site"], entry["scanner"], entry["path"]}
        assert p["attribute"]
    uptake = next(p for p in problems if p["code"] == "uptake_out_of_window")
    assert uptake["visit"] == "followup" and uptake["planted_value"] == 95.0
    other = next(p for p in problems if p["code"] == "followup_on_other_scanner")
    assert other["site"] == "A01" and other["scanner"] == "A01-2" and other["baseline_scanner"] == "A01-1"
    software = next(p for p in problems if p["code"] == "software_version_changed")
    assert software["scanner"] == "B02-1" and software["visit"] == "followup"


def test_planted_name_appears_only_in_its_series(trial):
    planted = next(p for p in trial.problems if p["code"] == "patient_name_in_header")
    name = planted["planted_value"].encode()
    assert name.startswith(b"MUSTERMANN^")
    hits = {f.parent.relative_to(trial.outdir).as_posix()
            for f in (trial.outdir / "sites").rglob("*.dcm") if name in f.read_bytes()}
    assert hits == {planted["path"]}


def test_missing_slice_is_flagged_by_load_volume(trial):
    entry = next(s for s in trial.series if "missing_slice" in s["problems"])
    files = series_files(trial.outdir, entry)
    random.Random(1).shuffle(files)
    vol = load_volume(files)
    assert entry["n_files"] == entry["n_planes_expected"] - 1 == vol.array.shape[0]
    assert vol.missing_positions_mm == pytest.approx(entry["missing_positions_mm"])
    assert not vol.is_complete


# ------------------------------------------------------------------------------------------
# DICOM conformance
# ------------------------------------------------------------------------------------------


@pytest.mark.dcmtk
@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools not installed")
def test_dciodvfy_has_no_errors_on_any_series(trial):
    """One file of every series (PET patient, CT, both phantoms, every problem series), plus
    the middle file of every PET series (per-slice values differ)."""
    checked = 0
    for entry in trial.series:
        files = series_files(trial.outdir, entry)
        for path in {files[0], files[len(files) // 2]}:
            assert dciodvfy_errors(path) == [], path
            checked += 1
    assert checked >= len(trial.series)


@pytest.mark.dcmtk
@pytest.mark.skipif(DCENTVFY is None, reason="dicom3tools not installed")
def test_dcentvfy_finds_clean_studies_consistent(trial):
    clean = [s for s in trial.series if s["kind"] == "trial" and s["modality"] == "PT"
             and not s["problems"]][:2]
    assert clean
    for pet in clean:
        ct = next(s for s in trial.series if s["study_uid"] == pet["study_uid"] and s["modality"] == "CT")
        assert dcentvfy_errors(series_files(trial.outdir, pet) + series_files(trial.outdir, ct)) == []
    phantom = next(s for s in trial.series if s["kind"] == "phantom")
    assert dcentvfy_errors(series_files(trial.outdir, phantom)) == []


# ------------------------------------------------------------------------------------------
# Reproducibility
# ------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_output_and_other_seed_differs(trial, tmp_path):
    again = generate_trial(tmp_path / "again", small_spec(), seed=SEED)
    assert tree_digest(again.outdir) == tree_digest(trial.outdir)
    other = generate_trial(tmp_path / "other", small_spec(), seed=SEED + 1)
    assert {s["series_uid"] for s in other.series}.isdisjoint(s["series_uid"] for s in trial.series)
    first = next(s for s in _trial_pet(trial) if not s["problems"])
    twin = next(s for s in _trial_pet(other) if s["path"] == first["path"])
    a = load_volume(series_files(trial.outdir, first)).array
    b = load_volume(series_files(other.outdir, twin)).array
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert first["truth"]["weight_kg"] != twin["truth"]["weight_kg"]


def test_refuses_to_overwrite(trial):
    with pytest.raises(FileExistsError):
        generate_trial(trial.outdir, small_spec(), seed=SEED)


# ------------------------------------------------------------------------------------------
# The full demo spec
# ------------------------------------------------------------------------------------------


def test_demo_spec_generates_the_described_trial(tmp_path):
    truth = generate_trial(tmp_path / "demo", TrialSpec.demo(), seed=0)
    spec = truth.data["spec"]
    assert spec["trial_code"] == "FDG-RESP-01"
    assert [(s["code"], s["n_subjects"]) for s in spec["sites"]] == [("A01", 5), ("B02", 5), ("C03", 2)]
    makers = {s["id"]: (s["manufacturer"], s["model"]) for s in spec["scanners"]}
    assert makers == {"A01-1": ("SIEMENS", "Biograph Vision 600"),
                      "A01-2": ("GE MEDICAL SYSTEMS", "Discovery MI"),
                      "B02-1": ("Philips", "Vereos PET/CT"), "C03-1": ("SIEMENS", "Biograph mCT")}
    trial_series = [s for s in truth.series if s["kind"] == "trial"]
    assert len(trial_series) == 12 * 2 * 2
    assert len({s["subject"] for s in trial_series}) == 12
    assert all(s["subject"].startswith("FDGR01-") for s in trial_series)
    assert sum(s["kind"] == "phantom" for s in truth.series) == 8
    codes = [p["code"] for p in truth.problems]
    assert set(codes) == set(PROBLEM_CODES)
    assert all(codes.count(c) == 1 for c in SERIES_LEVEL)
    assert codes.count("scanner_not_accredited") == 2 * 2 * 2
    software = next(p for p in truth.problems if p["code"] == "software_version_changed")
    assert software["scanner"] == "B02-1"
    n_dcm = sum(1 for _ in (truth.outdir / "sites").rglob("*.dcm"))
    assert n_dcm == sum(s["n_files"] for s in truth.series)
    nema_c03 = next(s for s in truth.series if s["kind"] == "phantom" and s["scanner"] == "C03-1"
                    and s["phantom"]["kind"] == "nema_iec")
    assert nema_c03["phantom"]["fwhm_mm"] >= 10
    assert nema_c03["phantom"]["intended_earl_result"]["result"] == "fail"
    cylinder_b02 = next(s for s in truth.series if s["kind"] == "phantom" and s["scanner"] == "B02-1"
                        and s["phantom"]["kind"] == "uniform_cylinder")
    assert cylinder_b02["phantom"]["calibration_error_pct"] == 3.0
    assert math.isclose(json.loads(json.dumps(truth.data))["seed"], 0)
