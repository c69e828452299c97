"""OpenID Connect login against a real provider over HTTP (tests/oidc_provider.py).

The portal runs in a TestClient; the browser's trip to the provider is followed by hand with
httpx, and the provider's answer (code and state) is brought back to the portal's callback.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import stat
import urllib.parse

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, select

from corelab import accounts as core_accounts
from corelab.db import session_scope
from corelab.models import AuditEvent, User, WebSession
from portal import oidc
from portal.app import create_app
from portal.security import SESSION_COOKIE
from services import accounts
from tests.oidc_provider import OidcProvider
from tests.portal_helpers import build_portal_lab, login

BOUND, DISABLED, UNBOUND = "sub-123", "sub-456", "sub-999"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = build_portal_lab(tmp_path_factory.mktemp("oidc"))
    with session_scope(lab.settings) as s:
        accounts.add_user(s, "site-a-sso", role="site", sites=["A01"], full_name="Site A by SSO",
                          oidc_subject=BOUND, password=None, actor="test")
        accounts.add_user(s, "gone-sso", role="site", sites=["A01"], oidc_subject=DISABLED, password=None,
                          actor="test")
        core_accounts.disable_user(s, "gone-sso", actor="test")
    return lab


@pytest.fixture(scope="module")
def provider():
    with OidcProvider() as p:
        yield p


@pytest.fixture(scope="module")
def app(lab, provider):
    settings = dataclasses.replace(lab.settings, oidc_issuer=provider.issuer, oidc_client_id=provider.client_id,
                                   oidc_client_secret=provider.client_secret)
    return create_app(settings)


@pytest.fixture(autouse=True)
def honest_provider(provider):
    provider.misbehave, provider.subject = "", BOUND
    oidc.forget_provider()
    yield
    provider.misbehave, provider.subject = "", BOUND
    oidc.forget_provider()


def start(client: TestClient, **params) -> tuple[str, dict]:
    """The portal's redirect to the provider: (authorize URL, its query)."""
    r = client.get("/login/oidc", params=params, follow_redirects=False)
    assert r.status_code == 303, r.text
    url = r.headers["location"]
    return url, dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def at_provider(url: str) -> dict:
    """The browser at the provider, which approves at once: the callback's query (code, state)."""
    r = httpx.get(url, follow_redirects=False)
    assert r.status_code == 302, r.text
    back = urllib.parse.urlsplit(r.headers["location"])
    assert back.path == "/login/oidc/callback"
    return dict(urllib.parse.parse_qsl(back.query))


def flow(client: TestClient, **override):
    """The whole round trip; ``override`` changes what comes back to the callback."""
    url, _ = start(client)
    params = {**at_provider(url), **override}
    return client.get("/login/oidc/callback", params=params, follow_redirects=False)


def last_login_event(lab) -> AuditEvent:
    with session_scope(lab.settings) as s:
        event = s.exec(select(AuditEvent).where(col(AuditEvent.action).startswith("login."))
                       .order_by(col(AuditEvent.id).desc())).first()
        s.expunge(event)
        return event


def session_cookie_set(response) -> bool:
    return any(c.startswith(f"{SESSION_COOKIE}=") and not c.startswith(f'{SESSION_COOKIE}="";')
               for c in response.headers.get_list("set-cookie"))


def test_oidc_off_has_no_route_and_no_button(lab):
    client = TestClient(create_app(lab.settings))
    assert lab.settings.oidc_issuer == ""
    assert client.get("/login/oidc", follow_redirects=False).status_code == 404
    assert client.get("/login/oidc/callback?code=x&state=y", follow_redirects=False).status_code == 404
    assert "Log in with your institution" not in client.get("/login").text


def test_authorize_request_is_code_flow_with_pkce(app, provider):
    client = TestClient(app)
    assert 'href="/login/oidc"' in client.get("/login").text
    url, q = start(client)
    assert url.startswith(f"{provider.issuer}/authorize?")
    assert q["response_type"] == "code" and q["scope"] == "openid profile email"
    assert q["client_id"] == provider.client_id
    assert q["redirect_uri"] == "http://testserver/login/oidc/callback"
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert len(q["state"]) >= 32 and len(q["nonce"]) >= 32 and q["state"] != q["nonce"]
    cookie = next(c for c in client.get("/login/oidc", follow_redirects=False).headers.get_list("set-cookie")
                  if c.startswith(oidc.FLOW_COOKIE))
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower() and "max-age=600" in cookie.lower()
    # The verifier stays with the portal: the cookie is signed, and the challenge is its hash.
    assert q["code_challenge"] not in cookie
    secret = app.state.settings.data_dir / "portal_secret"
    assert secret.stat().st_size == 32 and stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_success_logs_in_the_bound_account(app, lab, provider):
    client = TestClient(app)
    r = flow(client)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert session_cookie_set(r)
    landing = client.get("/", follow_redirects=True)
    assert landing.status_code == 200 and str(landing.url).endswith("/sites/A01")
    assert "Site A by SSO" in landing.text or "site-a-sso" in landing.text
    token = provider.token_requests[-1]
    assert token == {"method": "client_secret_basic", "client_id": provider.client_id, "ok": True}
    event = last_login_event(lab)
    assert (event.action, event.actor, event.detail["via"], event.detail["source"]) == (
        "login.success", "site-a-sso", "oidc", "testclient")
    with session_scope(lab.settings) as s:
        user = s.exec(select(User).where(User.name == "site-a-sso")).one()
        newest = s.exec(select(WebSession).order_by(col(WebSession.id).desc())).first()
        assert (newest.user_id, newest.via, newest.ended_at) == (user.id, "oidc", None)
        assert user.last_login_at is not None


