"""The portal's review pages: the physicist's worklist, query threads, waivers and the quarantine.

One lab for the module (tests/portal_helpers.py); tests run in file order and each reads what
it expects from the store, so a later test sees the changes of an earlier one on purpose.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import func
from sqlmodel import Session, col, select

from corelab.db import open_store, session_scope
from corelab.models import AuditEvent, Deviation, PhantomResult, QuarantineItem, Query, Report, Series, Site
from portal.app import create_app
from services import intake
from services.worklist import worklist
from tests.portal_helpers import build_portal_lab, client_for, post_form


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = build_portal_lab(tmp_path_factory.mktemp("review"))
    drop = tmp_path_factory.mktemp("a01-drop")
    (drop / "scan-notes.dcm").write_bytes(b"not a DICOM object, just notes\n" * 8)
    with session_scope(lab.settings) as s:  # one quarantined object of A01 (the lab has only B02's)
        intake.ingest_drop(s, lab.settings, drop, "A01")
    return lab


@pytest.fixture(scope="module")
def app(lab):
    return create_app(lab.settings)


@pytest.fixture(scope="module")
def clients(app):
    return {name: client_for(app, name) for name in ("site-a", "site-b", "phys", "tm")}


def _store(lab):
    return session_scope(lab.settings)


def _query(lab, query_id: int) -> tuple[str, list]:
    with _store(lab) as s:
        q = s.get(Query, query_id)
        return q.status, list(q.thread)


def _events(lab, action: str, entity_id) -> list[tuple[str, dict]]:
    with _store(lab) as s:
        return [(e.actor, e.detail) for e in s.exec(select(AuditEvent).where(
            AuditEvent.action == action, AuditEvent.entity_id == str(entity_id)).order_by(col(AuditEvent.id)))]


def _open_deviation(lab, site: str) -> tuple[int, int]:
    """(id, series id) of an open deviation of ``site`` with no query."""
    with _store(lab) as s:
        queried = select(Query.deviation_id)
        dev = s.exec(select(Deviation).join(Series, Deviation.series_id == Series.id)
                     .join(Site, Series.site_id == Site.id)
                     .where(Site.code == site, Deviation.status == "open", col(Deviation.id).not_in(queried))
                     .order_by(col(Deviation.id))).first()
        return dev.id, dev.series_id


def test_site_answers_its_query_through_the_form(lab, clients):
    site_a = clients["site-a"]
    qid = lab.ids["A01"]["query"][0]
    listing = site_a.get("/queries")
    assert listing.status_code == 200 and f'href="/queries/{qid}"' in listing.text
    before = _query(lab, qid)
    too_long = post_form(site_a, f"/queries/{qid}", f"/queries/{qid}/answer", {"text": "x" * 4001})
    assert too_long.status_code == 400 and "at most 4000" in too_long.text
    assert _query(lab, qid) == before

    text = "The weight was missing in the export; re-sent with the weight on Monday."
    r = post_form(site_a, f"/queries/{qid}", f"/queries/{qid}/answer", {"text": text})
    assert r.status_code == 200 and r.url.path == f"/queries/{qid}"
    assert "was sent to the core lab" in r.text and text in r.text
    status, thread = _query(lab, qid)
    assert status == "answered"
    assert thread[-1]["by"] == "A01" and thread[-1]["kind"] == "answer" and thread[-1]["text"] == text
    assert len(thread) == len(before[1]) + 1
    events = _events(lab, "query.answer", qid)
    assert [actor for actor, _ in events] == ["site-a"] and events[0][1]["text"] == text
    assert "answered" in site_a.get("/queries").text


def test_site_cannot_see_or_answer_another_sites_query(lab, clients):
    site_a = clients["site-a"]
    qid = lab.ids["B02"]["query"][0]
    before = _query(lab, qid)
    assert site_a.get(f"/queries/{qid}").status_code == 404
    assert f'href="/queries/{qid}"' not in site_a.get("/queries").text
    r = post_form(site_a, "/queries", f"/queries/{qid}/answer", {"text": "answering for B02"})
    assert r.status_code == 404
    assert post_form(site_a, "/queries", "/queries/999999/answer", {"text": "x"}).status_code == 404
    assert _query(lab, qid) == before and _events(lab, "query.answer", qid) == []
    # B02's own user sees it; a physicist may not answer for a site
    assert clients["site-b"].get(f"/queries/{qid}").status_code == 200
    tm_list = clients["tm"].get("/queries").text  # the trial manager reads the queries of the trial
    assert all(f'href="/queries/{q}"' in tm_list for q in (qid, lab.ids["A01"]["query"][0]))
    assert "/answer" not in clients["tm"].get(f"/queries/{qid}").text
    assert post_form(clients["phys"], f"/queries/{qid}", f"/queries/{qid}/answer", {"text": "x"}).status_code == 403


def test_physicist_waives_a_deviation_and_opens_a_query(lab, clients):
    phys = clients["phys"]
    dev_id, series_id = _open_deviation(lab, "A01")
    reason = "Weight recorded on the CRF; SUV computed by hand and checked."
    r = post_form(phys, "/worklist", f"/deviations/{dev_id}/waive", {"reason": reason})
    assert r.history and r.history[0].status_code == 303
    assert r.history[0].headers["location"] == f"/series/{series_id}"
    with _store(lab) as s:
        assert s.get(Deviation, dev_id).status == "waived"
    events = _events(lab, "deviation.waive", dev_id)
    assert [actor for actor, _ in events] == ["phys"] and events[0][1]["reason"] == reason
    again = post_form(phys, "/worklist", f"/deviations/{dev_id}/waive", {"reason": reason})
    assert again.status_code == 409 and "already waived" in again.text

    other, _ = _open_deviation(lab, "C03")
    question = "Which scanner made this scan? It is not in the register."
    r = post_form(phys, "/worklist", f"/deviations/{other}/query", {"text": question})
    assert r.status_code == 200
    new_id = int(re.fullmatch(r"/queries/(\d+)", r.url.path).group(1))
    with _store(lab) as s:
        q = s.get(Query, new_id)
        assert (q.deviation_id, q.status, q.thread[0]["by"], q.thread[0]["text"]) == (other, "open", "phys", question)
        assert s.get(Deviation, other).status == "queried"
        assert s.get(Site, q.site_id).code == "C03"
    assert [actor for actor, _ in _events(lab, "query.open", new_id)] == ["phys"]
    assert question in r.text
    twice = post_form(phys, "/worklist", f"/deviations/{other}/query", {"text": question})
    assert twice.status_code == 409 and f"already has query {new_id}" in twice.text
    # a trial manager changes nothing
    assert post_form(clients["tm"], "/queries", f"/deviations/{other}/waive", {"reason": "x"}).status_code == 403


def test_waiver_without_reason_is_refused_and_changes_nothing(lab, clients):
    dev_id, _ = _open_deviation(lab, "B02")
    waivers = len(_events(lab, "deviation.waive", dev_id))
    r = post_form(clients["phys"], "/worklist", f"/deviations/{dev_id}/waive", {"reason": "   "})
    assert r.status_code == 400 and "a waiver needs a reason" in r.text
    with _store(lab) as s:
        assert s.get(Deviation, dev_id).status == "open"
    assert len(_events(lab, "deviation.waive", dev_id)) == waivers


def test_post_without_csrf_token_is_refused(lab, clients):
    qid = lab.ids["A01"]["query"][0]
    before = _query(lab, qid)
    r = clients["site-a"].post(f"/queries/{qid}/answer", data={"text": "no token"})
    assert r.status_code == 403 and "security token" in r.text
    assert _query(lab, qid) == before
    dev_id, _ = _open_deviation(lab, "B02")
    r = clients["phys"].post(f"/deviations/{dev_id}/waive", data={"reason": "no token", "csrf_token": "forged"})
    assert r.status_code == 403
    with _store(lab) as s:
        assert s.get(Deviation, dev_id).status == "open"


def test_worklist_shows_what_waits(lab, clients):
    phys = clients["phys"]
    page = phys.get("/worklist")
    assert page.status_code == 200
    with _store(lab) as s:
        answered = list(s.exec(select(Query.id).where(Query.status == "answered")))
        replaced = set(s.exec(select(Report.replaces_id).where(col(Report.replaces_id).is_not(None))))
        unsigned = [r.id for r in s.exec(select(Report).where(col(Report.signed_at).is_(None)))
                    if r.id not in replaced]
        quarantined = dict(s.exec(select(Site.code, func.count(QuarantineItem.id)).select_from(QuarantineItem).join(
            Site, QuarantineItem.site_id == Site.id).where(col(QuarantineItem.released_at).is_(None))
            .group_by(Site.code)).all())
        today = s.exec(select(func.count(Series.id))).one()  # the whole lab was received today
    assert answered == [lab.ids["A01"]["query"][0]] and unsigned and quarantined == {"A01": 1, "B02": 20}
    for qid in answered:
        assert f'href="/queries/{qid}"' in page.text
    for rid in unsigned:
        assert f'href="/reports/{rid}"' in page.text
    for site, n in quarantined.items():
        assert re.search(rf"<td>{site}</td><td>{n}</td>", page.text)
    assert re.search(rf'id="arrivals">Today\'s arrivals <span class="count">{today}</span>', page.text)
    assert clients["site-a"].get("/worklist").status_code == 403
    assert clients["tm"].get("/worklist").status_code == 403


def test_physicist_resolves_the_answered_query(lab, clients):
    qid = lab.ids["A01"]["query"][0]
    page = clients["phys"].get(f"/queries/{qid}")
    assert f'action="/queries/{qid}/resolve"' in page.text and f"/queries/{qid}/answer" not in page.text
    r = post_form(clients["phys"], f"/queries/{qid}", f"/queries/{qid}/resolve", {"text": "Accepted: weight now recorded."})
    assert r.status_code == 200 and f"Query {qid} resolved" in r.text
    status, thread = _query(lab, qid)
    assert status == "resolved" and thread[-1]["by"] == "phys" and thread[-1]["kind"] == "resolution"
    with _store(lab) as s:
        assert s.get(Deviation, s.get(Query, qid).deviation_id).status == "resolved"
    assert [actor for actor, _ in _events(lab, "query.resolve", qid)] == ["phys"]
    late = post_form(clients["site-a"], f"/queries/{qid}", f"/queries/{qid}/answer", {"text": "one more thing"})
    assert late.status_code == 409 and "already resolved" in late.text
    assert f'href="/queries/{qid}"' not in clients["phys"].get("/worklist").text.split('id="answered"')[1]


def test_worklist_sections_follow_the_store(lab):
    """Withheld phantoms (the newest result only), signed and replaced reports, the cap; rolled back."""
    with Session(open_store(lab.settings)) as s:
        phantom = s.exec(select(Series).where(Series.kind == "phantom").order_by(col(Series.id))).first()
        s.add(PhantomResult(series_id=phantom.id, scanner_id=phantom.scanner_id, kind="nema_iec", verdict="withheld",
                            metrics={"withheld": {"reason": "localisation uncertain",
                                                  "details": ["sphere 37 mm measures 22 mm"], "action": "centres"}}))
        first, second = s.exec(select(Report).order_by(col(Report.id)).limit(2)).all()
        first.signed_at, first.signed_by = dt.datetime.now(dt.timezone.utc), "phys"
        s.add(Report(kind=second.kind, site_id=second.site_id, trial_id=second.trial_id, path="x", sha256="0" * 64,
                     version=2, replaces_id=second.id))
        s.flush()
        w = worklist(s, limit=3)
        assert [r["series_id"] for r in w["withheld"]["rows"]] == [phantom.id]
        assert w["withheld"]["rows"][0]["details"] == ["sphere 37 mm measures 22 mm"]
        unsigned = {r["id"] for r in w["unsigned"]["rows"]}
        assert first.id not in unsigned and second.id not in unsigned
        assert len(w["arrivals"]["rows"]) == 3 and w["arrivals"]["more"] == w["arrivals"]["total"] - 3
        s.add(PhantomResult(series_id=phantom.id, scanner_id=phantom.scanner_id, kind="nema_iec", verdict="pass"))
        s.flush()
        assert worklist(s)["withheld"]["total"] == 0
        assert worklist(s, today=dt.date.today() + dt.timedelta(days=1))["arrivals"]["total"] == 0
        s.rollback()


def test_quarantine_is_scoped_to_the_sites_of_the_user(lab, clients):
    with _store(lab) as s:
        items = {code: [(i.source_name, i.sha256[:12]) for i in s.exec(
            select(QuarantineItem).join(Site, QuarantineItem.site_id == Site.id).where(Site.code == code))]
            for code in ("A01", "B02")}
    assert len(items["A01"]) == 1 and len(items["B02"]) == 20
    page = clients["site-a"].get("/quarantine")
    assert page.status_code == 200 and "Site A01" in page.text and "not_dicom" in page.text
    assert items["A01"][0][0] in page.text
    for source, prefix in items["B02"]:
        assert source not in page.text and prefix not in page.text
    assert "Site B02" not in page.text and "/release" not in page.text
    full = clients["phys"].get("/quarantine")
    assert all(source in full.text for source, _ in items["A01"] + items["B02"])
    assert clients["tm"].get("/quarantine").status_code == 403


def test_release_of_an_item_that_still_fails_keeps_it_and_says_why(lab, clients):
    item_id = lab.ids["B02"]["quarantine"][0]
    assert post_form(clients["site-b"], "/quarantine", f"/quarantine/{item_id}/release", {}).status_code == 403
    r = post_form(clients["phys"], "/quarantine", f"/quarantine/{item_id}/release", {})
    assert r.status_code == 200 and r.url.path == "/quarantine"
    assert f"Item {item_id} is still quarantined (deid_failed)" in r.text
    assert "de-identification check failed" in r.text
    with _store(lab) as s:
        item = s.get(QuarantineItem, item_id)
        assert item.released_at is None and item.reason_code == "deid_failed"
    events = _events(lab, "quarantine.release", item_id)
    assert [actor for actor, _ in events] == ["phys"] and events[0][1]["status"] == "quarantined"
    assert post_form(clients["phys"], "/quarantine", "/quarantine/999999/release", {}).status_code == 404
