"""The pynetdicom event handlers of the node: one job each, a status (or a decision) back.

Its own module, as ``handlers.py`` is in pynetdicom's ``apps/qrscp``: each handler gets its
dependencies (a :class:`~corelab.receiver_store.Store`, a
:class:`~corelab.receiver_store.SiteDirectory`, an :class:`~corelab.association.AssociationGuard`)
bound through the ``(event, handler, [args])`` tuple by :class:`corelab.receiver.Receiver`, so it
holds no state and opens no socket. EVT_CONN_OPEN, EVT_DATA_RECV and the close events feed the
guard; EVT_REQUESTED decides on an A-ASSOCIATE-RQ (see :mod:`corelab.association` for the limits
and AE title rules); EVT_C_ECHO and EVT_C_STORE answer the DIMSE requests.

What a sender is told (C-STORE response status)
-----------------------------------------------
``0x0000`` Success
    The object is in the spool (temporary file, fsync, rename, directory fsync) *and* its
    Instance row with the sha256 is committed. Also answered for a duplicate (same bytes again)
    and for a new version (same SOP Instance UID, other bytes: kept, flagged for review).
``0xB007`` Warning, "data set does not match SOP class"
    The object failed a check (not DICOM, truncated, missing UIDs, SOP class not accepted,
    failed de-identification) and its bytes are durably held in quarantine with the reason. A
    warning, not a failure: resending the same bytes cannot help (senders retry failures), and
    the site's operator still sees at send time that something is wrong; ``ErrorComment``
    carries the reason code (never a value). The full reason goes into the site's feedback
    (``corelab quarantine list``).
``0xA700`` Out of resources
    Only when the machine failed (:func:`is_resource_failure`: disk full or unwritable, I/O
    error, out of memory or file handles, the database unreachable, locked or timing out):
    nothing was acknowledged, the sender should retry. Never for a bad object: ingest
    quarantines those (``0xB007``) and the association goes on.
``0xC210`` Cannot understand
    The received data could not even be encoded to bytes, or storing it failed for a reason that
    is not a resource failure (logged with its traceback: a bug, since ingest quarantines bad
    objects itself).

An unregistered calling AE title (or a registered one from another host than its site's) is
rejected at association: A-ASSOCIATE-RJ, rejected-permanent, service-user, "calling AE title
not recognised" (0x01, 0x01, 0x03); the rejection is logged with AE title and peer address.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket

from pydicom.dataset import Dataset
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from corelab.association import AssociationGuard
from corelab.receiver_store import SiteDirectory, Store
from corelab.register import is_valid_ae_title
from corelab.validate import is_valid_uid

# The node's one logger, whichever of its modules logs (operators and tests filter on this name).
LOG = logging.getLogger("corelab.receiver")

STATUS_SUCCESS = 0x0000
STATUS_QUARANTINED = 0xB007
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_UNKNOWN_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
REJECT_UNKNOWN_CALLED_AE = (0x01, 0x01, 0x07)   # rejected-permanent, service-user, called AE not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)         # rejected-transient, service-provider (presentation), local limit
REJECT_TRANSIENT = (0x02, 0x03, 0x01)           # rejected-transient, service-provider, temporary congestion


def handle_open(event, guard: AssociationGuard | None = None) -> None:
    """Set TCP_NODELAY on an accepted socket (pynetdicom does not, and Nagle plus delayed ACK
    then cost ~40 ms per C-STORE exchange); link the association to the guard's connection."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if guard is not None:
        guard.opened(event.assoc)


def handle_data(event, guard: AssociationGuard) -> None:
    guard.data_received(event.assoc, event.data)


def handle_closed(event, guard: AssociationGuard) -> None:
    guard.closed(event.assoc)


def _calling_ae(event) -> str:
    return _as_text(event.assoc.requestor.primitive.calling_ae_title, "utf-8").strip()


