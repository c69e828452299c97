"""The watched inbox: a folder per site, polled, with the same checks and store as the DICOM node.

A site (or its transfer tool) puts files, folders or zip archives into
``<data_dir>/inbox/<SITE>/``. Each top-level entry is taken once nothing in it changed for
``settle_s`` seconds (a copy in progress is left alone; names starting with ``.`` are ignored,
so a tool can upload as ``.name`` and rename when done). It is ingested through
:func:`corelab.ingest.ingest_path`, so every series it touches is complete at once; the entry is
deleted only after its transaction committed (its bytes are then in the spool or in
quarantine). A folder for a site code that is not registered is left alone and logged.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import select

from corelab.db import transaction
from corelab.ingest import ingest_path
from corelab.models import Series, Site
from corelab.settings import Settings

LOG = logging.getLogger("corelab.inbox")


def inbox_dir(settings: Settings) -> Path:
    return settings.data_dir / "inbox"


def _newest_mtime(entry: Path) -> float:
    if entry.is_dir():
        return max((p.stat().st_mtime for p in entry.rglob("*")), default=entry.stat().st_mtime)
    return entry.stat().st_mtime


def scan_inbox(settings: Settings, engine: Engine, *, settle_s: float = 2.0,
               on_series: Callable[[list[int]], object] | None = None) -> dict:
    """Ingest every settled entry of every site's inbox once.

    Parameters
    ----------
    settings, engine
        The store.
    settle_s : float, keyword-only
        An entry is taken when nothing in it changed for this long.
    on_series : callable, optional
        Called with the ids of the series each entry completed (the caller starts their QC).

    Returns
    -------
    dict
        ``{site code: {"entries": n, "stored": n, "duplicates": n, "quarantined": n, ...}}``
    """
    root = inbox_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    with transaction(engine) as session:
        codes = {s.code for s in session.exec(select(Site))}
    out: dict[str, dict] = {}
    now = time.time()
    for site_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entries = sorted(p for p in site_dir.iterdir() if not p.name.startswith("."))
        if not entries:
            continue
        if site_dir.name not in codes:
            LOG.warning("inbox %s: no registered site %s; its %d entries wait (register the site)",
                        site_dir, site_dir.name, len(entries))
            continue
        for entry in entries:
            try:
                if now - _newest_mtime(entry) < settle_s:
                    continue
            except FileNotFoundError:  # moved away while we looked
                continue
            with transaction(engine) as session:
                summary = ingest_path(session, settings, entry, site_code=site_dir.name)
                ids = [session.exec(select(Series.id).where(Series.series_uid == uid)).one()
                       for uid in summary.series_uids]
            # Committed: every object is in the spool or in quarantine, so the drop can go.
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            counts = {k: v for k, v in summary.as_dict().items() if k not in ("series", "quarantine")}
            LOG.info("inbox %s: %s ingested: %s", site_dir.name, entry.name, counts)
            site = out.setdefault(site_dir.name, {"entries": 0})
            site["entries"] += 1
            for key, value in counts.items():
                site[key] = site.get(key, 0) + value
            if on_series and ids:
                on_series(ids)
    return out


__all__ = ["inbox_dir", "scan_inbox"]
