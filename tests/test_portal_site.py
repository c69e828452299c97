"""The site's pages of the portal: the subject x visit grid, a series' QC result, the scanners.

One small core lab for the module (tests/portal_helpers.py). Expected states are computed here
from the store rows, not through services.site_view, so a wrong rule there fails a test.
"""

from __future__ import annotations

import datetime as dt
import html
import re

import pytest
from sqlalchemy import event
from sqlmodel import select

from corelab.db import open_store, session_scope
from corelab.models import (Accreditation, Deviation, QuarantineItem, Query, Scanner, Series, Site, Study, Subject,
                            Visit)
from portal.app import create_app
from services import site_view
from tests.portal_helpers import build_portal_lab, client_for

STATE_BADGE = re.compile(r'<a href="/series/(\d+)">[^<]*</a>\s*<span class="state state-(\w+)">')


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("portal_site"))


@pytest.fixture(scope="module")
def app(lab):
    return create_app(lab.settings)


@pytest.fixture(scope="module")
def clients(app):
    return {name: client_for(app, name) for name in ("site-a", "site-b", "phys", "tm", "admin")}


def _store(lab) -> dict:
    """Per site: series rows with subject and visit, and the expected state of each trial series."""
    out: dict = {}
    with session_scope(lab.settings) as s:
        unresolved = {d.series_id for q, d in s.exec(select(Query, Deviation).join(
            Deviation, Query.deviation_id == Deviation.id)) if q.status in ("open", "answered")}
        major_open = {d.series_id for d in s.exec(select(Deviation)) if d.severity == "major"
                      and d.status in ("open", "queried")}
        rows = s.exec(select(Series, Site, Subject, Visit).join(Site, Series.site_id == Site.id)
                      .join(Study, Series.study_id == Study.id, isouter=True)
                      .join(Visit, Study.visit_id == Visit.id, isouter=True)
                      .join(Subject, Visit.subject_id == Subject.id, isouter=True)).all()
        for series, site, subject, visit in rows:
            entry = out.setdefault(site.code, {"series": {}, "subjects": set(), "phantoms": {}})
            if series.kind == "phantom":
                entry["phantoms"][series.id] = series.series_uid
                continue
            entry["subjects"].add(subject.pseudonym)
            if series.qc_state == "pending":
                expected = "received"  # complete, never checked (a CT)
            elif series.id in unresolved:
                expected = "query_open"
            elif series.id in major_open:
                expected = "deviation"
            else:
                expected = "evaluable"
            assert series.state == "complete" and series.qc_state in ("pending", "done")  # the lab's cases
            entry["series"][series.id] = {"uid": series.series_uid, "state": expected, "visit": visit.label,
                                          "subject": subject.pseudonym}
    return out


@pytest.fixture(scope="module")
def store(lab):
    return _store(lab)


def test_grid_shows_the_sites_subjects_with_each_series_state(clients, store):
    page = clients["site-a"].get("/sites/A01")
    assert page.status_code == 200
    a01 = store["A01"]
    for pseudonym in a01["subjects"]:
        assert f">{pseudonym}</th>" in page.text
    shown = {int(sid): state for sid, state in STATE_BADGE.findall(page.text)}
    assert shown == {sid: row["state"] for sid, row in a01["series"].items()}
    # The lab has each interesting case at A01: the test means something.
    assert {"query_open", "deviation", "evaluable", "received"} <= set(shown.values())
    for key, label in (("query_open", "query open"), ("deviation", "deviation")):
        n = sum(1 for row in a01["series"].values() if row["state"] == key)
        assert f'<span class="state state-{key}">{label}</span> {n}</span>' in page.text


def test_grid_columns_follow_the_trials_visits(clients):
    text = clients["site-a"].get("/sites/A01").text
    assert text.index("<th>baseline</th>") < text.index("<th>followup</th>")


def test_grid_lists_phantoms_separately_with_verdict(clients, store, lab):
    text = clients["site-a"].get("/sites/A01").text
    phantoms = text.split("<h2>Phantom scans</h2>", 1)[1]
    for sid in store["A01"]["phantoms"]:
        assert f'href="/series/{sid}"' in phantoms
        assert f'href="/series/{sid}"' not in text.split("<h2>Phantom scans</h2>", 1)[0]
    assert "A01-1" in phantoms and "pass" in phantoms


