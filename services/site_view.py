"""Read-only use cases of a site's pages: its subject x visit grid, one series' QC result, its scanners.

Every function returns plain dicts of non-identifying values (pseudonyms, codes, UIDs,
measurements). The grid is built from a handful of set-based queries whatever the number of
series, so a site with hundreds of scans renders as fast as one with ten.
"""

from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import func
from sqlmodel import Session, col, select

from corelab.models import (Deviation, PhantomResult, QuarantineItem, Query, Scanner, Series, Site, Study, Subject,
                            Trial, Visit)
from corelab.settings import Settings
from services.phantoms import TODO as FILL_SHEET_TODO
from services.phantoms import awaiting_fill_sheet

STATES = ("received", "qc_running", "evaluable", "deviation", "query_open", "quarantined")
UNRESOLVED_QUERY = ("open", "answered")
OPEN_DEVIATION = ("open", "queried")
EXPIRY_WARN_DAYS = 60
# Header-table keys that could carry identity; the subject is shown by its pseudonym only.
_IDENTIFYING_KEY = re.compile(r"patient|name|birth|(^|_)id$|dob|address|phone", re.IGNORECASE)
_DESCRIPTION_CHARS = 40
_SHOWN_ELSEWHERE = ("series_uid", "study_uid", "trial", "site", "subject", "visit", "scanner")


def series_state(state: str, qc_state: str, *, unresolved_query: bool, major_open: bool) -> tuple[str, str]:
    """The state a site sees for one series, and a note (empty when none); the one rule of the portal.

    In order:

    - ``state`` quarantined -> quarantined;
    - ``state`` receiving -> received (instances still arriving);
    - ``qc_state`` queued or running -> qc_running;
    - ``qc_state`` pending (the series is complete, QC not started, e.g. a CT) -> received;
    - ``qc_state`` failed -> deviation, with a note: QC could not run, the series is not evaluable
      until a physicist looks at it;
    - ``qc_state`` done: a query still open or answered (not resolved) on any of its deviations
      -> query_open; else a major deviation open or queried -> deviation; else evaluable (minor
      deviations are notes, and waived or resolved ones no longer count).

    Parameters
    ----------
    state, qc_state : str
        ``Series.state`` and ``Series.qc_state``.
    unresolved_query : bool
        Whether any deviation of the series has a query with status open or answered.
    major_open : bool
        Whether any major deviation of the series has status open or queried.
    """
    if state == "quarantined":
        return "quarantined", ""
    if state == "receiving":
        return "received", ""
    if qc_state in ("queued", "running"):
        return "qc_running", ""
    if qc_state == "failed":
        return "deviation", "QC could not run on this series: the core lab will look at it"
    if qc_state != "done":
        return "received", ""
    if unresolved_query:
        return "query_open", ""
    if major_open:
        return "deviation", ""
    return "evaluable", ""


def flag_sets(session: Session, series_filter) -> tuple[set[int], set[int]]:
    """The two flags :func:`series_state` needs, for many series at once: (ids of series with an
    unresolved query, ids of series with a major deviation still open).

    Two set-based queries whatever the number of series; every listing that shows the state a site
    sees (the site grid, the physicist's arrivals) takes its flags from here.

    Parameters
    ----------
    series_filter
        A where-clause on ``Series`` choosing the series to look at, e.g. ``Series.site_id == 3``
        or ``col(Series.id).in_(ids)``.

    Returns
    -------
    tuple of set of int
        ``(queried, major)``: pass ``unresolved_query=sid in queried, major_open=sid in major``.
    """
    queried = session.exec(select(Deviation.series_id).distinct()
                           .join(Query, Query.deviation_id == Deviation.id)
                           .join(Series, Deviation.series_id == Series.id)
                           .where(series_filter, col(Query.status).in_(UNRESOLVED_QUERY)))
    major = session.exec(select(Deviation.series_id).distinct().join(Series, Deviation.series_id == Series.id)
                         .where(series_filter, Deviation.severity == "major",
                                col(Deviation.status).in_(OPEN_DEVIATION)))
    return set(queried), set(major)


