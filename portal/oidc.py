"""Log in with the institution's OpenID Connect provider (authorization code flow with PKCE).

Optional: on only when the ``oidc_issuer`` setting names a provider. The portal is a
confidential client (``oidc_client_id`` / ``oidc_client_secret``).

- ``GET /login/oidc`` reads the provider's discovery document (its ``issuer`` must be the
  setting, exactly), makes a fresh ``state``, ``nonce`` and PKCE S256 verifier, keeps them in a
  short-lived HttpOnly cookie signed with the installation's secret (so any portal process can
  check it, and the browser cannot forge or alter it), and sends the browser to the provider.
- ``GET /login/oidc/callback`` checks ``state`` against that cookie (login CSRF), exchanges the
  code (with the verifier) at the token endpoint, and verifies the ID token: RS256 signature
  against the provider's JWKS (``none`` and HMAC algorithms are refused), ``iss``, ``aud``
  (and ``azp``), ``exp`` / ``iat`` with a small leeway, and ``nonce``. Then the account an admin
  bound to the token's ``sub`` logs in (:func:`corelab.accounts.oidc_login`); nobody is
  provisioned automatically. Every refusal is a ``login.failure`` audit event.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from corelab import accounts, audit
from corelab.db import transaction
from corelab.settings import Settings
from portal.pages import local_path, page
from portal.security import SESSION_COOKIE, end_session, set_cookie, start_session

router = APIRouter()

FLOW_COOKIE = "corelab_oidc"
FLOW_SECONDS = 600  # the time a person has at the provider's login page
CACHE_SECONDS = 300  # discovery and JWKS: short, so a changed provider is picked up soon
LEEWAY_SECONDS = 60  # clock skew between the provider and us
ALGORITHMS = ("RS256",)  # never "none", never HS256 (an HMAC keyed with the public key)
HTTP_TIMEOUT = 10.0
SCOPE = "openid profile email"

_cache: dict[tuple[str, str], tuple[float, dict]] = {}
_cache_lock = threading.Lock()


class OidcError(Exception):
    """A refused OpenID Connect login; the message is for the audit log and the person."""


# --- the installation's secret ------------------------------------------------------------------

def portal_secret(settings: Settings) -> bytes:
    """32 random bytes in ``<data_dir>/portal_secret`` (0600), created on first use.

    Shared by every portal process of the installation; created atomically (written aside,
    then hard-linked into place), so two processes starting together agree on one secret.
    """
    path = Path(settings.data_dir) / "portal_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".portal_secret.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32))
            try:
                os.link(aside, path)
            except FileExistsError:
                pass  # another process won the race: use its secret
        finally:
            aside.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) < 32:
        raise RuntimeError(f"{path} holds {len(secret)} bytes, not 32: delete it and a new one is made")
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(settings: Settings, payload: dict) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    mac = hmac.new(portal_secret(settings), b"corelab-oidc-flow:" + body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def _unsign(settings: Settings, value: str) -> dict | None:
    """The flow cookie's content, or None if it is missing, altered or expired."""
    body, _, mac = (value or "").partition(".")
    if not body or not mac or len(value) > 4096:
        return None
    expected = hmac.new(portal_secret(settings), b"corelab-oidc-flow:" + body.encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(_unb64(mac), expected):
            return None
        payload = json.loads(_unb64(body))
    except (ValueError, TypeError):
        return None
    return payload if isinstance(payload, dict) and payload.get("exp", 0) > time.time() else None


# --- the provider ---------------------------------------------------------------------------------

def _check_url(url: str, what: str) -> None:
    """Provider URLs must be https; plain http only on this machine (a test or a local provider)."""
    parts = urllib.parse.urlsplit(url or "")
    local = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if parts.scheme != "https" and not (parts.scheme == "http" and local):
        raise OidcError(f"the provider's {what} {url!r} is not an https URL")


def _get_json(url: str) -> dict:
    try:
        response = httpx.get(url, timeout=HTTP_TIMEOUT, headers={"Accept": "application/json"})
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise OidcError(f"cannot read {url}: {exc}") from exc
    if not isinstance(data, dict):
        raise OidcError(f"{url} did not answer with a JSON object")
    return data


def _cached(kind: str, url: str, fetch, *, refresh: bool = False) -> dict:
    with _cache_lock:
        hit = _cache.get((kind, url))
    if hit and not refresh and time.monotonic() - hit[0] < CACHE_SECONDS:
        return hit[1]
    value = fetch()
    with _cache_lock:
        _cache[(kind, url)] = (time.monotonic(), value)
    return value


def forget_provider() -> None:
    """Drop the cached discovery documents and key sets (tests; a provider that changed)."""
    with _cache_lock:
        _cache.clear()


def discovery(issuer: str) -> dict:
    """The provider's metadata, checked: its ``issuer`` must be the configured one, exactly."""
    _check_url(issuer, "issuer")

    def fetch() -> dict:
        doc = _get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        if doc.get("issuer") != issuer:
            raise OidcError(f"the provider calls itself {doc.get('issuer')!r}, not the configured {issuer!r}")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            _check_url(doc.get(key, ""), key)
        return doc

    return _cached("discovery", issuer, fetch)


def _keys(jwks_uri: str, *, refresh: bool = False) -> KeySet:
    def fetch() -> dict:
        data = _get_json(jwks_uri)
        # Encryption keys are not for checking signatures.
        signing = [k for k in data.get("keys", []) if isinstance(k, dict) and k.get("use", "sig") == "sig"]
        return {"keys": signing}

    data = _cached("jwks", jwks_uri, fetch, refresh=refresh)
    try:
        return KeySet.import_key_set(data)
    except (JoseError, ValueError, TypeError) as exc:
        raise OidcError(f"the provider's key set is unusable: {exc}") from exc


def _exchange(settings: Settings, meta: dict, code: str, redirect_uri: str, verifier: str) -> dict:
    """Trade the code for tokens (client_secret_basic unless the provider only takes _post)."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": verifier}
    headers = {"Accept": "application/json"}
    methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    if "client_secret_basic" in methods:
        # RFC 6749 2.3.1: id and secret are form-encoded before going into the Basic header.
        pair = f"{urllib.parse.quote_plus(settings.oidc_client_id)}:{urllib.parse.quote_plus(settings.oidc_client_secret)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        form.update(client_id=settings.oidc_client_id, client_secret=settings.oidc_client_secret)
    try:
        response = httpx.post(meta["token_endpoint"], data=form, headers=headers, timeout=HTTP_TIMEOUT)
        tokens = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise OidcError(f"the token endpoint failed: {exc}") from exc
    if response.status_code != 200 or not isinstance(tokens, dict):
        error = tokens.get("error", response.status_code) if isinstance(tokens, dict) else response.status_code
        raise OidcError(f"the provider refused the code ({error})")
    if not isinstance(tokens.get("id_token"), str):
        raise OidcError("the provider's answer has no ID token")
    return tokens


def verify_id_token(settings: Settings, meta: dict, id_token: str, nonce: str) -> dict:
    """The ID token's claims once its signature, issuer, audience, times and nonce check out."""
    try:
        try:
            token = jwt.decode(id_token, _keys(meta["jwks_uri"]), algorithms=list(ALGORITHMS))
        except InvalidKeyIdError:
            # A key we have not seen yet may be a rotation: read the key set again, once.
            token = jwt.decode(id_token, _keys(meta["jwks_uri"], refresh=True), algorithms=list(ALGORITHMS))
        claims = token.claims
        jwt.JWTClaimsRegistry(
            leeway=LEEWAY_SECONDS,
            iss={"essential": True, "value": settings.oidc_issuer},
            aud={"essential": True, "value": settings.oidc_client_id},
            sub={"essential": True}, exp={"essential": True}, iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        ).validate(claims)
    except (JoseError, ValueError, TypeError) as exc:
        raise OidcError(f"the ID token is not valid: {exc.__class__.__name__}: {exc}") from exc
    # OIDC Core 3.1.3.7: with several audiences, the authorized party must be us.
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if (len(audiences) > 1 or "azp" in claims) and claims.get("azp") != settings.oidc_client_id:
        raise OidcError("the ID token was issued to another client (azp)")
    return claims


# --- the routes -----------------------------------------------------------------------------------

def _settings_on(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    if not settings.oidc_issuer:
        raise HTTPException(404, "no such page, or not yours to see")
    return settings


def _source(request: Request) -> str:
    return request.client.host if request.client else ""


def _refuse(request: Request, reason: str, message: str, status_code: int = 401):
    """Audit a refused login and show the error page; the flow cookie is spent either way."""
    with transaction(request.app.state.engine) as session:
        audit.append(session, actor="(oidc)", action="login.failure", entity="user",
                     detail={"reason": reason[:500], "via": "oidc", "source": _source(request)})
    response = page(request, None, "error.html", status_code=status_code, status=status_code, message=message)
    response.delete_cookie(FLOW_COOKIE, path="/")
    return response


@router.get("/login/oidc")
def oidc_start(request: Request, next: str = ""):
    settings = _settings_on(request)
    try:
        meta = discovery(settings.oidc_issuer)
    except OidcError as exc:
        raise HTTPException(502, f"the institution's login service cannot be used now ({exc}); "
                                 "log in with your password or ask the core lab") from exc
    state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
    redirect_uri = str(request.url_for("oidc_callback"))
    flow = {"state": state, "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_uri,
            "next": local_path(next, "/"), "exp": int(time.time()) + FLOW_SECONDS}
    query = urllib.parse.urlencode({
        "response_type": "code", "scope": SCOPE, "client_id": settings.oidc_client_id,
        "redirect_uri": redirect_uri, "state": state, "nonce": nonce,
        "code_challenge": _b64(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256"})
    endpoint = meta["authorization_endpoint"]
    response = RedirectResponse(endpoint + ("&" if "?" in endpoint else "?") + query, status_code=303)
    set_cookie(response, settings, request, FLOW_COOKIE, _sign(settings, flow), max_age=FLOW_SECONDS)
    return response


@router.get("/login/oidc/callback", name="oidc_callback")
def oidc_callback(request: Request, code: str = "", state: str = "", error: str = ""):
    settings = _settings_on(request)
    flow = _unsign(settings, request.cookies.get(FLOW_COOKIE, ""))
    if flow is None or not state or not hmac.compare_digest(str(flow.get("state", "")), state):
        return _refuse(request, "state mismatch or login flow expired",
                       "this login did not start here or took too long: please start again", 400)
    if error or not code:
        return _refuse(request, f"provider error: {error or 'no code'}"[:200],
                       "the institution's login service did not log you in: please try again")
    try:
        meta = discovery(settings.oidc_issuer)
        tokens = _exchange(settings, meta, code, flow["redirect_uri"], flow["verifier"])
        claims = verify_id_token(settings, meta, tokens["id_token"], flow["nonce"])
    except OidcError as exc:
        return _refuse(request, str(exc), "the institution's login could not be verified, so you are not "
                                          "logged in; please try again or ask the core lab")
    with transaction(request.app.state.engine) as session:
        # As for a password login: a session key planted before login is ended, never promoted.
        end_session(session, request.cookies.get(SESSION_COOKIE))
        result = accounts.oidc_login(session, claims["sub"], source=_source(request))
        key = start_session(session, result.user, via="oidc") if result.user else None
    if key is None:
        response = page(request, None, "error.html", status_code=401, status=401, message=result.message)
        response.delete_cookie(FLOW_COOKIE, path="/")
        return response
    response = RedirectResponse(local_path(flow.get("next"), "/"), status_code=303)
    set_cookie(response, settings, request, SESSION_COOKIE, key)
    response.delete_cookie(FLOW_COOKIE, path="/")
    return response
