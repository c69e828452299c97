"""The audit log: append-only, hash-chained, and anchored outside the table.

Each :class:`~corelab.models.AuditEvent` stores the hash of the event before it and a hash over
its own content plus that previous hash; recomputing the chain detects an edited, deleted or
inserted row. Details must never carry a patient-identifying value.

The chain alone cannot see its own *end*: deleting the newest rows, or all of them, or
rewriting the whole chain consistently leaves a chain that recomputes. So its head is also kept
outside the table:

- **The anchor file** ``<data dir>/audit/anchor.jsonl``: after every commit that appended
  events, one JSON line ``{"count": N, "head": "<hash>", "id": ..., "at": ...}`` is appended
  (``O_APPEND``, then fsync): "the chain's N-th event had this hash". Written *after* the
  commit, so a rolled-back event is never anchored; a crash between commit and write leaves the
  table ahead of the anchor, which verification accepts (nothing was lost).
- **Every signed report** carries the head hash and count at signing in its signature record
  (``-vN.signature.json``, delivered to the outbox with the report): copies of the anchor that
  leave the core lab.

:func:`check` (``corelab audit verify``) recomputes the chain and compares it with every anchor
line and signature record: an anchored count beyond the table's length is *truncation* (the
newest rows deleted; *all* rows deleted when the table is empty), an anchored head that is not
in the table at its position is a *rewritten* chain; both are reported with the numbers. A
missing anchor file beside a non-empty table is reported too (an older data directory gets its
anchor with its next audit event).

The anchor file is bound to an engine by :func:`bind_anchor`; ``corelab.db.get_engine`` binds
each engine it creates to its settings' data directory. An attacker who can rewrite the anchor
file as well as the table defeats it; the signature records at the sites, and an append-only
attribute on the file (``chattr +a``) or a copy shipped off the machine, are the answer to that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import event as sa_event
from sqlalchemy import func, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from corelab.models import AuditEvent, utcnow

GENESIS = "0" * 64
ANCHOR_FILE = Path("audit") / "anchor.jsonl"
"""The anchor file, relative to the data directory."""

LOG = logging.getLogger("corelab.audit")
_PENDING = "corelab_audit_events"   # session.info: events appended in the open transaction
_TO_WRITE = "corelab_audit_anchor"  # session.info: (path, count, head, id) once the commit is certain
_anchors: weakref.WeakKeyDictionary[Engine, Path] = weakref.WeakKeyDictionary()  # engine -> anchor file
_anchors_lock = threading.Lock()


def _digest(prev_hash: str, event: AuditEvent) -> str:
    payload = {
        "prev": prev_hash,
        "at": event.at.isoformat(),
        "actor": event.actor,
        "action": event.action,
        "entity": event.entity,
        "entity_id": event.entity_id,
        "detail": event.detail,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --- the anchor -------------------------------------------------------------------------------------

def anchor_path(data_dir: Path) -> Path:
    """The anchor file of a data directory."""
    return Path(data_dir) / ANCHOR_FILE


def bind_anchor(engine: Engine, data_dir: Path) -> Path:
    """Anchor the audit chain of ``engine``'s store in ``data_dir`` (first binding wins)."""
    path = anchor_path(data_dir).absolute()
    with _anchors_lock:
        return _anchors.setdefault(engine, path)


def bound_anchor(session: Session) -> Path | None:
    """The anchor file of the session's store, or None when none is bound."""
    try:
        engine = session.get_bind()
    except Exception:  # an unbound session
        return None
    return _anchors.get(getattr(engine, "engine", engine))  # a Connection: its Engine


def position(session: Session, event: AuditEvent) -> int:
    """The event's place in the chain (1 for the first), as seen by this transaction."""
    return int(session.exec(select(func.count()).select_from(AuditEvent)
                            .where(col(AuditEvent.id) <= event.id)).one())


