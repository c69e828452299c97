"""Sessions, CSRF and roles for every portal request.

- **Sessions** are server side (:class:`~corelab.models.WebSession`): the cookie carries a random
  key, the table its sha256. A session is created only when a login succeeds, with a new key,
  so a key planted before login is never authenticated (no session fixation); it ends at
  logout, after ``portal_idle_minutes`` without a request, or when an admin changes the user.
- **Cookies** are HttpOnly and SameSite=Lax, and Secure when the request came over HTTPS (the
  ``portal_secure_cookies`` setting; a TLS proxy on the loopback is believed, see portal/serve.py).
- **CSRF**: every state-changing request of a browser session must carry the session's token
  (form field ``csrf_token`` or header ``X-CSRF-Token``); the login form uses a double-submit
  cookie. Requests with an API token (``Authorization: Bearer``) send no cookie and need none.
- **Roles**: :func:`require` gives a view the caller's :class:`~services.access.Scope` or answers
  401 (redirect to the login page) / 403.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine
from sqlmodel import Session

from corelab import accounts, audit
from corelab.db import transaction
from corelab.models import User, WebSession, utcnow
from corelab.settings import Settings
from portal.body_limit import streams
from services.access import Scope, scope_of

SESSION_COOKIE = "corelab_session"
LOGIN_CSRF_COOKIE = "corelab_login_csrf"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Pages load nothing from elsewhere and run no script: the portal works on a closed network,
# and an injected <script> would not run.
CSP = ("default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


class LoginRequired(Exception):
    """No valid session: the app sends a browser to the login page (an API client gets 401)."""


@dataclass
class Ctx:
    """What a view gets: the settings, the store, who is asking and what they may see."""

    settings: Settings
    engine: Engine
    user_id: int
    scope: Scope
    csrf_token: str
    via: str  # session | token

    @contextlib.contextmanager
    def db(self) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on error."""
        with transaction(self.engine) as session:
            yield session

    def user(self, session: Session) -> User:
        return session.get(User, self.user_id)


def is_https(request: Request) -> bool:
    # Behind a TLS proxy, uvicorn (proxy_headers, trusting only the loopback proxy) has already
    # turned X-Forwarded-Proto into the scheme; the header itself is not trusted here.
    return request.url.scheme == "https"


def secure_cookies(settings: Settings, request: Request) -> bool:
    mode = settings.portal_secure_cookies
    return mode == "always" or (mode == "auto" and is_https(request))


def set_cookie(response, settings: Settings, request: Request, name: str, value: str, *,
               max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="lax", path="/",
                        secure=secure_cookies(settings, request))


def clear_cookie(response, settings: Settings, request: Request, name: str) -> None:
    response.delete_cookie(name, path="/", httponly=True, samesite="lax", secure=secure_cookies(settings, request))


def start_session(session: Session, user: User, *, via: str) -> str:
    """A new session for ``user`` (after a successful login); returns the cookie's key."""
    key = secrets.token_urlsafe(32)
    session.add(WebSession(key_sha256=accounts.sha256_hex(key), user_id=user.id, csrf_token=secrets.token_urlsafe(32),
                           via=via))
    session.flush()
    return key


def end_session(session: Session, key: str | None) -> WebSession | None:
    if not key:
        return None
    ws = _open_session(session, key)
    if ws is not None:
        ws.ended_at = utcnow()
        session.add(ws)
    return ws


def _open_session(session: Session, key: str) -> WebSession | None:
    from sqlmodel import select

    if len(key) > 128:
        return None
    ws = session.exec(select(WebSession).where(WebSession.key_sha256 == accounts.sha256_hex(key))).first()
    return ws if ws is not None and ws.ended_at is None else None


