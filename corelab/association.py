"""Association hygiene: who holds a connection or an association slot, and for how long.

Its own module because it is a job of its own, below the DICOM handlers: it counts connections
and slots per peer host, times out handshakes and caps what is read before A-ASSOCIATE, whatever
the sender then asks for. The pynetdicom event handlers (:mod:`corelab.dicom_handlers`) feed
:class:`AssociationGuard`; :class:`GuardedAssociationServer` puts it at the door (raw socket and
TLS accept handling); :mod:`corelab.receiver` wires both into the node.

Association hygiene (hostile or broken peers)
---------------------------------------------
pynetdicom 3.0.4 counts every live acceptor thread against ``maximum_associations``, including
connections that never sent a complete A-ASSOCIATE-RQ and connections already closed by the peer
whose thread still waits out ``acse_timeout`` (30 s by default): a few raw sockets sending garbage
or half an A-ASSOCIATE-RQ locked every site out with "local limit exceeded". The node therefore
counts for itself (:class:`AssociationGuard`; the constants named below are in
:mod:`corelab.receiver_config`, the AE title checks in :func:`corelab.dicom_handlers.handle_requested`):

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
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from corelab.receiver_config import MAX_ASSOCIATE_RQ_BYTES

# The node's one logger, whichever of its modules logs (operators and tests filter on this name).
LOG = logging.getLogger("corelab.receiver")


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


__all__ = ["AssociationGuard", "GuardedAssociationServer", "GuardedRequestHandler"]
