"""STOW-RS (DICOM PS3.18 10.5, Store Transaction): a site's multipart/related body, staged part by
part on disk, then each part through the store every received object takes.

The portal (:mod:`portal.dicomweb_store`) owns the HTTP side; this module owns the rest, so a
command or a flow could stage and ingest a body the same way:

1. :mod:`services.multipart` checks the request's Content-Type and parses the body as it
   arrives, one file per part (limits: 413; a truncated body: 400, nothing stored).
2. :mod:`services.stow_staging` holds the request's staging folder (locked while in use) and
   counts its bytes against the process's staging budget (503) and the disk's floor (507).
3. :func:`ingest_part` reads one staged part and hands it to
   :meth:`corelab.receiver_store.Store.accept` (de-identification check, quarantine with its
   reason, duplicate, new version), exactly as a C-STORE is.
4. :func:`stow_response` builds the PS3.18 Table 10.5.3-1 answer and :func:`record_request`
   its audit event.

What a part that is not a DICOM object means
--------------------------------------------
A part declared ``application/dicom`` whose bytes are not a readable, valid, de-identified object
is quarantined with its reason, as the DICOM node and the file drop do (the physicist sees it and
may release it; a resend of the same bytes changes nothing). Two bounds keep a token from filling
the quarantine: a part under :data:`MIN_PART_BYTES` cannot be a DICOM object and is refused
(``too_small``), and of the parts that are no DICOM file at all (no ``DICM`` marker, or none of
the object's UIDs readable) only the first :data:`MAX_NOT_DICOM_HELD` of a request are held, the
others refused (``not_dicom``). A part declared as anything else
(metadata in ``application/dicom+json``, an image, text) is *refused*: not stored, not held. It
is not a claim to be an instance, this server accepts no metadata-and-bulk-data requests, and
holding whatever a client attaches would let any token fill the quarantine with non-DICOM files.
Both are listed in FailedSOPSequence with their reason.

FailureReason codes (PS3.18 Table I.2-2, PS3.4 GG.4-1)
--------------------------------------------------------
0xA700 out of resources (the store failed: disk, database; or ``too_large``/``zip_bomb``), 0x0110
processing failure (a fault of this server), 0x0122 SOP class not supported, 0xC000 cannot
understand (the bytes are not a readable, valid object). The standard lets a server add codes;
corelab uses its own in the 0xCxxx "cannot understand" range, so that a generic client still
reads "cannot understand" and none says "does not match SOP class", which is not what happened:
0xC001 ``deid_failed`` (identifying values), 0xC002 ``uid_conflict`` (UIDs of another site's
data), 0xC003 ``unknown_site``, 0xC004 ``study_mismatch`` (not the study of the URL). Every
failed item carries ReferencedSOPClassUID and ReferencedSOPInstanceUID (Type 1 in PS3.18 Table
I.2-1), empty when the part has no valid one.

A new version (same SOP Instance UID, other bytes) is stored exactly as sent: 200, no
WarningReason (0008,1196), since none of B000 coercion, B006 elements discarded or B007 does
not match SOP class happened; the ``Warning: 299`` header says it was flagged for review.

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
from dataclasses import dataclass

import pydicom
from sqlmodel import Session

from corelab import audit
from corelab.dicom_handlers import is_resource_failure
from corelab.receiver_store import Store
from corelab.validate import is_valid_uid
from services.multipart import PREAMBLE, Part

# The node's one logger: operators and tests filter on it, and it never carries a header value.
LOG = logging.getLogger("corelab.receiver")

MAX_WARNINGS = 20
MIN_PART_BYTES = len(PREAMBLE)  # 128-byte preamble and DICM: no DICOM PS3.10 file is shorter
MAX_NOT_DICOM_HELD = 10         # parts that are no DICOM file, held per request; later ones refused

# PS3.18 Table I.2-2 / PS3.4 GG.4-1 failure reasons, and corelab's own in the 0xCxxx range
OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0xA700, 0xA900, 0xC000
PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED = 0x0110, 0x0122
DEID_FAILED, UID_CONFLICT, UNKNOWN_SITE, STUDY_MISMATCH = 0xC001, 0xC002, 0xC003, 0xC004
FAILURE_OF_REASON = {"too_large": OUT_OF_RESOURCES, "zip_bomb": OUT_OF_RESOURCES,
                     "unknown_sop_class": SOP_CLASS_NOT_SUPPORTED, "deid_failed": DEID_FAILED,
                     "uid_conflict": UID_CONFLICT, "unknown_site": UNKNOWN_SITE,
                     **dict.fromkeys(("not_dicom", "truncated", "unreadable", "wrong_vr", "bad_pixel_data",
                                      "invalid_uid", "missing_uid"), CANNOT_UNDERSTAND)}
STORED = ("stored", "duplicate", "new_version")


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
    not_dicom: bool = False  # no DICOM file at all (counted against MAX_NOT_DICOM_HELD)


def _uids(data: bytes) -> tuple[bool, dict[str, str]]:
    """``(readable, uids)``: whether the bytes are a DICOM file with any of the object's UIDs (valid
    or not), and each UID when it is a valid UID (else "")."""
    keys = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    if data[128:132] != b"DICM":
        return False, dict.fromkeys(keys, "")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(keys))
        found = {k: str(ds.get(k, "") or "") for k in keys}
    except Exception:  # noqa: BLE001  unreadable: ingest quarantines it with the reason
        return False, dict.fromkeys(keys, "")
    return any(found.values()), {k: (v if is_valid_uid(v) else "") for k, v in found.items()}


def ingest_part(store: Store, part: Part, *, site_id: int, study_uid: str | None = None,
                hold_not_dicom: bool = True) -> PartResult:
    """Store (or quarantine, or refuse) one staged part; never raises.

    ``study_uid``: the study the request's URL named; an object of another study is refused
    (``study_mismatch``) and not held, since sending it to the right URL fixes it.
    ``hold_not_dicom``: False once the request's first :data:`MAX_NOT_DICOM_HELD` parts that are
    no DICOM file were held; such a part is then refused. Any error (the part cannot be read, the
    store fails) is a ``failed`` result: 0xA700 when the machine ran out of something, else 0x0110.
    """
    try:
        return _ingest(store, part, site_id=site_id, study_uid=study_uid, hold_not_dicom=hold_not_dicom)
    except Exception as exc:  # the server failed, not the object: nothing was kept, the client resends
        resource = is_resource_failure(exc)
        if not resource:
            LOG.exception("STOW-RS part #%d: neither stored nor quarantined (%s): a bug", part.ordinal,
                          type(exc).__name__)
        return PartResult(part.ordinal, "failed", reason_code="store_unavailable",
                          failure=OUT_OF_RESOURCES if resource else PROCESSING_FAILURE,
                          reason=f"failed (store_unavailable): part #{part.ordinal}: not stored: the core lab could "
                                 f"not read or store it ({type(exc).__name__}); send it again later")


def _ingest(store: Store, part: Part, *, site_id: int, study_uid: str | None, hold_not_dicom: bool) -> PartResult:
    n = part.ordinal
    if part.media_type != "application/dicom":
        return PartResult(n, "refused", reason_code="not_application_dicom", failure=CANNOT_UNDERSTAND,
                          reason=f"refused (not_application_dicom): part #{n}: its Content-Type is not "
                                 "application/dicom: not stored and not held; send each instance as one "
                                 "application/dicom part (a DICOM PS3.10 file)")
    if part.size < MIN_PART_BYTES:
        return PartResult(n, "refused", reason_code="too_small", failure=CANNOT_UNDERSTAND,
                          reason=f"refused (too_small): part #{n}: {part.size} bytes, fewer than any DICOM PS3.10 "
                                 f"file ({MIN_PART_BYTES}): not stored and not held; send one DICOM file per part")
    data = part.path.read_bytes()
    readable, uids = _uids(data)
    ids = {"sop_class_uid": uids["SOPClassUID"], "sop_instance_uid": uids["SOPInstanceUID"],
           "study_uid": uids["StudyInstanceUID"], "series_uid": uids["SeriesInstanceUID"]}
    if not readable and not hold_not_dicom:
        return PartResult(n, "refused", reason_code="not_dicom", failure=CANNOT_UNDERSTAND, not_dicom=True,
                          reason=f"refused (not_dicom): part #{n}: not a DICOM file (no DICM marker or no readable "
                                 f"UID); more than {MAX_NOT_DICOM_HELD} such parts in one request, so not held; "
                                 "send DICOM PS3.10 files only")
    if study_uid and uids["StudyInstanceUID"] and uids["StudyInstanceUID"] != study_uid:
        return PartResult(n, "refused", **ids, reason_code="study_mismatch", failure=STUDY_MISMATCH,
                          reason=f"refused (study_mismatch): part #{n}: its StudyInstanceUID is not the study of "
                                 "the request's URL: not stored and not held; send it to /dicomweb/studies or to "
                                 "its own study's URL")
    outcome = store.accept(data, sop_instance_uid=uids["SOPInstanceUID"], site_id=site_id, source="stow-rs",
                           ordinal=n)
    if outcome.status == "new_version":
        return PartResult(n, outcome.status, **ids,
                          reason=f"stored (new_version): {outcome.source}: same SOP Instance UID as a stored "
                                 "instance with other bytes: kept as a new version, flagged for the core lab's review")
    if outcome.status in STORED:
        return PartResult(n, outcome.status, **ids)
    code = outcome.reason_code or ""
    return PartResult(n, "quarantined", **ids, reason_code=code, reason=f"quarantined ({code}): {outcome.reason}",
                      failure=FAILURE_OF_REASON.get(code, CANNOT_UNDERSTAND), not_dicom=not readable)


# --- the answer and the audit -----------------------------------------------------------------------

def _element(vr: str, value) -> dict:
    return {"vr": vr, "Value": [value]}


def stow_response(results: list[PartResult], *, base_url: str, study_uid: str | None) -> tuple[int, dict, list[str]]:
    """``(HTTP status, DICOM JSON body, Warning header values)`` of PS3.18 10.5.3.

    200 when every part was stored (a duplicate or a new version counts as stored), 202 when some
    were not, 409 when none was. ``base_url``: the portal's public URL (``Settings.public_url``,
    never the request's Host header), without the trailing slash.
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
            # ReferencedSOPClassUID and ReferencedSOPInstanceUID are Type 1: empty when not known
            items.append({"00081150": _element("UI", r.sop_class_uid) if r.sop_class_uid else {"vr": "UI"},
                          "00081155": _element("UI", r.sop_instance_uid) if r.sop_instance_uid else {"vr": "UI"},
                          "00081197": _element("US", r.failure), "00090010": _element("LO", "CORELAB"),
                          "00091001": _element("LT", r.reason)})
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


__all__ = ["MAX_NOT_DICOM_HELD", "MIN_PART_BYTES", "PartResult", "counts", "ingest_part", "record_request",
           "stow_response", "warning_header"]