def _visit_order(trial: Trial | None, first_dates: dict[str, dt.date | None]) -> list[str]:
    """Visit labels in the trial's order (its manual's visit list), then the rest by earliest study date."""
    listed = [str(v) for v in ((trial.deid_policy or {}).get("visit_labels") or [])] if trial else []
    known = [v for v in listed if v in first_dates]
    rest = sorted((v for v in first_dates if v not in known),
                  key=lambda v: (first_dates[v] is None, first_dates[v] or dt.date.min, v))
    return known + rest


def site_grid(session: Session, site_code: str, *, trials: list[str] | None = None,
              settings: Settings | None = None) -> dict | None:
    """A site's trial scans as subject x visit grids (one per trial), with state counts, its phantom
    series and its open quarantine count. None when there is no such site.

    Parameters
    ----------
    site_code : str
    trials : list of str, optional
        Only these trials' scans (a trial manager's); None: every trial.
    settings : Settings, optional
        Where the spool is: with it, a phantom series awaiting its fill sheet says so
        (:func:`phantom_rows`).

    Returns
    -------
    dict
        ``site``, ``trials`` (each: ``code``, ``visits``, ``rows`` of ``subject`` and ``cells``, one
        list of series per visit), ``counts`` per state (every state, 0 included), ``phantoms``
        and ``quarantine_open``.
    """
    site = session.exec(select(Site).where(Site.code == site_code)).first()
    if site is None:
        return None
    in_site = (Series.site_id == site.id) & (Series.kind == "trial")
    if trials is not None:
        trial_ids = list(session.exec(select(Trial.id).where(col(Trial.code).in_(trials))))
        in_site = in_site & col(Series.trial_id).in_(trial_ids)
    queried, major = flag_sets(session, in_site)
    rows = session.exec(
        select(Series.id, Series.modality, Series.description, Series.state, Series.qc_state, Trial.code,
               Subject.pseudonym, Visit.label, Study.study_date)
        .join(Trial, Series.trial_id == Trial.id, isouter=True)
        .join(Study, Series.study_id == Study.id, isouter=True)
        .join(Visit, Study.visit_id == Visit.id, isouter=True)
        .join(Subject, Visit.subject_id == Subject.id, isouter=True)
        .where(in_site).order_by(col(Subject.pseudonym), col(Series.modality).desc(), col(Series.id))).all()

    counts = dict.fromkeys(STATES, 0)
    by_trial: dict[str, dict] = {}
    for sid, modality, description, state, qc_state, trial_code, pseudonym, label, study_date in rows:
        key, note = series_state(state, qc_state, unresolved_query=sid in queried, major_open=sid in major)
        counts[key] += 1
        label = label or "(no visit)"
        t = by_trial.setdefault(trial_code or "(no trial)", {"cells": {}, "first": {}})
        first = t["first"].get(label)
        t["first"][label] = study_date if first is None else min(first, study_date or first)
        short = description if len(description) <= _DESCRIPTION_CHARS else description[:_DESCRIPTION_CHARS - 1] + "…"
        t["cells"].setdefault(pseudonym or "(no subject)", {}).setdefault(label, []).append(
            {"id": sid, "modality": modality, "description": short, "state": key, "note": note})

    trial_rows = {t.code: t for t in session.exec(select(Trial).where(col(Trial.code).in_(list(by_trial))))}
    grids = []
    for code in sorted(by_trial):
        t = by_trial[code]
        visits = _visit_order(trial_rows.get(code), t["first"])
        grids.append({"code": code, "visits": visits,
                      "rows": [{"subject": subject, "cells": [cells.get(v, []) for v in visits]}
                               for subject, cells in sorted(t["cells"].items())]})
    return {"site": {"code": site.code, "name": site.name}, "trials": grids, "counts": counts,
            "phantoms": phantom_rows(session, site.id, settings=settings),
            "quarantine_open": session.exec(select(func.count()).select_from(QuarantineItem).where(
                QuarantineItem.site_id == site.id, col(QuarantineItem.released_at).is_(None))).one()}


