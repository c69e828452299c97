"""Trial deviation report, for trial managers: deviations per site, subject and visit.

Per site the trial PET series, the evaluable ones, and the rates of series with an active major
or any active deviation (with a plot); a subject x visit matrix; every deviation, major first,
with its manual section, status, query and waiver; the quarantine per site; the accreditation
register; and links to the exports (header table and deviations, CSV and Parquet). It goes to
the trial managers, never to a site (it holds every site's data).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
from sqlmodel import Session, select

from corelab import qcstats
from corelab.models import Site, Subject, Trial
from corelab.queries import accreditation_rows, deviation_rows, quarantine_rows
from corelab.site_queries import query_rows
from expectations.qc import trial_pet_series
from reports.figures import deviations_per_site
from reports.render import ReportError, ReportSpec
from reports.site_qc import _waivers

__all__ = ["trial_deviation_report"]


def _fig_per_site(counts: dict[str, dict[str, int]]):
    fig, ax = plt.subplots(figsize=(4.6, 2.6), constrained_layout=True)
    deviations_per_site(ax, counts)
    return fig


def trial_deviation_report(session: Session, trial_code: str, *, exports: dict[str, str] | None = None
                           ) -> ReportSpec:
    """The deviation report of one trial.

    Parameters
    ----------
    trial_code : str
    exports : dict, optional
        ``{name: path}`` of the exports to link (from :func:`reports.exports.export_trial`).
    """
    trial = session.exec(select(Trial).where(Trial.code == trial_code)).first()
    if trial is None:
        raise ReportError(f"no trial {trial_code!r}; load the register first")
    devs = deviation_rows(session, trial_code=trial_code)
    devs.sort(key=lambda d: (d["severity"] != "major", d["site"], d["subject"], d["visit"], d["rule_id"]))
    waivers = _waivers(session, [d["id"] for d in devs])
    queries = {q["deviation_id"]: q for q in sorted(query_rows(session), key=lambda q: q["id"])}
    for d in devs:
        q = queries.get(d["id"])
        d["query"] = {"id": q["id"], "status": q["status"]} if q else None
        d["waiver"] = waivers.get(d["id"])
    site_codes = {s.id: s.code for s in session.exec(select(Site))}
    pet = trial_pet_series(session, trial_code)
    per_site = {code: 0 for code in site_codes.values()}
    for s in pet:
        if s.site_id in site_codes:
            per_site[site_codes[s.site_id]] += 1
    sites, total = qcstats.deviation_rates(per_site, devs)
    quarantine = quarantine_rows(session)
    for s in sites:
        s["quarantined"] = sum(q["site"] == s["site"] for q in quarantine)
    received = {(s.header_row.get("subject"), s.header_row.get("visit")) for s in pet if s.header_row}
    subjects = [(s.pseudonym, site_codes.get(s.site_id, ""))
                for s in session.exec(select(Subject).where(Subject.trial_id == trial.id))]
    visits, matrix = qcstats.visit_matrix(subjects, received, devs)
    accreditations = [{**a, "valid_from": a["valid_from"].isoformat() if a["valid_from"] else None,
                       "valid_until": a["valid_until"].isoformat() if a["valid_until"] else None}
                      for a in accreditation_rows(session)]
    links = [{"name": Path(p).name, "href": Path(p).absolute().as_uri()} for _, p in sorted((exports or {}).items())]
    data = {
        "trial": {"code": trial.code, "title": trial.title, "imaging_manual": trial.imaging_manual,
                  "manual_version": trial.manual_version, "standard": trial.standard},
        "sites": sites, "total": total, "visits": visits, "subjects": matrix,
        "deviations": devs, "n_major": sum(d["severity"] == "major" for d in devs),
        "quarantine_held": len({q["series_uid"] for q in quarantine if q.get("series_uid")}),
        "accreditations": accreditations, "exports": links,
        "meta": {},
    }
    counts = qcstats.severity_counts(devs)
    figures = {"per_site": partial(_fig_per_site, {s["site"]: counts.get(s["site"], {}) for s in sites})}
    return ReportSpec(kind="trial_deviations", key=trial.code, title=f"Trial deviation report: {trial.code}",
                      template="trial_deviations.html.j2", data=data, figures=figures, trial_id=trial.id)
