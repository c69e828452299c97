"""STOW-RS on the portal (DICOM PS3.18 10.5): ``POST /dicomweb/studies`` and
``POST /dicomweb/studies/{study}``, for site users only.

Who sends: a site user's API token (``Authorization: Bearer clt_...``) or a portal session with
the session's ``X-CSRF-Token`` *header* (the browser upload page; the form-field token is not
taken here, a STOW body is not a form). The site is the caller's site whatever the objects'
headers claim; a user of several sites names one with ``?site=CODE``.

The body is streamed to a staging folder (:mod:`services.multipart`, :mod:`services.stow_staging`),
parsed and written in a worker thread a MiB at a time so the event loop stays free, nothing
ingested before its closing boundary has arrived. Then the caller's token or session, user and
site are checked again (a token revoked meanwhile stores nothing), and each part, one at a time
in a worker thread, goes through the store a C-STORE takes (:class:`corelab.receiver_store.Store`,
one per app); at most ``dicomweb_concurrent_ingests`` requests ingest at once. Every request,
whatever its end, is audited once. Statuses:

    200  every part stored (a duplicate or a new version counts as stored)
    202  some parts stored, others quarantined, refused or failed (FailedSOPSequence says which)
    409  no part stored
    400  malformed or truncated body, no part, invalid study UID in the URL: nothing stored
    401  no valid token or session, also when revoked or expired while the body arrived: nothing stored
    403  not a site user, or a session without the X-CSRF-Token header
    404  ``?site=`` names a site that is not the caller's
    406  an Accept the server cannot answer (it answers application/dicom+json or application/json)
    413  a part over ``max_object_bytes``, the body over ``dicomweb_max_request_bytes`` or more parts
         than ``dicomweb_max_parts``: nothing stored; at most :data:`DRAIN_BYTES` more of the body
         are read (so the client sees the answer), then the connection is closed
    415  not ``multipart/related; type="application/dicom"; boundary=...``
    503  over the staging budget (``dicomweb_staging_budget_bytes``), with Retry-After, or staging
         failed: nothing stored
    507  the body would take the disk below ``dicomweb_min_free_bytes``: nothing stored

RetrieveURLs are built from ``Settings.public_url`` (``portal_public_url``), never from the Host
header a client sent.
"""

from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from sqlmodel import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from corelab import accounts
from corelab.models import Site, User, WebSession
from corelab.receiver_store import Store
from corelab.series_completion import remove_stale_staging
from corelab.validate import is_valid_uid
from portal.security import SESSION_COOKIE, Ctx, require, sending_site
from services import stow
from services.access import scope_of
from services.multipart import MultipartStager, StowError, boundary_of
from services.stow_staging import Staging

router = APIRouter()
LOG = logging.getLogger("corelab.receiver")
ANSWERS = ("application/dicom+json", "application/json")
FLUSH_BYTES = 1 << 20       # body bytes parsed and written per worker-thread call
DRAIN_BYTES = 4 << 20       # read at most this much more of a refused body before answering
BODY_IDLE_S = 60.0          # a body that stops arriving for this long is refused (408) and its staging freed


async def _store(request: Request) -> Store:
    """The app's one Store (its striped locks must be shared by every request)."""
    state = request.app.state
    if getattr(state, "stow_store", None) is None:  # first STOW of this app: what a crash staged is garbage
        await run_in_threadpool(remove_stale_staging, state.settings)
        if getattr(state, "stow_store", None) is None:
            state.stow_store = Store(state.settings, state.engine)
            state.stow_ingests = anyio.CapacityLimiter(state.settings.dicomweb_concurrent_ingests)
    return state.stow_store


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


