"""The per-series QC note: what the core lab found in one trial PET series, for its site.

Sent right after the series' QC (see :func:`services.reports.publish_series_feedback`): whether
the scan is evaluable (no unresolved major deviation), each deviation with the manual section
and what to do, the liver reference and the other image checks, and the coronal MIP with the
liver VOI and three planes through it. Only the series' own values are read, and the subject
appears by pseudonym only: the note goes to that site.
"""

from __future__ import annotations

import hashlib

from sqlmodel import Session, col, select

from corelab.models import Deviation, Scanner, Series, Site, Study, Subject, Trial, Visit
from reports.render import ReportError, ReportSpec

__all__ = ["series_qc_report", "series_key", "uid_digest", "OUTSTANDING"]

OUTSTANDING = ("open", "queried")
"""Deviation states that still stand: a major one of these makes the scan not evaluable."""
FIGURE = "liver_voi"


def uid_digest(series_uid: str) -> str:
    """The short hash of a series UID that ends its note's key (and so its path)."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:10]


def series_key(series: Series, pseudonym: str | None, visit: str | None) -> str:
    """Report key: pseudonym, visit and a short hash of the series UID (UIDs are long and a
    subject's visit may hold more than one PET series)."""
    return "_".join(part for part in (pseudonym, visit, uid_digest(series.series_uid)) if part)


def _value(row: dict, column: str):
    value = row.get(column)
    return None if isinstance(value, float) and value != value else value


def _image_checks(row: dict) -> dict:
    """The liver VOI and image-check values of the stored header row (None: not measured)."""
    keys = ("liver_assessable", "liver_reason", "liver_suv_mean", "liver_suv_sd", "liver_cov_pct", "liver_sul_mean",
            "liver_voi_x_mm", "liver_voi_y_mm", "liver_voi_z_mm", "liver_sul_diff_vs_baseline_pct",
            "liver_sul_diff_vs_baseline", "axial_coverage_mm", "bed_dip_planes", "bed_dip_z_from_mm",
            "bed_dip_z_to_mm", "petct_shift_mm", "petct_shift_x_mm", "petct_shift_y_mm", "petct_shift_z_mm",
            "petct_reason", "suv_error")
    out = {k: _value(row, k) for k in keys}
    out["measured"] = out["liver_assessable"] is not None
    return out


def series_qc_report(session: Session, series_id: int, *, figure_png: bytes | None = None) -> ReportSpec:
    """The QC note of one judged trial PET series.

    Parameters
    ----------
    series_id : int
    figure_png : bytes, optional
        The MIP and VOI planes (:func:`reports.image_figures.series_qc_png`), drawn while the
        volume was in memory; None when there is none (SUV not computable). Its sha256 is part
        of the content, so a different picture makes a new version and the same one does not.
    """
    series = session.get(Series, series_id)
    if series is None or series.modality != "PT" or series.kind != "trial":
        raise ReportError(f"series {series_id} is no trial PET series; only those get a QC note")
    if series.qc_state != "done" or not series.header_row:
        raise ReportError(f"series {series.series_uid} has not been judged yet (QC state {series.qc_state})")
    site = session.get(Site, series.site_id) if series.site_id else None
    study = session.get(Study, series.study_id) if series.study_id else None
    visit = session.get(Visit, study.visit_id) if study and study.visit_id else None
    subject = session.get(Subject, visit.subject_id) if visit else None
    scanner = session.get(Scanner, series.scanner_id) if series.scanner_id else None
    trial = session.get(Trial, series.trial_id) if series.trial_id else None
    devs = session.exec(select(Deviation).where(Deviation.series_id == series.id)
                        .order_by(col(Deviation.severity), col(Deviation.rule_id))).all()
    deviations = [{"rule_id": d.rule_id, "manual_section": d.manual_section, "severity": d.severity,
                   "expected": d.expected, "observed": d.observed, "status": d.status, "message": d.message}
                  for d in devs if d.status != "resolved"]
    blocking = [d["rule_id"] for d in deviations if d["severity"] == "major" and d["status"] in OUTSTANDING]
    row = series.header_row
    pseudonym = subject.pseudonym if subject else None
    data = {
        "site": {"code": site.code if site else "", "name": site.name if site else ""},
        "trial": trial.code if trial else "",
        "manual_version": series.qc_manual_version,
        "subject": pseudonym or "",
        "visit": visit.label if visit else "",
        "series_uid": series.series_uid,
        "scanner": {"code": scanner.code if scanner else "",
                    "model": f"{scanner.manufacturer} {scanner.model}".strip() if scanner else ""},
        "evaluable": not blocking,
        "blocking": blocking,
        "deviations": deviations,
        "image": _image_checks(row),
        "figure_sha256": hashlib.sha256(figure_png).hexdigest() if figure_png else None,
        # not hashed: a re-judgement that finds the same keeps the note's version
        "meta": {"received_at": series.received_at.isoformat() if series.received_at else None,
                 "qc_at": series.qc_at.isoformat() if series.qc_at else None},
    }
    figures = {FIGURE: (lambda: figure_png)} if figure_png else {}
    visit_label = data["visit"] or "no visit"
    return ReportSpec(kind="series_qc", key=series_key(series, pseudonym, visit.label if visit else None),
                      title=f"Series QC note: {pseudonym or 'unknown subject'}, {visit_label}",
                      template="series_qc.html.j2", data=data, figures=figures,
                      site_id=series.site_id, trial_id=series.trial_id)
