"""Prefect tasks of the nightly QC: thin wrappers over :mod:`services.nightly`."""

from __future__ import annotations

from prefect import task

from corelab.db import session_scope
from corelab.settings import load_settings
from services import nightly


@task(name="recent-trial-series", task_run_name="series of {trial_code} completed in the last {since_hours} h")
def recent_trial_series(trial_code: str, since_hours: float) -> list[int]:
    with session_scope(load_settings()) as session:
        return nightly.recent_trial_series(session, trial_code, since_hours)


@task(name="refresh-register", task_run_name="refresh the scanner register")
def refresh_register(within_days: int = 30) -> dict:
    """Recompute every accreditation as of today; list coming expiries and pending re-qualifications."""
    with session_scope(load_settings()) as session:
        return nightly.refresh_register(session, within_days=within_days)


@task(name="calibration-drift", task_run_name="calibration QC drift per scanner")
def calibration_drift() -> list[dict]:
    """Judge each scanner's calibration series and chart it (PNG under reports/calibration/)."""
    settings = load_settings()
    with session_scope(settings) as session:
        drifts = nightly.calibration_drift(session)
    return nightly.chart_calibration(settings, drifts)


@task(name="parquet-snapshot", task_run_name="parquet snapshot of {trial_code}", retries=2,
      retry_delay_seconds=[2, 10])
def parquet_snapshot(trial_code: str) -> dict:
    """The day's Parquet snapshot of the trial's tables, unless nothing changed since the last."""
    settings = load_settings()
    with session_scope(settings) as session:
        return nightly.parquet_snapshot(session, settings, trial_code)
