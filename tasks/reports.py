"""Prefect tasks for reports: thin wrappers over :mod:`services.reports`.

A report whose content has not changed since its newest version is left alone (no new version,
no new delivery), so a repeated or nightly run is cheap and changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact

from corelab.db import session_scope
from corelab.settings import load_settings
from services import reports


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
    with session_scope(settings) as session:
        out = reports.publish_trial_accreditation_reports(session, settings, trial_code)
    _artifact("accreditation", out)
    return out


@task(name="render-site-qc-reports", task_run_name="site QC reports ({trial_code}, {month})", retries=1,
      retry_delay_seconds=[2])
def render_site_qc_reports(trial_code: str, month: str | None = None) -> list[dict]:
    """The site QC report of the month (default: this month) for every site of the trial."""
    settings = load_settings()
    with session_scope(settings) as session:
        out = reports.publish_trial_site_qc_reports(session, settings, trial_code, month=month)
    _artifact("site_qc", out)
    return out


@task(name="render-trial-deviation-report", task_run_name="trial deviation report {trial_code}", retries=1,
      retry_delay_seconds=[2])
def render_trial_report(trial_code: str) -> str:
    """The trial deviation report (the same route as ``corelab report render trial``); returns the
    path of the newest HTML version."""
    settings = load_settings()
    with session_scope(settings) as session:
        result = reports.publish_trial_report(session, settings, trial_code)
    create_link_artifact(key=f"report-{trial_code.lower()}", link=Path(result["html"]).absolute().as_uri(),
                         description=f"{trial_code} trial deviation report (HTML; PDF beside it), "
                                     f"v{result['version']} ({result['status']})")
    return str(Path(result["html"]).absolute())
