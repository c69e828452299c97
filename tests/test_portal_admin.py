"""The admin pages: users (add, reset, disable, change) and sites (add, AE title), admins only."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import AuditEvent, Series, Site, User
from portal.app import create_app
from services import accounts
from tests.portal_helpers import build_portal_lab, csrf_of, login, post_form

NEW_PASSWORD = "a fresh and long passphrase 7"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("admin"))


@pytest.fixture(scope="module")
def app(lab):
    return create_app(lab.settings)


def session_for(app, name: str, password: str | None = None) -> TestClient:
    """A client logged in through the form, redirects not followed (the landing page is not ours)."""
    client = TestClient(app, follow_redirects=False)
    response = login(client, name, *([password] if password else []))
    assert response.status_code == 303 and not response.headers["location"].startswith("/login"), response.text
    return client


@pytest.fixture(scope="module")
def admin(app):
    return session_for(app, "admin")


def add_store_user(lab, name: str, **spec) -> None:
    with session_scope(lab.settings) as s:
        accounts.add_user(s, name, password=NEW_PASSWORD, actor="test", **spec)


def audit_events(lab, action: str, entity_id) -> list[AuditEvent]:
    with session_scope(lab.settings) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action,
                                                    AuditEvent.entity_id == str(entity_id))))


def test_admin_adds_a_site_user_who_sees_only_their_site(lab, app, admin):
    response = post_form(admin, "/admin/users", "/admin/users", {
        "name": "site-c", "full_name": "Site C Coordinator", "role": "site", "sites": ["C03"],
        "password": NEW_PASSWORD, "oidc_subject": ""})
    assert response.status_code == 303 and response.headers["location"] == "/admin/users"
    listing = admin.get("/admin/users")
    assert "user site-c added" in listing.text and 'id="user-site-c"' in listing.text

    with session_scope(lab.settings) as s:
        user = s.exec(select(User).where(User.name == "site-c")).one()
        assert user.password_hash.startswith("$argon2id$") and NEW_PASSWORD not in user.password_hash
        assert (user.role, user.sites, user.full_name) == ("site", ["C03"], "Site C Coordinator")
        c03 = {x.series_uid for x, site in s.exec(select(Series, Site).join(Site, Series.site_id == Site.id))
               if site.code == "C03"}
    events = audit_events(lab, "user.add", user.id)
    assert len(events) == 1 and events[0].actor == "admin" and events[0].detail["sites"] == ["C03"]
    assert NEW_PASSWORD not in str(events[0].detail)

    newcomer = session_for(app, "site-c", NEW_PASSWORD)
    assert newcomer.get("/").headers["location"] == "/sites/C03"
    account = newcomer.get("/account").text
    assert "site-c" in account and "Site C Coordinator" in account and "C03" in account and "A01" not in account
    series = newcomer.get("/api/v1/series", params={"limit": 1000}).json()
    assert c03 and {row["series_uid"] for row in series["items"]} == c03
    assert newcomer.get("/admin/users").status_code == 403


def test_adding_a_user_with_a_weak_password_is_refused_on_the_page(lab, admin):
    response = post_form(admin, "/admin/users", "/admin/users", {
        "name": "weakling", "role": "physicist", "password": "short"})
    assert response.status_code == 400 and "at least 12 characters" in response.text
    assert "Add a user" in response.text  # the page again, not an error page
    response = post_form(admin, "/admin/users", "/admin/users", {
        "name": "nosite", "role": "site", "sites": ["ZZ9"], "password": NEW_PASSWORD})
    assert response.status_code == 400 and "register it first" in response.text
    with session_scope(lab.settings) as s:
        assert s.exec(select(User).where(User.name.in_(["weakling", "nosite"]))).first() is None


def test_admin_reset_unlocks_a_locked_user(lab, app, admin):
    add_store_user(lab, "locky", role="physicist", full_name="Locky")
    client = TestClient(app, follow_redirects=False)
    for _ in range(lab.settings.portal_max_failed_logins):
        assert login(client, "locky", "not the password at all").status_code == 401
    refused = login(client, "locky", NEW_PASSWORD)
    assert refused.status_code == 401 and "locked" in refused.text
    assert "locked" in admin.get("/admin/users").text.split('id="user-locky"')[1].split("</tr>")[0]

    other = "another long passphrase 99"
    response = post_form(admin, "/admin/users", "/admin/users/locky/reset", {"password": other})
    assert response.status_code == 303
    with session_scope(lab.settings) as s:
        user = s.exec(select(User).where(User.name == "locky")).one()
        assert user.failed_logins == 0 and user.locked_until is None
    assert [e.actor for e in audit_events(lab, "user.reset", user.id)] == ["admin"]
    assert login(client, "locky", other).status_code == 303
    assert client.get("/account").status_code == 200


def test_disabling_a_user_ends_their_session_at_once(lab, app, admin):
    add_store_user(lab, "leaver", role="site", sites=["A01"], full_name="Leaver")
    leaver = session_for(app, "leaver", NEW_PASSWORD)
    assert leaver.get("/account").status_code == 200

    response = post_form(admin, "/admin/users", "/admin/users/leaver/disable", {})
    assert response.status_code == 303
    after = leaver.get("/account")
    assert after.status_code == 303 and after.headers["location"].startswith("/login")
    assert leaver.get("/api/v1/me").status_code == 401
    assert login(TestClient(app, follow_redirects=False), "leaver", NEW_PASSWORD).status_code == 401
    with session_scope(lab.settings) as s:
        user = s.exec(select(User).where(User.name == "leaver")).one()
        assert user.disabled
    assert [e.actor for e in audit_events(lab, "user.disable", user.id)] == ["admin"]

    # The admin cannot disable themselves.
    response = post_form(admin, "/admin/users", "/admin/users/admin/disable", {})
    assert response.status_code == 400 and "your own account" in response.text
    with session_scope(lab.settings) as s:
        assert not s.exec(select(User).where(User.name == "admin")).one().disabled

    # Enabled again through the change form.
    response = post_form(admin, "/admin/users", "/admin/users/leaver/change", {
        "role": "site", "sites": ["A01"], "full_name": "Leaver Again", "enable": "1"})
    assert response.status_code == 303
    with session_scope(lab.settings) as s:
        user = s.exec(select(User).where(User.name == "leaver")).one()
        assert not user.disabled and user.full_name == "Leaver Again"


def test_admin_changes_a_role(lab, admin):
    add_store_user(lab, "mover", role="site", sites=["B02"])
    response = post_form(admin, "/admin/users", "/admin/users/mover/change", {
        "role": "trial-manager", "trials": [lab.trial], "full_name": ""})
    assert response.status_code == 303
    with session_scope(lab.settings) as s:
        user = s.exec(select(User).where(User.name == "mover")).one()
        assert (user.role, user.sites, user.trials) == ("trial-manager", [], [lab.trial])
    response = post_form(admin, "/admin/users", "/admin/users/mover/change", {"role": "site"})
    assert response.status_code == 400 and "at least one" in response.text


ADMIN_POSTS = {
    "/admin/users": {"name": "intruder", "role": "admin", "password": NEW_PASSWORD},
    "/admin/users/site-b/disable": {},
    "/admin/users/site-b/reset": {"password": NEW_PASSWORD},
    "/admin/users/site-b/change": {"role": "admin"},
    "/admin/sites": {"code": "EVIL", "ae_title": "EVIL"},
    "/admin/sites/A01/change": {"ae_title": "EVIL"},
}


@pytest.mark.parametrize("name", ["site-a", "phys", "tm"])
def test_non_admins_get_403_on_every_admin_route(lab, app, name):
    client = session_for(app, name)
    for url in ("/admin/users", "/admin/sites"):
        assert client.get(url).status_code == 403
    token = csrf_of(client.get("/account").text)
    for url, data in ADMIN_POSTS.items():
        assert client.post(url, data={**data, "csrf_token": token}).status_code == 403, url
    with session_scope(lab.settings) as s:
        assert s.exec(select(User).where(User.name == "intruder")).first() is None
        assert s.exec(select(Site).where(Site.code == "EVIL")).first() is None
        assert s.exec(select(Site).where(Site.code == "A01")).one().ae_title != "EVIL"
        site_b = s.exec(select(User).where(User.name == "site-b")).one()
        assert (site_b.role, site_b.disabled) == ("site", False)
    anonymous = TestClient(app, follow_redirects=False)
    assert anonymous.get("/admin/users").headers["location"].startswith("/login")


def test_admin_adds_a_site_and_changes_its_ae_title(lab, admin):
    response = post_form(admin, "/admin/sites", "/admin/sites", {
        "code": "D04", "name": "Delta hospital", "ae_title": "SITE D04", "host": "pacs.d04.example"})
    assert response.status_code == 303
    assert "SITE D04" in admin.get("/admin/sites").text
    with session_scope(lab.settings) as s:
        site = s.exec(select(Site).where(Site.code == "D04")).one()
        assert (site.ae_title, site.host, site.name) == ("SITE D04", "pacs.d04.example", "Delta hospital")
    events = audit_events(lab, "site.register", "D04")
    assert [(e.actor, e.detail["ae_title"]) for e in events] == [("admin", "SITE D04")]

    response = post_form(admin, "/admin/sites", "/admin/sites/D04/change", {"ae_title": "D04_NEW", "host": ""})
    assert response.status_code == 303
    with session_scope(lab.settings) as s:
        site = s.exec(select(Site).where(Site.code == "D04")).one()
        assert (site.ae_title, site.host, site.name) == ("D04_NEW", None, "Delta hospital")
    assert [e.detail["ae_title"] for e in audit_events(lab, "site.register", "D04")] == ["SITE D04", "D04_NEW"]

    for data, message in (({"code": "D04", "ae_title": "OTHER"}, "registered already"),
                          ({"code": "E05", "ae_title": "BAD\\AE"}, "not a valid DICOM AE title"),
                          ({"code": "../x", "ae_title": "OK"}, "is refused"),
                          ({"code": "E05", "ae_title": "OK", "host": "<script>"}, "not a host name")):
        response = post_form(admin, "/admin/sites", "/admin/sites", data)
        assert response.status_code == 400 and message in response.text, data
        assert "<script>" not in response.text
    assert post_form(admin, "/admin/sites", "/admin/sites/NOPE/change", {"ae_title": "X"}).status_code == 404
    with session_scope(lab.settings) as s:
        assert s.exec(select(Site).where(Site.code == "E05")).first() is None
        assert s.exec(select(Site).where(Site.code == "D04")).one().ae_title == "D04_NEW"
