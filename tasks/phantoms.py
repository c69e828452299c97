"""Prefect tasks for phantom scans: thin wrappers over accreditation.evaluate and the register.

A received phantom series lives in its spool folder with its ``fill.yaml``; a physicist may put a
``centres.yaml`` (sphere centres by hand) beside it when a verdict was withheld. Each NEMA IEC
analysis leaves its sphere-assignment figure there too, ``sphere-assignment-result<N>.png``.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from sqlmodel import col, select

from accreditation.evaluate import (CENTRES_FILE, WITHHELD, CentresFileError, PhantomEvaluation,
                                    evaluate_series_folder, parse_centres, record_evaluation)
from accreditation.register import expiring_accreditations
from corelab.db import session_scope
from corelab.dicomio import DicomVolumeError
from corelab.lifecycle import move, start_running
from corelab.limits import bounded_yaml
from corelab.models import PhantomResult, Scanner, Series
from corelab.series_files import series_dir, series_files
from corelab.settings import load_settings
from phantoms.localise import PhantomLocalisationError
from phantoms.fill import FillSheetError, parse_fill_sheet
from reports.figures import png_data_uri
from services.phantoms import FILL_SHEET, TODO, awaiting_fill_sheet


@task(name="find-phantom-series", task_run_name="find phantom series")
def find_phantom_series(pending_only: bool = True) -> list[tuple[int, str, str]]:
    """Received phantom series: ``(series id, series UID, scanner code)``.

    ``pending_only``: those not analysed yet, those that failed (e.g. an unreadable scan), and
    those whose newest result is withheld (waiting for centres by hand). Left out: a series that
    failed for want of its fill sheet and still has none (:func:`services.phantoms.awaiting_fill_sheet`):
    the run that found it missing failed and alerted, and the worklist shows it; analysing it
    again would only fail and alert again, every run. Its sheet puts it back to pending (and in
    this selection); the flow's ``series`` parameter still takes it.
    """
    settings = load_settings()
    with session_scope(settings) as session:
        scanners = {s.id: s.code for s in session.exec(select(Scanner))}
        rows = session.exec(select(Series).where(Series.kind == "phantom", Series.state == "complete")).all()
        newest = {}
        for r in session.exec(select(PhantomResult).order_by(PhantomResult.id)):
            newest[r.series_id] = r.verdict
        todo = [s for s in rows if not pending_only or s.qc_state != "done" or newest.get(s.id) == WITHHELD]
        waiting = awaiting_fill_sheet(session, settings, [s.id for s in todo if s.qc_state == "failed"]) \
            if pending_only else set()
        return [(s.id, s.series_uid, scanners.get(s.scanner_id, "unknown scanner")) for s in todo
                if s.id not in waiting]


@task(name="name-phantom-series", task_run_name="scanner codes of {n} phantom series")
def with_scanner_codes(series: list[tuple], n: int = 0) -> list[tuple[int, str, str]]:
    """``(series id, series UID)`` items with their scanner code added (kept when an item has one):
    the task runs and the accreditation artifact name the scanner."""
    with session_scope(load_settings()) as session:
        ids = [item[0] for item in series]
        codes = dict(session.exec(select(Series.id, Scanner.code).join(Scanner, Series.scanner_id == Scanner.id)
                                  .where(col(Series.id).in_(ids))).all()) if ids else {}
    return [(item[0], item[1], item[2] if len(item) > 2 and item[2] else codes.get(item[0], "unknown scanner"))
            for item in series]


NO_FILL_SHEET = "no fill sheet"
"""The reason a series' QC failed when it came without its fill sheet (the audit event's reason)."""


def _fill_error(series_uid: str, scanner: str) -> dict:
    return {"series_uid": series_uid, "scanner": scanner, "verdict": "error", "awaiting_fill_sheet": True,
            "error": f"phantom series {series_uid} came without a fill sheet (sent over DICOM, or dropped without "
                     f"X.fill.yaml beside it); {TODO}: that queues it for analysis again"}


@task(name="analyze-phantom", task_run_name="analyse phantom of {scanner}",
      cache_policy=INPUTS + TASK_SOURCE, persist_result=True, cache_expiration=dt.timedelta(days=400))
def analyze_phantom(folder: str, fill_sheet: str, standard: str, input_sha256: str, scanner: str = "",
                    centres: str = "", paths: list[str] | None = None) -> PhantomEvaluation:
    """Analyse one phantom series folder against ``standard`` (its files ``paths``: the newest
    version of each instance, :func:`corelab.series_files.series_files`; all of the folder's when None).

    Cached on its inputs: the series checksum (``input_sha256``), the fill sheet's text and the
    text of the centres file given by hand (``centres``, empty for automatic localisation) are
    among them, so a re-run over unchanged data does not recompute the phantom, and changed
    images, fill values or centres do.
    """
    fill = parse_fill_sheet(bounded_yaml(fill_sheet) or {}, source=f"{folder}/{FILL_SHEET}")
    centres_mm = parse_centres(centres, source=f"{folder}/{CENTRES_FILE}") if centres.strip() else None
    return evaluate_series_folder(Path(folder), fill, standard=standard, centres_mm=centres_mm,
                                  paths=[Path(p) for p in paths] if paths is not None else None)


def save_sphere_figure(evaluation: PhantomEvaluation, path: Path) -> Path | None:
    """Draw the sphere-assignment figure of a NEMA IEC evaluation as a PNG at ``path``.

    None when the evaluation has no sphere plane (a cylinder). An existing file is kept: the
    name carries the result id, and a stored result does not change.
    """
    from reports.accreditation import sphere_assignment_figure

    plane = (evaluation.evidence or {}).get("sphere_plane")
    if plane is None:
        return None
    if not path.is_file():
        fig = sphere_assignment_figure(evaluation.metrics, (evaluation.checks or {}).get("checks") or [], plane,
                                       withheld=evaluation.withheld["reason"] if evaluation.withheld else None)
        path.write_bytes(base64.b64decode(png_data_uri(fig).split(",", 1)[1]))
    return path


@task(name="accredit-phantom", task_run_name="phantom of {scanner} ({series_uid})", retries=1,
      retry_delay_seconds=[5])
def accredit_phantom(series_id: int, series_uid: str, standard: str, scope: str, scanner: str = "") -> dict:
    """Analyse one phantom series (cached), store the result once, update the register."""
    settings = load_settings()
    with session_scope(settings) as session:  # committed, so the running state shows while it is analysed
        series = session.get(Series, series_id)
        if not scanner and series.scanner_id is not None:  # the artifact's scanner column
            scanner = session.get(Scanner, series.scanner_id).code
        folder = series_dir(settings, series, session)
        paths = [str(p) for p in series_files(settings, session, series)]
        checksum = series.checksum or ""
        # Running also when analysed again (done or failed before): a fill sheet is refused while
        # it runs, so no second run starts beside this one with another sheet.
        if series.qc_state in ("done", "failed"):
            move(session, series, qc_state="running", actor="accreditation", reason="phantom analysis started")
        else:
            start_running(session, [series], actor="accreditation", reason="phantom analysis started")

    def failed(reason: str) -> None:
        with session_scope(settings) as session:
            move(session, session.get(Series, series_id), qc_state="failed", actor="accreditation", reason=reason)

    fill_path = folder / FILL_SHEET
    if not fill_path.is_file():
        failed(NO_FILL_SHEET)
        return _fill_error(series_uid, scanner)
    centres_path = folder / CENTRES_FILE
    centres = centres_path.read_text() if centres_path.is_file() else ""
    try:
        evaluation = analyze_phantom(str(folder), fill_path.read_text(), standard, checksum, scanner, centres, paths)
    except (CentresFileError, FillSheetError, DicomVolumeError, PhantomLocalisationError) as exc:
        # input a person must fix: said in the artifact, the other phantoms of the run go on
        failed(f"{type(exc).__name__}: {exc}")
        fix = (f"correct {centres_path}" if isinstance(exc, CentresFileError) else
               f"send a corrected fill sheet (`corelab phantom fill {series_uid} FILE`)"
               if isinstance(exc, FillSheetError) else
               f"give the sphere centres by hand in {centres_path}" if isinstance(exc, PhantomLocalisationError)
               else "ask the site to send the series again")
        return {"series_uid": series_uid, "scanner": scanner, "verdict": "error",
                "error": f"{exc}; {fix} and run accredit-scanners again"}
    except Exception as exc:  # anything else: the task's retry starts it again from failed
        failed(f"phantom analysis failed: {type(exc).__name__}: {exc}")
        raise
    with session_scope(settings) as session:
        series = session.get(Series, series_id)
        result, acc = record_evaluation(session, series, evaluation, scope=scope)
        result_id, scanner_id = result.id, series.scanner_id
        accreditation = acc.status if acc else None
        valid_until = acc.valid_until.isoformat() if acc and acc.valid_until else None
    figure = save_sphere_figure(evaluation, folder / f"sphere-assignment-result{result_id}.png")
    if evaluation.verdict == WITHHELD:
        get_run_logger().warning("phantom of %s (%s): %s", scanner, series_uid, evaluation.message)
    return {"series_uid": series_uid, "scanner_id": scanner_id, "scanner": scanner,
            "kind": evaluation.kind, "verdict": evaluation.verdict, "phantom_result_id": result_id,
            "accreditation": accreditation, "valid_until": valid_until,
            "metrics": evaluation.metrics, "checks": evaluation.checks, "withheld": evaluation.withheld,
            "message": evaluation.message, "figure": str(figure) if figure else None}


@task(name="coming-expiries", task_run_name="accreditations expiring within {within_days} days")
def coming_expiries(within_days: int = 30) -> list[dict]:
    """Accreditations whose validity ends within ``within_days`` (or has just ended)."""
    with session_scope(load_settings()) as session:
        return expiring_accreditations(session, within_days=within_days)
