"""Use cases of review: queries to sites (open, answer, resolve), waivers, and new versions of
instances accepted by the core lab."""

from __future__ import annotations

from sqlmodel import Session, col, select

from corelab import audit, site_queries
from corelab.models import Instance, Series


def open_query(session: Session, deviation_id: int, text: str, *, actor: str) -> dict:
    q = site_queries.open_query(session, deviation_id, text, actor=actor)
    return {"query": q.id, "deviation": q.deviation_id, "status": q.status}


def answer_query(session: Session, query_id: int, text: str, *, site_code: str, actor: str | None = None) -> dict:
    q = site_queries.answer_query(session, query_id, text, site_code=site_code, actor=actor)
    return {"query": q.id, "status": q.status}


def resolve_query(session: Session, query_id: int, *, actor: str, text: str = "") -> dict:
    q = site_queries.resolve_query(session, query_id, actor=actor, text=text)
    return {"query": q.id, "status": q.status}


def list_queries(session: Session, *, site_code: str | None = None, open_only: bool = False,
                 with_thread: bool = True) -> list[dict]:
    rows = site_queries.query_rows(session, site_code=site_code, open_only=open_only)
    return rows if with_thread else [{k: v for k, v in r.items() if k != "thread"} for r in rows]


def waive_deviation(session: Session, deviation_id: int, reason: str, *, actor: str) -> dict:
    dev = site_queries.waive_deviation(session, deviation_id, reason, actor=actor)
    return {"deviation": dev.id, "rule_id": dev.rule_id, "status": dev.status}


class NotFound(LookupError):
    """No such series (the message says what was looked for)."""


def accept_new_versions(session: Session, series_uid: str, *, actor: str) -> dict:
    """Clear the review flag of a series' new versions: the core lab has looked at them.

    A new version (same SOP Instance UID, other bytes) is kept flagged ``needs_review``; under the
    forwarding rule ``evaluable`` it waits for this before it goes to the trial's archive. Audited
    with the number of instances accepted.
    """
    series = session.exec(select(Series).where(Series.series_uid == series_uid)).first()
    if series is None:
        raise NotFound(f"no series {series_uid!r}: see `corelab series list`")
    rows = list(session.exec(select(Instance).where(Instance.series_id == series.id,
                                                    col(Instance.needs_review).is_(True))))
    for row in rows:
        row.needs_review = False
        session.add(row)
    if rows:
        audit.append(session, actor=actor, action="series.versions_accepted", entity="series",
                     entity_id=series.id, detail={"instances": len(rows)})
    return {"series": series_uid, "accepted": len(rows)}
