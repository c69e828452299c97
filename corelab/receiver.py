"""The DICOM node: Storage SCP and Verification SCP over pynetdicom.

Layout follows pynetdicom's ``apps/qrscp``: handlers that do one thing and return a status,
their dependencies bound through the ``(event, handler, [args])`` tuple, and a small object
(:class:`Receiver`) that starts the server (``block=False``) and a background ticker.

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

Association hygiene (hostile or broken peers)
---------------------------------------------
pynetdicom 3.0.4 counts every live acceptor thread against ``maximum_associations``, including
connections that never sent a complete A-ASSOCIATE-RQ and connections already closed by the peer
whose thread still waits out ``acse_timeout`` (30 s by default): a few raw sockets sending garbage
or half an A-ASSOCIATE-RQ locked every site out with "local limit exceeded". The node therefore
counts for itself (:class:`AssociationGuard`):

- A connection is *handshaking* from accept until its A-ASSOCIATE-RQ has been received whole
  (and, with TLS, the TLS handshake done). It has :data:`HANDSHAKE_TIMEOUT_S` (5 s) for that,
  counted from accept, however slowly it trickles bytes; then its socket is shut down. Each
  socket read has the same time-out, and pynetdicom's ACSE/ARTIM timer is set to it, so nothing
  waits 30 s. Handshaking connections hold no association slot. At most
  :data:`MAX_HANDSHAKES_PER_HOST` per peer address and :data:`MAX_HANDSHAKES` in all are kept;
  one more evicts the *oldest* handshaking connection (of that host, else of all), so a flood of
  half-open connections cannot starve a site that completes its request in milliseconds.
- A slot is taken when an association is accepted and freed the moment it is released,
  aborted or its socket closes (``EVT_CONN_CLOSE``), not when its thread ends. At most
  ``max_associations`` slots in all and ``max_associations_per_host`` (default
  :data:`MAX_ASSOCIATIONS_PER_HOST`) per peer address; one more is rejected with A-ASSOCIATE-RJ
  rejected-transient, service-provider (presentation), local-limit-exceeded (0x02, 0x03, 0x02):
  the sender retries later. pynetdicom's own count is disabled (set far above ours).
- The called AE title must be ours (else rejected-permanent, service-user, called AE title not
  recognised, 0x01, 0x01, 0x07). The calling AE title must match the registration pattern
  (:data:`corelab.register.AE_TITLE_PATTERN`) as sent, trailing padding aside: a title with
  leading spaces is refused (0x01, 0x01, 0x03) although PS3.8 calls leading spaces
  non-significant, because pynetdicom would strip them and ``" SITE1"`` would then pass as
  ``SITE1`` in the register lookup while consoles never send it that way. Titles with a
  backslash, control or non-ASCII characters cannot be decoded by pynetdicom at all: the
  request is answered with A-ABORT and logged.
- Before A-ASSOCIATE is done, a PDU may declare at most :data:`MAX_ASSOCIATE_RQ_BYTES`
  (256 KiB); pynetdicom would buffer whatever length the header claims (up to 4 GiB).
- An accepted association's socket reads time out after ``network_timeout_s`` (a peer that
  stops mid-PDU is dropped), and an idle association after the same time.

Durability and restart
----------------------
Success is sent only after the durable write and the committed index row. On start,
:func:`recover` deletes temporary files left by a dead process and indexes spool files that were
written but whose row never committed (never acknowledged; the sender will resend, and that
resend is then a no-op duplicate), so anything written is known.

Completion and QC
-----------------
A series is stable when no object arrived for ``stable_s`` seconds (``Series.last_received_at``).
The ticker completes it (checksum, completeness against the header's counts and the slice
positions), then claims its QC start with one atomic ``UPDATE ... SET qc_state='queued' WHERE
qc_state='pending'``: only one caller, in any process, before or after a restart, can win, and
the winner records an audit event and calls ``on_complete(series_id)``. The kernel never imports
a flow: the caller hands in the callback (``flows/receive.py`` starts the Prefect QC).

Logs carry UIDs, AE titles, addresses and attribute keywords only: never a patient value.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import ssl
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target
from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, col, select

from corelab import audit
from corelab.db import open_store, transaction
from corelab.ingest import SOP_CLASSES, Outcome, accept_object, complete_series
from corelab.models import Instance, Series, Site, utcnow
from corelab.register import AE_TITLE_PATTERN
from corelab.settings import Settings
from corelab.validate import is_valid_uid

LOG = logging.getLogger("corelab.receiver")

# Transfer syntaxes accepted for every storage class; objects are stored as received (no
# transcoding), so what QC reads is what the scanner sent. Lossy JPEG is accepted for Secondary
# Capture-style images; the imaging manual decides whether a PET series may be lossy.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent by old consoles)
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.5",      # RLE Lossless
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline (lossy)
    "1.2.840.10008.1.2.4.51",   # JPEG Extended (lossy)
    "1.2.840.10008.1.2.4.91",   # JPEG 2000 (lossy)
)
STATUS_SUCCESS = 0x0000
STATUS_QUARANTINED = 0xB007
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_UNKNOWN_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
REJECT_UNKNOWN_CALLED_AE = (0x01, 0x01, 0x07)   # rejected-permanent, service-user, called AE not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)         # rejected-transient, service-provider (presentation), local limit
REJECT_TRANSIENT = (0x02, 0x03, 0x01)           # rejected-transient, service-provider, temporary congestion

# Association hygiene (see the module docstring). Constants rather than settings: the defaults
# suit every site we know; ReceiverConfig takes other values (tests, benchmarks).
HANDSHAKE_TIMEOUT_S = 5.0
"""Seconds from TCP accept until the A-ASSOCIATE-RQ (and the TLS handshake) must be complete;
also the time-out of each socket read until then and pynetdicom's ACSE/ARTIM timer."""
MAX_ASSOCIATIONS_PER_HOST = 8
"""Concurrent associations from one peer address (the total is ``max_associations``, 16)."""
MAX_HANDSHAKES_PER_HOST = 8
"""Connections of one peer address that have not completed A-ASSOCIATE yet; one more evicts
that address's oldest."""
MAX_HANDSHAKES = 64
"""Such connections in all; one more evicts the oldest of all."""
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024
"""Largest PDU read before an association is established (an A-ASSOCIATE-RQ proposing every
storage class with every transfer syntax is a few tens of KiB); a larger declared length closes
the connection before anything is buffered (pynetdicom would read all of it into memory)."""
_PYNETDICOM_NO_LIMIT = 100_000  # pynetdicom's thread count is not the limit: AssociationGuard's is
_AE_TITLE = re.compile(AE_TITLE_PATTERN)
# Concurrent writers racing to create the same series (IntegrityError on the unique UID) or
# waiting out a lock: the loser retries its whole, short transaction.
DB_ATTEMPTS = 6
# Striped locks by SOP Instance UID: two copies of one instance arriving at once must not both
# decide "version 1" and overwrite each other's file before the unique index stops one of them.
_LOCK_STRIPES = 64


