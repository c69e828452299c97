"""The watched inbox: a folder per site, polled, with the same checks and store as the DICOM node.

A site (or its transfer tool) puts files, folders or zip archives into
``<data_dir>/inbox/<SITE>/``. Each top-level entry is taken once nothing in it changed for
``settle_s`` seconds (a copy in progress is left alone; names starting with ``.`` are ignored,
so a tool can upload as ``.name`` and rename when done). It is ingested through
:func:`corelab.ingest.ingest_path`, so every series it touches is complete at once; the entry is
deleted only after its transaction committed (its bytes are then in the spool or in
quarantine). A folder for a site code that is not registered is left alone and logged.

Poison: every object is stored or quarantined on its own, so an entry cannot fail for what it
holds. Should one fail all the same (a defect), it is moved aside to
``<data_dir>/inbox-rejected/<SITE>/`` at once, with a quarantine item saying so; an entry that
keeps failing on a local file error is moved aside after :data:`MAX_ATTEMPTS`. A database that
is down or a full disk ends the poll and leaves every entry for the next one. Logs name an entry
by its number in the site's inbox, never by its name.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlmodel import select

from corelab.db import transaction
from corelab.ingest import ingest_path
from corelab.models import QuarantineItem, Series, Site, utcnow
from corelab.settings import Settings
from corelab.validate import safe_join

LOG = logging.getLogger("corelab.inbox")
MAX_ATTEMPTS = 3
# Failures of the store itself, not of an entry: the poll ends, every entry waits for the next.
_GLOBAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOMEM}
_attempts: dict[tuple[str, str, float], int] = {}  # in-process: (site, entry, mtime) -> failures


def inbox_dir(settings: Settings) -> Path:
    return settings.data_dir / "inbox"


def rejected_dir(settings: Settings) -> Path:
    """Where entries that could not be ingested are moved (``inbox-rejected/<SITE>/``)."""
    return settings.data_dir / "inbox-rejected"


def _newest_mtime(entry: Path) -> float:
    """Newest modification time in an entry, without following a symbolic link."""
    newest = entry.lstat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for folder, dirs, files in os.walk(entry, followlinks=False):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _is_global(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) or (isinstance(exc, OSError) and exc.errno in _GLOBAL_ERRNOS)


def _move_aside(settings: Settings, engine: Engine, site_code: str, number: int, entry: Path,
                exc: BaseException) -> None:
    dest = safe_join(rejected_dir(settings), site_code, f"{utcnow():%Y%m%dT%H%M%SZ}-{number}-{uuid.uuid4().hex[:8]}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(entry, dest)
    where = dest.relative_to(settings.data_dir)
    LOG.error("inbox %s: entry #%d could not be ingested (%s); moved to %s, it will not be retried",
              site_code, number, type(exc).__name__, where)
    try:
        with transaction(engine) as session:
            site = session.exec(select(Site).where(Site.code == site_code)).first()
            session.add(QuarantineItem(
                site_id=site.id if site else None, source_name=f"inbox entry #{number}", path="", sha256="",
                reason_code="unreadable",
                reason=f"inbox entry #{number}: unreadable at step 'ingest' ({type(exc).__name__}); nothing from "
                       f"it was stored. It was moved to {where}: send its files again, or ask the core lab"))
    except SQLAlchemyError:
        LOG.exception("inbox %s: entry #%d: could not record the rejection", site_code, number)


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
        ``{site code: {"entries": n, "stored": n, "duplicates": n, "quarantined": n, ...}}``;
        an entry moved aside counts as ``rejected_entries``.
    """
    root = inbox_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    with transaction(engine) as session:
        codes = {s.code for s in session.exec(select(Site))}
    out: dict[str, dict] = {}
    now = time.time()
    for site_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                           and not p.name.startswith(".")):
        entries = sorted(p for p in site_dir.iterdir() if not p.name.startswith("."))
        if not entries:
            continue
        if site_dir.name not in codes:
            LOG.warning("inbox %r: no registered site of that code; its %d entries wait (register the site)",
                        site_dir.name[:64], len(entries))
            continue
        code = site_dir.name
        for number, entry in enumerate(entries, start=1):
            try:
                mtime = _newest_mtime(entry)
            except FileNotFoundError:  # moved away while we looked
                continue
            if now - mtime < settle_s:
                continue
            site = out.setdefault(code, {"entries": 0})
            try:
                with transaction(engine) as session:
                    summary = ingest_path(session, settings, entry, site_code=code)
                    ids = [session.exec(select(Series.id).where(Series.series_uid == uid)).one()
                           for uid in summary.series_uids]
                # Committed: every object is in the spool or in quarantine, so the drop can go.
                _remove(entry)
            except Exception as exc:  # noqa: BLE001 - sorted below: the store's failure, or this entry's
                if _is_global(exc):
                    LOG.error("inbox %s: entry #%d: the store is unavailable (%s); every entry waits for the "
                              "next poll", code, number, type(exc).__name__)
                    return out
                key = (code, entry.name, mtime)
                _attempts[key] = _attempts.get(key, 0) + 1
                if not isinstance(exc, OSError) or _attempts[key] >= MAX_ATTEMPTS:
                    try:
                        _move_aside(settings, engine, code, number, entry, exc)
                    except OSError as move_exc:
                        LOG.error("inbox %s: entry #%d cannot be moved aside (%s); fix the permissions of the "
                                  "inbox", code, number, type(move_exc).__name__)
                        continue
                    _attempts.pop(key, None)
                    site["rejected_entries"] = site.get("rejected_entries", 0) + 1
                else:
                    LOG.warning("inbox %s: entry #%d failed (%s), attempt %d of %d", code, number,
                                type(exc).__name__, _attempts[key], MAX_ATTEMPTS)
                continue
            counts = {k: v for k, v in summary.as_dict().items() if k not in ("series", "quarantine")}
            LOG.info("inbox %s: entry #%d ingested: %s", code, number, counts)
            site["entries"] += 1
            for key, value in counts.items():
                site[key] = site.get(key, 0) + value
            if on_series and ids:
                on_series(ids)
    return out


__all__ = ["MAX_ATTEMPTS", "inbox_dir", "rejected_dir", "scan_inbox"]
