"""The scanner register (cadence, expiry, suspension after a change, history), the evaluation of
phantom series (fill-sheet provenance, series without times, centres by hand) and the CLI."""

from __future__ import annotations

import datetime as dt
import json

import pydicom
import pytest
import yaml
from sqlmodel import select

from accreditation.register import (Cadence, expiring_accreditations, require_requalification, scanner_record,
                                    update_accreditation)
from corelab.db import session_scope
from corelab.models import AuditEvent, PhantomResult, Scanner, Series, Site

TODAY = dt.date(2031, 6, 1)


@pytest.fixture
def scanner(settings):
    with session_scope(settings) as session:
        site = Site(code="S01", ae_title="S01")
        session.add(site)
        session.flush()
        sc = Scanner(site_id=site.id, code="S01-1", manufacturer="ACME", model="PET-9", serial_number="42")
        session.add(sc)
        session.flush()
        return sc.id


_N = iter(range(1, 10_000))


def _result(settings, scanner_id, kind, verdict, scan_date, standard="EARL1"):
    with session_scope(settings) as session:
        series = Series(series_uid=f"1.2.3.{next(_N)}", scanner_id=scanner_id, kind="phantom", state="complete")
        session.add(series)
        session.flush()
        metrics = ({"spheres": [{"diameter_mm": 37.0, "rc_mean": 0.8, "rc_max": 1.0}], "lung_residual": 3.0}
                   if kind == "nema_iec" else {"calibration_bias_pct": -1.0, "suv_mean": 0.99})
        r = PhantomResult(series_id=series.id, scanner_id=scanner_id, kind=kind, standard=standard,
                          standard_version="2017-01", verdict=verdict, metrics=metrics, corelab_version="0.test",
                          input_sha256="ab" * 32, scan_date=scan_date)
        session.add(r)
        session.flush()
        return r.id


def _update(settings, scanner_id, *, today=TODAY, cadence=Cadence()):
    with session_scope(settings) as session:
        acc = update_accreditation(session, scanner_id, standard="EARL1", scope="TRIAL-1", today=today,
                                   cadence=cadence)
        return acc.status, acc.valid_from, acc.valid_until


def test_cadence_status_and_coming_expiries(settings, scanner):
    assert _update(settings, scanner)[0] == "pending"
    _result(settings, scanner, "nema_iec", "pass", dt.date(2031, 1, 10))
    assert _update(settings, scanner)[0] == "pending"  # the calibration QC is still missing
    _result(settings, scanner, "uniform_cylinder", "pass", dt.date(2031, 3, 15))
    status, since, until = _update(settings, scanner)
    # the quarterly calibration ends first: 15 March + 92 days
    assert (status, since, until) == ("accredited", dt.date(2031, 3, 15), dt.date(2031, 6, 15))
    with session_scope(settings) as session:
        soon = expiring_accreditations(session, within_days=30, today=TODAY)
        assert [(e["scanner"], e["days_left"], e["status"]) for e in soon] == [("S01-1", 14, "accredited")]
        assert expiring_accreditations(session, within_days=7, today=TODAY) == []
        later = expiring_accreditations(session, within_days=30, today=dt.date(2031, 6, 20))
        assert later[0]["status"] == "expired" and later[0]["days_left"] == -5
    assert _update(settings, scanner, today=dt.date(2031, 6, 20))[0] == "expired"
    # a fresh cylinder renews it for a quarter; the NEMA scan's year ends it when that comes first
    _result(settings, scanner, "uniform_cylinder", "pass", dt.date(2031, 6, 18))
    assert _update(settings, scanner, today=dt.date(2031, 6, 20))[2] == dt.date(2031, 9, 18)
    _result(settings, scanner, "uniform_cylinder", "pass", dt.date(2031, 12, 1))
    assert _update(settings, scanner, today=dt.date(2031, 12, 2))[2] == dt.date(2032, 1, 10)
    _result(settings, scanner, "nema_iec", "fail", dt.date(2031, 6, 19))
    assert _update(settings, scanner, today=dt.date(2031, 6, 20))[0] == "failed"


def test_scanner_change_suspends_until_new_passing_phantoms(settings, scanner):
    _result(settings, scanner, "nema_iec", "pass", dt.date(2031, 5, 1))
    _result(settings, scanner, "uniform_cylinder", "pass", dt.date(2031, 5, 1))
    assert _update(settings, scanner)[0] == "accredited"
    with session_scope(settings) as session:
        accs = require_requalification(session, scanner, "software VG80 -> VG90", actor="test")
        assert [a.status for a in accs] == ["suspended"]
    assert _update(settings, scanner)[0] == "suspended"
    # one new passing phantom is not enough: both kinds must follow the change
    _result(settings, scanner, "nema_iec", "pass", dt.date(2031, 5, 20))
    assert _update(settings, scanner)[0] == "suspended"
    _result(settings, scanner, "uniform_cylinder", "fail", dt.date(2031, 5, 20))
    assert _update(settings, scanner)[0] == "suspended"
    _result(settings, scanner, "uniform_cylinder", "pass", dt.date(2031, 5, 21))
    status, since, _ = _update(settings, scanner)
    assert (status, since) == ("accredited", dt.date(2031, 5, 21))
    with session_scope(settings) as session:
        assert session.get(Scanner, scanner).requalification_reason is None
        actions = [e.action for e in session.exec(select(AuditEvent))]
        assert "scanner.requalification" in actions and "scanner.requalified" in actions


