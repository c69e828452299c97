"""Log in and out with a name and password; the landing page of each role."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from corelab import accounts, audit
from corelab.db import transaction
from portal.pages import home_of, local_path, page
from portal.security import (ANY_ROLE, LOGIN_CSRF_COOKIE, SESSION_COOKIE, Ctx, check_login_csrf, clear_cookie,
                             end_session, require, set_cookie, start_session)

router = APIRouter()


def _login_page(request: Request, *, error: str = "", status_code: int = 200, next_path: str = ""):
    token = secrets.token_urlsafe(32)
    response = page(request, None, "login.html", status_code=status_code, login_csrf=token, error=error,
                    next_path=next_path, oidc=bool(request.app.state.settings.oidc_issuer))
    set_cookie(response, request.app.state.settings, request, LOGIN_CSRF_COOKIE, token, max_age=3600)
    return response


@router.get("/login")
def login_form(request: Request, next: str = ""):
    return _login_page(request, next_path=local_path(next, ""))


@router.post("/login")
def login(request: Request, name: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
          next: str = Form("")):
    settings = request.app.state.settings
    if not check_login_csrf(request, csrf_token):
        return _login_page(request, error="the login form expired: please try again", status_code=403)
    source = request.client.host if request.client else ""
    with transaction(request.app.state.engine) as session:
        # A key planted before login is ended, never promoted: the new session gets a new key.
        end_session(session, request.cookies.get(SESSION_COOKIE))
        result = accounts.authenticate(session, name.strip(), password, max_failed=settings.portal_max_failed_logins,
                                       lockout_minutes=settings.portal_lockout_minutes, source=source)
        key = start_session(session, result.user, via="password") if result.user else None
    if key is None:
        return _login_page(request, error=result.message, status_code=401, next_path=local_path(next, ""))
    response = RedirectResponse(local_path(next, "/"), status_code=303)
    set_cookie(response, settings, request, SESSION_COOKIE, key)
    clear_cookie(response, settings, request, LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, ctx: Ctx = Depends(require(*ANY_ROLE))):
    with ctx.db() as session:
        end_session(session, request.cookies.get(SESSION_COOKIE))
        audit.append(session, actor=ctx.scope.user, action="logout", entity="user", entity_id=ctx.user_id)
    response = RedirectResponse("/login", status_code=303)
    clear_cookie(response, ctx.settings, request, SESSION_COOKIE)
    return response


@router.get("/")
def home(ctx: Ctx = Depends(require(*ANY_ROLE))):
    return RedirectResponse(home_of(ctx), status_code=303)
