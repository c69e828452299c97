"""``corelab`` commands about the installation: settings, the audit log, the demo, synthesis."""

from __future__ import annotations

from pathlib import Path

from flows.cli_common import prepare_prefect_env, print_result, session, settings
from services import lookup


def cmd_settings(args) -> int:
    print_result(args, lookup.settings_info(settings()))
    return 0


def cmd_audit_verify(args) -> int:
    """Recompute the chain; compare it with the anchor file and the heads in signature records."""
    with session() as s:
        result, n_signed = lookup.verify_audit(s, settings())
    data = result.as_dict()
    data["signature_records"] = n_signed
    if getattr(args, "json", False):
        print_result(args, data)
    else:
        print(f"intact: {result.intact}")
        print(f"table: {result.table_count} events, head {result.table_head[:16]}...")
        print(f"anchor: {result.anchor_file}: " + (f"{result.anchor_count} events, head {result.anchor_head[:16]}... "
                                                    if result.anchor_count is not None else "no records ")
              + f"({result.anchors_checked} anchors checked, {n_signed} of them from signature records)")
        for p in result.problems:
            print(f"problem: {'event ' + str(p.event_id) + ': ' if p.event_id is not None else ''}{p.problem}")
    return 0 if result.intact else 1


def cmd_synth(args) -> int:
    from flows.demo_data import synthesize_trial

    print_result(args, synthesize_trial(Path(args.outdir), seed=args.seed, spec_path=args.spec,
                                        first_scan_date=args.date))
    return 0


def _iso_date(text: str) -> str:
    """An argparse type: ``YYYY-MM-DD``, checked here so a typo is a usage error, not a traceback."""
    import argparse
    import datetime as dt

    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; use YYYY-MM-DD") from None


def cmd_demo(args) -> int:
    s = settings()
    prepare_prefect_env(s)
    from flows.demo import run_demo

    print_result(args, run_demo(s, seed=args.seed, quiet=args.json))
    return 0


def add_commands(sub, common) -> None:
    """Add demo, synth, settings and audit to the ``corelab`` parser."""
    p = sub.add_parser("demo", parents=[common], help="generate a small synthetic trial and run it end to end")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic trial (default 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", parents=[common], help="write a synthetic multi-site trial with ground truth; "
                       "the same seed and the same --date give the same bytes")
    p.add_argument("outdir", help="folder to write into")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed and date, same files)")
    p.add_argument("--date", type=_iso_date, metavar="YYYY-MM-DD",
                   help="first trial scan date (default: the spec's own first_scan_date if it names one, else "
                        "21 days ago as in the demo, so the phantoms, scanned before it, are accredited today); "
                        "give it to reproduce a trial generated on another day")
    p.add_argument("--spec", help="trial spec YAML (default: the demo trial)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("settings", parents=[common], help="show the settings in force and the schema revision")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("audit", help="the audit log")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("verify", parents=[common], help="recompute the hash chain, compare it with its anchor file and "
                        "the signed reports, and report any break (truncation, rewrite, edit)")
    q.set_defaults(func=cmd_audit_verify)
