"""Site QC report for a period: what a site sent, how fast it was checked, what it must correct.

Gathers, for one site and the series it sent in the period: scans received per visit type,
turnaround (receipt -> QC -> report), deviations by rule with the manual section and what the
site should do, every deviation (major first) with its query or waiver, the site's open queries,
its quarantine, and its scanners' accreditation with coming expiries. Only the site's own data
are read: the report goes to that site.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections import Counter
from functools import partial

import matplotlib.pyplot as plt
from sqlmodel import Session, col, select

from accreditation.register import effective_status, expiring_accreditations
from corelab import qcstats
from corelab.models import (Accreditation, AuditEvent, PhantomResult, QuarantineItem, Report, Scanner, Series, Site,
                            Study, Subject, Visit)
from corelab.queries import deviation_rows
from corelab.site_queries import query_rows
from reports.render import ReportError, ReportSpec
from reports.report_figures import deviations_by_rule_bars

__all__ = ["site_qc_report", "month_period", "report_key"]


def month_period(month: str | None = None, *, today: dt.date | None = None) -> tuple[dt.date, dt.date, str]:
    """``(first day, last day, "YYYY-MM")`` of a calendar month (default: this month)."""
    if month:
        year, mon = (int(x) for x in month.split("-"))
    else:
        today = today or dt.date.today()
        year, mon = today.year, today.month
    last = calendar.monthrange(year, mon)[1]
    return dt.date(year, mon, 1), dt.date(year, mon, last), f"{year:04d}-{mon:02d}"


def report_key(site_code: str, label: str) -> str:
    return f"{site_code}_{label}"


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    if t is None:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _waivers(session: Session, deviation_ids: list[int]) -> dict[int, dict]:
    if not deviation_ids:
        return {}
    events = session.exec(select(AuditEvent).where(AuditEvent.action == "deviation.waive",
                                                   col(AuditEvent.entity_id).in_([str(i) for i in deviation_ids]))
                          .order_by(col(AuditEvent.id))).all()
    return {int(e.entity_id): {"by": e.actor, "reason": e.detail.get("reason", ""),
                               "at": _aware(e.at).strftime("%Y-%m-%d")} for e in events}


def site_qc_report(session: Session, site_code: str, *, since: dt.date, until: dt.date, label: str | None = None,
                   now: dt.datetime | None = None, warn_days: int = 30) -> ReportSpec:
    """The QC report of one site for the series it sent from ``since`` to ``until`` (inclusive).

    Parameters
    ----------
    site_code : str
    since, until : date
        The period (by the core lab's receipt date, UTC).
    label : str, optional
        Names the period in the report key (default ``<since>_<until>``).
    now : datetime, optional
        The report's time, for the turnaround of series not reported before.
    warn_days : int
        Accreditations ending within this many days are listed as coming expiries.
    """
    now = _aware(now) or dt.datetime.now(dt.timezone.utc)
    site = session.exec(select(Site).where(Site.code == site_code)).first()
    if site is None:
        raise ReportError(f"no site {site_code!r}; `corelab site list` names them")
    label = label or f"{since.isoformat()}_{until.isoformat()}"
    start = dt.datetime.combine(since, dt.time(), dt.timezone.utc)
    end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    rows = session.exec(select(Series, Study, Visit, Subject)
                        .join(Study, Series.study_id == Study.id, isouter=True)
                        .join(Visit, Study.visit_id == Visit.id, isouter=True)
                        .join(Subject, Visit.subject_id == Subject.id, isouter=True)
                        .where(Series.site_id == site.id).order_by(col(Series.id))).all()
    rows = [r for r in rows if start <= _aware(r[0].received_at) < end]
    uids = {s.series_uid for s, *_ in rows}

    # scans received per visit type
    received: dict[str, Counter] = {}
    for s, _study, visit, _subj in rows:
        if s.kind == "phantom":
            kind = session.exec(select(PhantomResult.kind).where(PhantomResult.series_id == s.id)).first()
            group = {"nema_iec": "phantom: NEMA IEC", "uniform_cylinder": "phantom: uniform cylinder"}.get(
                kind or "", "phantom")
        else:
            group = visit.label if visit is not None else "(no visit: held or unreadable)"
        c = received.setdefault(group, Counter())
        c[s.modality or "?"] += 1
        c["complete"] += s.state == "complete"
        c["quarantined"] += s.state == "quarantined"
    received_rows = [{"visit": g, "pet": c.get("PT", 0), "ct": c.get("CT", 0), "complete": c["complete"],
                      "quarantined": c["quarantined"], "series": sum(v for k, v in c.items()
                                                                     if k not in ("complete", "quarantined"))}
                     for g, c in sorted(received.items(), key=lambda kv: (kv[0].startswith("(") or
                                                                          kv[0].startswith("phantom"),
                                                                          kv[0] != "baseline", kv[0]))]

    # turnaround: receipt -> QC -> first site QC report of this site after the QC
    report_times = sorted(_aware(t) for t in session.exec(select(Report.created_at).where(
        Report.kind == "site_qc", Report.site_id == site.id)))
    timing = []
    for s, *_ in rows:
        if s.kind != "trial" or s.modality != "PT" or s.qc_at is None:
            continue
        qc_at = _aware(s.qc_at)
        reported = next((t for t in report_times if t >= qc_at), now)
        timing.append({"received_at": _aware(s.received_at), "qc_at": qc_at, "reported_at": reported})
    pending_qc = sum(1 for s, *_ in rows if s.kind == "trial" and s.modality == "PT" and s.state == "complete"
                     and s.qc_at is None)

    devs = [d for d in deviation_rows(session, site_code=site_code) if d["series_uid"] in uids]
    devs.sort(key=lambda d: (d["severity"] != "major", d["subject"], d["visit"], d["rule_id"]))
    waivers = _waivers(session, [d["id"] for d in devs])
    queries = query_rows(session, site_code=site_code)
    query_of = {q["deviation_id"]: q for q in sorted(queries, key=lambda q: q["id"])}
    for d in devs:
        q = query_of.get(d["id"])
        d["query"] = {"id": q["id"], "status": q["status"]} if q else None
        d["waiver"] = waivers.get(d["id"])
    groups = qcstats.deviations_by_rule(devs)
    pet = sum(1 for s, *_ in rows if s.kind == "trial" and s.modality == "PT" and s.state == "complete")
    rates, _ = qcstats.deviation_rates({site_code: pet}, devs)

    scanners = session.exec(select(Scanner).where(Scanner.site_id == site.id).order_by(col(Scanner.code))).all()
    accs = []
    for sc in scanners:
        for a in session.exec(select(Accreditation).where(Accreditation.scanner_id == sc.id)
                              .order_by(col(Accreditation.standard))):
            accs.append({"scanner": sc.code, "model": f"{sc.manufacturer} {sc.model}", "standard": a.standard,
                         "scope": a.scope, "status": effective_status(a, today=now.date()),
                         "valid_from": a.valid_from.isoformat() if a.valid_from else None,
                         "valid_until": a.valid_until.isoformat() if a.valid_until else None,
                         "requalification_reason": sc.requalification_reason})
    expiring = [e for e in expiring_accreditations(session, within_days=warn_days, today=now.date())
                if e["site"] == site_code]
    quarantine = session.exec(select(QuarantineItem).where(QuarantineItem.site_id == site.id,
                                                           col(QuarantineItem.released_at).is_(None))
                              .order_by(col(QuarantineItem.id))).all()
    quarantine = [q for q in quarantine if start <= _aware(q.received_at) < end]
    # a reason starts with the object's label ("object #3 (sha256 ...): ..."): group by what follows
    held = Counter((q.reason_code, q.reason.split(": ", 1)[-1]) for q in quarantine)

    data = {
        "site": {"code": site.code, "name": site.name},
        "period": {"since": since.isoformat(), "until": until.isoformat(), "label": label},
        "received": received_rows,
        "received_total": {"series": len(rows), "pet_checked": pet, "pending_qc": pending_qc},
        "rates": rates[0],
        "deviation_groups": groups,
        "deviations": devs,
        "queries": [q for q in queries if q["status"] != "resolved"],
        "queries_closed": sum(1 for q in queries if q["status"] == "resolved"),
        "accreditations": accs,
        "expiring": [{k: v for k, v in e.items() if k != "days_left"} for e in expiring],
        "quarantine": [{"reason_code": code, "reason": reason, "objects": n}
                       for (code, reason), n in sorted(held.items())],
        # not hashed: the turnaround up to this report depends on when it is made
        "meta": {"turnaround": qcstats.turnaround(timing), "warn_days": warn_days, "judged_on": now.date().isoformat(),
                 "days_left": {f"{e['scanner']} {e['standard']} {e['scope']}": e["days_left"] for e in expiring}},
    }
    figures = {"by_rule": partial(_fig_by_rule, groups)} if groups else {}
    return ReportSpec(kind="site_qc", key=report_key(site.code, label),
                      title=f"Site QC report: {site.code}, {label}", template="site_qc.html.j2", data=data,
                      figures=figures, site_id=site.id)


def _fig_by_rule(groups: list[dict]):
    fig, ax = plt.subplots(figsize=(7.0, 0.45 + 0.28 * len(groups)), constrained_layout=True)
    deviations_by_rule_bars(ax, groups)
    return fig
