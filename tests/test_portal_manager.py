"""Portal, trial manager: deviations with filters, pagination and rates; a trial's page and its
exports (audited downloads); what a site user and another trial get."""

from __future__ import annotations

import csv
import hashlib
import io
import re

import pyarrow.parquet as pq
import pytest
from sqlmodel import col, func, select

from corelab.db import session_scope
from corelab.models import AuditEvent, Deviation, Report, Series, Site
from corelab.qcstats import ACTIVE_STATUSES
from corelab.queries import deviation_rows
from expectations.qc import trial_pet_series
from portal.app import create_app
from tests.portal_helpers import build_portal_lab, client_for

ROW = re.compile(r'<tr class="deviation-row">\s*<td>(\d+)</td><td>[^<]*</td><td>([^<]*)</td>')
RATE = re.compile(r"<tr><td>([A-Z0-9]+)</td><td>(\d+)</td><td>(\d+)</td><td>[^<]*</td>\s*<td>(\d+)</td>")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("portal_manager"))


@pytest.fixture(scope="module")
def app(lab):
    return create_app(lab.settings)


@pytest.fixture(scope="module")
def tm(app):
    return client_for(app, "tm")


def _rows(html: str) -> list[tuple[int, str]]:
    return [(int(i), site) for i, site in ROW.findall(html)]


def _last(lab, action: str) -> AuditEvent:
    with session_scope(lab.settings) as s:
        return s.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(col(AuditEvent.id).desc())).first()


def test_trial_manager_sees_the_trials_deviations(lab, tm):
    with session_scope(lab.settings) as s:
        expected = {d["id"] for d in deviation_rows(s, trial_code=lab.trial)}
    assert expected, "the lab has deviations to show"
    html = tm.get("/deviations", params={"per_page": 500}).text
    assert {i for i, _ in _rows(html)} == expected
    assert f"{len(expected)} in all" in html
    with session_scope(lab.settings) as s:
        series_of = {d.id: d.series_id for d in s.exec(select(Deviation).where(col(Deviation.id).in_(expected)))}
    for dev_id, series_id in series_of.items():
        assert re.search(rf'<td>{dev_id}</td>.*?<a href="/series/{series_id}">', html, re.DOTALL)


def test_filter_by_site_narrows_to_that_site(lab, tm):
    with session_scope(lab.settings) as s:
        expected = {d["id"] for d in deviation_rows(s, trial_code=lab.trial, site_code="A01")}
        other = {d["id"] for d in deviation_rows(s, trial_code=lab.trial, site_code="B02")}
    html = tm.get("/deviations", params={"site": "A01", "per_page": 500}).text
    rows = _rows(html)
    assert {i for i, _ in rows} == expected and expected and other
    assert {site for _, site in rows} == {"A01"}
    assert '<option value="A01" selected>' in html


def test_filters_combine_and_the_choices_are_the_values_present(lab, tm):
    with session_scope(lab.settings) as s:
        devs = deviation_rows(s, trial_code=lab.trial)
    rule = min(d["rule_id"] for d in devs)
    expected = {d["id"] for d in devs if d["rule_id"] == rule and d["severity"] == "major"}
    html = tm.get("/deviations", params={"rule": rule, "severity": "major", "per_page": 500}).text
    assert {i for i, _ in _rows(html)} == expected
    for value in {d["rule_id"] for d in devs}:
        assert f'<option value="{value}"' in html
    assert tm.get("/deviations", params={"site": "NO-SUCH"}).text.count('class="deviation-row"') == 0


