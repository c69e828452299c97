"""``corelab`` commands that run the core lab: the DICOM node, the inbox watcher, ``serve``, alerts."""

from __future__ import annotations

import argparse
import sys

from flows.cli_common import log_to_stderr, prepare_prefect_env, print_result, receiver_options, settings


def cmd_receive(args) -> int:
    import signal

    config = settings()
    log_to_stderr(args.log_level)
    if args.qc != "queue":
        prepare_prefect_env(config)
    from flows.receive import build_receiver

    receiver = build_receiver(config, qc=args.qc, **receiver_options(args))
    # SIGTERM (service manager, `kill`) shuts down like Ctrl-C: associations end, the ticker stops.
    signal.signal(signal.SIGTERM, lambda *_: receiver._stop.set())
    receiver.start()
    print(f"corelab receive: {receiver.config.ae_title} listening on port {receiver.port}", file=sys.stderr,
          flush=True)
    receiver.serve_forever()
    return 0


def cmd_serve(args) -> int:
    config = settings()
    log_to_stderr(args.log_level)
    prepare_prefect_env(config)
    from flows.serve import ServeSetupError, serve

    try:
        serve(config, receiver_options(args), only=args.deployment or None, limit=args.limit,
              portal=not args.no_portal)
    except ServeSetupError as exc:
        print(f"corelab serve: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_alerts_install(args) -> int:
    prepare_prefect_env(settings())
    from flows.automations import AlertSetupError, install_alert_automation

    try:
        result = install_alert_automation(args.webhook)
    except AlertSetupError as exc:
        print(f"corelab alerts install: {exc}", file=sys.stderr)
        return 2
    print_result(args, result.as_dict())
    return 0


def cmd_watch(args) -> int:
    import time

    config = settings()
    log_to_stderr(args.log_level)
    from corelab.db import open_store
    from corelab.inbox import inbox_dir, scan_inbox
    from corelab.series_completion import start_qc

    engine = open_store(config)
    on_complete = None
    if args.qc != "queue":
        prepare_prefect_env(config)
        from flows.receive import QcStarter

        on_complete = QcStarter(config, mode=args.qc)
    print(f"corelab watch: polling {inbox_dir(config)}/<SITE>/ every {args.interval_s} s", file=sys.stderr,
          flush=True)
    while True:
        summary = scan_inbox(config, engine, settle_s=args.settle_s,
                             on_series=lambda ids: start_qc(engine, ids, on_complete, actor="inbox"))
        if args.once:
            if on_complete is not None:
                on_complete.join()
            print_result(args, summary)
            return 0
        time.sleep(args.interval_s)


QC_HELP = ("how to start QC of a completed series: flow (run the Prefect flow in this process), "
           "deployment (hand it to the prefect.yaml deployment), queue (only mark it queued for the "
           "nightly QC); default flow")


def node_parser() -> argparse.ArgumentParser:
    """The DICOM node's options, shared by receive and serve."""
    node = argparse.ArgumentParser(add_help=False)
    node.add_argument("--port", type=int, help="DICOM TCP port (default CORELAB_DICOM_PORT, 11112)")
    node.add_argument("--ae-title", help="our AE title (default CORELAB_AE_TITLE, CORELAB)")
    node.add_argument("--bind", default="", help="address to listen on (default: all interfaces)")
    node.add_argument("--max-associations", type=int, default=16, help="concurrent associations (default 16)")
    node.add_argument("--stable-s", type=float, help="seconds without a new object before a series is complete "
                      "(default CORELAB_SERIES_STABLE_S, 60)")
    node.add_argument("--tls-cert", help="DICOM TLS: our certificate (PEM)")
    node.add_argument("--tls-key", help="DICOM TLS: our private key (PEM)")
    node.add_argument("--tls-ca", help="DICOM TLS: CA that must have signed the senders' certificates")
    node.add_argument("--watch-inbox", action="store_true",
                      help="also poll <data dir>/inbox/<SITE>/ for file drops")
    node.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    return node


def add_commands(sub, common) -> None:
    """Add receive, serve, alerts and watch to the ``corelab`` parser."""
    node = node_parser()
    p = sub.add_parser("receive", parents=[node], help="run the DICOM node (Storage + Verification SCP) until stopped")
    p.add_argument("--qc", choices=["flow", "deployment", "queue"], default="flow", help=QC_HELP)
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("serve", parents=[node], help="one-machine core lab: the DICOM node plus the prefect.yaml "
                       "deployments served with their schedules, in one process (needs PREFECT_API_URL)")
    p.add_argument("--deployment", action="append", metavar="NAME",
                   help="serve only this prefect.yaml deployment (repeatable; default: all of them)")
    p.add_argument("--limit", type=int, default=4, help="flow runs at once (default 4)")
    p.add_argument("--no-portal", action="store_true", help="do not start the web portal (the portal_host and "
                   "portal_port settings say where it listens)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("alerts", help="loud failures: the Prefect automation that notifies on failed runs")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("install", parents=[common], help="create or update (idempotent) the automation that "
                        "calls a webhook for every Failed or Crashed flow run (needs PREFECT_API_URL)")
    q.add_argument("--webhook", help="URL to POST the alert to (JSON); saved as the Prefect Webhook block "
                   "corelab-alerts; omit to keep the one saved before")
    q.set_defaults(func=cmd_alerts_install)

    p = sub.add_parser("watch", parents=[common], help="poll the site inboxes <data dir>/inbox/<SITE>/ and ingest "
                       "what settles there")
    p.add_argument("--interval-s", type=float, default=5.0, help="seconds between polls (default 5)")
    p.add_argument("--settle-s", type=float, default=2.0, help="an entry is taken after this long unchanged")
    p.add_argument("--once", action="store_true", help="poll once, print what was ingested, and exit")
    p.add_argument("--qc", choices=["flow", "deployment", "queue"], default="flow", help=QC_HELP)
    p.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    p.set_defaults(func=cmd_watch)
