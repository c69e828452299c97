"""Prefect tasks for phantom scans: thin wrappers over accreditation.evaluate and the register."""

from __future__ import annotations

from prefect import task
from sqlmodel import select

from accreditation.evaluate import evaluate_series_folder, record_evaluation
from corelab.db import session_scope
from corelab.ingest import series_dir
from corelab.models import Series
from corelab.settings import load_settings
from phantoms.fill import load_fill_sheet


@task(name="find-phantom-series", task_run_name="find phantom series")
def find_phantom_series(pending_only: bool = True) -> list[tuple[int, str]]:
    with session_scope(load_settings()) as session:
        rows = session.exec(select(Series).where(Series.kind == "phantom", Series.state == "complete")).all()
        return [(s.id, s.series_uid) for s in rows if not pending_only or s.qc_state != "done"]


@task(name="accredit-phantom", task_run_name="phantom {series_uid}", retries=1, retry_delay_seconds=[5])
def accredit_phantom(series_id: int, series_uid: str, standard: str, scope: str) -> dict:
    """Analyse one phantom series against ``standard``, store the result, update the register."""
    settings = load_settings()
    with session_scope(settings) as session:
        series = session.get(Series, series_id)
        folder = series_dir(settings, series, session)
        fill_path = folder / "fill.yaml"
        if not fill_path.is_file():
            series.qc_state = "failed"
            return {"series_uid": series_uid, "verdict": "error",
                    "error": f"phantom series {series_uid} came without a fill sheet; send the fill sheet "
                             "(X.fill.yaml beside the series folder X) and release the series again"}
        evaluation = evaluate_series_folder(folder, load_fill_sheet(fill_path), standard=standard)
        result, acc = record_evaluation(session, series, evaluation, scope=scope)
        return {"series_uid": series_uid, "scanner_id": series.scanner_id, "kind": evaluation.kind,
                "verdict": evaluation.verdict, "phantom_result_id": result.id,
                "accreditation": acc.status if acc else None, "metrics": evaluation.metrics}