def _still_allowed(request: Request, ctx: Ctx, site_code: str) -> None:
    """Just before ingest: the token (or session) and user are still valid and the user still sends
    for ``site_code``; else 401/403, nothing stored. The body may have taken minutes to arrive."""
    gone = "your API token or session was revoked, expired or ended while the body arrived: nothing was stored"
    with ctx.db() as session:
        if ctx.via == "token":
            auth = request.headers.get("authorization", "")
            user = accounts.user_of_token(session, auth[7:].strip())
        else:
            key = request.cookies.get(SESSION_COOKIE, "")
            ws = session.exec(select(WebSession).where(WebSession.key_sha256 == accounts.sha256_hex(key))).first()
            user = session.get(User, ctx.user_id) if ws is not None and ws.ended_at is None else None
            user = None if user is None or user.disabled else user
        if user is None or user.id != ctx.user_id:
            raise HTTPException(401, gone, headers={"WWW-Authenticate": "Bearer"} if ctx.via == "token" else None)
        scope = scope_of(session, user)
        registered = session.exec(select(Site.id).where(Site.code == site_code)).first()
    if scope.role != "site" or site_code not in (scope.sites or ()) or registered is None:
        raise HTTPException(403, f"you no longer send for site {site_code}: nothing was stored")


def _content_length(request: Request, limit: int) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise HTTPException(400, "the Content-Length header is not a number")
    if int(raw) > limit:
        raise HTTPException(413, f"the request's {int(raw)} bytes are over the limit of {limit} bytes "
                                 "(CORELAB_DICOMWEB_MAX_REQUEST_BYTES): nothing was stored; send the study in "
                                 "several requests", headers={"Connection": "close"})
    return int(raw)


def _stage_batch(stager: MultipartStager, staging: Staging, batch: bytearray) -> None:
    stager.feed(batch)
    staging.check_floor()


async def _stage(request: Request, stager: MultipartStager, staging: Staging) -> list:
    """Read the whole body into the staging folder; the parts, or :class:`StowError`."""
    batch = bytearray()
    chunks = request.stream().__aiter__()
    try:
        while True:
            try:
                # A client that stops sending must not keep its reservation of the staging budget
                # (every site's) for as long as it keeps the connection open.
                with anyio.fail_after(BODY_IDLE_S):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise StowError(408, f"no byte of the body came for {BODY_IDLE_S:g} s: nothing was stored; send the "
                                     "whole request again", {"Connection": "close"}) from None
            if staging.declared is None:
                staging.grow(len(chunk))
            batch += chunk
            if len(batch) >= FLUSH_BYTES:
                await run_in_threadpool(_stage_batch, stager, staging, batch)
                batch = bytearray()
        await run_in_threadpool(_stage_batch, stager, staging, batch)
        return await run_in_threadpool(stager.close)
    except ClientDisconnect:
        raise StowError(400, "the client hung up before the closing boundary: nothing was stored; send the "
                             "whole request again") from None
    except OSError as exc:  # staging failed: the disk is full or unwritable, not the client's fault
        LOG.error("STOW-RS: staging failed (%s)", type(exc).__name__)
        raise StowError(503, "the core lab cannot stage the request now (disk full or unavailable): nothing "
                             "was stored; send it again later", {"Retry-After": "60"}) from None
    finally:
        await run_in_threadpool(stager.abort)


