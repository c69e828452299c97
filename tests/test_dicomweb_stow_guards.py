"""STOW-RS under abuse and faults, on the real portal (uvicorn on loopback): floods of tiny or
not-DICOM parts, the staging budget and the free-space floor, a part that cannot be read, a
blocked event loop, staging folders of live and dead requests, a token revoked mid-upload, the
PS3.18 answer's failure items and where its RetrieveURLs point."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import ApiToken
from corelab.series_completion import remove_stale_staging
from corelab.settings import SettingsError, load_settings
from portal import dicomweb_store
from services import accounts
from tests.portal_helpers import build_portal_lab, served_portal
from tests.stow_helpers import (BOUNDARY, MULTIPART, _body, _datasets, _encode, _failed, _post, _reason_codes,
                                _serve, _state, _stow_events, _token, accounts_sha)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("stow-guards"))


@pytest.fixture(scope="module")
def served(lab):
    with served_portal(lab.settings) as url:
        yield url


@pytest.fixture(scope="module")
def token(lab):
    return _token(lab, "site-a")


def _raw_headers(url: str, token: str, length: int | None, *, path: str = "/dicomweb/studies") -> tuple:
    host, port = url.removeprefix("http://").split(":")
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {MULTIPART}\r\nAccept: application/dicom+json\r\n"
            f"Authorization: Bearer {token}\r\n{framing}\r\n\r\n").encode()
    return (host, int(port)), head


def _read_status(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            break
        data += got
    return data


# --- 1. floods ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("how, status", [("content_type", 415), ("accept", 406), ("study", 400), ("site", 404),
                                         ("length", 413)])
def test_a_request_refused_before_its_body_is_audited_once(lab, served, token, how, status):
    before = len(_stow_events(lab))
    kw = {"content_type": {"content_type": "application/dicom"}, "accept": {"headers": {"Accept": "text/xml"}},
          "study": {"path": "/dicomweb/studies/01.2"}, "site": {"path": "/dicomweb/studies?site=B02"},
          "length": {"headers": {"Content-Length": str(1 << 40)}}}[how]
    response = _post(served, token, b"x" * 10, **kw) if how != "length" else None
    if how == "length":
        address, head = _raw_headers(served, token, 1 << 40)
        with socket.create_connection(address) as sock:
            sock.sendall(head)
            assert _read_status(sock).startswith(f"HTTP/1.1 {status} ".encode())
    else:
        assert response.status_code == status, response.text
    events = _stow_events(lab)[before:]
    assert len(events) == 1 and events[0].actor == "site-a"
    assert (events[0].detail["outcome"], events[0].detail["http_status"]) == ("refused", status)


def test_a_body_that_stops_arriving_is_refused_and_frees_its_staging(lab, served, token, monkeypatch):
    """A token's request declaring 100 MB, then silence: 408 once the body is idle for BODY_IDLE_S,
    its staging and its reservation of every site's budget freed; the next request is served."""
    monkeypatch.setattr(dicomweb_store, "BODY_IDLE_S", 1.0)
    before = _state(lab)
    address, head = _raw_headers(served, token, 100_000_000)
    with socket.create_connection(address) as sock:
        sock.sendall(head + f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"x" * 200)
        status = _read_status(sock)
    assert status.startswith(b"HTTP/1.1 408 ")
    assert _state(lab) == before  # nothing stored, held or left in staging
    assert _post(served, token, _body([_encode(ds) for ds in _datasets(lab, 1)])).status_code == 200


def test_thousands_of_tiny_parts_are_refused_quickly_and_nothing_is_quarantined(lab, served, token):
    before = _state(lab)
    tiny = [f"x{i}".encode() for i in range(3000)]
    start = time.perf_counter()
    response = _post(served, token, _body(tiny))
    elapsed = time.perf_counter() - start
    assert response.status_code == 409 and elapsed < 20, (response.status_code, elapsed)
    assert set(_reason_codes(response)) == {"too_small"}
    assert _state(lab) == before  # nothing held: not one quarantine row or file
    over = _post(served, token, _body(tiny * 2))  # 6,000 parts: over dicomweb_max_parts (5,000)
    assert over.status_code == 413 and "CORELAB_DICOMWEB_MAX_PARTS" in over.json()["detail"]
    assert _state(lab) == before


