"""Forwarding accepted series to the trial's archive, against a real Orthanc (Debian's, on loopback).

Each test gets its own copy of the portal lab (tests/portal_helpers.py) narrowed to a few series
of the trial (the rest moved to a second trial, which must never reach this trial's archive), and
its own empty Orthanc. What Orthanc holds is compared with what the store says is due, computed
here from the index independently of the use case.
"""

from __future__ import annotations

import logging
import os
import stat

import pytest
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import ArchiveDelivery, AuditEvent
from portal.app import create_app
from services import forwarding
from tests.forwarding_helpers import lab, orthanc  # noqa: F401  (pytest fixtures)
from tests.forwarding_helpers import (assert_holds_exactly, expected, held, never_sent_elsewhere, records,
                                      set_dicom, set_stow, sha, store_new_version)
from tests.portal_helpers import client_for




def test_cstore_sends_every_due_instance_once_with_its_bytes(lab, orthanc):
    set_dicom(lab, orthanc)
    want = expected(lab)
    assert 40 <= len(want) <= 80
    [result] = forwarding.forward(lab.settings, lab.trial, batch_size=16)
    assert (result.sent, result.failed, result.errors) == (len(want), 0, [])
    assert_holds_exactly(lab, orthanc, want, whole_file=False)
    never_sent_elsewhere(lab, orthanc)
    recs = records(lab)
    assert sorted(r.instance_id for r in recs) == sorted(i.id for i in want.values())
    assert all(r.status == "sent" and r.attempts == 1 and r.sent_at and r.sha256 == want[r.sop_instance_uid].sha256
               for r in recs)
    # one audit event per series, with the digest of the sha256s delivered
    with session_scope(lab.settings) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "archive.delivered")).all()
    assert sorted(int(e.entity_id) for e in events) == lab.keep
    for e in events:
        digests = sorted(i.sha256 for i in want.values() if i.series_id == int(e.entity_id))
        assert e.detail["instances"] == len(digests)
        assert e.detail["sha256_digest"] == sha("\n".join(digests).encode())
    # a second run sends nothing
    [again] = forwarding.forward(lab.settings, lab.trial)
    assert (again.sent, again.failed, again.batches) == (0, 0, 0)
    assert len(orthanc.instances()) == len(want)
    assert [(r.id, r.attempts, r.sent_at) for r in records(lab)] == [(r.id, r.attempts, r.sent_at) for r in recs]

    # a new version of one instance is sent again, and only it
    inst = next(iter(want.values()))
    store_new_version(lab, inst)
    [third] = forwarding.forward(lab.settings, lab.trial)
    assert (third.sent, third.failed, third.replacements) == (1, 0, 1)  # Orthanc here accepts replacements
    want = expected(lab)
    assert want[inst.sop_instance_uid].version == 2
    assert_holds_exactly(lab, orthanc, want, whole_file=False)