def phantom_rows(session: Session, site_id: int, *, settings: Settings | None = None) -> list[dict]:
    """A site's phantom series, newest first, with the verdict of their latest analysis ('not analysed'
    if none; 'awaiting fill sheet', with ``todo``, when ``settings`` is given and the series has none)."""
    latest = (select(PhantomResult.series_id, func.max(PhantomResult.id).label("rid"))
              .group_by(PhantomResult.series_id).subquery())
    query = (select(Series, Scanner.code, PhantomResult)
             .join(Scanner, Series.scanner_id == Scanner.id, isouter=True)
             .join(latest, latest.c.series_id == Series.id, isouter=True)
             .join(PhantomResult, PhantomResult.id == latest.c.rid, isouter=True)
             .where(Series.site_id == site_id, Series.kind == "phantom")
             .order_by(col(Series.received_at).desc(), col(Series.id).desc()))
    found = session.exec(query).all()
    waiting = awaiting_fill_sheet(session, settings, [s.id for s, _, _ in found]) if settings is not None else set()
    return [{"id": s.id, "scanner": scanner or "", "description": s.description,
             "kind": result.kind if result else "",
             "date": (result.scan_date if result and result.scan_date else s.received_at.date()),
             "verdict": "awaiting fill sheet" if s.id in waiting else (result.verdict if result else "not analysed"),
             "awaiting_fill_sheet": s.id in waiting, "todo": FILL_SHEET_TODO if s.id in waiting else ""}
            for s, scanner, result in found]


def header_values(row: dict) -> list[tuple[str, object]]:
    """The header-table values of a series that may be shown: none whose key suggests identity,
    none the series page shows already; measurements to 5 significant digits."""
    return [(k, f"{v:.5g}" if isinstance(v, float) else v) for k, v in (row or {}).items()
            if not _IDENTIFYING_KEY.search(k) and k not in _SHOWN_ELSEWHERE and v not in (None, "")]


