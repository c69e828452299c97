"""QIDO-RS and WADO-RS read-only (portal/dicomweb_read.py, services/dicomweb_query.py), through the
real ``dicomweb-client`` against the portal served by uvicorn on the loopback.

Every expected value is computed from the store (rows, spool files) independently of the code
under test; a site token is tried with every study, series and instance UID of the other site.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from sqlmodel import col, select

from corelab.db import get_engine, session_scope
from corelab.models import AuditEvent, Instance, QuarantineItem, Series, Site, Study, Subject, Visit
from corelab.receiver_store import Store
from corelab.series_files import newest_instance_rows
from corelab.accounts import create_token
from tests.portal_helpers import build_portal_lab, planted_identifiers, served_portal

ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("dicomweb-read"))


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def changes(lab):
    """Before the server starts: an A01 object quarantined for a planted patient name (in a stored
    series) and a second version of another A01 instance (other pixel bytes)."""
    settings = lab.settings
    with session_scope(settings) as s:
        site = s.exec(select(Site).where(Site.code == "A01")).one()
        series = s.exec(select(Series).where(Series.site_id == site.id, Series.modality == "PT",
                                             Series.kind == "trial").order_by(Series.id)).first()
        first, second = newest_instance_rows(s, series)[:2]
        study = s.get(Study, series.study_id)
        site_id, study_uid, series_uid = site.id, study.study_uid, series.series_uid
        v1_path, v1_sop = settings.data_dir / second.path, second.sop_instance_uid
        base = pydicom.dcmread(settings.data_dir / first.path)
    store = Store(settings, get_engine(settings))
    bad = base.copy()
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bad.PatientName = "^".join(planted_identifiers(lab.truth)[:2])
    held = store.accept(_encode(bad), sop_instance_uid=bad.SOPInstanceUID, site_id=site_id, source="test")
    assert held.status == "quarantined" and held.reason_code == "deid_failed", held
    v2 = pydicom.dcmread(v1_path)
    pixels = bytearray(v2.PixelData)
    pixels[0] ^= 0xFF
    v2.PixelData = bytes(pixels)
    v2_bytes = _encode(v2)
    assert store.accept(v2_bytes, sop_instance_uid=v1_sop, site_id=site_id, source="test").status == "new_version"
    return {"study": study_uid, "series": series_uid, "quarantined_sop": str(bad.SOPInstanceUID),
            "v2_sop": v1_sop, "v1_bytes": v1_path.read_bytes(), "v2_bytes": v2_bytes}


@pytest.fixture(scope="module")
def server(lab, changes):
    with served_portal(lab.settings) as url:
        yield url + "/dicomweb"


@pytest.fixture(scope="module")
def tokens(lab):
    """An API token per user, made as `corelab user token NAME` makes it."""
    with session_scope(lab.settings) as s:
        return {name: create_token(s, name, label="dicomweb test", days=1, actor="test")[0]
                for name in ("phys", "site-a", "site-b", "tm", "admin")}


def _client(server, tokens, name) -> DICOMwebClient:
    return DICOMwebClient(server, headers={"Authorization": f"Bearer {tokens[name]}"})


def _get(server, tokens, name, path, **headers) -> requests.Response:
    return requests.get(server + path, headers={"Authorization": f"Bearer {tokens[name]}", **headers}, timeout=30)


def _value(item: dict, tag: str):
    return (item.get(tag, {}).get("Value") or [None])[0]


def _stored(lab, site: str | None = None) -> dict:
    """From the store, independently: {study UID: {series UID: {SOP UID: newest Instance}}}, with
    each study's pseudonym and date, for one site or all."""
    out: dict = {"studies": {}, "pseudonym": {}, "date": {}, "modality": {}}
    with session_scope(lab.settings) as s:
        stmt = (select(Series, Study, Site).join(Study, Series.study_id == Study.id)
                .join(Site, Series.site_id == Site.id))
        if site:
            stmt = stmt.where(Site.code == site)
        for series, study, _site in s.exec(stmt):
            newest: dict = {}
            for inst in s.exec(select(Instance).where(Instance.series_id == series.id)):
                if inst.sop_instance_uid not in newest or inst.version > newest[inst.sop_instance_uid].version:
                    newest[inst.sop_instance_uid] = inst
            if not newest:
                continue
            out["studies"].setdefault(study.study_uid, {})[series.series_uid] = newest
            out["modality"][series.series_uid] = series.modality
            out["date"][study.study_uid] = study.study_date.strftime("%Y%m%d") if study.study_date else None
            subject = s.exec(select(Subject).join(Visit, Visit.subject_id == Subject.id)
                             .where(Visit.id == study.visit_id)).first() if study.visit_id else None
            out["pseudonym"][study.study_uid] = subject.pseudonym if subject else None
    return out


