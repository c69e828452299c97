"""Bodies are bounded before anything reads them, whoever sends them.

FastAPI reads a JSON body, and Starlette a form (to a temporary file), before a view's login
check runs; so without this guard anybody, logged in or not, could make the portal hold a
gigabyte. Every request body is refused here unless it declares its length and is small
(:data:`MAX_FORM_BYTES`: the largest form, a fill sheet), except on the two routes that stream
large bodies to disk under their own limits and after their own login check: STOW-RS
(``POST /dicomweb/studies[/{study}]``) and a zip upload's chunks (``PUT /upload/zip/{id}``).
"""

from __future__ import annotations

import json
import re

from corelab.limits import MAX_FILL_SHEET_BYTES

__all__ = ["MAX_FORM_BYTES", "BoundedBodies", "streams"]

# A fill sheet form: the sheet, as a file or as text, and the CSRF token.
MAX_FORM_BYTES = 2 * MAX_FILL_SHEET_BYTES + 64 * 1024
_STREAMING = (("POST", re.compile(r"^/dicomweb/studies(?:/[^/]+)?/?$")), ("PUT", re.compile(r"^/upload/zip/[^/]+$")))
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def streams(method: str, path: str) -> bool:
    """Whether ``method path`` is one of the routes that stream a large body under their own limits."""
    return any(method == m and pattern.match(path) for m, pattern in _STREAMING)


class BoundedBodies:
    """ASGI middleware: 411 for a body of unknown length, 413 for one over :data:`MAX_FORM_BYTES`,
    400 for a Content-Length that is not a number, all before a byte of the body is read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS or streams(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        raw = headers.get(b"content-length")
        problem = None
        if raw is None:
            if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                problem = (411, "a request body needs a Content-Length header here (a browser sends one); nothing "
                                "was changed")
        elif not raw.isdigit():
            problem = (400, "the Content-Length header is not a number; nothing was changed")
        elif int(raw) > MAX_FORM_BYTES:
            problem = (413, f"the request's {int(raw)} bytes are over the limit of {MAX_FORM_BYTES} bytes for a form "
                            "or a request of the API; nothing was changed (studies go to /dicomweb/studies or the "
                            "upload page)")
        if problem is None:
            return await self.app(scope, receive, send)
        status, detail = problem
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), (b"cache-control", b"no-store"),
                                (b"x-content-type-options", b"nosniff")]})
        await send({"type": "http.response.body", "body": body})
