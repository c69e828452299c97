"""The ``corelab`` command line: one entry point, a subcommand per job.

Every command opens the store first (creating and migrating the data directory on first use).
Commands that a machine may read take ``--json``. Commands that run a pipeline start its Prefect
flow; the others call the packages directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _print(args, data, table_rows=None, columns=None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
        return
    if table_rows is None:
        for key, value in (data.items() if isinstance(data, dict) else enumerate(data)):
            print(f"{key}: {value}")
        return
    if not table_rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in table_rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in table_rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _settings():
    from corelab.settings import load_settings

    return load_settings()


def prepare_prefect_env(settings) -> None:
    """Point Prefect at the data directory unless the user configured Prefect themselves.

    Must run before ``import prefect``: Prefect reads its settings at import.
    """
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home.absolute()))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                          str(settings.prefect_startup_timeout_s))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The machine may have no route out; telemetry would only log a failure.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


# --- commands -------------------------------------------------------------------------------------

def cmd_settings(args) -> int:
    settings = _settings()
    from corelab.db import current_revision, open_store

    data = settings.as_dict()
    data["schema_revision"] = current_revision(open_store(settings))
    _print(args, data)
    return 0


def cmd_synth(args) -> int:
    from phantoms.trial import TrialSpec, generate_trial

    spec = TrialSpec.from_yaml(args.spec) if args.spec else TrialSpec.demo()
    truth = generate_trial(Path(args.outdir), spec, seed=args.seed)
    data = {"outdir": str(Path(args.outdir).absolute()), "trial": truth.data["trial_code"],
            "seed": args.seed, "series": len(truth.series),
            "files": sum(s["n_files"] for s in truth.series),
            "problems": sorted({p["code"] for p in truth.problems}),
            "ground_truth": str((Path(args.outdir) / "ground_truth.json").absolute()),
            "register": str((Path(args.outdir) / "register.yaml").absolute())}
    _print(args, data)
    return 0


def cmd_register_load(args) -> int:
    from corelab.db import session_scope
    from corelab.register import load_register
    from expectations.manual import trial_fields

    with session_scope(_settings()) as session:
        data = load_register(session, Path(args.file), trial_fields=trial_fields)
    _print(args, data)
    return 0


def cmd_site_add(args) -> int:
    from corelab.db import session_scope
    from corelab.register import add_site

    with session_scope(_settings()) as session:
        site = add_site(session, code=args.site, ae_title=args.ae_title, host=args.host, name=args.name or "")
        data = {"site": site.code, "ae_title": site.ae_title, "host": site.host}
    _print(args, data)
    return 0


def cmd_site_list(args) -> int:
    from sqlmodel import select

    from corelab.db import session_scope
    from corelab.models import Site

    with session_scope(_settings()) as session:
        rows = [{"site": s.code, "name": s.name, "ae_title": s.ae_title, "host": s.host or ""}
                for s in session.exec(select(Site).order_by(Site.code))]
    _print(args, rows, rows, ["site", "name", "ae_title", "host"])
    return 0


def cmd_ingest(args) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from corelab.db import session_scope
    from corelab.ingest import ingest_path

    settings = _settings()
    path = Path(args.path)
    if not path.exists():
        print(f"corelab ingest: {path} does not exist", file=sys.stderr)
        return 2
    try:
        with session_scope(settings) as session:
            summary = ingest_path(session, settings, path, site_code=args.site)
    except (OSError, SQLAlchemyError) as exc:
        # bad objects are quarantined inside ingest_path; what reaches here is the store or the disk
        print(f"corelab ingest: the store could not take the drop ({type(exc).__name__}: {exc}); nothing "
              "from it was acknowledged. Fix the data directory or database and run the same command again.",
              file=sys.stderr)
        return 3
    data = summary.as_dict()
    if not args.json:
        data = {k: v for k, v in data.items() if k not in ("series", "quarantine")}
        data["series"] = len(summary.series_uids)
    _print(args, data)
    for item in summary.as_dict()["quarantine"] if not args.json else []:
        print(f"  quarantined [{item['reason_code']}] {item['reason']}")
    return 0


def cmd_series_list(args) -> int:
    from corelab.db import session_scope
    from corelab.queries import series_rows

    with session_scope(_settings()) as session:
        rows = series_rows(session)
    _print(args, rows, rows, ["series_uid", "site", "kind", "modality", "instances", "expected", "state",
                              "qc_state", "completeness"])
    return 0


def cmd_quarantine_list(args) -> int:
    from corelab.db import session_scope
    from corelab.queries import quarantine_rows

    with session_scope(_settings()) as session:
        rows = quarantine_rows(session, include_released=args.all)
    _print(args, rows, rows, ["id", "site", "source", "reason_code", "received_at", "reason"])
    return 0


def cmd_quarantine_release(args) -> int:
    from corelab.db import session_scope
    from corelab.ingest import release_quarantined
    from corelab.models import QuarantineItem

    settings = _settings()
    with session_scope(settings) as session:
        item = session.get(QuarantineItem, args.id)
        if item is None or item.released_at is not None:
            print(f"corelab quarantine release: no open quarantine item {args.id}", file=sys.stderr)
            return 2
        outcome = release_quarantined(session, settings, item, site_code=args.site)
    _print(args, {"id": args.id, "status": outcome.status, "reason": outcome.reason or ""})
    return 0 if outcome.status != "quarantined" else 1


def cmd_deviations(args) -> int:
    from corelab.db import session_scope
    from corelab.queries import deviation_rows

    with session_scope(_settings()) as session:
        rows = deviation_rows(session, trial_code=args.trial, site_code=args.site)
    _print(args, rows, rows, ["site", "subject", "visit", "rule_id", "severity", "expected", "observed",
                              "status"])
    return 0


def cmd_accreditation_list(args) -> int:
    from accreditation.register import Cadence, expiring_accreditations
    from corelab.db import session_scope
    from corelab.queries import accreditation_rows

    with session_scope(_settings()) as session:
        rows = accreditation_rows(session)
        expiring = expiring_accreditations(session, within_days=args.within_days)
    soon = {(e["scanner"], e["standard"], e["scope"]): e for e in expiring}
    for row in rows:
        e = soon.get((row["scanner"], row["standard"], row["scope"]))
        if e is not None:
            row["status"] = e["status"]  # an accreditation whose validity has ended reads expired
        row["expires_in_days"] = e["days_left"] if e else ""
    _print(args, rows, rows, ["scanner", "site", "standard", "scope", "status", "valid_from", "valid_until",
                              "expires_in_days"])
    if not args.json:
        for e in expiring:
            when = (f"expired {-e['days_left']} day(s) ago" if e["days_left"] < 0
                    else f"expires in {e['days_left']} day(s)")
            print(f"warning: {e['scanner']} {e['standard']} ({e['scope']}) {when} on {e['valid_until']}: "
                  f"{e['due']}")
    return 0


def cmd_accreditation_show(args) -> int:
    from accreditation.register import scanner_record
    from corelab.db import session_scope

    with session_scope(_settings()) as session:
        record = scanner_record(session, args.scanner)
    if record is None:
        print(f"corelab accreditation show: no scanner {args.scanner!r}; `corelab accreditation list` "
              "names the scanners", file=sys.stderr)
        return 2
    if args.json:
        _print(args, record)
        return 0
    _print(args, record["scanner"])
    print("\naccreditations:")
    _print(args, record["accreditations"], record["accreditations"],
           ["standard", "scope", "status", "valid_from", "valid_until", "days_left"])
    print("\nphantom results (newest first):")
    _print(args, record["phantom_results"], record["phantom_results"],
           ["id", "kind", "verdict", "scan_date", "standard", "standard_version", "corelab_version",
            "input_sha256"])
    return 0


def cmd_audit_verify(args) -> int:
    """Recompute the chain; compare it with the anchor file and the heads in signature records."""
    from corelab import audit
    from corelab.db import session_scope

    settings = _settings()
    signed, unreadable = audit.signature_anchors(settings.reports_dir)
    with session_scope(settings) as session:
        result = audit.check(session, audit.anchor_path(settings.data_dir), extra_anchors=signed)
    result.problems[:0] = unreadable
    data = result.as_dict()
    data["signature_records"] = len(signed)
    if getattr(args, "json", False):
        _print(args, data)
    else:
        print(f"intact: {result.intact}")
        print(f"table: {result.table_count} events, head {result.table_head[:16]}...")
        print(f"anchor: {result.anchor_file}: " + (f"{result.anchor_count} events, head {result.anchor_head[:16]}... "
                                                    if result.anchor_count is not None else "no records ")
              + f"({result.anchors_checked} anchors checked, {len(signed)} of them from signature records)")
        for p in result.problems:
            print(f"problem: {'event ' + str(p.event_id) + ': ' if p.event_id is not None else ''}{p.problem}")
    return 0 if result.intact else 1


def cmd_phantom_analyze(args) -> int:
    from accreditation.evaluate import evaluate_series_folder
    from phantoms.fill import load_fill_sheet

    from accreditation.evaluate import load_centres

    centres = load_centres(Path(args.centres)) if args.centres else None
    result = evaluate_series_folder(Path(args.path), load_fill_sheet(Path(args.fill)), standard=args.standard,
                                    centres_mm=centres, rc_peak_placement=args.rc_peak).to_dict()
    _print(args, result)
    return 0 if result.get("verdict") == "pass" else 1


def cmd_export(args) -> int:
    from corelab.db import session_scope
    from expectations.manual import trial_fields
    from reports.exports import export_trial

    settings = _settings()
    out_dir = Path(args.out) if args.out else settings.exports_dir
    with session_scope(settings) as session:
        paths = export_trial(session, args.trial, out_dir, fmt=args.format,
                             manual_version=trial_fields(args.trial).get("manual_version"))
    _print(args, paths)
    return 0


def cmd_suv(args) -> int:
    from corelab.suv import suv_of_files

    path = Path(args.path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        print(f"corelab suv: no files in {path}", file=sys.stderr)
        return 2
    entries = suv_of_files(files)
    if args.json:
        # Each entry carries suv_type, normalisation {name, value, unit, sex_used, male_female}
        # and warnings [{code, message}] (SuvResult.to_dict).
        _print(args, entries)
    else:
        def normalised(e) -> str:
            n = e.get("normalisation") or {}
            if not n:
                return ""
            value = "?" if n.get("value") is None else f"{n['value']:.4g} {n['unit']}"
            return f"{e.get('suv_type')}: {n['name']} {value}" + (f" (sex {n['sex_used']})" if n.get("sex_used") else "")

        rows = [{"series_uid": e.get("series_uid", e.get("file")), "units": e.get("units") or "",
                 "factor_g_per_bq": "" if e.get("error") or "unreadable" in e else
                 (f"{e['factor_g_per_bq']:.6g}" if e.get("factor_g_per_bq") else "varies per slice"),
                 "suv_min/mean/max": "" if e.get("error") or "unreadable" in e else
                 f"{e['suv_min']:.2f} / {e['suv_mean']:.2f} / {e['suv_max']:.2f}",
                 "normalisation": "" if e.get("error") else normalised(e),
                 "problem": (e["error"]["message"] if e.get("error") else e.get("unreadable", "")
                             or "; ".join(w["message"] for w in e.get("warnings", [])))}
                for e in entries]
        _print(args, rows, rows, ["series_uid", "units", "factor_g_per_bq", "suv_min/mean/max", "normalisation",
                                  "problem"])
    return 0 if all(not e.get("error") and "unreadable" not in e for e in entries) else 1


def cmd_demo(args) -> int:
    settings = _settings()
    prepare_prefect_env(settings)
    from flows.demo import run_demo

    summary = run_demo(settings, seed=args.seed, quiet=args.json)
    _print(args, summary)
    return 0


def _log_to_stderr(level: str) -> None:
    import logging

    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom logs every PDU at INFO; its warnings and errors are enough here.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def cmd_receive(args) -> int:
    import signal

    settings = _settings()
    _log_to_stderr(args.log_level)
    if args.qc != "queue":
        prepare_prefect_env(settings)
    from flows.receive import build_receiver

    receiver = build_receiver(settings, qc=args.qc, **_receiver_options(args))
    # SIGTERM (service manager, `kill`) shuts down like Ctrl-C: associations end, the ticker stops.
    signal.signal(signal.SIGTERM, lambda *_: receiver._stop.set())
    receiver.start()
    print(f"corelab receive: {receiver.config.ae_title} listening on port {receiver.port}", file=sys.stderr,
          flush=True)
    receiver.serve_forever()
    return 0


def _receiver_options(args) -> dict:
    return dict(watch_inbox=args.watch_inbox, port=args.port, ae_title=args.ae_title,
                max_associations=args.max_associations, bind_address=args.bind, stable_s=args.stable_s,
                tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                tls_key=Path(args.tls_key) if args.tls_key else None,
                tls_ca=Path(args.tls_ca) if args.tls_ca else None)


def cmd_serve(args) -> int:
    settings = _settings()
    _log_to_stderr(args.log_level)
    prepare_prefect_env(settings)
    from flows.serve import ServeSetupError, serve

    try:
        serve(settings, _receiver_options(args), only=args.deployment or None, limit=args.limit)
    except ServeSetupError as exc:
        print(f"corelab serve: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_alerts_install(args) -> int:
    settings = _settings()
    prepare_prefect_env(settings)
    from flows.automations import AlertSetupError, install_alert_automation

    try:
        result = install_alert_automation(args.webhook)
    except AlertSetupError as exc:
        print(f"corelab alerts install: {exc}", file=sys.stderr)
        return 2
    _print(args, result.as_dict())
    return 0


def cmd_watch(args) -> int:
    import time

    settings = _settings()
    _log_to_stderr(args.log_level)
    from corelab.db import open_store
    from corelab.inbox import inbox_dir, scan_inbox
    from corelab.series_completion import start_qc

    engine = open_store(settings)
    on_complete = None
    if args.qc != "queue":
        prepare_prefect_env(settings)
        from flows.receive import QcStarter

        on_complete = QcStarter(settings, mode=args.qc)
    print(f"corelab watch: polling {inbox_dir(settings)}/<SITE>/ every {args.interval_s} s", file=sys.stderr,
          flush=True)
    while True:
        summary = scan_inbox(settings, engine, settle_s=args.settle_s,
                             on_series=lambda ids: start_qc(engine, ids, on_complete, actor="inbox"))
        if args.once:
            if on_complete is not None:
                on_complete.join()
            _print(args, summary)
            return 0
        time.sleep(args.interval_s)


# --- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")

    parser = argparse.ArgumentParser(
        prog="corelab", description="corelab: an imaging core lab for multi-centre PET/CT trials. "
        "Settings come from CORELAB_* environment variables (CORELAB_DATA_DIR, default ./corelab-data).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="generate a small synthetic trial and run it end to end")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic trial (default 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", parents=[common], help="write a synthetic multi-site trial with ground truth")
    p.add_argument("outdir", help="folder to write into")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--spec", help="trial spec YAML (default: the demo trial)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("export", parents=[common], help="export the header table and deviations (Parquet or CSV)")
    p.add_argument("--trial", required=True, help="trial code")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    p.add_argument("--out", help="folder (default: <data dir>/exports)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("suv", parents=[common], help="SUVbw factors and SUV min/mean/max of PET series in a file or folder")
    p.add_argument("path", help="a DICOM file or a folder (searched recursively)")
    p.set_defaults(func=cmd_suv)

    p = sub.add_parser("settings", parents=[common], help="show the settings in force and the schema revision")
    p.set_defaults(func=cmd_settings)

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
    p.set_defaults(func=cmd_ingest)

    qc_help = ("how to start QC of a completed series: flow (run the Prefect flow in this process), "
               "deployment (hand it to the prefect.yaml deployment), queue (only mark it queued for the "
               "nightly QC); default flow")
    node = argparse.ArgumentParser(add_help=False)  # the DICOM node's options, shared by receive and serve
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

    p = sub.add_parser("receive", parents=[node], help="run the DICOM node (Storage + Verification SCP) until stopped")
    p.add_argument("--qc", choices=["flow", "deployment", "queue"], default="flow", help=qc_help)
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("serve", parents=[node], help="one-machine core lab: the DICOM node plus the prefect.yaml "
                       "deployments served with their schedules, in one process (needs PREFECT_API_URL)")
    p.add_argument("--deployment", action="append", metavar="NAME",
                   help="serve only this prefect.yaml deployment (repeatable; default: all of them)")
    p.add_argument("--limit", type=int, default=4, help="flow runs at once (default 4)")
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
    p.add_argument("--qc", choices=["flow", "deployment", "queue"], default="flow", help=qc_help)
    p.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("series", help="received series")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("list", parents=[common], help="every received series with its state and QC state")
    q.set_defaults(func=cmd_series_list)

    p = sub.add_parser("quarantine", help="objects held back, with their reasons")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("list", parents=[common], help="list quarantined objects")
    q.add_argument("--all", action="store_true", help="include released items")
    q.set_defaults(func=cmd_quarantine_list)
    q = ssub.add_parser("release", parents=[common], help="check a quarantined object again and store it if it passes")
    q.add_argument("id", type=int)
    q.add_argument("--site", help="site to attribute it to (for objects from an unknown sender)")
    q.set_defaults(func=cmd_quarantine_release)

    p = sub.add_parser("deviations", parents=[common], help="protocol deviations found by QC")
    p.add_argument("--trial", help="trial code")
    p.add_argument("--site", help="site code")
    p.set_defaults(func=cmd_deviations)

    p = sub.add_parser("accreditation", help="the scanner accreditation register")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("list", parents=[common], help="accreditation per scanner and standard, with coming expiries")
    q.add_argument("--within-days", type=int, default=30, help="warn of expiries within this many days (default 30)")
    q.set_defaults(func=cmd_accreditation_list)
    q = ssub.add_parser("show", parents=[common],
                        help="one scanner: its accreditations and the history of its phantom results")
    q.add_argument("scanner", help="scanner code, e.g. A01-1")
    q.set_defaults(func=cmd_accreditation_show)

    p = sub.add_parser("phantom", help="phantom analysis")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("analyze", parents=[common], help="analyse a phantom series folder with its fill sheet")
    q.add_argument("path", help="folder of the phantom series' DICOM files")
    q.add_argument("--fill", required=True, help="fill sheet YAML")
    q.add_argument("--standard", default="EARL1", help="EARL1 or EARL2 (default EARL1)")
    q.add_argument("--centres", help="sphere centres by hand, YAML/JSON {diameter_mm: [x, y, z]} in patient mm "
                                     "(when automatic localisation fails)")
    q.add_argument("--rc-peak", choices=["max_voxel", "max_mean"], default="max_voxel",
                   help="RCpeak 1 mL sphere: centred on the hottest voxel (default) or where its mean is highest")
    q.set_defaults(func=cmd_phantom_analyze)

    p = sub.add_parser("audit", help="the audit log")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("verify", parents=[common], help="recompute the hash chain, compare it with its anchor file and "
                        "the signed reports, and report any break (truncation, rewrite, edit)")
    q.set_defaults(func=cmd_audit_verify)
    from flows.cli_reports import add_commands as add_report_commands

    add_report_commands(sub, common)  # query, deviation, report, sign
    return parser


def _version() -> str:
    from corelab import __version__

    return f"corelab {__version__}"


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input a user can fix: printed as one clear line, exit status 2."""
    from accreditation.evaluate import CentresFileError
    from accreditation.standards import StandardError
    from corelab.dicomio import DicomVolumeError
    from corelab.register import RegisterError
    from corelab.settings import SettingsError
    from expectations.manual import ManualError
    from phantoms.analysis import PhantomLocalisationError
    from phantoms.fill import FillSheetError
    from flows.cli_reports import user_errors as report_user_errors

    return (SettingsError, RegisterError, ManualError, FillSheetError, StandardError, DicomVolumeError,
            PhantomLocalisationError, FileNotFoundError, CentresFileError) + report_user_errors()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from corelab.db import open_store

    try:
        open_store(_settings())
        return args.func(args)
    except _user_errors() as exc:
        print(f"corelab {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
