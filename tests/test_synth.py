"""synth.trial: the synthetic trial's files agree with its ground truth, and only there.

Layout, ground truth, headers and pixels against the truth, reproducibility and the demo spec.
The planted problems and DICOM conformance are in tests/test_synth_problems.py; the ``trial``
and ``headers`` fixtures are in tests/synth_fixtures.py.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

import corelab
from corelab.dicomio import load_volume
from synth.spec import PROBLEM_CODES, TrialSpec
from synth.spec import small_spec
from synth.trial import generate_trial, visit_activity_bq_ml
from tests.synth_fixtures import SEED, SERIES_LEVEL, injection_and_start, series_files, tree_digest
from tests.synth_fixtures import headers, trial  # noqa: F401  (pytest fixtures)

T_HALF_S = 6586.2


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
    n_visits = sum(site.n_subjects for site in small_spec().sites) * 2
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
# Reproducibility
# ------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_output_and_other_seed_differs(trial, tmp_path):
    again = generate_trial(tmp_path / "again", small_spec(), seed=SEED)
    assert tree_digest(again.outdir) == tree_digest(trial.outdir)
    other = generate_trial(tmp_path / "other", small_spec(), seed=SEED + 1)
    assert {s["series_uid"] for s in other.series}.isdisjoint(s["series_uid"] for s in trial.series)
    # A clean visit whose twin has all its planes (problems land elsewhere under another seed).
    whole = {s["path"]: s for s in _trial_pet(other) if "missing_slice" not in s["problems"]}
    first = next(s for s in _trial_pet(trial) if not s["problems"] and s["path"] in whole)
    twin = whole[first["path"]]
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
