"""A 2 GB study through STOW-RS with bounded memory: the portal runs in a subprocess (uvicorn, as
``corelab portal`` runs it) so that its peak RSS (VmHWM) is its own, and the client generates each
instance when it is sent (neither side ever holds the study)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlmodel import func, select

from corelab.db import session_scope
from corelab.models import Instance, Series
from corelab.register import add_site
from corelab.settings import load_settings
from services import accounts
from synth.net import free_port, wait_port
from synth.small_series import pet_slice

N_INSTANCES = 1000
MATRIX = 1024                    # 1024 x 1024 x 16 bit: 2 MiB of pixels per instance
MAX_SERVER_RSS_BYTES = 600 * 2**20
MAX_GROWTH_BYTES = 128 * 2**20
BOUNDARY = "corelab-size-test"

SERVER = """
from corelab.settings import load_settings
from portal.serve import portal_server
portal_server(load_settings()).run()
"""


def _peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process: the most resident memory it ever had."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


@pytest.mark.slow
def test_a_2gb_study_streams_through_stow_rs_with_bounded_server_memory(tmp_path):
    data_dir = tmp_path / "corelab-data"
    port = free_port()
    env = dict(os.environ, CORELAB_DATA_DIR=str(data_dir), CORELAB_PORTAL_PORT=str(port))
    settings = load_settings(env)
    settings.ensure_dirs()
    with session_scope(settings) as s:
        add_site(s, code="A01", ae_title="SITEA")
        accounts.add_user(s, "site-a", role="site", sites=["A01"], password="correct horse battery 42", actor="test")
        token = accounts.create_token(s, "site-a", actor="test")["token"]
    log = (tmp_path / "portal.log").open("w")
    server = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 60)
        baseline = _peak_rss_bytes(server.pid)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        pixels = bytes(range(256)) * (MATRIX * MATRIX * 2 // 256)
        sent: dict[str, str] = {}

        def body():
            for i in range(N_INSTANCES):
                ds = pet_slice(study=study, series=series, frame=frame, pixels=pixels, matrix=MATRIX, index=i,
                               n=N_INSTANCES)
                with io.BytesIO() as b:
                    ds.save_as(b, enforce_file_format=True)
                    data = b.getvalue()
                sent[str(ds.SOPInstanceUID)] = hashlib.sha256(data).hexdigest()
                yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                yield data
                yield b"\r\n"
            yield f"--{BOUNDARY}--\r\n".encode()

        start = time.perf_counter()
        response = httpx.post(f"http://127.0.0.1:{port}/dicomweb/studies", content=body(), timeout=1800,
                              headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json",
                                       "Content-Type": f'multipart/related; type="application/dicom"; '
                                                       f"boundary={BOUNDARY}"})
        elapsed = time.perf_counter() - start
        peak = _peak_rss_bytes(server.pid)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    total = N_INSTANCES * (MATRIX * MATRIX * 2)
    print(f"\nSTOW-RS of {N_INSTANCES} instances ({total / 2**30:.2f} GiB of pixel data) in {elapsed:.1f} s "
          f"({total / elapsed / 2**20:.0f} MiB/s); server peak RSS {peak / 2**20:.0f} MiB "
          f"(at start {baseline / 2**20:.0f} MiB)")
    assert response.status_code == 200, response.text[:2000]
    assert len(response.json()["00081199"]["Value"]) == N_INSTANCES
    assert peak < MAX_SERVER_RSS_BYTES, f"server peak RSS {peak / 2**20:.0f} MiB"
    # The growth is what the request cost: a few chunks and one 2 MiB object at a time, not the study.
    assert peak - baseline < MAX_GROWTH_BYTES, f"server RSS grew by {(peak - baseline) / 2**20:.0f} MiB"
    with session_scope(settings) as s:
        rows = dict(s.exec(select(Instance.sop_instance_uid, Instance.sha256)).all())
        assert s.exec(select(func.count()).select_from(Series)).one() == 1
    assert rows == sent
    assert not any(settings.stow_staging_dir.iterdir()), "staging left behind"
    sample = next(iter(rows))
    assert pydicom.dcmread(next(settings.spool_dir.rglob(f"{sample}.dcm"))).Rows == MATRIX