def test_only_the_first_not_dicom_parts_of_a_request_are_held(lab, served, token):
    before = _state(lab)
    junk = [f"not DICOM {i} ".encode() * 30 for i in range(25)]  # ~400 bytes each: over the minimum size
    response = _post(served, token, _body(junk))
    assert response.status_code == 409
    codes = _reason_codes(response)
    assert codes == ["not_dicom"] * 25
    held = [f["00091001"]["Value"][0] for f in _failed(response)]
    assert sum(h.startswith("quarantined") for h in held) == 10 and sum(h.startswith("refused") for h in held) == 15
    after = _state(lab)
    assert after["quarantined"] == before["quarantined"] + 10 and after["instances"] == before["instances"]


# --- 2. the staging budget and the free-space floor -----------------------------------------------------

def test_over_the_staging_budget_503_and_below_the_free_floor_507(lab, token):
    free = shutil.disk_usage(lab.settings.data_dir).free
    small = dataclasses.replace(lab.settings, dicomweb_staging_budget_bytes=256 * 1024)
    server, thread, url = _serve(small)
    body = _body([_encode(ds) for ds in _datasets(lab, 300)])  # ~400 KiB
    try:
        before = _state(lab)
        declared = _post(url, token, body)  # Content-Length over the budget: refused before reading
        assert declared.status_code == 503 and int(declared.headers["retry-after"]) > 0, declared.text
        chunked = _post(url, token, iter([body[i:i + 16384] for i in range(0, len(body), 16384)]))
        assert chunked.status_code == 503 and int(chunked.headers["retry-after"]) > 0
        assert "nothing was stored" in chunked.json()["detail"]
        # A live request holds its reservation: a second one that fits alone does not fit beside it.
        first = _body([_encode(ds) for ds in _datasets(lab, 120)])
        address, head = _raw_headers(url, token, len(first))
        with socket.create_connection(address) as sock:
            sock.sendall(head + first[:1000])
            time.sleep(0.3)
            beside = _post(url, token, _body([_encode(ds) for ds in _datasets(lab, 100)]))
            assert beside.status_code == 503
            sock.sendall(first[1000:])
            assert _read_status(sock).startswith(b"HTTP/1.1 200 ")
        assert _post(url, token, _body([_encode(ds) for ds in _datasets(lab, 100)])).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
    floor = dataclasses.replace(lab.settings, dicomweb_min_free_bytes=free + 2**30)
    server, thread, url = _serve(floor)
    try:
        before = _state(lab)
        upfront = _post(url, token, body)
        assert upfront.status_code == 507 and "nothing was stored" in upfront.json()["detail"]
        assert _state(lab) == before
    finally:
        server.should_exit = True
        thread.join(10)
    # Mid-way: the floor is 8 MiB under today's free space, the chunked body 40 MiB.
    free = shutil.disk_usage(lab.settings.data_dir).free
    midway = dataclasses.replace(lab.settings, dicomweb_min_free_bytes=free - 8 * 2**20)
    server, thread, url = _serve(midway)
    big = _encode(_datasets(lab, 1)[0])
    try:
        before = _state(lab)
        chunk = _body([big] * 200, close=False)
        parts = iter([chunk] * 160)  # ~40 MiB, never closed: the floor must stop it first
        crossed = _post(url, token, parts)
        assert crossed.status_code == 507 and "nothing was stored" in crossed.json()["detail"]
        assert crossed.headers.get("connection") == "close"
        assert _state(lab) == before
    finally:
        server.should_exit = True
        thread.join(10)


# --- 3. a part that cannot be read between staging and ingest -----------------------------------------