def series_detail(session: Session, series_id: int, *, settings: Settings | None = None) -> dict | None:
    """One series with its state, QC result (deviations) and queries; None when there is no such series.

    With ``settings`` (where the spool is), a phantom series awaiting its fill sheet says so in
    ``awaiting_fill_sheet`` and its note, with what to do.
    """
    s = session.get(Series, series_id)
    if s is None:
        return None
    found = session.exec(
        select(Site.code, Scanner.code, Trial.code, Subject.pseudonym, Visit.label, Study.study_date)
        .select_from(Series)
        .join(Site, Series.site_id == Site.id, isouter=True)
        .join(Scanner, Series.scanner_id == Scanner.id, isouter=True)
        .join(Trial, Series.trial_id == Trial.id, isouter=True)
        .join(Study, Series.study_id == Study.id, isouter=True)
        .join(Visit, Study.visit_id == Visit.id, isouter=True)
        .join(Subject, Visit.subject_id == Subject.id, isouter=True)
        .where(Series.id == s.id)).one()
    site, scanner, trial, subject, visit, study_date = found
    deviations = session.exec(select(Deviation).where(Deviation.series_id == s.id)
                              .order_by(col(Deviation.severity), col(Deviation.rule_id))).all()
    queries = session.exec(select(Query, Deviation.rule_id).join(Deviation, Query.deviation_id == Deviation.id)
                           .where(Deviation.series_id == s.id).order_by(col(Query.id))).all()
    unresolved = {q.deviation_id for q, _ in queries if q.status in UNRESOLVED_QUERY}
    state, note = series_state(s.state, s.qc_state, unresolved_query=bool(unresolved),
                               major_open=any(d.severity == "major" and d.status in OPEN_DEVIATION
                                              for d in deviations))
    phantoms = session.exec(select(PhantomResult).where(PhantomResult.series_id == s.id)
                            .order_by(col(PhantomResult.id).desc())).all()
    awaiting = settings is not None and s.id in awaiting_fill_sheet(session, settings, [s.id])
    if awaiting:
        note = f"awaiting fill sheet: the phantom cannot be analysed without it; {FILL_SHEET_TODO}"
    return {
        "id": s.id, "series_uid": s.series_uid, "modality": s.modality, "kind": s.kind,
        "description": s.description, "site": site or "", "scanner": scanner or "", "trial": trial or "",
        "subject": subject or "", "visit": visit or "", "study_date": study_date,
        "received_at": s.received_at, "completed_at": s.completed_at, "instances": s.instance_count,
        "expected": s.expected_count, "findings": list((s.completeness or {}).get("findings", [])),
        "series_state": s.state, "qc_state": s.qc_state, "qc_at": s.qc_at, "manual_version": s.qc_manual_version,
        "state": state, "note": note, "awaiting_fill_sheet": awaiting,
        "deviations": [{"id": d.id, "rule_id": d.rule_id, "manual_section": d.manual_section,
                        "manual_version": d.manual_version, "severity": d.severity, "expected": d.expected,
                        "observed": d.observed, "status": d.status, "message": d.message,
                        "queryable": d.status == "open" and d.id not in unresolved,
                        "waivable": d.status in OPEN_DEVIATION}
                       for d in deviations],
        "queries": [{"id": q.id, "rule_id": rule_id, "status": q.status, "created_at": q.created_at,
                     "updated_at": q.updated_at, "messages": len(q.thread or [])}
                    for q, rule_id in queries],
        "phantom_results": [{"kind": r.kind, "standard": r.standard, "verdict": r.verdict, "scan_date": r.scan_date,
                             "analysed_at": r.analysed_at} for r in phantoms],
        "header": header_values(s.header_row),
    }


def scanner_overview(session: Session, site_codes: list[str] | None, *, within_days: int = EXPIRY_WARN_DAYS,
                     today: dt.date | None = None) -> list[dict]:
    """Scanners of ``site_codes`` (None: every site) with their accreditations, soonest expiry flagged.

    Each scanner: ``code``, ``site``, ``manufacturer``, ``model``, ``requalification`` (the pending
    re-qualification's reason, '' when none), ``accreditations`` (status as of today, standard,
    scope, valid from/until, ``days_left`` and ``expiring`` when it ends within ``within_days`` or
    has ended) and ``attention`` when any of that needs action.
    """
    from services.lookup import accreditation_overview

    today = today or dt.date.today()
    query = select(Scanner, Site.code).join(Site, Scanner.site_id == Site.id).order_by(col(Scanner.code))
    if site_codes is not None:
        query = query.where(col(Site.code).in_(site_codes))
    scanners = {sc.code: {"code": sc.code, "site": site, "manufacturer": sc.manufacturer, "model": sc.model,
                          "software": sc.software_versions, "requalification": sc.requalification_reason or "",
                          "accreditations": []}
                for sc, site in session.exec(query)}
    if not scanners:
        return []
    rows, _ = accreditation_overview(session, within_days=within_days)
    for row in rows:
        entry = scanners.get(row["scanner"])
        if entry is None:  # another site's scanner
            continue
        until = row["valid_until"]
        days = (until - today).days if until else None
        entry["accreditations"].append({
            "standard": row["standard"], "scope": row["scope"], "status": row["status"],
            "valid_from": row["valid_from"], "valid_until": until, "days_left": days,
            "expiring": days is not None and days <= within_days and row["status"] in ("accredited", "expired")})
    for entry in scanners.values():
        entry["attention"] = bool(entry["requalification"]) or any(a["expiring"] for a in entry["accreditations"])
    return list(scanners.values())
