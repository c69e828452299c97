"""Use cases of the physicist's review in the portal: the worklist, query threads, the quarantine.

Every listing is a few set-based queries (a count and one capped page of rows per section),
filtered by the caller's sites or trials in SQL, so a store of 10,000 series over 50 sites
answers in milliseconds and a site never receives another site's rows to be hidden later.
Rows are plain dicts of non-identifying values (codes, UIDs, rule ids, pseudonyms at most).
"""

from __future__ import annotations

from datetime import date, datetime, time, timezone

from sqlalchemy import case, func
from sqlmodel import Session, col, select

from accreditation.evaluate import WITHHELD
from corelab.models import (Deviation, PhantomResult, QuarantineItem, Query, Report, Scanner, Series, Site, Trial,
                            utcnow)
from corelab.settings import Settings
from services import paging
from services.access import Scope, restrict
from services.phantoms import TODO as FILL_SHEET_TODO
from services.phantoms import awaiting_fill_sheet
from services.site_view import OPEN_DEVIATION, flag_sets, series_state

LIMIT = 100
"""Rows shown per worklist section; the rest is counted ("and N more")."""

QUARANTINE_LIMIT = 200


def _section(rows: list[dict], total: int) -> dict:
    return {"rows": rows, "total": total, "more": max(0, total - len(rows))}


def _arrivals(session: Session, since: datetime, limit: int, settings: Settings | None) -> dict:
    stmt = (select(Series.id, Series.series_uid, Series.kind, Series.modality, Series.state, Series.qc_state,
                   Series.received_at, Site.code)
            .join(Site, Series.site_id == Site.id, isouter=True).where(Series.received_at >= since))
    rows = [{"id": i, "series_uid": uid, "kind": kind, "modality": mod, "state": state, "qc_state": qc,
             "received_at": at, "site": site or ""}
            for i, uid, kind, mod, state, qc, at, site in
            session.exec(stmt.order_by(col(Series.received_at).desc(), col(Series.id).desc()).limit(limit))]
    if rows:  # the state a site sees, by the portal's one rule, from two queries over the rows shown
        queried, major = flag_sets(session, col(Series.id).in_([r["id"] for r in rows]))
        for r in rows:
            r["display_state"], r["note"] = series_state(r["state"], r["qc_state"], unresolved_query=r["id"] in queried,
                                                         major_open=r["id"] in major)
        waiting = awaiting_fill_sheet(session, settings, [r["id"] for r in rows if r["kind"] == "phantom"]) \
            if settings is not None else set()
        for r in rows:
            r["awaiting_fill_sheet"] = r["id"] in waiting
            if r["awaiting_fill_sheet"]:
                r["note"] = "awaiting fill sheet"
    return _section(rows, paging.count(session, stmt))


def _failed_qc(session: Session, limit: int) -> dict:
    majors = (select(Deviation.series_id, func.count().label("n")).where(
        Deviation.severity == "major", col(Deviation.status).in_(OPEN_DEVIATION)).group_by(Deviation.series_id)
        .subquery())
    stmt = (select(Series.id, Series.series_uid, Series.kind, Series.qc_state, Series.received_at, Site.code,
                   func.coalesce(majors.c.n, 0))
            .join(Site, Series.site_id == Site.id, isouter=True)
            .join(majors, majors.c.series_id == Series.id, isouter=True)
            .where((Series.qc_state == "failed") | (majors.c.n > 0)))
    rows = [{"id": i, "series_uid": uid, "kind": kind, "qc_state": qc, "received_at": at, "site": site or "",
             "majors": n, "deviations": []}
            for i, uid, kind, qc, at, site, n in
            session.exec(stmt.order_by(col(Series.received_at).desc(), col(Series.id).desc()).limit(limit))]
    by_id = {r["id"]: r for r in rows}
    if by_id:  # the rules of the rows shown, in one query
        for dev_id, series_id, rule, status in session.exec(
                select(Deviation.id, Deviation.series_id, Deviation.rule_id, Deviation.status)
                .where(col(Deviation.series_id).in_(list(by_id)), Deviation.severity == "major",
                       col(Deviation.status).in_(OPEN_DEVIATION)).order_by(col(Deviation.rule_id))):
            by_id[series_id]["deviations"].append({"id": dev_id, "rule_id": rule, "status": status})
    return _section(rows, paging.count(session, stmt))


