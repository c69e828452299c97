"""``corelab`` commands for scanners: phantom analysis, the accreditation register, SUV."""

from __future__ import annotations

import sys
from pathlib import Path

from flows.cli_common import cli_actor, prepare_prefect_env, print_result, session, settings
from services import lookup


def cmd_accreditation_list(args) -> int:
    with session() as s:
        rows, expiring = lookup.accreditation_overview(s, within_days=args.within_days)
    print_result(args, rows, rows, ["scanner", "site", "standard", "scope", "status", "valid_from", "valid_until",
                                    "expires_in_days"])
    if not args.json:
        for e in expiring:
            when = (f"expired {-e['days_left']} day(s) ago" if e["days_left"] < 0
                    else f"expires in {e['days_left']} day(s)")
            print(f"warning: {e['scanner']} {e['standard']} ({e['scope']}) {when} on {e['valid_until']}: "
                  f"{e['due']}")
    return 0


def cmd_accreditation_show(args) -> int:
    with session() as s:
        record = lookup.scanner_record(s, args.scanner)
    if record is None:
        print(f"corelab accreditation show: no scanner {args.scanner!r}; `corelab accreditation list` "
              "names the scanners", file=sys.stderr)
        return 2
    if args.json:
        print_result(args, record)
        return 0
    print_result(args, record["scanner"])
    print("\naccreditations:")
    print_result(args, record["accreditations"], record["accreditations"],
                 ["standard", "scope", "status", "valid_from", "valid_until", "days_left"])
    print("\nphantom results (newest first):")
    print_result(args, record["phantom_results"], record["phantom_results"],
                 ["id", "kind", "verdict", "scan_date", "standard", "standard_version", "corelab_version",
                  "input_sha256"])
    return 0


def cmd_phantom_analyze(args) -> int:
    result = lookup.analyse_phantom_folder(Path(args.path), Path(args.fill), standard=args.standard,
                                           centres=Path(args.centres) if args.centres else None,
                                           rc_peak=args.rc_peak)
    print_result(args, result)
    return 0 if result.get("verdict") == "pass" else 1


def _read_limited(path: Path) -> bytes:
    """The file's bytes, at most one byte over the fill sheet limit (the use case says it is too large)."""
    from corelab.limits import MAX_FILL_SHEET_BYTES

    with open(path, "rb") as fh:
        return fh.read(MAX_FILL_SHEET_BYTES + 1)


def cmd_phantom_fill(args) -> int:
    """Attach a fill sheet to a received phantom series, re-queue it and start its accreditation per --qc.

    The core lab's command: it may replace a sheet the series has (a site, in the portal, may not).
    Only a series this command claims itself is started (:func:`services.phantoms.hand_over`)."""
    from phantoms.fill import FillSheetError
    from services import phantoms

    config = settings()
    data = _read_limited(Path(args.file))
    try:
        with session(config) as s:
            result = phantoms.attach_fill_sheet(s, config, phantoms.series_id_of(s, args.series_uid), data,
                                                actor=cli_actor())
    except (FillSheetError, phantoms.FillSheetRefused) as exc:
        print(f"corelab phantom fill: {exc}; nothing was changed", file=sys.stderr)
        return 2
    on_complete = None
    if args.qc != "queue":
        prepare_prefect_env(config)
        from flows.receive import QcStarter

        on_complete = QcStarter(config, mode=args.qc)
    handed = phantoms.hand_over(config, result, on_complete)
    if on_complete is not None:
        on_complete.join()
    with session(config) as s:
        state = phantoms.accreditation_state(s, result["series_id"])
    out = {"series_uid": result["series_uid"], "fill_sheet": result["kind"], "sha256": result["sha256"],
           "replaced": result["replaced"] or "(none)", "qc_state": state["qc_state"],
           "verdict": state["verdict"] or "(not analysed yet)"}
    if args.qc == "deployment" and handed:
        out["next"] = "handed to the accredit-scanners deployment: its run in the Prefect UI gives the verdict"
    elif args.qc == "queue" or not handed:
        out["next"] = {"pending": "the DICOM node (corelab serve/receive) starts its accreditation within seconds; "
                                  "without a node, the next accredit-scanners run analyses it (or run this command "
                                  "again with --qc flow)",
                       "queued": "claimed by another starter (the DICOM node's ticker): its accreditation runs "
                                 "there; `corelab series list` shows when it is done",
                       "running": "being analysed by another run: `corelab series list` shows when it is done"}.get(
                           state["qc_state"], "accreditation starts when the series is complete")
    print_result(args, out)
    if args.qc == "flow" and handed:
        return 0 if state["qc_state"] == "done" else 1
    return 0


