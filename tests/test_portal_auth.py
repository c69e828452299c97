"""Portal log-in security: sessions, CSRF, lock-out, idle time-out, session fixation, cookies,
headers, and the audit trail of logins. A small store (one site, a user per role) without a trial.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import AuditEvent, User, WebSession
from corelab.register import add_site
from portal.app import create_app
from portal.security import SESSION_COOKIE
from services import accounts
from tests.portal_helpers import PASSWORD, csrf_of, login


@pytest.fixture
def portal(settings):
    with session_scope(settings) as s:
        add_site(s, code="A01", ae_title="A01_PET")
        accounts.add_user(s, "site-a", role="site", sites=["A01"], password=PASSWORD, actor="test")
        accounts.add_user(s, "phys", role="physicist", password=PASSWORD, full_name="Dr P", actor="test")
    return create_app(settings)


def _client(app, **kw) -> TestClient:
    return TestClient(app, follow_redirects=False, **kw)


def _logged_in(client: TestClient) -> bool:
    """A logged-in client is sent on from / to its main page, a stranger to the login page."""
    response = client.get("/")
    return response.status_code == 303 and not response.headers["location"].startswith("/login")


def _csrf(settings) -> str:
    """The CSRF token of the one open session (as its pages carry it)."""
    with session_scope(settings) as s:
        [ws] = s.exec(select(WebSession).where(WebSession.ended_at.is_(None))).all()
        return ws.csrf_token


def _plant(client: TestClient, key: str) -> None:
    client.cookies.set(SESSION_COOKIE, key, domain="testserver.local")


def _events(settings, action: str) -> list[AuditEvent]:
    with session_scope(settings) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action)))


def test_login_sets_a_hardened_session_cookie_and_audits(portal, settings):
    client = _client(portal)
    assert not _logged_in(client)
    response = login(client, "phys")
    assert response.status_code == 303
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie  # plain HTTP here
    assert _logged_in(client)
    [event] = _events(settings, "login.success")
    assert event.actor == "phys" and event.detail["via"] == "password"
    with session_scope(settings) as s:  # the table keeps only a hash of the key
        key = client.cookies[SESSION_COOKIE]
        assert all(key not in (w.key_sha256, w.csrf_token) for w in s.exec(select(WebSession)))


def test_cookies_are_secure_behind_tls(portal):
    client = _client(portal, base_url="https://portal.example")
    response = login(client, "phys")
    assert all("Secure" in c for c in response.headers.get_list("set-cookie"))
    # The header alone is not believed (only uvicorn's trusted-proxy handling turns it into the scheme)
    spoofed = _client(portal).get("/login", headers={"X-Forwarded-Proto": "https"})
    assert not any("Secure" in c for c in spoofed.headers.get_list("set-cookie"))


def test_wrong_password_and_unknown_name_read_alike(portal, settings):
    client = _client(portal)
    bad = login(client, "phys", "not the password at all")
    unknown = login(client, "nobody", "not the password at all")
    assert bad.status_code == unknown.status_code == 401
    assert "wrong name or password" in bad.text and "wrong name or password" in unknown.text
    assert not _logged_in(client)
    reasons = sorted(e.detail["reason"] for e in _events(settings, "login.failure"))
    assert reasons == ["unknown user", "wrong password"]


def test_lockout_after_repeated_failures(portal, settings):
    client = _client(portal)
    for _ in range(settings.portal_max_failed_logins):
        assert login(client, "site-a", "guess guess guess").status_code == 401
    [lock] = _events(settings, "login.lockout")
    assert lock.actor == "site-a" and lock.detail["failed_logins"] == settings.portal_max_failed_logins
    refused = login(client, "site-a")  # the right password no longer helps
    assert refused.status_code == 401 and "locked" in refused.text and not _logged_in(client)
    with session_scope(settings) as s:
        accounts.reset_password(s, "site-a", PASSWORD + "!", actor="admin")
    assert login(client, "site-a", PASSWORD + "!").status_code == 303 and _logged_in(client)


def test_lockout_ends_by_itself(portal, settings):
    client = _client(portal)
    for _ in range(settings.portal_max_failed_logins):
        login(client, "site-a", "guess guess guess")
    with session_scope(settings) as s:
        user = s.exec(select(User).where(User.name == "site-a")).one()
        user.locked_until = user.locked_until - dt.timedelta(minutes=settings.portal_lockout_minutes + 1)
        s.add(user)
    assert login(client, "site-a").status_code == 303


def test_csrf_is_required_for_every_change(portal, settings):
    client = _client(portal)
    login(client, "phys")
    assert client.post("/logout").status_code == 403  # no token
    assert client.post("/logout", data={"csrf_token": "forged"}).status_code == 403
    assert _logged_in(client)
    assert client.post("/logout", headers={"X-CSRF-Token": "forged"}).status_code == 403
    # the login form has its own double-submit token: a cross-site login post is refused
    stranger = _client(portal)
    assert stranger.post("/login", data={"name": "phys", "password": PASSWORD, "csrf_token": "x"}).status_code == 403
    assert not _logged_in(stranger)


def test_logout_ends_the_session_server_side(portal, settings):
    client = _client(portal)
    login(client, "phys")
    key = client.cookies[SESSION_COOKIE]
    assert client.post("/logout", data={"csrf_token": _csrf(settings)}).status_code == 303
    replay = _client(portal)
    _plant(replay, key)  # a copied cookie is worth nothing after logout
    assert not _logged_in(replay)


def test_idle_timeout(portal, settings):
    client = _client(portal)
    login(client, "phys")
    assert _logged_in(client)
    with session_scope(settings) as s:
        for ws in s.exec(select(WebSession)):
            ws.last_seen_at = ws.last_seen_at - dt.timedelta(minutes=settings.portal_idle_minutes + 0.5)
            s.add(ws)
    assert not _logged_in(client)
    with session_scope(settings) as s:
        assert all(ws.ended_at is not None for ws in s.exec(select(WebSession)))


def test_idle_timeout_is_a_setting(settings):
    short = dataclasses.replace(settings, portal_idle_minutes=0.001)
    with session_scope(short) as s:
        accounts.add_user(s, "phys", role="physicist", password=PASSWORD, actor="test")
    client = _client(create_app(short))
    login(client, "phys")
    import time

    time.sleep(0.2)
    assert not _logged_in(client)


def test_no_session_fixation(portal, settings):
    client = _client(portal)
    planted = "attacker-chosen-session-key"
    _plant(client, planted)
    login(client, "phys")
    assert client.cookies[SESSION_COOKIE] != planted
    attacker = _client(portal)
    _plant(attacker, planted)
    assert not _logged_in(attacker)
    # a key of a real earlier session is not promoted either: each login issues a new one
    first = client.cookies[SESSION_COOKIE]
    login(client, "phys")
    assert client.cookies[SESSION_COOKIE] != first
    old = _client(portal)
    _plant(old, first)
    assert not _logged_in(old)


def test_disabled_user_is_out_at_once(portal, settings):
    client = _client(portal)
    login(client, "site-a")
    assert _logged_in(client)
    with session_scope(settings) as s:
        accounts.disable_user(s, "site-a", actor="admin")
    assert not _logged_in(client)
    assert login(client, "site-a").status_code == 401


def test_security_headers_and_no_open_redirect(portal):
    client = _client(portal)
    response = client.get("/login")
    assert "script-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY" and response.headers["cache-control"] == "no-store"
    form = client.get("/login")
    done = client.post("/login", data={"name": "phys", "password": PASSWORD, "csrf_token": csrf_of(form.text),
                                       "next": "//evil.example/steal"})
    assert done.status_code == 303 and done.headers["location"] == "/"


def test_pages_ask_strangers_to_log_in(portal):
    client = _client(portal)
    response = client.get("/reports?page=2")
    assert response.status_code == 303 and response.headers["location"] == "/login?next=%2Freports%3Fpage%3D2"
    api = client.get("/api/v1/me")
    assert api.status_code == 401


def test_passwords_are_argon2id_and_rules_hold(settings):
    from corelab.accounts import AccountError

    with session_scope(settings) as s:
        add_site(s, code="A01", ae_title="A01_PET")
        accounts.add_user(s, "phys", role="physicist", password=PASSWORD, actor="test")
        user = s.exec(select(User).where(User.name == "phys")).one()
        assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
        for bad in ({"password": "short"}, {"password": "my-name-is-phys2"}):
            with pytest.raises(AccountError):
                accounts.add_user(s, "phys2", role="physicist", actor="test", **bad)
        with pytest.raises(AccountError, match="site"):
            accounts.add_user(s, "siteless", role="site", password=PASSWORD, actor="test")
        with pytest.raises(AccountError, match="no site"):
            accounts.add_user(s, "sx", role="site", sites=["ZZ9"], password=PASSWORD, actor="test")
        with pytest.raises(AccountError, match="scopes site users only"):
            accounts.add_user(s, "px", role="physicist", sites=["A01"], password=PASSWORD, actor="test")
        audit_text = " ".join(str(e.detail) for e in s.exec(select(AuditEvent)))
        assert PASSWORD not in audit_text and "argon2" not in audit_text


def test_hostile_numbers_and_invalid_forms_get_clear_answers(portal, settings):
    client = _client(portal)
    for url in ("/series/" + "9" * 25, "/reports/" + "1" * 30 + "/file/pdf", "/deviations?page=" + "9" * 19):
        assert client.get(url).status_code == 404, url
    login(client, "phys")
    secret = "my-typed-secret-7788"
    response = client.post("/account/tokens", data={"csrf_token": _csrf(settings), "days": "many",
                                                     "password": secret})
    assert response.status_code == 422 and "days" in response.text and secret not in response.text
    assert "text/html" in response.headers["content-type"]


def test_logout_and_idle_expiry_are_audited(portal, settings):
    client = _client(portal)
    login(client, "phys")
    client.post("/logout", data={"csrf_token": _csrf(settings)})
    login(client, "phys")
    with session_scope(settings) as s:
        for ws in s.exec(select(WebSession).where(WebSession.ended_at.is_(None))):
            ws.last_seen_at = ws.last_seen_at - dt.timedelta(minutes=settings.portal_idle_minutes + 1)
            s.add(ws)
    assert not _logged_in(client)
    assert [e.actor for e in _events(settings, "logout")] == ["phys"]
    assert [e.actor for e in _events(settings, "session.expire")] == ["phys"]
