"""Series completion, the once-only QC start, and restart recovery.

Its own module because it runs on the node's ticker (and in ``corelab watch``), not in any
pynetdicom thread: it reads and updates series rows, never a socket. :mod:`corelab.receiver`
calls :func:`recover` at start and :func:`complete_stable_series` on every tick; the inbox
(``flows/receive.py``, ``corelab watch``) calls :func:`start_qc` for what it completed itself.

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
positions), then claims its QC start (:func:`corelab.lifecycle.claim`: one atomic ``UPDATE ...
SET qc_state='queued' WHERE qc_state='pending'``): only one caller, in any process, before or
after a restart, can win, and the winner records an audit event and calls ``on_complete(series_id)``. The kernel never imports
a flow: the caller hands in the callback (``flows/receive.py`` starts the Prefect QC).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from corelab import lifecycle
from corelab.db import retrying, transaction
from corelab.ingest import complete_series
from corelab.models import Instance, Series, utcnow
from corelab.receiver_store import Store
from corelab.settings import Settings

# The node's one logger, whichever of its modules logs (operators and tests filter on this name).
LOG = logging.getLogger("corelab.receiver")


def claim_qc(engine: Engine, series_id: int, *, actor: str = "receiver") -> bool:
    """Claim the QC start of a complete series: True for exactly one caller, ever.

    The conditional UPDATE is atomic in SQLite and PostgreSQL alike, so two threads, two
    processes or a process before and after a crash cannot both win; the winner's audit event
    is written in the same transaction.
    """
    def once() -> bool:
        with transaction(engine) as session:
            return lifecycle.claim(session, series_id, actor=actor, action="series.qc_queued") is not None
    return bool(retrying(once, f"claim QC of series {series_id}"))


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
        except Exception as exc:  # QC is claimed: mark it failed rather than leave it queued in silence
            LOG.exception("series %d: starting QC failed; marked qc_state=failed (the nightly QC retries it)",
                          series_id)
            mark_start_failed(engine, [series_id], reason=f"starting QC failed: {type(exc).__name__}: {exc}",
                              actor=actor)
    return started


def mark_start_failed(engine: Engine, series_ids: list[int], *, reason: str, actor: str) -> list[int]:
    """Mark failed the QC of series whose start could not be handed over (still ``queued`` or
    ``running``; one that finished meanwhile keeps its outcome); returns the ids marked."""
    with transaction(engine) as session:
        rows = [s for s in session.exec(select(Series).where(col(Series.id).in_(series_ids)).order_by(col(Series.id)))
                if s.qc_state in ("queued", "running")]
        return [s.id for s in lifecycle.move_all(session, rows, qc_state="failed", actor=actor, reason=reason)]


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
                # Claimed by a conditional UPDATE before anything is read: it holds the row (SQLite:
                # the store) until the commit, so an object arriving meanwhile waits and then reopens
                # the series, and none committed before is left out of the checksum read below.
                claimed = session.execute(update(Series).where(col(Series.id) == series_id, stable)
                                          .values(completed_at=utcnow())).rowcount
                if not claimed:  # another receiver got there first, or an object just arrived
                    return False
                series = session.exec(select(Series).where(Series.id == series_id)).one()
                complete_series(session, series, actor="receiver")
                LOG.info("series %s complete: %d instances, state %s%s", series.series_uid, series.instance_count,
                         series.state, "" if series.completeness.get("complete", True)
                         else f", flagged: {'; '.join(series.completeness.get('findings', []))}")
                return True
        if retrying(once, f"complete series {series_id}"):
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


STAGING_LOCK = ".lock"  # in each STOW-RS staging folder, flock'ed by the request using it
# An unindexed spool file without a series row is removed at recovery only when older than this: any
# writer (the node, the portal, a drop) commits an object within seconds of writing its file.
UNATTRIBUTED_GRACE_S = 600


def remove_stale_staging(settings: Settings) -> int:
    """Remove the STOW-RS staging folders no live request holds.

    A request holds an exclusive ``flock`` on its folder's :data:`STAGING_LOCK` while it runs
    (``services.stow_staging``) and removes the folder itself; only a crash leaves one behind,
    and the kernel drops a dead process's locks. So a folder is removed when its lock can be
    taken without waiting, whatever PID its name carries (PIDs are reused, and another PID
    namespace's are not ours to judge). Its parts were never ingested, so never acknowledged:
    the client sends them again. Returns the number of folders removed. Call it off the event
    loop: it walks and deletes files.
    """
    import fcntl

    root = settings.stow_staging_dir
    removed = 0
    for folder in (root.iterdir() if root.is_dir() else ()):
        if folder.is_symlink() or not folder.is_dir():
            folder.unlink(missing_ok=True)  # nothing else belongs here: a planted link is never followed
            removed += 1
            continue
        try:
            fd = os.open(folder / STAGING_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue  # removed meanwhile
        except OSError:  # a planted link as the lock: no request made this folder
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live request's
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


def recover(settings: Settings, engine: Engine) -> dict:
    """Clean up after a crash: remove half-written files and dead requests' STOW-RS staging,
    index written-but-unindexed files.

    Returns
    -------
    dict
        ``partial_removed``, ``reindexed``, ``unattributed_removed`` counts, ``staging_removed``
        when a dead request's staging folder was removed, and ``unattributed_kept`` for files
        without a series younger than :data:`UNATTRIBUTED_GRACE_S` (left for a later recovery).
    """
    out = {"partial_removed": 0, "reindexed": 0, "unattributed_removed": 0}
    staging = remove_stale_staging(settings)
    if staging:
        out["staging_removed"] = staging
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
            if time.time() - path.stat().st_mtime < UNATTRIBUTED_GRACE_S:
                # Perhaps another process's (the portal's, a drop's) first object of a new series,
                # written and not yet committed: removing it would lose an object it is about to
                # acknowledge. A crash's leftover is removed by a later recovery.
                out["unattributed_kept"] = out.get("unattributed_kept", 0) + 1
                continue
            path.unlink()
            out["unattributed_removed"] += 1
            continue
        store.accept(path.read_bytes(), sop_instance_uid=path.stem, site_id=site_id, source=path.name)
        out["reindexed"] += 1
    if any(out.values()):
        LOG.warning("recovery after restart: %s", out)
    return out


__all__ = ["STAGING_LOCK", "UNATTRIBUTED_GRACE_S", "claim_qc", "complete_stable_series", "mark_start_failed", "recover",
           "remove_stale_staging", "start_qc"]