def test_search_for_studies_matches_the_store(server, tokens, lab):
    found = _client(server, tokens, "phys").search_for_studies(get_remaining=True)
    store = _stored(lab)
    assert len(store["studies"]) > 10
    assert sorted(_value(x, "0020000D") for x in found) == sorted(store["studies"])
    for item in found:
        uid = _value(item, "0020000D")
        assert _value(item, "00201206") == len(store["studies"][uid])
        assert _value(item, "00201208") == sum(len(v) for v in store["studies"][uid].values())
        if store["pseudonym"][uid]:
            assert _value(item, "00100020") == store["pseudonym"][uid]
        else:  # a phantom study has no subject: its PatientID is the stored header's
            some = next(iter(next(iter(store["studies"][uid].values())).values()))
            assert _value(item, "00100020") == pydicom.dcmread(lab.settings.data_dir / some.path).PatientID
        assert _value(item, "00080020") == store["date"][uid]
        assert set(item["00080061"]["Value"]) == {store["modality"][x] for x in store["studies"][uid]}
        # dicomweb-client sends "Host: 127.0.0.1" without the port, and RetrieveURL follows Host.
        assert _value(item, "00081190").endswith(f"/dicomweb/studies/{uid}")
    text = json.dumps(found).upper()
    direct = _get(server, tokens, "phys", "/studies?limit=1").json()[0]
    assert _value(direct, "00081190") == f"{server}/studies/{_value(direct, '0020000D')}"
    assert not [n for n in planted_identifiers(lab.truth) if n in text]


def test_filters_and_paging_compare_with_the_store(server, tokens, lab):
    client, store = _client(server, tokens, "phys"), _stored(lab)
    dates = sorted(d for d in store["date"].values() if d)
    low, high = dates[len(dates) // 4], dates[3 * len(dates) // 4]
    in_range = client.search_for_studies(search_filters={"StudyDate": f"{low}-{high}"}, get_remaining=True)
    assert sorted(_value(x, "0020000D") for x in in_range) == sorted(
        u for u, d in store["date"].items() if d and low <= d <= high)
    assert 0 < len(in_range) < len(store["studies"])
    one_day = client.search_for_studies(search_filters={"StudyDate": low})
    assert {_value(x, "0020000D") for x in one_day} == {u for u, d in store["date"].items() if d == low}
    after = client.search_for_studies(search_filters={"StudyDate": f"{high}-"}, get_remaining=True)
    assert {_value(x, "0020000D") for x in after} == {u for u, d in store["date"].items() if d and d >= high}
    pseudonym = next(p for p in store["pseudonym"].values() if p)
    by_patient = client.search_for_studies(search_filters={"PatientID": pseudonym})
    assert {_value(x, "0020000D") for x in by_patient} == {u for u, p in store["pseudonym"].items() if p == pseudonym}
    wildcard = client.search_for_studies(search_filters={"PatientID": pseudonym[:-1] + "?"}, get_remaining=True)
    assert {_value(x, "0020000D") for x in wildcard} == {
        u for u, p in store["pseudonym"].items() if p and p[:-1] == pseudonym[:-1] and len(p) == len(pseudonym)}
    pet = client.search_for_series(search_filters={"Modality": "PT"}, get_remaining=True)
    assert sorted(_value(x, "0020000E") for x in pet) == sorted(u for u, m in store["modality"].items() if m == "PT")
    # Pages of 7, walked by offset, give every series once, in the same order as one page.
    everything = client.search_for_series(limit=1000)
    pages, offset = [], 0
    while chunk := client.search_for_series(limit=7, offset=offset):
        assert len(chunk) <= 7
        pages += chunk
        offset += 7
    assert [_value(x, "0020000E") for x in pages] == [_value(x, "0020000E") for x in everything]
    assert len(everything) == len(store["modality"])
    # includefield: an attribute only the header has, compared with the spool file.
    study_uid, series_map = next(iter(store["studies"].items()))
    series_uid, insts = next(iter(series_map.items()))
    found = client.search_for_instances(study_uid, series_uid, fields=["SliceThickness", "00200032"])
    assert sorted(_value(x, "00080018") for x in found) == sorted(insts)
    for item in found:
        header = pydicom.dcmread(lab.settings.data_dir / insts[_value(item, "00080018")].path, stop_before_pixels=True)
        assert float(_value(item, "00180050")) == float(header.SliceThickness)
        assert [float(v) for v in item["00200032"]["Value"]] == [float(v) for v in header.ImagePositionPatient]
        assert _value(item, "00200013") == int(header.InstanceNumber)
    every = client.search_for_instances(study_uid, series_uid, fields=["all"], limit=1)[0]
    header = pydicom.dcmread(lab.settings.data_dir / insts[_value(every, "00080018")].path, stop_before_pixels=True)
    assert [float(v) for v in every["00280030"]["Value"]] == [float(v) for v in header.PixelSpacing]
    assert "7FE00010" not in every and len(every) >= len(header) - 2


def test_retrieve_series_is_the_spool_files_and_is_audited(server, tokens, lab):
    client, store = _client(server, tokens, "phys"), _stored(lab)
    study_uid, series_map = next(iter(store["studies"].items()))
    series_uid, insts = next(iter(series_map.items()))
    with session_scope(lab.settings) as s:
        audits = len(s.exec(select(AuditEvent).where(AuditEvent.action == "dicomweb.retrieve")).all())
    datasets = client.retrieve_series(study_uid, series_uid)  # the client's default Accept (Explicit VR LE)
    assert sorted(str(ds.SOPInstanceUID) for ds in datasets) == sorted(insts)
    for ds in datasets:
        assert ds.PixelData == pydicom.dcmread(lab.settings.data_dir / insts[ds.SOPInstanceUID].path).PixelData
    # The raw parts, through the client's own multipart decoder, are the spool files byte for byte.
    response = client._http_get(f"{server}/studies/{study_uid}/series/{series_uid}", headers={"Accept": ANY_SYNTAX},
                                stream=True)
    assert "content-length" not in response.headers  # streamed, not built in memory
    parts = [bytes(p) for p in client._decode_multipart_message(response, stream=True)]
    expected = {(lab.settings.data_dir / inst.path).read_bytes() for inst in insts.values()}
    assert len(parts) == len(insts) and set(parts) == expected
    with session_scope(lab.settings) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "dicomweb.retrieve")
                        .order_by(col(AuditEvent.id))).all()
    assert len(events) == audits + 2
    assert events[-1].entity == "series" and events[-1].entity_id == series_uid
    assert events[-1].actor == "phys" and events[-1].detail["instances"] == len(insts)
    study = client.retrieve_study(study_uid)
    assert sorted(str(ds.SOPInstanceUID) for ds in study) == sorted(u for v in series_map.values() for u in v)


