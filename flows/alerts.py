"""Loud failures: what happens when a flow run fails or crashes.

Every corelab flow carries :func:`on_failure` as its ``on_failure`` and ``on_crashed`` hook. It
records an ``alert.flow_run`` audit event, writes the alert as JSON under ``<data dir>/alerts/``
(where a physicist's monitoring or the site-less outbox picks it up), logs it at ERROR, and emits
a Prefect event ``corelab.alert`` that an automation (see ``corelab alerts install`` and the
README) turns into a notification. A hook must never raise: it reports what it could not do.
"""

from __future__ import annotations

import json
import logging

from corelab.models import utcnow

LOG = logging.getLogger("corelab.alerts")


def on_failure(flow, flow_run, state) -> None:
    """Prefect flow hook for failed and crashed runs."""
    alert = {"at": utcnow().isoformat(), "flow": flow.name, "flow_run": flow_run.name,
             "flow_run_id": str(flow_run.id), "state": state.type.value if state.type else str(state.name),
             "message": (state.message or "")[:2000]}
    LOG.error("ALERT: flow run %s (%s) ended %s: %s", alert["flow_run"], alert["flow"], alert["state"],
              alert["message"])
    try:
        from corelab import audit
        from corelab.db import session_scope
        from corelab.settings import load_settings

        settings = load_settings()
        folder = settings.data_dir / "alerts"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{alert['at'][:19].replace(':', '')}-{alert['flow_run_id']}.json").write_text(json.dumps(alert, indent=2))
        with session_scope(settings) as session:
            audit.append(session, actor="prefect", action="alert.flow_run", entity="flow_run",
                         entity_id=alert["flow_run_id"], detail=alert)
    except Exception:  # the hook reports; it must not mask the run's own failure
        LOG.exception("could not record the alert for flow run %s", alert["flow_run_id"])
    try:
        from prefect.events import emit_event

        emit_event(event="corelab.alert", resource={"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                                                    "corelab.flow": flow.name},
                   payload=alert)
    except Exception:
        LOG.exception("could not emit the corelab.alert event for flow run %s", alert["flow_run_id"])


HOOKS = {"on_failure": [on_failure], "on_crashed": [on_failure]}
