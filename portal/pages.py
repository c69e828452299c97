"""Templates and the helpers every view uses to answer with a page, a redirect or a file."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from portal.security import Ctx, clear_cookie, set_cookie

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
FLASH_COOKIE = "corelab_flash"

STATE_LABELS = {
    "received": "received", "qc_running": "QC running", "evaluable": "evaluable", "deviation": "deviation",
    "query_open": "query open", "quarantined": "quarantined",
}


def _fmt_time(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if hasattr(value, "strftime") and hasattr(value, "hour") else (
        value.isoformat() if hasattr(value, "isoformat") else ("" if value is None else str(value)))


TEMPLATES.env.filters["when"] = _fmt_time
TEMPLATES.env.globals["STATE_LABELS"] = STATE_LABELS


def home_of(ctx: Ctx) -> str:
    """Where a user lands after login: the main page of their role."""
    scope = ctx.scope
    if scope.role == "site":
        return f"/sites/{sorted(scope.sites)[0]}" if scope.sites else "/queries"
    return {"physicist": "/worklist", "trial-manager": "/deviations", "admin": "/admin/users"}[scope.role]


def page(request: Request, ctx: Ctx | None, template: str, status_code: int = 200, **values) -> HTMLResponse:
    """Render ``template`` with the user's scope, CSRF token and a pending flash message."""
    flash = request.cookies.get(FLASH_COOKIE, "")
    response = TEMPLATES.TemplateResponse(request, template, {
        "ctx": ctx, "scope": ctx.scope if ctx else None, "csrf_token": ctx.csrf_token if ctx else "",
        "flash": urllib.parse.unquote(flash)[:300], **values}, status_code=status_code)
    if flash:
        clear_cookie(response, request.app.state.settings, request, FLASH_COOKIE)
    return response


def done(request: Request, ctx: Ctx, to: str, message: str) -> RedirectResponse:
    """After a change: redirect (303, so a reload does not repeat it) and show ``message`` once."""
    response = RedirectResponse(to, status_code=303)
    set_cookie(response, ctx.settings, request, FLASH_COOKIE, urllib.parse.quote(message[:300]), max_age=60)
    return response


def not_found(what: str = "page") -> HTTPException:
    """The answer for an object that does not exist *or* that the user may not see (the same)."""
    return HTTPException(404, f"no such {what}, or not yours to see")


def local_path(to: str | None, default: str) -> str:
    """A redirect target from a form: a path on this portal only (no open redirect)."""
    if to and to.startswith("/") and not to.startswith("//") and "\\" not in to:
        return to
    return default
