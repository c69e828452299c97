"""Counting and cutting a listing's statement: the one pagination of the portal's listings and API."""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, select

MAX_LIMIT = 1000
"""Most rows one API page holds."""


def count(session: Session, stmt) -> int:
    """How many rows ``stmt`` yields (its ordering dropped: it does not change the count)."""
    return session.exec(select(func.count()).select_from(stmt.order_by(None).subquery())).one()


def page(session: Session, stmt, *, limit: int, offset: int) -> tuple[int, list]:
    """(total rows, one page of rows) of ``stmt``, which must already be ordered; ``limit`` is
    held to 1..:data:`MAX_LIMIT` and ``offset`` to 0 or more, both cut by the database."""
    limit = max(1, min(int(limit), MAX_LIMIT))
    return count(session, stmt), list(session.exec(stmt.limit(limit).offset(max(0, int(offset)))))
