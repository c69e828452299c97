"""Prefect tasks for reports and for scoring a synthetic trial against its truth."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact

from corelab.db import session_scope
from corelab.queries import deviation_rows, quarantine_rows
from corelab.settings import load_settings
from expectations.truth import score
from reports.summary import render_trial_summary as _render


@task(name="render-trial-summary", task_run_name="report {trial_code}", retries=1, retry_delay_seconds=[2])
def render_trial_summary(trial_code: str) -> str:
    settings = load_settings()
    with session_scope(settings) as session:
        path = _render(session, trial_code, settings.reports_dir, data_dir=settings.data_dir)
    create_link_artifact(key=f"report-{trial_code.lower()}", link=path.absolute().as_uri(),
                         description=f"{trial_code} QC and accreditation summary (HTML)")
    return str(path.absolute())


@task(name="score-against-truth", task_run_name="score {trial_code} against ground truth")
def score_demo(ground_truth_path: str, trial_code: str) -> dict:
    """How many injected problems the pipeline found, missed, or reported without cause."""
    truth = json.loads(Path(ground_truth_path).read_text())
    with session_scope(load_settings()) as session:
        devs = deviation_rows(session, trial_code=trial_code)
        quarantined = quarantine_rows(session, include_released=True)
    return score(truth, devs, quarantined).as_dict()
