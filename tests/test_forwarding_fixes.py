"""Forwarding under stress, against a real Orthanc that counts what it receives: two runs at once,
the same SOP Instance UID in two series, a streamed STOW-RS body, batches capped in bytes, no
batch that loads the trial, a new version to an archive that keeps the first object, new
versions held under the rule ``evaluable``, a send that breaks off, and credentials over http.
"""

from __future__ import annotations

import io
import threading
import tracemalloc
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import event
from sqlmodel import select

from corelab.archive_send import ArchiveError, Outgoing, send_stow
from corelab.db import session_scope
from corelab.models import AuditEvent, Instance, Series
from portal.app import create_app
from services import forwarding, forwarding_due, review
from services.site_view import flag_sets, series_state
from tests.forwarding_helpers import lab, orthanc  # noqa: F401  (pytest fixtures)
from tests.forwarding_helpers import (assert_holds_exactly, expected, expected_per_series, held, records,
                                      set_dicom, set_stow, sha, start_orthanc, store_new_version)
from tests.portal_helpers import client_for



@pytest.mark.parametrize("kind,retry", [("stow", False), ("dicom", True)])
def test_two_runs_at_once_send_each_instance_exactly_once(lab, orthanc, tmp_path, kind, retry):
    """Two runs (a deployment and `corelab archive forward --direct`) start together, on new
    records (both insert them) or, with ``retry``, on records an earlier run left failed."""
    (set_stow(lab, orthanc, tmp_path) if kind == "stow" else set_dicom(lab, orthanc))
    want = expected(lab)
    if retry:
        orthanc.stop(kill=True)
        [down] = forwarding.forward(lab.settings, lab.trial, batch_size=len(want), timeout_s=3)
        assert down.failed == len(want) and {r.status for r in records(lab)} == {"failed"}
        orthanc.start()
    barrier = threading.Barrier(2)
    results, errors = [], []

    def run():
        try:
            barrier.wait(timeout=10)
            results.append(forwarding.forward_trial(lab.settings, lab.trial, batch_size=4))
        except Exception as exc:  # surfaced below: a thread's error must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2
    assert sum(r.sent for r in results) == len(want) and sum(r.failed for r in results) == 0
    assert all(r.sent > 0 for r in results), "the runs did not overlap: the test proves nothing"
    assert orthanc.received() == Counter({uid: 1 for uid in want})  # what reached the archive, counted there
    recs = records(lab)
    assert sorted(r.instance_id for r in recs) == sorted(i.id for i in want.values())
    assert all(r.status == "sent" and r.attempts == 1 + retry for r in recs)
    assert_holds_exactly(lab, orthanc, want, whole_file=kind == "stow")