def test_pagination_is_complete_and_disjoint(lab, tm):
    with session_scope(lab.settings) as s:
        expected = {d["id"] for d in deviation_rows(s, trial_code=lab.trial)}
    per_page = 3
    pages = -(-len(expected) // per_page)
    seen: list[int] = []
    for n in range(1, pages + 1):
        html = tm.get("/deviations", params={"page": n, "per_page": per_page}).text
        rows = _rows(html)
        assert len(rows) == (per_page if n < pages else len(expected) - per_page * (pages - 1))
        assert f"page {n} of {pages}" in html
        assert ('rel="next"' in html) == (n < pages) and ('rel="prev"' in html) == (n > 1)
        seen += [i for i, _ in rows]
    assert len(seen) == len(set(seen)) and set(seen) == expected
    assert tm.get("/deviations", params={"page": "x"}).status_code == 422


def _expected_rates(lab) -> dict[str, tuple[int, int, int]]:
    with session_scope(lab.settings) as s:
        sites = {x.id: x.code for x in s.exec(select(Site))}
        qcd: dict[str, set] = {}
        for series in trial_pet_series(s, lab.trial):
            if series.qc_state == "done":
                qcd.setdefault(sites[series.site_id], set()).add(series.series_uid)
        devs = [d for d in deviation_rows(s, trial_code=lab.trial) if d["status"] in ACTIVE_STATUSES]
    return {site: (len(uids), len({d["series_uid"] for d in devs if d["site"] == site and d["severity"] == "major"}),
                   len({d["series_uid"] for d in devs if d["site"] == site}))
            for site, uids in qcd.items()}


def test_rates_match_the_store(lab, tm):
    expected = _expected_rates(lab)
    assert any(major for _, major, _ in expected.values())
    for url in ("/deviations", f"/trials/{lab.trial}"):
        found = {site: (int(n), int(major), int(anyd)) for site, n, major, anyd in RATE.findall(tm.get(url).text)}
        assert found == expected, url


def test_trial_page_links_the_newest_report_and_the_exports(lab, tm):
    with session_scope(lab.settings) as s:
        newest = s.exec(select(Report).where(Report.kind == "trial_deviations")
                        .order_by(col(Report.version).desc())).first()
    html = tm.get(f"/trials/{lab.trial}").text
    assert f'href="/reports/{newest.id}"' in html and "awaiting signature" in html
    for fmt in ("csv", "parquet"):
        for table in ("header_table", "deviations"):
            assert f'href="/trials/{lab.trial}/exports/{fmt}/{table}"' in html


def test_trial_manager_downloads_the_exports(lab, tm):
    with session_scope(lab.settings) as s:
        n_devs = len(deviation_rows(s, trial_code=lab.trial))
        n_header = sum(1 for x in trial_pet_series(s, lab.trial) if x.header_row)
    response = tm.get(f"/trials/{lab.trial}/exports/csv/deviations")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"] == f'attachment; filename="{lab.trial}_deviations.csv"'
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == n_devs and {r["trial"] for r in rows} == {lab.trial}
    event = _last(lab, "export.download")
    assert (event.actor, event.entity, event.entity_id) == ("tm", "trial", lab.trial)
    assert event.detail == {**event.detail, "fmt": "csv", "table": "deviations", "rows": n_devs,
                            "sha256": hashlib.sha256(response.content).hexdigest()}

    for table, n in (("deviations", n_devs), ("header_table", n_header)):
        response = tm.get(f"/trials/{lab.trial}/exports/parquet/{table}")
        assert response.status_code == 200
        parsed = pq.read_table(io.BytesIO(response.content))
        assert parsed.num_rows == n and parsed.schema.metadata[b"trial"].decode() == lab.trial
        event = _last(lab, "export.download")
        assert event.detail["sha256"] == hashlib.sha256(response.content).hexdigest()
        assert (event.detail["fmt"], event.detail["table"], event.detail["rows"]) == ("parquet", table, n)


def test_export_reflects_the_store_now(lab, tm):
    """A download is written when asked: a deviation waived since shows as waived."""
    with session_scope(lab.settings) as s:
        dev = s.exec(select(Deviation).join(Series, Deviation.series_id == Series.id)
                     .where(Deviation.status == "open").order_by(col(Deviation.id).desc())).first()
        dev.status = "waived"
        s.add(dev)
    rows = list(csv.DictReader(io.StringIO(tm.get(f"/trials/{lab.trial}/exports/csv/deviations").text)))
    assert {r["status"] for r in rows if int(r["id"]) == dev.id} == {"waived"}


def test_unknown_export_or_trial_is_404(lab, tm):
    for url in (f"/trials/{lab.trial}/exports/xls/deviations", f"/trials/{lab.trial}/exports/csv/users",
                f"/trials/{lab.trial}/exports/csv/..%2F..%2Fcorelab.db", "/trials/NO-SUCH",
                "/trials/NO-SUCH/exports/csv/deviations"):
        assert tm.get(url).status_code == 404, url
    with session_scope(lab.settings) as s:
        n_events = s.exec(select(func.count()).select_from(AuditEvent)
                          .where(AuditEvent.action == "export.download", AuditEvent.entity_id == "NO-SUCH")).one()
    assert n_events == 0


def test_site_user_and_admin_are_refused(lab, app):
    for name in ("site-a", "admin"):
        client = client_for(app, name)
        for url in ("/deviations", f"/trials/{lab.trial}", f"/trials/{lab.trial}/exports/csv/deviations"):
            assert client.get(url).status_code == 403, (name, url)


def test_physicist_sees_every_trial(lab, app):
    client = client_for(app, "phys")
    assert client.get(f"/trials/{lab.trial}").status_code == 200
    with session_scope(lab.settings) as s:
        n_all = s.exec(select(func.count()).select_from(Deviation)).one()
    assert f"{n_all} in all" in client.get("/deviations").text


def test_subjects_are_listed_once_a_site_is_chosen(lab, tm):
    with session_scope(lab.settings) as s:
        devs = deviation_rows(s, trial_code=lab.trial, site_code="A01")
    subjects = sorted({d["subject"] for d in devs})
    html = tm.get("/deviations", params={"site": "A01"}).text
    listed = re.search(r'<select name="subject">(.*?)</select>', html, re.DOTALL).group(1)
    assert re.findall(r'<option value="([^"]+)"', listed) == subjects
    assert '<select name="subject">' not in tm.get("/deviations").text  # a text field until a site is chosen
    html = tm.get("/deviations", params={"site": "A01", "subject": subjects[0], "per_page": 500}).text
    assert {i for i, _ in _rows(html)} == {d["id"] for d in devs if d["subject"] == subjects[0]}
