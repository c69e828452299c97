"""The portal application: ``create_app(settings)`` for ``corelab portal``, ``corelab serve`` and tests."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from corelab.db import open_store
from corelab.settings import Settings, load_settings
from portal.body_limit import BoundedBodies
from portal.pages import page
from portal.security import CSP, LoginRequired


# A number no id or page can be (more than 18 digits) would overflow the database's integers:
# such a request is answered as a page that does not exist, before any view sees it.
_HUGE_NUMBER = re.compile(r"(?:^|[/=&])\d{19,}(?:$|[/&])")


def _wants_json(request: Request) -> bool:
    # Machine clients (the JSON API, DICOMweb) get JSON errors and a 401, never a login page.
    path = request.url.path
    return (path.startswith(("/api/", "/dicomweb/")) or path == "/dicomweb"
            or "json" in request.headers.get("accept", ""))


def create_app(settings: Settings | None = None) -> FastAPI:
    from portal import (admin_views, api_views, archive_views, auth_views, datadocs_views, dicomweb_read,
                        dicomweb_store, manager_views, oidc, phantom_views, report_views, review_views, site_views,
                        upload_views)

    settings = settings or load_settings()
    app = FastAPI(title="corelab portal", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.settings = settings
    app.state.engine = open_store(settings)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).with_name("static"))), name="static")
    for module in (auth_views, oidc, site_views, review_views, report_views, manager_views, admin_views, api_views,
                   dicomweb_store, dicomweb_read, upload_views, archive_views, phantom_views, datadocs_views):
        app.include_router(module.router)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if _HUGE_NUMBER.search(request.url.path) or _HUGE_NUMBER.search(request.url.query):
            response = (JSONResponse({"detail": "no such resource: a number of 19 digits or more is no id, offset "
                                                "or limit corelab has"}, status_code=404) if _wants_json(request)
                        else page(request, None, "error.html", status_code=404, status=404, message="no such page"))
        else:
            response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        if request.url.scheme == "https":
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _exc: LoginRequired):
        if _wants_json(request):
            return JSONResponse({"detail": "log in first (or send an API token)"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?next=" + urllib.parse.quote(target, safe=""), status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if _wants_json(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return page(request, None, "error.html", status_code=exc.status_code, status=exc.status_code,
                    message=str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_input(request: Request, exc: RequestValidationError):
        # Say which field is wrong and why, never echo what was sent (it may be a password).
        problems = [{"field": ".".join(str(p) for p in e.get("loc", ())[1:]), "problem": e.get("msg", "")}
                    for e in exc.errors()]
        if _wants_json(request):
            return JSONResponse({"detail": problems}, status_code=422)
        text = "; ".join(f"{p['field'] or 'the request'}: {p['problem']}" for p in problems)
        return page(request, None, "error.html", status_code=422, status=422,
                    message=f"the form was not accepted ({text}); go back, correct it and send it again")

    app.add_middleware(BoundedBodies)  # outermost: before any view, dependency or form parser reads a body
    return app
