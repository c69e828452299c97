"""Turnaround benchmark (issue: look at every trial scan): from a series being stable to its QC
note delivered, on a served deployment.

A real ``prefect server start`` (SQLite, its own home) and ``corelab serve`` (the DICOM node and
the ``prefect.yaml`` deployments, stability window 5 s) run on loopback. The synthetic demo
trial's PET series that can be judged (SUV computable) are sent one at a time with dcmtk's
``storescu``, each after its study's CT. For each series the turnaround is the time of its
``report.deliver`` audit event (the QC note copied to the site's outbox) minus the moment it
became stable (its last object's arrival plus the 5 s window). Printed: each turnaround, the
median and the p95 over 20 series (target p95 < 60 s), and the stability window as the reference.

    python -m bench turnaround
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import httpx

N_SERIES, STABLE_S, TARGET_S = 20, 5.0, 60.0
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
SKIP = {"patient_name_in_header", "wrong_units", "missing_weight"}  # quarantined, or no SUV: no image note


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _delivered_at(settings, series_uid: str):
    """When the QC note of a series was first delivered (its report.deliver event), or None."""
    from sqlmodel import col, select

    from corelab.db import session_scope
    from corelab.models import AuditEvent, Report
    from reports.series_feedback import uid_digest

    digest = uid_digest(series_uid)  # the note's key ends with it
    with session_scope(settings) as s:
        report = s.exec(select(Report).where(Report.kind == "series_qc", col(Report.path).contains(digest))
                        .order_by(col(Report.id))).first()
        if report is None:
            return None
        event = s.exec(select(AuditEvent).where(AuditEvent.action == "report.deliver",
                                                AuditEvent.entity_id == str(report.id))).first()
        return event.at if event else None


def _stable_at(settings, series_uid: str):
    from sqlmodel import select

    from corelab.db import session_scope
    from corelab.models import Series

    with session_scope(settings) as s:
        series = s.exec(select(Series).where(Series.series_uid == series_uid)).first()
        return series.last_received_at + timedelta(seconds=STABLE_S) if series and series.last_received_at else None


def main() -> None:
    from corelab.register import load_register
    from corelab.settings import load_settings
    from corelab.db import session_scope
    from expectations.manual import trial_fields
    from flows.demo_data import demo_first_scan_date, synthesize_demo_trial
    from synth.net import free_port, wait_for, wait_port

    storescu = shutil.which("storescu")
    if storescu is None:
        print("turnaround: dcmtk's storescu is missing (`make system-deps`)")
        return
    work = Path(tempfile.mkdtemp(prefix="corelab-bench-turnaround-"))
    synthesize_demo_trial(work / "trial", 0, demo_first_scan_date())
    truth = json.loads((work / "trial" / "ground_truth.json").read_text())
    settings = load_settings({"CORELAB_DATA_DIR": str(work / "data")})
    with session_scope(settings) as s:
        load_register(s, work / "trial" / "register.yaml", trial_fields=trial_fields)
    ae_of = {site["code"]: site["ae_title"] for site in truth["register"]["sites"]}
    ct_of = {(x["subject"], x["visit"]): x for x in truth["series"] if x["kind"] == "trial" and x["modality"] == "CT"}
    pets = [x for x in truth["series"] if x["kind"] == "trial" and x["modality"] == "PT"
            and not SKIP & set(x["problems"])][:N_SERIES]

    prefect_port, dicom_port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CORELAB_"))}
    server_env = {**base_env, "PREFECT_HOME": str(work / "prefect-server"), "PREFECT_UI_ENABLED": "false",
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                    server_env, work / "server.log")
    api = f"http://127.0.0.1:{prefect_port}/api"
    serve = None
    try:
        def healthy() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{(work / 'server.log').read_text()[-2000:]}")
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, what="Prefect server healthy")
        client_env = {**base_env, "PREFECT_API_URL": api, "PREFECT_HOME": str(work / "prefect-client"),
                      "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                      "GX_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO),
                      "CORELAB_DATA_DIR": str(settings.data_dir)}
        serve = _start([str(BIN / "corelab"), "serve", "--port", str(dicom_port), "--bind", "127.0.0.1",
                        "--stable-s", str(STABLE_S), "--no-portal"], client_env, work / "serve.log")
        wait_for(lambda: "listening on port" in (work / "serve.log").read_text(), 180, what="corelab serve ready")
        wait_port(dicom_port, 10)
        turnarounds = []
        print(f"{'series':>6s}  {'site':4s} {'subject':16s} {'visit':9s} {'turnaround s':>12s}", flush=True)
        for i, pet in enumerate(pets, 1):
            ct = ct_of.get((pet["subject"], pet["visit"]))
            for series in ([ct] if ct else []) + [pet]:
                files = sorted((work / "trial" / series["path"]).glob("*.dcm"))
                subprocess.run([storescu, "-aet", ae_of[pet["site"]], "-aec", "CORELAB", "127.0.0.1",
                                str(dicom_port), *map(str, files)], check=True, capture_output=True, timeout=300)
            delivered = wait_for(lambda: _delivered_at(settings, pet["series_uid"]), 300, interval_s=0.25,
                                 what=f"the QC note of series {i}")
            seconds = (delivered - _stable_at(settings, pet["series_uid"])).total_seconds()
            turnarounds.append(seconds)
            print(f"{i:6d}  {pet['site']:4s} {pet['subject']:16s} {pet['visit']:9s} {seconds:12.1f}", flush=True)
        p95 = statistics.quantiles(turnarounds, n=20)[-1]
        print(f"turnaround from series stable to QC note delivered, {len(turnarounds)} series: "
              f"median {statistics.median(turnarounds):.1f} s, p95 {p95:.1f} s "
              f"({'met' if p95 < TARGET_S else 'MISSED'}: target p95 < {TARGET_S:.0f} s); "
              f"reference: the stability window itself, {STABLE_S:.0f} s")
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
