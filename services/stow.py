"""STOW-RS (DICOM PS3.18 10.5, Store Transaction): a site's multipart/related body, staged part by
part on disk, then each part through the store every received object takes.

The portal (:mod:`portal.dicomweb_store`) owns the HTTP side; this module owns the rest, so a
command or a flow could stage and ingest a body the same way:

1. :func:`boundary_of` checks the request's Content-Type (``multipart/related;
   type="application/dicom"; boundary=...``, the boundary per RFC 2046) or raises
   :class:`StowError` 415 saying what to send.
2. :class:`MultipartStager` takes the body chunk by chunk and writes each part to its own file
   in a per-request staging folder (``<data dir>/incoming/stow/<pid>-<hex>``, mode 0700); it
   holds at most one chunk plus a delimiter's length in memory, and counts every byte against
   the per-part (``max_object_bytes``) and per-request (``dicomweb_max_request_bytes``) limits
   (413). :meth:`MultipartStager.close` raises 400 unless the closing delimiter arrived: a
   truncated body stores nothing.
3. :func:`ingest_part` reads one staged part and hands it to
   :meth:`corelab.receiver_store.Store.accept` (de-identification check, quarantine with its
   reason, duplicate, new version), exactly as a C-STORE is.
4. :func:`stow_response` builds the PS3.18 Table 10.5.3-1 answer and :func:`record_request`
   its audit event.

What a part that is not a DICOM object means
--------------------------------------------
A part declared ``application/dicom`` whose bytes are not a readable, valid, de-identified object
is quarantined with its reason, as the DICOM node and the file drop do (the physicist sees it and
may release it; a resend of the same bytes changes nothing). A part declared as anything else
(metadata in ``application/dicom+json``, an image, text) is *refused*: not stored, not held. It
is not a claim to be an instance, this server accepts no metadata-and-bulk-data requests, and
holding whatever a client attaches would let any token fill the quarantine with non-DICOM files.
Both are listed in FailedSOPSequence with their reason.

Where a client reads the reasons
--------------------------------
Each FailedSOPSequence item carries FailureReason (0008,1197) and, as a private element, the
human-readable reason: private creator ``CORELAB`` at (0009,0010) and the reason, an LT, at
(0009,1001). Every item that is not a plain success also gives an HTTP ``Warning: 299`` header
(PS3.18 8.7.7 allows them), first :data:`MAX_WARNINGS` of them. A reason names the part by its
ordinal and sha256 prefix, the rule and the fix, never a header value, and starts with what
happened and the reason code: ``quarantined (deid_failed): object #2 (sha256 ...): ...``,
``refused (not_application_dicom): part #3: ...``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlmodel import Session

from corelab import audit
from corelab.dicom_handlers import is_resource_failure
from corelab.receiver_store import Store
from corelab.settings import Settings
from corelab.validate import is_valid_uid

# The node's one logger: operators and tests filter on it, and it never carries a header value.
LOG = logging.getLogger("corelab.receiver")

# RFC 2046 5.1.1: 1-70 characters, the last not a space.
BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_PARAM_RE = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;"\s]*)\s*')
MAX_PART_HEADER_BYTES = 16 * 1024   # one part's header block
MAX_PARTS = 100_000                 # files in one staging folder
MAX_WARNINGS = 20

# PS3.18 Table 10.5.3-2 / PS3.4 C-STORE failure reasons
OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0xA700, 0xA900, 0xC000
PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED = 0x0110, 0x0122
FAILURE_OF_REASON = {"too_large": OUT_OF_RESOURCES, "zip_bomb": OUT_OF_RESOURCES,
                     "unknown_sop_class": SOP_CLASS_NOT_SUPPORTED,
                     **dict.fromkeys(("not_dicom", "truncated", "unreadable", "wrong_vr", "bad_pixel_data",
                                      "invalid_uid", "missing_uid"), CANNOT_UNDERSTAND)}
STORED = ("stored", "duplicate", "new_version")


class StowError(Exception):
    """A request this server cannot take as a whole: ``status`` and a message saying what to send."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- the request's media type ---------------------------------------------------------------------

