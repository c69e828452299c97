"""Loud failures without a Prefect server: the failure hook of a corelab flow, the automation's
shape and its webhook payload, and the commands' refusals without a server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.prefect
def test_failing_corelab_flow_writes_alert_file_and_audit_event(prefect_harness, settings, monkeypatch):
    from corelab import audit
    from corelab.db import session_scope
    from corelab.models import AuditEvent
    from expectations.manual import ManualError
    from flows.qc import qc_trial

    monkeypatch.setenv("CORELAB_DATA_DIR", str(settings.data_dir))  # the flow and its hook load settings
    with pytest.raises(ManualError):
        qc_trial(trial_code="NO-SUCH-TRIAL")
    files = sorted((settings.data_dir / "alerts").glob("*.json"))
    assert len(files) == 1
    alert = json.loads(files[0].read_text())
    assert alert["flow"] == "qc-trial" and alert["state"] == "FAILED" and "NO-SUCH-TRIAL" in alert["message"]
    assert files[0].name.endswith(f"{alert['flow_run_id']}.json")
    with session_scope(settings) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.action == "alert.flow_run")).all()
        assert [(e.entity, e.entity_id, e.detail["flow"]) for e in events] == \
            [("flow_run", alert["flow_run_id"], "qc-trial")]
        assert not audit.verify(session)


def test_alert_automation_triggers_on_failed_and_crashed_runs_and_calls_the_webhook():
    import uuid

    from prefect.events.actions import CallWebhook

    from flows.automations import ALERT_EVENTS, AUTOMATION_NAME, alert_automation

    block_id = uuid.uuid4()
    automation = alert_automation(block_id)
    assert automation.name == AUTOMATION_NAME and automation.enabled
    assert automation.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"} == set(ALERT_EVENTS)
    assert automation.trigger.posture == "Reactive" and automation.trigger.threshold == 1
    [action] = automation.actions
    assert isinstance(action, CallWebhook) and action.block_document_id == block_id


def test_alert_payload_renders_to_json_whatever_the_message():
    """The server renders the payload with Jinja; quotes and new lines in the failure message must
    still give valid JSON."""
    import jinja2

    from flows.automations import PAYLOAD

    env = jinja2.Environment()
    env.filters["ui_url"] = lambda obj: None
    for message in ['value "42" out of band\nline 2', None]:
        context = {"event": {"event": "prefect.flow-run.Failed", "occurred": "2026-11-21T02:30:00Z"},
                   "flow": {"name": "nightly-qc"}, "deployment": {"name": "nightly-qc"},
                   "flow_run": {"name": "night", "id": "abc", "state": {"name": "Failed", "message": message}}}
        body = json.loads(env.from_string(PAYLOAD).render(**context))
        assert body["message"] == (message or "") and body["url"] == "" and body["flow"] == "nightly-qc"


def test_serve_and_alerts_refuse_to_run_without_a_reachable_prefect_server(tmp_path):
    """One clear line and exit status 2: no PREFECT_API_URL (the ephemeral mode has no scheduler and
    forgets automations), or a server that does not answer."""
    from tests.receiver_helpers import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CORELAB_"))}
    env.update(CORELAB_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "prefect"))
    down = {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}  # nothing listens there
    for cmd, extra, needle in [(["serve", "--port", "0"], {}, "needs a Prefect server"),
                               (["serve", "--port", "0"], down, "is not reachable"),
                               (["alerts", "install", "--webhook", "http://127.0.0.1:9/x"], down, "is not reachable")]:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *cmd], cwd=REPO, env={**env, **extra},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr, (cmd, proc.stderr[-2000:])
