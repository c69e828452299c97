"""kill -9 of `corelab receive` while dcmtk sends; restart; resend: every instance exactly once,
every file matches its sha256, QC started once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from sqlmodel import Session

from corelab.db import open_store, session_scope
from corelab.register import add_site
from tests.receiver_helpers import (DCMTK_ENV, STORESCU, assert_store_exact, echoscu, free_port, instance_count,
                                    qc_claims, series_by_uid, small_series, storescu, wait_for, wait_port)

pytestmark = pytest.mark.dcmtk
CORELAB = str(Path(sys.executable).with_name("corelab"))


def _start(settings, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, CORELAB_DATA_DIR=str(settings.data_dir), CORELAB_SERIES_STABLE_S="1.5")
    proc = subprocess.Popen([CORELAB, "receive", "--port", str(port), "--bind", "127.0.0.1", "--qc", "queue"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
    wait_port(port)
    return proc


def test_kill_9_during_a_series_then_restart_and_resend(settings, tmp_path):
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
    files = small_series(tmp_path / "s", 300)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    engine = open_store(settings)

    def stored() -> int:
        with Session(engine) as session:
            return instance_count(session)

    port, log = free_port(), tmp_path / "receiver.log"
    receiver = _start(settings, port, log)
    sender = subprocess.Popen([STORESCU, "-aet", "SITE1", "-aec", "CORELAB", "127.0.0.1", str(port),
                               *map(str, files)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: stored() >= 60, what="60 instances before the crash")
        receiver.send_signal(signal.SIGKILL)
        receiver.wait()
        sender.wait(timeout=60)
        assert sender.returncode != 0  # the sender saw the node die
        before = stored()
        assert before < 300

        receiver = _start(settings, port, log)  # recovery runs before it listens
        assert echoscu(port, aet="SITE1").returncode == 0
        storescu(port, files, aet="SITE1")  # the site resends the whole series

        def queued() -> bool:
            with Session(engine) as session:
                series = series_by_uid(session, series_uid)
                return series is not None and series.qc_state == "queued"
        wait_for(queued, timeout_s=30, what="completion and QC start")
        # A second restart finds nothing to do: no second QC start.
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=30)
        receiver = _start(settings, port, log)
        time.sleep(2.0)
    finally:
        for proc in (sender, receiver):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with session_scope(settings) as session:
        assert_store_exact(session, settings.data_dir, uids)
        series = series_by_uid(session, series_uid)
        assert (series.state, series.instance_count) == ("complete", 300)
        assert qc_claims(session, series_uid) == 1
    text = log.read_text()
    assert "Traceback" not in text
