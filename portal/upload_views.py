"""Upload in the browser for a site user: a folder or files sent one instance at a time as
STOW-RS (to ``POST /dicomweb/studies``, portal/dicomweb_store.py), or a zip sent in chunks and
ingested as a file drop in the background (services/uploads.py, services/upload_finish.py): the
finish answers 202 and the page polls ``GET /upload/zip/{id}`` until the summary is there.

The upload page is the one page of the portal that runs a script, ``/static/upload.js`` (served
from here, nothing inline, no eval): its Content-Security-Policy differs from the app's only in
``script-src 'self'``. The script gets what it needs (CSRF token, site, URLs, chunk size) from
``data-`` attributes. Every route is for site users and works on their own sites only: an upload
id of another site answers 404, like one that does not exist.
"""

from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from portal.pages import not_found, page
from portal.security import CSP, Ctx, require, sending_site
from services import upload_finish, uploads
from services.uploads import UploadError

router = APIRouter()
LOG = logging.getLogger("corelab.portal")
WRITE_BYTES = 1 * 2**20
"""A chunk's body is gathered into pieces of about this size, each written in a worker thread (the
event loop only receives: a slow disk never holds up the portal's other requests)."""

# The app's policy with one change: this page may run its own script file (never inline code).
UPLOAD_CSP = CSP.replace("script-src 'none'", "script-src 'self'")
assert UPLOAD_CSP != CSP, "the app's CSP no longer says script-src 'none': update the upload page's policy"


class NewZip(BaseModel):
    """What the page announces before sending a zip: its name (checked, never kept), size, site."""

    name: str = Field(min_length=1, max_length=255)
    size: int = Field(ge=1)
    site: str | None = Field(default=None, max_length=32)


def _error(exc: UploadError) -> JSONResponse:
    body: dict = {"detail": exc.message}
    headers = {}
    if exc.offset is not None:
        body["offset"] = exc.offset
        headers["Upload-Offset"] = str(exc.offset)
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _find(ctx: Ctx, upload_id: str) -> tuple[str, uploads.UploadState]:
    """The caller's upload ``upload_id``, looked up under each of their sites (ids are random and
    per site: another site's id is not found)."""
    for site in sorted(ctx.scope.sites or ()):
        try:
            return site, uploads.upload_state(ctx.settings, site, upload_id)
        except UploadError as exc:
            if exc.status != 404:
                raise
    raise UploadError(404, "no such upload, or not yours (unfinished uploads are removed after a day): "
                           "start the upload again")


@router.get("/upload")
def upload_page(request: Request, site: str | None = None, ctx: Ctx = Depends(require("site"))):
    """The upload page; a user of several sites first chooses the site."""
    sites = sorted(ctx.scope.sites or ())
    chosen = None
    if site:
        if site not in sites:
            raise not_found("site")
        chosen = site
    elif len(sites) == 1:
        chosen = sites[0]
    response = page(request, ctx, "upload.html", sites=sites, site=chosen,
                    stable_s=ctx.settings.series_stable_s, chunk_bytes=uploads.CHUNK_BYTES,
                    max_zip_bytes=uploads.MAX_ZIP_BYTES)
    if chosen:
        response.headers["Content-Security-Policy"] = UPLOAD_CSP
    return response


@router.post("/upload/zip", status_code=201)
def create_zip(new: NewZip, ctx: Ctx = Depends(require("site"))):
    """Announce a zip: answers its upload id, offset 0 and where to send the chunks."""
    site = sending_site(ctx, new.site)
    try:
        state = uploads.create_upload(ctx.settings, site, name=new.name, total=new.size, user=ctx.scope.user)
    except UploadError as exc:
        return _error(exc)
    return JSONResponse({**state.as_dict(), "chunk_bytes": uploads.CHUNK_BYTES}, status_code=201,
                        headers={"Upload-Offset": "0", "Location": f"/upload/zip/{state.upload_id}"})


@router.get("/upload/zip/{upload}")
def zip_offset(upload: str, ctx: Ctx = Depends(require("site"))):
    """How many bytes of the upload are held (send from there)."""
    try:
        _site, state = _find(ctx, upload)
    except UploadError as exc:
        return _error(exc)
    return JSONResponse(state.as_dict(), headers={"Upload-Offset": str(state.offset)})


@router.put("/upload/zip/{upload}")
async def zip_chunk(upload: str, request: Request, ctx: Ctx = Depends(require("site"))):
    """One chunk, ``Content-Range: bytes a-b/total``, streamed to disk; it must start at the
    current offset (409 with the offset otherwise)."""
    site = ""
    try:
        site, _state = await run_in_threadpool(_find, ctx, upload)
        kind = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
        if kind != "application/octet-stream":
            raise UploadError(415, f"a chunk is sent as application/octet-stream, not {kind[:60]!r}")
        writer = await run_in_threadpool(uploads.ChunkWriter, ctx.settings, site, upload,
                                         request.headers.get("content-range"), request.headers.get("content-length"))
        await run_in_threadpool(writer.__enter__)
        try:
            pending = bytearray()
            async for piece in request.stream():
                pending += piece
                if len(pending) >= WRITE_BYTES:
                    await run_in_threadpool(writer.write, bytes(pending))
                    pending.clear()
            if pending:
                await run_in_threadpool(writer.write, bytes(pending))
            state = await run_in_threadpool(writer.commit)
        finally:
            with anyio.CancelScope(shield=True):  # the lock is released and a partial chunk cut back, always
                await run_in_threadpool(writer.__exit__, None, None, None)
    except UploadError as exc:
        return _error(exc)
    except ClientDisconnect:  # the chunk was cut back to where it started; nobody is listening
        return JSONResponse({"detail": "connection lost during the chunk"}, status_code=400)
    except OSError as exc:  # the core lab's disk, not the request: the client retries later
        LOG.error("upload chunk for site %s: writing failed (%s)", site, type(exc).__name__)
        return JSONResponse({"detail": "the core lab could not write the chunk (its disk): nothing of it was kept, "
                                       "send it again later"}, status_code=503)
    return JSONResponse(state.as_dict(), headers={"Upload-Offset": str(state.offset)})


@router.post("/upload/zip/{upload}/finish")
def zip_finish(upload: str, ctx: Ctx = Depends(require("site"))):
    """Start ingesting the whole zip as the site's file drop, in the background: answers 202 with
    ``state: ingesting`` (poll ``GET /upload/zip/{id}`` for the summary: stored, duplicates,
    quarantined with reasons, the series with their pages), or 200 with the summary once finished."""
    site = ""
    try:
        site, _state = _find(ctx, upload)
        status, body = upload_finish.start_finish(ctx.engine, ctx.settings, site, upload, actor=ctx.scope.user)
    except UploadError as exc:
        return _error(exc)
    except OSError as exc:  # the core lab's disk, not the zip
        LOG.error("upload finish for site %s: could not start the ingest (%s)", site, type(exc).__name__)
        return JSONResponse({"detail": upload_finish.FAILED}, status_code=503)
    headers = {"Location": f"/upload/zip/{upload}"} if status == 202 else {}
    return JSONResponse(body, status_code=status, headers=headers)