def _from_session(session: Session, settings: Settings, key: str) -> tuple[User, WebSession] | None:
    ws = _open_session(session, key)
    if ws is None:
        return None
    now = utcnow()
    if now - ws.last_seen_at > timedelta(minutes=settings.portal_idle_minutes):
        ws.ended_at = now  # idle too long: the session is over, whatever the cookie says
        session.add(ws)
        user = session.get(User, ws.user_id)
        audit.append(session, actor=user.name if user else "", action="session.expire", entity="user",
                     entity_id=ws.user_id, detail={"idle_minutes": settings.portal_idle_minutes})
        return None
    user = session.get(User, ws.user_id)
    if user is None or user.disabled:
        return None
    ws.last_seen_at = now
    session.add(ws)
    return user, ws


def check_login_csrf(request: Request, form_token: str) -> bool:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie, form_token or "")


async def _csrf_ok(request: Request, expected: str) -> bool:
    sent = request.headers.get("x-csrf-token", "")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # The form is read only where forms are posted: never a streaming route's body (STOW-RS, a zip's
    # chunks), which the BoundedBodies guard lets through unbounded, whatever type it claims.
    if not sent and kind in ("application/x-www-form-urlencoded", "multipart/form-data") \
            and not streams(request.method, request.url.path):
        form = await request.form()  # Starlette caches it: the view's Form() parameters still work
        sent = str(form.get("csrf_token", ""))
    return bool(sent) and hmac.compare_digest(sent, expected)


def require(*roles: str):
    """A FastAPI dependency: the caller's :class:`Ctx`, if logged in with one of ``roles``.

    401 without a valid session or token, 403 for a role not listed or a state-changing request
    without the session's CSRF token.
    """
    def identify(settings: Settings, engine: Engine, auth: str, cookie: str):
        """Who is calling, in one short transaction: ``(user id, scope, csrf, via)`` or None."""
        with transaction(engine) as session:
            if auth.lower().startswith("bearer "):
                user = accounts.user_of_token(session, auth[7:].strip())
                if user is None:
                    raise HTTPException(401, "invalid, expired or revoked API token",
                                        headers={"WWW-Authenticate": "Bearer"})
                return user.id, scope_of(session, user), "", "token"
            found = _from_session(session, settings, cookie)
            if found is None:
                return None
            user, ws = found
            return user.id, scope_of(session, user), ws.csrf_token, "session"

    async def dependency(request: Request) -> Ctx:
        settings: Settings = request.app.state.settings
        engine: Engine = request.app.state.engine
        # In a worker thread: the store may be busy (a large ingest holding SQLite's write lock),
        # and waiting for it on the event loop would stall every other request of the portal.
        who = await run_in_threadpool(identify, settings, engine, request.headers.get("authorization", ""),
                                      request.cookies.get(SESSION_COOKIE, ""))
        if who is None:  # raised after the commit: an idle session's end is kept
            raise LoginRequired()
        user_id, scope, csrf, via = who
        if roles and scope.role not in roles:
            raise HTTPException(403, f"this page is for {' or '.join(roles)} users")
        if via == "session" and request.method not in SAFE_METHODS and not await _csrf_ok(request, csrf):
            raise HTTPException(403, "the form's security token is missing or stale: reload the page and try again")
        return Ctx(settings, engine, user_id, scope, csrf, via)

    dependency.roles = roles  # read by the access test, which tries every route with every role
    return dependency


def sending_site(ctx: Ctx, asked: str | None) -> str:
    """The site code a site user sends for (STOW-RS, the upload page): ``asked`` if it is one of
    theirs (another site answers 404, like one that does not exist), else their only site; a user
    of several sites must name one (400)."""
    sites = sorted(ctx.scope.sites or ())
    if asked:
        if asked not in sites:
            raise HTTPException(404, "no such site, or not yours")
        return asked
    if len(sites) != 1:
        raise HTTPException(400, f"your account sends for {len(sites)} sites: name one with ?site=CODE "
                                 f"({'|'.join(sites)})")
    return sites[0]


ANY_ROLE = ("site", "physicist", "trial-manager", "admin")
READERS = ("site", "physicist", "trial-manager")
