"""The trial summary report (first cut): deviations, quarantine and accreditation in one HTML file."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlmodel import Session, select

from corelab import __version__
from corelab.models import Report, Site, Subject, Trial, utcnow
from corelab.queries import accreditation_rows, deviation_rows, quarantine_rows
from expectations.qc import trial_pet_series
from reports.figures import deviations_per_site, png_data_uri

TEMPLATES = Path(__file__).with_name("templates")
_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))


def _rate(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.0f} %" if whole else "-"


def trial_summary_context(session: Session, trial_code: str) -> dict:
    """Everything the trial summary shows, computed here so the template only lays it out."""
    trial = session.exec(select(Trial).where(Trial.code == trial_code)).one()
    devs = sorted(deviation_rows(session, trial_code=trial_code),
                  key=lambda d: (d["severity"] != "major", d["site"], d["subject"], d["visit"]))
    quarantine = quarantine_rows(session)
    counts: dict[str, Counter] = defaultdict(Counter)
    with_any: dict[str, set] = defaultdict(set)
    with_major: dict[str, set] = defaultdict(set)
    cell: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for d in devs:
        if d["status"] in ("resolved", "waived"):
            continue
        counts[d["site"]][d["severity"]] += 1
        with_any[d["site"]].add(d["series_uid"])
        if d["severity"] == "major":
            with_major[d["site"]].add(d["series_uid"])
        cell[(d["subject"], d["visit"])][d["severity"]] += 1
    site_codes = {s.id: s.code for s in session.exec(select(Site))}
    pet = trial_pet_series(session, trial_code)
    series_per_site: Counter = Counter(site_codes.get(s.site_id) for s in pet)
    sites = []
    for code in sorted(site_codes.values()):
        n = series_per_site.get(code, 0)
        sites.append({"site": code, "series": n, "with_deviation": len(with_any.get(code, ())),
                      "major_series": len(with_major.get(code, ())), "evaluable": n - len(with_major.get(code, ())),
                      "major_rate": _rate(len(with_major.get(code, ())), n),
                      "deviation_rate": _rate(len(with_any.get(code, ())), n),
                      "quarantined": sum(q["site"] == code for q in quarantine)})
    total = {"series": len(pet), "major_series": sum(s["major_series"] for s in sites),
             "with_deviation": sum(s["with_deviation"] for s in sites)}
    total["major_rate"] = _rate(total["major_series"], total["series"])
    total["deviation_rate"] = _rate(total["with_deviation"], total["series"])
    received = {(s.header_row.get("subject"), s.header_row.get("visit")) for s in pet if s.header_row}
    held = {q["series_uid"] for q in quarantine if q.get("series_uid")}
    visits = sorted({v for _, v in received} | {v for _, v in cell}, key=lambda v: (v != "baseline", v))
    subjects = []
    for subject, site in sorted(_subjects(session, trial)):
        row = {"subject": subject, "site": site, "cells": []}
        for visit in visits:
            c = cell.get((subject, visit))
            if c:
                text, css = ", ".join(f"{n} {sev}" for sev, n in sorted(c.items())), (
                    "major" if c.get("major") else "minor")
            elif (subject, visit) in received:
                text, css = "ok", "pass"
            else:
                text, css = "not evaluated", ""
            row["cells"].append({"text": text, "css": css})
        subjects.append(row)
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    deviations_per_site(ax, {s["site"]: dict(counts.get(s["site"], {})) for s in sites})
    return {"trial": trial, "deviations": devs, "quarantine": quarantine, "sites": sites, "total": total,
            "visits": visits, "subjects": subjects, "held": len(held),
            "accreditations": accreditation_rows(session), "figure": png_data_uri(fig),
            "generated_at": utcnow().strftime("%Y-%m-%d %H:%M UTC"), "version": __version__}


def _subjects(session: Session, trial: Trial) -> list[tuple[str, str]]:
    sites = {s.id: s.code for s in session.exec(select(Site))}
    return [(s.pseudonym, sites.get(s.site_id, "")) for s in session.exec(select(Subject).where(Subject.trial_id == trial.id))]


def render_trial_summary(session: Session, trial_code: str, out_dir: Path, *, data_dir: Path) -> Path:
    """Render the summary to ``out_dir/<trial>-summary.html`` and record it as a Report."""
    context = trial_summary_context(session, trial_code)
    html = _env.get_template("trial_summary.html.j2").render(**context)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{trial_code}-summary.html"
    path.write_text(html)
    digest = hashlib.sha256(html.encode()).hexdigest()
    rel = str(path.absolute().relative_to(data_dir.absolute())) if path.absolute().is_relative_to(
        data_dir.absolute()) else str(path)
    session.add(Report(kind="demo_summary", trial_id=context["trial"].id, path=rel, sha256=digest))
    return path


__all__ = ["render_trial_summary", "trial_summary_context"]