def _write_anchor(path: Path, count: int, head: str, event_id: int | None) -> None:
    line = json.dumps({"count": count, "head": head, "id": event_id, "at": utcnow().isoformat()},
                      sort_keys=True) + "\n"
    created = not path.exists()
    path.parent.mkdir(exist_ok=True)  # in the data directory, which must exist (never re-created here)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write of one short line: atomic with O_APPEND
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@sa_event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    # The outermost commit only (a savepoint's release fires this too). Events whose savepoint
    # was rolled back are no longer persistent and are not anchored.
    if session.in_nested_transaction() or not session.info.get(_PENDING):
        return
    events = [e for e in session.info.pop(_PENDING) if inspect(e).persistent]
    path = bound_anchor(session)
    if not events or path is None:
        return
    session.flush()
    last = max(events, key=lambda e: e.id)
    session.info[_TO_WRITE] = (path, position(session, last), last.hash, last.id)


@sa_event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return
    pending = session.info.pop(_TO_WRITE, None)
    if pending is None:
        return
    path, count, head, event_id = pending
    try:
        _write_anchor(path, count, head, event_id)
    except OSError as exc:  # the events are committed; verification will show the anchor behind
        LOG.error("audit anchor %s not written (event #%d, %s...): %s", path, count, head[:12], exc)


@sa_event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended (committed or rolled back)
        session.info.pop(_PENDING, None)
        session.info.pop(_TO_WRITE, None)


# --- appending ----------------------------------------------------------------------------------------

def append(session: Session, *, actor: str, action: str, entity: str = "", entity_id: str | int = "",
           detail: dict | None = None, attempts: int = 30) -> AuditEvent:
    """Append one event after the newest one, inside the caller's transaction.

    The insert runs in a savepoint: if a concurrent writer took the same tail, the unique
    ``prev_hash`` makes the insert fail, the savepoint is rolled back, and it retries after the
    new tail (after a short random pause, so a crowd of writers spreads out). The event lands
    when the caller commits, together with the change it records; then the new head is appended
    to the anchor file.
    """
    for attempt in range(attempts):
        if attempt:
            time.sleep(random.uniform(0, 0.002 * min(attempt, 10)))
        last = session.exec(select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(1)).first()
        prev_hash = last.hash if last else GENESIS
        event = AuditEvent(at=utcnow(), actor=actor, action=action, entity=entity,
                           entity_id=str(entity_id), detail=detail or {}, prev_hash=prev_hash, hash="")
        event.hash = _digest(prev_hash, event)
        try:
            with session.begin_nested():
                session.add(event)
        except IntegrityError:
            continue
        session.info.setdefault(_PENDING, []).append(event)
        return event
    raise RuntimeError(f"audit log: could not append {action!r} after {attempts} attempts (contention)")


# --- verifying ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChainProblem:
    """One break. ``event_id`` is None for what concerns the chain as a whole (truncation)."""

    event_id: int | None
    problem: str


@dataclass(frozen=True)
class Anchor:
    """One statement "the chain's ``count``-th event had hash ``head``", and where it was read."""

    count: int
    head: str
    source: str


@dataclass
class AuditCheck:
    """What :func:`check` found: the table, the anchors, and every problem (none: intact)."""

    table_count: int
    table_head: str
    anchor_file: str | None
    anchor_count: int | None
    anchor_head: str | None
    anchors_checked: int
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"intact": self.intact, **{k: v for k, v in asdict(self).items() if k != "problems"},
                "problems": [asdict(p) for p in self.problems]}


def read_anchor(path: Path) -> tuple[list[Anchor], list[ChainProblem]]:
    """The anchor file's lines (an unreadable line is a problem, not an exception)."""
    anchors, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                anchors.append(Anchor(int(doc["count"]), str(doc["head"]), f"{path.name}:{n}"))
            except (ValueError, KeyError, TypeError):
                problems.append(ChainProblem(None, f"anchor file {path} line {n} is not an anchor record "
                                                   "(edited or damaged)"))
    return anchors, problems


def _chain_problems(events: list[AuditEvent]) -> list[ChainProblem]:
    problems: list[ChainProblem] = []
    prev_hash = GENESIS
    for event in events:
        if event.prev_hash != prev_hash:
            problems.append(ChainProblem(event.id, "previous-hash link broken (row deleted or inserted before it)"))
        if _digest(event.prev_hash, event) != event.hash:
            problems.append(ChainProblem(event.id, "content does not match its hash (row edited)"))
        prev_hash = event.hash
    return problems


