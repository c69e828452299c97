"""The audit chain's anchor outside the table: truncation (newest rows, all rows) and a chain
rewritten consistently are detected and reported with numbers; an untouched chain is intact;
rolled-back events are never anchored; signed reports carry the head, and the CLI checks it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from jinja2 import DictLoader, Environment
from sqlmodel import Session, col, select

from corelab import audit
from corelab.db import open_store, session_scope
from corelab.models import AuditEvent


def _append(engine, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        with Session(engine) as session:  # one commit each, as the product does
            audit.append(session, actor="physicist", action="test", entity="series", entity_id=i, detail={"i": i})
            session.commit()


def _anchor_lines(settings) -> list[dict]:
    path = audit.anchor_path(settings.data_dir)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _check(engine) -> audit.AuditCheck:
    with Session(engine) as session:
        return audit.check(session)


def _rewrite_chain(engine, change) -> None:
    """What an attacker with write access to the table does: edit, then recompute every hash."""
    with Session(engine) as session:
        events = list(session.exec(select(AuditEvent).order_by(col(AuditEvent.id))))
        change(events)
        # New values first under temporary unique hashes, so no intermediate state collides.
        for i, event in enumerate(events):
            event.prev_hash, event.hash = f"tmp-prev-{i}", f"tmp-hash-{i}"
            session.add(event)
        session.flush()
        prev = audit.GENESIS
        for event in events:
            event.prev_hash = prev
            event.hash = audit._digest(prev, event)
            prev = event.hash
            session.add(event)
        session.commit()


def test_untouched_chain_is_intact_and_every_commit_is_anchored(store_settings):
    engine = open_store(store_settings)
    _append(engine, 6)
    lines = _anchor_lines(store_settings)
    assert [line["count"] for line in lines] == [1, 2, 3, 4, 5, 6]
    result = _check(engine)
    assert result.intact and result.problems == []
    assert (result.table_count, result.anchor_count, result.anchors_checked) == (6, 6, 6)
    assert result.table_head == result.anchor_head == lines[-1]["head"]
    with Session(engine) as session:
        assert audit.verify(session) == []


def test_deleting_the_newest_rows_is_detected_with_numbers(store_settings):
    engine = open_store(store_settings)
    _append(engine, 8)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM auditevent WHERE id > 5"))
    with Session(engine) as session:
        assert audit._chain_problems(list(session.exec(select(AuditEvent)))) == []  # the chain alone: "intact"
    result = _check(engine)
    assert not result.intact and (result.table_count, result.anchor_count) == (5, 8)
    [problem] = result.problems
    assert problem.event_id is None and problem.problem.startswith("truncated")
    assert "records 8 events" in problem.problem and "holds 5" in problem.problem and "newest 3 rows" in problem.problem
    # New events after the truncation do not hide it.
    _append(engine, 1, start=100)
    result = _check(engine)
    assert any(p.problem.startswith("truncated") and "holds 6" in p.problem for p in result.problems)
    assert any(p.problem.startswith("rewritten: event #6") for p in result.problems)


def test_deleting_all_rows_is_detected(store_settings):
    engine = open_store(store_settings)
    _append(engine, 4)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM auditevent"))
    result = _check(engine)
    assert [p.problem for p in result.problems] == [
        f"all rows deleted: the anchor (anchor.jsonl:4) records 4 events, head {_anchor_lines(store_settings)[-1]['head'][:16]}..., "
        "the table holds none"]
    assert (result.table_count, result.anchor_count) == (0, 4)


def test_a_consistently_rewritten_chain_is_detected(store_settings):
    engine = open_store(store_settings)
    _append(engine, 5)

    def change(events):
        events[1].actor = "mallory"  # event #2 now says someone else did it

    _rewrite_chain(engine, change)
    with Session(engine) as session:
        assert audit._chain_problems(list(session.exec(select(AuditEvent).order_by(col(AuditEvent.id))))) == []
    result = _check(engine)
    [problem] = result.problems
    assert problem.problem.startswith("rewritten: event #2")
    assert "4 of 5 anchored heads" in problem.problem  # #2 to #5 changed, #1 still matches
    assert problem.event_id == 2


def test_rewriting_and_truncating_the_whole_chain(store_settings):
    engine = open_store(store_settings)
    _append(engine, 5)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM auditevent WHERE id > 3"))

    def change(events):
        for event in events:
            event.detail = {"i": -1}

    _rewrite_chain(engine, change)
    problems = [p.problem for p in _check(engine).problems]
    assert any(p.startswith("truncated") and "newest 2 rows" in p for p in problems)
    assert any(p.startswith("rewritten: event #1") and "3 of 3" in p for p in problems)


def test_rolled_back_events_are_never_anchored(store_settings):
    engine = open_store(store_settings)
    _append(engine, 2)
    with Session(engine) as session:  # the whole transaction rolls back
        audit.append(session, actor="a", action="lost")
        session.flush()
        session.rollback()
    with Session(engine) as session:
        with pytest.raises(RuntimeError):
            audit.append(session, actor="a", action="lost-too")
            session.flush()
            raise RuntimeError("the change it recorded failed")
    assert [line["count"] for line in _anchor_lines(store_settings)] == [1, 2]
    assert _check(engine).intact
    with Session(engine) as session:  # a savepoint around the append rolls back, the rest commits
        try:
            with session.begin_nested():
                audit.append(session, actor="a", action="maybe")
                raise RuntimeError("undo")
        except RuntimeError:
            pass
        audit.append(session, actor="a", action="kept")
        session.commit()
    # (pysqlite does not really roll back to a savepoint, so "maybe" may be in the table; the
    # anchor counts what the table holds either way.)
    with Session(engine) as session:
        in_table = session.exec(select(sa.func.count()).select_from(AuditEvent)).one()
    assert [line["count"] for line in _anchor_lines(store_settings)] == [1, 2, in_table]
    assert _check(engine).intact


def test_concurrent_appenders_anchor_consistent_positions(store_settings):
    engine = open_store(store_settings)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            _append(engine, 10, start=100 * k)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    lines = _anchor_lines(store_settings)
    assert sorted(line["count"] for line in lines) == list(range(1, 41))
    result = _check(engine)
    assert result.intact and result.table_count == 40 and result.anchor_count == 40


def test_missing_anchor_file_is_reported(settings):
    engine = open_store(settings)
    _append(engine, 2)
    audit.anchor_path(settings.data_dir).unlink()
    [problem] = _check(engine).problems
    assert problem.problem.startswith("no anchor file") and "holds 2 events" in problem.problem


def _tiny_report(monkeypatch, session, settings):
    """Render one small report without WeasyPrint (the signing logic is what is tested)."""
    from reports import render

    monkeypatch.setattr(render, "_env", Environment(loader=DictLoader({"t.j2": "<html>{{ report.title }}</html>"})))
    monkeypatch.setattr(render, "html_to_pdf", lambda html, pdf: Path(pdf).write_bytes(b"%PDF-1.4 test"))
    spec = render.ReportSpec(kind="site_qc", key="S1_2024-01", title="Site QC report: S1", template="t.j2",
                             data={"n": 1})
    return render.render_report(session, spec, data_dir=settings.data_dir, reports_dir=settings.reports_dir)


def test_signed_reports_carry_the_head_and_the_cli_checks_them(settings, monkeypatch, capsys):
    from flows.cli import main
    from reports.render import sign_report

    monkeypatch.setenv("CORELAB_DATA_DIR", str(settings.data_dir))
    engine = open_store(settings)
    _append(engine, 3)
    with session_scope(settings) as session:
        result = _tiny_report(monkeypatch, session, settings)
    with session_scope(settings) as session:
        report = sign_report(session, result.report_id, signer="Dr Physicist", reason="approved",
                             data_dir=settings.data_dir)
        signature = Path(str(settings.data_dir / report.path).removesuffix(".html") + ".signature.json")
    record = json.loads(signature.read_text())
    lines = _anchor_lines(settings)
    assert (record["audit_count"], record["audit_head_hash"]) == (lines[-1]["count"], lines[-1]["head"]) == \
        (5, record["audit_event_hash"])  # 3 + report.render + report.sign
    assert main(["audit", "verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["intact"] and out["table_count"] == 5 and out["signature_records"] == 1 and out["anchors_checked"] == 6

    # An attacker deletes the newest rows *and* the anchor file: the signature record still knows.
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM auditevent WHERE id > 3"))
    audit.anchor_path(settings.data_dir).unlink()
    assert main(["audit", "verify"]) == 1
    text = capsys.readouterr().out
    assert "intact: False" in text and "table: 3 events" in text
    assert "truncated: the anchor (" + signature.name + ") records 5 events" in text
    assert "no anchor file" in text