def test_due_is_per_series_when_a_sop_uid_is_in_two_series(lab, orthanc):
    """An object of series B carrying a SOP Instance UID of series A, at a higher version (what
    ingest allowed before uid_conflict): each series sends the newest version of its own."""
    a, b = lab.keep[0], lab.keep[1]
    with session_scope(lab.settings) as s:
        victim = s.exec(select(Instance).where(Instance.series_id == a).order_by(Instance.id)).first()
        donor = s.exec(select(Instance).where(Instance.series_id == b).order_by(Instance.id)).first()
        top = max(s.exec(select(Instance.version).where(Instance.sop_instance_uid == victim.sop_instance_uid)))
        ds = pydicom.dcmread(lab.settings.data_dir / donor.path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = victim.sop_instance_uid
        path = lab.settings.data_dir / "clash.dcm"
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        s.add(Instance(series_id=b, sop_instance_uid=victim.sop_instance_uid, sop_class_uid=donor.sop_class_uid,
                       version=top + 1, path="clash.dcm", sha256=sha(data), size_bytes=len(data)))
    set_dicom(lab, orthanc)
    want = expected_per_series(lab)
    assert (a, victim.sop_instance_uid) in want and (b, victim.sop_instance_uid) in want
    [result] = forwarding.forward(lab.settings, lab.trial, batch_size=25)
    assert (result.sent, result.failed) == (len(want), 0)
    assert sorted(r.instance_id for r in records(lab)) == sorted(i.id for i in want.values())
    assert len(orthanc.instances()) == len(want)  # two series, two objects in the archive


def big_instances(directory, n: int, rows: int = 1024, cols: int = 2048) -> list[Outgoing]:
    """``n`` secondary-capture files of ``rows * cols * 2`` bytes of pixel data each."""
    rng = np.random.default_rng(15)
    study, series, out = generate_uid(), generate_uid(), []
    for k in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = study, series, "ANON15", "OT"
        ds.InstanceNumber, ds.Rows, ds.Columns = k + 1, rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
        path = directory / f"big{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(Outgoing(k, path, ds.SOPClassUID, ds.SOPInstanceUID))
    return out


def test_stow_body_streams_from_the_spool_in_bounded_memory(orthanc, tmp_path):
    items = big_instances(tmp_path, 12)  # 12 x 4 MiB
    total = sum(i.path.stat().st_size for i in items)
    tracemalloc.start()
    try:
        answer = send_stow(items, url=orthanc.dicomweb_url, username=orthanc.username, password=orthanc.password)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer == {i.key: "" for i in items}
    assert peak < 8 << 20 < total, f"peak {peak / 2**20:.1f} MiB for a {total / 2**20:.0f} MiB batch"
    got = held(orthanc)
    assert {uid: sha(data) for uid, data in got.items()} == {i.sop_instance_uid: sha(i.path.read_bytes())
                                                             for i in items}


def test_batches_are_capped_in_bytes(lab, orthanc, tmp_path):
    set_stow(lab, orthanc, tmp_path)
    want = expected(lab)
    sizes = sorted(i.size_bytes for i in want.values())
    # a cap below any two instances: one per request, whatever the batch size
    [result] = forwarding.forward(lab.settings, lab.trial, batch_size=50, batch_bytes=sizes[0] + sizes[1] - 1,
                                  max_batches=3)
    assert (result.batches, result.sent) == (3, 3)
    [rest] = forwarding.forward(lab.settings, lab.trial, batch_size=50)
    assert (rest.sent, rest.batches) == (len(want) - 3, -(-(len(want) - 3) // 50))
    assert orthanc.received() == Counter({uid: 1 for uid in want})


def test_a_batch_loads_its_rows_only_and_the_page_caps_the_series(lab, orthanc, monkeypatch):
    set_dicom(lab, orthanc)
    want = expected(lab)
    loaded = []
    listener = lambda target, context: loaded.append(target.id)  # noqa: E731
    event.listen(Instance, "load", listener)
    try:
        [result] = forwarding.forward(lab.settings, lab.trial, batch_size=10, max_batches=3)
        with session_scope(lab.settings) as s:
            [row] = forwarding.backlog(s)
    finally:
        event.remove(Instance, "load", listener)
    assert (result.sent, result.batches) == (30, 3)
    assert len(loaded) == 30, f"{len(loaded)} instance rows loaded for 3 batches of 10"
    assert row["waiting"] == len(want) - 30
    sent = {r.instance_id for r in records(lab) if r.status == "sent"}
    waiting_series = {i.series_id for i in want.values() if i.id not in sent}
    monkeypatch.setattr(forwarding_due, "SERIES_SHOWN", 1)
    html = client_for(create_app(lab.settings), "phys").get("/archive").text
    assert len(waiting_series) >= 2
    assert f"and {len(waiting_series) - 1} more" in html and html.count('href="/series/') == 1


def test_new_version_to_an_archive_that_keeps_the_first_is_flagged_not_silently_sent(lab, tmp_path):
    default = start_orthanc(tmp_path, overwrite=False)  # Orthanc's default: OverwriteInstances false
    try:
        set_dicom(lab, default)
        want = expected(lab)
        forwarding.forward(lab.settings, lab.trial)
        old = next(iter(want.values()))
        new = store_new_version(lab, old)
        [result] = forwarding.forward(lab.settings, lab.trial)
        assert (result.sent, result.replacements) == (1, 1)
        # the archive answered success and kept the old object: why the replacement is flagged
        assert default.received()[old.sop_instance_uid] == 2
        kept = held(default)[old.sop_instance_uid]
        assert pydicom.dcmread(io.BytesIO(kept)).get("WindowWidth") != 456  # the new version has 456
        [rec] = [r for r in records(lab) if r.instance_id == new.id]
        assert rec.status == "sent" and rec.last_error == forwarding_due.REPLACEMENT_NOTE
        with session_scope(lab.settings) as s:
            [row] = forwarding.backlog(s)
        assert (row["replacements"], row["waiting"]) == (1, 0)
        html = client_for(create_app(lab.settings), "phys").get("/archive").text
        assert "OverwriteInstances" in html and '<td class="replacements">1</td>' in html
    finally:
        default.stop(kill=True)


def lab_series_uid(lab, series_id: int) -> str:
    with session_scope(lab.settings) as s:
        return s.get(Series, series_id).series_uid


def test_rule_evaluable_holds_a_new_version_until_reviewed(lab, orthanc):
    set_dicom(lab, orthanc, rule="evaluable")
    want = expected(lab, only_series=lab.evaluable)
    forwarding.forward(lab.settings, lab.trial)
    old = next(i for i in want.values() if i.series_id == lab.evaluable[0])
    new = store_new_version(lab, old)
    with session_scope(lab.settings) as s:
        series = s.get(Series, old.series_id)
        queried, major = flag_sets(s, Series.id == series.id)
        state = series_state(series.state, series.qc_state, unresolved_query=series.id in queried,
                             major_open=series.id in major)[0]
        assert state == "evaluable" and s.get(Instance, new.id).needs_review
    [result] = forwarding.forward(lab.settings, lab.trial)
    assert (result.sent, result.failed) == (0, 0)
    assert orthanc.received()[old.sop_instance_uid] == 1
    with session_scope(lab.settings) as s:
        [row] = forwarding.backlog(s)
    assert (row["held"], row["waiting"]) == (1, 0)
    assert "held: new version awaiting review" in client_for(create_app(lab.settings), "phys").get("/archive").text
    # The core lab's review clears the flag, as `corelab series accept-versions SERIES_UID` does.
    series_uid = lab_series_uid(lab, old.series_id)
    with session_scope(lab.settings) as s:
        assert review.accept_new_versions(s, series_uid, actor="phys") == {"series": series_uid, "accepted": 1}
    with session_scope(lab.settings) as s:
        assert not s.get(Instance, new.id).needs_review
        assert s.exec(select(AuditEvent).where(AuditEvent.action == "series.versions_accepted")).one().actor == "phys"
    [after] = forwarding.forward(lab.settings, lab.trial)
    assert after.sent == 1 and orthanc.received()[old.sop_instance_uid] == 2


def test_a_send_that_breaks_off_records_its_batch_failed_and_raises(lab, orthanc):
    """A spool file removed while its association runs: pynetdicom raises FileNotFoundError.
    The claimed batch must not stay pending (the retry would send nothing and end Completed)."""
    set_dicom(lab, orthanc)
    want = expected(lab)
    last = max(want.values(), key=lambda i: (i.series_id, i.id))
    spool = lab.settings.data_dir / last.path
    kept = spool.read_bytes()
    done = threading.Event()

    def remove_when_sending():
        while not done.is_set():
            if orthanc.statistics()["CountInstances"] >= 1:
                spool.unlink()
                return

    remover = threading.Thread(target=remove_when_sending)
    remover.start()
    try:
        with pytest.raises(OSError):
            forwarding.forward(lab.settings, lab.trial, batch_size=len(want))
    finally:
        done.set()
        remover.join()
    recs = records(lab)
    assert len(recs) == len(want) and {r.status for r in recs} == {"failed"}
    assert all("broke off (FileNotFoundError)" in r.last_error for r in recs)
    spool.write_bytes(kept)
    [retry] = forwarding.forward(lab.settings, lab.trial, batch_size=len(want))
    assert (retry.sent, retry.failed) == (len(want), 0)
    assert_holds_exactly(lab, orthanc, want, whole_file=False)


def test_password_never_goes_over_plain_http_except_loopback(lab, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("secret-15\n")
    with session_scope(lab.settings) as s:
        for url in ("http://archive.example.org/dicom-web", "http://10.1.2.3:8042/dicom-web"):
            with pytest.raises(forwarding.ForwardingError, match="https://"):
                forwarding.set_destination(s, lab.settings, lab.trial, stow_url=url, username="u",
                                           password_file=pw, actor="test")
        for url in ("http://127.0.0.1:8042/dicom-web", "http://[::1]:8042/dicom-web", "http://localhost/dicom-web",
                    "https://archive.example.org/dicom-web", "http://archive.example.org/dicom-web"):
            user = "" if url == "http://archive.example.org/dicom-web" else "u"  # no password: nothing to leak
            assert forwarding.set_destination(s, lab.settings, lab.trial, stow_url=url, username=user,
                                              password_file=pw if user else None, actor="test")["target"] == url
    item = Outgoing(1, tmp_path / "none.dcm", "1.2.3", "1.2.3.4")
    with pytest.raises(ArchiveError, match="https://"):  # refused before any connection or file read
        send_stow([item], url="http://archive.example.org/dicom-web", username="u", password="secret-15")



def test_due_claim_and_backlog_in_sql_on_sqlite_and_postgresql(store_settings):
    """The SQL of :mod:`services.forwarding_due` on both backends, without a network: per-series
    newest versions, a second claim of the same rows wins nothing, a stale answer is not stored."""
    from corelab.db import open_store
    from corelab.models import ArchiveDestination, Site, Study, Trial

    open_store(store_settings)
    with session_scope(store_settings) as s:
        trial, site = Trial(code="T1"), Site(code="A01", ae_title="SITE_A01")
        s.add_all([trial, site])
        s.flush()
        study = Study(study_uid="1.2.3", site_id=site.id)
        s.add(study)
        s.flush()
        series = [Series(series_uid=f"1.2.3.{k}", study_id=study.id, site_id=site.id, trial_id=trial.id,
                         modality="PT", kind="trial", state="complete") for k in (1, 2)]
        s.add_all(series)
        s.flush()
        rows = [(0, "1.9.1", 1), (0, "1.9.1", 2), (0, "1.9.2", 1), (1, "1.9.2", 2), (1, "1.9.3", 1)]
        for k, (which, uid, version) in enumerate(rows):
            s.add(Instance(series_id=series[which].id, sop_instance_uid=uid, version=version, sop_class_uid="1.2",
                           path=f"spool/{k}.dcm", sha256=f"{k}" * 64, size_bytes=10 + k))
        forwarding.set_destination(s, store_settings, "T1", dicom="ARCHIVE@127.0.0.1:104", actor="test")
        series_ids = [x.id for x in series]
    with session_scope(store_settings) as s:
        dest = s.exec(select(ArchiveDestination)).one()
        newest: dict[tuple[int, str], tuple[int, int]] = {}  # per series, computed here on the rows above
        for inst in s.exec(select(Instance)):
            key = (inst.series_id, inst.sop_instance_uid)
            newest[key] = max(newest.get(key, (0, 0)), (inst.version, inst.id))
        due = forwarding_due.due(s, dest)
        assert sorted(i.id for i, _, _ in due) == sorted(v[1] for v in newest.values())
        assert len(due) == 4 and [x.series_id for x, _, _ in due] == sorted(x.series_id for x, _, _ in due)
        batch = [i for i, _, _ in due]
        won = forwarding_due.claim(s, dest, batch)
    with session_scope(store_settings) as s:
        assert forwarding_due.claim(s, dest, batch) == {}  # the lease holds: a second run wins nothing
        assert forwarding_due.due(s, dest) == []
        first = batch[0].id
        rec_id, attempts = won[first]
        assert not forwarding_due.record(s, rec_id, attempts + 1, "")  # not the claim's attempt: ignored
        assert forwarding_due.record(s, rec_id, attempts, "")
        for inst in batch[1:]:
            assert forwarding_due.record(s, *won[inst.id], "archive down")
    with session_scope(store_settings) as s:
        row = forwarding_due.backlog_of(s, dest)
        assert (row["waiting"], row["failed"], row["pending"], row["sent"], row["held"]) == (3, 3, 0, 1, 0)
        assert row["last_error"] == "archive down" and row["series_more"] == 0
        assert {r["series_id"]: r["waiting"] for r in row["series"]} == {
            sid: sum(1 for (x, _), v in newest.items() if x == sid and v[1] != first) for sid in series_ids}
        assert forwarding_due.waiting_series(s, dest, set(series_ids)) == set(series_ids)