def test_next_path_is_kept_and_kept_local(app):
    client = TestClient(app)
    url, _ = start(client, next="/queries")
    r = client.get("/login/oidc/callback", params=at_provider(url), follow_redirects=False)
    assert r.headers["location"] == "/queries"
    url, _ = start(client, next="//evil.example/x")
    r = client.get("/login/oidc/callback", params=at_provider(url), follow_redirects=False)
    assert r.headers["location"] == "/"


def test_a_session_from_before_is_ended_not_kept(app, lab):
    client = TestClient(app)
    assert login(client, "site-b").status_code == 200
    old_key = client.cookies.get(SESSION_COOKIE)
    r = flow(client)
    assert r.status_code == 303 and client.cookies.get(SESSION_COOKIE) != old_key
    with session_scope(lab.settings) as s:
        old = s.exec(select(WebSession).where(
            WebSession.key_sha256 == hashlib.sha256(old_key.encode()).hexdigest())).one()
        assert old.ended_at is not None and old.via == "password"


MISBEHAVIOURS = {
    "issuer": "invalid claim: 'iss'", "audience": "invalid claim: 'aud'", "expired": "ExpiredTokenError",
    "signature": "BadSignatureError", "nonce": "invalid claim: 'nonce'",
    "alg-none": "algorithm of 'none' is not allowed", "hs256": "algorithm of 'HS256' is not allowed",
}


@pytest.mark.parametrize("misbehave", sorted(MISBEHAVIOURS))
def test_a_lying_provider_logs_nobody_in(app, lab, provider, misbehave):
    provider.misbehave = misbehave
    client = TestClient(app)
    r = flow(client)
    assert r.status_code == 401, r.text
    assert "could not be verified" in r.text and "you are not logged in" in r.text
    assert not session_cookie_set(r) and client.cookies.get(SESSION_COOKIE) is None
    assert provider.token_requests[-1]["ok"]  # the code was good: the ID token is what failed
    event = last_login_event(lab)
    assert (event.action, event.actor, event.detail["via"]) == ("login.failure", "(oidc)", "oidc")
    assert MISBEHAVIOURS[misbehave].lower() in event.detail["reason"].lower(), event.detail
    assert client.get("/", follow_redirects=False).headers["location"].startswith("/login")


def test_discovery_naming_another_issuer_is_refused(app, provider):
    provider.misbehave = "discovery-issuer"
    r = TestClient(app).get("/login/oidc", follow_redirects=False)
    assert r.status_code == 502 and "evil.example" in r.text and "not the configured" in r.text


def test_state_mismatch_is_refused_before_the_code_is_spent(app, lab, provider):
    client = TestClient(app)
    n_tokens = len(provider.token_requests)
    r = flow(client, state="forged-state")
    assert r.status_code == 400 and "did not start here" in r.text
    assert not session_cookie_set(r) and len(provider.token_requests) == n_tokens
    event = last_login_event(lab)
    assert event.action == "login.failure" and "state mismatch" in event.detail["reason"]


def test_callback_without_the_flow_cookie_or_with_an_altered_one(app, provider):
    client = TestClient(app)
    url, _ = start(client)
    back = at_provider(url)
    signed = client.cookies.get(oidc.FLOW_COOKIE)
    body, mac = signed.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["state"] = back["state"] = "attacker-chosen"
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode() + "." + mac
    stranger = TestClient(app)  # a browser that did not start this login (login CSRF)
    assert stranger.get("/login/oidc/callback", params=back, follow_redirects=False).status_code == 400
    stranger.cookies.set(oidc.FLOW_COOKIE, forged)
    assert stranger.get("/login/oidc/callback", params=back, follow_redirects=False).status_code == 400


def test_a_code_works_once(app, lab, provider):
    client = TestClient(app)
    url, _ = start(client)
    back, cookie = at_provider(url), client.cookies.get(oidc.FLOW_COOKIE)
    assert client.get("/login/oidc/callback", params=back, follow_redirects=False).status_code == 303
    replay = TestClient(app)
    replay.cookies.set(oidc.FLOW_COOKIE, cookie)
    r = replay.get("/login/oidc/callback", params=back, follow_redirects=False)
    assert r.status_code == 401 and not session_cookie_set(r)
    assert provider.token_requests[-1] == {"method": "client_secret_basic", "client_id": provider.client_id,
                                           "ok": False, "error": "invalid_grant"}
    assert "invalid_grant" in last_login_event(lab).detail["reason"]


@pytest.mark.parametrize("subject, reason", [(UNBOUND, "no account bound to this identity"),
                                             (DISABLED, "disabled")])
def test_unbound_or_disabled_identity_is_refused(app, lab, provider, subject, reason):
    provider.subject = subject
    client = TestClient(app)
    r = flow(client)
    assert r.status_code == 401 and "no corelab account is bound to this identity" in r.text
    assert not session_cookie_set(r)
    event = last_login_event(lab)
    assert (event.action, event.detail["reason"], event.detail["via"]) == ("login.failure", reason, "oidc")
    assert event.actor == ("gone-sso" if subject == DISABLED else "(oidc)")
    with session_scope(lab.settings) as s:  # no account was made for the stranger
        assert s.exec(select(User).where(User.oidc_subject == UNBOUND)).first() is None


def test_provider_error_is_refused(app, lab):
    client = TestClient(app)
    _, q = start(client)
    r = client.get("/login/oidc/callback", params={"error": "access_denied", "state": q["state"]},
                   follow_redirects=False)
    assert r.status_code == 401 and not session_cookie_set(r)
    assert "access_denied" in last_login_event(lab).detail["reason"]