@dataclass(frozen=True)
class ReceiverConfig:
    """How the node listens.

    Attributes
    ----------
    ae_title : str
        Our AE title (``CORELAB_AE_TITLE``).
    port : int
        TCP port (``CORELAB_DICOM_PORT``).
    bind_address : str
        Interface to listen on; ``""`` for all.
    max_associations : int
        Concurrent associations; one more is rejected (transient, local limit exceeded).
    stable_s : float
        Seconds without a new object after which a series is complete.
    tick_s : float
        How often the ticker looks for stable series (and polls the inbox).
    tls_cert, tls_key, tls_ca : Path or None
        DICOM TLS: our certificate and key; with a CA, senders must present a certificate it
        signed.
    max_associations_per_host : int
        Concurrent associations from one peer address; one more is rejected (transient, local
        limit exceeded).
    handshake_timeout_s : float
        Seconds a connection has from accept to a complete A-ASSOCIATE-RQ (and TLS handshake);
        also pynetdicom's ACSE/ARTIM time-out.
    max_handshakes_per_host, max_handshakes : int
        Connections still handshaking, per peer address and in all; one more evicts the oldest.
    dimse_timeout_s, network_timeout_s : float
        pynetdicom time-outs; a sender that vanishes mid-series (or stops mid-PDU) is dropped
        after ``network_timeout_s``.
    """

    ae_title: str = "CORELAB"
    port: int = 11112
    bind_address: str = ""
    max_associations: int = 16
    stable_s: float = 60.0
    tick_s: float = 1.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    max_associations_per_host: int = MAX_ASSOCIATIONS_PER_HOST
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    max_handshakes_per_host: int = MAX_HANDSHAKES_PER_HOST
    max_handshakes: int = MAX_HANDSHAKES
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> ReceiverConfig:
        values = {"ae_title": settings.ae_title, "port": settings.dicom_port, "stable_s": settings.series_stable_s}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile=str(self.tls_cert), keyfile=str(self.tls_key) if self.tls_key else None)
        if self.tls_ca:
            ctx.load_verify_locations(cafile=str(self.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


# --- the store side ------------------------------------------------------------------------------

def _retrying(fn: Callable[[], object], what: str):
    for attempt in range(DB_ATTEMPTS):
        try:
            return fn()
        except (IntegrityError, DBAPIError) as exc:
            # IntegrityError: another thread created the same series/study/subject first; its
            # row is there now, so the retry finds it. DBAPIError: lock time-out or a dropped
            # connection; a retry is the right answer to both.
            if attempt == DB_ATTEMPTS - 1:
                raise
            LOG.debug("%s: retry %d after %s", what, attempt + 1, type(exc).__name__)
            time.sleep(0.005 * 2 ** attempt)


class SiteDirectory:
    """Calling AE title (and sender host) -> registered site, read from the register.

    Looked up at every association (a register change applies to the next association, no
    restart) and cached for a few seconds for the C-STOREs inside it.
    """

    def __init__(self, engine: Engine, ttl_s: float = 5.0):
        self.engine, self.ttl_s = engine, ttl_s
        self._cache: dict[tuple[str, str], tuple[float, tuple[int, str] | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, ae_title: str, address: str, *, fresh: bool = False) -> tuple[int, str] | None:
        """``(site id, site code)`` for a sender, or None when it is not registered."""
        key = (ae_title.strip(), address)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit and not fresh and now - hit[0] < self.ttl_s:
            return hit[1]
        with transaction(self.engine) as session:
            sites = session.exec(select(Site).where(Site.ae_title == key[0])).all()
            found = next(((s.id, s.code) for s in sites if s.host and _same_host(s.host, address)), None)
            found = found or next(((s.id, s.code) for s in sites if not s.host), None)
        with self._lock:
            self._cache[key] = (now, found)
        return found


def _same_host(registered: str, address: str) -> bool:
    if registered == address:
        return True
    try:
        return address in {info[4][0] for info in socket.getaddrinfo(registered, None)}
    except OSError:
        return False


class Store:
    """Accept received bytes into the store: one short transaction per object."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings, self.engine = settings, engine
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def accept(self, data: bytes, *, sop_instance_uid: str, site_id: int | None, source: str,
               ordinal: int | None = None) -> Outcome:
        """``ordinal``: the object's number in its association (1, 2, ...), shown in reasons."""
        def once() -> Outcome:
            with transaction(self.engine) as session:
                site = session.get(Site, site_id) if site_id is not None else None
                return accept_object(session, self.settings, data, source=source, site=site, ordinal=ordinal)

        with self._locks[zlib.crc32(sop_instance_uid.encode()) % _LOCK_STRIPES]:
            return _retrying(once, f"store {sop_instance_uid}")


# --- association hygiene: who holds a slot, for how long ---------------------------------------------

@dataclass(eq=False)
class _Conn:
    """One accepted TCP connection, from accept until its association ends."""

    host: str
    sock: socket.socket
    opened: float                      # time.monotonic() at accept
    assoc: object | None = None        # the pynetdicom Association, from EVT_CONN_OPEN
    called_raw: bytes | None = None    # the 16-byte AE title fields as sent
    calling_raw: bytes | None = None


class AssociationGuard:
    """Our own count of handshaking connections and association slots (see the module docstring).

    Called from pynetdicom's threads: the server's accept loop (:meth:`admit`, :meth:`expire`),
    each connection's request thread (:meth:`opened`), DUL reactor (:meth:`data_received`,
    :meth:`closed`) and association thread (:meth:`begin`, :meth:`acquire`). One lock; nothing
    slow is done while holding it.
    """

    def __init__(self, *, max_associations: int, max_associations_per_host: int, max_handshakes: int,
                 max_handshakes_per_host: int, handshake_timeout_s: float, network_timeout_s: float | None):
        self.max_associations, self.max_per_host = max_associations, max_associations_per_host
        self.max_handshakes, self.max_handshakes_per_host = max_handshakes, max_handshakes_per_host
        self.handshake_timeout_s, self.network_timeout_s = handshake_timeout_s, network_timeout_s
        self._lock = threading.Lock()
        self._handshakes: OrderedDict[int, _Conn] = OrderedDict()  # id(socket) -> connection, oldest first
        self._by_assoc: dict[int, _Conn] = {}                       # id(association) -> handshaking connection
        self._slots: dict[int, _Conn] = {}                          # id(association) -> accepted association
        self._warned: dict[str, tuple[float, int]] = {}             # host -> (last warning, suppressed)

    # -- counts (for logs and tests) --
    def counts(self) -> dict:
        with self._lock:
            per_host: dict[str, int] = {}
            for conn in self._slots.values():
                per_host[conn.host] = per_host.get(conn.host, 0) + 1
            return {"handshaking": len(self._handshakes), "associations": len(self._slots), "per_host": per_host}

    # -- accept loop --
    def admit(self, sock: socket.socket, address) -> bool:
        """A new TCP connection: time-limit it and make room for it (evicting the oldest)."""
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        with contextlib.suppress(OSError):
            sock.settimeout(self.handshake_timeout_s)
        evicted: list[tuple[_Conn, str]] = []
        with self._lock:
            same_host = [c for c in self._handshakes.values() if c.host == host]
            if len(same_host) >= self.max_handshakes_per_host:
                evicted.append((self._forget_locked(same_host[0]), "more than %d connections of this host "
                                "are handshaking" % self.max_handshakes_per_host))
            if len(self._handshakes) >= self.max_handshakes:
                oldest = next(iter(self._handshakes.values()))
                evicted.append((self._forget_locked(oldest), "more than %d connections are handshaking"
                                % self.max_handshakes))
            self._handshakes[id(sock)] = _Conn(host, sock, time.monotonic())
        for conn, why in evicted:
            self._warn(conn.host, "connection from %s closed before A-ASSOCIATE: %s (oldest evicted)", why)
            self._shut(conn)
        return True

    def expire(self) -> None:
        """Close handshakes past their deadline; drop entries whose association thread has ended."""
        now = time.monotonic()
        expired: list[_Conn] = []
        with self._lock:
            for conn in list(self._handshakes.values()):
                if now - conn.opened >= self.handshake_timeout_s or _thread_done(conn.assoc):
                    expired.append(self._forget_locked(conn))
            for key, conn in list(self._slots.items()):
                if _thread_done(conn.assoc):  # a close event we did not see: never leak a slot
                    del self._slots[key]
        for conn in expired:
            if not _thread_done(conn.assoc):
                self._warn(conn.host, "connection from %s closed: no complete A-ASSOCIATE-RQ within %.0f s",
                           self.handshake_timeout_s)
            self._shut(conn)

    def forget_socket(self, sock: socket.socket) -> None:
        with self._lock:
            conn = self._handshakes.get(id(sock))
            if conn is not None:
                self._forget_locked(conn)

    # -- request thread, DUL reactor --
    def opened(self, assoc) -> None:
        """EVT_CONN_OPEN: link the association to its connection."""
        sock = getattr(assoc.dul.socket, "socket", None)
        with self._lock:
            conn = self._handshakes.get(id(sock))
            if conn is not None:
                conn.assoc = assoc
                self._by_assoc[id(assoc)] = conn

    def data_received(self, assoc, data: bytes) -> None:
        """EVT_DATA_RECV: keep the AE title fields of an A-ASSOCIATE-RQ exactly as sent
        (pynetdicom strips leading spaces when it decodes them)."""
        if data[:1] != b"\x01" or len(data) < 42:
            return
        with self._lock:
            conn = self._by_assoc.get(id(assoc))
            if conn is not None and conn.calling_raw is None:
                conn.called_raw, conn.calling_raw = bytes(data[10:26]), bytes(data[26:42])

    def closed(self, assoc) -> None:
        """EVT_CONN_CLOSE / EVT_RELEASED / EVT_ABORTED: free the slot at once."""
        with self._lock:
            self._slots.pop(id(assoc), None)
            conn = self._by_assoc.get(id(assoc))
            if conn is not None:
                self._forget_locked(conn)

    # -- association thread (EVT_REQUESTED) --
    def begin(self, assoc) -> _Conn | None:
        """The A-ASSOCIATE-RQ is here: the connection stops handshaking. None when it was already
        closed (evicted, timed out, or the peer went away)."""
        with self._lock:
            conn = self._by_assoc.pop(id(assoc), None)
            if conn is not None:
                self._handshakes.pop(id(conn.sock), None)
            return conn

    def acquire(self, conn: _Conn) -> str | None:
        """Take a slot for an accepted association; the reason when none is free."""
        with self._lock:
            if len(self._slots) >= self.max_associations:
                return f"all {self.max_associations} association slots are in use"
            if sum(c.host == conn.host for c in self._slots.values()) >= self.max_per_host:
                return f"{conn.host} already holds {self.max_per_host} associations (the per-host cap)"
            self._slots[id(conn.assoc)] = conn
        with contextlib.suppress(OSError):
            conn.sock.settimeout(self.network_timeout_s)
        return None

    # -- helpers --
    def _forget_locked(self, conn: _Conn) -> _Conn:
        self._handshakes.pop(id(conn.sock), None)
        if conn.assoc is not None:
            self._by_assoc.pop(id(conn.assoc), None)
            # Its thread waits for the A-ASSOCIATE-RQ in pynetdicom's to-user queue: wake it (a
            # None there is "timed out"), so it ends now rather than after the ACSE time-out.
            # If the request raced in first, EVT_REQUESTED finds the connection gone and rejects.
            if getattr(conn.assoc.requestor, "primitive", None) is None:
                with contextlib.suppress(Exception):
                    conn.assoc.dul.to_user_queue.put(None)
        return conn

    @staticmethod
    def _shut(conn: _Conn) -> None:
        # shutdown, not close: the DUL thread may be inside recv() on it; shutdown makes that
        # recv return at once and pynetdicom closes the socket itself. socket.socket.shutdown
        # also on a TLS socket (SSLSocket.shutdown would drop its SSL object under the reader).
        with contextlib.suppress(OSError, ValueError):
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)

    def _warn(self, host: str, msg: str, *args) -> None:
        """Log a warning, at most one per host per 10 s (a flood must not flood the log)."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._warned.get(host, (-1e9, 0))
            if now - last < 10.0:
                self._warned[host] = (last, suppressed + 1)
                return
            self._warned[host] = (now, 0)
            if len(self._warned) > 4096:
                self._warned.clear()
        LOG.warning(msg + ("" if not suppressed else f" ({suppressed} more from this host not logged)"),
                    host, *args)


def _thread_done(assoc) -> bool:
    return assoc is not None and assoc.ident is not None and not assoc.is_alive()


class _HandshakeCappedSocket(AssociationSocket):
    """pynetdicom's socket wrapper, refusing to buffer a huge PDU before A-ASSOCIATE is done."""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_ASSOCIATE_RQ_BYTES and not self.assoc.is_established:
            guard = getattr(self.assoc._server, "guard", None)
            if guard is not None:
                guard._warn(str(self.assoc.requestor.address), "connection from %s closed: a PDU of %d bytes "
                            "before A-ASSOCIATE (more than %d)", nr_bytes, MAX_ASSOCIATE_RQ_BYTES)
            return bytearray()  # what a closed connection returns: the DUL closes it (Evt17)
        return super().recv(nr_bytes)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler with :class:`_HandshakeCappedSocket` (same object, its class
    swapped: creating a second socket wrapper would queue a second connection event)."""

    def _create_association(self):
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _HandshakeCappedSocket
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with :class:`AssociationGuard` at the door.

    - ``get_request`` sets the handshake time-out on the accepted socket and defers the TLS
      handshake to the connection's own thread (pynetdicom does it in the accept loop, where one
      silent client stops every other connection).
    - ``verify_request`` admits the connection to the guard (evicting the oldest handshaking one
      when a cap is reached).
    - ``service_actions`` (every poll of the accept loop, at most 0.5 s apart) expires handshakes.
    - its request handler caps the PDU size before A-ASSOCIATE (:data:`MAX_ASSOCIATE_RQ_BYTES`).
    """

    guard: AssociationGuard

    def get_request(self):
        client, address = self.socket.accept()
        client.settimeout(self.guard.handshake_timeout_s)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request, client_address) -> bool:
        return self.guard.admit(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                LOG.info("TLS handshake with %s failed: %s", client_address[0], exc)
                self.guard.forget_socket(request)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def service_actions(self) -> None:
        super().service_actions()
        try:
            self.guard.expire()
        except Exception:  # the accept loop must never die of housekeeping
            LOG.exception("association guard: expiry failed")


# --- handlers: one job each, a status back ---------------------------------------------------------

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
    value = event.assoc.requestor.primitive.calling_ae_title
    return (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).strip()


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
    if not _AE_TITLE.fullmatch(value):
        return "characters outside the DICOM default repertoire (backslash or control)"
    return None


def handle_requested(event, sites: SiteDirectory, guard: AssociationGuard | None = None,
                     ae_title: str | None = None) -> None:
    """Decide on an A-ASSOCIATE-RQ: called AE title, calling AE title (form and register),
    then a free slot (overall and for the peer's host). Every rejection is logged."""
    assoc = event.assoc
    address = assoc.requestor.address
    conn = guard.begin(assoc) if guard is not None else None
    if guard is not None and conn is None:
        LOG.info("association from %s: its connection was already closed (handshake time-out or evicted)",
                 address)
        _reject(assoc, REJECT_LOCAL_LIMIT)
        return
    primitive = assoc.requestor.primitive
    called_raw = conn.called_raw if conn is not None and conn.called_raw is not None else primitive.called_ae_title
    calling_raw = conn.calling_raw if conn is not None and conn.calling_raw is not None \
        else primitive.calling_ae_title
    ae_title_sent = _calling_ae(event)
    if ae_title is not None:
        problem = ae_title_problem(called_raw)
        called = called_raw.decode("ascii", "replace") if isinstance(called_raw, bytes) else str(called_raw)
        if problem or called.rstrip(" ") != ae_title:
            LOG.warning("association rejected: called AE %r from %s (calling AE %r) is not this node's AE "
                        "title %r", called.rstrip(" "), address, ae_title_sent, ae_title)
            _reject(assoc, REJECT_UNKNOWN_CALLED_AE)
            return
    problem = ae_title_problem(calling_raw)
    if problem:
        shown = calling_raw.decode("ascii", "replace") if isinstance(calling_raw, bytes) else str(calling_raw)
        LOG.warning("association rejected: calling AE %r from %s is malformed (%s)", shown.rstrip(" "), address,
                    problem)
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
    if conn is not None:
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
    from sqlalchemy.exc import DataError  # noqa: PLC0415
    if isinstance(exc, DataError):  # a value the database refuses (too long, malformed): the object's
        return False
    if isinstance(exc, (MemoryError, DBAPIError)):  # locked, unreachable, I/O error, lost contention
        return True
    from sqlalchemy.exc import TimeoutError as PoolTimeout  # noqa: PLC0415  (pool exhausted)
    if isinstance(exc, PoolTimeout):
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


# --- completion and QC start -------------------------------------------------------------------------

def claim_qc(engine: Engine, series_id: int, *, actor: str = "receiver") -> bool:
    """Claim the QC start of a complete series: True for exactly one caller, ever.

    The conditional UPDATE is atomic in SQLite and PostgreSQL alike, so two threads, two
    processes or a process before and after a crash cannot both win; the winner's audit event
    is written in the same transaction.
    """
    def once() -> bool:
        with transaction(engine) as session:
            result = session.execute(update(Series)
                                     .where(Series.id == series_id, Series.qc_state == "pending",
                                            Series.state == "complete")
                                     .values(qc_state="queued", qc_at=utcnow()))
            if result.rowcount != 1:
                return False
            series = session.get(Series, series_id)
            audit.append(session, actor=actor, action="series.qc_queued", entity="series",
                         entity_id=series.series_uid,
                         detail={"instances": series.instance_count, "checksum": series.checksum,
                                 "completeness": series.completeness})
            return True
    return bool(_retrying(once, f"claim QC of series {series_id}"))


def start_qc(engine: Engine, series_ids: list[int], on_complete: Callable[[int], None] | None, *,
             actor: str = "receiver") -> list[int]:
    """Claim and start QC for each series; returns the ids this caller started."""
    started = []
    for series_id in series_ids:
        if not claim_qc(engine, series_id, actor=actor):
            continue
        started.append(series_id)
        if on_complete is None:
            continue
        try:
            on_complete(series_id)
        except Exception:  # QC is claimed: mark it failed rather than leave it queued in silence
            LOG.exception("series %d: starting QC failed; marked qc_state=failed", series_id)
            with transaction(engine) as session:
                session.execute(update(Series).where(Series.id == series_id).values(qc_state="failed"))
    return started


def complete_stable_series(engine: Engine, *, stable_s: float, on_complete: Callable[[int], None] | None = None,
                           now=None) -> list[int]:
    """Complete every series with no arrival for ``stable_s`` seconds, then start its QC once.

    Also claims QC for complete series still pending (completed by a file drop, or completed
    just before a crash), so a restart finishes what was interrupted. Returns the ids completed.
    """
    cutoff = (now or utcnow()) - timedelta(seconds=stable_s)
    stable = (col(Series.last_received_at).is_not(None) & (col(Series.last_received_at) <= cutoff)
              & or_(col(Series.completed_at).is_(None), col(Series.completed_at) < col(Series.last_received_at)))
    with transaction(engine) as session:
        ids = list(session.exec(select(Series.id).where(stable).order_by(col(Series.id))))
    completed = []
    for series_id in ids:
        def once(series_id=series_id) -> bool:
            with transaction(engine) as session:
                series = session.exec(select(Series).where(Series.id == series_id, stable)).first()
                if series is None:  # another receiver got there first, or an object just arrived
                    return False
                complete_series(session, series)
                LOG.info("series %s complete: %d instances, state %s%s", series.series_uid, series.instance_count,
                         series.state, "" if series.completeness.get("complete", True)
                         else f", flagged: {'; '.join(series.completeness.get('findings', []))}")
                return True
        if _retrying(once, f"complete series {series_id}"):
            completed.append(series_id)
    with transaction(engine) as session:
        pending = list(session.exec(select(Series.id).where(Series.state == "complete", Series.qc_state == "pending",
                                                            col(Series.completed_at).is_not(None))
                                    .order_by(col(Series.id))))
    start_qc(engine, pending, on_complete)
    return completed


# --- restart recovery ---------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(settings: Settings, engine: Engine) -> dict:
    """Clean up after a crash: remove half-written files, index written-but-unindexed ones.

    Returns
    -------
    dict
        ``partial_removed``, ``reindexed``, ``unattributed_removed`` counts.
    """
    out = {"partial_removed": 0, "reindexed": 0, "unattributed_removed": 0}
    spool = settings.spool_dir
    for root in (spool, settings.quarantine_dir):
        for tmp in root.rglob(".*.partial"):
            # ".<name>.<pid>.partial": only a dead writer's file is garbage; a live one is busy.
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            tmp.unlink(missing_ok=True)
            out["partial_removed"] += 1
    with transaction(engine) as session:
        known = set(session.exec(select(Instance.path)))
    store = Store(settings, engine)
    for path in sorted(spool.rglob("*.dcm")):
        rel = str(path.relative_to(settings.data_dir))
        if path.name.startswith(".") or rel in known:
            continue
        # Written, never indexed, so never acknowledged. Its series row tells the site; without
        # one, the object's first transaction never committed and the sender still holds it.
        with transaction(engine) as session:
            series = session.exec(select(Series).where(Series.series_uid == path.parent.name)).first()
            site_id = series.site_id if series else None
        if site_id is None:
            path.unlink()
            out["unattributed_removed"] += 1
            continue
        store.accept(path.read_bytes(), sop_instance_uid=path.stem, site_id=site_id, source=path.name)
        out["reindexed"] += 1
    if any(out.values()):
        LOG.warning("recovery after restart: %s", out)
    return out


# --- the node -----------------------------------------------------------------------------------------

@dataclass
class Receiver:
    """A running DICOM node plus its completion ticker.

    Parameters
    ----------
    settings : Settings
        Where the store and spool live.
    config : ReceiverConfig
        How to listen.
    on_complete : callable, optional
        ``on_complete(series_id)``, called once per completed series after its QC start was
        claimed (see :func:`claim_qc`); it should return quickly (queue the work).
    tick_hooks : list of callables
        Extra work for the ticker (e.g. polling the inbox), each called with no argument.
    """

    settings: Settings
    config: ReceiverConfig
    on_complete: Callable[[int], None] | None = None
    tick_hooks: list[Callable[[], object]] = field(default_factory=list)

    def __post_init__(self):
        self.engine = open_store(self.settings)
        self.sites = SiteDirectory(self.engine)
        self.store = Store(self.settings, self.engine)
        c = self.config
        self.guard = AssociationGuard(max_associations=c.max_associations,
                                      max_associations_per_host=c.max_associations_per_host,
                                      max_handshakes=c.max_handshakes, max_handshakes_per_host=c.max_handshakes_per_host,
                                      handshake_timeout_s=c.handshake_timeout_s, network_timeout_s=c.network_timeout_s)
        self.server = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        for sop_class in SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        # Our AssociationGuard counts slots; pynetdicom's count (live threads, including
        # handshaking and already closed connections) must never be the one that says no.
        ae.maximum_associations = _PYNETDICOM_NO_LIMIT
        # As acceptor, the ACSE time-out is the wait for the A-ASSOCIATE-RQ (and the ARTIM timer:
        # the wait for the peer to close after a rejection or abort).
        ae.acse_timeout = self.config.handshake_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.network_timeout = self.config.network_timeout_s
        # 0: no limit on the PDUs we accept, so senders can use their largest (fewer round trips).
        ae.maximum_pdu_size = 0
        return ae

    def handlers(self) -> list:
        return [(evt.EVT_CONN_OPEN, handle_open, [self.guard]),
                (evt.EVT_DATA_RECV, handle_data, [self.guard]),
                (evt.EVT_REQUESTED, handle_requested, [self.sites, self.guard, self.config.ae_title]),
                (evt.EVT_CONN_CLOSE, handle_closed, [self.guard]),
                (evt.EVT_RELEASED, handle_closed, [self.guard]),
                (evt.EVT_ABORTED, handle_closed, [self.guard]),
                (evt.EVT_C_ECHO, handle_echo),
                (evt.EVT_C_STORE, handle_store, [self.store, self.sites])]

    def start(self) -> Receiver:
        """Recover, start listening (non-blocking) and start the ticker."""
        recover(self.settings, self.engine)
        self.tick()  # series that became stable while we were down
        ae = self.build_ae()
        # ae.start_server(block=False), with our server class (AssociationGuard at the door).
        server = ae.make_server((self.config.bind_address, self.config.port), evt_handlers=self.handlers(),
                                ssl_context=self.config.ssl_context(), server_class=GuardedAssociationServer,
                                request_handler=GuardedRequestHandler)
        server.guard = self.guard
        thread = threading.Thread(target=make_target(server.serve_forever), name="corelab-dicom-accept",
                                  daemon=True)
        thread.start()
        ae._servers.append(server)  # server.shutdown() removes it again
        self.server = server
        # Accepted sockets inherit TCP_NODELAY from the listening socket on Linux; the
        # EVT_CONN_OPEN handler sets it again for platforms where they do not.
        with contextlib.suppress(OSError):
            self.server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ticker = threading.Thread(target=self._run_ticker, name="corelab-receiver-ticker", daemon=True)
        self._ticker.start()
        LOG.info("listening as %s on port %d (TLS %s, max %d associations, %d per host, handshake time-out "
                 "%.0f s, series stable after %.0f s)", self.config.ae_title, self.port,
                 "on" if self.config.tls_cert else "off", self.config.max_associations,
                 self.config.max_associations_per_host, self.config.handshake_timeout_s, self.config.stable_s)
        return self

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.config.port

    def tick(self) -> list[int]:
        for hook in self.tick_hooks:
            try:
                hook()
            except Exception:
                LOG.exception("receiver tick hook failed; continuing")
        return complete_stable_series(self.engine, stable_s=self.config.stable_s, on_complete=self.on_complete)

    def _run_ticker(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.tick()
            except Exception:  # the node keeps receiving; the next tick tries again
                LOG.exception("receiver tick failed; retrying in %.1f s", self.config.tick_s)

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
        if self._ticker is not None:
            self._ticker.join(timeout=30)

    def serve_forever(self) -> None:
        """Block until interrupted (SIGINT/SIGTERM), then shut down cleanly."""
        try:
            while not self._stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()


__all__ = ["AssociationGuard", "GuardedAssociationServer", "HANDSHAKE_TIMEOUT_S", "MAX_ASSOCIATIONS_PER_HOST",
           "MAX_HANDSHAKES", "MAX_HANDSHAKES_PER_HOST", "Receiver", "ReceiverConfig", "SiteDirectory", "Store",
           "TRANSFER_SYNTAXES", "ae_title_problem", "claim_qc", "complete_stable_series", "handle_echo",
           "handle_open", "handle_requested", "handle_store", "is_resource_failure", "recover", "start_qc",
           "transaction"]
