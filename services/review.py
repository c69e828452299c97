"""Use cases of deviation review: queries to sites (open, answer, resolve) and waivers."""

from __future__ import annotations

from sqlmodel import Session

from corelab import site_queries


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
