"""``corelab archive``: a trial's archive and the forwarding to it (added to flows/cli.py's parser).

    corelab archive set TRIAL (--dicom AE@host:port | --stow URL [--user U --password-file F])
                              [--rule all|evaluable]
    corelab archive show [--json]          every trial's destination (never a password)
    corelab archive backlog [--trial T] [--json]
    corelab archive forward [--trial T] [--direct]   the forward-to-archive flow (or the use case alone)
"""

from __future__ import annotations

import sys
from pathlib import Path

from flows.cli_common import cli_actor, prepare_prefect_env, print_result, session, settings

SHOW_COLUMNS = ["trial", "kind", "target", "user", "password", "rule"]
BACKLOG_COLUMNS = ["trial", "target", "rule", "waiting", "pending", "failed", "held", "sent", "replacements",
                   "oldest_waiting", "last_error"]


def cmd_archive_set(args) -> int:
    from services import forwarding

    with session() as s:
        data = forwarding.set_destination(s, settings(), args.trial, dicom=args.dicom or "", stow_url=args.stow or "",
                                          username=args.user or "",
                                          password_file=Path(args.password_file) if args.password_file else None,
                                          rule=args.rule, actor=cli_actor())
    print_result(args, data)
    return 0


def cmd_archive_show(args) -> int:
    from services import forwarding

    with session() as s:
        rows = forwarding.show(s)
    print_result(args, rows, rows, SHOW_COLUMNS)
    return 0


def cmd_archive_backlog(args) -> int:
    from services import forwarding

    with session() as s:
        rows = forwarding.backlog(s, trial_code=args.trial)
    print_result(args, rows, rows, BACKLOG_COLUMNS)
    return 0


def cmd_archive_forward(args) -> int:
    config = settings()
    if args.direct:
        from services import forwarding

        results = [r.as_dict() for r in forwarding.forward(config, args.trial, batch_size=args.batch_size,
                                                              batch_bytes=args.batch_mib << 20,
                                                              timeout_s=args.timeout, actor=cli_actor())]
        print_result(args, results, results, ["trial", "target", "sent", "failed", "series_delivered", "replacements",
                                              "errors"])
        return 1 if any(r["failed"] for r in results) else 0
    prepare_prefect_env(config)
    from flows.forward import forward_to_archive

    state = forward_to_archive(trial_code=args.trial, batch_size=args.batch_size, batch_bytes=args.batch_mib << 20,
                               timeout_s=args.timeout, return_state=True)
    if not state.is_completed():
        print(f"corelab archive forward: {state.message or state.name}", file=sys.stderr)
        return 1
    results = state.result()
    print_result(args, results, results, ["trial", "target", "sent", "failed", "series_delivered", "replacements"])
    return 0


def user_errors() -> tuple[type[Exception], ...]:
    from services.forwarding import ForwardingError

    return (ForwardingError,)


def add_commands(sub, common) -> None:
    """Add ``archive`` to the ``corelab`` parser."""
    p = sub.add_parser("archive", help="the trial's archive: set, show, backlog, forward")
    s = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = s.add_parser("set", parents=[common], help="point a trial at its archive (C-STORE or STOW-RS) with a rule")
    q.add_argument("trial")
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--dicom", metavar="AE@HOST:PORT", help="C-STORE to this AE title, host and port")
    where.add_argument("--stow", metavar="URL", help="STOW-RS to this DICOMweb base URL")
    q.add_argument("--user", help="HTTP Basic user of the STOW-RS archive (https only, except on loopback)")
    q.add_argument("--password-file", metavar="FILE",
                   help="file holding the password (one line); copied into the data directory, mode 0600")
    q.add_argument("--rule", choices=["all", "evaluable"], default="all",
                   help="all complete trial series, or only those evaluable after QC (default all)")
    q.set_defaults(func=cmd_archive_set)
    q = s.add_parser("show", parents=[common], help="every trial's archive and rule")
    q.set_defaults(func=cmd_archive_show)
    q = s.add_parser("backlog", parents=[common], help="per trial: waiting, failed (with the error), sent, oldest")
    q.add_argument("--trial")
    q.set_defaults(func=cmd_archive_backlog)
    q = s.add_parser("forward", parents=[common], help="send what is due (the forward-to-archive flow)")
    q.add_argument("--trial")
    q.add_argument("--batch-size", type=int, default=50, help="instances per association or request (default 50)")
    q.add_argument("--batch-mib", type=int, default=64, help="at most this many MiB per batch (default 64)")
    q.add_argument("--timeout", type=float, default=30.0, help="network time-out in seconds (default 30)")
    q.add_argument("--direct", action="store_true", help="run the use case without Prefect")
    q.set_defaults(func=cmd_archive_forward)
