"""The nightly steps as use cases: the day's series, the register, calibration drift, a snapshot.

Each is idempotent: on unchanged data a second call changes nothing in the store or on disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

from sqlmodel import Session, col, select

from accreditation.drift import DriftResult, judge_calibration
from accreditation.register import expiring_accreditations, update_accreditation
from corelab.models import Accreditation, PhantomResult, Scanner, utcnow
from corelab.queries import deviation_rows
from corelab.settings import Settings
from expectations.qc import trial_pet_series
from reports.exports import export_trial
from reports.figures import calibration_chart_png


def recent_trial_series(session: Session, trial_code: str, since_hours: float) -> list[int]:
    """Ids of the trial's complete PET series completed in the last ``since_hours`` hours."""
    since = utcnow() - dt.timedelta(hours=since_hours)
    return [s.id for s in trial_pet_series(session, trial_code)
            if s.completed_at is not None and s.completed_at >= since]


def refresh_register(session: Session, *, within_days: int = 30, actor: str = "nightly") -> dict:
    """Recompute every accreditation as of today; list coming expiries and pending re-qualifications."""
    changed = []
    for acc in list(session.exec(select(Accreditation).order_by(col(Accreditation.id)))):
        before = (acc.status, acc.valid_from, acc.valid_until)
        after = update_accreditation(session, acc.scanner_id, standard=acc.standard, scope=acc.scope, actor=actor)
        if (after.status, after.valid_from, after.valid_until) != before:
            changed.append({"scanner_id": acc.scanner_id, "standard": acc.standard, "status": after.status})
    requalify = [{"scanner": s.code, "reason": s.requalification_reason}
                 for s in session.exec(select(Scanner).where(col(Scanner.requalification_reason).is_not(None)))]
    return {"changed": changed, "expiring": expiring_accreditations(session, within_days=within_days),
            "requalification": requalify}


def calibration_points(session: Session) -> dict[str, list[tuple[dt.date, float]]]:
    """Per scanner code, its calibration QC points (scan date, SUV bias %) from uniform cylinders."""
    scanners = {s.id: s.code for s in session.exec(select(Scanner))}
    points: dict[str, list] = {}
    for r in session.exec(select(PhantomResult).where(PhantomResult.kind == "uniform_cylinder")):
        bias = (r.metrics or {}).get("calibration_bias_pct")
        if bias is not None and r.scan_date is not None and r.scanner_id in scanners:
            points.setdefault(scanners[r.scanner_id], []).append((r.scan_date, float(bias)))
    return points


def calibration_drift(session: Session) -> list[DriftResult]:
    """Judge each scanner's calibration series (control limits and drift), by scanner code."""
    return [judge_calibration(code, pts) for code, pts in sorted(calibration_points(session).items())]


def write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def chart_calibration(settings: Settings, drifts: list[DriftResult]) -> list[dict]:
    """Draw each judgement to ``reports/calibration/<scanner>.png`` (an unchanged chart is not
    rewritten); returns the judgements as dicts with their chart paths."""
    out = []
    for drift in drifts:
        chart = settings.reports_dir / "calibration" / f"{drift.scanner}.png"
        write_if_changed(chart, calibration_chart_png(drift))
        out.append({**drift.to_dict(), "chart": str(chart)})
    return out


def parquet_snapshot(session: Session, settings: Settings, trial_code: str) -> dict:
    """Export the header table and deviations to ``exports/snapshots/<date>/``, unless nothing
    changed since the newest snapshot (its content digest is kept beside it)."""
    rows = [s.header_row for s in trial_pet_series(session, trial_code)]
    devs = deviation_rows(session, trial_code=trial_code)
    digest = hashlib.sha256(json.dumps([rows, devs], sort_keys=True, default=str).encode()).hexdigest()
    root = settings.exports_dir / "snapshots"
    digests = sorted(root.glob("*/digest.txt"))
    if digests and digests[-1].read_text().strip() == digest:
        return {"written": False, "folder": str(digests[-1].parent), "digest": digest}
    folder = root / dt.date.today().isoformat()
    paths = export_trial(session, trial_code, folder, fmt="parquet")
    (folder / "digest.txt").write_text(digest + "\n")
    return {"written": True, "folder": str(folder), "digest": digest, **paths}
