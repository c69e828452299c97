"""Prefect tasks for trial-scan QC: thin wrappers over expectations.qc."""

from __future__ import annotations

from prefect import task
from sqlmodel import col, select

from corelab.db import session_scope
from corelab.lifecycle import move_all, start_running
from corelab.models import Series
from corelab.settings import load_settings
from expectations.manual import load_manual
from expectations.qc import mark_nothing_to_check, qc_series_batch, trial_pet_series
from services import reports


@task(name="find-trial-series", task_run_name="find {trial_code} series")
def find_trial_series(trial_code: str, pending_only: bool = True) -> list[int]:
    """Series to check: those not yet judged by the manual's current version (or all)."""
    version = load_manual(trial_code).version if pending_only else None
    with session_scope(load_settings()) as session:
        return [s.id for s in trial_pet_series(session, trial_code, needing_version=version)]


@task(name="qc-batch", task_run_name="qc {trial_code}: {n_series} series", retries=1, retry_delay_seconds=[5])
def qc_batch(trial_code: str, series_ids: list[int], n_series: int) -> dict:
    """Validate one batch of series in one Great Expectations run, record the deviations, then
    publish each series' QC note to its site (:func:`services.reports.publish_feedback_after_qc`)."""
    manual = load_manual(trial_code)
    settings = load_settings()

    def batch(session):
        return list(session.exec(select(Series).where(col(Series.id).in_(series_ids)).order_by(col(Series.id))))

    with session_scope(settings) as session:  # committed, so the running state shows while GX runs
        start_running(session, batch(session), actor="qc")
    figures, on_image = reports.figure_collector()  # the note's figure is drawn while each volume is loaded
    try:
        with session_scope(settings) as session:
            out = qc_series_batch(session, settings, manual, batch(session), docs_dir=settings.data_dir / "gx",
                                  on_image=on_image).as_dict()
    except Exception as exc:
        with session_scope(settings) as session:  # a retry starts them again from failed
            move_all(session, [s for s in batch(session) if s.qc_state == "running"], qc_state="failed", actor="qc",
                     reason=f"QC of the batch failed: {type(exc).__name__}: {exc}")
        raise
    # The judgement is committed: now each site gets its per-series note (seconds after QC).
    out["feedback"] = reports.publish_feedback_after_qc(settings, series_ids, figures)
    return out


@task(name="mark-non-pet-done", task_run_name="mark CT series checked")
def mark_non_pet_done() -> int:
    """CT series of a study carry no manual rules yet: mark them checked so none waits forever."""
    with session_scope(load_settings()) as session:
        rows = session.exec(select(Series).where(Series.modality != "PT", Series.state == "complete",
                                                 Series.qc_state == "pending")).all()
        return len(mark_nothing_to_check(session, list(rows), actor="qc"))
