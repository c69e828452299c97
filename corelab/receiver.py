"""The DICOM node: Storage SCP and Verification SCP over pynetdicom.

Layout follows pynetdicom's ``apps/qrscp``: handlers that do one thing and return a status,
their dependencies bound through the ``(event, handler, [args])`` tuple, and a small object
(:class:`Receiver`) that starts the server (``block=False``) and a background ticker.

This module is the wiring only; each job lives in its own module:

- :mod:`corelab.receiver_config`: :class:`ReceiverConfig`, the transfer syntaxes offered and the
  association limits' defaults.
- :mod:`corelab.association`: association hygiene against hostile or broken peers
  (:class:`AssociationGuard`: handshake time-outs, per-host caps; the guarded server's raw socket
  and TLS accept handling).
- :mod:`corelab.dicom_handlers`: the pynetdicom event handlers, and what a sender is told
  (C-STORE statuses, A-ASSOCIATE-RJ reasons).
- :mod:`corelab.receiver_store`: :class:`SiteDirectory` (calling AE title to site) and
  :class:`Store` (one short transaction per object).
- :mod:`corelab.series_completion`: durability and restart (:func:`recover`), series completion
  and the once-only QC start (:func:`claim_qc`).

The names other code imports from here (the previous single module's ``__all__``) are re-exported
below. Every module logs to the one logger ``corelab.receiver``.

Logs carry UIDs, AE titles, addresses and attribute keywords only: never a patient value.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.utils import make_target

from corelab.association import AssociationGuard, GuardedAssociationServer, GuardedRequestHandler
from corelab.db import open_store, transaction
from corelab.dicom_handlers import (
    ae_title_problem,
    handle_closed,
    handle_data,
    handle_echo,
    handle_open,
    handle_requested,
    handle_store,
    is_resource_failure,
)
from corelab.ingest import SOP_CLASSES
from corelab.receiver_config import (
    HANDSHAKE_TIMEOUT_S,
    MAX_ASSOCIATIONS_PER_HOST,
    MAX_HANDSHAKES,
    MAX_HANDSHAKES_PER_HOST,
    TRANSFER_SYNTAXES,
    ReceiverConfig,
)
from corelab.receiver_store import SiteDirectory, Store
from corelab.series_completion import claim_qc, complete_stable_series, recover, start_qc
from corelab.settings import Settings

LOG = logging.getLogger("corelab.receiver")

_PYNETDICOM_NO_LIMIT = 100_000  # pynetdicom's thread count is not the limit: AssociationGuard's is


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
        claimed (see :func:`~corelab.series_completion.claim_qc`); it should return quickly (queue the work).
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
