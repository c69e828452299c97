"""DICOMweb read-only (PS3.18 QIDO-RS and WADO-RS) under ``/dicomweb``, so a standard viewer opens
what corelab holds. GET only; the STOW-RS POSTs are :mod:`portal.dicomweb_store`.

Who: a physicist (every site) and a site user (its own studies), by API token
(``Authorization: Bearer clt_...``) or a session; a trial manager and an admin are refused (403).
What each may see is :mod:`services.dicomweb_metadata` (one scope rule, :func:`services.access.restrict`):
a study, series or instance of another site answers 404, as one that does not exist. Searching is
:mod:`services.dicomweb_query`, its keys and matching :mod:`services.dicomweb_match`.

    GET /dicomweb/studies | /series | /instances                       QIDO-RS search (application/dicom+json)
    GET /dicomweb/studies/{study}/series | /instances
    GET /dicomweb/studies/{study}/series/{series}/instances
    GET /dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]          WADO-RS retrieve
    GET /dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]/metadata  WADO-RS metadata

Retrieve answers ``multipart/related; type="application/dicom"``, streamed part by part from the
spool files (1 MiB reads; never a whole series in memory), each part the stored file's bytes as
received, labelled with its transfer syntax. corelab does not transcode: Accept must allow the
stored syntax (``transfer-syntax=*``, the stored one, or no parameter when it is Explicit VR Little
Endian, the standard's default); otherwise 406 saying what to ask for.

A spool file that is missing or not its indexed size is found before an answer starts: every file
of a retrieve or a metadata request is checked first, and a search reads the headers it needs
before it answers. Either way the answer is a JSON 500 naming the series and the fix, never a
200 cut short.

Audit: one event ``dicomweb.retrieve`` per study or series retrieve (who, which UID, how many
instances and bytes), when the answer starts. Searches, metadata and single-instance retrieves are
not audited: a viewer issues them by the hundred while it browses, as the JSON API's reads are not.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from corelab import audit
from portal.security import Ctx, require
from services import dicomweb_metadata as dm
from services import dicomweb_query as dq
from services.dicomweb_match import DicomwebError, check_uid, parse_query

LOG = logging.getLogger("corelab.portal")
router = APIRouter(prefix="/dicomweb")
READERS = ("site", "physicist")
CHUNK_BYTES = 1 << 20
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DICOM_JSON = "application/dicom+json"
_JSON_TYPES = ("*/*", "application/*", DICOM_JSON, "application/json")
# PS3.18 8.3.4.1: a fuzzymatching request a server does not support is answered with this warning.
FUZZY_WARNING = '299 corelab "fuzzymatching not supported: only literal, case-sensitive matching was performed"'


def _error(exc: DicomwebError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    """The media ranges of an Accept header with their parameters (quoted values unquoted; q=0 dropped)."""
    out = []
    for item in re.findall(r'(?:[^,"]|"[^"]*")+', accept):
        fields = re.findall(r'(?:[^;"]|"[^"]*")+', item)
        if not fields or not fields[0].strip():
            continue
        params = {}
        for f in fields[1:]:
            name, _, value = f.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        if params.get("q", "1").strip() in ("0", "0.0", "0.00", "0.000"):
            continue
        out.append((fields[0].strip().lower(), params))
    return out


def _check_json_accept(request: Request) -> None:
    accept = request.headers.get("accept", "")
    if accept and not any(media in _JSON_TYPES for media, _ in _media_ranges(accept)):
        raise DicomwebError(406, f"this resource is {DICOM_JSON}: send Accept: {DICOM_JSON}")


def _syntax_rule(accept: str) -> tuple[bool, set[str]]:
    """(any syntax will do, the syntaxes asked for) from an Accept header for a retrieve."""
    if not accept:
        return True, set()
    wanted: set[str] = set()
    for media, params in _media_ranges(accept):
        if media in ("*/*", "multipart/*"):
            return True, set()
        if media == "multipart/related" and params.get("type", "application/dicom").lower() in (
                "application/dicom", "application/*", "*/*"):
            syntax = params.get("transfer-syntax", EXPLICIT_VR_LE)
            if syntax == "*":
                return True, set()
            wanted.add(syntax)
    return False, wanted


def _path_uids(study: str, series: str | None = None, instance: str | None = None) -> tuple:
    return (check_uid(study, "the study UID in the path"),
            series and check_uid(series, "the series UID in the path"),
            instance and check_uid(instance, "the instance UID in the path"))


def _retrieve(ctx: Ctx, request: Request, what: str, study: str, series: str | None = None,
              instance: str | None = None):
    try:
        any_syntax, wanted = _syntax_rule(request.headers.get("accept", ""))
        if not any_syntax and not wanted:  # decided before the look-up: it tells nothing of what exists
            raise DicomwebError(406, 'this resource is multipart/related; type="application/dicom": ask for it, '
                                     "with transfer-syntax=* to get the objects as stored")
        with ctx.db() as s:
            rows = dm.instances(s, ctx.scope, *_path_uids(study, series, instance))
            files = dm.check_spool_files(s, ctx.settings, rows)  # before the answer starts: never a cut body
            if not any_syntax:
                stored = {dm.transfer_syntax(p) for p in files}
                if not stored <= wanted:
                    raise DicomwebError(406, "corelab sends objects as they were received (it does not "
                                             f"transcode), here in {', '.join(sorted(stored))}: ask for "
                                             'multipart/related; type="application/dicom"; transfer-syntax=* '
                                             "or one of those")
            if what in ("study", "series"):
                audit.append(s, actor=ctx.scope.user, action="dicomweb.retrieve", entity=what,
                             entity_id=series if what == "series" else study,
                             detail={"instances": len(rows), "bytes": sum(i.size_bytes for i in rows),
                                     "via": ctx.via})
    except DicomwebError as exc:
        return _error(exc)
    boundary = secrets.token_hex(16)
    return StreamingResponse(_multipart(files, boundary), status_code=200,
                             media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


def _multipart(files: list[Path], boundary: str) -> Iterator[bytes]:
    """The multipart body, one part per file, read in :data:`CHUNK_BYTES` pieces."""
    marker = f"--{boundary}".encode()
    for i, path in enumerate(files):
        head = (b"\r\n" if i else b"") + marker + (
            f"\r\nContent-Type: application/dicom; transfer-syntax={dm.transfer_syntax(path)}\r\n\r\n").encode()
        yield head
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk
    yield b"\r\n" + marker + b"--\r\n"


def _metadata(ctx: Ctx, request: Request, study: str, series: str | None = None, instance: str | None = None):
    try:
        _check_json_accept(request)
        with ctx.db() as s:
            rows = dm.instances(s, ctx.scope, *_path_uids(study, series, instance))
            paths = dm.check_spool_files(s, ctx.settings, rows)  # before the answer starts: never a cut body
            row_ids = [inst.id for inst in rows]
    except DicomwebError as exc:
        return _error(exc)

    def body() -> Iterator[bytes]:  # one header at a time: a study of thousands of slices stays small
        yield b"["
        for i, (path, row_id) in enumerate(zip(paths, row_ids)):
            try:
                item = dm.metadata(path)
            except Exception:  # whole-sized but unreadable: too late for a status, so told in the log
                LOG.error("dicomweb: metadata cut short: the spool file of instance row %s is not readable", row_id)
                raise
            yield (b"," if i else b"") + json.dumps(item).encode()
        yield b"]"

    return StreamingResponse(body(), media_type=DICOM_JSON)


def _search(ctx: Ctx, request: Request, level: str, study: str | None = None, series: str | None = None):
    try:
        _check_json_accept(request)
        if study is not None:
            _path_uids(study, series)
        query = parse_query(list(request.query_params.multi_items()), level)
        base = ctx.settings.public_url + router.prefix  # never the Host header a client sent
        with ctx.db() as s:
            found = dq.search(s, ctx.settings, ctx.scope, query, base_url=base, study_uid=study, series_uid=series)
    except DicomwebError as exc:
        return _error(exc)
    # No match is 200 and [] (PS3.18 as amended by CP-2473), not 204.
    return JSONResponse(found, media_type=DICOM_JSON, headers={"Warning": FUZZY_WARNING} if query.fuzzy else None)


# --- QIDO-RS ----------------------------------------------------------------------------------------

@router.get("/studies")
def search_studies(request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _search(ctx, request, "study")


@router.get("/series")
def search_all_series(request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _search(ctx, request, "series")


@router.get("/instances")
def search_all_instances(request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _search(ctx, request, "instance")


@router.get("/studies/{study}/series")
def search_study_series(study: str, request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _search(ctx, request, "series", study)


@router.get("/studies/{study}/instances")
def search_study_instances(study: str, request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _search(ctx, request, "instance", study)


@router.get("/studies/{study}/series/{series}/instances")
def search_series_instances(study: str, series: str, request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _search(ctx, request, "instance", study, series)


# --- WADO-RS ----------------------------------------------------------------------------------------

@router.get("/studies/{study}")
def retrieve_study(study: str, request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _retrieve(ctx, request, "study", study)


@router.get("/studies/{study}/series/{series}")
def retrieve_series(study: str, series: str, request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _retrieve(ctx, request, "series", study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(study: str, series: str, instance: str, request: Request,
                      ctx: Ctx = Depends(require(*READERS))):
    return _retrieve(ctx, request, "instance", study, series, instance)


@router.get("/studies/{study}/metadata")
def study_metadata(study: str, request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _metadata(ctx, request, study)


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(study: str, series: str, request: Request, ctx: Ctx = Depends(require(*READERS))):
    return _metadata(ctx, request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def instance_metadata(study: str, series: str, instance: str, request: Request,
                      ctx: Ctx = Depends(require(*READERS))):
    return _metadata(ctx, request, study, series, instance)
