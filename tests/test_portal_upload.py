"""Upload in the browser (issue 15 item 2): the zip chunk protocol over the portal's routes, and a
site user's journeys in a real browser (Debian's Chromium driven by Playwright) against the portal
served by uvicorn on loopback, with connections dropped on purpose.

What the store holds afterwards is compared with what was sent (SOP Instance UIDs read back from
the files, sha256 of the zip computed here), never with numbers written into the test.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
from sqlmodel import col, select

from corelab.db import open_store, session_scope
from corelab.models import AuditEvent, Instance, QuarantineItem, Series, Site, Subject
from corelab.series_completion import complete_stable_series
from portal.app import CSP, create_app
from services import accounts, upload_finish, uploads
from synth.net import wait_for
from tests.portal_helpers import PASSWORD, build_portal_lab, client_for, csrf_of, served_portal
from tests.receiver_helpers import small_series
from tests.test_portal_browser import Journey, browser  # noqa: F401  (browser: a pytest fixture)

NOT_DICOM = b"These are the scanner's notes, not a DICOM object.\n" * 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("upload"))


@pytest.fixture(scope="module")
def app(lab):
    return create_app(lab.settings)


@pytest.fixture(scope="module")
def clients(app):
    return {name: client_for(app, name) for name in ("site-a", "site-b", "phys", "tm", "admin")}


def _csrf(client) -> dict:
    return {"X-CSRF-Token": csrf_of(client.get("/account").text)}


def _pseudonym(settings, site: str) -> str:
    """A subject of ``site`` as the store knows it (so the objects pass the trial's pseudonym check)."""
    with session_scope(settings) as s:
        return s.exec(select(Subject.pseudonym).join(Site, Subject.site_id == Site.id).where(Site.code == site)
                      .order_by(Subject.id)).first()


def _series_files(settings, folder: Path, n: int, *, site: str = "A01", matrix: int = 8) -> list[Path]:
    """A new synthetic PET series of ``n`` slices from a subject of ``site``."""
    paths = small_series(folder, n, matrix=matrix)
    subject = _pseudonym(settings, site)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = ds.PatientID = subject
        ds.save_as(path, enforce_file_format=True)
    return paths


def _series_zip(settings, folder: Path, n: int, *, extra: bytes | None = None,
                matrix: int = 8) -> tuple[bytes, set[str]]:
    """A zip (stored, not deflated) of a new synthetic PET series of ``n`` slices, plus one non-DICOM
    member if ``extra``; returns its bytes and the series' SOP Instance UIDs."""
    paths = _series_files(settings, folder, n, matrix=matrix)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for path in paths:
            zf.write(path, f"study/{path.name}")
        if extra is not None:
            zf.writestr("study/notes.txt", extra)
    return buffer.getvalue(), {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


def _create(client, size: int, *, name: str = "study.zip", site: str | None = None):
    body = {"name": name, "size": size} | ({"site": site} if site else {})
    return client.post("/upload/zip", json=body, headers=_csrf(client) | {"Accept": "application/json"})


def _put(client, upload: str, data: bytes, first: int, total: int, headers: dict | None = None):
    h = {"Content-Range": f"bytes {first}-{first + len(data) - 1}/{total}", "Content-Type": "application/octet-stream",
         "Accept": "application/json"} | _csrf(client) | (headers or {})
    return client.put(f"/upload/zip/{upload}", content=data, headers=h)


def _summary_when_finished(client, upload: str, timeout_s: float = 30) -> dict:
    """Poll the upload until its background ingest has finished; returns the summary."""
    def finished():
        body = client.get(f"/upload/zip/{upload}").json()
        assert body["state"] in ("ingesting", "finished"), body
        return body.get("summary")
    return wait_for(finished, timeout_s=timeout_s, interval_s=0.05, what="the zip's ingest")


def _instances_of(settings, site: str, uids: set[str]) -> list[Instance]:
    with session_scope(settings) as s:
        return list(s.exec(select(Instance).join(Series, Instance.series_id == Series.id)
                           .join(Site, Series.site_id == Site.id)
                           .where(Site.code == site, col(Instance.sop_instance_uid).in_(sorted(uids)))))


def _upload_files(settings, site: str) -> list[Path]:
    folder = uploads.uploads_dir(settings) / site
    return sorted(folder.iterdir()) if folder.exists() else []


# --- the zip protocol through the portal's routes (TestClient) ---------------------------------------------

def test_a_zip_sent_in_chunks_is_ingested_once_as_the_site_and_qc_is_claimed_by_the_ticker(lab, app, clients,
                                                                                             tmp_path):
    client = clients["site-a"]
    data, uids = _series_zip(lab.settings, tmp_path / "s", 6, extra=NOT_DICOM)
    created = _create(client, len(data))
    assert created.status_code == 201, created.text
    upload = created.json()["upload"]
    assert created.json()["offset"] == 0 and len(upload) >= 32
    third = len(data) // 3
    for first, last in ((0, third), (third, 2 * third), (2 * third, len(data))):
        r = _put(client, upload, data[first:last], first, len(data))
        assert r.status_code == 200, r.text
        assert r.json()["offset"] == last == int(r.headers["Upload-Offset"])
    assert client.get(f"/upload/zip/{upload}").json()["offset"] == len(data)
    folder = uploads.uploads_dir(lab.settings) / "A01"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())

    finished = client.post(f"/upload/zip/{upload}/finish", headers=_csrf(client))
    assert finished.status_code == 202, finished.text  # ingested in the background: poll for the summary
    summary = _summary_when_finished(client, upload)
    assert (summary["stored"], summary["quarantined"], summary["objects"]) == (len(uids), 1, len(uids) + 1)
    [reason] = summary["quarantine"]
    assert reason["reason_code"] == "not_dicom" and "object #" in reason["reason"]
    assert "notes" not in client.get(f"/upload/zip/{upload}").text, "a member's file name reached the response"
    stored = _instances_of(lab.settings, "A01", uids)
    assert {i.sop_instance_uid for i in stored} == uids and len(stored) == len(uids)
    assert all(i.version == 1 for i in stored)
    [series_link] = summary["series"]
    assert client.get(series_link["url"]).status_code == 200 and series_link["instances"] == len(uids)
    with session_scope(lab.settings) as s:
        [event] = s.exec(select(AuditEvent).where(AuditEvent.action == "upload.finish",
                                                  AuditEvent.entity_id == upload)).all()
        assert event.actor == "site-a" and event.detail["site"] == "A01"
        assert event.detail["sha256"] == hashlib.sha256(data).hexdigest() == summary["sha256"]
        assert (event.detail["stored"], event.detail["quarantined"]) == (len(uids), 1)
        item = s.exec(select(QuarantineItem).where(QuarantineItem.sha256 == hashlib.sha256(NOT_DICOM).hexdigest())).one()
        assert item.reason_code == "not_dicom" and s.get(Site, item.site_id).code == "A01"
    assert not [p for p in _upload_files(lab.settings, "A01") if p.name.startswith(upload + ".part")], \
        "the zip's bytes were kept after the finish"

    again = client.post(f"/upload/zip/{upload}/finish", headers=_csrf(client))
    assert again.status_code == 200 and again.json()["repeated"] is True
    assert again.json()["stored"] == summary["stored"]
    with session_scope(lab.settings) as s:
        assert len(s.exec(select(AuditEvent).where(AuditEvent.action == "upload.finish",
                                                   AuditEvent.entity_id == upload)).all()) == 1

    # QC: the series is complete and pending; the node's ticker claims it once, as for any arrival.
    claimed: list[int] = []
    engine = open_store(lab.settings)
    complete_stable_series(engine, stable_s=lab.settings.series_stable_s, on_complete=claimed.append)
    assert series_link["id"] in claimed
    complete_stable_series(engine, stable_s=lab.settings.series_stable_s, on_complete=claimed.append)
    assert claimed.count(series_link["id"]) == 1
    with session_scope(lab.settings) as s:
        assert s.get(Series, series_link["id"]).qc_state == "queued"


def test_chunks_out_of_order_overlapping_or_malformed_are_refused_with_the_offset(lab, clients):
    client = clients["site-a"]
    data = os.urandom(300)
    upload = _create(client, len(data)).json()["upload"]
    assert _put(client, upload, data[:100], 0, len(data)).json()["offset"] == 100

    overlap = _put(client, upload, data[50:150], 50, len(data))
    assert overlap.status_code == 409 and overlap.json()["offset"] == 100 and overlap.headers["Upload-Offset"] == "100"
    gap = _put(client, upload, data[200:], 200, len(data))
    assert gap.status_code == 409 and gap.json()["offset"] == 100
    for bad in ("", "bytes 100-199", "bytes=100-199/300", "bytes 100-199/301", "bytes 199-100/300",
                "bytes 100-300/300", "items 100-199/300"):
        r = _put(client, upload, data[100:200], 100, len(data), headers={"Content-Range": bad})
        assert r.status_code == 416, f"{bad!r}: {r.status_code}"
        assert "Content-Range" in r.json()["detail"]
    short = _put(client, upload, data[100:150], 100, len(data), headers={"Content-Range": "bytes 100-199/300"})
    assert short.status_code == 400
    wrong_type = _put(client, upload, data[100:200], 100, len(data), headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    early = client.post(f"/upload/zip/{upload}/finish", headers=_csrf(client))
    assert early.status_code == 409 and early.json()["offset"] == 100
    part = uploads.uploads_dir(lab.settings) / "A01" / f"{upload}.part"
    assert part.read_bytes() == data[:100], "a refused chunk left bytes behind"

    # A retry racing its own first try: told to wait, nothing written twice.
    with uploads.ChunkWriter(lab.settings, "A01", upload, "bytes 100-199/300", "100") as writer:
        writer.write(data[100:150])  # half of it, then the connection is lost
        busy = _put(client, upload, data[100:200], 100, len(data))
        assert busy.status_code == 409 and "still running" in busy.json()["detail"]
    assert part.read_bytes() == data[:100], "half a chunk was kept"
    assert _put(client, upload, data[100:], 100, len(data)).json()["offset"] == len(data)
    assert part.read_bytes() == data


def test_sizes_names_and_sites_are_checked_before_anything_is_kept(lab, clients):
    client = clients["site-a"]
    before = _upload_files(lab.settings, "A01")
    too_large = _create(client, uploads.MAX_ZIP_BYTES + 1)
    assert too_large.status_code == 413 and str(uploads.MAX_ZIP_BYTES) in too_large.json()["detail"]
    assert _create(client, 1000, name="study.tar").status_code == 415
    assert _create(client, 0).status_code == 422
    assert _create(client, 1000, name="a\nb.zip").status_code == 422
    assert _create(client, 1000, site="B02").status_code == 404, "site-a created an upload for site B02"
    assert _upload_files(lab.settings, "A01") == before
    assert not (uploads.uploads_dir(lab.settings) / "B02").exists() or not _upload_files(lab.settings, "B02")
    upload = _create(client, 200).json()["upload"]
    big = _put(client, upload, b"x" * 10, 0, 200,
               headers={"Content-Range": f"bytes 0-{uploads.MAX_CHUNK_BYTES}/{uploads.MAX_ZIP_BYTES}"})
    assert big.status_code == 416  # the total does not match the upload's


def test_another_sites_upload_is_not_found_and_nothing_changes(lab, clients):
    owner, other = clients["site-a"], clients["site-b"]
    data = os.urandom(64)
    upload = _create(owner, len(data)).json()["upload"]
    assert _put(owner, upload, data[:32], 0, len(data)).status_code == 200
    assert other.get(f"/upload/zip/{upload}").status_code == 404
    assert _put(other, upload, data[32:], 32, len(data)).status_code == 404
    assert other.post(f"/upload/zip/{upload}/finish", headers=_csrf(other)).status_code == 404
    for guess in ("1", "..%2F..%2Fetc", "A" * 200, upload + "x"):
        assert owner.get(f"/upload/zip/{guess}").status_code == 404
    assert owner.get(f"/upload/zip/{upload}").json()["offset"] == 32


def test_a_session_needs_the_csrf_header_and_a_token_does_not(lab, app, clients):
    client = clients["site-a"]
    assert client.post("/upload/zip", json={"name": "s.zip", "size": 10}).status_code == 403
    upload = _create(client, 10).json()["upload"]
    r = client.put(f"/upload/zip/{upload}", content=b"0123456789",
                   headers={"Content-Range": "bytes 0-9/10", "Content-Type": "application/octet-stream"})
    assert r.status_code == 403
    assert client.post(f"/upload/zip/{upload}/finish").status_code == 403
    assert client.get(f"/upload/zip/{upload}").json()["offset"] == 0
    with session_scope(lab.settings) as s:
        token = accounts.create_token(s, "site-a", actor="test", label="upload test")["token"]
    from fastapi.testclient import TestClient

    machine = TestClient(app)
    auth = {"Authorization": f"Bearer {token}"}
    r = machine.put(f"/upload/zip/{upload}", content=b"0123456789",
                    headers=auth | {"Content-Range": "bytes 0-9/10", "Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["offset"] == 10


def test_only_site_users_may_upload(clients):
    for name in ("phys", "tm", "admin"):
        client = clients[name]
        assert client.get("/upload").status_code == 403, name
        assert _create(client, 10).status_code == 403, name
    from fastapi.testclient import TestClient

    anonymous = TestClient(clients["site-a"].app, follow_redirects=False)
    assert anonymous.get("/upload").status_code == 303
    assert anonymous.post("/upload/zip", json={"name": "s.zip", "size": 10},
                          headers={"Accept": "application/json"}).status_code == 401


def test_stale_uploads_are_swept_when_an_upload_is_created(lab, clients):
    client = clients["site-a"]
    old = _create(client, 50).json()["upload"]
    day_ago = time.time() - uploads.STALE_AFTER_S - 60
    for path in (uploads.uploads_dir(lab.settings) / "A01").glob(f"{old}.*"):
        os.utime(path, (day_ago, day_ago))
    fresh = _create(client, 50).json()["upload"]
    assert client.get(f"/upload/zip/{old}").status_code == 404
    assert client.get(f"/upload/zip/{fresh}").status_code == 200
    assert not list((uploads.uploads_dir(lab.settings) / "A01").glob(f"{old}.*"))


def test_the_upload_page_runs_its_one_script_and_says_what_to_do_without_it(lab, clients):
    client = clients["site-a"]
    r = client.get("/upload")
    assert r.status_code == 200
    policy = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe" not in policy
    assert policy.replace("script-src 'self'", "script-src 'none'") == CSP, "the upload page changed more than scripts"
    assert client.get("/sites/A01").headers["Content-Security-Policy"] == CSP
    assert '<script src="/static/upload.js" defer></script>' in r.text
    assert r.text.count("<script") == 1, "an inline script on the upload page"
    assert "<noscript>" in r.text and "STOW-RS" in r.text
    assert f'data-csrf="{csrf_of(client.get("/account").text)}"' in r.text
    assert 'href="/upload"' in client.get("/sites/A01").text, "no Upload link for a site user"
    assert client.get("/static/upload.js").status_code == 200
    assert client.get("/upload?site=B02").status_code == 404

    with session_scope(lab.settings) as s:
        accounts.add_user(s, "site-ab", role="site", sites=["A01", "B02"], full_name="Two Sites", password=PASSWORD,
                          actor="test")
    both = client_for(client.app, "site-ab")
    chooser = both.get("/upload")
    assert "/upload?site=A01" in chooser.text and "/upload?site=B02" in chooser.text
    assert "<script" not in chooser.text and chooser.headers["Content-Security-Policy"] == CSP
    assert 'data-site="B02"' in both.get("/upload?site=B02").text
    r = _create(both, 10)
    assert r.status_code == 400 and "A01|B02" in r.json()["detail"]
    assert _create(both, 10, site="B02").status_code == 201


# --- in the browser -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_url(lab):
    with served_portal(lab.settings) as url:
        yield url


def _open_upload_page(browser, base_url: str, tmp_path: Path, lab) -> Journey:
    j = Journey(browser, base_url, tmp_path)
    j.login("site-a")
    j.click("nav >> text=Upload")
    assert j.page.url.endswith("/upload") and "site A01" in j.page.inner_text("h1")
    return j


def _wait_done(j: Journey, timeout_s: float = 60) -> None:
    j.page.locator("#done").wait_for(state="visible", timeout=timeout_s * 1000)
    j.seen()


def _number(j: Journey, element_id: str) -> int:
    return int(j.page.inner_text(f"#{element_id}"))


def _assert_once(lab, uids: set[str]) -> None:
    """Every instance is in the store for A01 exactly once: one row each, version 1, none to review."""
    rows = _instances_of(lab.settings, "A01", uids)
    assert sorted(i.sop_instance_uid for i in rows) == sorted(uids), "missing or duplicated instance rows"
    assert all(i.version == 1 and not i.needs_review for i in rows), "a resend became a new version"


def test_site_uploads_a_folder_and_its_non_dicom_file_is_quarantined_with_its_reason(lab, base_url, browser, tmp_path):
    paths = _series_files(lab.settings, tmp_path / "series", 8)
    notes = tmp_path / "series" / "scanner-notes.txt"
    notes.write_bytes(NOT_DICOM)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    chosen = [*paths, notes]
    j = _open_upload_page(browser, base_url, tmp_path, lab)
    assert j.page.locator("noscript").count() == 1
    j.page.set_input_files("#folder", str(tmp_path / "series"))  # the folder input (webkitdirectory)
    j.page.click("#send-files")
    _wait_done(j)
    total_bytes = sum(p.stat().st_size for p in chosen)
    assert (_number(j, "files-done"), _number(j, "files-total")) == (len(chosen), len(chosen))
    assert (_number(j, "bytes-done"), _number(j, "bytes-total")) == (total_bytes, total_bytes)
    assert (_number(j, "n-stored"), _number(j, "n-quarantined"), _number(j, "n-failed")) == (len(paths), 1, 0)
    reasons = j.page.locator("#reasons li").all_inner_texts()
    assert len(reasons) == 1 and "not_dicom" in reasons[0]
    assert hashlib.sha256(NOT_DICOM).hexdigest()[:12] in reasons[0], "the reason does not name the object"
    assert "scanner-notes" not in j.page.content(), "a file name reached the page"
    assert j.page.get_attribute("#done-link", "href") == "/sites/A01"
    j.screenshot("upload")
    _assert_once(lab, uids)
    with session_scope(lab.settings) as s:
        item = s.exec(select(QuarantineItem).where(QuarantineItem.sha256 == hashlib.sha256(NOT_DICOM).hexdigest())).one()
        assert item.reason_code == "not_dicom" and s.get(Site, item.site_id).code == "A01"
    j.close(lab)


def test_dropped_connections_are_retried_and_resumed_and_every_instance_arrives_once(lab, base_url, browser, tmp_path):
    paths = _series_files(lab.settings, tmp_path / "series", 10)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    j = _open_upload_page(browser, base_url, tmp_path, lab)
    seen = {"requests": 0, "down": False}

    def flaky(route):
        seen["requests"] += 1
        if seen["down"] or seen["requests"] <= 2:  # lost before the server saw it
            route.abort()
        elif seen["requests"] in (3, 4):  # the server stored it, the answer is lost: the resend is a duplicate
            route.fetch()
            route.abort()
        else:
            route.continue_()

    j.page.route(re.compile(r"/dicomweb/studies"), flaky)
    j.page.set_input_files("#files", [str(p) for p in paths[:6]])
    j.page.click("#send-files")
    _wait_done(j)
    assert _number(j, "n-stored") == 6 and seen["requests"] >= 6 + 4
    _assert_once(lab, uids & {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths[:6]})

    # The core lab is unreachable for longer than the retries: the page offers Resume.
    seen["down"] = True
    j.page.set_input_files("#files", [str(p) for p in paths[6:]])
    j.page.click("#send-files")
    j.page.locator("#resume").wait_for(state="visible", timeout=30_000)
    j.seen()
    assert _number(j, "n-left") == len(paths) - 6 and "Resume" in j.page.inner_text("#status")
    before = seen["requests"]
    seen["down"] = False
    j.page.click("#resume")
    _wait_done(j)
    assert seen["requests"] - before == len(paths) - 6, "Resume sent again what was already acknowledged"
    assert (_number(j, "files-done"), _number(j, "n-stored")) == (len(paths), len(paths))
    _assert_once(lab, uids)
    j.close(lab)


def test_a_zip_upload_survives_a_lost_chunk_and_a_lost_answer(lab, base_url, browser, tmp_path):
    # Enough 128 KiB slices for two chunks: the second chunk is the one whose answer is lost.
    n = uploads.CHUNK_BYTES // (256 * 256 * 2) + 8
    data, uids = _series_zip(lab.settings, tmp_path / "series", n, matrix=256)
    assert len(data) > uploads.CHUNK_BYTES
    archive = tmp_path / "study.zip"
    archive.write_bytes(data)
    j = _open_upload_page(browser, base_url, tmp_path, lab)
    log: list[str] = []

    def flaky(route):
        request = route.request
        log.append(request.method)
        puts, finishes = log.count("PUT"), request.url.endswith("/finish") and log.count("POST")
        if request.method == "PUT" and puts == 1:  # the first chunk is lost on the way
            route.abort()
        elif (request.method == "PUT" and puts == 3) or finishes == 1:  # received, but the answer is lost
            route.fetch()
            route.abort()
        else:
            route.continue_()

    j.page.route(re.compile(r"/upload/zip/[A-Za-z0-9_-]+"), flaky)
    j.page.set_input_files("#zip", str(archive))
    with upload_finish.INGEST_SLOT:  # another zip's ingest runs: the page polls while this one waits
        j.page.click("#send-zip")
        # (the sync Playwright runs the route handler only while the test waits in Playwright)
        wait_for(lambda: j.page.wait_for_timeout(100) or (log.count("POST") == 2 and
                                                          log[log.index("POST"):].count("GET") >= 3),
                 timeout_s=60, interval_s=0, what="the page to poll the finishing zip")
        assert "checking every file" in j.page.inner_text("#status") and not _instances_of(lab.settings, "A01", uids)
    _wait_done(j, 120)
    assert log.count("PUT") == 3 and log.count("POST") == 2, log
    assert _number(j, "zip-done") == _number(j, "zip-total") == len(data)
    assert (_number(j, "z-stored") + _number(j, "z-duplicates"), _number(j, "z-quarantined")) == (n, 0)
    assert _number(j, "z-stored") == n, "the repeated finish ingested again"
    assert j.page.locator("#zip-series a").count() == 1
    _assert_once(lab, uids)
    with session_scope(lab.settings) as s:
        events = [e for e in s.exec(select(AuditEvent).where(AuditEvent.action == "upload.finish"))
                  if e.detail["sha256"] == hashlib.sha256(data).hexdigest()]
    assert len(events) == 1 and events[0].detail["stored"] == n and events[0].actor == "site-a"
    j.close(lab)


def test_a_connection_lost_inside_a_chunk_keeps_nothing_of_it(lab, base_url):
    """A real client (a socket to uvicorn) sends half a chunk and hangs up: the offset stays put."""
    import socket

    with session_scope(lab.settings) as s:
        token = accounts.create_token(s, "site-a", actor="test", label="disconnect test")["token"]
    import httpx

    auth = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    with httpx.Client(base_url=base_url, headers=auth) as http:
        upload = http.post("/upload/zip", json={"name": "s.zip", "size": 1000}).json()["upload"]
        assert http.put(f"/upload/zip/{upload}", content=b"a" * 400,
                        headers={"Content-Range": "bytes 0-399/1000"}).json()["offset"] == 400
        host, port = base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall((f"PUT /upload/zip/{upload} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                          "Content-Type: application/octet-stream\r\nContent-Range: bytes 400-999/1000\r\n"
                          "Content-Length: 600\r\n\r\n").encode() + b"b" * 300)
            time.sleep(0.5)  # the server is inside the chunk when the connection goes
        part = uploads.uploads_dir(lab.settings) / "A01" / f"{upload}.part"
        wait_for(lambda: http.get(f"/upload/zip/{upload}").json()["offset"] == 400 and part.stat().st_size == 400,
                 timeout_s=10, what="the half chunk to be cut back")
        assert http.put(f"/upload/zip/{upload}", content=b"b" * 600,
                        headers={"Content-Range": "bytes 400-999/1000"}).json()["offset"] == 1000
    assert part.read_bytes() == b"a" * 400 + b"b" * 600
