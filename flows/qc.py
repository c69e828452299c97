"""Trial-scan QC flow: every complete trial PET series against the trial's imaging manual."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from corelab.settings import load_settings
from flows.alerts import HOOKS
from flows.cli_common import short_uid
from flows.runners import task_runner
from services.datadocs import data_docs_site, data_docs_url
from tasks.qc import find_trial_series, mark_non_pet_done, qc_batch, qc_run_name

BATCH_SIZE = 200  # one GX run per batch: 10,000 rows x 20 rules validate in under a second


def _run_name() -> str:
    """The flow run's name from its parameters (also when a worker runs a deployment's run)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return qc_run_name(p["trial_code"], p.get("series_ids"), p.get("pending_only", True))


def deviation_table(findings: list[dict]) -> list[dict]:
    """The run's findings as a physicist reads them: who, which rule, what was expected and seen,
    where the deviation stands; the deviation id (for ``corelab deviations`` query and waive) and
    the series UID's tail last."""
    return [{"site": f.get("site"), "subject": f.get("subject"), "visit": f.get("visit"), "rule": f["rule_id"],
             "severity": f["severity"], "expected": f["expected"], "observed": f["observed"],
             "status": f.get("status", ""), "manual section": f.get("manual_section", ""),
             "deviation": f.get("deviation_id"), "series": short_uid(f["series_uid"], keep=12)}
            for f in findings]


@flow(name="qc-trial", flow_run_name=_run_name, log_prints=True, task_runner=task_runner(), **HOOKS)
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
        settings = load_settings()
        summary["data_docs_url"] = data_docs_url(settings, trial_code)
        create_link_artifact(key=f"data-docs-{trial_code.lower()}", link=summary["data_docs_url"],
                             link_text=f"Data Docs of {trial_code}",
                             description=f"Great Expectations Data Docs of {trial_code} on the portal (physicists "
                                         f"and the trial's managers); the files are on the QC server in "
                                         f"{data_docs_site(settings, trial_code).resolve()}")
    if findings:
        create_table_artifact(key=f"deviations-{trial_code.lower()}", table=deviation_table(findings),
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
