"""Queries to sites and waivers: what happens to a deviation after QC found it.

A deviation (``open``) can be sent to its site as a query (the deviation becomes ``queried``);
the site answers it (query ``answered``); a physicist resolves it (query and deviation
``resolved``), or waives the deviation with a reason (deviation ``waived``, any query on it
``resolved``). Every step is an audit event (``query.open``, ``query.answer``,
``query.resolve``, ``deviation.waive``) and a message in the query's thread, so the site QC and
trial deviation reports can show it.

Messages must not carry patient-identifying values; the thread is delivered to the site.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlmodel import Session, col, select

from corelab import audit
from corelab.models import Deviation, Query, Series, Site, utcnow

__all__ = ["MAX_TEXT", "QueryError", "open_query", "answer_query", "resolve_query", "waive_deviation", "query_rows"]


MAX_TEXT = 4000
"""Longest message of a query thread or waiver reason, in characters (pages and API alike)."""


class QueryError(ValueError):
    """A query or waiver step that is not allowed; the message says why and what to do."""


def _hold(session: Session, deviation_id: int) -> None:
    """Hold the deviation's row to the end of the transaction (a no-op UPDATE: a row lock on
    PostgreSQL, the write lock on SQLite), so that an answer, a resolution, a waiver or a new
    query of it run one after the other, each reading what the one before committed."""
    session.flush()
    session.execute(update(Deviation).where(col(Deviation.id) == deviation_id)
                    .values(updated_at=Deviation.updated_at).execution_options(synchronize_session=False))


def _deviation(session: Session, deviation_id: int) -> tuple[Deviation, Series]:
    _hold(session, deviation_id)
    dev = session.get(Deviation, deviation_id, populate_existing=True)
    if dev is None:
        raise QueryError(f"no deviation {deviation_id}: `corelab deviations --json` lists their ids")
    return dev, session.get(Series, dev.series_id)


def _query(session: Session, query_id: int) -> Query:
    query = session.get(Query, query_id)
    if query is None:
        raise QueryError(f"no query {query_id}: `corelab query list` lists them")
    _hold(session, query.deviation_id)
    session.refresh(query)  # as the holder before it left it
    return query


def _message(by: str, text: str, kind: str) -> dict:
    return {"at": utcnow().isoformat(timespec="seconds"), "by": by, "kind": kind, "text": text}


def open_query(session: Session, deviation_id: int, text: str, *, actor: str) -> Query:
    """Send a deviation to its site as a query; the deviation becomes ``queried``.

    Parameters
    ----------
    deviation_id : int
    text : str
        The question to the site.
    actor : str
        Who opens it (a core-lab physicist).

    Raises
    ------
    QueryError
        When the deviation is unknown, already resolved or waived, or already has an open query.
    """
    dev, series = _deviation(session, deviation_id)
    if dev.status in ("resolved", "waived"):
        raise QueryError(f"deviation {deviation_id} is {dev.status}; only an open deviation can be queried")
    pending = session.exec(select(Query).where(Query.deviation_id == dev.id, Query.status != "resolved")).first()
    if pending is not None:
        raise QueryError(f"deviation {deviation_id} already has query {pending.id} ({pending.status})")
    if series is None or series.site_id is None:
        raise QueryError(f"deviation {deviation_id}: its series has no site to send a query to")
    query = Query(deviation_id=dev.id, site_id=series.site_id, status="open",
                  thread=[_message(actor, text, "question")])
    session.add(query)
    dev.status, dev.updated_at = "queried", utcnow()
    session.flush()
    audit.append(session, actor=actor, action="query.open", entity="query", entity_id=query.id,
                 detail={"deviation_id": dev.id, "rule_id": dev.rule_id, "text": text})
    return query


def answer_query(session: Session, query_id: int, text: str, *, site_code: str, actor: str | None = None) -> Query:
    """Record the site's answer; only the site the query was sent to may answer it.

    The thread message is signed by the site (``site_code``); the audit event names ``actor``,
    the person who answered (a portal user), or the site when no person is known (the CLI).
    """
    query = _query(session, query_id)
    site = session.get(Site, query.site_id)
    if site is None or site.code != site_code:
        raise QueryError(f"query {query_id} was sent to another site, not {site_code}")
    if query.status == "resolved":
        raise QueryError(f"query {query_id} is already resolved")
    query.thread = [*query.thread, _message(site_code, text, "answer")]
    query.status, query.updated_at = "answered", utcnow()
    session.add(query)
    session.flush()
    audit.append(session, actor=actor or site_code, action="query.answer", entity="query", entity_id=query.id,
                 detail={"deviation_id": query.deviation_id, "text": text})
    return query


def resolve_query(session: Session, query_id: int, *, actor: str, text: str = "") -> Query:
    """Close a query; its deviation becomes ``resolved``."""
    query = _query(session, query_id)
    if query.status == "resolved":
        raise QueryError(f"query {query_id} is already resolved")
    query.thread = [*query.thread, _message(actor, text or "resolved", "resolution")]
    query.status, query.updated_at = "resolved", utcnow()
    session.add(query)
    dev = session.get(Deviation, query.deviation_id)
    if dev is not None and dev.status != "waived":
        dev.status, dev.updated_at = "resolved", utcnow()
        session.add(dev)
    session.flush()
    audit.append(session, actor=actor, action="query.resolve", entity="query", entity_id=query.id,
                 detail={"deviation_id": query.deviation_id, "text": text})
    return query


def waive_deviation(session: Session, deviation_id: int, reason: str, *, actor: str) -> Deviation:
    """Waive a deviation with a reason (a physicist's decision); an unresolved query on it is closed.

    Raises
    ------
    QueryError
        When the reason is empty or the deviation is unknown or already waived.
    """
    if not reason.strip():
        raise QueryError("a waiver needs a reason (--reason)")
    dev, _series = _deviation(session, deviation_id)
    if dev.status == "waived":
        raise QueryError(f"deviation {deviation_id} is already waived")
    before = dev.status
    dev.status, dev.updated_at = "waived", utcnow()
    session.add(dev)
    closed = []
    for query in session.exec(select(Query).where(Query.deviation_id == dev.id, Query.status != "resolved")):
        query.thread = [*query.thread, _message(actor, f"deviation waived: {reason}", "waiver")]
        query.status, query.updated_at = "resolved", utcnow()
        session.add(query)
        closed.append(query.id)
    session.flush()
    audit.append(session, actor=actor, action="deviation.waive", entity="deviation", entity_id=dev.id,
                 detail={"rule_id": dev.rule_id, "reason": reason, "status_before": before,
                         "queries_closed": closed})
    return dev


def query_rows(session: Session, *, site_code: str | None = None, open_only: bool = False) -> list[dict]:
    """Queries as plain dicts (newest first): id, site, deviation, rule, status and thread."""
    stmt = (select(Query, Site, Deviation).join(Site, Query.site_id == Site.id)
            .join(Deviation, Query.deviation_id == Deviation.id).order_by(col(Query.id).desc()))
    if site_code:
        stmt = stmt.where(Site.code == site_code)
    if open_only:
        stmt = stmt.where(Query.status != "resolved")
    out = []
    for q, site, dev in session.exec(stmt):
        thread = list(q.thread or [])
        out.append({"id": q.id, "site": site.code, "deviation_id": dev.id, "rule_id": dev.rule_id,
                    "severity": dev.severity, "deviation_status": dev.status, "status": q.status,
                    "opened_at": thread[0]["at"] if thread else "", "question": thread[0]["text"] if thread else "",
                    "last": thread[-1]["text"] if thread else "", "thread": thread})
    return out