def _as_text(raw: bytes | str | None, encoding: str = "ascii") -> str:
    """An AE title field as text, for comparing and logging (undecodable bytes replaced)."""
    return raw.decode(encoding, "replace") if isinstance(raw, bytes) else str(raw)


def _reject(assoc, result_source_diagnostic: tuple[int, int, int]) -> None:
    # As pynetdicom's own rejection does: queue the A-ASSOCIATE-RJ, then wait (kill) until the
    # state machine is idle, i.e. the PDU went out and the peer closed; returning at once would
    # close the socket first and the sender would only see "peer aborted".
    assoc.acse.send_reject(*result_source_diagnostic)
    assoc.kill()


def ae_title_problem(raw: bytes | str | None) -> str | None:
    """Why an AE title field as sent is refused (None: acceptable).

    Trailing spaces are the field's padding; anything else must match
    :data:`corelab.register.AE_TITLE_PATTERN` as it stands, leading spaces included.
    """
    if raw is None:
        return "missing"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            return "not ASCII"
    value = raw.rstrip(" ")
    if not value:
        return "blank"
    if value[0] == " ":
        return "leading spaces"
    if not is_valid_ae_title(value):
        return "characters outside the DICOM default repertoire (backslash or control)"
    return None


def handle_requested(event, sites: SiteDirectory, guard: AssociationGuard, ae_title: str) -> None:
    """Decide on an A-ASSOCIATE-RQ: called AE title (``ae_title``: ours), calling AE title (form
    and register), then a free slot (overall and for the peer's host). Every rejection is logged."""
    assoc = event.assoc
    address = assoc.requestor.address
    conn = guard.begin(assoc)
    if conn is None:
        LOG.info("association from %s: its connection was already closed (handshake time-out or evicted)",
                 address)
        _reject(assoc, REJECT_LOCAL_LIMIT)
        return
    primitive = assoc.requestor.primitive
    called_raw = conn.called_raw if conn.called_raw is not None else primitive.called_ae_title
    calling_raw = conn.calling_raw if conn.calling_raw is not None else primitive.calling_ae_title
    ae_title_sent = _calling_ae(event)
    called = _as_text(called_raw).rstrip(" ")
    if ae_title_problem(called_raw) or called != ae_title:
        LOG.warning("association rejected: called AE %r from %s (calling AE %r) is not this node's AE "
                    "title %r", called, address, ae_title_sent, ae_title)
        _reject(assoc, REJECT_UNKNOWN_CALLED_AE)
        return
    problem = ae_title_problem(calling_raw)
    if problem:
        LOG.warning("association rejected: calling AE %r from %s is malformed (%s)", _as_text(calling_raw).rstrip(" "),
                    address, problem)
        _reject(assoc, REJECT_UNKNOWN_CALLING_AE)
        return
    try:
        site = sites.lookup(ae_title_sent, address, fresh=True)
    except Exception:  # the register is unreadable: refuse for now, the sender will retry
        LOG.exception("association from %r at %s: site register unavailable, rejected (transient)",
                      ae_title_sent, address)
        _reject(assoc, REJECT_TRANSIENT)
        return
    if site is None:
        LOG.warning("association rejected: calling AE %r from %s is not in the site register "
                    "(register it with `corelab site add SITE --ae-title %s`)", ae_title_sent, address,
                    ae_title_sent)
        _reject(assoc, REJECT_UNKNOWN_CALLING_AE)
        return
    full = guard.acquire(conn)
    if full:
        LOG.warning("association rejected (local limit exceeded): site %s, calling AE %r from %s: %s",
                    site[1], ae_title_sent, address, full)
        _reject(assoc, REJECT_LOCAL_LIMIT)
        return
    LOG.info("association accepted: site %s, calling AE %r from %s", site[1], ae_title_sent, address)


def handle_echo(event) -> int:
    """C-ECHO: the node is up."""
    return STATUS_SUCCESS


