"""Read and download use cases of the portal's reports and trial-manager pages.

Every listing is scoped in SQL by the user's :class:`~services.access.Scope` (with
:func:`services.access.restrict`, the rule of :func:`services.access.may_see`), and every file
handed out is hashed and recorded as an audit event in the caller's transaction
(``report.download``, ``export.download``).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from sqlalchemy import and_, case, distinct, func
from sqlmodel import Session, col, select

from corelab import audit
from corelab.models import (DEVIATION_STATUSES, AuditEvent, Deviation, Report, Series, Severity, Site, Study, Subject,
                            Trial, Visit)
from corelab.qcstats import ACTIVE_STATUSES, rate_text
from corelab.settings import Settings
from reports.render import KINDS, SIGN_MEANING, ReportError, report_files
from services import paging
from services.access import Scope, restrict
from services.reports import TRIAL_EXPORT_FORMATS, export_trial_tables

REPORT_PARTS = {"html": "text/html; charset=utf-8", "pdf": "application/pdf", "signature": "application/json"}
EXPORT_TABLES = ("header_table", "deviations")
EXPORT_MEDIA = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


@dataclass(frozen=True)
class Download:
    """A file to send: the bytes hashed into the audit event are the bytes sent."""

    content: bytes
    filename: str
    media_type: str
    sha256: str


# --- reports ---------------------------------------------------------------------------------------

def _sign_events(session: Session, report_ids: list[int]) -> dict[int, dict]:
    """The ``report.sign`` audit detail of each signed report (where its meaning is recorded)."""
    if not report_ids:
        return {}
    events = session.exec(select(AuditEvent.entity_id, AuditEvent.detail).where(
        AuditEvent.action == "report.sign", AuditEvent.entity == "report",
        col(AuditEvent.entity_id).in_([str(i) for i in report_ids])))
    return {int(eid): detail or {} for eid, detail in events}


def _report_row(report: Report, site: str | None, trial: str | None, signed: dict | None) -> dict:
    parts = report.path.split("/")
    meaning = (signed or {}).get("meaning", SIGN_MEANING)
    return {"id": report.id, "kind": report.kind, "kind_title": KINDS.get(report.kind, report.kind),
            "key": parts[2] if len(parts) > 3 else "", "version": report.version, "site": site or "",
            "trial": trial or "", "created_at": report.created_at, "replaces_id": report.replaces_id,
            "sha256": report.sha256, "signed": report.signed_at is not None, "signed_by": report.signed_by or "",
            "signed_at": report.signed_at, "meaning": meaning if report.signed_at else "",
            "reason": (signed or {}).get("reason", "")}


def report_listing(session: Session, scope: Scope) -> list[dict]:
    """Every report version ``scope`` may see, newest first."""
    query = (select(Report, Site.code, Trial.code).join(Site, Report.site_id == Site.id, isouter=True)
             .join(Trial, Report.trial_id == Trial.id, isouter=True).order_by(col(Report.id).desc()))
    found = list(session.exec(restrict(query, scope, site_id=Report.site_id, trial_id=Report.trial_id,
                                       report_kind=Report.kind)))
    signs = _sign_events(session, [r.id for r, _, _ in found if r.signed_at])
    return [_report_row(r, site, trial, signs.get(r.id)) for r, site, trial in found]


def report_detail(session: Session, settings: Settings, report_id: int) -> dict | None:
    """One report version, its signature (printed name, time, meaning) and which files exist."""
    found = session.exec(select(Report, Site.code, Trial.code).join(Site, Report.site_id == Site.id, isouter=True)
                         .join(Trial, Report.trial_id == Trial.id, isouter=True)
                         .where(Report.id == report_id)).first()
    if found is None:
        return None
    report, site, trial = found
    row = _report_row(report, site, trial, _sign_events(session, [report.id]).get(report.id))
    try:
        files = report_files(settings.data_dir, report)
        row["files"] = {part: files[part].is_file() for part in REPORT_PARTS}
    except ReportError as exc:
        row["files"], row["file_error"] = {}, str(exc)
    newer = session.exec(select(Report.id, Report.version).where(Report.replaces_id == report.id)).first()
    row["replaced_by"] = {"id": newer[0], "version": newer[1]} if newer else None
    return row


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def report_download(session: Session, settings: Settings, report_id: int, part: str, *, actor: str) -> Download | None:
    """The file ``part`` (html, pdf, signature) of a report, with a ``report.download`` event.

    None when the report, the part or the file does not exist (a signature before signing).
    """
    report = session.get(Report, report_id)
    if report is None or part not in REPORT_PARTS:
        return None
    path = report_files(settings.data_dir, report)[part]
    if not path.is_file() or not _inside(path, settings.data_dir):
        return None
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    rel = path.absolute().relative_to(settings.data_dir.absolute()).as_posix()
    audit.append(session, actor=actor, action="report.download", entity="report", entity_id=report.id,
                 detail={"part": part, "path": rel, "sha256": digest, "bytes": len(content)})
    return Download(content, path.name, REPORT_PARTS[part], digest)


# --- deviations ------------------------------------------------------------------------------------

def _deviation_join(query):
    return (query.select_from(Deviation).join(Series, Deviation.series_id == Series.id)
            .join(Site, Series.site_id == Site.id, isouter=True)
            .join(Study, Series.study_id == Study.id, isouter=True)
            .join(Visit, Study.visit_id == Visit.id, isouter=True)
            .join(Subject, Visit.subject_id == Subject.id, isouter=True)
            .join(Trial, Series.trial_id == Trial.id, isouter=True))


def _scoped(query, trials, sites):
    """``query`` limited to the trial and site codes given (None: any), e.g. a scope narrowed to a choice."""
    if trials is not None:
        query = query.where(col(Trial.code).in_(sorted(trials)))
    if sites is not None:
        query = query.where(col(Site.code).in_(sorted(sites)))
    return query


DEVIATION_COLUMNS = {
    "id": Deviation.id, "series_id": Deviation.series_id, "series_uid": Series.series_uid, "trial": Trial.code,
    "site": Site.code, "subject": Subject.pseudonym, "visit": Visit.label, "rule_id": Deviation.rule_id,
    "manual_section": Deviation.manual_section, "manual_version": Deviation.manual_version,
    "severity": Deviation.severity, "expected": Deviation.expected, "observed": Deviation.observed,
    "status": Deviation.status, "message": Deviation.message}
"""The fields of a deviation row and the columns they are read from."""

_FILTER_COLUMNS = {"trial": Trial.code, "site": Site.code, "subject": Subject.pseudonym, "visit": Visit.label,
                   "severity": Deviation.severity, "status": Deviation.status, "rule": Deviation.rule_id}


DEVIATION_ORDER = {
    "review": (col(Deviation.severity), col(Site.code), col(Subject.pseudonym), col(Visit.label),
               col(Deviation.rule_id), col(Deviation.id)),
    "id": (col(Deviation.id),),
}
"""How a deviation listing is ordered: ``review`` (major first, then site, subject, visit, rule) for
the page; ``id`` (oldest first, so a client paging with ``offset`` misses no new row) for the API."""


def _scoped_deviations(query, scope: Scope):
    # Deviations are only recorded for trial series (expectations.qc.trial_pet_series joins the
    # trial), so a deviation always has a trial: may_see's "an object of no trial counts by its
    # site" never applies, and a trial manager simply sees their trials' deviations.
    return restrict(_deviation_join(query), scope, site_id=Series.site_id, trial_id=Series.trial_id,
                    always_of_a_trial=True)


def deviation_list(session: Session, scope: Scope, *, filters: dict | None = None, limit: int = 100,
                   offset: int = 0, order: str = "review") -> dict:
    """The deviations ``scope`` may see (as :func:`services.access.may_see` judges them), filtered,
    ordered (:data:`DEVIATION_ORDER`) and cut by the database; the one scoped deviation query of
    the page (:func:`deviation_page`) and the JSON API (:func:`services.api_view.deviation_page`).

    Parameters
    ----------
    filters : dict
        trial, site, subject, visit, severity, status, rule: exact values; empty ones are ignored.
    limit, offset : int
        The rows to return (limit held to 1..:data:`services.paging.MAX_LIMIT`).

    Returns
    -------
    dict
        ``rows`` (each: id, series_id, series_uid, trial, site, subject, visit, rule_id,
        manual_section, manual_version, severity, expected, observed, status, message; '' for
        what a row has none of), ``total`` (rows of every page) and ``filters`` (those applied).
    """
    filters = {k: v for k, v in (filters or {}).items() if k in _FILTER_COLUMNS and v}
    query = _scoped_deviations(select(*DEVIATION_COLUMNS.values()), scope)
    for key, value in filters.items():
        query = query.where(_FILTER_COLUMNS[key] == value)
    total, found = paging.page(session, query.order_by(*DEVIATION_ORDER[order]), limit=limit, offset=offset)
    rows = [{k: ("" if v is None else v) for k, v in zip(DEVIATION_COLUMNS, row)} for row in found]
    return {"rows": rows, "total": total, "filters": filters}


def deviation_page(session: Session, scope: Scope, *, filters: dict | None = None, page: int = 1,
                   per_page: int = 100) -> dict:
    """One page of :func:`deviation_list` in review order, its total and the filter choices.

    ``page`` is 1-based; one past the last shows the last page. ``per_page`` is held to 1..500.
    """
    per_page = max(1, min(int(per_page), 500))
    page = max(1, int(page))
    data = deviation_list(session, scope, filters=filters, limit=per_page, offset=(page - 1) * per_page)
    pages = max(1, -(-data["total"] // per_page))
    if page > pages:  # past the end (a filter left fewer rows): the last page
        page = pages
        data = deviation_list(session, scope, filters=filters, limit=per_page, offset=(page - 1) * per_page)
    return {"rows": data["rows"], "total": data["total"], "page": page, "pages": pages, "per_page": per_page,
            "filters": data["filters"], "choices": _choices(session, scope, data["filters"])}


def _choices(session: Session, scope: Scope, filters: dict) -> dict[str, list[str] | None]:
    """Values present in the user's deviations, per filter (one grouped query; severity and
    status are fixed vocabularies). Subjects are listed once a site is chosen, so the list stays
    short on a large trial (None: no list, the page offers a text field)."""
    combos = session.exec(_scoped_deviations(select(Trial.code, Site.code, Visit.label, Deviation.rule_id), scope)
                          .group_by(Trial.code, Site.code, Visit.label, Deviation.rule_id)).all()
    out: dict[str, list[str] | None] = {
        key: sorted({row[i] for row in combos if row[i]}) for i, key in enumerate(("trial", "site", "visit", "rule"))}
    out.update(severity=list(get_args(Severity)), status=list(DEVIATION_STATUSES), subject=None)
    if filters.get("site"):
        query = _scoped_deviations(select(distinct(Subject.pseudonym)), scope).where(Site.code == filters["site"])
        if filters.get("trial"):
            query = query.where(Trial.code == filters["trial"])
        out["subject"] = sorted(v for v in session.exec(query) if v)
    return out


def site_rates(session: Session, *, trials=None, sites=None) -> dict:
    """Per site: trial PET series QC'd, and how many have an active major / any active deviation.

    Active: open or queried (:data:`corelab.qcstats.ACTIVE_STATUSES`), as in the trial deviation
    report; a waived or resolved deviation no longer counts against the site.
    """
    active = col(Deviation.status).in_(ACTIVE_STATUSES)
    query = (select(Site.code, func.count(distinct(Series.id)),
                    func.count(distinct(case((and_(active, Deviation.severity == "major"), Series.id)))),
                    func.count(distinct(case((active, Series.id)))))
             .select_from(Series).join(Site, Series.site_id == Site.id).join(Trial, Series.trial_id == Trial.id)
             .join(Deviation, Deviation.series_id == Series.id, isouter=True)
             .where(Series.modality == "PT", Series.kind == "trial", Series.state == "complete",
                    Series.qc_state == "done"))
    counts = session.exec(_scoped(query, trials, sites).group_by(Site.code).order_by(Site.code)).all()
    rows = [{"site": code, "qcd": n, "major_series": major, "with_deviation": anyd,
             "major_rate": rate_text(major, n), "deviation_rate": rate_text(anyd, n)}
            for code, n, major, anyd in counts]
    total = {k: sum(r[k] for r in rows) for k in ("qcd", "major_series", "with_deviation")}
    total.update(major_rate=rate_text(total["major_series"], total["qcd"]),
                 deviation_rate=rate_text(total["with_deviation"], total["qcd"]))
    return {"sites": rows, "total": total}


# --- a trial ---------------------------------------------------------------------------------------

def trial_overview(session: Session, trial_code: str) -> dict | None:
    """A trial's rates, its newest deviation report version and the exports on offer."""
    trial = session.exec(select(Trial).where(Trial.code == trial_code)).first()
    if trial is None:
        return None
    newest = session.exec(select(Report).where(Report.kind == "trial_deviations", Report.trial_id == trial.id)
                          .order_by(col(Report.version).desc(), col(Report.id).desc())).first()
    return {"code": trial.code, "title": trial.title, "manual_version": trial.manual_version,
            "standard": trial.standard, "rates": site_rates(session, trials=[trial.code]),
            "report": _report_row(newest, None, trial.code, _sign_events(session, [newest.id]).get(newest.id))
            if newest else None,
            "exports": [{"fmt": fmt, "table": table, "name": f"{trial.code}_{table}.{fmt}"}
                        for table in EXPORT_TABLES for fmt in TRIAL_EXPORT_FORMATS]}


