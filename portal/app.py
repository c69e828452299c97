"""The portal application: ``create_app(settings)`` for ``corelab portal``, ``corelab serve`` and tests."""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from corelab.db import open_store
from corelab.settings import Settings, load_settings
from portal.pages import page
from portal.security import LoginRequired

LOG = logging.getLogger("corelab.portal")

# Pages load nothing from elsewhere and run no script: the portal works on a closed network,
# and an injected <script> would not run.
CSP = ("default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")


def create_app(settings: Settings | None = None) -> FastAPI:
    from portal import (admin_views, api_views, auth_views, manager_views, oidc, report_views, review_views,
                        site_views)

    settings = settings or load_settings()
    app = FastAPI(title="corelab portal", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.settings = settings
    app.state.engine = open_store(settings)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).with_name("static"))), name="static")
    for module in (auth_views, oidc, site_views, review_views, report_views, manager_views, admin_views, api_views):
        app.include_router(module.router)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
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

    return app
