"""Scanner accreditation report: gathers the saved phantom results of one scanner's accreditation.

Everything shown comes from the store (the register's accreditation, its evidence: the NEMA IEC
and uniform-cylinder :class:`~corelab.models.PhantomResult` with their checks and fill-sheet
provenance) and from the phantom images in the spool for the three-plane views and the sphere
assignment (the axial plane with each sphere's name at its fitted centre). The images are read
through :func:`corelab.series_files.series_files`: a re-sent slice replaces its earlier version.
A withheld NEMA IEC result (localisation uncertain) is shown as such and decides nothing.
Nothing is computed here beyond choosing, naming and formatting.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from functools import cache, partial

import matplotlib.pyplot as plt
from sqlmodel import Session, col, select

from accreditation.evaluate import WITHHELD, AxialPlane, sphere_plane
from accreditation.register import effective_status
from accreditation.standards import StandardError, load_standard
from corelab.dicomio import Volume, load_volume
from corelab.models import Accreditation, PhantomResult, Scanner, Series, Site
from corelab.series_files import series_files
from corelab.settings import Settings
from phantoms.geometry import sphere_volume_ml
from reports.render import ReportError, ReportSpec
from reports.report_figures import (METRIC_LABELS, WITHHELD_COLOUR, axial_profile, phantom_planes, recovery_curve,
                                    sphere_assignment)

__all__ = ["accreditation_report", "report_key", "sphere_assignment_figure", "series_volume"]

_STATUS = {
    "accredited": ("ACCREDITED", "pass"),
    "failed": ("NOT ACCREDITED", "fail"),
    "expired": ("EXPIRED", "fail"),
    "suspended": ("SUSPENDED", "warn"),
    "pending": ("PENDING", "warn"),
}
_ACTION = {
    "accredited": "No action needed. Send new uniform-cylinder (calibration) scans before the end of the validity "
                  "period, and new NEMA IEC scans once a year, or after any hardware or software change.",
    "failed": "Do not scan trial subjects on this scanner. Check the reconstruction protocol against the standard "
              "(iterations, subsets, filter, matrix) and the dose calibrator cross-calibration, then send new "
              "phantom scans with their fill sheets.",
    "expired": "Do not scan trial subjects on this scanner until new NEMA IEC and uniform-cylinder phantom scans "
               "have passed.",
    "suspended": "The scanner changed since it was accredited. Send new NEMA IEC and uniform-cylinder phantom "
                 "scans; trial scans may resume once they pass.",
    "pending": "Send the missing phantom scan (NEMA IEC or uniform cylinder) with its fill sheet.",
}
_ACTION_WITHHELD = ("No new scan is needed for now: the verdict on the NEMA IEC scan is withheld because the "
                    "spheres could not be named with confidence from the image. The core lab places the sphere "
                    "centres by hand and issues a new version of this report; it will ask if it needs the "
                    "phantom's position on the couch.")
_PATH = re.compile(r"(/[^\s,]+/)([^/\s,]+)")


def report_key(scanner_code: str, standard: str) -> str:
    return f"{scanner_code}_{standard}"


def _short(text: str) -> str:
    """Provenance text with folder paths cut to the file name (spool paths mean nothing to a site)."""
    return _PATH.sub(lambda m: m.group(2), text or "")


def _iso(value) -> str | None:
    return value.isoformat() if isinstance(value, (dt.date, dt.datetime)) else value


def _fill_rows(fill: dict) -> list[dict]:
    values = fill.get("values_kbq_ml") or {}
    filled = fill.get("fill_kbq_ml") or {}
    names = {"sphere_kbq_ml": "spheres", "background_kbq_ml": "background", "lung_kbq_ml": "lung insert",
             "concentration_kbq_ml": "cylinder"}
    return [{"quantity": names.get(k, k), "filled_kbq_ml": filled.get(k), "at_scan_kbq_ml": v,
             "source": _short((fill.get("provenance") or {}).get(k, ""))} for k, v in values.items()]


def _fill(result: PhantomResult) -> dict:
    f = result.fill or {}
    return {"rows": _fill_rows(f), "radionuclide": f.get("radionuclide"), "half_life_s": f.get("half_life_s"),
            "reference_time": f.get("reference_time"), "scan_time": f.get("scan_time"),
            "decay_factor": f.get("decay_factor"),
            "scan_time_source": _short((f.get("provenance") or {}).get("scan_time", "")),
            "half_life_source": _short((f.get("provenance") or {}).get("half_life_s", ""))}


def _withheld(result: PhantomResult) -> dict | None:
    """``{reason, details}`` of a withheld result (from its stored metrics); None for any other."""
    if result.verdict != WITHHELD:
        return None
    w = (result.metrics or {}).get("withheld") or {}
    return {"reason": w.get("reason", "localisation uncertain"), "details": list(w.get("details") or [])}


def _withheld_note(kind: str, scan_date: str | None, result_id: int, withheld: dict) -> str:
    """One line on a withheld result: which scan, why, with the numbers."""
    details = f" ({'; '.join(withheld['details'])})" if withheld["details"] else ""
    return (f"{'NEMA IEC' if kind == 'nema_iec' else 'uniform cylinder'} scan of {scan_date} (result {result_id}): "
            f"withheld: {withheld['reason']}{details}")


def _common(result: PhantomResult, series: Series) -> dict:
    return {"result_id": result.id, "series_uid": series.series_uid, "scan_date": _iso(result.scan_date),
            "analysed_on": _iso(result.analysed_at.date()), "verdict": result.verdict, "withheld": _withheld(result),
            "standard": result.standard, "standard_version": result.standard_version,
            "corelab_version": result.corelab_version, "input_sha256": result.input_sha256,
            "notes": list((result.metrics or {}).get("notes") or []), "fill": _fill(result)}


def _nema(result: PhantomResult, series: Series) -> dict:
    m = result.metrics or {}
    checks = (m.get("checks") or {}).get("checks") or []
    by_key = {(c["metric"], c["diameter_mm"]): c for c in checks}
    metrics = [k for k in ("rc_mean", "rc_max", "rc_peak")]
    spheres = []
    for s in m.get("spheres", []):
        row = {"diameter_mm": s["diameter_mm"], "percent_contrast": s.get("percent_contrast"),
               "background_variability_pct": s.get("background_variability_pct"), "detected": s.get("detected"),
               "centre_mm": s.get("centre_mm"), "metrics": {}}
        for k in metrics:
            c = by_key.get((k, s["diameter_mm"]))
            row["metrics"][k] = {"value": s.get(k), "low": c["low"] if c else None, "high": c["high"] if c else None,
                                 "margin": c["margin"] if c else None, "passed": c["passed"] if c else None,
                                 "verified": c["verified"] if c else None}
        spheres.append(row)
    withheld = result.verdict == WITHHELD
    if withheld:  # the values may belong to other spheres: shown, never marked pass or fail
        for row in spheres:
            for cell in row["metrics"].values():
                cell["passed"] = None
    failures = [f"{METRIC_LABELS.get(c['metric'], c['metric'])} {c['diameter_mm']:g} mm sphere: {c['value']:.3f}, "
                f"band {c['low']:.2f}-{c['high']:.2f} (margin {c['margin']:+.3f})"
                for c in checks if not c["passed"] and c["verified"] and not withheld]
    return {**_common(result, series), "spheres": spheres, "metrics": metrics,
            "banded": [k for k in metrics if any(c["metric"] == k for c in checks)],
            "metric_labels": {k: METRIC_LABELS[k] for k in metrics}, "checks": checks, "failures": failures,
            "n_checks": sum(1 for c in checks if c["verified"]),
            "n_failed": len(failures), "lung_residual_pct": m.get("lung_residual_pct"),
            "localisation_uncertain": bool(m.get("localisation_uncertain")),
            "rc_peak_placement": m.get("rc_peak_placement"), "localisation": m.get("localisation"),
            "fit_rms_mm": m.get("fit_rms_mm"), "n_background_rois": m.get("n_background_rois"),
            "sphere_kbq_ml": m.get("sphere_kbq_ml"), "background_kbq_ml": m.get("background_kbq_ml")}


def _cylinder(result: PhantomResult, series: Series) -> dict:
    m = result.metrics or {}
    check = next(iter((m.get("checks") or {}).get("checks") or []), None)
    failures = [] if check is None or check["passed"] else [
        f"SUV bias {check['value']:+.1f} %, band {check['low']:+g} to {check['high']:+g} % "
        f"(margin {check['margin']:+.1f} %)"]
    return {**_common(result, series), "measured_kbq_ml": m.get("measured_kbq_ml"), "true_kbq_ml": m.get("true_kbq_ml"),
            "calibration_bias_pct": m.get("calibration_bias_pct"), "suv_mean": m.get("suv_mean"),
            "cov_pct": m.get("cov_pct"), "max_nonuniformity_pct": m.get("max_nonuniformity_pct"),
            "min_nonuniformity_pct": m.get("min_nonuniformity_pct"), "band": [check["low"], check["high"]] if check
            else None, "margin": check["margin"] if check else None, "passed": check["passed"] if check else None,
            "failures": failures, "slice_z_mm": m.get("slice_z_mm") or [],
            "slice_means_kbq_ml": m.get("slice_means_kbq_ml") or [], "centre_mm": m.get("centre_mm"),
            "voi_radius_mm": m.get("voi_radius_mm"), "voi_length_mm": m.get("voi_length_mm"),
            "radius_mm": m.get("radius_mm"), "length_mm": m.get("length_mm")}


def _evidence(session: Session, scanner: Scanner, acc: Accreditation) -> dict[str, tuple[PhantomResult, Series]]:
    ids = list(acc.evidence or [])
    rows = session.exec(select(PhantomResult, Series).join(Series, PhantomResult.series_id == Series.id)
                        .where(PhantomResult.scanner_id == scanner.id)
                        .order_by(col(PhantomResult.scan_date).desc(), col(PhantomResult.id).desc())).all()
    out: dict[str, tuple[PhantomResult, Series]] = {}
    for r, s in sorted(rows, key=lambda rs: rs[0].id not in ids):  # the accreditation's evidence first
        out.setdefault(r.kind, (r, s))
    return out


def _withheld_elsewhere(session: Session, scanner: Scanner,
                        shown: dict[str, tuple[PhantomResult, Series]]) -> list[str]:
    """Notes on the scanner's withheld results newer than the result shown for their kind (not counted)."""
    rows = session.exec(select(PhantomResult).where(PhantomResult.scanner_id == scanner.id,
                                                    PhantomResult.verdict == WITHHELD)
                        .order_by(col(PhantomResult.id))).all()
    return [_withheld_note(r.kind, _iso(r.scan_date), r.id, _withheld(r)) + "; not counted" for r in rows
            if r.kind not in shown or shown[r.kind][0].id < r.id]


