"""The trial summary report (first cut): deviations, quarantine and accreditation in one HTML file."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlmodel import Session, select

from corelab import __version__
from corelab.models import Report, Site, Trial, utcnow
from corelab.queries import accreditation_rows, deviation_rows, quarantine_rows
from expectations.qc import trial_pet_series
from reports.figures import deviations_per_site, png_data_uri

TEMPLATES = Path(__file__).with_name("templates")
_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))


def trial_summary_context(session: Session, trial_code: str) -> dict:
    trial = session.exec(select(Trial).where(Trial.code == trial_code)).one()
    devs = sorted(deviation_rows(session, trial_code=trial_code), key=lambda d: (d["severity"] != "major",
                                                                                 d["site"], d["subject"], d["visit"]))
    quarantine = quarantine_rows(session)
    counts: dict[str, Counter] = defaultdict(Counter)
    major_series: dict[str, set] = defaultdict(set)
    for d in devs:
        counts[d["site"]][d["severity"]] += 1
        if d["severity"] == "major":
            major_series[d["site"]].add(d["series_uid"])
    site_codes = {s.id: s.code for s in session.exec(select(Site))}
    series_per_site: Counter = Counter(site_codes.get(s.site_id) for s in trial_pet_series(session, trial_code))
    sites = [{"site": code, "series": series_per_site.get(code, 0),
              "evaluable": series_per_site.get(code, 0) - len(major_series.get(code, ())),
              "major_series": len(major_series.get(code, ())),
              "quarantined": sum(q["site"] == code for q in quarantine)}
             for code in sorted(site_codes.values())]
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    deviations_per_site(ax, {s["site"]: dict(counts.get(s["site"], {})) for s in sites})
    return {"trial": trial, "deviations": devs, "quarantine": quarantine, "sites": sites,
            "accreditations": accreditation_rows(session), "figure": png_data_uri(fig),
            "generated_at": utcnow().strftime("%Y-%m-%d %H:%M UTC"), "version": __version__}


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
