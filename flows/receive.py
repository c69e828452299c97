"""Receiving through Prefect: the callback that starts QC for each series the receiver completed.

The kernel (:mod:`corelab.receiver`) claims a completed series' QC start exactly once and then
calls ``on_complete(series_id)``; :class:`QcStarter` is that callback. It only queues the id
(the receiver's ticker must not wait on Prefect); a worker thread drains the queue and starts
one coarse flow run per trial and kind for what it drained:

- trial PET series: the ``qc-trial`` flow with ``series_ids`` (one Great Expectations run);
- phantom series: the ``accredit-scanners`` flow with those series;
- anything else (CT/MR of a trial visit, series of no trial): no manual rule applies yet, so
  its QC is closed here (:func:`expectations.qc.mark_nothing_to_check`, the one place that does).

If a start fails, its series that are still ``queued`` (or ``running``) are marked ``failed``
(:func:`corelab.series_completion.mark_start_failed`); the nightly QC picks them up again.

``mode="flow"`` runs the flows in this process (Prefect's ephemeral mode unless
``PREFECT_API_URL`` names a server); ``mode="deployment"`` hands them to the deployments of
``prefect.yaml`` (``run_deployment(..., timeout=0)``: a work pool's worker runs them).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict

from sqlmodel import col, select

from corelab.db import session_scope, transaction
from corelab.models import Series, Trial
from corelab.series_completion import mark_start_failed
from corelab.settings import Settings

LOG = logging.getLogger("corelab.receive")
QC_DEPLOYMENT = "qc-trial/qc-trial"
ACCREDIT_DEPLOYMENT = "accredit-scanners/accredit-scanners"


def plan_qc(settings: Settings, series_ids: list[int]) -> dict:
    """Group series for QC: ``{"trial": {code: [ids]}, "phantom": {code: (standard, [(id, uid)])},
    "nothing_to_check": [ids]}``."""
    plan: dict = {"trial": defaultdict(list), "phantom": {}, "nothing_to_check": []}
    with session_scope(settings) as session:
        trials = list(session.exec(select(Trial).order_by(col(Trial.id))))
        by_id = {t.id: t for t in trials}
        for series in session.exec(select(Series).where(col(Series.id).in_(series_ids)).order_by(col(Series.id))):
            trial = by_id.get(series.trial_id)
            if series.kind == "phantom" and trials:
                # A phantom belongs to a scanner, not a visit: it is judged for the standard of the
                # trial it named, else the first trial's (one trial per installation so far).
                trial = trial or trials[0]
                entry = plan["phantom"].setdefault(trial.code, (trial.standard, []))
                entry[1].append((series.id, series.series_uid))
            elif series.kind == "trial" and series.modality == "PT" and trial is not None:
                plan["trial"][trial.code].append(series.id)
            else:
                plan["nothing_to_check"].append(series.id)
    plan["trial"] = dict(plan["trial"])
    return plan


class QcStarter:
    """Queue completed series and start their QC flows from one worker thread.

    Parameters
    ----------
    settings : Settings
    mode : {"flow", "deployment"}
    """

    def __init__(self, settings: Settings, *, mode: str = "flow"):
        if mode not in ("flow", "deployment"):
            raise ValueError(f"QC mode {mode!r}: use flow or deployment")
        self.settings, self.mode = settings, mode
        self.queue: queue.Queue[int] = queue.Queue()
        self.runs: list[dict] = []  # what was started, for logs and tests
        self._thread = threading.Thread(target=self._loop, name="corelab-qc-starter", daemon=True)
        self._thread.start()

    def __call__(self, series_id: int) -> None:
        self.queue.put(series_id)

    def _loop(self) -> None:
        while True:
            ids = [self.queue.get()]
            while True:  # drain what else completed meanwhile: one flow run for all of it
                try:
                    ids.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.run(ids)
            except Exception as exc:
                marked = mark_start_failed(self.engine, ids, actor="receiver",
                                           reason=f"QC start failed: {type(exc).__name__}: {exc}")
                LOG.exception("QC start for series %s failed; %s marked failed for the nightly QC to retry",
                              ids, marked)
            finally:
                for _ in ids:
                    self.queue.task_done()

    def join(self) -> None:
        """Wait until every queued series has been handed to its flow."""
        self.queue.join()

    @property
    def engine(self):
        from corelab.db import open_store

        return open_store(self.settings)

    def run(self, series_ids: list[int]) -> list[dict]:
        """Start QC for ``series_ids`` now (coarse: one flow run per trial and kind)."""
        plan = plan_qc(self.settings, series_ids)
        if plan["nothing_to_check"]:
            from expectations.qc import mark_nothing_to_check

            with transaction(self.engine) as session:
                mark_nothing_to_check(session, list(session.exec(
                    select(Series).where(col(Series.id).in_(plan["nothing_to_check"])))), actor="receiver")
        runs = []
        for code, ids in plan["trial"].items():
            runs.append(self._start("qc", QC_DEPLOYMENT, {"trial_code": code, "series_ids": ids}))
        for code, (standard, pairs) in plan["phantom"].items():
            runs.append(self._start("accredit", ACCREDIT_DEPLOYMENT,
                                    {"scope": code, "standard": standard, "series": pairs}))
        self.runs.extend(runs)
        return runs

    def _start(self, kind: str, deployment: str, parameters: dict) -> dict:
        LOG.info("starting %s for %s", kind, {k: v for k, v in parameters.items()})
        if self.mode == "deployment":
            from prefect.deployments import run_deployment

            from tasks.qc import qc_run_name

            # Named now, so the run list says what it checks while it waits for a worker.
            name = (qc_run_name(parameters["trial_code"], parameters["series_ids"], settings=self.settings)
                    if kind == "qc" else None)
            run = run_deployment(deployment, parameters=parameters, flow_run_name=name, timeout=0)
            return {"kind": kind, "parameters": parameters, "flow_run_id": str(run.id)}
        if kind == "qc":
            from flows.qc import qc_trial

            result = qc_trial(**parameters)
            return {"kind": kind, "parameters": parameters,
                    "result": {k: v for k, v in result.items() if k != "findings"}}
        from flows.accredit import AccreditationIncomplete, accredit_scanners

        try:
            result = accredit_scanners(**parameters)
        except AccreditationIncomplete as exc:  # the run is Failed (and alerted); its results stand
            result = exc.results
        return {"kind": kind, "parameters": parameters, "result": [r.get("verdict") for r in result]}


def build_receiver(settings: Settings, *, qc: str = "flow", watch_inbox: bool = False, inbox_settle_s: float = 2.0,
                   **config_overrides):
    """A :class:`corelab.receiver.Receiver` wired to start QC (``qc``: flow, deployment or queue)
    and, optionally, to poll the site inboxes."""
    from corelab.inbox import scan_inbox
    from corelab.receiver import Receiver, ReceiverConfig
    from corelab.series_completion import start_qc

    on_complete = None if qc == "queue" else QcStarter(settings, mode=qc)
    receiver = Receiver(settings, ReceiverConfig.from_settings(settings, **config_overrides), on_complete=on_complete)
    if watch_inbox:
        receiver.tick_hooks.append(lambda: scan_inbox(
            settings, receiver.engine, settle_s=inbox_settle_s,
            on_series=lambda ids: start_qc(receiver.engine, ids, on_complete, actor="inbox")))
    return receiver