def test_stow_sends_identical_files_once(lab, orthanc, tmp_path):
    set_stow(lab, orthanc, tmp_path)
    want = expected(lab)
    [result] = forwarding.forward(lab.settings, lab.trial, batch_size=20)
    assert (result.sent, result.failed, result.batches) == (len(want), 0, -(-len(want) // 20))
    assert_holds_exactly(lab, orthanc, want, whole_file=True)
    never_sent_elsewhere(lab, orthanc)
    assert all(r.status == "sent" and r.attempts == 1 for r in records(lab))
    [again] = forwarding.forward(lab.settings, lab.trial)
    assert (again.sent, again.batches) == (0, 0)
    assert len(orthanc.instances()) == len(want)
    assert all(r.attempts == 1 for r in records(lab))


def test_orthanc_killed_between_batches_then_restarted_loses_and_duplicates_nothing(lab, orthanc):
    set_dicom(lab, orthanc)
    want = expected(lab)
    [first] = forwarding.forward(lab.settings, lab.trial, batch_size=10, max_batches=2)
    assert (first.sent, first.failed) == (20, 0)
    orthanc.stop(kill=True)  # SIGKILL: a crash, not a shutdown
    [down] = forwarding.forward(lab.settings, lab.trial, batch_size=10, timeout_s=5)
    assert (down.sent, down.failed, down.batches) == (0, 10, 1)  # the run stops at the first dead batch
    assert "no association" in down.errors[0]
    with session_scope(lab.settings) as s:
        [row] = forwarding.backlog(s)
    assert (row["waiting"], row["failed"], row["pending"], row["sent"]) == (len(want) - 20, 10, len(want) - 30, 20)
    assert "no association" in row["last_error"] and row["oldest_waiting"] is not None
    orthanc.start()
    assert len(orthanc.instances()) == 20  # what it had before the crash
    [back] = forwarding.forward(lab.settings, lab.trial, batch_size=10)
    assert (back.sent, back.failed) == (len(want) - 20, 0)
    assert_holds_exactly(lab, orthanc, want, whole_file=False)
    recs = records(lab)
    assert len(recs) == len(want) == len({r.instance_id for r in recs})  # one record per instance
    assert all(r.status == "sent" for r in recs)
    assert sorted(r.attempts for r in recs) == [1] * (len(want) - 10) + [2] * 10
    with session_scope(lab.settings) as s:
        [row] = forwarding.backlog(s)
    assert (row["waiting"], row["failed"], row["sent"], row["last_error"]) == (0, 0, len(want), "")


def test_orthanc_killed_mid_association_then_restarted(lab, orthanc):
    """SIGKILL from another thread while one association is sending: whatever Orthanc kept or
    lost, the next run completes the set exactly."""
    import threading

    set_dicom(lab, orthanc)
    want = expected(lab)
    stopped = threading.Event()

    def kill_when_some_arrived():
        while not stopped.is_set():
            if orthanc.statistics()["CountInstances"] >= 5:
                orthanc.stop(kill=True)
                return

    killer = threading.Thread(target=kill_when_some_arrived)
    killer.start()
    try:
        [down] = forwarding.forward(lab.settings, lab.trial, batch_size=len(want), timeout_s=5)
    finally:
        stopped.set()
        killer.join()
    assert not orthanc.running
    assert down.failed >= 1 and down.sent + down.failed == len(want)
    orthanc.start()
    [back] = forwarding.forward(lab.settings, lab.trial, batch_size=len(want))
    assert (back.sent, back.failed) == (down.failed, 0)
    assert_holds_exactly(lab, orthanc, want, whole_file=False)
    assert all(r.status == "sent" for r in records(lab)) and len(records(lab)) == len(want)


def test_rule_evaluable_sends_only_evaluable_series(lab, orthanc):
    set_dicom(lab, orthanc, rule="evaluable")
    want = expected(lab, only_series=lab.evaluable)
    assert lab.evaluable and 0 < len(want) < len(expected(lab))
    [result] = forwarding.forward(lab.settings, lab.trial)
    assert result.sent == len(want)
    assert set(held(orthanc)) == set(want)


def test_wrong_password_is_a_clear_error_and_nothing_is_marked_sent(lab, orthanc, tmp_path, caplog):
    set_stow(lab, orthanc, tmp_path, password="not-the-password-4711")
    with caplog.at_level(logging.DEBUG):
        [result] = forwarding.forward(lab.settings, lab.trial, batch_size=20)
    assert result.sent == 0 and result.failed == 20 and result.batches == 1
    assert "HTTP 401" in result.errors[0] and "credentials" in result.errors[0]
    assert orthanc.instances() == []
    assert records(lab) and all(r.status == "failed" for r in records(lab))
    assert "not-the-password-4711" not in caplog.text


def test_password_never_shown_and_page_shows_the_store(lab, orthanc, tmp_path, caplog, capsys, monkeypatch):
    set_stow(lab, orthanc, tmp_path, rule="all")
    secret = orthanc.password
    kept = lab.settings.data_dir / "secrets" / f"archive-{lab.trial}.password"
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600 and kept.read_text() == secret
    with caplog.at_level(logging.DEBUG):
        [result] = forwarding.forward(lab.settings, lab.trial, batch_size=10, max_batches=2)
    assert result.sent == 20
    assert secret not in caplog.text
    monkeypatch.setenv("CORELAB_DATA_DIR", str(lab.settings.data_dir))
    from flows.cli import main

    for argv in (["archive", "show"], ["archive", "show", "--json"], ["archive", "backlog"]):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert orthanc.dicomweb_url in out and secret not in out
    with session_scope(lab.settings) as s:
        details = [e.detail for e in s.exec(select(AuditEvent).where(AuditEvent.action.like("archive.%")))]
        assert any(d.get("password") == "set" for d in details)
        assert secret not in repr(details)
        total = len(expected(lab))
        sent = len(s.exec(select(ArchiveDelivery).where(ArchiveDelivery.status == "sent")).all())
    assert sent == 20
    app = create_app(lab.settings)
    html = client_for(app, "phys").get("/archive").text
    assert secret not in html and orthanc.dicomweb_url in html
    assert f'<td class="sent">{sent}</td>' in html
    assert f'<td class="pending">{total - sent}</td>' in html and '<td class="failed">0</td>' in html
    assert client_for(app, "tm").get("/archive").status_code == 200
    assert client_for(app, "site-a").get("/archive").status_code == 403
    assert 'href="/archive"' in client_for(app, "phys").get("/worklist").text


def test_bad_destinations_are_refused_with_the_fix(lab, tmp_path):
    cases = [dict(dicom="ARCHIVE@host"), dict(dicom="A\\B@h:104"), dict(dicom="ARCHIVE@h:70000"),
             dict(stow_url="ftp://x/dicom-web"), dict(stow_url="https://u:p@x/dicom-web"),
             dict(stow_url="https://x/dicom-web", username="u"), dict(dicom="A@h:104", rule="some")]
    with session_scope(lab.settings) as s:
        for case in cases:
            with pytest.raises(forwarding.ForwardingError) as err:
                forwarding.set_destination(s, lab.settings, lab.trial, actor="test", **case)
            assert str(err.value)
        with pytest.raises(forwarding.ForwardingError, match="no trial"):
            forwarding.set_destination(s, lab.settings, "NOPE", dicom="A@h:104", actor="test")


def test_flow_fails_when_the_archive_is_down_then_delivers(lab, orthanc, monkeypatch, prefect_harness):
    from prefect.artifacts import Artifact

    from flows.forward import BACKLOG_KEY, forward_to_archive

    monkeypatch.setenv("CORELAB_DATA_DIR", str(lab.settings.data_dir))
    set_dicom(lab, orthanc)
    want = expected(lab)
    orthanc.stop()
    state = forward_to_archive(batch_size=25, timeout_s=3, retry_delays_s=[0.1], return_state=True)
    assert state.is_failed()
    assert all(r.status == "failed" and r.attempts == 2 for r in records(lab))  # the task ran twice
    assert not records(lab)[0].sent_at
    orthanc.start()
    state = forward_to_archive(batch_size=25, timeout_s=5, retry_delays_s=[0.1], return_state=True)
    assert state.is_completed()
    [summary] = state.result()
    assert summary["sent"] == len(want)
    assert_holds_exactly(lab, orthanc, want, whole_file=False)
    artifact = Artifact.get(BACKLOG_KEY)
    assert artifact is not None and str(len(want)) in str(artifact.data) and orthanc.password not in str(artifact.data)
