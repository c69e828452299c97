"""Trial-scan QC flow: every complete trial PET series against the trial's imaging manual."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.alerts import HOOKS
from flows.runners import task_runner
from tasks.qc import find_trial_series, mark_non_pet_done, qc_batch

BATCH_SIZE = 200  # one GX run per batch: 10,000 rows x 20 rules validate in under a second


@flow(name="qc-trial", flow_run_name="qc {trial_code}", log_prints=True, task_runner=task_runner(), **HOOKS)
def qc_trial(trial_code: str, series_ids: list[int] | None = None, pending_only: bool = True) -> dict:
    """Validate trial PET series against the imaging manual and record the deviations."""
    ids = series_ids if series_ids is not None else find_trial_series(trial_code, pending_only)
    batches = [ids[i:i + BATCH_SIZE] for i in range(0, len(ids), BATCH_SIZE)]
    results = [f.result() for f in [qc_batch.submit(trial_code, batch, len(batch)) for batch in batches]]
    mark_non_pet_done()
    findings = [f for r in results for f in r["findings"]]
    summary = {"trial": trial_code, "series": len(ids),
               "deviations_new": sum(r["deviations_new"] for r in results),
               "deviations_updated": sum(r["deviations_updated"] for r in results),
               "deviations_resolved": sum(r["deviations_resolved"] for r in results),
               "scanners_flagged": sorted({c for r in results for c in r["scanners_flagged"]}),
               "data_docs": next((r["data_docs"] for r in results if r["data_docs"]), None),
               # per-series QC notes to the sites: new versions, unchanged, failed (logged)
               "feedback": {k: sum(r.get("feedback", {}).get(k, 0) if k != "failed" else
                                   len(r.get("feedback", {}).get(k, [])) for r in results)
                            for k in ("rendered", "unchanged", "failed")},
               "findings": findings}
    if summary["data_docs"]:
        create_link_artifact(key=f"data-docs-{trial_code.lower()}", link=f"file://{summary['data_docs']}",
                             description="Great Expectations Data Docs of this QC run")
    if findings:
        create_table_artifact(key=f"deviations-{trial_code.lower()}", table=findings,
                              description=f"Protocol deviations found in this run for {trial_code}")
    create_markdown_artifact(key=f"qc-summary-{trial_code.lower()}", markdown=_markdown(summary),
                             description=f"QC summary for {trial_code}")
    return summary


def _markdown(summary: dict) -> str:
    major = sum(f["severity"] == "major" for f in summary["findings"])
    lines = [f"# QC of {summary['trial']}", "",
             f"- series validated: **{summary['series']}**",
             f"- findings: **{len(summary['findings'])}** ({major} major)",
             f"- deviations new / updated / resolved: {summary['deviations_new']} / "
             f"{summary['deviations_updated']} / {summary['deviations_resolved']}",
             f"- scanners flagged for re-qualification: {', '.join(summary['scanners_flagged']) or 'none'}",
             f"- series QC notes to the sites new / unchanged / failed: {summary['feedback']['rendered']} / "
             f"{summary['feedback']['unchanged']} / {summary['feedback']['failed']}", ""]
    if summary["findings"]:
        lines += ["| site | subject | visit | rule | severity | expected | observed |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {f['site']} | {f['subject']} | {f['visit']} | {f['rule_id']} | {f['severity']} | "
                  f"{f['expected']} | {f['observed']} |" for f in summary["findings"]]
    return "\n".join(lines)