def test_metadata_has_no_pixel_data_and_is_the_header(server, tokens, lab):
    client, store = _client(server, tokens, "phys"), _stored(lab)
    study_uid, series_map = next(iter(store["studies"].items()))
    series_uid, insts = next(iter(series_map.items()))
    meta = client.retrieve_series_metadata(study_uid, series_uid)
    assert sorted(_value(m, "00080018") for m in meta) == sorted(insts)
    for item in meta:
        assert "7FE00010" not in item
        assert not any(v.get("vr") in ("OB", "OW") and len(v.get("InlineBinary", "")) > 1400 for v in item.values())
        header = pydicom.dcmread(lab.settings.data_dir / insts[_value(item, "00080018")].path, stop_before_pixels=True)
        assert _value(item, "00200013") == int(header.InstanceNumber)
        assert _value(item, "00281053") == float(header.RescaleSlope)
    study_meta = client.retrieve_study_metadata(study_uid)
    assert len(study_meta) == sum(len(v) for v in series_map.values())
    one = client.retrieve_instance_metadata(study_uid, series_uid, next(iter(insts)))
    assert _value(one, "00080018") == next(iter(insts))
    text = json.dumps(study_meta).upper()
    assert not [n for n in planted_identifiers(lab.truth) if n in text]


def test_a_site_sees_only_its_own_studies(server, tokens, lab):
    mine, theirs = _stored(lab, "A01"), _stored(lab, "B02")
    client = _client(server, tokens, "site-a")
    found = client.search_for_studies(get_remaining=True)
    assert sorted(_value(x, "0020000D") for x in found) == sorted(mine["studies"])
    all_series = client.search_for_series(get_remaining=True)
    assert sorted(_value(x, "0020000E") for x in all_series) == sorted(mine["modality"])
    unknown = _get(server, tokens, "site-a", f"/studies/{generate_uid()}/series")
    assert unknown.status_code == 404
    tried = Counter()
    for study_uid, series_map in theirs["studies"].items():
        assert client.search_for_studies(search_filters={"StudyInstanceUID": study_uid}) == []
        for path in (f"/studies/{study_uid}", f"/studies/{study_uid}/metadata", f"/studies/{study_uid}/series",
                     f"/studies/{study_uid}/instances"):
            response = _get(server, tokens, "site-a", path, Accept="*/*")
            assert response.status_code == 404 and study_uid not in response.text, path
            tried["study"] += 1
        for series_uid, insts in series_map.items():
            assert client.search_for_series(search_filters={"SeriesInstanceUID": series_uid}) == []
            for suffix in ("", "/metadata", "/instances"):
                response = _get(server, tokens, "site-a", f"/studies/{study_uid}/series/{series_uid}{suffix}")
                assert response.status_code == 404 and series_uid not in response.text
                tried["series"] += 1
            for sop in insts:
                for suffix in ("", "/metadata"):
                    response = _get(server, tokens, "site-a",
                                    f"/studies/{study_uid}/series/{series_uid}/instances/{sop}{suffix}")
                    assert response.status_code == 404 and sop not in response.text
                    tried["instance"] += 1
    assert tried["study"] >= 4 and tried["series"] >= 6 and tried["instance"] >= 40, tried
    # The same answer as for a UID that does not exist: nothing tells that B02's study is there.
    b02_study = next(iter(theirs["studies"]))
    assert _get(server, tokens, "site-a", f"/studies/{b02_study}").text == \
        _get(server, tokens, "site-a", f"/studies/{generate_uid()}").text
    # B02's own user does reach them.
    b02_study, b02_series = next(iter(theirs["studies"].items()))
    assert len(_client(server, tokens, "site-b").retrieve_series(b02_study, next(iter(b02_series)))) > 0


