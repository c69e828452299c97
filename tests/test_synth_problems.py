"""synth.trial: every planted problem is in the files where the ground truth says, and only
there; the files pass the dicom3tools conformance checks.

The ``trial`` and ``headers`` fixtures are in tests/synth_fixtures.py.
"""

from __future__ import annotations

import random

import pydicom
import pytest

from corelab.dicomio import load_volume
from synth.problems import IMAGE_PROBLEMS
from synth.spec import PROBLEM_CODES
from tests.synth_fixtures import DCENTVFY, DCIODVFY, SERIES_LEVEL, dcentvfy_errors, dciodvfy_errors, injection_and_start, series_files
from tests.synth_fixtures import headers, trial  # noqa: F401  (pytest fixtures)


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
        # The image problems leave the headers valid: tests/test_synth_image_problems.py.
        for code in (c for c in PROBLEM_CODES if c not in IMAGE_PROBLEMS):
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
