"""STOW-RS on the portal (DICOM PS3.18 10.5): ``POST /dicomweb/studies`` and
``POST /dicomweb/studies/{study}``, for site users only.

Who sends: a site user's API token (``Authorization: Bearer clt_...``) or a portal session with
the session's ``X-CSRF-Token`` *header* (the browser upload page; the form-field token is not
taken here, a STOW body is not a form). The site is the caller's site whatever the objects'
headers claim; a user of several sites names one with ``?site=CODE``.

The body is streamed to a staging folder (:mod:`services.stow`), nothing ingested before its
closing boundary has arrived; then each part, one at a time in a worker thread, goes through the
store a C-STORE takes (:class:`corelab.receiver_store.Store`, one per app). Statuses:

    200  every part stored (a duplicate or a new version counts as stored)
    202  some parts stored, others quarantined, refused or failed (FailedSOPSequence says which)
    409  no part stored
    400  malformed or truncated body, no part, invalid study UID in the URL: nothing stored
    403  not a site user, or a session without the X-CSRF-Token header
    404  ``?site=`` names a site that is not the caller's
    406  an Accept the server cannot answer (it answers application/dicom+json or application/json)
    413  a part over ``max_object_bytes`` or the body over ``dicomweb_max_request_bytes``: nothing stored
    415  not ``multipart/related; type="application/dicom"; boundary=...``
"""

from __future__ import annotations

import logging

import anyio

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from sqlmodel import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from corelab.models import Site
from corelab.receiver_store import Store
from corelab.series_completion import remove_stale_staging
from corelab.validate import is_valid_uid
from portal.security import Ctx, require, sending_site
from services import stow
from services.stow import StowError

router = APIRouter()
LOG = logging.getLogger("corelab.receiver")
ANSWERS = ("application/dicom+json", "application/json")


def _store(request: Request) -> Store:
    """The app's one Store (its striped locks must be shared by every request)."""
    store = getattr(request.app.state, "stow_store", None)
    if store is None:  # first STOW of this app: what a crashed process staged is garbage now
        remove_stale_staging(request.app.state.settings)
        store = request.app.state.stow_store = Store(request.app.state.settings, request.app.state.engine)
    return store


def _answer_type(accept: str | None) -> str:
    """The response's media type from the Accept header (406 when it allows neither)."""
    if not accept or not accept.strip():
        return ANSWERS[0]
    offered = [r.split(";", 1)[0].strip().lower() for r in accept.split(",")]
    for media in offered:
        if media in ANSWERS:
            return media
        if media in ("*/*", "application/*"):
            return ANSWERS[0]
    raise HTTPException(406, "this server answers a STOW-RS request with application/dicom+json (or "
                             "application/json): send Accept: application/dicom+json")


def _site(ctx: Ctx, asked: str | None) -> tuple[int, str]:
    """``(site id, code)`` the caller sends for: ``asked`` if it is theirs, else their only site."""
    code = sending_site(ctx, asked)
    with ctx.db() as session:
        site_id = session.exec(select(Site.id).where(Site.code == code)).first()
    if site_id is None:
        raise HTTPException(409, f"site {code} is not in the core lab's site register: ask the core lab to "
                                 "register it")
    return site_id, code


