"""``corelab`` subcommands for queries, waivers, reports and sign-off (added to flows/cli.py's parser).

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
import sys


def _cli():
    from flows import cli

    return cli


def cmd_query_open(args) -> int:
    from corelab.db import session_scope
    from corelab.site_queries import open_query

    with session_scope(_cli()._settings()) as session:
        q = open_query(session, args.deviation_id, args.text, actor=args.actor or getpass.getuser())
        data = {"query": q.id, "deviation": q.deviation_id, "status": q.status}
    _cli()._print(args, data)
    return 0


def cmd_query_answer(args) -> int:
    from corelab.db import session_scope
    from corelab.site_queries import answer_query

    with session_scope(_cli()._settings()) as session:
        q = answer_query(session, args.query_id, args.text, site_code=args.actor)
        data = {"query": q.id, "status": q.status}
    _cli()._print(args, data)
    return 0


def cmd_query_resolve(args) -> int:
    from corelab.db import session_scope
    from corelab.site_queries import resolve_query

    with session_scope(_cli()._settings()) as session:
        q = resolve_query(session, args.query_id, actor=args.actor or getpass.getuser(), text=args.text or "")
        data = {"query": q.id, "status": q.status}
    _cli()._print(args, data)
    return 0


def cmd_query_list(args) -> int:
    from corelab.db import session_scope
    from corelab.site_queries import query_rows

    with session_scope(_cli()._settings()) as session:
        rows = query_rows(session, site_code=args.site, open_only=args.open)
    if not args.json:
        rows = [{k: v for k, v in r.items() if k != "thread"} for r in rows]
    _cli()._print(args, rows, rows, ["id", "site", "deviation_id", "rule_id", "severity", "status",
                                     "deviation_status", "opened_at", "last"])
    return 0


def cmd_deviation_waive(args) -> int:
    from corelab.db import session_scope
    from corelab.site_queries import waive_deviation

    with session_scope(_cli()._settings()) as session:
        dev = waive_deviation(session, args.deviation_id, args.reason, actor=args.actor)
        data = {"deviation": dev.id, "rule_id": dev.rule_id, "status": dev.status}
    _cli()._print(args, data)
    return 0


def cmd_report_render(args) -> int:
    from corelab.db import session_scope
    from reports.delivery import publish
    from reports.render import ReportError

    settings = _cli()._settings()
    out = []
    with session_scope(settings) as session:
        specs = []
        if args.kind == "accreditation":
            from reports.accreditation import accreditation_report

            if not args.scanner:
                raise ReportError("report render accreditation needs --scanner CODE")
            specs.append(accreditation_report(session, args.scanner, settings=settings, standard=args.standard))
        elif args.kind == "site-qc":
            from reports.site_qc import month_period, site_qc_report

            if not args.site:
                raise ReportError("report render site-qc needs --site CODE")
            since, until, label = month_period(args.month)
            specs.append(site_qc_report(session, args.site, since=since, until=until, label=label))
        else:
            from reports.exports import export_trial
            from reports.trial import trial_deviation_report

            if not args.trial:
                raise ReportError("report render trial needs --trial CODE")
            exports = {}
            for fmt in ("csv", "parquet"):
                exports.update({f"{k}.{fmt}": p for k, p in
                                export_trial(session, args.trial, settings.exports_dir, fmt=fmt).items()})
            specs.append(trial_deviation_report(session, args.trial, exports=exports))
        for spec in specs:
            out.append(publish(session, settings, spec, force=args.force, reason=args.reason or "",
                               deliver=not args.no_deliver, actor=getpass.getuser()))
    _cli()._print(args, out if args.json else out[0])
    return 0


def cmd_report_list(args) -> int:
    from corelab.db import session_scope
    from reports.render import report_rows

    with session_scope(_cli()._settings()) as session:
        rows = report_rows(session)
    _cli()._print(args, rows, rows, ["id", "kind", "key", "version", "site", "trial", "replaces_id", "signed_by",
                                     "signed_at", "path"])
    return 0


def cmd_sign(args) -> int:
    from corelab.db import session_scope
    from reports.delivery import deliver_report
    from reports.render import sign_report

    settings = _cli()._settings()
    with session_scope(settings) as session:
        report = sign_report(session, args.report, signer=args.actor, reason=args.reason, data_dir=settings.data_dir)
        data = {"report": report.id, "path": report.path, "sha256": report.sha256, "signed_by": report.signed_by,
                "signed_at": report.signed_at.isoformat()}
        if not args.no_deliver:  # the site gets the signature file beside the report
            data["delivery"] = deliver_report(session, settings, report, actor=args.actor)
    _cli()._print(args, data)
    return 0


def add_commands(sub, common) -> None:
    """Add the query, deviation, report and sign subcommands to the ``corelab`` parser."""
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_cli().main())