async def _drain(request: Request) -> None:
    """Read and drop at most :data:`DRAIN_BYTES` more of the body, so that a client still sending
    reads the refusal rather than a reset; the connection is then closed."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_BYTES:
                return
    except (ClientDisconnect, RuntimeError):  # RuntimeError: the stream was already consumed
        return


def _checked_request(request: Request, ctx: Ctx, study: str | None, site: str | None):
    """The checks before a byte of the body is read: ``(site id, site code, answer type, boundary,
    declared length)``, or :class:`HTTPException`."""
    if ctx.via == "session" and not request.headers.get("x-csrf-token"):
        # require() took the token from somewhere: a STOW from a browser must send the header
        raise HTTPException(403, "a STOW-RS request from a portal session must carry the X-CSRF-Token header")
    if study is not None and not is_valid_uid(study):
        raise HTTPException(400, "the study in the URL is not a DICOM UID (digits and dots, at most 64 "
                                 "characters): send to /dicomweb/studies/<StudyInstanceUID>")
    site_id, site_code = _site(ctx, site)
    media = _answer_type(request.headers.get("accept"))
    try:
        boundary = boundary_of(request.headers.get("content-type"))
    except StowError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return site_id, site_code, media, boundary, _content_length(request, ctx.settings.dicomweb_max_request_bytes)


def _audit_refused(ctx: Ctx, site: str | None, status: int) -> None:
    with ctx.db() as session:
        stow.record_request(session, actor=ctx.scope.user, site_code=site or "", outcome="refused", results=[],
                            http_status=status, received_bytes=0)


async def _receive(request: Request, ctx: Ctx, study: str | None, site: str | None):
    try:
        site_id, site_code, media, boundary, declared = await run_in_threadpool(
            _checked_request, request, ctx, study, site)
    except HTTPException as exc:  # refused before the body: audited all the same, once
        await run_in_threadpool(_audit_refused, ctx, site, exc.status_code)
        raise
    settings = ctx.settings
    store = await _store(request)
    actor, staging, stager = ctx.scope.user, None, None
    results: list[stow.PartResult] = []
    outcome, status = "refused", 500
    try:
        staging = await run_in_threadpool(Staging, settings, declared)
        stager = MultipartStager(staging.folder, boundary, max_part_bytes=settings.max_object_bytes,
                                 max_request_bytes=settings.dicomweb_max_request_bytes,
                                 max_parts=settings.dicomweb_max_parts)
        parts = await _stage(request, stager, staging)
        await run_in_threadpool(_still_allowed, request, ctx, site_code)
        # The whole body is here: ingest every part and audit them even if the client hangs up
        # meanwhile (the server cancels a disconnected request): a request is not ingested, or whole.
        with anyio.CancelScope(shield=True):
            async with request.app.state.stow_ingests:
                for part in parts:
                    held = sum(r.not_dicom and r.status == "quarantined" for r in results)
                    results.append(await run_in_threadpool(
                        stow.ingest_part, store, part, site_id=site_id, study_uid=study,
                        hold_not_dicom=held < stow.MAX_NOT_DICOM_HELD))
                    await run_in_threadpool(part.path.unlink, True)  # its disk is free for the next parts
            status, body, warnings = stow.stow_response(results, base_url=settings.public_url, study_uid=study)
            outcome = "ingested"
            LOG.info("STOW-RS for site %s by %s: %s; reasons %s", site_code, actor, stow.counts(results),
                     sorted({r.reason_code for r in results if r.reason_code}))
    except anyio.get_cancelled_exc_class():  # the client went away mid-body: nothing was ingested
        outcome, status = "client_gone", 499
        LOG.warning("STOW-RS for site %s by %s: the client hung up after %d bytes: nothing stored", site_code,
                    actor, stager.received if stager else 0)
        raise
    except HTTPException as exc:
        status = exc.status_code
        raise
    except StowError as exc:
        status = exc.status
        LOG.warning("STOW-RS for site %s by %s: refused (%d) after %d bytes, %d parts staged: nothing stored",
                    site_code, actor, exc.status, stager.received if stager else 0, len(stager.parts) if stager else 0)
        with anyio.move_on_after(BODY_IDLE_S):  # a client that stopped sending is not waited for again
            await _drain(request)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status,
                            headers={**exc.headers, "Connection": "close"})
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_finish, ctx, staging, site_code, outcome, results, status,
                                    stager.received if stager else 0)
    response = JSONResponse(body, status_code=status, media_type=media)
    for value in warnings:
        response.headers.append("Warning", value)
    return response


def _finish(ctx: Ctx, staging: Staging | None, site_code: str, outcome: str, results, status: int,
            received: int) -> None:
    """Remove the staging (its lock and reservation with it), then audit the request once."""
    try:
        if staging is not None:
            staging.close()
    finally:
        with ctx.db() as session:
            stow.record_request(session, actor=ctx.scope.user, site_code=site_code, outcome=outcome,
                                results=results if outcome == "ingested" else [], http_status=status,
                                received_bytes=received)


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