def test_grid_links_open_quarantine(clients, lab):
    with session_scope(lab.settings) as s:
        b02 = s.exec(select(Site).where(Site.code == "B02")).one()
        held = len([q for q in s.exec(select(QuarantineItem).where(QuarantineItem.site_id == b02.id))
                    if q.released_at is None])
    assert held  # the planted patient name was quarantined at B02
    assert f'<a href="/quarantine">{held} objects in quarantine</a>' in clients["site-b"].get("/sites/B02").text


def test_another_sites_grid_is_not_found(clients, store):
    for url in ("/sites/B02", "/sites/NOPE"):
        page = clients["site-a"].get(url)
        assert page.status_code == 404
        assert not any(p in page.text for p in store["B02"]["subjects"])
    assert clients["phys"].get("/sites/NOPE").status_code == 404
    assert clients["admin"].get("/sites/A01").status_code == 403


def test_another_sites_series_is_not_found(clients, store):
    for sid, row in {**store["B02"]["series"], **{k: {"uid": v} for k, v in store["B02"]["phantoms"].items()}}.items():
        page = clients["site-a"].get(f"/series/{sid}")
        assert page.status_code == 404 and row["uid"] not in page.text
    assert clients["site-a"].get("/series/999999").status_code == 404


def test_physicist_sees_series_of_every_site(clients, store):
    for code in ("A01", "B02"):
        sid, row = next(iter(store[code]["series"].items()))
        page = clients["phys"].get(f"/series/{sid}")
        assert page.status_code == 200 and row["uid"] in page.text and row["subject"] in page.text
    assert clients["phys"].get("/sites/B02").status_code == 200


def test_series_page_shows_deviations_with_manual_section_and_message(clients, lab):
    with session_scope(lab.settings) as s:
        dev = s.exec(select(Deviation).where(Deviation.id.in_(lab.ids["A01"]["deviation"]))
                     .order_by(Deviation.id)).first()
        series = s.get(Series, dev.series_id)
        query = s.exec(select(Query).where(Query.deviation_id.in_(
            select(Deviation.id).where(Deviation.series_id == series.id)))).first()
        dev, uid = dev.model_dump(), series.series_uid
    text = clients["site-a"].get(f"/series/{dev['series_id']}").text
    assert uid in text and dev["rule_id"] in text
    shown = html.unescape(text)  # Jinja and html.escape spell an apostrophe differently
    assert dev["manual_section"] in shown and dev["message"] in shown and dev["observed"] in shown
    if query is not None:
        assert f'href="/queries/{query.id}"' in text
    assert "/deviations/" not in text  # a site user gets no review forms


def test_physicist_gets_query_and_waive_forms_on_open_deviations(clients, lab):
    with session_scope(lab.settings) as s:
        dev = s.exec(select(Deviation).where(Deviation.id.in_(lab.ids["A01"]["deviation"]),
                                             Deviation.status == "open").order_by(Deviation.id)).first()
        sid, did = dev.series_id, dev.id
    text = clients["phys"].get(f"/series/{sid}").text
    for action, field in (("query", "text"), ("waive", "reason")):
        form = re.search(rf'<form method="post" action="/deviations/{did}/{action}">(.*?)</form>', text, re.DOTALL)
        assert form, action
        assert 'name="csrf_token" value="' in form.group(1) and f'name="{field}"' in form.group(1)
    assert "/deviations/" not in clients["tm"].get(f"/series/{sid}").text  # reads, changes nothing


def test_series_page_header_values_without_identity(clients, lab, store):
    sid = next(k for k, v in store["A01"]["series"].items() if v["state"] == "evaluable")
    with session_scope(lab.settings) as s:
        row = s.get(Series, sid).header_row
    text = clients["site-a"].get(f"/series/{sid}").text
    assert row["reconstruction_method"] in text and f"{row['uptake_min']:.5g}" in text
    assert site_view.header_values({"patient_name": "X^Y", "PatientID": "123", "patient_birth_date": "1950",
                                    "weight_kg": 70.0, "subject": "P-1", "uptake_min": 61.25}) == [
        ("weight_kg", "70"), ("uptake_min", "61.25")]


