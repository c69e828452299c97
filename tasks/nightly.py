"""Prefect tasks of the nightly QC: thin wrappers over the packages."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import matplotlib.pyplot as plt
from prefect import task
from sqlmodel import col, select

from accreditation.drift import judge_calibration
from accreditation.register import expiring_accreditations, update_accreditation
from corelab.db import session_scope
from corelab.models import Accreditation, PhantomResult, Scanner, Series, utcnow
from corelab.settings import load_settings
from expectations.qc import trial_pet_series
from reports.exports import export_trial
from reports.figures import calibration_chart, png_data_uri


@task(name="recent-trial-series", task_run_name="series of {trial_code} completed in the last {since_hours} h")
def recent_trial_series(trial_code: str, since_hours: float) -> list[int]:
    since = utcnow() - dt.timedelta(hours=since_hours)
    with session_scope(load_settings()) as session:
        return [s.id for s in trial_pet_series(session, trial_code)
                if s.completed_at is not None and s.completed_at >= since]


@task(name="refresh-register", task_run_name="refresh the scanner register")
def refresh_register(within_days: int = 30) -> dict:
    """Recompute every accreditation as of today; list coming expiries and pending re-qualifications."""
    with session_scope(load_settings()) as session:
        changed = []
        for acc in list(session.exec(select(Accreditation).order_by(col(Accreditation.id)))):
            before = (acc.status, acc.valid_from, acc.valid_until)
            after = update_accreditation(session, acc.scanner_id, standard=acc.standard, scope=acc.scope,
                                         actor="nightly")
            if (after.status, after.valid_from, after.valid_until) != before:
                changed.append({"scanner_id": acc.scanner_id, "standard": acc.standard, "status": after.status})
        requalify = [{"scanner": s.code, "reason": s.requalification_reason}
                     for s in session.exec(select(Scanner).where(col(Scanner.requalification_reason).is_not(None)))]
        return {"changed": changed, "expiring": expiring_accreditations(session, within_days=within_days),
                "requalification": requalify}


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


@task(name="calibration-drift", task_run_name="calibration QC drift per scanner")
def calibration_drift() -> list[dict]:
    """Judge each scanner's calibration series and chart it (PNG under reports/calibration/)."""
    settings = load_settings()
    with session_scope(settings) as session:
        scanners = {s.id: s.code for s in session.exec(select(Scanner))}
        points: dict[str, list] = {}
        for r in session.exec(select(PhantomResult).where(PhantomResult.kind == "uniform_cylinder")):
            bias = (r.metrics or {}).get("calibration_bias_pct")
            if bias is not None and r.scan_date is not None and r.scanner_id in scanners:
                points.setdefault(scanners[r.scanner_id], []).append((r.scan_date, float(bias)))
    out = []
    for code, pts in sorted(points.items()):
        drift = judge_calibration(code, pts)
        fig, ax = plt.subplots(figsize=(5, 2.6))
        calibration_chart(ax, drift)
        chart = settings.reports_dir / "calibration" / f"{code}.png"
        # PNG bytes from the data URI: same data, same bytes, so an unchanged chart is not rewritten.
        import base64

        _write_if_changed(chart, base64.b64decode(png_data_uri(fig).split(",", 1)[1]))
        out.append({**drift.to_dict(), "chart": str(chart)})
    return out


@task(name="parquet-snapshot", task_run_name="parquet snapshot of {trial_code}", retries=2,
      retry_delay_seconds=[2, 10])
def parquet_snapshot(trial_code: str) -> dict:
    """Export the header table and deviations to ``exports/snapshots/<date>/``, unless nothing
    changed since the newest snapshot (its content digest is kept beside it)."""
    settings = load_settings()
    with session_scope(settings) as session:
        rows = [s.header_row for s in trial_pet_series(session, trial_code)]
        from corelab.queries import deviation_rows

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