@pytest.mark.parametrize("name", ["tm", "admin"])
def test_trial_manager_and_admin_are_refused(server, tokens, lab, name):
    study_uid, series_map = next(iter(_stored(lab, "A01")["studies"].items()))
    for path in ("/studies", "/series", f"/studies/{study_uid}", f"/studies/{study_uid}/metadata",
                 f"/studies/{study_uid}/series/{next(iter(series_map))}"):
        assert _get(server, tokens, name, path).status_code == 403
    bad = requests.get(server + "/studies", headers={"Authorization": "Bearer clt_not-a-token"}, timeout=10)
    assert bad.status_code == 401


def test_invalid_input_is_400_with_a_message(server, tokens, lab):
    study_uid = next(iter(_stored(lab, "A01")["studies"]))
    # ("..": the HTTP client itself folds it out of a path; it is tried as a query value below.)
    bad_uids = ("1.2.abc", "01.2.3", "1..2", "1." + "2" * 64, "1.2.3\\1.2.4", "1.2.3 ", "1.2.%00")
    for uid in bad_uids:
        for path in (f"/studies/{uid}", f"/studies/{uid}/series", f"/studies/{study_uid}/series/{uid}/metadata",
                     f"/studies/{study_uid}/series/1.2.3/instances/{uid}"):
            response = _get(server, tokens, "phys", path)
            assert response.status_code in (400, 404), (path, response.status_code)
            if response.status_code == 400:
                assert "not a valid UID" in response.json()["detail"]
    assert _get(server, tokens, "phys", "/studies/1.2.abc").status_code == 400
    queries = {"StudyDate=20241399": "calendar date", "StudyDate=2024": "YYYYMMDD",
               "StudyDate=20240501-20240401": "ends before", "limit=0": "limit", "limit=abc": "limit",
               "offset=-1": "offset", "Foo=1": "keyword", "SOPInstanceUID=1.2.3": "instance level: search /instances",
               "PatientSex=F": "not a matching key", "StudyInstanceUID=1.2.x": "not a valid UID",
               "includefield=NotAnAttribute": "includefield", "Modality=pt": "modality codes",
               "limit=5&limit=6": "more than once", "fuzzymatching=maybe": "fuzzymatching"}
    for query, words in queries.items():
        response = _get(server, tokens, "phys", f"/studies?{query}")
        assert response.status_code == 400 and words in response.json()["detail"], (query, response.text)
    dots = _get(server, tokens, "phys", "/series?SeriesInstanceUID=..")
    assert dots.status_code == 400 and "not a valid UID" in dots.json()["detail"]
    with pytest.raises(requests.HTTPError) as caught:
        _client(server, tokens, "phys").search_for_studies(search_filters={"StudyDate": "20241399"})
    assert caught.value.response.status_code == 400


