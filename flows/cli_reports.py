"""``corelab`` subcommands for exports, queries, waivers, reports and sign-off (added to flows/cli.py's parser).

    corelab export --trial T [--format parquet|csv] [--out DIR]
    corelab query open DEVIATION_ID --text ... [--as NAME]
    corelab query answer QUERY_ID --text ... --as SITE
    corelab query resolve QUERY_ID [--text ...] [--as NAME]
    corelab query list [--site S] [--open] [--json]
    corelab deviation waive DEVIATION_ID --reason ... --as NAME
    corelab report render accreditation|site-qc|trial [--scanner|--site|--trial ...] [--force --reason ...]
    corelab report list [--json]
    corelab sign REPORT --as NAME --reason ...
"""

from __future__ import annotations

import getpass
from pathlib import Path

from flows.cli_common import print_result, session, settings
from services import reports, review


def cmd_query_open(args) -> int:
    with session() as s:
        data = review.open_query(s, args.deviation_id, args.text, actor=args.actor or getpass.getuser())
    print_result(args, data)
    return 0


def cmd_query_answer(args) -> int:
    with session() as s:
        data = review.answer_query(s, args.query_id, args.text, site_code=args.actor)
    print_result(args, data)
    return 0


def cmd_query_resolve(args) -> int:
    with session() as s:
        data = review.resolve_query(s, args.query_id, actor=args.actor or getpass.getuser(), text=args.text or "")
    print_result(args, data)
    return 0


def cmd_query_list(args) -> int:
    with session() as s:
        rows = review.list_queries(s, site_code=args.site, open_only=args.open, with_thread=args.json)
    print_result(args, rows, rows, ["id", "site", "deviation_id", "rule_id", "severity", "status",
                                    "deviation_status", "opened_at", "last"])
    return 0


def cmd_deviation_waive(args) -> int:
    with session() as s:
        data = review.waive_deviation(s, args.deviation_id, args.reason, actor=args.actor)
    print_result(args, data)
    return 0


def _render_needs(args) -> str:
    from reports.render import ReportError

    needed = {"accreditation": "scanner", "site-qc": "site", "trial": "trial"}[args.kind]
    if not getattr(args, needed):
        raise ReportError(f"report render {args.kind} needs --{needed} CODE")
    return getattr(args, needed)


def cmd_report_render(args) -> int:
    config = settings()
    code = _render_needs(args)
    options = dict(force=args.force, reason=args.reason or "", deliver=not args.no_deliver, actor=getpass.getuser())
    with session(config) as s:
        if args.kind == "accreditation":
            out = reports.publish_accreditation_report(s, config, code, standard=args.standard, **options)
        elif args.kind == "site-qc":
            out = reports.publish_site_qc_report(s, config, code, month=args.month, **options)
        else:
            out = reports.publish_trial_report(s, config, code, **options)
    print_result(args, [out] if args.json else out)
    return 0


def cmd_report_list(args) -> int:
    with session() as s:
        rows = reports.list_reports(s)
    print_result(args, rows, rows, ["id", "kind", "key", "version", "site", "trial", "replaces_id", "signed_by",
                                    "signed_at", "path"])
    return 0


def cmd_sign(args) -> int:
    config = settings()
    with session(config) as s:
        data = reports.sign_and_deliver(s, config, args.report, signer=args.actor, reason=args.reason,
                                        deliver=not args.no_deliver)
    print_result(args, data)
    return 0


def cmd_export(args) -> int:
    config = settings()
    with session(config) as s:
        paths = reports.export_trial_tables(s, config, args.trial, fmt=args.format,
                                            out_dir=Path(args.out) if args.out else None)
    print_result(args, paths)
    return 0


def add_commands(sub, common) -> None:
    """Add the export, query, deviation, report and sign subcommands to the ``corelab`` parser."""
    p = sub.add_parser("export", parents=[common], help="export the header table and deviations (Parquet or CSV)")
    p.add_argument("--trial", required=True, help="trial code")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    p.add_argument("--out", help="folder (default: <data dir>/exports)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("query", help="queries to sites about deviations")
    s = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = s.add_parser("open", parents=[common], help="send a deviation to its site as a query")
    q.add_argument("deviation_id", type=int)
    q.add_argument("--text", required=True, help="the question to the site")
    q.add_argument("--as", dest="actor", help="who asks (default: the login name)")
    q.set_defaults(func=cmd_query_open)
    q = s.add_parser("answer", parents=[common], help="record a site's answer")
    q.add_argument("query_id", type=int)
    q.add_argument("--text", required=True)
    q.add_argument("--as", dest="actor", required=True, metavar="SITE", help="the site answering (its code)")
    q.set_defaults(func=cmd_query_answer)
    q = s.add_parser("resolve", parents=[common], help="close a query; its deviation becomes resolved")
    q.add_argument("query_id", type=int)
    q.add_argument("--text", help="a closing note")
    q.add_argument("--as", dest="actor", help="who resolves it (default: the login name)")
    q.set_defaults(func=cmd_query_resolve)
    q = s.add_parser("list", parents=[common], help="queries, newest first")
    q.add_argument("--site", help="site code")
    q.add_argument("--open", action="store_true", help="only queries not resolved")
    q.set_defaults(func=cmd_query_list)

    p = sub.add_parser("deviation", help="act on one deviation")
    s = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = s.add_parser("waive", parents=[common], help="waive a deviation with a reason (a physicist's decision)")
    q.add_argument("deviation_id", type=int)
    q.add_argument("--reason", required=True)
    q.add_argument("--as", dest="actor", required=True, metavar="NAME")
    q.set_defaults(func=cmd_deviation_waive)

    p = sub.add_parser("report", help="accreditation, site QC and trial deviation reports")
    s = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = s.add_parser("render", parents=[common], help="render (a new version when the content changed) and "
                     "deliver a report")
    q.add_argument("kind", choices=["accreditation", "site-qc", "trial"])
    q.add_argument("--scanner", help="accreditation: scanner code")
    q.add_argument("--standard", help="accreditation: standard (default: the scanner's first)")
    q.add_argument("--site", help="site-qc: site code")
    q.add_argument("--month", help="site-qc: YYYY-MM (default: this month)")
    q.add_argument("--trial", help="trial: trial code")
    q.add_argument("--force", action="store_true", help="a new version even if the content is unchanged "
                   "(a correction; give --reason)")
    q.add_argument("--reason", help="why this version (shown in it and in the audit log)")
    q.add_argument("--no-deliver", action="store_true", help="do not copy it to the outbox or e-mail it")
    q.set_defaults(func=cmd_report_render)
    q = s.add_parser("list", parents=[common], help="every report version with its signature")
    q.set_defaults(func=cmd_report_list)

    p = sub.add_parser("sign", parents=[common], help="e-sign a report version (recorded in the audit log; the "
                       "report is frozen)")
    p.add_argument("report", help="report id (`corelab report list`) or the path of its HTML or PDF")
    p.add_argument("--as", dest="actor", required=True, metavar="NAME")
    p.add_argument("--reason", required=True, help="meaning of the signature, e.g. 'reviewed and approved'")
    p.add_argument("--no-deliver", action="store_true", help="do not deliver the signature file to the outbox")
    p.set_defaults(func=cmd_sign)


def user_errors() -> tuple[type[Exception], ...]:
    from corelab.site_queries import QueryError
    from reports.render import ReportError

    return (QueryError, ReportError)

