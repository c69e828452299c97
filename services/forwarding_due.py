"""What is due for a trial's archive, claimed by one run at a time, and the backlog: all in SQL.

Due for an active destination: per series, the newest version of each SOP instance
(``services.dicomweb_metadata.newest``: the same SOP Instance UID in two series is two objects)
of the trial's complete trial series (under the rule ``evaluable`` only evaluable series, and
no instance flagged ``needs_review``: a new version waits for the core lab's review and shows
as *held*), minus what the destination already holds (a ``sent`` record of the same SOP
Instance UID and bytes). The rows are selected with an anti-join and a LIMIT, the backlog with
COUNT/GROUP BY: no batch loads the trial.

A run claims rows with one conditional UPDATE per record (not ``sent``, and not ``pending``
within :data:`CLAIM_LEASE_S`), as :func:`corelab.lifecycle.claim` does, and keeps only those whose
rowcount is 1: of two runs at once, each instance goes with exactly one.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import and_, case, false, func, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from corelab.models import ArchiveDelivery, ArchiveDestination, Instance, Series, Site, Study, Subject, Visit, utcnow
from services.dicomweb_metadata import newest
from services.site_view import flag_sets, series_state

CLAIM_LEASE_S = 600.0
SERIES_SHOWN = 50  # series listed on the backlog page; the rest are counted ("and N more")
REPLACEMENT_NOTE = ("sent as a replacement of an earlier version under the same SOP Instance UID: the archive "
                    "keeps it only if it accepts replacements (Orthanc: OverwriteInstances true)")
Rec = aliased(ArchiveDelivery, name="rec")


def eligible_series(session: Session, dest: ArchiveDestination) -> list[int]:
    """Ids of the trial's complete trial series that the destination's rule lets go."""
    ids = list(session.exec(select(Series.id).where(Series.trial_id == dest.trial_id, Series.kind == "trial",
                                                    Series.state == "complete").order_by(col(Series.id))))
    if dest.rule == "all" or not ids:
        return ids
    chosen = col(Series.id).in_(ids)
    queried, major = flag_sets(session, chosen)
    return [sid for sid, state, qc in session.exec(select(Series.id, Series.state, Series.qc_state).where(chosen))
            if series_state(state, qc, unresolved_query=sid in queried, major_open=sid in major)[0] == "evaluable"]


def _series_filter(session: Session, dest: ArchiveDestination):
    if dest.rule == "all":
        return col(Instance.series_id).in_(select(Series.id).where(Series.trial_id == dest.trial_id,
                                                                   Series.kind == "trial", Series.state == "complete"))
    return col(Instance.series_id).in_(eligible_series(session, dest))


def _already_there(dest: ArchiveDestination, *, same_bytes: bool):
    sent = aliased(ArchiveDelivery)
    bytes_match = sent.sha256 == Instance.sha256 if same_bytes else sent.sha256 != Instance.sha256
    return select(sent.id).where(sent.destination_id == dest.id, sent.status == "sent",
                                 sent.sop_instance_uid == Instance.sop_instance_uid, bytes_match).exists()


def due_stmt(session: Session, dest: ArchiveDestination, *columns, now: dt.datetime | None = None,
             leased: bool = True, not_since: dt.datetime | None = None, held: bool = False):
    """SELECT ``columns`` (default Instance and its record ``Rec``) of what is due, or with
    ``held`` of what waits for review. ``leased`` False keeps rows a running batch claimed too;
    ``not_since`` drops rows attempted since then (a run does not retry its own failures)."""
    stmt = (select(*(columns or (Instance, Rec))).select_from(Instance)
            .join(Rec, and_(Rec.instance_id == Instance.id, Rec.destination_id == dest.id), isouter=True)
            .where(_series_filter(session, dest), newest(), ~_already_there(dest, same_bytes=True)))
    if dest.rule == "evaluable":
        stmt = stmt.where(col(Instance.needs_review).is_(held))
    elif held:
        return stmt.where(false())
    if leased:
        horizon = (now or utcnow()) - dt.timedelta(seconds=CLAIM_LEASE_S)
        stmt = stmt.where(or_(col(Rec.id).is_(None), Rec.status != "pending", col(Rec.last_attempt_at).is_(None),
                              Rec.last_attempt_at <= horizon))
    if not_since is not None:
        stmt = stmt.where(or_(col(Rec.last_attempt_at).is_(None), Rec.last_attempt_at < not_since))
    return stmt


def due(session: Session, dest: ArchiveDestination, *, now: dt.datetime | None = None, leased: bool = True,
        limit: int | None = None, not_since: dt.datetime | None = None
        ) -> list[tuple[Instance, ArchiveDelivery | None, bool]]:
    """The instances to send, oldest series first, each with its record (or None) and whether it
    replaces other bytes the destination already got under its SOP Instance UID."""
    stmt = due_stmt(session, dest, Instance, Rec, _already_there(dest, same_bytes=False).label("replacing"),
                    now=now, leased=leased, not_since=not_since)
    stmt = stmt.order_by(col(Instance.series_id), col(Instance.id))
    if limit is not None:
        stmt = stmt.limit(limit)
    return [(inst, rec, bool(replacing)) for inst, rec, replacing in session.exec(stmt).all()]


def _insert_ignore(session: Session, rows: list[dict]) -> None:
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(dialect.insert(ArchiveDelivery).values(rows)
                    .on_conflict_do_nothing(index_elements=["destination_id", "instance_id"]))


def claim(session: Session, dest: ArchiveDestination, batch: list[Instance]) -> dict[int, tuple[int, int]]:
    """Claim ``batch`` for this run: instance id -> (record id, attempts) of the records won.

    A missing record is inserted first (a concurrent insert of the same one is ignored), then
    each is claimed by one conditional UPDATE: a record another run claimed within the lease or
    already sent gives rowcount 0 and is left alone."""
    now = utcnow()
    horizon = now - dt.timedelta(seconds=CLAIM_LEASE_S)
    _insert_ignore(session, [dict(destination_id=dest.id, instance_id=i.id, series_id=i.series_id,
                                  sop_instance_uid=i.sop_instance_uid, sha256=i.sha256, status="pending", attempts=0,
                                  last_error="", created_at=now) for i in batch])
    ids = dict(session.exec(select(ArchiveDelivery.instance_id, ArchiveDelivery.id).where(
        ArchiveDelivery.destination_id == dest.id, col(ArchiveDelivery.instance_id).in_([i.id for i in batch]))).all())
    won: dict[int, tuple[int, int]] = {}
    for inst in batch:
        rec_id = ids[inst.id]
        claimed = session.execute(
            update(ArchiveDelivery)
            .where(ArchiveDelivery.id == rec_id, ArchiveDelivery.status != "sent",
                   or_(ArchiveDelivery.status != "pending", col(ArchiveDelivery.last_attempt_at).is_(None),
                       ArchiveDelivery.last_attempt_at <= horizon))
            .values(status="pending", attempts=ArchiveDelivery.attempts + 1, last_attempt_at=now)).rowcount == 1
        if claimed:  # the row is ours (locked until commit): its attempt count is the claim's token
            won[inst.id] = (rec_id, session.exec(select(ArchiveDelivery.attempts)
                                                 .where(ArchiveDelivery.id == rec_id)).one())
    return won


def record(session: Session, rec_id: int, attempts: int, error: str, note: str = "") -> bool:
    """Store one answer on a record this run still owns (pending, with the attempt it claimed);
    False when another run took it over meanwhile (its answer wins)."""
    values = dict(status="failed", last_error=error[:500], sent_at=None) if error else \
        dict(status="sent", last_error=note, sent_at=utcnow())
    return session.execute(update(ArchiveDelivery).where(ArchiveDelivery.id == rec_id,
                                                         ArchiveDelivery.status == "pending",
                                                         ArchiveDelivery.attempts == attempts)
                           .values(**values)).rowcount == 1


def waiting_series(session: Session, dest: ArchiveDestination, series_ids: set[int]) -> set[int]:
    """Those of ``series_ids`` with anything still due or held for the destination."""
    if not series_ids:
        return set()
    mine = col(Instance.series_id).in_(sorted(series_ids))
    out = set()
    for held in (False, True):
        out |= set(session.exec(due_stmt(session, dest, Instance.series_id, leased=False, held=held)
                                .where(mine).distinct()).all())
    return out


def backlog_of(session: Session, dest: ArchiveDestination) -> dict:
    """One destination's backlog: counts (waiting = pending + failed, held, sent, sent as
    replacements), the newest error, the oldest waiting series, and at most
    :data:`SERIES_SHOWN` waiting series (``series_more`` counts the rest)."""
    failed_case = func.sum(case((Rec.status == "failed", 1), else_=0))
    per_series: dict[int, dict] = {}
    for sid, n, failed in session.exec(due_stmt(session, dest, Instance.series_id, func.count(), failed_case,
                                                leased=False).group_by(Instance.series_id)).all():
        per_series[sid] = {"waiting": int(n), "failed": int(failed or 0), "held": 0}
    for sid, n in session.exec(due_stmt(session, dest, Instance.series_id, func.count(), leased=False, held=True)
                               .group_by(Instance.series_id)).all():
        per_series.setdefault(sid, {"waiting": 0, "failed": 0})["held"] = int(n)
    newest_failure = session.exec(due_stmt(session, dest, Rec.last_error, Rec.last_attempt_at, leased=False)
                                  .where(Rec.status == "failed")
                                  .order_by(col(Rec.last_attempt_at).desc()).limit(1)).first()
    sent, replacements = session.exec(
        select(func.count(), func.sum(case((ArchiveDelivery.last_error == REPLACEMENT_NOTE, 1), else_=0)))
        .where(ArchiveDelivery.destination_id == dest.id, ArchiveDelivery.status == "sent")).one()
    series_rows, oldest = [], None
    if per_series:
        base = (select(Series.id, Site.code, Series.modality, Series.completed_at, Subject.pseudonym, Visit.label)
                .join(Site, Series.site_id == Site.id, isouter=True)
                .join(Study, Series.study_id == Study.id, isouter=True)
                .join(Visit, Study.visit_id == Visit.id, isouter=True)
                .join(Subject, Visit.subject_id == Subject.id, isouter=True)
                .where(col(Series.id).in_(list(per_series))))
        oldest = session.exec(select(func.min(Series.completed_at)).where(col(Series.id).in_(list(per_series)))).one()
        for sid, site, modality, completed, pseudonym, visit in session.exec(
                base.order_by(col(Series.completed_at), col(Series.id)).limit(SERIES_SHOWN)):
            series_rows.append({"series_id": sid, "site": site, "subject": pseudonym, "visit": visit,
                                "modality": modality, "completed_at": completed, **per_series[sid]})
    waiting = sum(v["waiting"] for v in per_series.values())
    failed = sum(v["failed"] for v in per_series.values())
    return {"waiting": waiting, "pending": waiting - failed, "failed": failed,
            "held": sum(v.get("held", 0) for v in per_series.values()), "sent": int(sent),
            "replacements": int(replacements or 0), "oldest_waiting": oldest,
            "last_error": newest_failure[0] if newest_failure else "",
            "last_error_at": newest_failure[1] if newest_failure else None,
            "series": series_rows, "series_more": max(0, len(per_series) - len(series_rows))}


__all__ = ["CLAIM_LEASE_S", "REPLACEMENT_NOTE", "SERIES_SHOWN", "backlog_of", "claim", "due", "due_stmt",
           "eligible_series", "record", "waiting_series"]