def _anchor_problems(events: list[AuditEvent], anchors: list[Anchor]) -> list[ChainProblem]:
    """Compare the table with the anchors; a head found elsewhere in the table is left to the
    chain check (an earlier row was deleted or inserted, which breaks a link it reports)."""
    if not anchors:
        return []
    n = len(events)
    where = {e.hash: i + 1 for i, e in enumerate(events)}
    newest = max(anchors, key=lambda a: a.count)
    problems: list[ChainProblem] = []
    if n == 0:
        return [ChainProblem(None, f"all rows deleted: the anchor ({newest.source}) records {newest.count} "
                                   f"events, head {newest.head[:16]}..., the table holds none")]
    if newest.count > n and newest.head not in where:
        problems.append(ChainProblem(None, f"truncated: the anchor ({newest.source}) records {newest.count} "
                                           f"events, head {newest.head[:16]}...; the table holds {n}, head "
                                           f"{events[-1].hash[:16]}...: the newest {newest.count - n} rows "
                                           "were deleted"))
    changed = sorted((a for a in anchors if a.count <= n and a.head not in where), key=lambda a: a.count)
    if changed:
        first = changed[0]
        row = events[first.count - 1]
        problems.append(ChainProblem(row.id, f"rewritten: event #{first.count} (id {row.id}) has hash "
                                             f"{row.hash[:16]}..., the anchor ({first.source}) recorded "
                                             f"{first.head[:16]}...; {len(changed)} of "
                                             f"{sum(a.count <= n for a in anchors)} anchored heads within the "
                                             "table are not in it"))
    return problems


def check(session: Session, anchor_file: Path | None = None, extra_anchors: list[Anchor] = ()) -> AuditCheck:
    """Recompute the chain and compare it with the anchor file (default: the store's bound
    one) and ``extra_anchors`` (e.g. the heads in signature records)."""
    events = list(session.exec(select(AuditEvent).order_by(col(AuditEvent.id))))
    problems = _chain_problems(events)
    path = Path(anchor_file) if anchor_file is not None else bound_anchor(session)
    anchors: list[Anchor] = []
    if path is not None:
        if path.is_file():
            anchors, unreadable = read_anchor(path)
            problems += unreadable
        elif events:
            problems.append(ChainProblem(None, f"no anchor file {path}: the table holds {len(events)} events but "
                                               "nothing outside it records them (deleted? A data directory from "
                                               "before anchoring gets the file with its next audit event)"))
    anchors += list(extra_anchors)
    problems += _anchor_problems(events, anchors)
    newest = max(anchors, key=lambda a: a.count) if anchors else None
    return AuditCheck(table_count=len(events), table_head=events[-1].hash if events else GENESIS,
                      anchor_file=str(path) if path is not None else None,
                      anchor_count=newest.count if newest else None, anchor_head=newest.head if newest else None,
                      anchors_checked=len(anchors), problems=problems)


def verify(session: Session, anchor_file: Path | None = None) -> list[ChainProblem]:
    """Every break found (empty list: intact): the chain, and the anchor bound to the store."""
    return check(session, anchor_file).problems


def signature_anchors(root: Path) -> tuple[list[Anchor], list[ChainProblem]]:
    """The heads recorded in signature records (``*.signature.json``) below ``root``.

    Records from before anchoring (no ``audit_count``) are skipped; an unreadable one is a problem.
    """
    anchors, problems = [], []
    for path in sorted(Path(root).rglob("*.signature.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            problems.append(ChainProblem(None, f"signature record {path} is unreadable (edited or damaged)"))
            continue
        if isinstance(doc, dict) and doc.get("audit_count") and doc.get("audit_head_hash"):
            try:
                anchors.append(Anchor(int(doc["audit_count"]), str(doc["audit_head_hash"]), path.name))
            except (TypeError, ValueError):
                problems.append(ChainProblem(None, f"signature record {path}: audit_count is not a number"))
    return anchors, problems
