"""Forwarding flow: what is due for each trial's archive, sent in batches, the backlog published."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.alerts import HOOKS
from services.forwarding import BATCH_BYTES, BATCH_SIZE
from tasks.forward import backlog_table, forward_trial, trials_with_archive

BACKLOG_KEY = "archive-backlog"


@flow(name="forward-to-archive", log_prints=True, **HOOKS)
def forward_to_archive(trial_code: str | None = None, batch_size: int = BATCH_SIZE, batch_bytes: int = BATCH_BYTES,
                       timeout_s: float = 30.0, retry_delays_s: list[float] | None = None) -> list[dict]:
    """Forward every trial's due instances (or one trial's) to its archive.

    Parameters
    ----------
    trial_code : str, optional
        One trial; default every trial with an archive.
    batch_size : int
        Instances per association or STOW-RS request.
    batch_bytes : int
        At most this many bytes per association or request (at least one instance).
    timeout_s : float
        Network time-out of each step, in seconds.
    retry_delays_s : list of float, optional
        Replace the task's declared back-off (one retry per delay); tests pass short ones.
    """
    task = forward_trial if retry_delays_s is None else forward_trial.with_options(
        retries=len(retry_delays_s), retry_delay_seconds=list(retry_delays_s))
    codes = trials_with_archive(trial_code)
    # one task per trial, each tagged with its trial: a tag concurrency limit of 1 keeps one
    # sender per archive even when runs overlap
    futures = [task.with_options(tags=["archive-forward", f"archive-{code.lower()}"])
               .submit(code, batch_size=batch_size, batch_bytes=batch_bytes, timeout_s=timeout_s) for code in codes]
    states = [f.wait() or f.state for f in futures]
    table = backlog_table(trial_code)
    create_table_artifact(key=BACKLOG_KEY, table=table or [{"trial": "(no trial has an archive)"}],
                          description="Archive forwarding backlog per trial: waiting (pending, failed), held for "
                          "review, sent (as replacements: the archive must accept them)")
    failed = [code for code, state in zip(codes, states) if not state.is_completed()]
    if failed:
        raise RuntimeError(f"forwarding failed after its retries for {', '.join(failed)}: see the backlog "
                           f"(`corelab archive backlog`) for the errors")
    return [s.result() for s in states]
