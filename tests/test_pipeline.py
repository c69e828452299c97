"""The demo end to end through Prefect, scored against the synthetic trial's ground truth.

One run of the real demo flow (the README's demo) in a Prefect test harness; a second run must
change nothing. In the slow suite (about 2 minutes; CI runs it, and `make demo` scores the same
ground truth on every CI run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import func, select

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_runs(prefect_harness, tmp_path_factory):
    import os

    data_dir = tmp_path_factory.mktemp("demo") / "corelab-data"
    old = os.environ.get("CORELAB_DATA_DIR")
    os.environ["CORELAB_DATA_DIR"] = str(data_dir)
    try:
        from corelab.db import open_store
        from corelab.settings import load_settings
        from flows.demo import demo

        settings = load_settings()
        open_store(settings)
        first = demo(seed=0, quiet=True)
        counts_first = _counts(settings)
        second = demo(seed=0, quiet=True)
        counts_second = _counts(settings)
        yield settings, first, second, counts_first, counts_second
    finally:
        if old is None:
            os.environ.pop("CORELAB_DATA_DIR", None)
        else:
            os.environ["CORELAB_DATA_DIR"] = old


def _counts(settings) -> dict:
    from corelab.db import session_scope
    from corelab.models import AuditEvent, Deviation, Instance, PhantomResult, QuarantineItem, Report, Series

    with session_scope(settings) as session:
        out = {m.__name__: session.exec(select(func.count()).select_from(m)).one()
               for m in (Series, Instance, Deviation, PhantomResult, QuarantineItem, AuditEvent)}
        out["deviation_states"] = sorted((d.rule_id, d.status, d.observed) for d in session.exec(select(Deviation)))
        out["reports"] = session.exec(select(func.count()).select_from(Report)).one()
    return out


def test_demo_finds_exactly_the_injected_problems(demo_runs):
    _, first, _, _, _ = demo_runs
    score = first["ground_truth_score"]
    assert score["expected"] >= 15
    assert score["missed"] == [] and score["unexpected"] == []
    assert score["found_expected"] == score["expected"]


def test_demo_accredits_the_good_scanners_and_fails_the_blurred_one(demo_runs):
    settings, first, _, _, _ = demo_runs
    from corelab.db import session_scope
    from corelab.queries import accreditation_rows

    with session_scope(settings) as session:
        status = {r["scanner"]: r["status"] for r in accreditation_rows(session)}
    assert status == {"A01-1": "accredited", "A01-2": "accredited", "B02-1": "accredited", "C03-1": "failed"}
    assert first["phantoms"] == {"analysed": 8, "pass": 7, "fail": 1}


def test_demo_series_states_and_report(demo_runs):
    settings, first, _, counts, _ = demo_runs
    from corelab.db import session_scope
    from corelab.queries import series_rows

    truth = json.loads((Path(first["synthetic_trial"]) / "ground_truth.json").read_text())
    with session_scope(settings) as session:
        rows = {r["series_uid"]: r for r in series_rows(session)}
    named = {p["series_uid"] for p in truth["problems"] if p["code"] == "patient_name_in_header"}
    assert named
    # an object that fails the de-identification check makes no row at all (not even a series)
    assert set(rows) == {s["series_uid"] for s in truth["series"]} - named
    for uid, row in rows.items():
        assert row["state"] == "complete" and row["qc_state"] == "done", row
    from corelab.models import QuarantineItem
    from sqlmodel import select
    with session_scope(settings) as session:
        held = session.exec(select(QuarantineItem)).all()
    assert named <= {q.series_uid for q in held if q.reason_code == "deid_failed"}
    report = Path(first["report"]).read_text()
    assert "data:image/png;base64," in report
    for needle in ("FDG-RESP-01", "A01", "B02", "C03", "uptake_window", "scanner_accredited", "failed"):
        assert needle in report


def test_second_demo_run_changes_nothing(demo_runs):
    _, first, second, counts_first, counts_second = demo_runs
    assert counts_second == {**counts_first, "reports": counts_second["reports"]}
    assert second["qc"]["deviations_new"] == second["qc"]["deviations_updated"] == 0
    assert second["phantoms"]["analysed"] == 0
    for site, r in second["ingested"].items():
        assert r["stored"] == 0 and r["duplicates"] == first["ingested"][site]["stored"]
    assert second["ground_truth_score"] == first["ground_truth_score"]


def test_second_demo_run_renders_no_report(demo_runs):
    _, first, second, counts_first, counts_second = demo_runs
    assert counts_second["reports"] == counts_first["reports"]
    assert all(r["status"] == "unchanged" for r in second["reports"].values())
    assert second["report"] == first["report"]


def test_both_routes_to_the_trial_report_make_the_same_report(demo_runs, capsys):
    """``corelab report render trial`` and the nightly/demo task render the same report: alternating
    them makes no new version (one use case: services.reports.publish_trial_report)."""
    settings, first, _, _, _ = demo_runs
    from flows.cli import main
    from tasks.reports import render_trial_report

    before = _counts(settings)
    capsys.readouterr()
    assert main(["report", "render", "trial", "--trial", first["trial"], "--json"]) == 0
    (cli,) = json.loads(capsys.readouterr().out)
    assert cli["status"] == "unchanged" and Path(cli["html"]).absolute() == Path(first["report"])
    assert render_trial_report(first["trial"]) == first["report"]
    assert main(["report", "render", "trial", "--trial", first["trial"], "--json"]) == 0
    (again,) = json.loads(capsys.readouterr().out)
    assert (again["status"], again["version"], again["report_id"]) == ("unchanged", cli["version"], cli["report_id"])
    assert _counts(settings) == before
    exports = sorted(p.name for p in settings.exports_dir.glob(f"{first['trial']}_*"))
    assert exports == [f"{first['trial']}_{name}.{fmt}" for name in ("deviations", "header_table")
                       for fmt in ("csv", "parquet")]


def test_no_planted_identifier_reaches_store_or_reports(demo_runs):
    settings, first, _, _, _ = demo_runs
    truth = json.loads((Path(first["synthetic_trial"]) / "ground_truth.json").read_text())
    name = next(p["planted_value"] for p in truth["problems"] if p["code"] == "patient_name_in_header")
    parts = [p.encode() for p in name.replace("^", " ").split() if len(p) > 2]
    produced = [p for p in settings.data_dir.rglob("*") if p.is_file()
                and not p.is_relative_to(settings.incoming_dir)      # the sites' input, as sent
                and not p.is_relative_to(settings.quarantine_dir)]   # held back as sent, by design
    assert produced
    for path in produced:
        data = path.read_bytes()
        assert not any(part in data for part in parts), f"planted identifier found in {path}"


def _tree(root: Path, skip: tuple[str, ...]) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


@pytest.fixture(scope="module")
def nightly_runs(demo_runs):
    from flows.nightly import nightly_qc

    settings = demo_runs[0]
    # Prefect's home and the GX project keep a history of runs by design; corelab's own state
    # (store, reports, exports, snapshots) is what must not change.
    skip = ("prefect", "gx", "corelab.db")
    first = nightly_qc(trial_code="FDG-RESP-01")
    counts_first, tree_first = _counts(settings), _tree(settings.data_dir, skip)
    second = nightly_qc(trial_code="FDG-RESP-01")
    return first, second, counts_first, _counts(settings), tree_first, _tree(settings.data_dir, skip)


def test_nightly_revalidates_the_day_and_writes_a_snapshot(nightly_runs, demo_runs):
    first, _, _, _, _, _ = nightly_runs
    settings = demo_runs[0]
    assert first["revalidated"] == demo_runs[1]["qc"]["series"] > 0
    assert first["snapshot"]["written"] and Path(first["snapshot"]["header_table"]).is_file()
    assert first["drift_alarms"] == []  # the demo's calibration errors are 0 % and +3 %
    charts = sorted((settings.reports_dir / "calibration").glob("*.png"))
    assert [c.stem for c in charts] == ["A01-1", "A01-2", "B02-1", "C03-1"]


def test_second_nightly_run_changes_nothing(nightly_runs):
    first, second, counts_first, counts_second, tree_first, tree_second = nightly_runs
    assert counts_second == counts_first
    assert tree_second == tree_first
    assert second["snapshot"]["written"] is False
    assert (second["deviations_new"], second["deviations_updated"], second["deviations_resolved"]) == (0, 0, 0)