def _withheld(session: Session, limit: int) -> dict:
    # Only a series' newest result counts: a later analysis with centres by hand settles it.
    newest = select(func.max(PhantomResult.id).label("id")).group_by(PhantomResult.series_id).subquery()
    stmt = (select(PhantomResult, Series.series_uid, Site.code, Scanner.code)
            .join(newest, newest.c.id == PhantomResult.id)
            .join(Series, PhantomResult.series_id == Series.id)
            .join(Site, Series.site_id == Site.id, isouter=True)
            .join(Scanner, PhantomResult.scanner_id == Scanner.id, isouter=True)
            .where(PhantomResult.verdict == WITHHELD))
    rows = []
    for result, uid, site, scanner in session.exec(stmt.order_by(col(PhantomResult.analysed_at).desc()).limit(limit)):
        withheld = (result.metrics or {}).get("withheld") or {}
        rows.append({"series_id": result.series_id, "series_uid": uid, "site": site or "", "scanner": scanner or "",
                     "kind": result.kind, "standard": result.standard, "analysed_at": result.analysed_at,
                     "details": withheld.get("details") or [withheld.get("reason", "localisation uncertain")],
                     "action": withheld.get("action", "")})
    return _section(rows, paging.count(session, stmt))


def _awaiting_fill(session: Session, settings: Settings, limit: int) -> dict:
    # Phantom series not analysed to the end are few (a scanner sends two a quarter): read them
    # all and look for their fill sheets on disk, the rule the accreditation flow applies.
    stmt = (select(Series.id, Series.series_uid, Series.qc_state, Series.received_at, Site.code, Scanner.code)
            .join(Site, Series.site_id == Site.id, isouter=True)
            .join(Scanner, Series.scanner_id == Scanner.id, isouter=True)
            .where(Series.kind == "phantom", Series.qc_state != "done"))
    found = session.exec(stmt.order_by(col(Series.received_at).desc(), col(Series.id).desc())).all()
    waiting = awaiting_fill_sheet(session, settings, [row[0] for row in found])
    rows = [{"id": i, "series_uid": uid, "qc_state": qc, "received_at": at, "site": site or "",
             "scanner": scanner or "", "action": FILL_SHEET_TODO}
            for i, uid, qc, at, site, scanner in found if i in waiting]
    return _section(rows[:limit], len(rows))


def _quarantine_by_site(session: Session) -> dict:
    stmt = (select(Site.code, func.count(QuarantineItem.id), func.max(QuarantineItem.received_at))
            .select_from(QuarantineItem).join(Site, QuarantineItem.site_id == Site.id, isouter=True)
            .where(col(QuarantineItem.released_at).is_(None)).group_by(Site.code).order_by(col(Site.code)))
    rows = [{"site": code or "(unknown sender)", "count": n, "newest": newest}
            for code, n, newest in session.exec(stmt)]
    return _section(rows, sum(r["count"] for r in rows))


def _answered(session: Session, limit: int) -> dict:
    stmt = (select(Query, Site.code, Deviation.rule_id, Deviation.severity, Deviation.series_id)
            .join(Site, Query.site_id == Site.id).join(Deviation, Query.deviation_id == Deviation.id)
            .where(Query.status == "answered"))
    rows = []
    for q, site, rule, severity, series_id in session.exec(stmt.order_by(col(Query.updated_at).desc()).limit(limit)):
        thread = list(q.thread or [])
        rows.append({"id": q.id, "site": site, "rule_id": rule, "severity": severity, "series_id": series_id,
                     "answered_at": q.updated_at, "answer": thread[-1]["text"] if thread else ""})
    return _section(rows, paging.count(session, stmt))


def _unsigned(session: Session, limit: int) -> dict:
    # NOT IN over the (few) replaced ids: replaces_id has no index, a correlated NOT EXISTS scans per row.
    replaced = select(Report.replaces_id).where(col(Report.replaces_id).is_not(None)).correlate(None)
    stmt = (select(Report.id, Report.kind, Report.version, Report.created_at, Site.code, Trial.code)
            .join(Site, Report.site_id == Site.id, isouter=True).join(Trial, Report.trial_id == Trial.id, isouter=True)
            .where(col(Report.signed_at).is_(None), col(Report.id).not_in(replaced)))
    rows = [{"id": i, "kind": kind, "version": v, "created_at": at, "site": site or "", "trial": trial or ""}
            for i, kind, v, at, site, trial in
            session.exec(stmt.order_by(col(Report.created_at).desc(), col(Report.id).desc()).limit(limit))]
    return _section(rows, paging.count(session, stmt))