def _accreditation(settings, scanner_id):
    with session_scope(settings) as session:
        acc = update_accreditation(session, scanner_id, standard="EARL1", scope="TRIAL-1", today=TODAY)
        updates = len(session.exec(select(AuditEvent).where(AuditEvent.action == "accreditation.update")).all())
        return acc.status, acc.valid_from, acc.valid_until, list(acc.evidence), updates


def test_a_withheld_result_grants_fails_suspends_and_expires_nothing(settings, scanner):
    # alone, with a passing cylinder: the register stays pending
    cyl = _result(settings, scanner, "uniform_cylinder", "pass", dt.date(2031, 5, 1))
    _result(settings, scanner, "nema_iec", "withheld", dt.date(2031, 5, 2))
    assert _accreditation(settings, scanner)[:4] == ("pending", None, None, [cyl])
    # accredited: a newer withheld NEMA IEC result changes nothing (no update event either)
    nema = _result(settings, scanner, "nema_iec", "pass", dt.date(2031, 4, 20))
    before = _accreditation(settings, scanner)
    assert before[:4] == ("accredited", dt.date(2031, 5, 1), dt.date(2031, 8, 1), [nema, cyl])
    _result(settings, scanner, "nema_iec", "withheld", dt.date(2031, 5, 25))
    _result(settings, scanner, "uniform_cylinder", "withheld", dt.date(2031, 5, 25))
    assert _accreditation(settings, scanner) == before
    # failed stays failed: a withheld result does not clear a fail
    failed = _result(settings, scanner, "nema_iec", "fail", dt.date(2031, 5, 26))
    _result(settings, scanner, "nema_iec", "withheld", dt.date(2031, 5, 27))
    assert _accreditation(settings, scanner)[:4] == ("failed", None, None, [failed, cyl])
    # after a scanner change, withheld results do not requalify it
    _result(settings, scanner, "nema_iec", "pass", dt.date(2031, 5, 28))
    with session_scope(settings) as session:
        require_requalification(session, scanner, "software VG80 -> VG90", actor="test")
    _result(settings, scanner, "nema_iec", "withheld", dt.date(2031, 5, 29))
    _result(settings, scanner, "uniform_cylinder", "pass", dt.date(2031, 5, 29))
    assert _accreditation(settings, scanner)[0] == "suspended"
    with session_scope(settings) as session:
        assert session.get(Scanner, scanner).requalification_reason == "software VG80 -> VG90"
        history = scanner_record(session, "S01-1", today=TODAY)["phantom_results"]
    assert [h["verdict"] for h in history].count("withheld") == 5  # kept in the history


def test_reason_set_at_first_sight_counts_phantoms_from_then(settings, scanner):
    # ingest sets the reason when it meets a new serial number (no audit event of ours)
    with session_scope(settings) as session:
        session.get(Scanner, scanner).requalification_reason = "new serial number"
    assert _update(settings, scanner)[0] == "suspended"
    _result(settings, scanner, "nema_iec", "pass", TODAY)
    _result(settings, scanner, "uniform_cylinder", "pass", TODAY)
    assert _update(settings, scanner)[0] == "accredited"


def test_scanner_record_has_the_history(settings, scanner):
    _result(settings, scanner, "nema_iec", "fail", dt.date(2031, 4, 1))
    _result(settings, scanner, "nema_iec", "pass", dt.date(2031, 5, 1))
    _result(settings, scanner, "uniform_cylinder", "pass", dt.date(2031, 5, 1))
    _update(settings, scanner)
    with session_scope(settings) as session:
        rec = scanner_record(session, "S01-1", today=TODAY)
        assert scanner_record(session, "nope") is None
    assert rec["scanner"]["serial_number"] == "42"
    assert rec["accreditations"][0]["status"] == "accredited" and rec["accreditations"][0]["days_left"] == 61
    hist = rec["phantom_results"]
    assert len(hist) == 3 and [h["verdict"] for h in hist] == ["pass", "pass", "fail"]
    for h in hist:
        assert h["standard_version"] == "2017-01" and h["corelab_version"] == "0.test"
        assert len(h["input_sha256"]) == 64 and h["scan_date"]
    assert hist[1]["key_figures"]["rc_mean"] == {"37": 0.8}
    json.dumps(rec)


