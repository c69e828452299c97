"""Loud failures on the Prefect server: an automation that calls a webhook for every failed or
crashed flow run.

:func:`install_alert_automation` (``corelab alerts install --webhook URL``) is idempotent: it
saves the URL as the Prefect ``Webhook`` block ``corelab-alerts`` and creates, or brings up to
date, the one automation named :data:`AUTOMATION_NAME`. Its trigger is the server's own
``prefect.flow-run.Failed`` / ``prefect.flow-run.Crashed`` event, so it also fires when a run
dies where no flow hook can run (killed process, lost worker, flow that could not be loaded);
the hooks of :mod:`flows.alerts` add the alert file, the audit event and a ``corelab.alert``
event with corelab's own details.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTOMATION_NAME = "corelab: alert on failed or crashed flow runs"
WEBHOOK_BLOCK = "corelab-alerts"
ALERT_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")

# The webhook body: JSON, rendered by the server from the triggering event and the flow run.
PAYLOAD = """{
  "source": "corelab",
  "alert": "{{ event.event }}",
  "flow": "{{ flow.name }}",
  "deployment": "{{ deployment.name }}",
  "flow_run": "{{ flow_run.name }}",
  "flow_run_id": "{{ flow_run.id }}",
  "state": "{{ flow_run.state.name }}",
  "message": {{ (flow_run.state.message or "") | tojson }},
  "occurred": "{{ event.occurred }}",
  "url": "{{ (flow_run | ui_url) or '' }}"
}"""


@dataclass
class InstallResult:
    automation_id: str
    created: bool           # False: an existing automation was brought up to date
    webhook_block: str
    events: tuple[str, ...] = ALERT_EVENTS

    def as_dict(self) -> dict:
        return {"automation": AUTOMATION_NAME, "automation_id": self.automation_id, "created": self.created,
                "webhook_block": self.webhook_block, "trigger_events": list(self.events)}


class AlertSetupError(RuntimeError):
    """What the user must do before alerts can be installed (printed as one line)."""


def alert_automation(block_document_id):
    """The automation (not yet saved) that calls webhook block ``block_document_id``."""
    from prefect.automations import Automation
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=AUTOMATION_NAME,
        description="corelab: call the configured webhook when any flow run ends Failed or Crashed "
                    "(installed by `corelab alerts install`).",
        enabled=True,
        trigger=EventTrigger(match={"prefect.resource.id": "prefect.flow-run.*"}, expect=set(ALERT_EVENTS),
                             posture=Posture.Reactive, threshold=1, within=0),
        actions=[CallWebhook(block_document_id=block_document_id, payload=PAYLOAD)],
    )


def install_alert_automation(webhook_url: str | None = None) -> InstallResult:
    """Save ``webhook_url`` (when given) as the webhook block and create or update the automation.

    Without ``webhook_url`` the block saved by an earlier install is kept.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    try:
        return _install(webhook_url)
    except httpx.TransportError as exc:
        raise AlertSetupError(f"the Prefect server at {PREFECT_API_URL.value()} is not reachable ({exc}); "
                              "is `prefect server start` running?") from None


def _install(webhook_url: str | None) -> InstallResult:
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise AlertSetupError("set PREFECT_API_URL to the Prefect server that runs the flows (e.g. "
                              "http://127.0.0.1:4200/api): an ephemeral server is gone when its process ends")
    if webhook_url:
        if not webhook_url.startswith(("http://", "https://")):
            raise AlertSetupError(f"webhook URL {webhook_url!r} must start with http:// or https://")
        block_id = Webhook(method="POST", url=webhook_url, headers={"Content-Type": "application/json"}) \
            .save(WEBHOOK_BLOCK, overwrite=True)
    else:
        try:
            block_id = Webhook.load(WEBHOOK_BLOCK, validate=False)._block_document_id
        except (ValueError, ObjectNotFound):
            raise AlertSetupError(f"no webhook block {WEBHOOK_BLOCK!r} on this Prefect server yet: "
                                  "give the URL once with --webhook URL") from None
    wanted = alert_automation(block_id)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        for extra in existing[1:]:  # a hand-made duplicate would alert twice
            client.delete_automation(extra.id)
    if existing:
        wanted.id = existing[0].id
        wanted.update()
        return InstallResult(str(wanted.id), False, WEBHOOK_BLOCK)
    return InstallResult(str(wanted.create().id), True, WEBHOOK_BLOCK)