def _normalised(e: dict) -> str:
    n = e.get("normalisation") or {}
    if not n:
        return ""
    value = "?" if n.get("value") is None else f"{n['value']:.4g} {n['unit']}"
    return f"{e.get('suv_type')}: {n['name']} {value}" + (f" (sex {n['sex_used']})" if n.get("sex_used") else "")


def _suv_row(e: dict) -> dict:
    failed = e.get("error") or "unreadable" in e
    return {"series_uid": e.get("series_uid", e.get("file")), "units": e.get("units") or "",
            "factor_g_per_bq": "" if failed else
            (f"{e['factor_g_per_bq']:.6g}" if e.get("factor_g_per_bq") else "varies per slice"),
            "suv_min/mean/max": "" if failed else f"{e['suv_min']:.2f} / {e['suv_mean']:.2f} / {e['suv_max']:.2f}",
            "normalisation": "" if e.get("error") else _normalised(e),
            "problem": (e["error"]["message"] if e.get("error") else e.get("unreadable", "")
                        or "; ".join(w["message"] for w in e.get("warnings", [])))}


def cmd_suv(args) -> int:
    path = Path(args.path)
    entries = lookup.suv_of_path(path)
    if entries is None:
        print(f"corelab suv: no files in {path}", file=sys.stderr)
        return 2
    if args.json:
        # Each entry carries suv_type, normalisation {name, value, unit, sex_used, male_female}
        # and warnings [{code, message}] (SuvResult.to_dict).
        print_result(args, entries)
    else:
        rows = [_suv_row(e) for e in entries]
        print_result(args, rows, rows, ["series_uid", "units", "factor_g_per_bq", "suv_min/mean/max",
                                        "normalisation", "problem"])
    return 0 if all(not e.get("error") and "unreadable" not in e for e in entries) else 1


def add_commands(sub, common) -> None:
    """Add suv, accreditation and phantom to the ``corelab`` parser."""
    p = sub.add_parser("suv", parents=[common], help="SUVbw factors and SUV min/mean/max of PET series in a file or folder")
    p.add_argument("path", help="a DICOM file or a folder (searched recursively)")
    p.set_defaults(func=cmd_suv)

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
    q = ssub.add_parser("fill", parents=[common],
                        help="attach the fill sheet to a received phantom series (one sent over DICOM has none) "
                             "and re-queue its accreditation")
    q.add_argument("series_uid", metavar="SERIES_UID", help="the phantom series (`corelab series list`)")
    q.add_argument("file", metavar="FILE", help="its fill sheet (YAML, see the README)")
    q.add_argument("--qc", choices=["flow", "deployment", "queue"], default="queue",
                   help="how to start its accreditation: flow (run accredit-scanners now, in this process; exit 1 "
                        "when it could not be analysed), deployment (hand it to the prefect.yaml deployment), queue "
                        "(leave it pending: the DICOM node's ticker or the next accredit-scanners run starts it); "
                        "default queue. A series whose accreditation is queued or running is refused: wait for it "
                        "to end, then give the sheet")
    q.set_defaults(func=cmd_phantom_fill)
