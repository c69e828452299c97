"""Compliance without Prefect: SUV of series on disk, broken headers, manual versions, scanner changes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from sqlmodel import select

from accreditation.evaluate import evaluate_series_folder, record_evaluation
from corelab.db import session_scope
from corelab.dicomio import load_volume
from corelab.ingest import ingest_path, series_dir
from corelab.models import AuditEvent, Deviation, Scanner, Series
from corelab.queries import deviation_rows, quarantine_rows
from corelab.register import load_register
from corelab.suv import suv_of_files
from expectations.header_table import header_row
from expectations.manual import load_manual, trial_fields
from expectations.qc import qc_series_batch, trial_pet_series
from phantoms.fill import load_fill_sheet
from synth.spec import small_spec
from synth.trial import generate_trial
from synth.truth import score


@pytest.fixture(scope="module")
def trial_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compliance-trial")
    # Dated like the demo, so the phantoms are inside the quarterly calibration cadence today.
    spec = dataclasses.replace(small_spec(), first_scan_date=(dt.date.today() - dt.timedelta(days=21)).isoformat())
    # At the small spec's coarse 5 mm phantom voxels, 7.5 mm FWHM is inside every EARL1 band (measured).
    for scanner in spec.scanners:
        if scanner.accredited:
            scanner.nema_fwhm_mm = 7.5
    generate_trial(out, spec, seed=2)
    return out


@pytest.fixture(scope="module")
def truth(trial_dir) -> dict:
    return json.loads((trial_dir / "ground_truth.json").read_text())


def _pet(truth, code=None):
    for s in truth["series"]:
        if s["kind"] == "trial" and s["modality"] == "PT" and (
                code is None and not s["problems"] or code in [p["code"] for p in truth["problems"]
                                                               if p["series_uid"] == s["series_uid"]]):
            return s
    raise LookupError(code)


def _ingest_all(settings, trial_dir):
    with session_scope(settings) as session:
        load_register(session, trial_dir / "register.yaml", trial_fields=trial_fields)
        for site in ("A01", "B02", "C03"):
            ingest_path(session, settings, trial_dir / "sites" / site, site_code=site)


def _accredit_all(settings, scope):
    with session_scope(settings) as session:
        for series in session.exec(select(Series).where(Series.kind == "phantom", Series.state == "complete")):
            folder = series_dir(settings, series, session)
            record_evaluation(session, series, evaluate_series_folder(folder, load_fill_sheet(folder / "fill.yaml")),
                              scope=scope)


def _qc(settings, manual, **kw):
    with session_scope(settings) as session:
        series = trial_pet_series(session, manual.trial, needing_version=manual.version)
        return qc_series_batch(session, settings, manual, series, **kw)


def test_suv_of_series_matches_the_ground_truth(trial_dir, truth):
    entry = _pet(truth)
    files = sorted((trial_dir / entry["path"]).glob("*.dcm"))
    [result] = suv_of_files(files)
    expected = entry["truth"]["suvbw_factor_g_per_bq"]
    assert result["error"] is None and result["units"] == "BQML" and result["decay_correction"] == "START"
    assert len(result["factors_g_per_bq"]) == len(files)
    assert all(abs(f / expected - 1) < 1e-6 for f in result["factors_g_per_bq"])
    volume = load_volume(files).array.astype(np.float64) * expected
    nonzero = volume[volume != 0]
    assert result["suv_max"] == pytest.approx(nonzero.max(), rel=1e-6)
    assert result["suv_mean"] == pytest.approx(nonzero.mean(), rel=1e-6)


def test_suv_says_what_is_missing_and_skips_junk(trial_dir, truth, tmp_path):
    files = sorted((trial_dir / _pet(truth, "missing_weight")["path"]).glob("*.dcm"))
    (tmp_path / "junk.dcm").write_text("not dicom")
    results = suv_of_files(files + [tmp_path / "junk.dcm"])
    [series] = [r for r in results if "series_uid" in r]
    assert series["error"]["code"] == "missing_weight" and series["error"]["attribute"] == "PatientWeight"
    assert [r for r in results if "unreadable" in r][0]["file"].endswith("junk.dcm")


@pytest.mark.parametrize("mutate, needle", [
    (lambda ds: delattr(ds, "RadiopharmaceuticalInformationSequence"), "RadiopharmaceuticalInformationSequence"),
    (lambda ds: delattr(ds, "ImagePositionPatient"), "ImagePositionPatient"),
    (lambda ds: delattr(ds, "DeviceSerialNumber"), "DeviceSerialNumber"),
    (lambda ds: setattr(ds, "Units", ""), "Units"),
    (lambda ds: delattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideHalfLife"), "RadionuclideHalfLife"),
])
def test_broken_headers_give_named_problems_not_crashes(trial_dir, truth, mutate, needle):
    datasets = [pydicom.dcmread(f, stop_before_pixels=True)
                for f in sorted((trial_dir / _pet(truth)["path"]).glob("*.dcm"))]
    for ds in datasets:
        mutate(ds)
    row = header_row(datasets)
    assert needle in row["header_problems"]


def test_slices_that_disagree_are_named(trial_dir, truth):
    datasets = [pydicom.dcmread(f, stop_before_pixels=True)
                for f in sorted((trial_dir / _pet(truth)["path"]).glob("*.dcm"))]
    datasets[3].PatientWeight = 81.0
    row = header_row(datasets)
    assert row["header_problems"] == "differ between slices: PatientWeight"
    assert row["suv_error"] and row["suv_error"].startswith("inconsistent_series")


def test_qc_without_prefect_finds_exactly_the_injected_problems(settings, trial_dir, truth):
    _ingest_all(settings, trial_dir)
    _accredit_all(settings, truth["trial_code"])
    outcome = _qc(settings, load_manual(truth["trial_code"]), docs_dir=settings.data_dir / "gx")
    with session_scope(settings) as session:
        result = score(truth, deviation_rows(session, trial_code=truth["trial_code"]),
                       quarantine_rows(session, include_released=True))
    assert result.missed == set() and result.unexpected == set(), result.as_dict()
    assert outcome.data_docs and Path(outcome.data_docs).is_file()
    assert "validations" in {p.name for p in Path(outcome.data_docs).parent.iterdir()}
    software = next(p for p in truth["problems"] if p["code"] == "software_version_changed")
    assert outcome.scanners_flagged == [software["scanner"]]
    with session_scope(settings) as session:
        scanner = session.exec(select(Scanner).where(Scanner.code == software["scanner"])).one()
        assert "re-qualification" in scanner.requalification_reason
    assert _qc(settings, load_manual(truth["trial_code"])).series == 0  # nothing left to judge


def test_a_new_manual_version_rejudges_and_records_the_version(settings, trial_dir, truth, tmp_path):
    _ingest_all(settings, trial_dir)
    v1 = load_manual(truth["trial_code"])
    _qc(settings, v1)
    doc = yaml.safe_load(v1.path.read_text())
    doc["version"] = "2.0.0"
    for rule in doc["rules"]:
        if rule["id"] == "uptake_window":
            rule["params"]["max_value"] = 120  # the new manual accepts the 95 min scan
    path = tmp_path / f"{v1.trial}.yaml"
    path.write_text(yaml.safe_dump(doc))
    v2 = load_manual(path)
    outcome = _qc(settings, v2)
    assert outcome.series == len([s for s in truth["series"] if s["kind"] == "trial" and s["modality"] == "PT"
                                  and s["series_uid"] not in {p["series_uid"] for p in truth["problems"]
                                                              if p["code"] == "patient_name_in_header"}])
    uptake = _pet(truth, "uptake_out_of_window")["series_uid"]
    with session_scope(settings) as session:
        devs = {(d["series_uid"], d["rule_id"]): d for d in deviation_rows(session)}
        assert devs[(uptake, "uptake_window")]["status"] == "resolved"
        open_versions = {d.manual_version for d in session.exec(select(Deviation).where(Deviation.status == "open"))}
        assert open_versions == {"2.0.0"}
        assert {s.qc_manual_version for s in trial_pet_series(session, v1.trial)} == {"2.0.0"}
        batches = [e.detail for e in session.exec(select(AuditEvent).where(AuditEvent.action == "qc.batch"))]
        assert [b["manual_version"] for b in batches] == [v1.version, "2.0.0"]
        assert any(r["rule_id"] == "uptake_window" for r in batches[1]["resolved"])


def test_accreditation_date_scan_or_receipt(settings, trial_dir, truth):
    """Shifted header dates lie years before the phantoms: by scan date nothing is accredited."""
    _ingest_all(settings, trial_dir)
    _accredit_all(settings, truth["trial_code"])
    manual = load_manual(truth["trial_code"])
    by_scan = dataclasses.replace(manual, accreditation_date="scan", version="scan-date")
    _qc(settings, by_scan)
    with session_scope(settings) as session:
        flagged = {d["series_uid"] for d in deviation_rows(session) if d["rule_id"] == "scanner_accredited"}
    assert len(flagged) == len(trial_pet_series(session, manual.trial))


def test_new_serial_of_a_known_model_is_flagged(settings, trial_dir, truth, tmp_path):
    with session_scope(settings) as session:
        load_register(session, trial_dir / "register.yaml", trial_fields=trial_fields)
    entry = _pet(truth)
    drop = tmp_path / "drop"
    drop.mkdir()
    for f in sorted((trial_dir / entry["path"]).glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.DeviceSerialNumber = "REPLACED-0001"
        ds.save_as(drop / f.name)
    with session_scope(settings) as session:
        ingest_path(session, settings, drop, site_code=entry["site"])
        new = session.exec(select(Scanner).where(Scanner.serial_number == "REPLACED-0001")).one()
        assert new.site_id is not None and "new serial number REPLACED-0001" in new.requalification_reason


def test_exports_and_report_carry_every_deviation(settings, trial_dir, truth, tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from reports.exports import deviation_schema, export_trial, header_table_schema
    from reports.render import render_report
    from reports.trial import trial_deviation_report

    _ingest_all(settings, trial_dir)
    _accredit_all(settings, truth["trial_code"])
    _qc(settings, load_manual(truth["trial_code"]))
    with session_scope(settings) as session:
        devs = deviation_rows(session, trial_code=truth["trial_code"])
        n_pet = len(trial_pet_series(session, truth["trial_code"]))
        paths = export_trial(session, truth["trial_code"], tmp_path / "x", fmt="parquet", manual_version="1.0.0")
        csv_paths = export_trial(session, truth["trial_code"], tmp_path / "x", fmt="csv")
        report = render_report(session, trial_deviation_report(session, truth["trial_code"], exports=paths),
                               data_dir=settings.data_dir, reports_dir=settings.reports_dir).html
    header = pq.read_table(paths["header_table"])
    assert header.schema.equals(header_table_schema(), check_metadata=False) and header.num_rows == n_pet
    assert header.schema.metadata[b"manual_version"] == b"1.0.0"
    uptake = _pet(truth, "uptake_out_of_window")
    row = next(r for r in header.to_pylist() if r["series_uid"] == uptake["series_uid"])
    assert row["uptake_min"] == pytest.approx(uptake["truth"]["uptake_min"], abs=0.01)
    exported = pq.read_table(paths["deviations"])
    assert exported.schema.equals(deviation_schema(), check_metadata=False)
    assert sorted(exported.column("id").to_pylist()) == sorted(d["id"] for d in devs)
    assert pacsv.read_csv(csv_paths["deviations"]).num_rows == len(devs)
    html = report.read_text()
    majors = {d["series_uid"] for d in devs if d["severity"] == "major"}
    assert f"{100 * len(majors) / n_pet:.0f} %" in html  # the trial-wide major rate
    for d in devs:
        assert d["rule_id"] in html and d["subject"] in html


def test_suv_and_export_commands(monkeypatch, capsys, settings, trial_dir, truth):
    from flows.cli import main

    monkeypatch.setenv("CORELAB_DATA_DIR", str(settings.data_dir))
    entry = _pet(truth)
    assert main(["suv", str(trial_dir / entry["path"]), "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert abs(result["factor_g_per_bq"] / entry["truth"]["suvbw_factor_g_per_bq"] - 1) < 1e-6
    assert main(["suv", str(trial_dir / _pet(truth, "wrong_units")["path"])]) == 1
    assert "CNTS" in capsys.readouterr().out
    assert main(["export", "--trial", truth["trial_code"], "--format", "csv", "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert Path(paths["header_table"]).is_file() and Path(paths["deviations"]).parent == settings.exports_dir