def test_accept_is_honoured(server, tokens, lab):
    store = _stored(lab, "A01")
    study_uid, series_map = next(iter(store["studies"].items()))
    series_uid = next(iter(series_map))
    path = f"/studies/{study_uid}/series/{series_uid}"
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.70'
    for accept, status in ((jpeg, 406), ("image/jpeg", 406), ("application/dicom+json", 406),
                           ('multipart/related; type="application/dicom"', 200), (ANY_SYNTAX, 200),
                           ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1', 200),
                           (f"{jpeg}, {ANY_SYNTAX};q=0.5", 200), ("*/*", 200)):
        response = _get(server, tokens, "phys", path, Accept=accept)
        assert response.status_code == status, (accept, response.status_code, response.text[:200])
        if status == 406:
            assert "transfer-syntax" in response.json()["detail"] or "multipart" in response.json()["detail"]
    assert _get(server, tokens, "phys", "/studies", Accept="text/html").status_code == 406
    assert _get(server, tokens, "phys", "/studies", Accept="application/json").status_code == 200


def test_quarantined_never_served_and_second_version_replaces_first(server, tokens, lab, changes):
    client = _client(server, tokens, "phys")
    study_uid, series_uid = changes["study"], changes["series"]
    with session_scope(lab.settings) as s:
        assert s.exec(select(QuarantineItem).where(QuarantineItem.series_uid == series_uid)).first() is not None
        rows = s.exec(select(Instance).where(Instance.sop_instance_uid == changes["v2_sop"])).all()
    assert sorted(r.version for r in rows) == [1, 2]
    listed = [_value(x, "00080018") for x in client.search_for_instances(study_uid, series_uid, get_remaining=True)]
    assert changes["quarantined_sop"] not in listed
    assert Counter(listed)[changes["v2_sop"]] == 1 and len(listed) == len(set(listed))
    series_sops = [str(ds.SOPInstanceUID) for ds in client.retrieve_series(study_uid, series_uid)]
    assert changes["quarantined_sop"] not in series_sops and len(series_sops) == len(listed)
    missing = _get(server, tokens, "phys", f"/studies/{study_uid}/series/{series_uid}/instances/"
                                           f"{changes['quarantined_sop']}")
    assert missing.status_code == 404
    response = client._http_get(f"{server}/studies/{study_uid}/series/{series_uid}/instances/{changes['v2_sop']}",
                                headers={"Accept": ANY_SYNTAX})
    (part,) = list(client._decode_multipart_message(response, stream=False))
    assert part == changes["v2_bytes"] != changes["v1_bytes"]
    counted = next(x for x in client.search_for_series(study_uid) if _value(x, "0020000E") == series_uid)
    assert _value(counted, "00201209") == len(listed)


@pytest.mark.slow
def test_a_large_series_streams_with_bounded_memory(server, tokens, lab):
    """200 objects of 2 MiB (420 MB) retrieved in one answer: the portal's process grows by far less
    than the series (it streams 1 MiB reads), and every byte arrives."""
    import threading
    import time

    import psutil

    with session_scope(lab.settings) as s:
        site = s.exec(select(Site).where(Site.code == "A01")).one()
        series = s.exec(select(Series).where(Series.site_id == site.id, Series.modality == "PT")).first()
        base = pydicom.dcmread(lab.settings.data_dir / newest_instance_rows(s, series)[0].path)
        site_id = site.id
    store, series_uid, count, side = Store(lab.settings, get_engine(lab.settings)), generate_uid(), 200, 1024
    for i in range(count):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = side
        ds.PixelData = bytes([i % 251]) * (side * side * 2)
        assert store.accept(_encode(ds), sop_instance_uid=ds.SOPInstanceUID, site_id=site_id,
                            source="test").status == "stored"
    with session_scope(lab.settings) as s:
        expected = sum(i.size_bytes for i in s.exec(select(Instance).join(Series)
                                                     .where(Series.series_uid == series_uid)))
    me = psutil.Process()  # the server runs in a thread of this process
    before, peak, done = me.memory_info().rss, [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    received = 0
    with requests.get(f"{server}/studies/{base.StudyInstanceUID}/series/{series_uid}", stream=True, timeout=60,
                      headers={"Authorization": f"Bearer {tokens['phys']}", "Accept": ANY_SYNTAX}) as response:
        assert response.status_code == 200
        for chunk in response.iter_content(1 << 20):
            received += len(chunk)
    done.set()
    watcher.join()
    assert expected > 400e6 and expected < received < expected + count * 200  # + the part headers
    growth = peak[0] - before
    print(f"retrieved {received / 1e6:.0f} MB; process RSS grew by {growth / 1e6:.1f} MB")
    assert growth < 64e6, f"the process grew by {growth / 1e6:.0f} MB while streaming {received / 1e6:.0f} MB"
