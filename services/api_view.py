"""Read use cases of the JSON API: series, deviations, queries and reports, scoped and paginated.

Each listing is restricted in SQL to what the caller's :class:`~services.access.Scope` may see
(:func:`services.access.restrict`), by the same rule as :func:`services.access.may_see`: a site user reads their own site(s); a trial
manager reads the objects of their trial(s), and objects of no trial (a phantom, a site QC
report) at the sites of their trials; a physicist and an admin read everything. So a page of
results never holds a row the caller could not open by id.

Rows are plain dicts of non-identifying values (codes, UIDs, pseudonyms, states, times).
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, select

from corelab.models import Deviation, Query, Report, Series, Site, Trial
from services import paging, trial_view
from services.access import Scope, restrict

MAX_LIMIT = paging.MAX_LIMIT


def series_page(session: Session, scope: Scope, *, since: datetime | None = None, limit: int = 100,
                offset: int = 0) -> dict:
    """The series the scope may see, oldest first; ``since`` keeps those received at or after it."""
    stmt = (select(Series, Site).join(Site, Series.site_id == Site.id, isouter=True).order_by(col(Series.id)))
    stmt = restrict(stmt, scope, site_id=Series.site_id, trial_id=Series.trial_id)
    if since is not None:
        stmt = stmt.where(col(Series.received_at) >= since)
    total, rows = paging.page(session, stmt, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": [
        {"id": s.id, "series_uid": s.series_uid, "site": site.code if site else "", "kind": s.kind,
         "modality": s.modality, "state": s.state, "qc_state": s.qc_state, "received_at": s.received_at,
         "completed_at": s.completed_at} for s, site in rows]}


API_DEVIATION_FIELDS = ("id", "trial", "site", "subject", "visit", "series_uid", "rule_id", "manual_section",
                        "manual_version", "severity", "expected", "observed", "status", "message")
"""The fields of an API deviation: those of :func:`corelab.queries.deviation_rows`."""


def deviation_page(session: Session, scope: Scope, *, site: str | None = None, status: str | None = None,
                   severity: str | None = None, limit: int = 100, offset: int = 0) -> dict:
    """The deviations the scope may see, oldest first, with the fields of
    :func:`corelab.queries.deviation_rows` (the query is :func:`services.trial_view.deviation_list`)."""
    data = trial_view.deviation_list(session, scope, filters={"site": site, "status": status, "severity": severity},
                                     limit=limit, offset=offset, order="id")
    return {"total": data["total"], "limit": limit, "offset": offset,
            "items": [{k: row[k] for k in API_DEVIATION_FIELDS} for row in data["rows"]]}


def query_page(session: Session, scope: Scope, *, open_only: bool = False, limit: int = 100,
               offset: int = 0) -> dict:
    """The queries the scope may see (newest first), each with its thread."""
    stmt = (select(Query, Site, Deviation).join(Site, Query.site_id == Site.id)
            .join(Deviation, Query.deviation_id == Deviation.id)
            .join(Series, Deviation.series_id == Series.id)
            .order_by(col(Query.id).desc()))
    stmt = restrict(stmt, scope, site_id=Query.site_id, trial_id=Series.trial_id)
    if open_only:
        stmt = stmt.where(Query.status != "resolved")
    total, rows = paging.page(session, stmt, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": [
        {"id": q.id, "site": site.code, "deviation_id": dev.id, "rule_id": dev.rule_id, "severity": dev.severity,
         "deviation_status": dev.status, "status": q.status, "created_at": q.created_at,
         "updated_at": q.updated_at, "thread": list(q.thread or [])} for q, site, dev in rows]}


def report_page(session: Session, scope: Scope, *, kind: str | None = None, limit: int = 100,
                offset: int = 0) -> dict:
    """The report versions the scope may see, newest first."""
    stmt = (select(Report, Site, Trial).join(Site, Report.site_id == Site.id, isouter=True)
            .join(Trial, Report.trial_id == Trial.id, isouter=True).order_by(col(Report.id).desc()))
    stmt = restrict(stmt, scope, site_id=Report.site_id, trial_id=Report.trial_id, report_kind=Report.kind)
    if kind:
        stmt = stmt.where(Report.kind == kind)
    total, rows = paging.page(session, stmt, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": [
        {"id": r.id, "kind": r.kind, "version": r.version, "site": site.code if site else "",
         "trial": t.code if t else "", "replaces_id": r.replaces_id, "sha256": r.sha256,
         "signed_by": r.signed_by or "", "signed_at": r.signed_at, "created_at": r.created_at}
        for r, site, t in rows]}