def boundary_of(content_type: str | None) -> str:
    """The multipart boundary of a STOW-RS request's Content-Type, or :class:`StowError` 415.

    Accepted: ``multipart/related; type="application/dicom"; boundary=B`` (parameters in any
    order, ``type`` quoted or not, names case-insensitive), B a boundary as RFC 2046 defines it.
    """
    want = ('send Content-Type: multipart/related; type="application/dicom"; boundary=<1-70 characters of '
            "RFC 2046>, one DICOM PS3.10 object per part")
    value = (content_type or "").strip()
    media, _, rest = value.partition(";")
    if media.strip().lower() != "multipart/related":
        raise StowError(415, f"this is not a multipart/related request: {want}")
    params: dict[str, str] = {}
    rest = ";" + rest if rest else ""
    pos = 0
    while pos < len(rest):
        found = _PARAM_RE.match(rest, pos)
        if found is None:
            raise StowError(415, f"the Content-Type's parameters cannot be read: {want}")
        name, raw = found.group(1).lower(), found.group(2)
        if name in params:
            raise StowError(415, f"the Content-Type names {name!r} twice: {want}")
        params[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        pos = found.end()
    if params.get("type", "").lower() != "application/dicom":
        raise StowError(415, "only parts of type application/dicom are accepted (no metadata and bulk data "
                             f"requests): {want}")
    boundary = params.get("boundary", "")
    if not BOUNDARY_RE.fullmatch(boundary):
        raise StowError(415, f"the multipart boundary is missing or not valid per RFC 2046: {want}")
    return boundary


# --- staging the body -------------------------------------------------------------------------------

def new_staging_dir(settings: Settings) -> Path:
    """A fresh folder for one request, readable by this user only; named ``<pid>-<hex>`` so that
    :func:`corelab.series_completion.remove_stale_staging` can tell a dead request's folder."""
    root = settings.stow_staging_dir
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    folder = root / f"{os.getpid()}-{secrets.token_hex(8)}"
    folder.mkdir(mode=0o700)
    return folder


@dataclass(frozen=True)
class Part:
    """One staged part: its number in the request (1, 2, ...), file, media type and size."""

    ordinal: int
    path: Path
    media_type: str
    size: int


class MultipartStager:
    """Parse a multipart body incrementally (RFC 2046), one file per part under ``folder``.

    Feed it the body's chunks in order (:meth:`feed`), then :meth:`close`. Memory: the chunk
    being parsed plus at most one delimiter (or one part's headers, :data:`MAX_PART_HEADER_BYTES`).
    """

    def __init__(self, folder: Path, boundary: str, *, max_part_bytes: int, max_request_bytes: int):
        self.folder, self.max_part_bytes, self.max_request_bytes = folder, max_part_bytes, max_request_bytes
        self.delimiter = b"\r\n--" + boundary.encode("ascii")
        # The first delimiter may open the body without a CRLF before it: pretend there was one.
        self._buf = bytearray(b"\r\n")
        self._state = "preamble"  # preamble | boundary_line | headers | body | done
        self._file = None
        self._part_size = 0
        self.received = 0
        self.parts: list[Part] = []

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_request_bytes:
            raise StowError(413, f"the request is over the limit of {self.max_request_bytes} bytes "
                                 "(CORELAB_DICOMWEB_MAX_REQUEST_BYTES): nothing was stored; send the study in "
                                 "several requests")
        if self._state == "done":
            return  # the epilogue: ignored
        self._buf += chunk
        while self._step():
            pass

    def _step(self) -> bool:
        """One parser transition; False when more bytes are needed."""
        buf, keep = self._buf, len(self.delimiter) - 1
        if self._state in ("preamble", "body"):
            at = buf.find(self.delimiter)
            end = at if at >= 0 else max(0, len(buf) - keep)
            if self._state == "body":
                self._write(end)
            del buf[:end]
            if at < 0:
                return False
            del buf[:len(self.delimiter)]
            self._end_part()
            self._state = "boundary_line"
            return True
        if self._state == "boundary_line":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "done"
                buf.clear()
                return False
            eol = buf.find(b"\r\n")
            if eol < 0 or buf[:eol].strip(b" \t"):
                if eol >= 0 or len(buf) > 256:
                    raise StowError(400, "a line starting with the boundary delimiter is not a boundary (the "
                                         "boundary occurs inside a part, or the body is malformed): nothing "
                                         "was stored; use a boundary that occurs in no part")
                return False
            del buf[:eol + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            end = 0 if buf[:2] == b"\r\n" else buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_PART_HEADER_BYTES:
                    raise StowError(400, f"part #{len(self.parts) + 1}: its headers are longer than "
                                         f"{MAX_PART_HEADER_BYTES} bytes: nothing was stored")
                return False
            media = _part_media_type(bytes(buf[:end]), len(self.parts) + 1)
            del buf[:end + (2 if end == 0 else 4)]
            self._start_part(media)
            self._state = "body"
            return True
        return False

    def _start_part(self, media_type: str) -> None:
        ordinal = len(self.parts) + 1
        if ordinal > MAX_PARTS:
            raise StowError(413, f"more than {MAX_PARTS} parts in one request: nothing was stored; send the "
                                 "study in several requests")
        path = self.folder / f"{ordinal:06d}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._part_size = 0
        self.parts.append(Part(ordinal, path, media_type, 0))

    def _write(self, n: int) -> None:
        if n <= 0:
            return
        self._part_size += n
        if self._part_size > self.max_part_bytes:
            raise StowError(413, f"part #{len(self.parts)} is over the limit of {self.max_part_bytes} bytes per "
                                 "object (CORELAB_MAX_OBJECT_BYTES): nothing was stored; send one image per "
                                 "object or ask the core lab to raise the limit")
        with memoryview(self._buf) as view:
            self._file.write(view[:n])

    def _end_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            last = self.parts[-1]
            self.parts[-1] = Part(last.ordinal, last.path, last.media_type, self._part_size)

    def abort(self) -> None:
        """Close the part being written (the caller then removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[Part]:
        """The staged parts, once the closing delimiter arrived; else :class:`StowError` 400."""
        self.abort()
        if self._state != "done":
            raise StowError(400, "the body ended before its closing boundary (truncated, or the client hung up): "
                                 "nothing was stored; send the whole request again")
        if not self.parts:
            raise StowError(400, "the request holds no part: nothing was stored; send one DICOM object per part")
        return self.parts


def _part_media_type(block: bytes, ordinal: int) -> str:
    """The part's Content-Type media type, lower case ("" when absent); other headers are ignored."""
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise StowError(400, f"part #{ordinal}: its headers are not ASCII: nothing was stored") from None
    media = ""
    for line in text.split("\r\n") if text else ():
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise StowError(400, f"part #{ordinal}: a header line is malformed: nothing was stored")
        if name.lower() == "content-type":
            media = value.split(";", 1)[0].strip().lower()
    return media


def remove_staging(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# --- ingest, one part at a time ---------------------------------------------------------------------

@dataclass(frozen=True)
class PartResult:
    """What became of one part. ``status``: stored, duplicate, new_version, quarantined, refused or
    failed (the store could not take it; nothing held). UIDs only when they are valid UIDs."""

    ordinal: int
    status: str
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    reason_code: str = ""
    reason: str = ""
    failure: int = 0


def _uids(data: bytes) -> dict[str, str]:
    """The object's UIDs, when it can be read at all and each is a valid UID (else "")."""
    keys = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(keys))
        found = {k: str(ds.get(k, "") or "") for k in keys}
    except Exception:  # noqa: BLE001  unreadable: ingest quarantines it with the reason
        return dict.fromkeys(keys, "")
    return {k: (v if is_valid_uid(v) else "") for k, v in found.items()}


def as_part10(data: bytes) -> bytes:
    """The part as a PS3.10 file: a part that starts with its File Meta Information group but lacks
    the 128-byte preamble and ``DICM`` gets them. pydicom (and so dicomweb-client) writes a dataset
    built in memory that way; its file meta still names the transfer syntax, so nothing is guessed.
    Anything else is left as sent, for ingest to judge."""
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00" and data[4:6].isalpha() and data[4:6].isupper():
        return b"\0" * 128 + b"DICM" + data
    return data


def ingest_part(store: Store, part: Part, *, site_id: int, study_uid: str | None = None) -> PartResult:
    """Store (or quarantine, or refuse) one staged part; never raises for a bad part.

    ``study_uid``: the study the request's URL named; an object of another study is refused
    (FailureReason 0xA900) and not held, since sending it to the right URL fixes it.
    """
    n = part.ordinal
    if part.media_type != "application/dicom":
        return PartResult(n, "refused", reason_code="not_application_dicom", failure=CANNOT_UNDERSTAND,
                          reason=f"refused (not_application_dicom): part #{n}: its Content-Type is not "
                                 "application/dicom: not stored and not held; send each instance as one "
                                 "application/dicom part (a DICOM PS3.10 file)")
    data = as_part10(part.path.read_bytes())
    uids = _uids(data)
    ids = {"sop_class_uid": uids["SOPClassUID"], "sop_instance_uid": uids["SOPInstanceUID"],
           "study_uid": uids["StudyInstanceUID"], "series_uid": uids["SeriesInstanceUID"]}
    if study_uid and uids["StudyInstanceUID"] and uids["StudyInstanceUID"] != study_uid:
        return PartResult(n, "refused", **ids, reason_code="study_mismatch", failure=DOES_NOT_MATCH,
                          reason=f"refused (study_mismatch): part #{n}: its StudyInstanceUID is not the study of "
                                 "the request's URL: not stored and not held; send it to /dicomweb/studies or to "
                                 "its own study's URL")
    try:
        outcome = store.accept(data, sop_instance_uid=uids["SOPInstanceUID"], site_id=site_id, source="stow-rs",
                               ordinal=n)
    except Exception as exc:  # the store failed, not the object: nothing was kept, the client resends
        resource = is_resource_failure(exc)
        if not resource:
            LOG.exception("STOW-RS part #%d: neither stored nor quarantined (%s): a bug", n, type(exc).__name__)
        return PartResult(n, "failed", **ids, reason_code="store_unavailable",
                          failure=OUT_OF_RESOURCES if resource else PROCESSING_FAILURE,
                          reason=f"failed (store_unavailable): part #{n}: not stored: the core lab's store failed "
                                 f"({type(exc).__name__}); send it again later")
    if outcome.status == "new_version":
        return PartResult(n, outcome.status, **ids,
                          reason=f"stored (new_version): {outcome.source}: same SOP Instance UID as a stored "
                                 "instance with other bytes: kept as a new version, flagged for the core lab's review")
    if outcome.status in STORED:
        return PartResult(n, outcome.status, **ids)
    code = outcome.reason_code or ""
    return PartResult(n, "quarantined", **ids, reason_code=code, reason=f"quarantined ({code}): {outcome.reason}",
                      failure=FAILURE_OF_REASON.get(code, DOES_NOT_MATCH))


# --- the answer and the audit -----------------------------------------------------------------------

def _element(vr: str, value) -> dict:
    return {"vr": vr, "Value": [value]}


def stow_response(results: list[PartResult], *, base_url: str, study_uid: str | None) -> tuple[int, dict, list[str]]:
    """``(HTTP status, DICOM JSON body, Warning header values)`` of PS3.18 10.5.3.

    200 when every part was stored (a duplicate or a new version counts as stored), 202 when some
    were not, 409 when none was. ``base_url``: the portal's URL, without the trailing slash.
    """
    stored = [r for r in results if r.status in STORED]
    failed = [r for r in results if r.status not in STORED]
    body: dict = {}
    studies = {study_uid} if study_uid else {r.study_uid for r in stored}
    if len(studies) == 1 and "" not in studies:
        body["00081190"] = _element("UR", f"{base_url}/dicomweb/studies/{next(iter(studies))}")
    if stored:
        items = []
        for r in stored:
            items.append({"00081150": _element("UI", r.sop_class_uid), "00081155": _element("UI", r.sop_instance_uid),
                          "00081190": _element("UR", f"{base_url}/dicomweb/studies/{r.study_uid}/series/"
                                                     f"{r.series_uid}/instances/{r.sop_instance_uid}")})
        body["00081199"] = {"vr": "SQ", "Value": items}
    if failed:
        items = []
        for r in failed:
            item = {"00081197": _element("US", r.failure), "00090010": _element("LO", "CORELAB"),
                    "00091001": _element("LT", r.reason)}
            if r.sop_class_uid:
                item["00081150"] = _element("UI", r.sop_class_uid)
            if r.sop_instance_uid:
                item["00081155"] = _element("UI", r.sop_instance_uid)
            items.append(item)
        body["00081198"] = {"vr": "SQ", "Value": items}
    noted = [r for r in results if r.reason]
    warnings = [warning_header(r.reason) for r in noted[:MAX_WARNINGS]]
    if len(noted) > MAX_WARNINGS:
        warnings.append(warning_header(f"{len(noted) - MAX_WARNINGS} more parts were not stored as sent: see "
                                       "FailedSOPSequence"))
    status = 200 if not failed else (202 if stored else 409)
    return status, body, warnings


def warning_header(text: str) -> str:
    """An RFC 7234 Warning value (299, miscellaneous persistent warning), ASCII and quoted."""
    clean = text.encode("ascii", "replace").decode().replace("\\", "/").replace('"', "'")
    return f'299 corelab "{"".join(c if " " <= c <= "~" else " " for c in clean)}"'


def counts(results: list[PartResult]) -> dict[str, int]:
    keys = ("stored", "duplicate", "new_version", "quarantined", "refused", "failed")
    return {"parts": len(results), **{k: sum(r.status == k for r in results) for k in keys}}


def record_request(session: Session, *, actor: str, site_code: str, outcome: str, results: list[PartResult],
                   http_status: int, received_bytes: int) -> None:
    """One audit event per request: who, for which site, what became of its parts (counts and
    reason codes; UIDs and values are not recorded)."""
    codes = sorted({r.reason_code for r in results if r.reason_code})
    audit.append(session, actor=actor, action="dicomweb.stow", entity="site", entity_id=site_code,
                 detail={"outcome": outcome, "http_status": http_status, "bytes": received_bytes,
                         **counts(results), "reason_codes": codes})


__all__ = ["MultipartStager", "Part", "PartResult", "StowError", "boundary_of", "counts", "ingest_part",
           "new_staging_dir", "record_request", "remove_staging", "stow_response", "warning_header"]