def test_a_part_that_cannot_be_read_fails_alone_and_the_request_is_audited(lab, served, token, monkeypatch):
    real = Path.read_bytes

    def failing(self):
        if self.name == "000002.part" and lab.settings.stow_staging_dir in self.parents:
            raise OSError(errno.EIO, "Input/output error")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", failing)
    datasets = _datasets(lab, 3)
    events = len(_stow_events(lab))
    response = _post(served, token, _body([_encode(ds) for ds in datasets]))
    monkeypatch.undo()
    assert response.status_code == 202, response.text[:500]
    [failed] = _failed(response)
    assert failed["00081197"]["Value"] == [0xA700] and "00081155" in failed and "00081150" in failed
    stored = {i["00081155"]["Value"][0] for i in response.json()["00081199"]["Value"]}
    assert stored == {str(datasets[0].SOPInstanceUID), str(datasets[2].SOPInstanceUID)}
    assert len(_stow_events(lab)) == events + 1
    assert (_stow_events(lab)[-1].detail["stored"], _stow_events(lab)[-1].detail["failed"]) == (2, 1)
    assert _state(lab)["staging"] == []


# --- 4. the event loop stays free -------------------------------------------------------------------------

def test_login_answers_quickly_while_a_slow_stow_streams_and_stale_staging_is_cleaned(tmp_path, token, lab):
    fresh = build_portal_lab(tmp_path / "fresh")
    tok = _token(fresh, "site-a")

    def leftovers():  # a crash's leftovers: 50,000 staged files the first STOW cleans up
        for k in range(20):
            folder = fresh.settings.stow_staging_dir / f"999999-{k:016x}"
            folder.mkdir(parents=True)
            for i in range(2500):
                (folder / f"{i:06d}.part").write_bytes(b"x")

    # What a login would wait for if the clean-up ran on the event loop, measured here, now, on
    # this machine's load, so the bound below moves with the load instead of being a wall-clock guess.
    leftovers()
    started = time.perf_counter()
    remove_stale_staging(fresh.settings)
    cleanup_s = time.perf_counter() - started
    leftovers()
    server, thread, url = _serve(fresh.settings)
    latencies, stop = [], threading.Event()

    def probe():
        while not stop.is_set():
            start = time.perf_counter()
            httpx.get(url + "/login", timeout=30)
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)

    body = _body([_encode(ds) for ds in _datasets(fresh, 1)] + [b"z" * 200] * 3000)
    try:
        prober = threading.Thread(target=probe)
        prober.start()
        address, head = _raw_headers(url, tok, len(body))
        with socket.create_connection(address) as sock:
            sock.sendall(head)
            for i in range(0, len(body), 64 * 1024):
                sock.sendall(body[i:i + 64 * 1024])
                time.sleep(0.02)
            assert _read_status(sock).startswith(b"HTTP/1.1 202 ")
        stop.set()
        prober.join(30)
    finally:
        stop.set()
        server.should_exit = True
        thread.join(10)
    # With the clean-up and the part writes on the event loop, the slowest /login waited for the whole
    # clean-up and more (1.59 s against a 1.4 s clean-up, quiet); off the loop 0.11 s against a 0.8 s
    # clean-up with tests running alongside, and about 1 s under heavy load, when the clean-up slows too.
    assert len(latencies) > 10 and max(latencies) < max(0.9 * cleanup_s, 0.5), \
        f"slowest /login {max(latencies):.2f} s, the clean-up alone {cleanup_s:.2f} s"
    assert not any(fresh.settings.stow_staging_dir.iterdir())


# --- 6. stale staging: judged by its lock, not by a PID ---------------------------------------------------

