"""Read use cases of the JSON API: series, deviations, queries and reports, scoped and paginated.

Each listing is restricted in SQL to what the caller's :class:`~services.access.Scope` may see,
by the same rule as :func:`services.access.may_see`: a site user reads their own site(s); a trial
manager reads the objects of their trial(s), and objects of no trial (a phantom, a site QC
report) at the sites of their trials; a physicist and an admin read everything. So a page of
results never holds a row the caller could not open by id.

Rows are plain dicts of non-identifying values (codes, UIDs, pseudonyms, states, times).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, func, or_
from sqlmodel import Session, col, select

from corelab.models import Deviation, Query, Report, Series, Site, Study, Subject, Trial, Visit
from services.access import Scope

MAX_LIMIT = 1000


def _restrict(stmt, scope: Scope, site_id_col, trial_id_col):
    """``stmt`` limited to rows whose site/trial the scope may see (see the module docstring)."""
    if scope.role == "trial-manager":
        trial_ids = select(Trial.id).where(col(Trial.code).in_(sorted(scope.trials or ())))
        site_ids = select(Site.id).where(col(Site.code).in_(sorted(scope.sites or ())))
        return stmt.where(or_(col(trial_id_col).in_(trial_ids),
                              and_(col(trial_id_col).is_(None), col(site_id_col).in_(site_ids))))
    if scope.sites is not None:
        return stmt.where(col(site_id_col).in_(select(Site.id).where(col(Site.code).in_(sorted(scope.sites)))))
    return stmt


def _page(session: Session, stmt, *, limit: int, offset: int) -> tuple[int, list]:
    """(total rows, one page of rows) of ``stmt``, which must already be ordered."""
    total = session.exec(select(func.count()).select_from(stmt.order_by(None).subquery())).one()
    limit = max(1, min(limit, MAX_LIMIT))
    return total, list(session.exec(stmt.limit(limit).offset(max(0, offset))))


def series_page(session: Session, scope: Scope, *, since: datetime | None = None, limit: int = 100,
                offset: int = 0) -> dict:
    """The series the scope may see, oldest first; ``since`` keeps those received at or after it."""
    stmt = (select(Series, Site).join(Site, Series.site_id == Site.id, isouter=True).order_by(col(Series.id)))
    stmt = _restrict(stmt, scope, Series.site_id, Series.trial_id)
    if since is not None:
        stmt = stmt.where(col(Series.received_at) >= since)
    total, rows = _page(session, stmt, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": [
        {"id": s.id, "series_uid": s.series_uid, "site": site.code if site else "", "kind": s.kind,
         "modality": s.modality, "state": s.state, "qc_state": s.qc_state, "received_at": s.received_at,
         "completed_at": s.completed_at} for s, site in rows]}


def deviation_page(session: Session, scope: Scope, *, site: str | None = None, status: str | None = None,
                   severity: str | None = None, limit: int = 100, offset: int = 0) -> dict:
    """The deviations the scope may see, with the fields of :func:`corelab.queries.deviation_rows`."""
    stmt = (select(Deviation, Series, Site, Visit, Subject, Trial)
            .join(Series, Deviation.series_id == Series.id)
            .join(Site, Series.site_id == Site.id, isouter=True)
            .join(Study, Series.study_id == Study.id, isouter=True)
            .join(Visit, Study.visit_id == Visit.id, isouter=True)
            .join(Subject, Visit.subject_id == Subject.id, isouter=True)
            .join(Trial, Series.trial_id == Trial.id, isouter=True)
            .order_by(col(Deviation.id)))
    stmt = _restrict(stmt, scope, Series.site_id, Series.trial_id)
    if site:
        stmt = stmt.where(Site.code == site)
    if status:
        stmt = stmt.where(Deviation.status == status)
    if severity:
        stmt = stmt.where(Deviation.severity == severity)
    total, rows = _page(session, stmt, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": [
        {"id": d.id, "trial": t.code if t else "", "site": st.code if st else "",
         "subject": subj.pseudonym if subj else "", "visit": v.label if v else "", "series_uid": s.series_uid,
         "rule_id": d.rule_id, "manual_section": d.manual_section, "manual_version": d.manual_version,
         "severity": d.severity, "expected": d.expected, "observed": d.observed, "status": d.status,
         "message": d.message} for d, s, st, v, subj, t in rows]}


def query_page(session: Session, scope: Scope, *, open_only: bool = False, limit: int = 100,
               offset: int = 0) -> dict:
    """The queries the scope may see (newest first), each with its thread."""
    stmt = (select(Query, Site, Deviation).join(Site, Query.site_id == Site.id)
            .join(Deviation, Query.deviation_id == Deviation.id)
            .join(Series, Deviation.series_id == Series.id)
            .order_by(col(Query.id).desc()))
    stmt = _restrict(stmt, scope, Query.site_id, Series.trial_id)
    if open_only:
        stmt = stmt.where(Query.status != "resolved")
    total, rows = _page(session, stmt, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": [
        {"id": q.id, "site": site.code, "deviation_id": dev.id, "rule_id": dev.rule_id, "severity": dev.severity,
         "deviation_status": dev.status, "status": q.status, "created_at": q.created_at,
         "updated_at": q.updated_at, "thread": list(q.thread or [])} for q, site, dev in rows]}


def report_page(session: Session, scope: Scope, *, kind: str | None = None, limit: int = 100,
                offset: int = 0) -> dict:
    """The report versions the scope may see, newest first."""
    stmt = (select(Report, Site, Trial).join(Site, Report.site_id == Site.id, isouter=True)
            .join(Trial, Report.trial_id == Trial.id, isouter=True).order_by(col(Report.id).desc()))
    stmt = _restrict(stmt, scope, Report.site_id, Report.trial_id)
    if kind:
        stmt = stmt.where(Report.kind == kind)
    total, rows = _page(session, stmt, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "items": [
        {"id": r.id, "kind": r.kind, "version": r.version, "site": site.code if site else "",
         "trial": t.code if t else "", "replaces_id": r.replaces_id, "sha256": r.sha256,
         "signed_by": r.signed_by or "", "signed_at": r.signed_at, "created_at": r.created_at}
        for r, site, t in rows]}
