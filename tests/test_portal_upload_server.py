"""The zip upload's server side under load: disk space reserved across every open upload, the
finish's ingest in the background (202, then a poll reaches the summary), and chunks written off
the event loop. Real parts: the portal's routes, a uvicorn server on loopback, the real disk (its
free space read here, the margin lowered through the module's constant).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import threading
import time

import httpx
import pytest
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import AuditEvent
from portal.app import create_app
from portal.serve import start_portal_thread
from services import accounts, upload_finish, uploads
from synth.net import free_port, wait_for, wait_port
from tests.portal_helpers import build_portal_lab, client_for
from tests.test_portal_upload import _create, _csrf, _instances_of, _put, _series_zip


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("upload-server"))


@pytest.fixture(scope="module")
def clients(lab):
    app = create_app(lab.settings)
    return {name: client_for(app, name) for name in ("site-a", "site-b")}


def _free(lab) -> int:
    return shutil.disk_usage(lab.settings.data_dir).free


def _poll(client, upload: str, until: str, timeout_s: float = 30) -> dict:
    return wait_for(lambda: (lambda b: b if b["state"] == until else None)(client.get(f"/upload/zip/{upload}").json()),
                    timeout_s=timeout_s, interval_s=0.05, what=f"upload state {until!r}")


# --- free space counts every open upload, and each chunk checks it again -----------------------

def test_create_counts_the_bytes_every_open_upload_of_every_site_still_needs(lab, clients, monkeypatch):
    size = 2**30  # announced only: no byte of it is written
    # The margin leaves room for one announced GiB and half of another (the disk's own free space,
    # read now; 512 MiB of slack either way for whatever else writes to this disk meanwhile).
    monkeypatch.setattr(uploads, "DISK_MARGIN_BYTES", _free(lab) - size - size // 2)
    first = _create(clients["site-a"], size)
    assert first.status_code == 201, first.text
    second = _create(clients["site-b"], size)
    assert second.status_code == 507, "a second GiB was promised on a disk that holds one and a half"
    assert "uploads in progress" in second.json()["detail"] and "A01" not in second.json()["detail"]
    assert not (uploads.uploads_dir(lab.settings) / "B02").exists() or \
        not list((uploads.uploads_dir(lab.settings) / "B02").iterdir())

    # Once the first is swept (a day without a chunk), its reservation goes with it.
    day_ago = time.time() - uploads.STALE_AFTER_S - 60
    for path in (uploads.uploads_dir(lab.settings) / "A01").glob(f"{first.json()['upload']}.*"):
        os.utime(path, (day_ago, day_ago))
    again = _create(clients["site-b"], size)
    assert again.status_code == 201, again.text
    day_ago = time.time() - uploads.STALE_AFTER_S - 60
    for path in (uploads.uploads_dir(lab.settings) / "B02").glob(f"{again.json()['upload']}.*"):
        os.utime(path, (day_ago, day_ago))
    uploads.sweep_stale(lab.settings)


def test_one_site_cannot_reserve_the_space_every_sites_uploads_share(lab, clients, monkeypatch):
    """A site's announced-but-unsent bytes are capped (MAX_SITE_RESERVED_BYTES): a third zip of A01
    is refused with 429 while B02 may still announce one."""
    monkeypatch.setattr(uploads, "MAX_SITE_RESERVED_BYTES", 5000)
    made = [_create(clients["site-a"], 2000) for _ in range(2)]
    assert [r.status_code for r in made] == [201, 201]
    third = _create(clients["site-a"], 2000)
    assert third.status_code == 429 and "bytes per site" in third.json()["detail"]
    other = _create(clients["site-b"], 2000)
    assert other.status_code == 201, other.text
    day_ago = time.time() - uploads.STALE_AFTER_S - 60
    for response in [*made, other]:
        for path in uploads.uploads_dir(lab.settings).glob(f"*/{response.json()['upload']}.*"):
            os.utime(path, (day_ago, day_ago))
    uploads.sweep_stale(lab.settings)


def test_a_chunk_is_refused_with_507_when_the_disk_has_filled_since_the_create(lab, clients, monkeypatch):
    client = clients["site-a"]
    data = os.urandom(1000)
    upload = _create(client, len(data)).json()["upload"]
    assert _put(client, upload, data[:400], 0, len(data)).json()["offset"] == 400
    monkeypatch.setattr(uploads, "DISK_MARGIN_BYTES", _free(lab) + 2**30)  # the disk is now "full"
    full = _put(client, upload, data[400:], 400, len(data))
    assert full.status_code == 507, full.text
    assert "disk" in full.json()["detail"] and full.json()["offset"] == 400
    part = uploads.uploads_dir(lab.settings) / "A01" / f"{upload}.part"
    assert part.read_bytes() == data[:400], "a refused chunk left bytes behind"
    monkeypatch.undo()
    assert _put(client, upload, data[400:], 400, len(data)).json()["offset"] == len(data)
    assert part.read_bytes() == data


# --- the finish answers at once; the ingest runs in the background, once ------------------------

def test_finish_answers_202_at_once_and_the_poll_reaches_the_summary_of_one_ingest(lab, clients, tmp_path):
    client = clients["site-a"]
    data, uids = _series_zip(lab.settings, tmp_path / "s", 5)
    upload = _create(client, len(data)).json()["upload"]
    assert _put(client, upload, data, 0, len(data)).status_code == 200

    with upload_finish.INGEST_SLOT:  # another zip is being ingested: this one waits its turn
        started = time.monotonic()
        finish = client.post(f"/upload/zip/{upload}/finish", headers=_csrf(client))
        answered_s = time.monotonic() - started
        assert finish.status_code == 202, finish.text
        assert answered_s < 2.0 and finish.json()["state"] == "ingesting"
        assert finish.headers["Location"] == f"/upload/zip/{upload}"
        poll = client.get(f"/upload/zip/{upload}").json()
        assert poll["state"] == "ingesting" and poll.get("summary") is None
        second = client.post(f"/upload/zip/{upload}/finish", headers=_csrf(client))
        assert second.status_code == 202 and second.json()["state"] == "ingesting"
        assert _put(client, upload, data[:10], 0, len(data)).status_code == 409, "a chunk went into an ingesting zip"
        assert not _instances_of(lab.settings, "A01", uids), "ingested before its turn"

    summary = _poll(client, upload, "finished")["summary"]
    assert (summary["stored"], summary["objects"], summary["quarantined"]) == (len(uids), len(uids), 0)
    assert summary["sha256"] == hashlib.sha256(data).hexdigest()
    stored = _instances_of(lab.settings, "A01", uids)
    assert sorted(i.sop_instance_uid for i in stored) == sorted(uids)
    third = client.post(f"/upload/zip/{upload}/finish", headers=_csrf(client))
    assert third.status_code == 200 and third.json()["repeated"] is True and third.json()["stored"] == len(uids)
    with session_scope(lab.settings) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "upload.finish",
                                                 AuditEvent.entity_id == upload)).all()
    assert len(events) == 1 and events[0].detail["stored"] == len(uids)
    assert not (uploads.uploads_dir(lab.settings) / "A01" / f"{upload}.part").exists()


# --- a chunk being received does not hold up the portal ---------------------------------------

@pytest.fixture(scope="module")
def served(lab):
    settings = dataclasses.replace(lab.settings, portal_port=free_port())
    server, thread = start_portal_thread(settings)
    wait_port(settings.portal_port, 30)
    with session_scope(lab.settings) as s:
        token = accounts.create_token(s, "site-a", actor="test", label="slow chunk")["token"]
    yield f"http://127.0.0.1:{settings.portal_port}", token
    server.should_exit = True
    thread.join(10)


def test_a_large_chunk_being_received_and_written_does_not_hold_up_other_requests(lab, served, monkeypatch):
    """A 512 MiB chunk over a raw socket while GET /upload is asked every 10 ms: every answer comes
    within 100 ms. (Its writes and its fsync, on the event loop, held up the portal for as long as
    they took: 230-260 ms here for 512 MiB; in worker threads the slowest answer took under 20 ms.)"""
    base_url, token = served
    size = 512 * 2**20
    monkeypatch.setattr(uploads, "MAX_CHUNK_BYTES", size)  # one chunk whose fsync takes a measurable time
    auth = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    with httpx.Client(base_url=base_url, headers=auth, timeout=60) as http:
        upload = http.post("/upload/zip", json={"name": "s.zip", "size": size}).json()["upload"]
        host, port = base_url.removeprefix("http://").split(":")
        answer: dict = {}

        def send():
            piece = os.urandom(2**20)
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall((f"PUT /upload/zip/{upload} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                              f"Content-Type: application/octet-stream\r\nContent-Range: bytes 0-{size - 1}/{size}\r\n"
                              f"Content-Length: {size}\r\nConnection: close\r\n\r\n").encode())
                for _ in range(size // len(piece)):
                    sock.sendall(piece)
                answer["raw"] = sock.recv(4096)

        sender = threading.Thread(target=send)
        latencies = []
        sender.start()
        while sender.is_alive():
            started = time.monotonic()
            assert http.get("/upload").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)
        sender.join()
        print(f"GET /upload during the chunk: {len(latencies)} requests, max {max(latencies) * 1000:.0f} ms")
        assert answer["raw"].startswith(b"HTTP/1.1 200"), answer["raw"][:200]
        assert http.get(f"/upload/zip/{upload}").json()["offset"] == size
        assert len(latencies) >= 10 and max(latencies) < 0.1, f"the portal stalled {max(latencies):.3f} s"
    (uploads.uploads_dir(lab.settings) / "A01" / f"{upload}.part").unlink()  # half a GiB less in the temp dir