def _rows_of(content: bytes, fmt: str) -> int | None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.ParquetFile(io.BytesIO(content)).metadata.num_rows
        return pacsv.read_csv(io.BytesIO(content)).num_rows
    except (pa.ArrowInvalid, OSError):
        return None


def export_download(session: Session, settings: Settings, trial_code: str, fmt: str, table: str, *,
                    actor: str) -> Download | None:
    """Write the trial's current export (never a stale file) and return ``table`` in ``fmt``,
    with an ``export.download`` event. None for an unknown trial, format or table."""
    if fmt not in TRIAL_EXPORT_FORMATS or table not in EXPORT_TABLES:
        return None
    if session.exec(select(Trial.id).where(Trial.code == trial_code)).first() is None:
        return None
    path = Path(export_trial_tables(session, settings, trial_code, fmt=fmt)[table])
    if not path.is_file() or not _inside(path, settings.data_dir):
        return None
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    audit.append(session, actor=actor, action="export.download", entity="trial", entity_id=trial_code,
                 detail={"fmt": fmt, "table": table, "file": path.name, "sha256": digest, "bytes": len(content),
                         "rows": _rows_of(content, fmt)})
    return Download(content, path.name, EXPORT_MEDIA[fmt], digest)


def _narrow(allowed, chosen: str | None):
    """The scope ``allowed`` (None: all) narrowed to the one value ``chosen`` (empty: none chosen)."""
    if not chosen:
        return allowed
    return [chosen] if allowed is None or chosen in allowed else []


def deviation_overview(session: Session, scope: Scope, *, filters: dict | None = None, page: int = 1,
                       per_page: int = 100) -> dict:
    """:func:`deviation_page` and the :func:`site_rates` of the trial and site chosen in it."""
    data = deviation_page(session, scope, filters=filters, page=page, per_page=per_page)
    chosen = data["filters"]
    data["rates"] = site_rates(session, trials=_narrow(scope.trial_filter(), chosen.get("trial")),
                               sites=_narrow(None, chosen.get("site")))
    return data
