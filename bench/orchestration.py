"""The synthetic trial from receipt to reports through Prefect, and Prefect's share of the time.

Trial: 10 sites, one scanner each (copies of the demo's four vendors' scanners), 100 subjects x
2 visits = 200 PET series (plus their CT), and a NEMA IEC and a uniform cylinder phantom per
scanner = 20 phantoms. Receipt is the file drop (`ingest_path`); then every scanner is
accredited from its phantoms, every trial PET series is checked against the manual, and the
trial report is rendered.

Three runs on fresh data directories, in the same process:
  plain      the same steps called directly, one after another (the reference: no Prefect)
  prefect-1  the steps as Prefect flows and tasks, task runner with 1 worker
  prefect-2  the same with 2 workers
Prefect's share = (prefect-1 - plain) / prefect-1: what orchestration adds to the same work.
The ephemeral Prefect server's start-up is measured separately.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tempfile
import time
from pathlib import Path

N_SITES, SUBJECTS_PER_SITE = 10, 10


def _spec():
    from synth.spec import SiteSpec, TrialSpec

    demo = TrialSpec.demo()
    accredited = [s for s in demo.scanners if s.accredited]
    sites, scanners = [], []
    for i in range(N_SITES):
        code = f"S{i + 1:02d}"
        sites.append(SiteSpec(code, f"SITE_{code}", f"Site {code}", SUBJECTS_PER_SITE))
        base = accredited[i % len(accredited)]
        scanners.append(dataclasses.replace(base, id=f"{code}-1", site=code, serial=f"{base.serial}{i:02d}"))
    return dataclasses.replace(demo, sites=sites, scanners=scanners, software_change_scanner=None,
                               first_scan_date=(dt.date.today() - dt.timedelta(days=21)).isoformat(),
                               problems=tuple(p for p in demo.problems
                                              if p not in ("scanner_not_accredited", "followup_on_other_scanner")))


def _fresh_settings(work: Path, name: str):
    from corelab.db import open_store
    from corelab.settings import load_settings

    os.environ["CORELAB_DATA_DIR"] = str(work / name)
    settings = load_settings()
    open_store(settings)
    return settings


def run_plain(trial: Path, sites: list[str], settings) -> dict:
    from accreditation.evaluate import evaluate_series_folder, record_evaluation
    from corelab.db import session_scope
    from corelab.ingest import ingest_path, series_dir
    from corelab.models import Series
    from corelab.register import load_register
    from expectations.manual import load_manual, trial_fields
    from expectations.qc import qc_series_batch, trial_pet_series
    from phantoms.fill import load_fill_sheet
    from reports.delivery import publish
    from reports.exports import export_trial
    from reports.trial import trial_deviation_report
    from sqlmodel import select

    manual = load_manual("FDG-RESP-01")
    with session_scope(settings) as session:
        load_register(session, trial / "register.yaml", trial_fields=trial_fields)
    for site in sites:
        with session_scope(settings) as session:
            ingest_path(session, settings, trial / "sites" / site, site_code=site)
    with session_scope(settings) as session:
        phantoms = list(session.exec(select(Series).where(Series.kind == "phantom", Series.state == "complete")))
        for series in phantoms:
            folder = series_dir(settings, series, session)
            record_evaluation(session, series, evaluate_series_folder(folder, load_fill_sheet(folder / "fill.yaml")),
                              scope=manual.trial)
    with session_scope(settings) as session:
        outcome = qc_series_batch(session, settings, manual, trial_pet_series(session, manual.trial))
    with session_scope(settings) as session:  # the same work as the render_trial_report task
        paths = export_trial(session, manual.trial, settings.exports_dir, fmt="csv", manual_version=manual.version)
        publish(session, settings, trial_deviation_report(
            session, manual.trial, exports={f"{name}.csv": p for name, p in paths.items()}))
    return {"series": outcome.series, "phantoms": len(phantoms)}


def run_prefect(trial: Path, sites: list[str], workers: int) -> dict:
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.accredit import accredit_scanners
    from flows.qc import qc_trial
    from tasks.ingest import ingest_drop, load_register_file
    from tasks.reports import render_trial_report

    runner = ThreadPoolTaskRunner(max_workers=workers)

    @flow(name="bench-receipt-to-reports", task_runner=runner)
    def pipeline() -> dict:
        load_register_file(str(trial / "register.yaml"))
        for future in [ingest_drop.submit(str(trial / "sites" / s), s) for s in sites]:
            future.result()
        phantoms = accredit_scanners.with_options(task_runner=runner)(scope="FDG-RESP-01")
        qc = qc_trial.with_options(task_runner=runner)("FDG-RESP-01")
        render_trial_report("FDG-RESP-01")
        return {"series": qc["series"], "phantoms": len(phantoms)}

    return pipeline()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="corelab-bench-orchestration-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from synth.trial import generate_trial

    spec = _spec()
    start = time.perf_counter()
    truth = generate_trial(work / "trial", spec, seed=11)
    n_pet = sum(s["kind"] == "trial" and s["modality"] == "PT" for s in truth.series)
    n_phantom = sum(s["kind"] == "phantom" for s in truth.series)
    n_files = sum(s["n_files"] for s in truth.series)
    print(f"trial: {len(spec.sites)} sites, {n_pet} PET series, {n_phantom} phantoms, {n_files} files "
          f"(generated in {time.perf_counter() - start:.0f} s, not timed below)", flush=True)
    sites = [s.code for s in spec.sites]

    timings = {}
    settings = _fresh_settings(work, "plain")
    start = time.perf_counter()
    out = run_plain(work / "trial", sites, settings)
    timings["plain"] = time.perf_counter() - start
    print(f"plain      {timings['plain']:7.1f} s  {out}", flush=True)

    from prefect import flow

    start = time.perf_counter()
    flow(name="bench-warm-up")(lambda: None)()  # starts the ephemeral server
    startup = time.perf_counter() - start
    for workers in (1, 2):
        _fresh_settings(work, f"prefect-{workers}")
        start = time.perf_counter()
        out = run_prefect(work / "trial", sites, workers)
        timings[f"prefect-{workers}"] = time.perf_counter() - start
        print(f"prefect-{workers}  {timings[f'prefect-{workers}']:7.1f} s  {out}", flush=True)
    share = (timings["prefect-1"] - timings["plain"]) / timings["prefect-1"]
    print(f"Prefect ephemeral server start-up: {startup:.1f} s (once per process, not in the runs)")
    print(f"Prefect's share of the 1-worker run: {100 * share:.1f} % (target < 20 %)")
    print(f"wall time receipt -> reports: {timings['prefect-1']:.0f} s with 1 worker, "
          f"{timings['prefect-2']:.0f} s with 2 (target < 600 s); plain {timings['plain']:.0f} s")


if __name__ == "__main__":
    main()
