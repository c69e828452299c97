"""The demo: a small synthetic trial, end to end, through Prefect.

Generates the trial into the data directory, loads its register, ingests every site's drop,
accredits every scanner from its phantom scans, checks every trial scan against the imaging
manual, renders and delivers the reports (accreditation per scanner, site QC per site, the trial
deviation report), and scores what was found against the ground truth. A second run renders
nothing new: a report whose content is unchanged keeps its newest version.
"""

from __future__ import annotations

import json
import sys
import time

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from corelab.settings import Settings, load_settings
from flows.accredit import AccreditationIncomplete, accredit_scanners
from flows.alerts import HOOKS
from flows.qc import qc_trial
from flows.demo_data import demo_first_scan_date, score_demo, synthesize
from tasks.ingest import ingest_drop, load_register_file
from tasks.reports import render_accreditation_reports, render_site_qc_reports, render_trial_report

STEPS = ("generate the synthetic trial", "load the site register", "ingest the site drops",
         "accredit the scanners", "check trial scans against the imaging manual", "render and deliver the reports",
         "score against the ground truth")


def step_text(index: int) -> str:
    """The start of step ``index``'s progress line, ``[2/7] load the site register ...``."""
    return f"[{index + 1}/{len(STEPS)}] {STEPS[index]} ..."


def duration_text(seconds: float) -> str:
    """How long a step took, as its progress line ends: ``0.4 s``, ``14.2 s``, ``2 min 05 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class _Progress:
    """One stderr line per step: its name when it starts, how long it took when it ends."""

    def __init__(self, quiet: bool):
        self.quiet, self.start, self.artifact = quiet, time.monotonic(), None
        self.step_start = self.start

    def step(self, index: int) -> None:
        """Step ``index - 1`` has ended and step ``index`` starts (``len(STEPS)``: all done)."""
        if self.artifact is None:
            self.artifact = create_progress_artifact(progress=0.0, key="demo-progress",
                                                     description="corelab demo progress")
        update_progress_artifact(self.artifact, progress=100.0 * index / len(STEPS))
        now = time.monotonic()
        if not self.quiet and index > 0:
            print(f" {duration_text(now - self.step_start)}", file=sys.stderr, flush=True)
        self.step_start = now
        if not self.quiet and index < len(STEPS):
            print(step_text(index), end="", file=sys.stderr, flush=True)


@flow(name="demo", flow_run_name="demo seed {seed}", **HOOKS)
def demo(seed: int = 0, first_scan_date: str | None = None, quiet: bool = False) -> dict:
    settings = load_settings()
    progress = _Progress(quiet)
    first_scan_date = first_scan_date or demo_first_scan_date()
    outdir = settings.incoming_dir / f"demo-trial-seed{seed}-{first_scan_date}"

    progress.step(0)
    trial = synthesize(str(outdir), seed, first_scan_date)
    progress.step(1)
    load_register_file(trial["register"])
    progress.step(2)
    ingested = {site: ingest_drop(str(outdir / "sites" / site), site) for site in trial["sites"]}
    progress.step(3)
    try:
        phantoms = accredit_scanners(scope=trial["trial"])
    except AccreditationIncomplete as exc:  # that run is Failed and alerted; the demo reports it and goes on
        phantoms = exc.results
    progress.step(4)
    qc = qc_trial(trial["trial"])
    progress.step(5)
    accreditation_reports = render_accreditation_reports(trial["trial"])
    site_reports = render_site_qc_reports(trial["trial"])
    report = render_trial_report(trial["trial"])
    progress.step(6)
    score = score_demo(str(outdir / "ground_truth.json"), trial["trial"])
    progress.step(7)

    summary = {
        "trial": trial["trial"],
        "data_dir": str(settings.data_dir.absolute()),
        "synthetic_trial": str(outdir.absolute()),
        "ingested": {site: {k: v for k, v in r.items() if k not in ("series", "quarantine")}
                     for site, r in ingested.items()},
        "phantoms": {"analysed": len(phantoms), "pass": sum(p["verdict"] == "pass" for p in phantoms),
                     "fail": sum(p["verdict"] == "fail" for p in phantoms)},
        "qc": {k: v for k, v in qc.items() if k != "findings"},
        "report": report,
        "reports": {r["key"]: {"kind": r["kind"], "version": r["version"], "status": r["status"], "pdf": r["pdf"]}
                    for r in accreditation_reports + site_reports},
        "ground_truth_score": score,
        "elapsed_s": round(time.monotonic() - progress.start, 1),
    }
    create_markdown_artifact(key="demo-summary", markdown="```json\n" + json.dumps(summary, indent=2) + "\n```",
                             description="corelab demo summary")
    return summary


def run_demo(settings: Settings, *, seed: int = 0, quiet: bool = False) -> dict:
    """Run the demo flow (Prefect's ephemeral mode unless PREFECT_API_URL names a server)."""
    if not quiet:
        print(f"corelab demo: data directory {settings.data_dir.absolute()} (starting Prefect, ~20 s)",
              file=sys.stderr, flush=True)
    return demo(seed=seed, quiet=quiet)