def is_resource_failure(exc: BaseException) -> bool:
    """True for failures of the machine, not of the object: disk full or unwritable, out of
    memory or file handles, the database unreachable, locked or timing out. Only these are
    answered "Out of resources" (the sender retries); anything else about one object is that
    object's problem."""
    if isinstance(exc, DataError):  # a value the database refuses (too long, malformed): the object's
        return False
    # DBAPIError: locked, unreachable, I/O error, lost contention; PoolTimeout: the pool is exhausted
    if isinstance(exc, (MemoryError, DBAPIError, PoolTimeout)):
        return True
    return isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS


_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                    errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE, errno.ESTALE, errno.EACCES, errno.EPERM,
                    errno.EFBIG}


def _source_name(sop_uid: str) -> str:
    """What the object is called in its quarantine reason: its SOP Instance UID when that is a
    well-formed UID, never a peer-chosen string that could look like a path."""
    if is_valid_uid(sop_uid):
        return f"{sop_uid}.dcm"
    return "c-store-object.dcm"


def _next_ordinal(assoc) -> int:
    """1, 2, ... per association (C-STOREs of one association are handled one at a time)."""
    n = getattr(assoc, "_corelab_objects", 0) + 1
    with contextlib.suppress(AttributeError):
        assoc._corelab_objects = n
    return n


def handle_store(event, store: Store, sites: SiteDirectory) -> int | Dataset:
    """C-STORE: durably store (or quarantine) the object as received, then answer.

    ``0xB007`` when the object was quarantined (its bytes are held, the association goes on),
    ``0xA700`` only when the machine failed (:func:`is_resource_failure`), ``0xC210`` when the
    data cannot be encoded or storing it failed for a reason that is not a resource failure
    (logged with the traceback: a bug to report, since ingest quarantines bad objects itself).
    """
    sop_uid = str(event.request.AffectedSOPInstanceUID or "")
    ae_title, address = _calling_ae(event), event.assoc.requestor.address
    try:
        data = bytes(event.encoded_dataset())
    except Exception:
        LOG.exception("C-STORE %r from %r: received data cannot be encoded", sop_uid[:80], ae_title)
        return STATUS_CANNOT_UNDERSTAND
    try:
        site = sites.lookup(ae_title, address)
        outcome = store.accept(data, sop_instance_uid=sop_uid, site_id=site[0] if site else None,
                               source=_source_name(sop_uid), ordinal=_next_ordinal(event.assoc))
    except Exception as exc:
        if is_resource_failure(exc):
            LOG.exception("C-STORE %r from %r: not stored (out of resources); the sender should retry",
                          sop_uid[:80], ae_title)
            return STATUS_OUT_OF_RESOURCES
        LOG.exception("C-STORE %r from %r: neither stored nor quarantined (%s); answered 'cannot understand'. "
                      "This is a bug: ingest should have quarantined the object", sop_uid[:80], ae_title,
                      type(exc).__name__)
        return STATUS_CANNOT_UNDERSTAND
    if outcome.status == "quarantined":
        LOG.warning("C-STORE %r from %r: quarantined (%s)", sop_uid[:80], ae_title, outcome.reason_code)
        status = Dataset()
        status.Status = STATUS_QUARANTINED
        status.ErrorComment = f"held in quarantine: {outcome.reason_code}"[:64]
        return status
    return STATUS_SUCCESS


__all__ = ["REJECT_LOCAL_LIMIT", "REJECT_TRANSIENT", "REJECT_UNKNOWN_CALLED_AE", "REJECT_UNKNOWN_CALLING_AE",
           "STATUS_CANNOT_UNDERSTAND", "STATUS_OUT_OF_RESOURCES", "STATUS_QUARANTINED", "STATUS_SUCCESS",
           "ae_title_problem", "handle_closed", "handle_data", "handle_echo", "handle_open", "handle_requested",
           "handle_store", "is_resource_failure"]
