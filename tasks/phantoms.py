"""Prefect tasks for phantom scans: thin wrappers over accreditation.evaluate and the register."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from sqlmodel import select

from accreditation.evaluate import evaluate_series_folder, record_evaluation
from accreditation.register import expiring_accreditations
from corelab.db import session_scope
from corelab.ingest import series_dir
from corelab.models import Scanner, Series
from corelab.settings import load_settings
from phantoms.fill import parse_fill_sheet


@task(name="find-phantom-series", task_run_name="find phantom series")
def find_phantom_series(pending_only: bool = True) -> list[tuple[int, str, str]]:
    """Received phantom series: ``(series id, series UID, scanner code)``."""
    with session_scope(load_settings()) as session:
        scanners = {s.id: s.code for s in session.exec(select(Scanner))}
        rows = session.exec(select(Series).where(Series.kind == "phantom", Series.state == "complete")).all()
        return [(s.id, s.series_uid, scanners.get(s.scanner_id, "unknown scanner")) for s in rows
                if not pending_only or s.qc_state != "done"]


def _fill_error(series_uid: str, scanner: str) -> dict:
    return {"series_uid": series_uid, "scanner": scanner, "verdict": "error",
            "error": f"phantom series {series_uid} came without a fill sheet; send the fill sheet "
                     "(X.fill.yaml beside the series folder X) and release the series again"}


@task(name="analyze-phantom", task_run_name="analyse phantom of {scanner}",
      cache_policy=INPUTS + TASK_SOURCE, persist_result=True, cache_expiration=dt.timedelta(days=400))
def analyze_phantom(folder: str, fill_sheet: str, standard: str, input_sha256: str, scanner: str = ""):
    """Analyse one phantom series folder against ``standard``.

    Cached on its inputs: the series checksum (``input_sha256``) and the fill sheet's text are
    among them, so a re-run over unchanged data does not recompute the phantom, and changed
    images or fill values do.
    """
    fill = parse_fill_sheet(yaml.safe_load(fill_sheet) or {}, source=f"{folder}/fill.yaml")
    return evaluate_series_folder(Path(folder), fill, standard=standard)


@task(name="accredit-phantom", task_run_name="phantom of {scanner} ({series_uid})", retries=1,
      retry_delay_seconds=[5])
def accredit_phantom(series_id: int, series_uid: str, standard: str, scope: str, scanner: str = "") -> dict:
    """Analyse one phantom series (cached), store the result once, update the register."""
    settings = load_settings()
    with session_scope(settings) as session:
        series = session.get(Series, series_id)
        folder = series_dir(settings, series, session)
        checksum = series.checksum or ""
    fill_path = folder / "fill.yaml"
    if not fill_path.is_file():
        with session_scope(settings) as session:
            session.get(Series, series_id).qc_state = "failed"
        return _fill_error(series_uid, scanner)
    evaluation = analyze_phantom(str(folder), fill_path.read_text(), standard, checksum, scanner)
    with session_scope(settings) as session:
        series = session.get(Series, series_id)
        result, acc = record_evaluation(session, series, evaluation, scope=scope)
        return {"series_uid": series_uid, "scanner_id": series.scanner_id, "scanner": scanner,
                "kind": evaluation.kind, "verdict": evaluation.verdict, "phantom_result_id": result.id,
                "accreditation": acc.status if acc else None,
                "valid_until": acc.valid_until.isoformat() if acc and acc.valid_until else None,
                "metrics": evaluation.metrics, "checks": evaluation.checks}


@task(name="coming-expiries", task_run_name="accreditations expiring within {within_days} days")
def coming_expiries(within_days: int = 30) -> list[dict]:
    """Accreditations whose validity ends within ``within_days`` (or has just ended)."""
    with session_scope(load_settings()) as session:
        return expiring_accreditations(session, within_days=within_days)
