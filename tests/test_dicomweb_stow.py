"""STOW-RS on the real portal (uvicorn on loopback) with dicomweb-client as the real client, and bad
input sent with httpx and a raw socket: each answer's HTTP status, and nothing stored half.

The lab is the portal test lab (sites A01, B02; users site-a, site-b, phys, tm); its trial's
pseudonym pattern is ``FDGR01-<site>-<nnn>``, so the good objects here carry such pseudonyms.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import socket
import subprocess
from datetime import timedelta

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlmodel import select

from corelab.db import open_store, session_scope
from corelab.models import ApiToken, Instance, QuarantineItem, Series, utcnow
from corelab.receiver_store import Store
from corelab.series_completion import complete_stable_series, recover
from services import accounts, stow
from synth.net import wait_for
from tests import hostile_objects
from tests.portal_helpers import PASSWORD, build_portal_lab, csrf_of, served_portal
from tests.stow_helpers import (BOUNDARY, MULTIPART, _body, _datasets, _encode, _failed, _post, _reason_codes,
                                _serve, _site_id, _state, _stow_events, _token, accounts_sha)

# --- fixtures: the lab, a served portal, tokens -----------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("stow"))


@pytest.fixture(scope="module")
def base_url(lab):
    with served_portal(lab.settings) as url:
        yield url


@pytest.fixture(scope="module")
def tokens(lab):
    return {name: _token(lab, name) for name in ("site-a", "site-b", "phys", "tm")}


# --- the good path ------------------------------------------------------------------------------------

def test_a_series_sent_by_dicomweb_client_is_stored_for_the_tokens_site_as_c_store_would(lab, base_url, tokens):
    datasets = _datasets(lab, 6)
    sent = {str(ds.SOPInstanceUID): hashlib.sha256(_encode(ds)).hexdigest() for ds in datasets}
    client = DICOMwebClient(url=f"{base_url}/dicomweb", headers={"Authorization": f"Bearer {tokens['site-a']}"})
    answer = client.store_instances(datasets)
    study, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    # dicomweb-client sends "Host: 127.0.0.1" without the port on a chunked POST; the URLs come from
    # the settings (portal_public_url, here unset: http://<portal_host>:<portal_port>), not the Host
    assert answer.RetrieveURL == f"{base_url}/dicomweb/studies/{study}"
    refs = {str(item.ReferencedSOPInstanceUID): item for item in answer.ReferencedSOPSequence}
    assert set(refs) == set(sent) and "FailedSOPSequence" not in answer
    uid = next(iter(refs))
    assert refs[uid].RetrieveURL.endswith(f"/dicomweb/studies/{study}/series/{series_uid}/instances/{uid}")
    assert {str(i.ReferencedSOPClassUID) for i in refs.values()} == {"1.2.840.10008.5.1.4.1.1.128"}
    with session_scope(lab.settings) as s:
        series = s.exec(select(Series).where(Series.series_uid == series_uid)).one()
        assert series.site_id == _site_id(lab, "A01")
        rows = s.exec(select(Instance).where(Instance.series_id == series.id)).all()
    assert {r.sop_instance_uid: r.sha256 for r in rows} == sent  # the bytes the client encoded, unchanged
    for row in rows:
        assert hashlib.sha256((lab.settings.data_dir / row.path).read_bytes()).hexdigest() == row.sha256
    # The same bytes through the C-STORE path's Store: a no-op duplicate, i.e. what STOW stored is
    # exactly what C-STORE stores.
    store = Store(lab.settings, open_store(lab.settings))
    outcome = store.accept(_encode(datasets[0]), sop_instance_uid=uid, site_id=_site_id(lab, "A01"), source="x")
    assert outcome.status == "duplicate"
    completed = complete_stable_series(open_store(lab.settings), stable_s=0)
    with session_scope(lab.settings) as s:
        series = s.exec(select(Series).where(Series.series_uid == series_uid)).one()
        assert series.id in completed and series.state == "complete" and series.instance_count == 6
        assert series.qc_state == "queued"  # QC claimed once, as for a C-STORE series
    event = _stow_events(lab)[-1]
    assert event.actor == "site-a" and event.entity_id == "A01"
    assert (event.detail["stored"], event.detail["parts"], event.detail["http_status"]) == (6, 6, 200)
    assert _state(lab)["staging"] == []


def test_a_dataset_built_in_memory_without_preamble_is_stored_not_quarantined(lab, base_url, tokens):
    """pydicom, and so dicomweb-client, writes a dataset built in memory with its file meta but
    without the preamble and DICM: the part is completed, not refused as not DICOM."""
    datasets = _datasets(lab, 2)
    for ds in datasets:
        ds.preamble = None
    assert _encode(datasets[0])[:2] == b"\x02\x00"  # starts with the file meta, no preamble
    client = DICOMwebClient(url=f"{base_url}/dicomweb", headers={"Authorization": f"Bearer {tokens['site-a']}"})
    answer = client.store_instances(datasets)
    assert "FailedSOPSequence" not in answer and len(answer.ReferencedSOPSequence) == 2
    with session_scope(lab.settings) as s:
        rows = s.exec(select(Instance).where(Instance.sop_instance_uid == str(datasets[0].SOPInstanceUID))).all()
    assert len(rows) == 1
    held = (lab.settings.data_dir / rows[0].path).read_bytes()
    assert held[128:132] == b"DICM" and held[132:] == _encode(datasets[0])  # the bytes sent, after the preamble


def test_store_to_a_study_url_refuses_an_instance_of_another_study(lab, base_url, tokens):
    mine, other = _datasets(lab, 2), _datasets(lab, 1)
    client = DICOMwebClient(url=f"{base_url}/dicomweb", headers={"Authorization": f"Bearer {tokens['site-a']}"})
    answer = client.store_instances(mine + other, study_instance_uid=str(mine[0].StudyInstanceUID))
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [
        str(ds.SOPInstanceUID) for ds in mine]
    [failed] = answer.FailedSOPSequence
    assert failed.FailureReason == stow.STUDY_MISMATCH and str(failed.ReferencedSOPInstanceUID) == str(other[0].SOPInstanceUID)
    with session_scope(lab.settings) as s:
        assert not s.exec(select(Instance).where(Instance.sop_instance_uid == str(other[0].SOPInstanceUID))).all()


def test_a_browser_session_needs_the_csrf_header(lab, base_url):
    with httpx.Client(base_url=base_url, timeout=30) as web:
        web.post("/login", data={"name": "site-a", "password": PASSWORD,
                                 "csrf_token": csrf_of(web.get("/login").text)})
        token = csrf_of(web.get("/account").text)
        body = _body([_encode(ds) for ds in _datasets(lab, 1)])
        refused = web.post("/dicomweb/studies", content=body, headers={"Content-Type": MULTIPART,
                                                                        "Accept": "application/json"})
        assert refused.status_code == 403 and "token" in refused.json()["detail"]
        form_token = web.post("/dicomweb/studies?csrf_token=" + token, content=body,
                              headers={"Content-Type": MULTIPART, "Accept": "application/json"})
        assert form_token.status_code == 403
        ok = web.post("/dicomweb/studies", content=body, headers={"Content-Type": MULTIPART, "X-CSRF-Token": token,
                                                                   "Accept": "application/dicom+json"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/dicom+json"
    assert len(ok.json()["00081199"]["Value"]) == 1


# --- who may send -----------------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["phys", "tm"])
def test_physicist_and_trial_manager_tokens_are_refused(lab, base_url, tokens, who):
    before = _state(lab)
    response = _post(base_url, tokens[who], _body([_encode(ds) for ds in _datasets(lab, 1)]))
    assert response.status_code == 403
    assert _state(lab) == before


def test_expired_and_revoked_tokens_get_401(lab, base_url):
    expired, revoked = _token(lab, "site-a", days=1), _token(lab, "site-a", days=1)
    with session_scope(lab.settings) as s:
        row = s.exec(select(ApiToken).where(ApiToken.token_sha256 == accounts_sha(expired))).one()
        row.expires_at = utcnow() - timedelta(minutes=1)
        s.add(row)
        revoked_id = s.exec(select(ApiToken.id).where(ApiToken.token_sha256 == accounts_sha(revoked))).one()
        accounts.revoke_token(s, revoked_id, actor="test")
    before = _state(lab)
    for token in (expired, revoked, "clt_not-a-token", None):
        response = _post(base_url, token, _body([_encode(ds) for ds in _datasets(lab, 1)]), follow_redirects=False)
        assert response.status_code == 401, (token, response.status_code)
        assert response.json()["detail"]  # JSON for a DICOMweb client, never the login page
        if token:
            assert response.headers["www-authenticate"] == "Bearer"
    assert _state(lab) == before


def test_another_sites_token_cannot_add_to_a01s_series(lab, base_url, tokens):
    """site-b's token: a new series becomes B02's; objects that name A01's series are quarantined
    as uid_conflict and never attached to A01, whatever their headers say (PatientID A01)."""
    a01 = _datasets(lab, 2)
    assert _post(base_url, tokens["site-a"], _body([_encode(ds) for ds in a01])).status_code == 200
    intruders = _datasets(lab, 2, study=str(a01[0].StudyInstanceUID), series=str(a01[0].SeriesInstanceUID))
    own = _datasets(lab, 1, site="B02")
    response = _post(base_url, tokens["site-b"], _body([_encode(ds) for ds in intruders + own]))
    assert response.status_code == 202
    assert _reason_codes(response) == ["uid_conflict", "uid_conflict"]
    assert [f["00081197"]["Value"][0] for f in _failed(response)] == [stow.UID_CONFLICT] * 2
    with session_scope(lab.settings) as s:
        a01_series = s.exec(select(Series).where(Series.series_uid == str(a01[0].SeriesInstanceUID))).one()
        assert a01_series.site_id == _site_id(lab, "A01")
        uids = set(s.exec(select(Instance.sop_instance_uid).where(Instance.series_id == a01_series.id)))
        assert uids == {str(ds.SOPInstanceUID) for ds in a01}
        b02 = s.exec(select(Series).where(Series.series_uid == str(own[0].SeriesInstanceUID))).one()
        assert b02.site_id == _site_id(lab, "B02")
        held = s.exec(select(QuarantineItem).where(QuarantineItem.series_uid == str(a01[0].SeriesInstanceUID))).all()
        assert {q.site_id for q in held} == {_site_id(lab, "B02")}
    assert _stow_events(lab)[-1].actor == "site-b" and _stow_events(lab)[-1].entity_id == "B02"


def test_a_site_user_may_not_name_another_site(lab, base_url, tokens):
    before = _state(lab)
    response = _post(base_url, tokens["site-a"], _body([_encode(ds) for ds in _datasets(lab, 1)]),
                     path="/dicomweb/studies?site=B02")
    assert response.status_code == 404 and _state(lab) == before


# --- bad bodies -------------------------------------------------------------------------------------

def test_non_dicom_parts_are_quarantined_or_refused_with_their_reason(lab, base_url, tokens):
    good = _datasets(lab, 1)
    before = _state(lab)
    response = _post(base_url, tokens["site-a"], _body([
        _encode(good[0]), b"this is not DICOM at all " * 40, (b'{"00100010": {}}', "application/dicom+json")]))
    assert response.status_code == 202
    assert _reason_codes(response) == ["not_dicom", "not_application_dicom"]
    assert [f["00081197"]["Value"][0] for f in _failed(response)] == [0xC000, 0xC000]
    warnings = response.headers.get_list("warning")
    assert len(warnings) == 2 and all(w.startswith('299 corelab "') for w in warnings)
    after = _state(lab)
    # one stored, one held in quarantine (the not-DICOM application/dicom part), the other refused
    assert (after["instances"], after["quarantined"]) == (before["instances"] + 1, before["quarantined"] + 1)
    all_bad = _post(base_url, tokens["site-a"], _body([(b"hello", "text/plain")]))
    assert all_bad.status_code == 409 and _reason_codes(all_bad) == ["not_application_dicom"]


@pytest.mark.parametrize("content_type", [
    "application/dicom",
    "multipart/form-data; boundary=corelab-test-7f3a",
    "multipart/related; boundary=corelab-test-7f3a",
    'multipart/related; type="application/dicom+json"; boundary=corelab-test-7f3a',
    'multipart/related; type="application/dicom"',
    'multipart/related; type="application/dicom"; boundary=' + "x" * 71,
    'multipart/related; type="application/dicom"; boundary="ends with space "',
    'multipart/related; type="application/dicom"; boundary=semi;colon',
    'multipart/related; type="application/dicom"; boundary=a; boundary=b',
    "",
])
def test_a_wrong_content_type_gets_415_saying_what_to_send(lab, base_url, tokens, content_type):
    before = _state(lab)
    response = _post(base_url, tokens["site-a"], _body([_encode(ds) for ds in _datasets(lab, 1)]),
                     content_type=content_type)
    assert response.status_code == 415, response.text
    assert 'type="application/dicom"' in response.json()["detail"]
    assert _state(lab) == before


def test_type_may_be_unquoted_and_boundary_quoted(lab, base_url, tokens):
    response = _post(base_url, tokens["site-a"], _body([_encode(ds) for ds in _datasets(lab, 1)], "a b'(+)"),
                     content_type='Multipart/Related; TYPE=application/dicom; boundary="a b\'(+)"')
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case", ["no_closing_boundary", "cut_in_a_part", "boundary_inside_a_part", "no_parts"])
def test_a_malformed_or_truncated_body_stores_nothing(lab, base_url, tokens, case):
    parts = [_encode(ds) for ds in _datasets(lab, 3)]
    body = {"no_closing_boundary": _body(parts, close=False),
            "cut_in_a_part": _body(parts)[: len(_body(parts)) // 2],
            "boundary_inside_a_part": _body([parts[0], parts[1] + f"\r\n--{BOUNDARY}XYZ\r\n".encode() + parts[2]]),
            "no_parts": f"--{BOUNDARY}--\r\n".encode()}[case]
    before = _state(lab)
    response = _post(base_url, tokens["site-a"], body)
    assert response.status_code == 400 and "nothing was stored" in response.json()["detail"]
    assert _state(lab) == before
    assert _stow_events(lab)[-1].detail["outcome"] == "refused"


def test_a_client_that_hangs_up_mid_body_leaves_nothing(lab, base_url, tokens):
    body = _body([_encode(ds) for ds in _datasets(lab, 20)])
    before, events = _state(lab), len(_stow_events(lab))
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: {host}\r\nContent-Type: {MULTIPART}\r\n"
                      f"Authorization: Bearer {tokens['site-a']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                     + body[: len(body) * 2 // 3])
        wait_for(lambda: _state(lab)["staging"], timeout_s=10, what="the request's staging folder")
    wait_for(lambda: len(_stow_events(lab)) > events, timeout_s=10, what="the refused request's audit event")
    assert _stow_events(lab)[-1].detail["outcome"] in ("refused", "client_gone")
    assert _state(lab) == before


def test_over_the_limits_413_and_nothing_stored(lab, tokens):
    small = dataclasses.replace(lab.settings, max_object_bytes=64 * 1024, dicomweb_max_request_bytes=512 * 1024)
    server, thread, url = _serve(small)
    try:
        before = _state(lab)
        big = _datasets(lab, 1)[0]
        big.Rows = big.Columns = 256
        big.PixelData = b"\1\2" * 256 * 256  # 128 KiB: over the per-object limit
        one_big = _post(url, tokens["site-a"], _body([_encode(ds) for ds in _datasets(lab, 2)] + [_encode(big)]))
        assert one_big.status_code == 413 and "part #3" in one_big.json()["detail"], (url, one_big.text[:3000])
        many = [_encode(ds) for ds in _datasets(lab, 1)] * 600  # ~1 MiB in all, each part small
        too_much = _post(url, tokens["site-a"], _body(many))
        assert too_much.status_code == 413 and "CORELAB_DICOMWEB_MAX_REQUEST_BYTES" in too_much.json()["detail"]
        # A declared Content-Length over the limit is refused before any byte of the body is read.
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: {host}\r\nContent-Type: {MULTIPART}\r\n"
                          f"Authorization: Bearer {tokens['site-a']}\r\nContent-Length: {10**10}\r\n\r\n").encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 413 ")
        assert _state(lab) == before
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_planted_patient_name_reaches_no_response_and_no_log(lab, base_url, tokens, caplog):
    caplog.set_level(logging.DEBUG)
    name = hostile_objects.NAME
    planted = []
    for keyword in ("PatientName", "OtherPatientNames", "ReferringPhysicianName", "InstitutionName",
                    "SeriesDescription"):
        ds = _datasets(lab, 1)[0]
        setattr(ds, keyword, f"{name}^Anna")
        planted.append(_encode(ds))
    bad_uid = _datasets(lab, 1)[0]
    bad_uid.SOPInstanceUID = f"{name}.1.2"
    planted.append(_encode(bad_uid))
    response = _post(base_url, tokens["site-a"], _body(planted))
    assert response.status_code == 409
    assert set(_reason_codes(response)) == {"deid_failed", "invalid_uid"}
    seen = response.text + "".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    assert name.lower() not in seen.lower()
    assert not [r for r in caplog.records if name.lower() in r.getMessage().lower()]
    assert name not in str([e.detail for e in _stow_events(lab)])


def test_hostile_objects_get_the_same_quarantine_reasons_as_through_c_store(lab, base_url, tokens):
    names = list(hostile_objects.CASES)
    blobs = [hostile_objects.CASES[n][1]() for n in names]
    response = _post(base_url, tokens["site-a"], _body(blobs))
    assert response.status_code == 409
    # The reasons the C-STORE path gives the same bytes: the node's Store, called as its C-STORE
    # handler calls it (tests/test_receiver_badinput.py checks the same table over DICOM).
    expected = [hostile_objects.CASES[n][0] for n in names]
    assert _reason_codes(response) == expected
    via_cstore, site_id = Store(lab.settings, open_store(lab.settings)), _site_id(lab, "A01")
    direct = [via_cstore.accept(b, sop_instance_uid="", site_id=site_id, source="x", ordinal=i + 1).reason_code
              for i, b in enumerate(blobs)]
    assert direct == expected


def test_recovery_removes_a_dead_requests_staging(lab):
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    folder = lab.settings.stow_staging_dir / f"{dead}-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "000001.part").write_bytes(b"half a body")
    out = recover(lab.settings, open_store(lab.settings))
    assert out.get("staging_removed") == 1 and not folder.exists()


def test_the_same_bytes_again_are_a_no_op_and_other_bytes_a_flagged_new_version(lab, base_url, tokens):
    datasets = _datasets(lab, 2)
    first = _post(base_url, tokens["site-a"], _body([_encode(ds) for ds in datasets]))
    again = _post(base_url, tokens["site-a"], _body([_encode(ds) for ds in datasets]))
    assert (first.status_code, again.status_code) == (200, 200) and not again.headers.get_list("warning")
    datasets[1].PixelData = bytes(reversed(datasets[1].PixelData))
    changed = _post(base_url, tokens["site-a"], _body([_encode(datasets[1])]))
    assert changed.status_code == 200
    [warning] = changed.headers.get_list("warning")
    assert "stored (new_version)" in warning and "review" in warning
    with session_scope(lab.settings) as s:
        rows = s.exec(select(Instance).where(Instance.sop_instance_uid == str(datasets[1].SOPInstanceUID))).all()
    assert sorted((r.version, r.needs_review) for r in rows) == [(1, False), (2, True)]
    assert _stow_events(lab)[-1].detail["new_version"] == 1


def test_accept_negotiation_and_a_user_of_two_sites(lab, base_url, tokens):
    body = _body([_encode(ds) for ds in _datasets(lab, 1, site="B02")])
    xml = httpx.post(base_url + "/dicomweb/studies", content=body, timeout=30,
                     headers={"Content-Type": MULTIPART, "Accept": "application/dicom+xml",
                              "Authorization": f"Bearer {tokens['site-a']}"})
    assert xml.status_code == 406 and "application/dicom+json" in xml.json()["detail"]
    with session_scope(lab.settings) as s:
        accounts.add_user(s, "site-ab", role="site", sites=["A01", "B02"], password=PASSWORD, actor="test")
    token = _token(lab, "site-ab")
    before = _state(lab)
    unnamed = _post(base_url, token, body)
    assert unnamed.status_code == 400 and "?site=" in unnamed.json()["detail"] and _state(lab) == before
    named = _post(base_url, token, body, path="/dicomweb/studies?site=B02", content_type=MULTIPART)
    assert named.status_code == 200 and named.headers["content-type"] == "application/dicom+json"
    series_uid = pydicom.dcmread(io.BytesIO(_body_part(body))).SeriesInstanceUID
    with session_scope(lab.settings) as s:
        assert s.exec(select(Series.site_id).where(Series.series_uid == str(series_uid))).one() == _site_id(lab, "B02")


def _body_part(body: bytes) -> bytes:
    """The first part's bytes of a body made by :func:`_body`."""
    return body.split(b"\r\n\r\n", 1)[1].rsplit(f"\r\n--{BOUNDARY}--".encode(), 1)[0]
