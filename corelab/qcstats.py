"""Figures the reports show, computed from plain rows (no database, no I/O).

The report builders in ``reports/`` gather rows from the store and call these; the templates
only lay the results out.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["ACTIVE_STATUSES", "rate_text", "deviation_rates", "visit_matrix", "deviations_by_rule",
           "turnaround", "severity_counts"]

ACTIVE_STATUSES = ("open", "queried")
"""Deviation statuses that still count against a site (resolved and waived ones do not)."""


def rate_text(part: int, whole: int) -> str:
    """``part / whole`` as a whole percentage, ``"-"`` when ``whole`` is 0."""
    return f"{100.0 * part / whole:.0f} %" if whole else "-"


def severity_counts(deviations: Iterable[Mapping]) -> dict[str, dict[str, int]]:
    """Active deviations per site and severity: ``{site: {"major": n, "minor": n}}``."""
    out: dict[str, Counter] = defaultdict(Counter)
    for d in deviations:
        if d["status"] in ACTIVE_STATUSES:
            out[d["site"]][d["severity"]] += 1
    return {site: dict(c) for site, c in out.items()}


def deviation_rates(series_per_site: Mapping[str, int], deviations: Iterable[Mapping]) -> tuple[list[dict], dict]:
    """Per site: series, series with an active major / any active deviation, and their rates.

    Parameters
    ----------
    series_per_site : mapping
        ``{site: number of trial PET series received}``; every site to list (zero allowed).
    deviations : iterable of mapping
        Rows of :func:`corelab.queries.deviation_rows`.

    Returns
    -------
    sites : list of dict
        One per site, sorted by code: ``series``, ``evaluable`` (series without an active major
        deviation), ``major_series``, ``with_deviation``, ``major_rate``, ``deviation_rate``,
        ``major``, ``minor`` (active deviation counts), ``waived``, ``resolved``.
    total : dict
        The same sums over all sites.
    """
    deviations = list(deviations)
    with_any: dict[str, set] = defaultdict(set)
    with_major: dict[str, set] = defaultdict(set)
    closed: dict[str, Counter] = defaultdict(Counter)
    for d in deviations:
        if d["status"] not in ACTIVE_STATUSES:
            closed[d["site"]][d["status"]] += 1
            continue
        with_any[d["site"]].add(d["series_uid"])
        if d["severity"] == "major":
            with_major[d["site"]].add(d["series_uid"])
    counts = severity_counts(deviations)
    sites = []
    for code in sorted(series_per_site):
        n, major, anyd = series_per_site[code], len(with_major.get(code, ())), len(with_any.get(code, ()))
        sites.append({"site": code, "series": n, "evaluable": n - major, "major_series": major,
                      "with_deviation": anyd, "major_rate": rate_text(major, n), "deviation_rate": rate_text(anyd, n),
                      "major": counts.get(code, {}).get("major", 0), "minor": counts.get(code, {}).get("minor", 0),
                      "waived": closed[code]["waived"], "resolved": closed[code]["resolved"]})
    total = {k: sum(s[k] for s in sites) for k in ("series", "evaluable", "major_series", "with_deviation", "major",
                                                     "minor", "waived", "resolved")}
    total["major_rate"] = rate_text(total["major_series"], total["series"])
    total["deviation_rate"] = rate_text(total["with_deviation"], total["series"])
    return sites, total


def visit_matrix(subjects: Sequence[tuple[str, str]], received: set[tuple[str, str]],
                 deviations: Iterable[Mapping]) -> tuple[list[str], list[dict]]:
    """Subject x visit cells: active deviations by severity, ``ok``, or ``not evaluated``.

    Parameters
    ----------
    subjects : sequence of (pseudonym, site)
    received : set of (pseudonym, visit)
        Visits with a complete, checked trial PET series.
    deviations : iterable of mapping
        Rows of :func:`corelab.queries.deviation_rows`.

    Returns
    -------
    visits : list of str
        Baseline first, then the others in order.
    rows : list of dict
        ``{"subject", "site", "cells": [{"text", "css"}]}`` sorted by subject.
    """
    cell: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for d in deviations:
        if d["status"] in ACTIVE_STATUSES:
            cell[(d["subject"], d["visit"])][d["severity"]] += 1
    visits = sorted({v for _, v in received} | {v for _, v in cell}, key=lambda v: (v != "baseline", v))
    rows = []
    for subject, site in sorted(subjects):
        cells = []
        for visit in visits:
            c = cell.get((subject, visit))
            if c:
                cells.append({"text": ", ".join(f"{n} {sev}" for sev, n in sorted(c.items())),
                              "css": "major" if c.get("major") else "minor"})
            elif (subject, visit) in received:
                cells.append({"text": "ok", "css": "pass"})
            else:
                cells.append({"text": "not evaluated", "css": ""})
        rows.append({"subject": subject, "site": site, "cells": cells})
    return visits, rows


def deviations_by_rule(deviations: Iterable[Mapping]) -> list[dict]:
    """Deviations grouped by rule, major rules first, then by count.

    Each group: ``rule_id``, ``manual_section``, ``severity``, ``count``, counts per status
    (``open``, ``queried``, ``resolved``, ``waived``), ``series`` and ``message`` (what the site
    should do; the rule's message).
    """
    groups: dict[str, dict] = {}
    for d in deviations:
        g = groups.setdefault(d["rule_id"], {"rule_id": d["rule_id"], "manual_section": d["manual_section"],
                                             "severity": d["severity"], "message": d["message"], "count": 0,
                                             "open": 0, "queried": 0, "resolved": 0, "waived": 0, "series": 0})
        g["count"] += 1
        g[d["status"]] = g.get(d["status"], 0) + 1
    for g in groups.values():
        g["series"] = g["count"]  # one deviation per series and rule (unique in the store)
    return sorted(groups.values(), key=lambda g: (g["severity"] != "major", -g["count"], g["rule_id"]))


def _hours(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return max((b - a).total_seconds(), 0.0) / 3600.0


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "median_h": statistics.median(values) if values else None,
            "worst_h": max(values) if values else None}


def turnaround(rows: Iterable[Mapping]) -> dict:
    """Median and worst turnaround, hours: receipt -> QC, QC -> report, receipt -> report.

    Parameters
    ----------
    rows : iterable of mapping
        Per series ``received_at``, ``qc_at`` and ``reported_at`` (aware datetimes or None:
        a stage not reached yet is left out of that stage's figures).

    Returns
    -------
    dict
        ``{"receipt_to_qc": {n, median_h, worst_h}, "qc_to_report": ..., "receipt_to_report": ...}``.
    """
    rq, qr, rr = [], [], []
    for r in rows:
        for out, a, b in ((rq, r.get("received_at"), r.get("qc_at")), (qr, r.get("qc_at"), r.get("reported_at")),
                          (rr, r.get("received_at"), r.get("reported_at"))):
            h = _hours(a, b)
            if h is not None:
                out.append(h)
    return {"receipt_to_qc": _stats(rq), "qc_to_report": _stats(qr), "receipt_to_report": _stats(rr)}
