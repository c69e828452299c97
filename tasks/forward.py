"""Prefect tasks of archive forwarding: thin wrappers over :mod:`services.forwarding`.

Retries with back-off are declared here, on the I/O task; the flow may shorten them with
``with_options`` (tests). A task whose run left failed deliveries raises, so Prefect retries it
(only what failed is sent again: forwarding is idempotent) and, after the last retry, the flow
run ends Failed.
"""

from __future__ import annotations

from prefect import task

from corelab.db import session_scope
from corelab.settings import load_settings
from services import forwarding

RETRY_DELAYS_S = [30, 120, 600]  # an archive restarting, then a longer outage; the schedule takes over after


class DeliveryFailed(RuntimeError):
    """Deliveries of a trial failed in this attempt; the message gives the counts and the reasons."""


@task(name="archive-trials", task_run_name="trials with an archive")
def trials_with_archive(trial_code: str | None = None) -> list[str]:
    with session_scope(load_settings()) as s:
        return [r["trial"] for r in forwarding.show(s) if trial_code in (None, r["trial"])]


@task(name="forward-trial", task_run_name="forward {trial_code}", retries=len(RETRY_DELAYS_S),
      retry_delay_seconds=RETRY_DELAYS_S, retry_jitter_factor=0.2, tags=["archive-forward"])
def forward_trial(trial_code: str, batch_size: int = forwarding.BATCH_SIZE,
                  batch_bytes: int = forwarding.BATCH_BYTES, timeout_s: float = 30.0) -> dict:
    """Send what is due for one trial; raise :class:`DeliveryFailed` if any delivery failed (a
    send that broke off raises its own error, its batch recorded failed: either way Prefect retries)."""
    result = forwarding.forward_trial(load_settings(), trial_code, batch_size=batch_size, batch_bytes=batch_bytes,
                                      timeout_s=timeout_s, actor="flow:forward-to-archive")
    if result.failed:
        raise DeliveryFailed(f"{trial_code} -> {result.target}: {result.failed} failed, {result.sent} sent; "
                             + "; ".join(result.errors[:3]))
    return result.as_dict()


@task(name="archive-backlog", task_run_name="archive backlog")
def backlog_table(trial_code: str | None = None) -> list[dict]:
    """One row per trial (no series list, no password): the Prefect artifact's table."""
    with session_scope(load_settings()) as s:
        rows = forwarding.backlog(s, trial_code=trial_code)
    keys = ("trial", "kind", "target", "rule", "waiting", "pending", "failed", "held", "sent", "replacements",
            "oldest_waiting", "last_error")
    return [{k: (str(r[k]) if r[k] is not None else "") for k in keys} for r in rows]
