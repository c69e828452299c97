"""Two writers at once, with the interleaving forced (tests/interleave.py) at every statement:
a quarantined object and a rival creator of its series, a completion and a late object, the node's
start-up recovery and another process's uncommitted object, two fill sheets, an answer and a
resolution of one query, and two forwarding runs finishing one series. Each failed before its fix.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import event
from sqlmodel import Session, select

from corelab.db import make_engine, open_store, session_scope
from corelab.fill_sheets import FILL_SHEET, FillSheetRefused, attach
from corelab.models import (ArchiveDelivery, ArchiveDestination, AuditEvent, Deviation, Instance, Query, Series,
                            Site, Study, Trial, utcnow)
from corelab.receiver_store import Store
from corelab.series_completion import complete_stable_series, recover
from corelab.series_files import series_dir
from corelab.spool_io import sha256_bytes
from services import forwarding, forwarding_due, review
from tests import hostile_objects as hostile
from tests.interleave import Interleave
from tests.test_ingest import _lab_with_two_sites


def _a01(settings) -> int:
    with session_scope(settings) as s:
        return s.exec(select(Site.id).where(Site.code == "A01")).one()


def _accept(store, ds, site_id, ordinal=1):
    return store.accept(hostile.encode(ds), sop_instance_uid=ds.SOPInstanceUID, site_id=site_id, source="x",
                        ordinal=ordinal)


def test_a_held_object_keeps_its_series_out_of_completion_whoever_created_the_series(store_settings):
    _lab_with_two_sites(store_settings)
    engine, site_id = open_store(store_settings), _a01(store_settings)
    store = Store(store_settings, engine)
    for n in range(20):
        good = hostile.dataset()
        bad = hostile.dataset(study=good.StudyInstanceUID, series=good.SeriesInstanceUID,
                              SeriesDescription=f"{hostile.NAME}^Anna")
        with Interleave(engine, n, lambda: _accept(store, good, site_id, 2)) as il:
            out = _accept(store, bad, site_id)
        rival = il.result if il.in_time else _accept(store, good, site_id, 2)
        assert (out.reason_code, rival.status) == ("deid_failed", "stored")
        complete_stable_series(engine, stable_s=60, now=utcnow() + timedelta(seconds=120))
        with session_scope(store_settings) as s:
            series = s.exec(select(Series).where(Series.series_uid == good.SeriesInstanceUID)).one()
            assert (series.state, series.qc_state) == ("quarantined", "pending"), n
        if not il.in_time:
            break
    assert n >= 3


def test_a_late_object_during_completion_reopens_the_series(store_settings):
    _lab_with_two_sites(store_settings)
    engine, site_id = open_store(store_settings), _a01(store_settings)
    store = Store(store_settings, engine)
    for n in range(40):
        first = hostile.dataset()
        _accept(store, first, site_id)
        with session_scope(store_settings) as s:  # only this series is due
            for other in s.exec(select(Series).where(Series.series_uid != first.SeriesInstanceUID)):
                other.last_received_at = other.completed_at
        late = hostile.dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID)
        with Interleave(engine, n, lambda: _accept(store, late, site_id)) as il:
            complete_stable_series(engine, stable_s=60, now=utcnow() + timedelta(seconds=120))
        if not il.in_time:
            break
        complete_stable_series(engine, stable_s=60, now=utcnow() + timedelta(hours=1))
        with session_scope(store_settings) as s:
            series = s.exec(select(Series).where(Series.series_uid == first.SeriesInstanceUID)).one()
            shas = sorted(s.exec(select(Instance.sha256).where(Instance.series_id == series.id)).all())
            assert len(shas) == 2 and series.instance_count == 2, n
            assert series.state == "complete" and series.checksum == sha256_bytes("\n".join(shas).encode()), n
    assert n >= 2  # before the ticker's read and before its claim (its first write)


def test_recovery_at_start_keeps_another_processs_uncommitted_first_object(store_settings):
    _lab_with_two_sites(store_settings)
    portal, node = open_store(store_settings), make_engine(store_settings.database_url)
    ds, me, seen = hostile.dataset(), threading.get_ident(), {}

    def before(conn, cursor, statement, params, context, executemany):
        # the file is durable, its rows flushed, the commit not yet made: the node starts now
        if threading.get_ident() == me and not seen and list(store_settings.spool_dir.rglob("*.dcm")):
            t = threading.Thread(target=lambda: seen.update(recover(store_settings, node)))
            t.start()
            t.join(60)

    event.listen(portal, "before_cursor_execute", before)
    try:
        out = _accept(Store(store_settings, portal), ds, _a01(store_settings))
    finally:
        event.remove(portal, "before_cursor_execute", before)
    assert out.status == "stored" and seen.get("unattributed_kept") == 1
    with session_scope(store_settings) as s:
        inst = s.exec(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
    assert (store_settings.data_dir / inst.path).is_file()


def _sheet(tag: str) -> bytes:
    return f"kind: nema_iec\nsphere_kbq_ml: 20\nbackground_kbq_ml: 5\n# {tag}\n".encode()


def _phantom(settings, n: int):
    with session_scope(settings) as s:
        study = Study(study_uid=f"1.2.3.{n}", site_id=_a01(settings))
        s.add(study)
        s.flush()
        series = Series(series_uid=f"1.2.4.{n}", study_id=study.id, site_id=study.site_id, kind="phantom",
                        state="complete", qc_state="failed")
        s.add(series)
        s.flush()
        folder = series_dir(settings, series, s)
        folder.mkdir(parents=True, exist_ok=True)
        return series.id, folder / FILL_SHEET


def _attach(settings, series_id, tag, **kw):
    with session_scope(settings) as s:
        return attach(s, settings, s.get(Series, series_id), _sheet(tag), **kw)


def test_a_sites_sheet_never_replaces_a_physicists_committed_meanwhile(store_settings):
    _lab_with_two_sites(store_settings)
    engine = open_store(store_settings)
    for n in range(20):
        sid, path = _phantom(store_settings, n)
        with Interleave(engine, n, lambda: _attach(store_settings, sid, "physicist", actor="phys", replace=True)) as il:
            try:
                _attach(store_settings, sid, "site", actor="site", replace=False)
            except FillSheetRefused:
                pass
        if not il.in_time:
            break
        assert path.read_bytes().endswith(b"# physicist\n"), n
    assert n >= 3


def test_a_rolled_back_replacement_never_undoes_a_sheet_committed_meanwhile(store_settings):
    _lab_with_two_sites(store_settings)
    engine = open_store(store_settings)
    for n in range(20):
        sid, path = _phantom(store_settings, 100 + n)
        _attach(store_settings, sid, "S0", actor="phys", replace=True)
        with Interleave(engine, n, lambda: _attach(store_settings, sid, "S1", actor="phys-a", replace=True)) as il:
            with pytest.raises(RuntimeError):
                with session_scope(store_settings) as s:
                    attach(s, store_settings, s.get(Series, sid), _sheet("S2"), actor="phys-b", replace=True)
                    raise RuntimeError("this request fails after its sheet was written")
        if not il.in_time:
            break
        assert path.read_bytes().endswith(b"# S1\n"), n
    assert n >= 3


def test_an_answer_and_a_resolution_at_once_both_stay_in_the_thread(store_settings):
    _lab_with_two_sites(store_settings)
    engine = open_store(store_settings)
    for n in range(20):
        with session_scope(store_settings) as s:
            study = Study(study_uid=f"1.2.3.{n}", site_id=_a01(store_settings))
            s.add(study)
            s.flush()
            series = Series(series_uid=f"1.2.4.{n}", study_id=study.id, site_id=study.site_id)
            s.add(series)
            s.flush()
            dev = Deviation(series_id=series.id, rule_id="R1")
            s.add(dev)
            s.flush()
            qid = review.open_query(s, dev.id, "why?", actor="phys")["query"]

        def resolve(qid=qid):
            with session_scope(store_settings) as s:
                return review.resolve_query(s, qid, actor="phys2", text="fine")

        answered = True
        with Interleave(engine, n, resolve) as il:
            try:
                with session_scope(store_settings) as s:
                    review.answer_query(s, qid, "because", site_code="A01", actor="site-user")
            except Exception as exc:  # noqa: BLE001 - refused: the resolution came first (right)
                assert "resolved" in str(exc)
                answered = False
        if not il.in_time:
            break
        with session_scope(store_settings) as s:
            q = s.get(Query, qid)
            kinds = [m["kind"] for m in q.thread]
            assert "resolution" in kinds and ("answer" in kinds) == answered, (n, kinds)
            assert q.status == "resolved" and s.get(Deviation, q.deviation_id).status == "resolved", n
    assert n >= 3


def test_two_forwarding_runs_finishing_one_series_audit_its_delivery_once(store_settings):
    _lab_with_two_sites(store_settings)
    engine = open_store(store_settings)
    with session_scope(store_settings) as s:
        trial = s.exec(select(Trial).where(Trial.code == "T1")).one()
        study = Study(study_uid="1.2.3", site_id=_a01(store_settings))
        s.add(study)
        s.flush()
        series = Series(series_uid="1.2.4", study_id=study.id, site_id=study.site_id, trial_id=trial.id,
                        kind="trial", state="complete", qc_state="done")
        s.add(series)
        s.flush()
        insts = [Instance(series_id=series.id, sop_instance_uid=f"1.2.5.{i}", path=f"x{i}", sha256=f"{i:064d}",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.128", size_bytes=1) for i in (1, 2)]
        s.add_all(insts)
        s.add(ArchiveDestination(trial_id=trial.id, kind="dicom", ae_title="ARCH", host="127.0.0.1", port=104))
        s.flush()
        series_id, inst_ids = series.id, [i.id for i in insts]
    claims = []
    for iid in inst_ids:  # run 1 claimed instance 1, run 2 instance 2
        with session_scope(store_settings) as s:
            dest = s.exec(select(ArchiveDestination)).one()
            rec_id, attempts = forwarding_due.claim(s, dest, [s.get(Instance, iid)])[iid]
            claims.append({rec_id: (iid, attempts, series_id, False)})
    first_recorded = threading.Event()

    def run(k: int):
        with Session(engine) as s:
            forwarding._record(s, s.get(ArchiveDestination, dest.id), "T1", {next(iter(claims[k])): ""}, claims[k],
                               actor=f"run{k}")
            if k == 0:  # the first run has asked what still waits; it commits a moment later
                first_recorded.set()
                time.sleep(0.5)
            s.commit()

    one = threading.Thread(target=run, args=(0,))
    one.start()
    assert first_recorded.wait(30)
    run(1)
    one.join(30)
    with session_scope(store_settings) as s:
        assert s.exec(select(ArchiveDelivery.status)).all() == ["sent", "sent"]
        assert len(s.exec(select(AuditEvent).where(AuditEvent.action == "archive.delivered")).all()) == 1
