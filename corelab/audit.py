"""The audit log: append-only and hash-chained.

Each :class:`~corelab.models.AuditEvent` stores the hash of the event before it and a hash over
its own content plus that previous hash; :func:`verify` recomputes the chain, so an edited,
deleted or inserted row is detected. Details must never carry a patient-identifying value.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from corelab.models import AuditEvent, utcnow

GENESIS = "0" * 64


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


def append(session: Session, *, actor: str, action: str, entity: str = "", entity_id: str | int = "",
           detail: dict | None = None, attempts: int = 5) -> AuditEvent:
    """Append one event after the newest one, inside the caller's transaction.

    The insert runs in a savepoint: if a concurrent writer took the same tail, the unique
    ``prev_hash`` makes the insert fail, the savepoint is rolled back, and it retries after the
    new tail. The event lands when the caller commits, together with the change it records.
    """
    for _ in range(attempts):
        last = session.exec(select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(1)).first()
        prev_hash = last.hash if last else GENESIS
        event = AuditEvent(at=utcnow(), actor=actor, action=action, entity=entity,
                           entity_id=str(entity_id), detail=detail or {}, prev_hash=prev_hash, hash="")
        event.hash = _digest(prev_hash, event)
        try:
            with session.begin_nested():
                session.add(event)
            return event
        except IntegrityError:
            continue
    raise RuntimeError(f"audit log: could not append {action!r} after {attempts} attempts (contention)")


@dataclass(frozen=True)
class ChainProblem:
    event_id: int
    problem: str


def verify(session: Session) -> list[ChainProblem]:
    """Recompute the chain; return every break found (empty list: intact)."""
    problems: list[ChainProblem] = []
    prev_hash = GENESIS
    for event in session.exec(select(AuditEvent).order_by(col(AuditEvent.id))):
        if event.prev_hash != prev_hash:
            problems.append(ChainProblem(event.id, "previous-hash link broken (row deleted or inserted before it)"))
        if _digest(event.prev_hash, event) != event.hash:
            problems.append(ChainProblem(event.id, "content does not match its hash (row edited)"))
        prev_hash = event.hash
    return problems