def test_scanners_page_is_scoped_and_flags_expiry_and_requalification(clients, lab):
    with session_scope(lab.settings) as s:
        codes = {site.code: [sc.code for sc in s.exec(select(Scanner).where(Scanner.site_id == site.id))]
                 for site in s.exec(select(Site))}
        pending = [sc.code for sc in s.exec(select(Scanner)) if sc.requalification_reason]
        acc = s.exec(select(Accreditation, Scanner).join(Scanner, Accreditation.scanner_id == Scanner.id)
                     .where(Scanner.code.in_(codes["A01"]))).first()
    text = clients["site-a"].get("/scanners").text
    assert codes["A01"] and all(f'<td rowspan="1">{c}' in text for c in codes["A01"])
    assert not any(c in text for site in ("B02", "C03") for c in codes[site])
    a, _ = acc
    assert a.valid_until is not None and f"<td>{a.valid_until.isoformat()}</td>" in text
    days = (a.valid_until - dt.date.today()).days
    assert re.search(rf">{days}( \(expiring\))?</td>", text)
    everything = clients["phys"].get("/scanners").text
    assert pending and all(c in everything for c in pending) and "Re-qualification pending" in everything


def test_scanner_overview_filters_at_the_service(lab):
    with session_scope(lab.settings) as s:
        rows = site_view.scanner_overview(s, ["A01"])
        assert rows and {r["site"] for r in rows} == {"A01"}
        soon = site_view.scanner_overview(s, None, today=dt.date(2100, 1, 1))
    assert all(not a["expiring"] or a["days_left"] <= 60 for r in soon for a in r["accreditations"])


def test_trial_manager_reads_a_site_grid(clients, store):
    page = clients["tm"].get("/sites/A01")
    assert page.status_code == 200
    assert {int(i) for i, _ in STATE_BADGE.findall(page.text)} == set(store["A01"]["series"])


def test_grid_takes_the_same_few_queries_whatever_the_number_of_series(lab, store):
    engine = open_store(lab.settings)
    counted: list[str] = []

    def count(*_args):
        counted.append("q")

    event.listen(engine, "before_cursor_execute", count)
    try:
        per_site = {}
        for code in ("A01", "C03"):  # 12 trial series against 4
            counted.clear()
            with session_scope(lab.settings) as s:
                grid = site_view.site_grid(s, code)
            per_site[code] = len(counted)
            assert sum(grid["counts"].values()) == len(store[code]["series"])
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(store["A01"]["series"]) > len(store["C03"]["series"])
    assert per_site["A01"] == per_site["C03"] <= 10


def test_series_state_rule():
    rule = site_view.series_state
    assert rule("quarantined", "done", unresolved_query=True, major_open=True)[0] == "quarantined"
    assert rule("receiving", "pending", unresolved_query=False, major_open=False)[0] == "received"
    assert rule("complete", "queued", unresolved_query=False, major_open=False)[0] == "qc_running"
    assert rule("complete", "running", unresolved_query=False, major_open=True)[0] == "qc_running"
    assert rule("complete", "pending", unresolved_query=False, major_open=False)[0] == "received"
    state, note = rule("complete", "failed", unresolved_query=False, major_open=False)
    assert state == "deviation" and "QC could not run" in note
    assert rule("complete", "done", unresolved_query=True, major_open=False)[0] == "query_open"
    assert rule("complete", "done", unresolved_query=False, major_open=True)[0] == "deviation"
    assert rule("complete", "done", unresolved_query=False, major_open=False)[0] == "evaluable"


def _patient_names(truth) -> tuple[set[str], set[str]]:
    """Every PatientName of the trial's headers that is not the trial pseudonym, and the parts of
    the names planted as a problem (a real-looking name)."""
    pseudonyms = {s["pseudonym"] for s in truth["subjects"]}
    names: set[str] = set()

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("PatientName", "PatientID", "PatientBirthDate") and v and v not in pseudonyms:
                    names.add(str(v))
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(truth)
    planted = {p["planted_value"] for p in truth["problems"] if p.get("attribute") == "PatientName"}
    names |= planted
    parts = {part for name in planted for part in name.replace("^", " ").split() if len(part) > 2}
    return names, parts


def test_no_patient_name_on_any_site_page(clients, store, lab):
    names, parts = _patient_names(lab.truth)
    assert names and parts  # the trial planted one: the check has something to find
    urls = ["/scanners"] + [f"/sites/{c}" for c in store]
    urls += [f"/series/{sid}" for site in store.values() for sid in [*site["series"], *site["phantoms"]]]
    for url in urls:
        text = clients["phys"].get(url).text
        assert not any(n in text or html.escape(n) in text for n in names), url
        assert not any(p in text.upper() for p in parts), url
