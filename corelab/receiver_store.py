"""The node's store side: which site a sender is, and where its objects go.

Kept apart from the pynetdicom handlers (:mod:`corelab.dicom_handlers`) so that storage has no
network code in it, as in pynetdicom's ``apps/qrscp``: the handlers get a :class:`Store` and a
:class:`SiteDirectory` bound through the ``(event, handler, [args])`` tuple, and restart recovery
(:mod:`corelab.series_completion`) uses the same :class:`Store`. Each object is accepted in one
short transaction (:func:`corelab.db.retrying` on lost races and lock time-outs); ingest itself
(:func:`corelab.ingest.accept_object`) decides stored, duplicate, new version or quarantined.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib

from sqlalchemy.engine import Engine
from sqlmodel import select

from corelab.db import retrying, transaction
from corelab.ingest import Outcome, accept_object
from corelab.models import Site
from corelab.settings import Settings

# Striped locks by SOP Instance UID: two copies of one instance arriving at once must not both
# decide "version 1" and overwrite each other's file before the unique index stops one of them.
_LOCK_STRIPES = 64


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
            return retrying(once, f"store {sop_instance_uid}")


__all__ = ["SiteDirectory", "Store"]
