"""``corelab`` commands for what comes in: register, sites, file drops, series, quarantine, deviations."""

from __future__ import annotations

import sys
from pathlib import Path

from flows.cli_common import (cli_actor, prepare_prefect_env, print_result, session, settings, short_uid,
                              utc_text)
from services import intake, lookup, review


def cmd_register_load(args) -> int:
    with session() as s:
        data = intake.load_register_file(s, args.file)
    print_result(args, data)
    return 0


def cmd_site_add(args) -> int:
    with session() as s:
        data = intake.register_site(s, args.site, ae_title=args.ae_title, host=args.host, name=args.name or "")
    print_result(args, data)
    return 0


def cmd_site_list(args) -> int:
    with session() as s:
        rows = intake.site_rows(s)
    print_result(args, rows, rows, ["site", "name", "ae_title", "host"])
    return 0


def cmd_ingest(args) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    config = settings()
    path = Path(args.path)
    if not path.exists():
        print(f"corelab ingest: {path} does not exist", file=sys.stderr)
        return 2
    try:
        with session(config) as s:
            summary = intake.ingest_drop(s, config, path, args.site)
    except (OSError, SQLAlchemyError) as exc:
        # bad objects are quarantined inside the ingest; what reaches here is the store or the disk
        print(f"corelab ingest: the store could not take the drop ({type(exc).__name__}: {exc}); nothing "
              "from it was acknowledged. Fix the data directory or database and run the same command again.",
              file=sys.stderr)
        return 3
    on_complete = None
    if args.qc != "queue":
        prepare_prefect_env(config)
        from flows.receive import QcStarter

        on_complete = QcStarter(config, mode=args.qc)
    qc_started = intake.start_drop_qc(config, summary.series_uids, on_complete)
    if on_complete is not None:
        on_complete.join()
    data = summary.as_dict()
    data["qc_started"] = len(qc_started)
    if not args.json:
        data = {k: v for k, v in data.items() if k not in ("series", "quarantine")}
        data["series"] = len(summary.series_uids)
    print_result(args, data)
    for item in summary.as_dict()["quarantine"] if not args.json else []:
        print(f"  quarantined [{item['reason_code']}] {item['reason']}")
    return 0


SERIES_COLUMNS = ["site", "subject", "visit", "modality", "kind", "instances", "expected", "state", "qc_state",
                  "received", "series_uid"]
QUARANTINE_COLUMNS = ["site", "subject", "visit", "series", "objects", "reasons", "newest"]


def cmd_series_list(args) -> int:
    since = lookup.parse_since(args.since, today=args.today)
    with session() as s:
        rows = lookup.series_list(s, since=since, site_code=args.site, trial_code=args.trial)
    table = [{**r, "received": utc_text(r["received"]), "series_uid": short_uid(r["series_uid"])} for r in rows]
    print_result(args, rows, table, SERIES_COLUMNS)
    return 0


def cmd_series_accept_versions(args) -> int:
    with session() as s:
        try:
            data = review.accept_new_versions(s, args.series_uid, actor=cli_actor())
        except review.NotFound as exc:
            print(f"corelab series accept-versions: {exc}", file=sys.stderr)
            return 2
    print_result(args, data)
    return 0


def cmd_quarantine_list(args) -> int:
    with session() as s:
        if args.objects:
            rows = lookup.quarantine_rows(s, include_released=args.all)
            print_result(args, rows, rows, ["id", "site", "source", "reason_code", "received_at", "reason"])
            return 0
        rows = lookup.quarantine_groups(s, include_released=args.all)
    table = [{**r, "series": short_uid(r["series_uid"]) or "no series", "reasons": ",".join(r["reason_codes"]),
              "newest": utc_text(r["newest"])} for r in rows]
    print_result(args, rows, table, QUARANTINE_COLUMNS)
    return 0


