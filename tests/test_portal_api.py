"""The account page's API tokens and the JSON API: scoped listings, answers, dead tokens."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import ApiToken, AuditEvent, Deviation, Query, Report, Series, Site, User, utcnow
from corelab.queries import deviation_rows
from portal.app import create_app
from services import accounts
from tests.portal_helpers import PASSWORD, build_portal_lab, csrf_of, login, post_form

TOKEN = re.compile(r"clt_[A-Za-z0-9_-]{20,}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def app(lab):
    return create_app(lab.settings)


def session_for(app, name: str, password: str = PASSWORD) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    response = login(client, name, password)
    assert response.status_code == 303 and not response.headers["location"].startswith("/login"), response.text
    return client


def new_token(client: TestClient, label: str = "lims") -> str:
    response = post_form(client, "/account", "/account/tokens", {"label": label, "days": "30", "password": PASSWORD})
    assert response.status_code == 201 and "shown only this once" in response.text
    found = TOKEN.findall(response.text)
    assert len(found) == 1
    return found[0]


def bearer(app, token: str) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)


def token_row(lab, token: str) -> ApiToken:
    with session_scope(lab.settings) as s:
        return s.exec(select(ApiToken).where(ApiToken.prefix == token[:10])).one()


@pytest.fixture(scope="module")
def site_a(app):
    return session_for(app, "site-a")


@pytest.fixture(scope="module")
def token_a(site_a):
    return new_token(site_a)


def test_token_is_shown_once_and_never_stored(lab, site_a, token_a):
    account = site_a.get("/account")
    assert account.status_code == 200 and token_a not in account.text
    assert token_a[:10] in account.text and "lims" in account.text  # listed by its prefix only
    assert token_a not in str(site_a.cookies) and "Set-Cookie" not in account.headers
    with session_scope(lab.settings) as s:
        row = s.exec(select(ApiToken).where(ApiToken.prefix == token_a[:10])).one()
        assert s.get(User, row.user_id).name == "site-a" and row.token_sha256 != token_a
        tables = inspect(s.get_bind()).get_table_names()
        assert "apitoken" in tables and "auditevent" in tables
        for table in tables:  # every text column of every table, apitoken and auditevent included
            for values in s.connection().execute(text(f'SELECT * FROM "{table}"')):
                assert not any(token_a in str(v) or token_a[10:30] in str(v) for v in values), table
    database = lab.settings.database_path
    for path in (database, database.with_name(database.name + "-wal")):
        if path.exists():
            assert token_a.encode() not in path.read_bytes()


def test_series_with_a_token_are_only_the_own_sites(lab, app, token_a):
    client = bearer(app, token_a)
    me = client.get("/api/v1/me").json()
    assert (me["name"], me["role"], me["sites"], me["via"]) == ("site-a", "site", ["A01"], "token")
    with session_scope(lab.settings) as s:
        own = {x.series_uid for x, site in s.exec(select(Series, Site).join(Site, Series.site_id == Site.id))
               if site.code == "A01"}
        everything = {x.series_uid for x in s.exec(select(Series))}
    page = client.get("/api/v1/series", params={"limit": 1000}).json()
    assert own and own != everything
    assert {row["series_uid"] for row in page["items"]} == own and page["total"] == len(own)
    assert {row["site"] for row in page["items"]} == {"A01"}
    assert set(page["items"][0]) == {"id", "series_uid", "site", "kind", "modality", "state", "qc_state",
                                     "received_at", "completed_at"}
    first, second = (client.get("/api/v1/series", params={"limit": 2, "offset": o}).json() for o in (0, 2))
    assert [r["id"] for r in first["items"] + second["items"]] == [r["id"] for r in page["items"][:4]]
    assert client.get("/api/v1/series", params={"since": "2999-01-01T00:00:00Z"}).json()["items"] == []
    assert client.get("/api/v1/series", params={"since": "2000-01-01"}).json()["total"] == len(own)
    assert client.get("/api/v1/series", params={"since": "yesterday"}).status_code == 422
    assert client.get("/api/v1/series", params={"limit": 1001}).status_code == 422
    assert TestClient(app).get("/api/v1/series").status_code == 401


def test_deviations_queries_and_reports_are_scoped(lab, app, token_a):
    client = bearer(app, token_a)
    with session_scope(lab.settings) as s:
        a01 = {r["id"]: r for r in deviation_rows(s, site_code="A01")}
        trial = {r["id"] for r in deviation_rows(s, trial_code=lab.trial)}
        every = {d.id for d in s.exec(select(Deviation))}
        a01_reports = {r.id for r, site in s.exec(select(Report, Site).join(Site, Report.site_id == Site.id))
                       if site.code == "A01"}
    devs = client.get("/api/v1/deviations", params={"limit": 1000}).json()["items"]
    assert a01 and {d["id"]: d for d in devs} == a01  # the fields of corelab.queries.deviation_rows
    assert client.get("/api/v1/deviations", params={"site": "B02"}).json()["items"] == []
    queries = client.get("/api/v1/queries").json()["items"]
    assert [q["id"] for q in queries] == lab.ids["A01"]["query"] and queries[0]["thread"][0]["kind"] == "question"
    reports = client.get("/api/v1/reports").json()["items"]
    assert a01_reports and {r["id"] for r in reports} == a01_reports == set(lab.ids["A01"]["report"])

    tm = session_for(app, "tm")
    tm_devs = tm.get("/api/v1/deviations", params={"limit": 1000}).json()
    assert {d["id"] for d in tm_devs["items"]} == trial and tm_devs["total"] == len(trial)
    phys = session_for(app, "phys")
    assert phys.get("/api/v1/deviations", params={"limit": 1000}).json()["total"] == len(every)


def test_a_site_answers_its_own_query_and_not_another_sites(lab, app, token_a):
    client = bearer(app, token_a)
    own, other = lab.ids["A01"]["query"][0], lab.ids["B02"]["query"][0]
    missing = client.post(f"/api/v1/queries/{99999}/answer", json={"text": "x"})
    hidden = client.post(f"/api/v1/queries/{other}/answer", json={"text": "ours now"})
    assert hidden.status_code == 404 and hidden.json() == missing.json()
    assert client.post(f"/api/v1/queries/{own}/answer", json={"text": "   "}).status_code == 422
    assert client.post(f"/api/v1/queries/{own}/answer", json={"text": "x" * 4001}).status_code == 422
    assert client.post(f"/api/v1/queries/{own}/answer", json={"text": "ok", "site": "B02"}).status_code == 422
    answered = client.post(f"/api/v1/queries/{own}/answer", json={"text": "The activity was re-measured."})
    assert answered.status_code == 200 and answered.json()["status"] == "answered"
    with session_scope(lab.settings) as s:
        assert s.get(Query, own).thread[-1]["text"] == "The activity was re-measured."
        assert s.get(Query, other).status == "open" and len(s.get(Query, other).thread) == 1
        event = s.exec(select(AuditEvent).where(AuditEvent.action == "query.answer",
                                                AuditEvent.entity_id == str(own))).one()
        assert event.actor == "site-a" and event.detail["text"] == "The activity was re-measured."

    phys = session_for(app, "phys")  # only a site answers
    token = csrf_of(phys.get("/account").text)
    assert phys.post(f"/api/v1/queries/{own}/answer", json={"text": "x"},
                     headers={"X-CSRF-Token": token}).status_code == 403


def test_a_session_post_needs_the_csrf_header(lab, app):
    client = session_for(app, "site-b")
    own = lab.ids["B02"]["query"][0]
    assert client.post(f"/api/v1/queries/{own}/answer", json={"text": "no header"}).status_code == 403
    token = csrf_of(client.get("/account").text)
    response = client.post(f"/api/v1/queries/{own}/answer", json={"text": "with the header"},
                           headers={"X-CSRF-Token": token})
    assert response.status_code == 200
    with session_scope(lab.settings) as s:
        assert [m["text"] for m in s.get(Query, own).thread[1:]] == ["with the header"]


def test_revoked_expired_and_disabled_tokens_answer_401(lab, app, site_a):
    revoked = new_token(site_a, "to revoke")
    assert bearer(app, revoked).get("/api/v1/me").status_code == 200
    row_id = token_row(lab, revoked).id
    assert post_form(site_a, "/account", f"/account/tokens/{row_id}/revoke", {}).status_code == 303
    assert bearer(app, revoked).get("/api/v1/series").status_code == 401

    expired = new_token(site_a, "to expire")
    with session_scope(lab.settings) as s:
        row = s.exec(select(ApiToken).where(ApiToken.prefix == expired[:10])).one()
        row.expires_at = utcnow() - timedelta(minutes=1)
        s.add(row)
    assert bearer(app, expired).get("/api/v1/series").status_code == 401

    with session_scope(lab.settings) as s:
        accounts.add_user(s, "api-user", role="site", sites=["B02"], password=PASSWORD, actor="test")
    user_token = new_token(session_for(app, "api-user"))
    assert bearer(app, user_token).get("/api/v1/series").status_code == 200
    with session_scope(lab.settings) as s:
        accounts.disable_user(s, "api-user", actor="test")
    response = bearer(app, user_token).get("/api/v1/series")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_only_ones_own_tokens_and_only_from_a_session(lab, app, site_a, token_a):
    row_id = token_row(lab, token_a).id
    site_b = session_for(app, "site-b")
    response = post_form(site_b, "/account", f"/account/tokens/{row_id}/revoke", {})
    assert response.status_code == 404
    assert token_row(lab, token_a).revoked_at is None
    assert bearer(app, token_a).get("/api/v1/me").status_code == 200
    # A token cannot mint tokens (they would outlive its revocation).
    assert bearer(app, token_a).post("/account/tokens", data={"label": "x", "days": "1"}).status_code == 403
    with session_scope(lab.settings) as s:
        owner = s.exec(select(User).where(User.name == "site-a")).one()
        assert len(s.exec(select(ApiToken).where(ApiToken.user_id == owner.id, ApiToken.label == "x")).all()) == 0


def test_a_token_needs_the_password_again_and_dies_with_a_reset(app, lab):
    """A session left open (or stolen) cannot be turned into a long-lived token, and a password
    reset revokes the tokens made before it."""
    client = session_for(app, "site-a")
    refused = post_form(client, "/account", "/account/tokens", {"label": "x", "days": "30", "password": "guess guess"})
    assert refused.status_code == 401 and not TOKEN.findall(refused.text)
    token = new_token(client, "before-reset")
    assert bearer(app, token).get("/api/v1/series").status_code == 200
    with session_scope(lab.settings) as s:
        accounts.reset_password(s, "site-a", PASSWORD, actor="admin")
    assert bearer(app, token).get("/api/v1/series").status_code == 401