# --- figures: drawn from the saved data (and the images, for the planes) -----------------------

def series_volume(settings: Settings, session: Session, series_id: int) -> Volume:
    """The image volume of a stored series, from the newest version of each of its instances."""
    return load_volume(series_files(settings, session, session.get(Series, series_id)))


def _assignment_spheres(metrics: Mapping, checks: Sequence[Mapping]) -> list[dict]:
    """Per sphere: name, fitted centre, the volume measured there and the nominal one, verdict."""
    check = metrics.get("identity_check") or {}
    measured, nominal = check.get("measured_volume_ml") or {}, check.get("nominal_volume_ml") or {}
    out = []
    for s in metrics.get("spheres") or []:
        d = float(s["diameter_mm"])
        key = f"{d:g}"
        verdicts = [c["passed"] for c in checks if c.get("diameter_mm") == s["diameter_mm"] and c.get("verified")]
        out.append({"diameter_mm": d, "centre_mm": s.get("centre_mm"),
                    "measured_volume_ml": measured.get(key, s.get("voi_volume_ml")),
                    "nominal_volume_ml": nominal.get(key, sphere_volume_ml(d)),
                    "passed": all(verdicts) if verdicts else None})
    return out


def sphere_assignment_figure(metrics: Mapping, checks: Sequence[Mapping], plane: AxialPlane | None, *,
                             withheld: str | None = None):
    """The sphere-assignment figure of a NEMA IEC result: the axial plane through the sphere
    centres with each sphere's name at its fitted centre (:func:`reports.report_figures.sphere_assignment`).

    Parameters
    ----------
    metrics : mapping
        The analysis result (``NemaIecResult.to_dict()``, or the stored metrics).
    checks : sequence of mapping
        The verdict's checks (colour of each sphere).
    plane : AxialPlane
        From :func:`accreditation.evaluate.sphere_plane`.
    withheld : str, optional
        The reason the verdict is withheld, for the title.
    """
    fig, ax = plt.subplots(figsize=(4.4, 4.6), constrained_layout=True)
    if plane is None:
        ax.text(0.5, 0.5, "no sphere centres in the result", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    sphere_assignment(ax, plane.image_kbq_ml, plane.origin_mm, plane.pixel_mm, plane.z_mm,
                      _assignment_spheres(metrics, checks), ring_centre_mm=metrics.get("ring_centre_mm"),
                      withheld=withheld)
    return fig


def _fig_recovery(nema: dict):
    fig, axes = plt.subplots(1, len(nema["metrics"]), figsize=(7.2, 2.5), constrained_layout=True)
    spheres = [{"diameter_mm": s["diameter_mm"], **{k: v["value"] for k, v in s["metrics"].items()}}
               for s in nema["spheres"]]
    for ax, metric in zip(axes, nema["metrics"]):
        recovery_curve(ax, spheres, nema["checks"], metric)
    return fig


def _fig_profile(cyl: dict):
    fig, ax = plt.subplots(figsize=(7.2, 2.3), constrained_layout=True)
    axial_profile(ax, cyl["slice_z_mm"], cyl["slice_means_kbq_ml"], cyl["true_kbq_ml"],
                  band_pct=tuple(cyl["band"]) if cyl["band"] else None)
    return fig


def _fig_assignment(volume, metrics: dict, withheld: dict | None):
    plane = sphere_plane(volume(), metrics)
    checks = (metrics.get("checks") or {}).get("checks") or []
    return sphere_assignment_figure(metrics, checks, plane, withheld=withheld["reason"] if withheld else None)


def _fig_planes(volume, kind: str, part: dict):
    volume = volume()
    array = volume.array / 1000.0  # Bq/mL -> kBq/mL
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.7), constrained_layout=True)
    if kind == "nema_iec":
        vois = [{"shape": "sphere", "centre_mm": s["centre_mm"], "radius_mm": s["diameter_mm"] / 2,
                 "label": f"{s['diameter_mm']:g}",
                 "passed": all(v["passed"] is not False or not v["verified"] for v in s["metrics"].values()),
                 "colour": WITHHELD_COLOUR if part.get("withheld") else None}
                for s in part["spheres"] if s.get("centre_mm")]
        through = max(part["spheres"], key=lambda s: s["diameter_mm"])["centre_mm"]
    else:
        vois = [{"shape": "cylinder", "centre_mm": part["centre_mm"], "radius_mm": part["voi_radius_mm"],
                 "length_mm": part["voi_length_mm"], "label": "VOI", "passed": part["passed"] is not False}]
        through = part["centre_mm"]
    phantom_planes(axes, array, volume.voxel_mm, (volume.origin_mm[0], volume.origin_mm[1], volume.origin_mm[2]),
                   through, vois)
    return fig


