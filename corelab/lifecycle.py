"""The series lifecycle: the one owner of ``Series.state`` and ``Series.qc_state``.

Every change of a series' state goes through :func:`move` (or, for the one race that needs
it, :func:`claim`): it refuses a transition the table below does not allow, and writes the
audit event. Nothing else assigns either column (``tests/test_lifecycle.py`` greps for it).

Receipt (``state``)::

    receiving -> complete            the series is stable (no new object for a while)
    receiving -> quarantined         an object of it was held (it is released back to receiving)
    complete  -> receiving           a new or re-sent object arrived after completion
    complete  -> quarantined
    quarantined -> receiving         released from quarantine

QC (``qc_state``)::

    pending -> queued                QC start claimed (exactly once, see :func:`claim`)
    queued  -> running -> done | failed   (:func:`start_running` where the QC work begins)
    pending | queued -> done         QC that needs no flow (a non-PET series) or ran inline
    pending | queued -> failed       QC could not start, or could not do its job
    queued  -> pending               a start that could not be handed over is put back
    done | failed -> queued | running | done | failed   QC again: a new manual version, a fill
                                     sheet or sphere centres given, a series re-sent
    done | failed -> pending         QC again, started like a new arrival (the node's ticker, or
                                     whoever claims it): a phantom's fill sheet given

A re-check of a series already ``done`` or ``failed`` (the nightly re-validation, a second
demo) does not pass through ``running``: :func:`start_running` leaves it where it is, and its
outcome moves it only when the judgement changed, so a re-run that finds the same writes no
event. A batch (a Great Expectations run over many series) moves with :func:`move_all`: one
audit event for the batch, naming every series moved.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update
from sqlmodel import Session

from corelab import audit
from corelab.models import QC_STATES, SERIES_STATES, Series, utcnow

__all__ = ["STATE_TRANSITIONS", "QC_TRANSITIONS", "IllegalTransition", "claim", "move", "move_all",
           "start_running"]

STATE_TRANSITIONS: dict[str, frozenset[str]] = {
    "receiving": frozenset({"complete", "quarantined"}),
    "complete": frozenset({"receiving", "quarantined"}),
    "quarantined": frozenset({"receiving"}),
}

QC_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"queued", "running", "done", "failed"}),
    "queued": frozenset({"running", "done", "failed", "pending"}),
    "running": frozenset({"done", "failed"}),
    "done": frozenset({"pending", "queued", "running", "done", "failed"}),
    "failed": frozenset({"pending", "queued", "running", "done", "failed"}),
}

assert set(STATE_TRANSITIONS) == set(SERIES_STATES) and set(QC_TRANSITIONS) == set(QC_STATES)


class IllegalTransition(ValueError):
    """A series was asked to move where its lifecycle does not go; names the series and both states."""


def move(session: Session, series: Series, *, state: str | None = None, qc_state: str | None = None,
         actor: str, reason: str = "", at: dt.datetime | None = None, action: str | None = None,
         detail: dict | None = None) -> bool:
    """Move a series to ``state`` and/or ``qc_state``; returns whether anything changed.

    A move to the state it is in changes nothing and writes no event (except ``done -> done``
    and ``failed -> failed`` for QC, which are re-runs and stamp ``qc_at``). Moving QC also sets
    ``qc_at``. The audit event (``action``, default ``series.<column>``) carries from, to, the
    reason and ``detail``.

    Raises
    ------
    IllegalTransition
        The transition is not in :data:`STATE_TRANSITIONS` / :data:`QC_TRANSITIONS`.
    """
    moves = [(column, new) for column, new, table in (("state", state, STATE_TRANSITIONS),
                                                       ("qc_state", qc_state, QC_TRANSITIONS))
             if new is not None and _check(series, column, new, table)]  # all checked before any is made
    changed = False
    for column, new in moves:
        old = getattr(series, column)
        setattr(series, column, new)
        if column == "qc_state":
            series.qc_at = at or utcnow()
        if new != old:
            audit.append(session, actor=actor, action=action or f"series.{column}", entity="series",
                         entity_id=series.series_uid,
                         detail={"from": old, "to": new, **({"reason": reason} if reason else {}), **(detail or {})})
        changed = True
    return changed


def _check(series: Series, column: str, new: str, table: dict[str, frozenset[str]]) -> bool:
    """Whether moving ``column`` to ``new`` changes anything; raises when the move is not allowed."""
    old = getattr(series, column)
    if new not in table:
        raise IllegalTransition(f"series {series.id}: {column} {new!r} is not a state; use one of {sorted(table)}")
    if new == old and new not in table[old]:
        return False
    if new not in table[old]:
        raise IllegalTransition(f"series {series.id}: {column} cannot go from {old!r} to {new!r} "
                                f"(allowed: {', '.join(sorted(table[old])) or 'none'})")
    return True


def move_all(session: Session, series: list[Series], *, qc_state: str, actor: str, reason: str = "",
             at: dt.datetime | None = None, action: str | None = None, detail: dict | None = None) -> list[Series]:
    """Move the QC state of a batch of series at once; one audit event names every series moved.

    Every move is checked first (an illegal one raises :class:`IllegalTransition` before any
    series changes). Series already in ``qc_state`` are left alone, unless a re-run (``done``,
    ``failed``) which only stamps ``qc_at``. Returns the series whose state changed.
    """
    to_move = [s for s in series if _check(s, "qc_state", qc_state, QC_TRANSITIONS)]
    when = at or utcnow()
    changed = []
    for s in to_move:
        if s.qc_state != qc_state:
            changed.append((s, s.qc_state))
        s.qc_state, s.qc_at = qc_state, when
    if changed:
        audit.append(session, actor=actor, action=action or "series.qc_state", entity="series",
                     entity_id=changed[0][0].series_uid if len(changed) == 1 else f"{len(changed)} series",
                     detail={"to": qc_state, "from": {s.series_uid: old for s, old in changed},
                             **({"reason": reason} if reason else {}), **(detail or {})})
    return [s for s, _ in changed]


def start_running(session: Session, series: list[Series], *, actor: str, reason: str = "") -> list[Series]:
    """Mark the QC of ``series`` as running where the work begins: only those ``pending`` or
    ``queued`` (a re-check of a ``done``/``failed`` series keeps its state until its outcome);
    one audit event for the batch. Returns the series moved."""
    return move_all(session, [s for s in series if s.qc_state in ("pending", "queued")], qc_state="running",
                    actor=actor, reason=reason or "QC started")


def claim(session: Session, series_id: int, *, actor: str, action: str = "series.qc_state") -> Series | None:
    """Claim a completed series' QC start: ``pending -> queued`` in one atomic UPDATE, so only one
    caller in any process wins (a receiver and a recovery pass may race). Returns the series to
    the winner (its move audited like any other, with its instance count, checksum and
    completeness), None to everyone else."""
    won = session.execute(update(Series)
                          .where(Series.id == series_id, Series.qc_state == "pending", Series.state == "complete")
                          .values(qc_state="queued", qc_at=utcnow())).rowcount == 1
    if not won:
        return None
    series = session.get(Series, series_id)
    session.refresh(series)
    audit.append(session, actor=actor, action=action, entity="series", entity_id=series.series_uid,
                 detail={"from": "pending", "to": "queued", "instances": series.instance_count,
                         "checksum": series.checksum, "completeness": series.completeness})
    return series