def cmd_quarantine_release(args) -> int:
    config = settings()
    with session(config) as s:
        outcome = intake.release_quarantine_item(s, config, args.id, site_code=args.site,
                                                 actor=cli_actor())
    if outcome is None:
        print(f"corelab quarantine release: no open quarantine item {args.id}", file=sys.stderr)
        return 2
    print_result(args, {"id": args.id, "status": outcome.status, "reason": outcome.reason or ""})
    return 0 if outcome.status != "quarantined" else 1


def cmd_deviations(args) -> int:
    with session() as s:
        rows = lookup.deviation_rows(s, trial_code=args.trial, site_code=args.site)
    print_result(args, rows, rows, ["id", "site", "subject", "visit", "rule_id", "severity", "expected",
                                    "observed", "status"])
    return 0


def add_commands(sub, common) -> None:
    """Add register, site, ingest, series, quarantine and deviations to the ``corelab`` parser."""
    p = sub.add_parser("register", help="load a site/scanner register file")
    rsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = rsub.add_parser("load", parents=[common], help="load trial, sites and scanners from a register YAML")
    q.add_argument("file")
    q.set_defaults(func=cmd_register_load)

    p = sub.add_parser("site", help="the site register")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("add", parents=[common], help="register a site and the AE title it sends from")
    q.add_argument("site", help="site code, e.g. A01")
    q.add_argument("--ae-title", required=True, help="calling AE title of the site's sender")
    q.add_argument("--host", help="only accept the AE title from this host")
    q.add_argument("--name", help="site name")
    q.set_defaults(func=cmd_site_add)
    q = ssub.add_parser("list", parents=[common], help="list registered sites")
    q.set_defaults(func=cmd_site_list)

    p = sub.add_parser("ingest", parents=[common], help="ingest files, folders or zips dropped by a site")
    p.add_argument("path")
    p.add_argument("--site", required=True, help="the site that sent them")
    p.add_argument("--qc", choices=["flow", "deployment", "queue"], default="queue",
                   help="how to start QC of the series the drop completed: flow (run the Prefect flow now, in "
                        "this process), deployment (hand them to the prefect.yaml deployment), queue (mark them "
                        "queued; the nightly QC runs them); default queue")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("series", help="received series")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("list", parents=[common], help="received series, newest first: site, subject, visit, "
                        "counts, state, QC state, first arrival (UTC) and the series UID (cut in the table, "
                        "whole with --json)")
    when = q.add_mutually_exclusive_group()
    when.add_argument("--since", metavar="DATE|DATETIME",
                      help="only series first received at or after YYYY-MM-DD (00:00 UTC) or an ISO 8601 "
                           "date-time (no offset: UTC)")
    when.add_argument("--today", action="store_true", help="only series first received today (the UTC day)")
    q.add_argument("--site", help="only this site's series (site code)")
    q.add_argument("--trial", help="only this trial's series (trial code)")
    q.set_defaults(func=cmd_series_list)
    q = ssub.add_parser("accept-versions", parents=[common],
                        help="the core lab has reviewed a series' new versions of instances: clear their flag "
                             "(under the archive rule 'evaluable' they are forwarded only then)")
    q.add_argument("series_uid", metavar="SERIES_UID")
    q.set_defaults(func=cmd_series_accept_versions)

    p = sub.add_parser("quarantine", help="objects held back, with their reasons")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("list", parents=[common], help="held-back objects, one row per site and series "
                        "(subject and visit when the series is known): count, reason codes, newest arrival")
    q.add_argument("--all", action="store_true", help="include released items")
    q.add_argument("--objects", action="store_true",
                   help="one row per object, with the id that `quarantine release` takes")
    q.set_defaults(func=cmd_quarantine_list)
    q = ssub.add_parser("release", parents=[common], help="check a quarantined object again and store it if it passes")
    q.add_argument("id", type=int)
    q.add_argument("--site", help="site to attribute it to (for objects from an unknown sender)")
    q.set_defaults(func=cmd_quarantine_release)

    p = sub.add_parser("deviations", parents=[common], help="protocol deviations found by QC")
    p.add_argument("--trial", help="trial code")
    p.add_argument("--site", help="site code")
    p.set_defaults(func=cmd_deviations)
