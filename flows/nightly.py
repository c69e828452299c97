"""Nightly QC: re-check the day's scans, the register, calibration drift, reports and a snapshot.

Idempotent: a second run on unchanged data changes nothing in the store or on disk.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.alerts import HOOKS
from flows.qc import BATCH_SIZE
from flows.runners import task_runner
from tasks.nightly import calibration_drift, parquet_snapshot, recent_trial_series, refresh_register
from tasks.qc import qc_batch
from tasks.reports import render_site_qc_reports, render_trial_report


@flow(name="nightly-qc", flow_run_name="nightly QC {trial_code}", log_prints=True, task_runner=task_runner(),
      **HOOKS)
def nightly_qc(trial_code: str = "FDG-RESP-01", since_hours: float = 24.0) -> dict:
    """The nightly recipe for one trial."""
    ids = recent_trial_series(trial_code, since_hours)
    batches = [ids[i:i + BATCH_SIZE] for i in range(0, len(ids), BATCH_SIZE)]
    qc = [f.result() for f in [qc_batch.submit(trial_code, batch, len(batch)) for batch in batches]]
    register = refresh_register()
    drift = calibration_drift()
    site_reports = render_site_qc_reports(trial_code)
    report = render_trial_report(trial_code)
    snapshot = parquet_snapshot(trial_code)
    summary = {
        "trial": trial_code, "revalidated": len(ids),
        "deviations_new": sum(r["deviations_new"] for r in qc),
        "deviations_updated": sum(r["deviations_updated"] for r in qc),
        "deviations_resolved": sum(r["deviations_resolved"] for r in qc),
        "register_changes": register["changed"], "expiring": register["expiring"],
        "requalification": register["requalification"],
        "drift_alarms": [d["scanner"] for d in drift if d["alarm"]],
        "report": report, "site_reports": [r.get("html") for r in site_reports], "snapshot": snapshot,
    }
    create_table_artifact(key=f"calibration-qc-{trial_code.lower()}",
                          table=[{k: d[k] for k in ("scanner", "level", "reason", "chart")} for d in drift],
                          description="Calibration QC per scanner (control limits and drift)")
    create_markdown_artifact(key=f"nightly-{trial_code.lower()}", markdown=_markdown(summary),
                             description=f"Nightly QC of {trial_code}")
    return summary


def _markdown(s: dict) -> str:
    lines = [f"# Nightly QC of {s['trial']}", "",
             f"- series re-validated: **{s['revalidated']}** (deviations new / updated / resolved: "
             f"{s['deviations_new']} / {s['deviations_updated']} / {s['deviations_resolved']})",
             f"- register changes: {len(s['register_changes'])}; expiring within 30 days: {len(s['expiring'])}",
             f"- scanners awaiting re-qualification: "
             f"{', '.join(r['scanner'] for r in s['requalification']) or 'none'}",
             f"- calibration drift alarms: **{', '.join(s['drift_alarms']) or 'none'}**",
             f"- report: {s['report']}",
             f"- snapshot: {s['snapshot']['folder']} ({'written' if s['snapshot']['written'] else 'unchanged'})"]
    return "\n".join(lines)
