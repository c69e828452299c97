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
    Writing or indexing failed (disk full, database unavailable): nothing was acknowledged, the
    sender should retry.
``0xC210`` Cannot understand
    The received data could not even be encoded to bytes.

An unregistered calling AE title (or a registered one from another host than its site's) is
rejected at association: A-ASSOCIATE-RJ, rejected-permanent, service-user, "calling AE title
not recognised" (0x01, 0x01, 0x03); the rejection is logged with AE title and peer address.

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
import logging
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, col, select

from corelab import audit
from corelab.db import open_store, transaction
from corelab.ingest import SOP_CLASSES, Outcome, accept_object, complete_series
from corelab.models import Instance, Series, Site, utcnow
from corelab.settings import Settings

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
# A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognised.
REJECT_UNKNOWN_CALLING_AE = (0x01, 0x01, 0x03)
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
    acse_timeout_s, dimse_timeout_s, network_timeout_s : float
        pynetdicom time-outs; a sender that vanishes mid-series is dropped after
        ``network_timeout_s``.
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
    acse_timeout_s: float = 30.0
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

    def accept(self, data: bytes, *, sop_instance_uid: str, site_id: int | None, source: str) -> Outcome:
        def once() -> Outcome:
            with transaction(self.engine) as session:
                site = session.get(Site, site_id) if site_id is not None else None
                return accept_object(session, self.settings, data, source=source, site=site)

        with self._locks[zlib.crc32(sop_instance_uid.encode()) % _LOCK_STRIPES]:
            return _retrying(once, f"store {sop_instance_uid}")


# --- handlers: one job each, a status back ---------------------------------------------------------

def handle_open(event) -> None:
    """Set TCP_NODELAY on an accepted socket: pynetdicom does not, and Nagle plus delayed ACK
    then cost ~40 ms per C-STORE exchange."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _calling_ae(event) -> str:
    value = event.assoc.requestor.primitive.calling_ae_title
    return (value.decode(errors="replace") if isinstance(value, bytes) else str(value)).strip()


def _reject(assoc, result_source_diagnostic: tuple[int, int, int]) -> None:
    # As pynetdicom's own rejection does: queue the A-ASSOCIATE-RJ, then wait (kill) until the
    # state machine is idle, i.e. the PDU went out and the peer closed; returning at once would
    # close the socket first and the sender would only see "peer aborted".
    assoc.acse.send_reject(*result_source_diagnostic)
    assoc.kill()


def handle_requested(event, sites: SiteDirectory) -> None:
    """Reject an association from a calling AE title (and host) the site register does not know."""
    ae_title, address = _calling_ae(event), event.assoc.requestor.address
    try:
        site = sites.lookup(ae_title, address, fresh=True)
    except Exception:  # the register is unreadable: refuse for now, the sender will retry
        LOG.exception("association from %r at %s: site register unavailable, rejected (transient)", ae_title, address)
        _reject(event.assoc, (0x02, 0x03, 0x01))
        return
    if site is None:
        LOG.warning("association rejected: calling AE %r from %s is not in the site register "
                    "(register it with `corelab site add SITE --ae-title %s`)", ae_title, address, ae_title)
        _reject(event.assoc, REJECT_UNKNOWN_CALLING_AE)
        return
    LOG.info("association accepted: site %s, calling AE %r from %s", site[1], ae_title, address)


def handle_echo(event) -> int:
    """C-ECHO: the node is up."""
    return STATUS_SUCCESS


def handle_store(event, store: Store, sites: SiteDirectory) -> int | Dataset:
    """C-STORE: durably store (or quarantine) the object as received, then answer."""
    sop_uid = str(event.request.AffectedSOPInstanceUID or "")
    ae_title, address = _calling_ae(event), event.assoc.requestor.address
    try:
        data = bytes(event.encoded_dataset())
    except Exception:
        LOG.exception("C-STORE %s from %r: received data cannot be encoded", sop_uid, ae_title)
        return STATUS_CANNOT_UNDERSTAND
    try:
        site = sites.lookup(ae_title, address)
        outcome = store.accept(data, sop_instance_uid=sop_uid, site_id=site[0] if site else None,
                               source=f"{sop_uid or 'no-uid'}.dcm")
    except Exception:
        LOG.exception("C-STORE %s from %r: not stored (out of resources); the sender should retry", sop_uid, ae_title)
        return STATUS_OUT_OF_RESOURCES
    if outcome.status == "quarantined":
        LOG.warning("C-STORE %s from %r: quarantined (%s)", sop_uid, ae_title, outcome.reason_code)
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
        self.server = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        for sop_class in SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        ae.maximum_associations = self.config.max_associations
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.network_timeout = self.config.network_timeout_s
        # 0: no limit on the PDUs we accept, so senders can use their largest (fewer round trips).
        ae.maximum_pdu_size = 0
        return ae

    def handlers(self) -> list:
        return [(evt.EVT_CONN_OPEN, handle_open),
                (evt.EVT_REQUESTED, handle_requested, [self.sites]),
                (evt.EVT_C_ECHO, handle_echo),
                (evt.EVT_C_STORE, handle_store, [self.store, self.sites])]

    def start(self) -> Receiver:
        """Recover, start listening (non-blocking) and start the ticker."""
        recover(self.settings, self.engine)
        self.tick()  # series that became stable while we were down
        ae = self.build_ae()
        self.server = ae.start_server((self.config.bind_address, self.config.port), block=False,
                                      evt_handlers=self.handlers(), ssl_context=self.config.ssl_context())
        # Accepted sockets inherit TCP_NODELAY from the listening socket on Linux; the
        # EVT_CONN_OPEN handler sets it again for platforms where they do not.
        with contextlib.suppress(OSError):
            self.server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ticker = threading.Thread(target=self._run_ticker, name="corelab-receiver-ticker", daemon=True)
        self._ticker.start()
        LOG.info("listening as %s on port %d (TLS %s, max %d associations, series stable after %.0f s)",
                 self.config.ae_title, self.port, "on" if self.config.tls_cert else "off",
                 self.config.max_associations, self.config.stable_s)
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


__all__ = ["Receiver", "ReceiverConfig", "SiteDirectory", "Store", "TRANSFER_SYNTAXES", "claim_qc",
           "complete_stable_series", "handle_echo", "handle_open", "handle_requested", "handle_store",
           "recover", "start_qc", "transaction"]
