"""Orchestration against a real Prefect server on PostgreSQL: deployments and their schedules,
loud failures (an automation calling a webhook) and ``corelab serve``.

One server for the module (``prefect server start`` on 127.0.0.1, its own PREFECT_HOME, a fresh
database on the test PostgreSQL server). Each test talks to it the way an operator would: the
``prefect`` and ``corelab`` commands in subprocesses with PREFECT_API_URL, and the REST API.
Every process started here is killed in fixture teardown, also when a test fails.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.receiver_helpers import echoscu, free_port, storescu, wait_for, wait_port

pytestmark = [pytest.mark.prefect, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NIGHTLY = ("nightly-qc", "nightly-qc")  # flow name, deployment name


def _deadline(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    return wait_for(predicate, timeout_s=timeout_s, interval_s=interval_s, what=what)


def _die_with_pytest() -> None:
    """preexec_fn: SIGTERM this child when pytest dies (killed before its fixtures could tear down)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # children of a process that exited
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class PrefectServer:
    def __init__(self, url: str, home: Path, log: Path):
        self.url, self.home, self.log = url, home, log
        self.http = httpx.Client(base_url=url, timeout=30)

    def env(self, **extra: str) -> dict:
        """The environment of a client process: this server, its own PREFECT_HOME."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CORELAB_"))}
        env.update(PREFECT_API_URL=self.url, PREFECT_HOME=str(self.home / "client"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
                   GX_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO))
        env.update(extra)
        return env

    def run(self, *cmd: str, timeout_s: float = 120, expect_rc: int = 0, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=REPO, env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout_s)
        assert proc.returncode == expect_rc, \
            f"{cmd} exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def deployment(self, flow: str, name: str) -> dict:
        response = self.http.get(f"/deployments/name/{flow}/{name}")
        response.raise_for_status()
        return response.json()

    def flow_runs(self, deployment_id: str, states: list[str]) -> list[dict]:
        body = {"deployments": {"id": {"any_": [deployment_id]}},
                "flow_runs": {"state": {"type": {"any_": states}}}, "limit": 50}
        response = self.http.post("/flow_runs/filter", json=body)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def prefect_server(postgres_admin_url, tmp_path_factory):
    """``prefect server start`` on a fresh PostgreSQL database; stopped (and dropped) at the end."""
    import psycopg

    name = f"prefect_{uuid.uuid4().hex[:10]}"
    plain = postgres_admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = "postgresql+asyncpg://" + postgres_admin_url.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=db_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO",
               PREFECT_UI_ENABLED="false")
    log = home / "server.log"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_pytest)
    server = PrefectServer(f"http://127.0.0.1:{port}/api", home, log)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prefect server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return server.http.get("/health", timeout=2).status_code == 200
            return False
        _deadline(healthy, 90, "Prefect server healthy")
        print(f"\nPrefect server on PostgreSQL healthy after {time.monotonic() - started:.1f} s")
        yield server
    finally:
        server.http.close()
        _stop(proc)
        with contextlib.suppress(Exception), psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_deploy_all_gives_the_nightly_deployment_scheduled_runs(prefect_server):
    """The README's commands, as written; a wrong SQLAlchemy makes the cron schedule silently
    create nothing, which this test catches."""
    started = time.monotonic()
    prefect_server.run(str(BIN / "prefect"), "work-pool", "create", "corelab-process", "--type", "process",
                       "--overwrite")
    prefect_server.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
    deployed = time.monotonic()
    nightly = prefect_server.deployment(*NIGHTLY)
    assert nightly["work_pool_name"] == "corelab-process" and not nightly["paused"]
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in nightly["schedules"]] == \
        [("30 2 * * *", "Europe/London", True)]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    for flow, name in [("qc-trial", "qc-trial"), ("accredit-scanners", "accredit-scanners"), ("demo", "demo")]:
        assert prefect_server.deployment(flow, name)["work_pool_name"] == "corelab-process"

    try:
        runs = _deadline(lambda: prefect_server.flow_runs(nightly["id"], ["SCHEDULED"]), 90,
                         "SCHEDULED runs of the nightly-qc deployment")
    except AssertionError as exc:  # SQLAlchemy 2.1 logs "Can't evaluate bulk DML statement" and nothing else
        errors = [ln for ln in prefect_server.log.read_text().splitlines() if "Error" in ln][-5:]
        raise AssertionError(f"{exc}; is SQLAlchemy < 2.1 (pyproject.toml)? Server log {prefect_server.log}:\n"
                             + "\n".join(errors)) from None
    print(f"\nwork pool + deploy: {deployed - started:.1f} s; first scheduled nightly runs "
          f"{time.monotonic() - deployed:.1f} s later")
    for run in runs:  # 02:30 in London is 01:30 or 02:30 UTC
        assert run["expected_start_time"][11:16] in ("01:30", "02:30"), run["expected_start_time"]
        assert run["parameters"] == {"trial_code": "FDG-RESP-01", "since_hours": 24}


class _Webhook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.received.append({"at": time.monotonic(), "path": self.path, "body": body.decode()})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Hook", (_Webhook,), {"received": []}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_failed_flow_run_calls_the_alert_webhook(prefect_server, webhook, tmp_path):
    url = f"http://127.0.0.1:{webhook.server_address[1]}/corelab-alert"
    data = {"CORELAB_DATA_DIR": str(tmp_path / "data")}
    no_url = prefect_server.run(str(BIN / "corelab"), "alerts", "install", expect_rc=2, **data)
    assert "give the URL once with --webhook URL" in no_url.stderr
    first = json.loads(prefect_server.run(str(BIN / "corelab"), "alerts", "install", "--webhook", url, "--json",
                                          **data).stdout)
    again = json.loads(prefect_server.run(str(BIN / "corelab"), "alerts", "install", "--json", **data).stdout)
    assert first["created"] and not again["created"] and again["automation_id"] == first["automation_id"]
    automations = prefect_server.http.post("/automations/filter", json={}).json()
    assert [a["name"] for a in automations].count(first["automation"]) == 1

    # A real corelab flow that fails (no imaging manual for this trial), reported to the server.
    script = ("from flows.qc import qc_trial\n"
              "try:\n    qc_trial(trial_code='NO-SUCH-TRIAL')\nexcept Exception as exc:\n"
              "    print('failed as planned:', type(exc).__name__)\n")
    started = time.monotonic()
    proc = prefect_server.run(sys.executable, "-c", script, **data)
    assert "failed as planned: ManualError" in proc.stdout
    ran = time.monotonic()

    hit = _deadline(lambda: webhook.RequestHandlerClass.received, 60, "the alert webhook call")[0]
    alert = json.loads(hit["body"])
    print(f"\nfailing flow run process took {ran - started:.1f} s; webhook called {hit['at'] - started:.1f} s "
          "after it started")
    assert hit["path"] == "/corelab-alert"
    assert alert["source"] == "corelab" and alert["alert"] == "prefect.flow-run.Failed"
    assert alert["flow"] == "qc-trial" and alert["state"] == "Failed" and "NO-SUCH-TRIAL" in alert["message"]
    # The flow's own hook left its alert file in the data directory too.
    files = list((tmp_path / "data" / "alerts").glob("*.json"))
    assert [json.loads(f.read_text())["flow_run_id"] for f in files] == [alert["flow_run_id"]]


@pytest.mark.dcmtk
def test_corelab_serve_receives_serves_schedules_and_pauses_them_on_sigterm(prefect_server, tmp_path):
    from sqlmodel import select

    from corelab.db import session_scope
    from corelab.models import Series
    from corelab.register import load_register
    from corelab.settings import load_settings
    from expectations.manual import trial_fields
    from synth.spec import small_spec
    from synth.trial import generate_trial
    from tests.synth_fixtures import series_files

    trial_dir = tmp_path / "trial"
    truth = generate_trial(trial_dir, small_spec(), seed=3).data
    data = {"CORELAB_DATA_DIR": str(tmp_path / "data")}
    settings = load_settings(data)
    with session_scope(settings) as session:
        load_register(session, trial_dir / "register.yaml", trial_fields=trial_fields)
    pet = next(s for s in truth["series"] if s["site"] == "B02" and s["kind"] == "trial" and s["modality"] == "PT"
               and not s["problems"])
    ae = next(s["ae_title"] for s in truth["register"]["sites"] if s["code"] == "B02")

    port, web_port = free_port(), free_port()
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    started = time.monotonic()
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([str(BIN / "corelab"), "serve", "--port", str(port), "--bind", "127.0.0.1",
                                 "--stable-s", "1"], cwd=tmp_path,
                                env=prefect_server.env(**data, CORELAB_PORTAL_PORT=str(web_port)),
                                stdout=fo, stderr=fe, start_new_session=True, preexec_fn=_die_with_pytest)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"corelab serve exited {proc.returncode}:\n{err.read_text()[-4000:]}")
            return "listening on port" in out.read_text()
        _deadline(ready, 90, "corelab serve ready")
        wait_port(port, 10)
        ready_s = time.monotonic() - started
        assert echoscu(port, aet=ae).returncode == 0
        wait_port(web_port, 10)  # the portal runs beside the node
        login_page = httpx.get(f"http://127.0.0.1:{web_port}/login", timeout=10)
        assert login_page.status_code == 200 and "Log in to the core lab portal" in login_page.text

        nightly = prefect_server.deployment(*NIGHTLY)
        assert not nightly["paused"] and nightly["schedules"][0]["schedule"]["cron"] == "30 2 * * *"
        assert nightly["global_concurrency_limit"]["limit"] == 1
        qc = prefect_server.deployment("qc-trial", "qc-trial")
        assert nightly["entrypoint"] == "flows.nightly.nightly_qc" and qc["entrypoint"] == "flows.qc.qc_trial"

        # A completed series is checked through the served qc-trial deployment.
        sent = time.monotonic()
        storescu(port, series_files(trial_dir, pet), aet=ae)
        runs = _deadline(lambda: prefect_server.flow_runs(qc["id"], ["COMPLETED", "FAILED", "CRASHED"]), 150,
                         "a finished qc-trial run of the served deployment", interval_s=1)
        assert runs[0]["state_type"] == "COMPLETED", runs[0]["state"]
        with session_scope(settings) as session:
            row = session.exec(select(Series).where(Series.series_uid == pet["series_uid"])).one()
            assert row.qc_state == "done" and row.qc_manual_version
            assert runs[0]["parameters"]["series_ids"] == [row.id]
        qc_s = time.monotonic() - sent

        stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, err.read_text()[-4000:]
        print(f"\ncorelab serve ready after {ready_s:.1f} s; series sent to QC run completed {qc_s:.1f} s; "
              f"stopped {time.monotonic() - stop:.1f} s after SIGTERM")
    finally:
        _stop(proc)
    # serve pauses the schedules of what it served when it stops (the worker setup keeps them).
    assert prefect_server.deployment(*NIGHTLY)["paused"]