def test_a_locked_staging_folder_is_kept_and_an_unlocked_one_removed(lab):
    root = lab.settings.stow_staging_dir
    live, dead = root / f"999999-{'a' * 16}", root / f"1-{'b' * 16}"  # a dead PID, and PID 1 (alive)
    for folder in (live, dead):
        folder.mkdir(parents=True)
        (folder / "000001.part").write_bytes(b"staged")
    lock = os.open(live / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert remove_stale_staging(lab.settings) == 1
        assert live.is_dir() and (live / "000001.part").exists() and not dead.exists()
    finally:
        os.close(lock)
    assert remove_stale_staging(lab.settings) == 1 and not live.exists()


# --- 9. a token revoked mid-upload ----------------------------------------------------------------------

def test_a_token_revoked_mid_upload_stores_nothing(lab, served):
    token = _token(lab, "site-a")
    body = _body([_encode(ds) for ds in _datasets(lab, 3)])
    before = _state(lab)
    address, head = _raw_headers(served, token, len(body))
    with socket.create_connection(address) as sock:
        sock.sendall(head + body[:2000])
        time.sleep(0.3)
        with session_scope(lab.settings) as s:
            row = s.exec(select(ApiToken).where(ApiToken.token_sha256 == accounts_sha(token))).one()
            accounts.revoke_token(s, row.id, actor="test")
        sock.sendall(body[2000:])
        answer = _read_status(sock)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert _state(lab) == before
    assert _stow_events(lab)[-1].detail["outcome"] == "refused"


# --- 10 and 5: the answer's items and URLs --------------------------------------------------------------

def test_failed_items_carry_both_references_and_honest_codes(lab, served, token):
    deid = _datasets(lab, 1)[0]
    deid.PatientName = "Qzvorak^Anna"
    response = _post(served, token, _body([_encode(deid), b"not DICOM at all " * 20]))
    assert response.status_code == 409
    items = _failed(response)
    assert [i["00081155"].get("Value") for i in items] == [[str(deid.SOPInstanceUID)], None]
    assert all(i["00081150"]["vr"] == "UI" and i["00081155"]["vr"] == "UI" for i in items)
    codes = [i["00081197"]["Value"][0] for i in items]
    assert codes[0] != 0xA900 and 0xC000 <= codes[0] <= 0xCFFF and codes[1] == 0xC000


def test_retrieve_urls_come_from_the_settings_never_from_the_host_header(lab, served, token):
    datasets = _datasets(lab, 1)
    study = str(datasets[0].StudyInstanceUID)
    evil = _post(served, token, _body([_encode(ds) for ds in datasets]), headers={"Host": "evil.example:666"})
    assert evil.json()["00081190"]["Value"] == [f"{served}/dicomweb/studies/{study}"]
    search = httpx.get(served + "/dicomweb/studies", params={"StudyInstanceUID": study}, timeout=30,
                       headers={"Authorization": f"Bearer {token}", "Host": "evil.example:666"})
    assert search.status_code == 200 and search.json()[0]["00081190"]["Value"][0].startswith(served + "/")
    public = dataclasses.replace(lab.settings, portal_public_url="https://corelab.example.org")
    server, thread, url = _serve(public)
    try:
        again = _post(url, token, _body([_encode(ds) for ds in _datasets(lab, 1, study=study)]))
        assert again.json()["00081190"]["Value"] == [f"https://corelab.example.org/dicomweb/studies/{study}"]
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("bad", ["corelab.example.org", "ftp://corelab.example.org", "https://u:p@corelab.example.org",
                                 "https://corelab.example.org/portal", "https://corelab.example.org?x=1",
                                 "https://", "https://corelab.example.org:99999"])
def test_a_bad_public_url_is_refused_at_start(tmp_path, bad):
    with pytest.raises(SettingsError, match="portal_public_url"):
        load_settings({"CORELAB_DATA_DIR": str(tmp_path), "CORELAB_PORTAL_PUBLIC_URL": bad})
    good = load_settings({"CORELAB_DATA_DIR": str(tmp_path), "CORELAB_PORTAL_PUBLIC_URL": "https://a.example:8443/"})
    assert good.public_url == "https://a.example:8443"



# --- 8. a refused body is not drained to its end ----------------------------------------------------------

def test_a_413_part_reads_a_few_mib_more_then_closes(lab, token):
    small = dataclasses.replace(lab.settings, max_object_bytes=64 * 1024)
    server, thread, url = _serve(small)
    declared = 200 * 2**20
    big = b"\0" * (256 * 1024)
    start = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + big
    sent = [0]

    def send(sock):
        try:
            sock.sendall(start)
            sent[0] += len(start)
            while sent[0] < declared:
                sock.sendall(b"\0" * 2**20)
                sent[0] += 2**20
        except OSError:
            return

    try:
        address, head = _raw_headers(url, token, declared)
        with socket.create_connection(address) as sock:
            sock.sendall(head)
            sender = threading.Thread(target=send, args=(sock,))
            sender.start()
            answer = _read_status(sock)
            sender.join(60)
        assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()
        assert sent[0] < 40 * 2**20, f"the server read {sent[0] / 2**20:.0f} MiB of a refused body"
    finally:
        server.should_exit = True
        thread.join(10)
