"""Prefect tasks for reports and for scoring a synthetic trial against its truth.

Each render task renders and delivers the reports of one kind; a report whose content has not
changed since its newest version is left alone (no new version, no new delivery), so a repeated
or nightly run is cheap and changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact
from sqlmodel import col, select

from corelab.db import session_scope
from corelab.models import Accreditation, Scanner, Site, Subject, Trial
from corelab.queries import deviation_rows, quarantine_rows
from corelab.settings import load_settings
from expectations.manual import trial_fields
from expectations.truth import score
from reports.accreditation import accreditation_report
from reports.delivery import publish
from reports.exports import export_trial
from reports.site_qc import month_period, site_qc_report
from reports.trial import trial_deviation_report


def _artifact(kind: str, rows: list[dict]) -> None:
    table = [{k: r.get(k) for k in ("key", "status", "version", "report_id", "pdf")} for r in rows]
    if table:
        create_table_artifact(key=f"reports-{kind.replace('_', '-')}", table=table,
                              description=f"{kind} reports: rendered (new version) or unchanged")


@task(name="render-accreditation-reports", task_run_name="accreditation reports ({trial_code})", retries=1,
      retry_delay_seconds=[2])
def render_accreditation_reports(trial_code: str) -> list[dict]:
    """One accreditation report per scanner accreditation in the trial's scope; deliver new versions."""
    settings = load_settings()
    out = []
    with session_scope(settings) as session:
        rows = session.exec(select(Scanner.code, Accreditation.standard).join(
            Accreditation, Accreditation.scanner_id == Scanner.id).where(Accreditation.scope == trial_code)
            .order_by(col(Scanner.code))).all()
        for code, standard in rows:
            spec = accreditation_report(session, code, settings=settings, standard=standard, scope=trial_code)
            out.append(publish(session, settings, spec))
    _artifact("accreditation", out)
    return out


@task(name="render-site-qc-reports", task_run_name="site QC reports ({trial_code}, {month})", retries=1,
      retry_delay_seconds=[2])
def render_site_qc_reports(trial_code: str, month: str | None = None) -> list[dict]:
    """The site QC report of the month (default: this month) for every site of the trial."""
    settings = load_settings()
    since, until, label = month_period(month)
    out = []
    with session_scope(settings) as session:
        trial = session.exec(select(Trial).where(Trial.code == trial_code)).one()
        site_ids = set(session.exec(select(Subject.site_id).where(Subject.trial_id == trial.id)))
        sites = session.exec(select(Site).where(col(Site.id).in_(site_ids)).order_by(col(Site.code))).all()
        for site in sites:
            spec = site_qc_report(session, site.code, since=since, until=until, label=label)
            out.append(publish(session, settings, spec))
    _artifact("site_qc", out)
    return out


@task(name="render-trial-deviation-report", task_run_name="trial deviation report {trial_code}", retries=1,
      retry_delay_seconds=[2])
def render_trial_report(trial_code: str) -> str:
    """Export the trial's tables as CSV, then render and deliver its deviation report.

    CSV, not Parquet: a CSV of unchanged tables is byte-for-byte the same file, so a repeated run
    leaves the exports as they were (a Parquet file records its export time). Returns the path of
    the newest HTML version.
    """
    settings = load_settings()
    with session_scope(settings) as session:
        manual_version = trial_fields(trial_code).get("manual_version")
        paths = export_trial(session, trial_code, settings.exports_dir, fmt="csv", manual_version=manual_version)
        exports = {f"{name}.csv": p for name, p in paths.items()}
        result = publish(session, settings, trial_deviation_report(session, trial_code, exports=exports))
    create_link_artifact(key=f"report-{trial_code.lower()}", link=Path(result["html"]).absolute().as_uri(),
                         description=f"{trial_code} trial deviation report (HTML; PDF beside it), "
                                     f"v{result['version']} ({result['status']})")
    return str(Path(result["html"]).absolute())




@task(name="score-against-truth", task_run_name="score {trial_code} against ground truth")
def score_demo(ground_truth_path: str, trial_code: str) -> dict:
    """How many injected problems the pipeline found, missed, or reported without cause."""
    truth = json.loads(Path(ground_truth_path).read_text())
    with session_scope(load_settings()) as session:
        devs = deviation_rows(session, trial_code=trial_code)
        quarantined = quarantine_rows(session, include_released=True)
    return score(truth, devs, quarantined).as_dict()
