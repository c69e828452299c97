"""``corelab serve``: a one-machine core lab in one process.

The DICOM receiver (:func:`flows.receive.build_receiver` with ``qc="deployment"``) and a Prefect
runner that serves the deployments of ``prefect.yaml`` (same names, parameters, schedules and
concurrency limits; no worker: the runner itself polls the server for their runs and starts each
in a subprocess). A completed series is handed to the served ``qc-trial`` /
``accredit-scanners`` deployment, and the nightly QC runs on its cron schedule. The web portal
(``portal/``) runs beside them in a thread unless ``--no-portal``.

It needs a Prefect server (``PREFECT_API_URL``): Prefect's ephemeral mode has no scheduler, so
the nightly QC would silently never run. SIGINT or SIGTERM stops it: the receiver ends its
associations, flow runs still in progress are cancelled, and the served deployments' schedules
are *paused* (as Prefect's ``serve`` does on shutdown); the next ``corelab serve`` resumes them.
For production, deploy with ``prefect --no-prompt deploy --all`` and run a worker on the
``corelab-process`` pool instead: the schedules then keep running whatever happens to a worker.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
from pathlib import Path

import yaml

LOG = logging.getLogger("corelab.serve")
PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


class ServeSetupError(RuntimeError):
    """What the user must set up before ``corelab serve`` can run (printed as one line)."""


def deployment_specs(path: Path = PREFECT_YAML, only: list[str] | None = None) -> list[dict]:
    """The deployments of ``prefect.yaml`` (aliases resolved), optionally only those named."""
    if not path.is_file():
        raise ServeSetupError(f"{path} not found: run corelab serve from a clone of corelab "
                              "(it serves the deployments of its prefect.yaml)")
    specs = yaml.safe_load(path.read_text())["deployments"]
    if only:
        unknown = set(only) - {d["name"] for d in specs}
        if unknown:
            raise ServeSetupError(f"no deployment named {sorted(unknown)} in {path}; it has "
                                  f"{[d['name'] for d in specs]}")
        specs = [d for d in specs if d["name"] in only]
    return specs


def runner_deployments(specs: list[dict]) -> list:
    """``Flow.to_deployment`` for each spec: module-path entrypoints, schedules, concurrency limits."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    out = []
    for spec in specs:
        path, name = spec["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        schedules = []
        for s in spec.get("schedules") or []:
            if "cron" in s:
                schedules.append(Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True)))
            elif "interval" in s:
                schedules.append(Interval(s["interval"], timezone=s.get("timezone"), active=s.get("active", True)))
            else:
                raise ServeSetupError(f"deployment {spec['name']}: only cron and interval schedules are served")
        out.append(flow.to_deployment(
            name=spec["name"], description=spec.get("description"), parameters=spec.get("parameters") or {},
            schedules=schedules or None, concurrency_limit=spec.get("concurrency_limit"), paused=False,
            entrypoint_type=EntrypointType.MODULE_PATH))
    return out


def serve(settings, receiver_options: dict, *, only: list[str] | None = None, limit: int | None = None,
          portal: bool = True) -> None:
    """Register the deployments, start the receiver (and the web portal, in a thread), run the
    Prefect runner until a signal stops it."""
    import asyncio

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL

    from flows.receive import build_receiver

    if not PREFECT_API_URL.value():
        raise ServeSetupError("corelab serve needs a Prefect server (the ephemeral mode runs no schedules): "
                              "start one with `prefect server start` and export "
                              "PREFECT_API_URL=http://127.0.0.1:4200/api")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per API call otherwise
    deployments = runner_deployments(deployment_specs(only=only))
    receiver = build_receiver(settings, qc="deployment", **receiver_options)

    async def main() -> None:
        # The runner's own pause-on-shutdown runs while asyncio is tearing the loop down and was
        # seen to skip the pause; here the stop is an ordinary step: stop the receiver, stop the
        # runner (runs in progress are cancelled), then pause the schedules.
        runner = Runner(name="corelab-serve", pause_on_shutdown=False, limit=limit)
        # Registered before the receiver starts: a series completed while the lab was down is
        # handed to its deployment at start-up, so the deployment must exist.
        ids = []
        for deployment in deployments:
            ids.append(await runner.aadd_deployment(deployment))
            LOG.info("serving deployment %s/%s", deployment.flow_name, deployment.name)
        receiver.start()
        web = None
        if portal:
            from portal.serve import start_portal_thread

            web, _thread = start_portal_thread(settings)
        running = None
        try:
            LOG.info("corelab serve: %s listening on port %s; %d deployments served", receiver.config.ae_title,
                     receiver.port, len(deployments))
            print(f"corelab serve: {receiver.config.ae_title} listening on port {receiver.port}; serving "
                  f"{', '.join(d.name for d in deployments)}"
                  + (f"; portal on http://{settings.portal_host}:{settings.portal_port}/" if portal else ""), flush=True)
            stop = asyncio.Event()
            running = asyncio.create_task(runner.start())
            await asyncio.sleep(0)  # runner.start installs its SIGTERM handler first; ours replace it
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            LOG.info("corelab serve: stopping")
        finally:
            receiver.stop()  # no new series, no new QC starts
            if web is not None:
                web.should_exit = True
            if running is not None and not running.done():
                await runner.astop()
                with contextlib.suppress(Exception, asyncio.CancelledError, asyncio.TimeoutError):
                    await asyncio.wait_for(running, 30)
            async with get_client() as client:
                for deployment_id in ids:
                    await client.pause_deployment(deployment_id)
            LOG.info("corelab serve: stopped; the schedules of the %d served deployments are paused", len(ids))
        if running.done() and not running.cancelled() and running.exception() is not None:
            raise running.exception()

    # Ctrl-C stops it even when started with SIGINT ignored (a background job of a shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.run(main())
    except httpx.TransportError as exc:
        raise ServeSetupError(f"the Prefect server at {PREFECT_API_URL.value()} is not reachable ({exc}); "
                              "is `prefect server start` running?") from None
    except KeyboardInterrupt:  # while starting, before the signal handlers were in place
        LOG.info("corelab serve: interrupted")