# ---------------------------------------------------------------------------------------------
# Evaluation of a DICOM phantom series
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nema_series(tmp_path_factory):
    """One NEMA IEC phantom series (5 mm voxels) written as DICOM, with its fill sheet."""
    from synth.spec import small_spec
    from synth.trial import _write_phantom

    out = tmp_path_factory.mktemp("phantom")
    spec = small_spec()
    scanner = next(s for s in spec.scanners if s.id == "A01-1")
    entry = _write_phantom(out, spec, scanner, "nema_iec", 0, dt.date(2031, 3, 4))
    return out / entry["path"], out / entry["phantom"]["fill_sheet"], entry


def test_series_without_times_takes_the_fill_as_at_scan_time(nema_series, tmp_path):
    from accreditation.evaluate import evaluate_series_folder
    from phantoms.fill import load_fill_sheet

    folder, fill_path, entry = nema_series
    fill = load_fill_sheet(fill_path)
    timed = evaluate_series_folder(folder, fill).to_dict()
    assert timed["fill"]["decay_factor"] < 1.0
    assert timed["fill"]["provenance"]["scan_time"] == "SeriesDate/SeriesTime of the images"
    assert timed["fill"]["decay_factor"] == pytest.approx(entry["phantom"]["decay_factor_to_scan_start"], rel=1e-3)
    # strip every time and the radiopharmaceutical sequence
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for kw in ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime",
                   "StudyTime", "RadiopharmaceuticalInformationSequence"):
            if kw in ds:
                delattr(ds, kw)
        ds.save_as(bare / f.name)
    untimed = evaluate_series_folder(bare, fill).to_dict()
    assert untimed["fill"]["decay_factor"] == 1.0 and untimed["fill"]["scan_time"] is None
    assert untimed["fill"]["values_kbq_ml"]["sphere_kbq_ml"] == fill.concentrations_kbq_ml["sphere_kbq_ml"]
    assert "no scan time" in untimed["fill"]["provenance"]["sphere_kbq_ml"]
    assert untimed["fill"]["provenance"]["scan_time"].startswith("none")
    # the image was made decayed, the truth is now undecayed: RC drops by the decay factor
    ratio = untimed["spheres"][-1]["rc_max"] / timed["spheres"][-1]["rc_max"]
    assert ratio == pytest.approx(timed["fill"]["decay_factor"], rel=1e-6)
    assert "background_variability" in untimed and "lung_residual" in untimed and "verdict" in untimed


def test_cli_analyze_with_centres_and_accreditation_show(nema_series, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("CORELAB_DATA_DIR", str(tmp_path / "data"))
    folder, fill_path, entry = nema_series
    centres = {int(float(d)): list(c) for d, c in entry["phantom"]["sphere_centres_mm"].items() if float(d) >= 22}
    (tmp_path / "centres.yaml").write_text(yaml.safe_dump(centres))
    code = main(["phantom", "analyze", str(folder), "--fill", str(fill_path), "--centres",
                 str(tmp_path / "centres.yaml"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and out["localisation"] == "given centres"
    assert [s["diameter_mm"] for s in out["spheres"]] == [10, 13, 17, 22, 28, 37]
    assert {"rc_max", "rc_mean", "rc_peak", "percent_contrast"} <= set(out["spheres"][0])
    (tmp_path / "bad.yaml").write_text("37: [1, 2]\n")
    assert main(["phantom", "analyze", str(folder), "--fill", str(fill_path), "--centres",
                 str(tmp_path / "bad.yaml")]) == 2
    assert "give [x, y, z]" in capsys.readouterr().err
    assert main(["accreditation", "show", "NOPE"]) == 2
    assert "no scanner 'NOPE'" in capsys.readouterr().err
    assert main(["accreditation", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_flow_artifact_markdown_has_rc_table_with_bands_and_margins(nema_series):
    from accreditation.evaluate import evaluate_series_folder
    from flows.accredit import _expiries_markdown, _markdown
    from phantoms.fill import load_fill_sheet

    folder, fill_path, _ = nema_series
    ev = evaluate_series_folder(folder, load_fill_sheet(fill_path), standard="EARL2")
    md = _markdown([{"series_uid": "1.2.3.4.5", "scanner": "A01-1", "kind": ev.kind, "verdict": ev.verdict,
                     "accreditation": "accredited", "valid_until": "2031-06-01", "metrics": ev.metrics,
                     "checks": ev.checks}], "EARL2")
    assert "| A01-1 |" in md and "## A01-1 NEMA IEC" in md
    assert "RCmean (A50) [band] margin" in md and "RCpeak (1 mL) [band] margin" in md
    assert "[0.85-1.00]" in md and "(unverified)" in md
    assert md.count("\n| 37 |") == 1
    assert "None." in _expiries_markdown([], 30)