def worklist(session: Session, *, today: date | None = None, limit: int = LIMIT,
             settings: Settings | None = None) -> dict:
    """What waits for a physicist: today's arrivals and every open decision.

    Parameters
    ----------
    today : date, optional
        The UTC day whose arrivals to list (default: today).
    limit : int
        Rows per section; each section also has ``total`` and ``more`` (the rows not shown).
    settings : Settings, optional
        Where the spool is: with it, phantom series awaiting their fill sheet are listed
        (``awaiting_fill``, and arrivals say so); without it that section is empty.

    Returns
    -------
    dict
        ``arrivals``, ``failed_qc``, ``withheld``, ``awaiting_fill`` (phantom series without their
        fill sheet, with what to do), ``quarantine`` (per site: count, newest), ``answered``
        (queries the sites answered) and ``unsigned`` (newest report versions).
    """
    day = today or utcnow().date()
    since = datetime.combine(day, time.min, tzinfo=timezone.utc)
    return {"today": day.isoformat(), "arrivals": _arrivals(session, since, limit, settings),
            "failed_qc": _failed_qc(session, limit), "withheld": _withheld(session, limit),
            "awaiting_fill": _awaiting_fill(session, settings, limit) if settings is not None else _section([], 0),
            "quarantine": _quarantine_by_site(session), "answered": _answered(session, limit),
            "unsigned": _unsigned(session, limit)}


def query_list(session: Session, scope: Scope, *, limit: int = 200) -> dict:
    """The queries ``scope`` may see, open first then answered then resolved, newest first."""
    stmt = (select(Query, Site.code, Deviation.rule_id, Deviation.severity, Deviation.series_id, Series.series_uid)
            .join(Site, Query.site_id == Site.id).join(Deviation, Query.deviation_id == Deviation.id)
            .join(Series, Deviation.series_id == Series.id))
    stmt = restrict(stmt, scope, site_id=Query.site_id, trial_id=Series.trial_id)
    order = case((Query.status == "open", 0), (Query.status == "answered", 1), else_=2)
    rows = []
    for q, site, rule, severity, series_id, uid in session.exec(
            stmt.order_by(order, col(Query.updated_at).desc(), col(Query.id).desc()).limit(limit)):
        thread = list(q.thread or [])
        rows.append({"id": q.id, "site": site, "rule_id": rule, "severity": severity, "status": q.status,
                     "series_id": series_id, "series_uid": uid, "updated_at": q.updated_at,
                     "question": thread[0]["text"] if thread else "", "last": thread[-1] if thread else None,
                     "messages": len(thread)})
    return _section(rows, paging.count(session, stmt))


def query_thread(session: Session, query_id: int) -> dict | None:
    """One query with its deviation and thread; None when there is no such query."""
    found = session.exec(select(Query, Site.code, Deviation, Series.series_uid)
                         .join(Site, Query.site_id == Site.id).join(Deviation, Query.deviation_id == Deviation.id)
                         .join(Series, Deviation.series_id == Series.id).where(Query.id == query_id)).first()
    if found is None:
        return None
    q, site, dev, uid = found
    return {"id": q.id, "site": site, "status": q.status, "thread": list(q.thread or []),
            "created_at": q.created_at, "updated_at": q.updated_at,
            "deviation": {"id": dev.id, "rule_id": dev.rule_id, "severity": dev.severity, "status": dev.status,
                          "manual_section": dev.manual_section, "manual_version": dev.manual_version,
                          "expected": dev.expected, "observed": dev.observed, "message": dev.message,
                          "series_id": dev.series_id, "series_uid": uid}}


def deviation_series(session: Session, deviation_id: int) -> int | None:
    """The series id of a deviation (where the portal goes back to after a waiver)."""
    dev = session.get(Deviation, deviation_id)
    return dev.series_id if dev else None


def quarantine_groups(session: Session, scope: Scope, *, limit: int = QUARANTINE_LIMIT) -> dict:
    """The newest open quarantine items ``scope`` may see (``limit``), grouped by site and series UID.

    Returns ``{"sites": [{"site", "count", "series": [{"series_uid", "items": [...]}]}], "total",
    "more"}``; an item of no known site (an unregistered sender) is only in an unscoped listing.
    """
    stmt = (select(QuarantineItem, Site.code).join(Site, QuarantineItem.site_id == Site.id, isouter=True)
            .where(col(QuarantineItem.released_at).is_(None)))
    stmt = restrict(stmt, scope, site_id=QuarantineItem.site_id)
    groups: dict[str, dict[str, list]] = {}
    # The newest items make the page; they are then grouped by site and series.
    newest = session.exec(stmt.order_by(col(QuarantineItem.received_at).desc(), col(QuarantineItem.id).desc())
                          .limit(limit)).all()
    for item, site in sorted(newest, key=lambda row: (row[1] or "~", row[0].series_uid or "")):
        groups.setdefault(site or "(unknown sender)", {}).setdefault(item.series_uid or "", []).append(
            {"id": item.id, "source": item.source_name, "reason_code": item.reason_code, "reason": item.reason,
             "received_at": item.received_at})
    out = [{"site": site, "count": sum(len(v) for v in series.values()),
            "series": [{"series_uid": uid, "items": items} for uid, items in series.items()]}
           for site, series in groups.items()]
    total = paging.count(session, stmt)
    return {"sites": out, "total": total, "more": max(0, total - sum(g["count"] for g in out))}
