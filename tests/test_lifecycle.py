"""The series lifecycle: one table of states and transitions, one owner that moves a series."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlmodel import select

from corelab import lifecycle
from corelab.completeness import GAP_FACTOR, assess, slice_steps
from corelab.db import get_engine, migrate, open_store, session_scope
from corelab.lifecycle import QC_TRANSITIONS, STATE_TRANSITIONS, IllegalTransition, claim, move
from corelab.models import AuditEvent, QC_STATES, SERIES_STATES, Series, Site, Study, Subject, Trial, Visit

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("corelab", "phantoms", "expectations", "accreditation", "reports", "services", "tasks", "portal",
           "flows", "synth")


def _series(session, uid="1.2.3", **values) -> Series:
    series = Series(series_uid=uid, **values)
    session.add(series)
    session.flush()
    return series


def _events(session, uid) -> list[AuditEvent]:
    return list(session.exec(select(AuditEvent).where(AuditEvent.entity_id == uid)))


def test_the_table_covers_every_state():
    assert set(STATE_TRANSITIONS) == set(SERIES_STATES) and set(QC_TRANSITIONS) == set(QC_STATES)
    assert "running" in QC_TRANSITIONS["queued"] and QC_TRANSITIONS["running"] == {"done", "failed"}


@pytest.mark.parametrize("column,table", [("state", STATE_TRANSITIONS), ("qc_state", QC_TRANSITIONS)])
def test_every_legal_transition_moves_and_writes_one_audit_event(settings, column, table):
    open_store(settings)
    pairs = [(old, new) for old, targets in table.items() for new in sorted(targets)]
    with session_scope(settings) as session:
        for i, (old, new) in enumerate(pairs):
            series = _series(session, f"9.{column}.{i}", **{column: old})
            assert move(session, series, **{column: new}, actor="test", reason="because") is True
            assert getattr(series, column) == new
            events = _events(session, series.series_uid)
            if new == old:  # a QC re-run (done -> done, failed -> failed): stamped, no new event
                assert events == [] and series.qc_at is not None
                continue
            [event] = events
            assert (event.action, event.actor) == (f"series.{column}", "test")
            assert event.detail == {"from": old, "to": new, "reason": "because"}


@pytest.mark.parametrize("column,table,states", [("state", STATE_TRANSITIONS, SERIES_STATES),
                                                 ("qc_state", QC_TRANSITIONS, QC_STATES)])
def test_an_illegal_transition_is_refused(settings, column, table, states):
    open_store(settings)
    illegal = [(old, new) for old in states for new in states if new != old and new not in table[old]]
    assert illegal  # the table does refuse something
    with session_scope(settings) as session:
        for i, (old, new) in enumerate(illegal):
            series = _series(session, f"8.{column}.{i}", **{column: old})
            with pytest.raises(IllegalTransition, match=f"cannot go from '{old}' to '{new}'"):
                move(session, series, **{column: new}, actor="test")
            assert getattr(series, column) == old and _events(session, series.series_uid) == []
        series = _series(session, f"8.{column}.unknown")
        with pytest.raises(IllegalTransition, match="is not a state"):
            move(session, series, **{column: "lost"}, actor="test")
        # both columns are checked before either moves
        series = _series(session, f"8.{column}.both", state="receiving", qc_state="running")
        with pytest.raises(IllegalTransition):
            move(session, series, state="complete", qc_state="pending", actor="test")
        assert (series.state, series.qc_state) == ("receiving", "running")


def test_staying_put_changes_nothing(settings):
    open_store(settings)
    with session_scope(settings) as session:
        series = _series(session, state="complete", qc_state="pending")
        assert move(session, series, state="complete", qc_state="pending", actor="test") is False
        assert _events(session, series.series_uid) == [] and series.qc_at is None


def test_claim_wins_once_and_start_running_skips_a_recheck(settings):
    open_store(settings)
    with session_scope(settings) as session:
        ids = [_series(session, f"7.{i}", state="complete").id for i in range(3)]
        _series(session, "7.receiving")
    with session_scope(settings) as session:
        assert claim(session, ids[0], actor="receiver", action="series.qc_queued").qc_state == "queued"
        assert claim(session, ids[0], actor="receiver") is None  # already claimed
        assert claim(session, session.exec(select(Series.id).where(Series.series_uid == "7.receiving")).one(),
                     actor="receiver") is None  # not complete
    with session_scope(settings) as session:
        rows = [session.get(Series, i) for i in ids]
        move(session, rows[2], qc_state="done", actor="test")
        moved = lifecycle.start_running(session, rows, actor="qc")
        assert [s.id for s in moved] == ids[:2]  # queued and pending; the done one is a re-check
        assert [s.qc_state for s in rows] == ["running", "running", "done"]
        [batch] = session.exec(select(AuditEvent).where(AuditEvent.detail["to"].as_string() == "running")).all()
        assert batch.detail["from"] == {"7.0": "queued", "7.1": "pending"}
        with pytest.raises(IllegalTransition):
            lifecycle.move_all(session, rows, qc_state="pending", actor="qc")
        assert [s.qc_state for s in rows] == ["running", "running", "done"]


def _assigned_states(path: Path) -> list[str]:
    """``x.state = ...``, ``x.qc_state = ...`` (also in tuples and augmented), ``setattr(x, "qc_state", ...)``
    and ``.values(state=..., qc_state=...)`` in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def targets(node):
        if isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                yield from targets(elt)
        elif isinstance(node, ast.Attribute) and node.attr in ("state", "qc_state"):
            yield node

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            hits = [t for target in node.targets for t in targets(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            hits = list(targets(node.target))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            hits = [node] if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                and node.args[1].value in ("state", "qc_state") else []
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "values":
            hits = [node] if any(k.arg in ("state", "qc_state") for k in node.keywords) else []
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{hit.lineno}" for hit in hits]
    return found


def test_only_the_lifecycle_writes_a_series_state():
    files = [p for pkg in PRODUCT if (ROOT / pkg).is_dir() for p in sorted((ROOT / pkg).rglob("*.py"))
             if "migrations" not in p.parts and p != ROOT / "corelab" / "lifecycle.py"]
    assert len(files) > 40
    offenders = [hit for path in files for hit in _assigned_states(path)]
    # raw SQL too: UPDATE series SET state / qc_state
    offenders += [f"{p.relative_to(ROOT)}" for p in files
                  if re.search(r"update\s+series\s+set\s+[^;]*\b(qc_)?state\b", p.read_text(), re.I)]
    assert offenders == [], f"write the series state through corelab.lifecycle.move: {offenders}"
    # and the check finds what it looks for
    assert len(_assigned_states(ROOT / "corelab" / "lifecycle.py")) >= 2


def test_migration_0004_fills_trial_id_for_existing_series(settings):
    settings.ensure_dirs()
    engine = get_engine(settings)
    migrate(engine, "0003")
    with engine.begin() as conn:
        run = lambda sql: conn.execute(sa.text(sql))  # noqa: E731
        run("INSERT INTO trial (id, code, title, imaging_manual, manual_version, standard, pseudonym_pattern, "
            "deid_policy, created_at) "
            "VALUES (5, 'T5', '', '', '', 'EARL1', '', '{}', '2030-01-01 00:00:00')")
        run("INSERT INTO site (id, code, name, ae_title, created_at) VALUES (1, 'S', '', 'S', '2030-01-01 00:00:00')")
        run("INSERT INTO subject (id, trial_id, site_id, pseudonym) VALUES (1, 5, 1, 'P1')")
        run("INSERT INTO visit (id, subject_id, label) VALUES (1, 1, 'baseline')")
        run("INSERT INTO study (id, study_uid, site_id, visit_id, description) VALUES (1, '1.1', 1, 1, '')")
        run("INSERT INTO study (id, study_uid, site_id, visit_id, description) VALUES (2, '1.2', 1, NULL, '')")
        for sid, uid, study, kind in ((1, "2.1", 1, "trial"), (2, "2.2", 2, "phantom"), (3, "2.3", 2, "unknown")):
            run(f"INSERT INTO series (id, series_uid, study_id, site_id, modality, kind, description, received_at, "
                f"instance_count, completeness, state, qc_state, header_row) VALUES ({sid}, '{uid}', {study}, 1, "
                f"'PT', '{kind}', '', '2030-01-01 00:00:00', 0, '{{}}', 'complete', 'pending', '{{}}')")
    open_store(settings)
    with session_scope(settings) as session:
        assert {s.series_uid: s.trial_id for s in session.exec(select(Series))} == {"2.1": 5, "2.2": 5, "2.3": None}


def test_ingest_sets_the_series_trial(settings, tmp_path):
    from corelab.ingest import ingest_path
    from tests.receiver_helpers import small_series

    open_store(settings)
    with session_scope(settings) as session:
        session.add(Site(code="S1", ae_title="SITE1"))
        session.add(Trial(code="TRIAL-1", title="", standard="EARL1"))
    small_series(tmp_path / "drop", 3)
    with session_scope(settings) as session:
        ingest_path(session, settings, tmp_path / "drop", site_code="S1")
        series = session.exec(select(Series)).one()
        trial = session.exec(select(Trial)).one()
        chain = session.exec(select(Subject.trial_id).join(Visit, Visit.subject_id == Subject.id)
                             .join(Study, Study.visit_id == Visit.id).where(Study.id == series.study_id)).first()
        assert series.trial_id == trial.id and chain in (None, trial.id)
        assert series.state == "complete"
        [event] = session.exec(select(AuditEvent).where(AuditEvent.action == "series.state")).all()
        assert (event.detail["from"], event.detail["to"]) == ("receiving", "complete")


def test_one_missing_slice_rule():
    positions = np.arange(10) * 3.27
    assert slice_steps(positions).gaps == 0
    assert slice_steps(np.delete(positions, 4)).gaps == 1
    assert slice_steps(np.delete(positions, [3, 4, 5])).gaps == 3
    # a step just under GAP_FACTOR spacings is nearer one spacing: no slice missing
    short = np.append(positions, positions[-1] + (GAP_FACTOR - 0.01) * 3.27)
    assert slice_steps(short).gaps == 0
    assert assess(list(np.delete(positions, 4)), instance_count=9, expected_count=None)["gaps"] == 1
    from expectations.header_table import missing_slices

    assert missing_slices(np.delete(positions, 4), expected=None) == slice_steps(np.delete(positions, 4)).gaps