def accreditation_report(session: Session, scanner_code: str, *, settings: Settings, standard: str | None = None,
                         scope: str | None = None, today: dt.date | None = None) -> ReportSpec:
    """The accreditation report of one scanner for one standard (and scope).

    Parameters
    ----------
    scanner_code : str
    settings : Settings
        To find the phantom images in the spool.
    standard, scope : str, optional
        Which accreditation, when the scanner has several (default: the first by standard).
    today : date, optional
        The day the status and days left are judged on.
    """
    today = today or dt.date.today()
    scanner = session.exec(select(Scanner).where(Scanner.code == scanner_code)).first()
    if scanner is None:
        raise ReportError(f"no scanner {scanner_code!r}; `corelab accreditation list` names them")
    site = session.get(Site, scanner.site_id)
    query = select(Accreditation).where(Accreditation.scanner_id == scanner.id)
    if standard:
        query = query.where(Accreditation.standard == standard)
    if scope:
        query = query.where(Accreditation.scope == scope)
    acc = session.exec(query.order_by(col(Accreditation.standard), col(Accreditation.scope))).first()
    if acc is None:
        raise ReportError(f"scanner {scanner_code} has no accreditation{' for ' + standard if standard else ''} yet: "
                          "it needs analysed phantom scans")
    try:
        std = load_standard(acc.standard)
        std_source = std.source.split(";")[0].strip()
        std_version = std.version
    except StandardError:
        std_source, std_version = "", ""
    status = effective_status(acc, today=today)
    evidence = _evidence(session, scanner, acc)
    nema = _nema(*evidence["nema_iec"]) if "nema_iec" in evidence else None
    cyl = _cylinder(*evidence["uniform_cylinder"]) if "uniform_cylinder" in evidence else None
    headline, css = _STATUS.get(status, (status.upper(), "warn"))
    failures = (nema["failures"] if nema else []) + (cyl["failures"] if cyl else [])
    nema_withheld = nema["withheld"] if nema else None
    withheld_notes = ([_withheld_note("nema_iec", nema["scan_date"], nema["result_id"], nema_withheld)]
                      if nema_withheld else []) + _withheld_elsewhere(session, scanner, evidence)
    if status == "accredited":
        summary = (f"Meets {acc.standard} ({std_version}) for {acc.scope_kind} {acc.scope}; valid "
                   f"{_iso(acc.valid_from)} to {_iso(acc.valid_until)}.")
    elif status == "failed":
        summary = f"Does not meet {acc.standard} ({std_version}): {len(failures)} check(s) outside their bands."
    elif status == "expired":
        summary = f"The accreditation for {acc.standard} ended on {_iso(acc.valid_until)}."
    elif status == "suspended":
        summary = f"Suspended: {scanner.requalification_reason}."
    else:
        missing = [k for k, v in (("a NEMA IEC result", nema and not nema_withheld),
                                  ("a uniform-cylinder result", cyl)) if not v]
        summary = "Waiting for " + " and ".join(missing) + (
            f": the verdict on the NEMA IEC scan of {nema['scan_date']} is withheld ({nema_withheld['reason']})."
            if nema_withheld else ".")
    action = _ACTION.get(status, "")
    if status == "pending" and nema_withheld:
        action = _ACTION_WITHHELD + ("" if cyl else " " + _ACTION["pending"])
    data = {
        "site": {"code": site.code, "name": site.name},
        "scanner": {"code": scanner.code, "manufacturer": scanner.manufacturer, "model": scanner.model,
                    "serial_number": scanner.serial_number, "software_versions": scanner.software_versions},
        "accreditation": {"standard": acc.standard, "standard_version": std_version, "standard_source": std_source,
                          "scope_kind": acc.scope_kind, "scope": acc.scope, "status": status,
                          "valid_from": _iso(acc.valid_from), "valid_until": _iso(acc.valid_until),
                          "requalification_reason": scanner.requalification_reason},
        "verdict": {"headline": headline, "css": css, "summary": summary, "failures": failures,
                    "withheld": withheld_notes, "action": action},
        "nema": nema, "cylinder": cyl,
        # not hashed: a new day alone does not make a new version (a change of status does)
        "meta": {"judged_on": today.isoformat(),
                 "days_left": (acc.valid_until - today).days if acc.valid_until else None},
    }
    read_volume = cache(partial(series_volume, settings, session))  # each read once, when a figure first needs it

    def volume_of(series_id: int):
        return partial(read_volume, series_id)

    figures = {}
    if nema:
        nema_volume = volume_of(evidence["nema_iec"][1].id)
        figures["recovery"] = partial(_fig_recovery, nema)
        figures["sphere_assignment"] = partial(_fig_assignment, nema_volume, evidence["nema_iec"][0].metrics or {},
                                               nema["withheld"])
        figures["nema_planes"] = partial(_fig_planes, nema_volume, "nema_iec", nema)
    if cyl:
        figures["profile"] = partial(_fig_profile, cyl)
        figures["cylinder_planes"] = partial(_fig_planes, volume_of(evidence["uniform_cylinder"][1].id),
                                             "uniform_cylinder", cyl)
    return ReportSpec(kind="accreditation", key=report_key(scanner.code, acc.standard),
                      title=f"Scanner accreditation: {scanner.code} ({acc.standard})", template="accreditation.html.j2",
                      data=data, figures=figures, site_id=site.id)
