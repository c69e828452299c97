"""The DICOM node with dcmtk as the real sender: AE checks, compressed syntaxes, concurrency,
dropped associations, completion with QC started once, recovery, the inbox."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time

import pydicom
import pytest
from sqlmodel import select

from corelab.db import open_store, session_scope
from corelab.inbox import inbox_dir, scan_inbox
from corelab.models import Instance, QuarantineItem, Series
from corelab.receiver import Receiver, ReceiverConfig
from corelab.register import add_site
from corelab.series_completion import UNATTRIBUTED_GRACE_S, claim_qc, complete_stable_series, recover
from tests.receiver_helpers import (DCMTK_ENV, STORESCU, assert_store_exact, echoscu, instance_count, qc_claims,
                                    series_by_uid, small_series, start_tls_node, storescu, wait_for)

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def node(settings):
    """A running receiver (in this process) with sites S1 (any host) and S2 (host 10.9.9.9 only)."""
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
        add_site(session, code="S2", ae_title="SITE2", host="10.9.9.9")
    completed: list[int] = []
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=1.0, tick_s=0.2,
                                                 max_associations=12),
                        on_complete=completed.append).start()
    receiver.completed = completed
    yield receiver
    receiver.stop()


def _uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_registered_ae_may_echo_and_store_unknown_ae_is_rejected_and_logged(node, settings, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="corelab.receiver")
    assert echoscu(node.port, aet="SITE1").returncode == 0
    refused = echoscu(node.port, aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    # SITE2 is registered, but only from 10.9.9.9: from 127.0.0.1 it is refused too.
    files = small_series(tmp_path / "s", 3)
    proc = storescu(node.port, files, aet="SITE2", check=False)
    assert proc.returncode != 0 and "Calling AE Title Not Recognized" in proc.stderr + proc.stdout
    rejected = [r.getMessage() for r in caplog.records if "association rejected" in r.getMessage()]
    assert any("'INTRUDER'" in m and "127.0.0.1" in m for m in rejected)
    assert any("'SITE2'" in m for m in rejected)
    storescu(node.port, files, aet="SITE1")
    with session_scope(settings) as session:
        assert_store_exact(session, settings.data_dir, _uids(files))


@pytest.mark.parametrize("tool, args, propose, ts_uid", [
    ("dcmcrle", (), "-xr", "1.2.840.10008.1.2.5"),
    ("dcmcjpeg", (), "-xs", "1.2.840.10008.1.2.4.70"),
    ("dcmconv", ("+td",), "-xd", "1.2.840.10008.1.2.1.99"),
])
def test_compressed_transfer_syntaxes_are_stored_as_received(node, settings, tmp_path, tool, args, propose, ts_uid):
    plain = small_series(tmp_path / "plain", 4, matrix=16)
    sent = []
    for path in plain:
        out = tmp_path / f"{tool}-{path.name}"
        subprocess.run([f"/usr/bin/{tool}", *args, str(path), str(out)], check=True, capture_output=True)
        sent.append(out)
    storescu(node.port, sent, aet="SITE1", extra=(propose,))
    with session_scope(settings) as session:
        assert_store_exact(session, settings.data_dir, _uids(sent))
        for row in session.exec(select(Instance)):
            stored = pydicom.dcmread(settings.data_dir / row.path)
            assert stored.file_meta.TransferSyntaxUID == ts_uid
            original = pydicom.dcmread(next(p for p in sent if pydicom.dcmread(p).SOPInstanceUID
                                            == row.sop_instance_uid))
            assert stored.PixelData == original.PixelData  # not transcoded


@pytest.mark.slow  # 40 s of eight dcmtk senders; CI runs it (make test-slow)
def test_eight_concurrent_senders_lose_and_duplicate_nothing(node, settings, tmp_path):
    # Four series, each split over two senders, so two associations create the same new
    # series at once (the unique series UID and a retry keep it to one row).
    folders = []
    for s in range(4):
        files = small_series(tmp_path / f"series{s}", 500)
        for half in range(2):
            folder = tmp_path / f"sender{s}-{half}"
            folder.mkdir()
            for f in files[half::2]:
                os.link(f, folder / f.name)
            folders.append(folder)
    procs = [subprocess.Popen([STORESCU, "-aet", "SITE1", "-aec", "CORELAB", "+sd", "127.0.0.1", str(node.port),
                               str(folder)], env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for folder in folders]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    sent = set().union(*(_uids(f.iterdir()) for f in folders))
    assert len(sent) == 2000
    with session_scope(settings) as session:
        assert_store_exact(session, settings.data_dir, sent)
        assert len(session.exec(select(Series)).all()) == 4
        assert {s.instance_count for s in session.exec(select(Series))} == {500}


def test_sender_dropping_the_association_mid_series_loses_nothing_acknowledged(node, settings, tmp_path):
    files = small_series(tmp_path / "s", 400)
    proc = subprocess.Popen([STORESCU, "-aet", "SITE1", "-aec", "CORELAB", "127.0.0.1", str(node.port),
                             *map(str, files)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = open_store(settings)
    from sqlmodel import Session

    def stored() -> int:
        with Session(engine) as session:
            return instance_count(session)
    wait_for(lambda: stored() >= 40, what="the first 40 instances")
    proc.send_signal(signal.SIGKILL)  # the sender vanishes: no A-RELEASE, no A-ABORT
    proc.wait()
    partial = stored()
    assert 40 <= partial < 400
    assert echoscu(node.port, aet="SITE1").returncode == 0  # the node is still serving
    with session_scope(settings) as session:  # what was acknowledged is intact
        rows = session.exec(select(Instance)).all()
        for row in rows:
            assert hashlib.sha256((settings.data_dir / row.path).read_bytes()).hexdigest() == row.sha256
    storescu(node.port, files, aet="SITE1")  # the site sends the series again
    with session_scope(settings) as session:
        assert_store_exact(session, settings.data_dir, _uids(files))


def test_series_completes_when_stable_and_qc_starts_exactly_once(node, settings, tmp_path):
    files = small_series(tmp_path / "s", 30)
    # A gap (slices 10-12 missing) and a repeat (slice 20 sent twice under another UID).
    repeat = pydicom.dcmread(files[20])
    repeat.SOPInstanceUID = repeat.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    repeat.save_as(tmp_path / "repeat.dcm")
    sent = [f for i, f in enumerate(files) if i not in (10, 11, 12)] + [tmp_path / "repeat.dcm"]
    storescu(node.port, sent, aet="SITE1")
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    with session_scope(settings) as session:
        series_id = series_by_uid(session, uid).id
    wait_for(lambda: node.completed == [series_id], timeout_s=20, what="completion callback")
    with session_scope(settings) as session:
        series = series_by_uid(session, uid)
        assert (series.state, series.qc_state) == ("complete", "queued")
        c = series.completeness
        assert (c["instances"], c["expected"], c["missing_by_count"], c["gaps"], c["repeated_positions"]) == \
            (28, 30, 2, 3, 1)
        assert c["complete"] is False and c["findings"]
        assert qc_claims(session, uid) == 1
    # Sending the same series again changes nothing and starts nothing.
    storescu(node.port, sent, aet="SITE1")
    time.sleep(1.6)
    assert node.completed == [series_id]
    # Competing claimers (another thread, another process, a restart) cannot win a second time.
    engine = open_store(settings)
    results = []
    threads = [threading.Thread(target=lambda: results.append(claim_qc(engine, series_id))) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [False] * 6
    with session_scope(settings) as session:
        assert qc_claims(session, uid) == 1


def test_quarantined_object_is_answered_with_a_warning_and_kept(node, settings, tmp_path):
    files = small_series(tmp_path / "s", 2)
    ds = pydicom.dcmread(files[0])
    ds.PatientBirthDate = "19500101"
    ds.save_as(files[0])
    proc = storescu(node.port, files, aet="SITE1", extra=("-d",))
    assert "0xb007" in proc.stderr.lower() + proc.stdout.lower()  # the site's operator sees it at send time
    with session_scope(settings) as session:
        items = session.exec(select(QuarantineItem)).all()
        assert [i.reason_code for i in items] == ["deid_failed"]
        assert "PatientBirthDate" in items[0].reason and "19500101" not in items[0].reason
        assert hashlib.sha256((settings.data_dir / items[0].path).read_bytes()).hexdigest() == items[0].sha256
        assert instance_count(session) == 1


def test_recovery_removes_half_written_files_and_indexes_written_ones(settings, tmp_path):
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
    engine = open_store(settings)
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=3600))
    files = small_series(tmp_path / "s", 3)
    site_id = receiver.sites.lookup("SITE1", "127.0.0.1")[0]
    outcome = receiver.store.accept(files[0].read_bytes(), sop_instance_uid="x", site_id=site_id, source="a.dcm")
    with session_scope(settings) as session:
        first = session.exec(select(Instance)).one()
        folder = (settings.data_dir / first.path).parent
    assert outcome.status == "stored"
    # A crash between rename and commit leaves a written, unindexed file; one during the write
    # a temporary file of a dead process; one before any series row an unattributable file.
    orphan_uid = str(pydicom.dcmread(files[1]).SOPInstanceUID)
    shutil.copy(files[1], folder / f"{orphan_uid}.dcm")
    (folder / ".x.dcm.999999.partial").write_bytes(b"half")
    (settings.spool_dir / "9.9" / "9.9.9").mkdir(parents=True)
    stray = settings.spool_dir / "9.9" / "9.9.9" / "y.dcm"
    shutil.copy(files[2], stray)
    # A fresh one may be another process's uncommitted first object of a new series: kept.
    assert recover(settings, engine) == {"partial_removed": 1, "reindexed": 1, "unattributed_removed": 0,
                                         "unattributed_kept": 1}
    old = time.time() - UNATTRIBUTED_GRACE_S - 1
    os.utime(stray, (old, old))
    assert recover(settings, engine) == {"partial_removed": 0, "reindexed": 0, "unattributed_removed": 1}
    assert not stray.exists()
    with session_scope(settings) as session:
        assert_store_exact(session, settings.data_dir, _uids(files[:2]))
    assert recover(settings, engine) == {"partial_removed": 0, "reindexed": 0, "unattributed_removed": 0}


def test_completion_after_restart_and_concurrent_tickers_claim_once(store_settings, tmp_path):
    settings = store_settings
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=0.5))
    for f in small_series(tmp_path / "s", 5):
        receiver.store.accept(f.read_bytes(), sop_instance_uid=f.stem, site_id=1, source=f.name)
    time.sleep(0.6)  # "down" while the series became stable
    calls: list[int] = []
    threads = [threading.Thread(target=complete_stable_series, args=(receiver.engine,),
                                kwargs={"stable_s": 0.5, "on_complete": calls.append}) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1
    with session_scope(settings) as session:
        series = session.exec(select(Series)).one()
        assert (series.state, series.qc_state, series.completeness["complete"]) == ("complete", "queued", True)


def test_inbox_is_polled_per_site_and_completes_at_once(settings, tmp_path):
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
    engine = open_store(settings)
    drop = inbox_dir(settings) / "S1" / "upload1"
    files = small_series(drop, 6)
    sent = _uids(files)
    (inbox_dir(settings) / "NOSUCH").mkdir()
    small_series(inbox_dir(settings) / "NOSUCH" / "x", 1)
    started: list[list[int]] = []
    assert scan_inbox(settings, engine, settle_s=60, on_series=started.append) == {}  # still settling
    summary = scan_inbox(settings, engine, settle_s=0, on_series=started.append)
    assert summary["S1"]["stored"] == 6 and summary["S1"]["entries"] == 1
    assert not drop.exists() and (inbox_dir(settings) / "NOSUCH" / "x").exists()  # unknown site: left alone
    with session_scope(settings) as session:
        series = session.exec(select(Series)).one()
        assert series.state == "complete" and started == [[series.id]]
        assert_store_exact(session, settings.data_dir, sent)
        assert series.completeness["complete"] is True


def test_cli_watch_once_and_help(settings, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("CORELAB_DATA_DIR", str(settings.data_dir))
    assert main(["site", "add", "S1", "--ae-title", "SITE1"]) == 0
    files = small_series(inbox_dir(settings) / "S1" / "drop", 4)
    old = time.time() - 10
    for f in [*files, files[0].parent]:
        os.utime(f, (old, old))
    capsys.readouterr()
    assert main(["watch", "--once", "--qc", "queue", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"stored": 4' in out
    with session_scope(settings) as session:
        assert session.exec(select(Series)).one().qc_state == "queued"
    for command in (["receive", "--help"], ["watch", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
    assert "--max-associations" in capsys.readouterr().out


def test_dicom_tls(settings, tmp_path):
    receiver, cert = start_tls_node(settings, tmp_path)
    try:
        files = small_series(tmp_path / "s", 3)
        storescu(receiver.port, files, aet="SITE1", extra=("+tla", "+cf", str(cert)))
        plain = storescu(receiver.port, files[:1], aet="SITE1", check=False, timeout_s=60)
        assert plain.returncode != 0  # no TLS, no association
    finally:
        receiver.stop()
    with session_scope(settings) as session:
        assert_store_exact(session, settings.data_dir, _uids(files))


def test_concurrent_objects_of_one_new_series_make_one_series_on_both_backends(store_settings, tmp_path):
    settings = store_settings
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=3600))
    files = small_series(tmp_path / "s", 60)
    blobs = [f.read_bytes() for f in files]
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def send(part: int) -> None:
        barrier.wait()
        try:
            for f, blob in list(zip(files, blobs))[part::6]:
                receiver.store.accept(blob, sop_instance_uid=f.stem, site_id=1, source=f.name)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    with session_scope(settings) as session:
        assert [s.instance_count for s in session.exec(select(Series))] == [60]
        assert_store_exact(session, settings.data_dir, _uids(files))


def _files_outside(root, data_dir, sources) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not p.is_relative_to(data_dir) and not p.is_relative_to(sources)}


def test_hostile_objects_over_dicom_are_quarantined_and_the_association_goes_on(node, settings, tmp_path, caplog):
    """UIDs that are paths, too long or multi-valued, an impossible date, pixel data of the wrong
    length: each answered 0xB007 and held in quarantine, nothing written outside the data
    directory, never "Out of resources", and the good objects around them stored.

    (Expects ingest to quarantine these itself: ``invalid_uid`` for the UIDs, some reason for the
    rest; before that lands they were answered 0xA700 or stored.)"""
    caplog.set_level(logging.WARNING, logger="corelab.receiver")
    sources = tmp_path / "s"
    files = small_series(sources, 16)

    def mutate(i: int, change) -> None:
        ds = pydicom.dcmread(files[i])
        change(ds)
        ds.save_as(files[i], enforce_file_format=False)

    def set_uids(**values):
        def change(ds):
            for keyword, value in values.items():
                setattr(ds, keyword, value)
                if keyword == "SOPInstanceUID":
                    ds.file_meta.MediaStorageSOPInstanceUID = value
        return change

    hostile = {  # index -> expected reason code (None: any specific reason)
        1: ("invalid_uid", set_uids(StudyInstanceUID="..", SeriesInstanceUID="..")),
        3: ("invalid_uid", set_uids(StudyInstanceUID="1." + "2" * 298)),
        5: ("invalid_uid", set_uids(SeriesInstanceUID=["1.2.3", "1.2.4"])),   # a backslash in the value
        7: ("invalid_uid", set_uids(SOPInstanceUID="1.2.5/6")),
        9: ("invalid_uid", set_uids(SOPInstanceUID="1." + "3" * 298)),
        11: (None, lambda ds: setattr(ds, "StudyDate", "20241399")),
        13: (None, lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\0" * 64)),
        15: (None, lambda ds: setattr(ds, "PixelData", ds.PixelData[:-32])),
    }
    for i, (_, change) in hostile.items():
        mutate(i, change)
    good = [f for i, f in enumerate(files) if i not in hostile]
    before = _files_outside(tmp_path, settings.data_dir, sources)
    proc = storescu(node.port, files, aet="SITE1", extra=("-nh", "-d"))  # one association for all 16
    statuses = [line.split(":")[2].strip().split()[0].lower() for line in (proc.stdout + proc.stderr).splitlines()
                if "DIMSE Status" in line]
    assert statuses == ["0xb007" if i in hostile else "0x0000" for i in range(16)], statuses
    assert "out of resources" not in caplog.text.lower()
    assert _files_outside(tmp_path, settings.data_dir, sources) == before  # nothing escaped the data dir
    with session_scope(settings) as session:
        assert_store_exact(session, settings.data_dir, _uids(good))
        for row in session.exec(select(Instance)):
            assert (settings.data_dir / row.path).resolve().is_relative_to(settings.spool_dir.resolve())
        items = session.exec(select(QuarantineItem)).all()
        assert len(items) == len(hostile)
        codes = sorted(i.reason_code for i in items)
        assert codes.count("invalid_uid") == 5 and all(codes), codes
        for item in items:
            path = (settings.data_dir / item.path).resolve()
            assert path.is_relative_to(settings.quarantine_dir.resolve()) and path.is_file()
            assert hashlib.sha256(path.read_bytes()).hexdigest() == item.sha256
    assert echoscu(node.port, aet="SITE1").returncode == 0  # and the node is still serving


@pytest.mark.parametrize("failure, expected", [
    (OSError(28, "No space left on device"), 0xA700),                       # disk full
    (OSError(5, "Input/output error"), 0xA700),
    ("db_down", 0xA700),                                                     # database unreachable
    (MemoryError(), 0xA700),
    (ValueError("a property of this object"), 0xC210),                       # not a resource: never A700
    (OSError(36, "File name too long"), 0xC210),
    (KeyError("x"), 0xC210),
])
def test_out_of_resources_only_for_real_resource_failures(failure, expected, caplog):
    """0xA700 makes senders retry for ever: only the machine's failures earn it."""
    from types import SimpleNamespace

    import sqlalchemy.exc

    from corelab.dicom_handlers import handle_store

    if failure == "db_down":
        failure = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    class FailingStore:
        def accept(self, *args, **kwargs):
            raise failure

    sites = SimpleNamespace(lookup=lambda ae, address: (1, "S1"))
    event = SimpleNamespace(
        request=SimpleNamespace(AffectedSOPInstanceUID="1.2.3"),
        assoc=SimpleNamespace(requestor=SimpleNamespace(primitive=SimpleNamespace(calling_ae_title="SITE1"),
                                                         address="127.0.0.1")),
        encoded_dataset=lambda: b"\0" * 16)
    caplog.set_level(logging.ERROR, logger="corelab.receiver")
    assert handle_store(event, FailingStore(), sites) == expected
    assert ("out of resources" in caplog.text) == (expected == 0xA700)