def _content_length(request: Request, limit: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return
    if not raw.isdigit():
        raise HTTPException(400, "the Content-Length header is not a number")
    if int(raw) > limit:
        raise HTTPException(413, f"the request's {int(raw)} bytes are over the limit of {limit} bytes "
                                 "(CORELAB_DICOMWEB_MAX_REQUEST_BYTES): nothing was stored; send the study in "
                                 "several requests")


async def _drain(request: Request, stager: stow.MultipartStager) -> None:
    """Read and drop the rest of the body (up to the request limit), so the client, still sending,
    reads the 413 rather than a broken connection."""
    try:
        async for chunk in request.stream():
            stager.received += len(chunk)
            if stager.received > stager.max_request_bytes:
                return
    except ClientDisconnect:
        return


async def _receive(request: Request, ctx: Ctx, study: str | None, site: str | None):
    if ctx.via == "session" and not request.headers.get("x-csrf-token"):
        # require() took the token from somewhere: a STOW from a browser must send the header
        raise HTTPException(403, "a STOW-RS request from a portal session must carry the X-CSRF-Token header")
    if study is not None and not is_valid_uid(study):
        raise HTTPException(400, "the study in the URL is not a DICOM UID (digits and dots, at most 64 "
                                 "characters): send to /dicomweb/studies/<StudyInstanceUID>")
    site_id, site_code = _site(ctx, site)
    media = _answer_type(request.headers.get("accept"))
    settings = ctx.settings
    try:
        boundary = stow.boundary_of(request.headers.get("content-type"))
    except StowError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    _content_length(request, settings.dicomweb_max_request_bytes)
    store = _store(request)
    folder = stow.new_staging_dir(settings)
    stager = stow.MultipartStager(folder, boundary, max_part_bytes=settings.max_object_bytes,
                                  max_request_bytes=settings.dicomweb_max_request_bytes)
    results: list[stow.PartResult] = []
    actor = ctx.scope.user
    try:
        try:
            async for chunk in request.stream():
                stager.feed(chunk)
            parts = stager.close()
        except ClientDisconnect:
            stager.abort()
            raise StowError(400, "the client hung up before the closing boundary: nothing was stored; send the "
                                 "whole request again") from None
        except OSError as exc:  # staging failed: the disk is full or unwritable, not the client's fault
            stager.abort()
            LOG.error("STOW-RS for site %s: staging failed (%s)", site_code, type(exc).__name__)
            raise StowError(503, "the core lab cannot stage the request now (disk full or unavailable): nothing "
                                 "was stored; send it again later") from None
        except StowError as exc:
            stager.abort()
            if exc.status == 413 and stager.received <= stager.max_request_bytes:
                await _drain(request, stager)
            raise
        # The whole body is here: ingest every part and audit them even if the client hangs up
        # meanwhile (the server cancels a disconnected request): a request is not ingested, or whole.
        with anyio.CancelScope(shield=True):
            for part in parts:
                results.append(await run_in_threadpool(stow.ingest_part, store, part, site_id=site_id,
                                                       study_uid=study))
                part.path.unlink(missing_ok=True)  # ingested: the disk it held is free for the next parts
            status, body, warnings = stow.stow_response(results, base_url=str(request.base_url).rstrip("/"),
                                                        study_uid=study)
            LOG.info("STOW-RS for site %s by %s: %s; reasons %s", site_code, actor, stow.counts(results),
                     sorted({r.reason_code for r in results if r.reason_code}))
            await run_in_threadpool(_audit, ctx, site_code, "ingested", results, status, stager.received)
    except anyio.get_cancelled_exc_class():  # the client went away mid-body: nothing was ingested
        with anyio.CancelScope(shield=True):
            LOG.warning("STOW-RS for site %s by %s: the client hung up after %d bytes: nothing stored", site_code,
                        actor, stager.received)
            await run_in_threadpool(_audit, ctx, site_code, "client_gone", [], 499, stager.received)
        raise
    except StowError as exc:
        LOG.warning("STOW-RS for site %s by %s: refused (%d) after %d bytes, %d parts staged: nothing stored",
                    site_code, actor, exc.status, stager.received, len(stager.parts))
        await run_in_threadpool(_audit, ctx, site_code, "refused", [], exc.status, stager.received)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)
    finally:
        stager.abort()
        stow.remove_staging(folder)
    response = JSONResponse(body, status_code=status, media_type=media)
    for value in warnings:
        response.headers.append("Warning", value)
    return response


def _audit(ctx: Ctx, site_code: str, outcome: str, results, status: int, received: int) -> None:
    with ctx.db() as session:
        stow.record_request(session, actor=ctx.scope.user, site_code=site_code, outcome=outcome, results=results,
                            http_status=status, received_bytes=received)


@router.post("/dicomweb/studies")
async def store_instances(request: Request, site: str | None = None, ctx: Ctx = Depends(require("site"))):
    """STOW-RS: store the instances of any studies (PS3.18 10.5)."""
    return await _json_errors(_receive(request, ctx, None, site))


@router.post("/dicomweb/studies/{study}")
async def store_study_instances(request: Request, study: str, site: str | None = None,
                                ctx: Ctx = Depends(require("site"))):
    """STOW-RS to one study: an instance of another study is refused (FailureReason 0xA900)."""
    return await _json_errors(_receive(request, ctx, study, site))


async def _json_errors(receiving):
    """A refusal as JSON ``{"detail": ...}`` whatever the Accept header (the app's error page is HTML
    unless the client asks for application/json, and a DICOMweb client asks for dicom+json)."""
    try:
        return await receiving
    except HTTPException as exc:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
