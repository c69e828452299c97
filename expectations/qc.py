"""QC of trial series against the imaging manual: header table -> GX -> deviations in the store.

Glue between the store and the pure parts (:mod:`expectations.header_table`,
:mod:`expectations.manual`). A batch is validated in one GX run. Re-validating the same series is
idempotent: deviations are keyed by (series, rule); an existing one is updated in place and keeps
its workflow status, and an open one whose rule now passes is marked resolved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

import pandas as pd
import pydicom
from sqlmodel import Session, col, select

from corelab import __version__, audit
from corelab.body_size import BodySizeError, from_header, patient_weight_kg
from corelab.dicomio import DicomVolumeError, Volume, load_volume
from corelab.grid import Grid
from corelab.lifecycle import move_all
from corelab.models import Deviation, Scanner, Series, Site, Study, Subject, Trial, Visit, utcnow
from corelab.queries import accredited_on
from corelab.register import flag_requalification
from corelab.series_files import series_files
from corelab.settings import Settings
from expectations.header_table import COLUMNS, IMAGE_COLUMNS, add_cross_scan_columns, header_row
from expectations.manual import Finding, Manual, validate


@dataclass
class QcOutcome:
    series: int = 0
    deviations_new: int = 0
    deviations_updated: int = 0
    deviations_resolved: int = 0
    findings: list[dict] = field(default_factory=list)
    scanners_flagged: list[str] = field(default_factory=list)
    data_docs: str | None = None

    def as_dict(self) -> dict:
        return {"series": self.series, "deviations_new": self.deviations_new,
                "deviations_updated": self.deviations_updated, "deviations_resolved": self.deviations_resolved,
                "findings": self.findings, "scanners_flagged": self.scanners_flagged, "data_docs": self.data_docs}


def series_headers(session: Session, settings: Settings, series: Series) -> list[pydicom.Dataset]:
    """Headers of the newest version of every instance of a series, read from the spool.

    The files are :func:`corelab.series_files.series_files`, the one list every reader of a
    series uses (phantom analysis and reports too).
    """
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in series_files(settings, session, series)]


def _context(session: Session, series: Series) -> dict:
    site = session.get(Site, series.site_id) if series.site_id else None
    scanner = session.get(Scanner, series.scanner_id) if series.scanner_id else None
    study = session.get(Study, series.study_id) if series.study_id else None
    visit = session.get(Visit, study.visit_id) if study and study.visit_id else None
    subject = session.get(Subject, visit.subject_id) if visit else None
    trial = session.get(Trial, series.trial_id) if series.trial_id else None
    return {"site": site.code if site else None, "scanner": scanner.code if scanner else None,
            "visit": visit.label if visit else None, "subject": subject.pseudonym if subject else None,
            "trial": trial.code if trial else None, "_scanner": scanner, "_trial": trial}


def trial_pet_series(session: Session, trial_code: str, *, only_ids: list[int] | None = None,
                     needing_version: str | None = None, subjects: set[str] | None = None) -> list[Series]:
    """Complete trial PET series of a trial; with ``needing_version``, only those not yet judged
    by that manual version (never checked, or checked by another version)."""
    query = (select(Series).join(Trial, Series.trial_id == Trial.id)
             .join(Study, Series.study_id == Study.id).join(Visit, Study.visit_id == Visit.id)
             .join(Subject, Visit.subject_id == Subject.id)
             .where(Trial.code == trial_code, Series.modality == "PT", Series.kind == "trial",
                    Series.state == "complete").order_by(col(Series.id)))
    if only_ids is not None:
        query = query.where(col(Series.id).in_(only_ids))
    if subjects is not None:
        query = query.where(col(Subject.pseudonym).in_(sorted(subjects)))
    if needing_version is not None:
        query = query.where((Series.qc_state != "done") | (Series.qc_manual_version.is_(None))
                            | (Series.qc_manual_version != needing_version))
    return list(session.exec(query))


OnImage = Callable[[Series, np.ndarray, Grid, object], None]
"""Called with (series, SUV array, its grid, the ``ImageQc``) while the volume is in memory."""
log = logging.getLogger(__name__)


def sul_per_suv(dataset: pydicom.Dataset, weight_kg: float | None) -> float | None:
    """SUL / SUV = lean body mass (James, DICOM LBMJAMES128) / body weight, or None.

    From PatientSize (m) and PatientSex of the header (sex O or absent: the mean of the male and
    female values, :func:`corelab.body_size.from_header`); None when the weight or height is
    missing or implausible: the liver SULmean is then unknown, never guessed.
    """
    try:
        weight, _ = patient_weight_kg(weight_kg, needed_for="SUL")
        size = dataset.get("PatientSize")
        norm, _ = from_header("LBMJAMES128", weight_kg=weight, patient_sex=dataset.get("PatientSex") or None,
                              patient_size=float(size) if size not in (None, "") else None)
    except (BodySizeError, TypeError, ValueError):
        return None
    return norm.value / weight


STANDARD_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
"""ImageOrientationPatient the image checks assume (:class:`corelab.grid.Grid`'s axes)."""
MIN_CT_PLANES, MIN_CT_COVER = 10, 0.8
"""A CT is the study's attenuation CT when it has this many planes and covers this share of the
PET's axial extent (a topogram, or a chest-only CT, is not one)."""


def geometry_problem(volume: Volume) -> str:
    """Why a volume's planes cannot be placed on a :class:`~corelab.grid.Grid`, or ''."""
    if not np.allclose(volume.orientation, STANDARD_AXIAL, atol=1e-3):
        return (f"the slices are not in the standard axial orientation (ImageOrientationPatient "
                f"{[round(v, 3) for v in volume.orientation]})")
    if min(volume.voxel_mm) <= 0:
        return "the slice spacing or pixel spacing is missing or zero"
    if volume.has_gaps:
        return "slices are missing, so the planes do not sit on one grid"
    return ""


def ct_problem(pet: Volume, ct: Volume) -> str:
    """Why a CT cannot serve as the PET's attenuation CT (alignment, liver HU), or ''."""
    problem = geometry_problem(ct)
    if problem:
        return f"the CT: {problem}"
    if ct.array.shape[0] < MIN_CT_PLANES:
        return f"the CT has {ct.array.shape[0]} planes (a localiser?)"
    pet_lo, pet_hi = float(pet.positions_mm[0]), float(pet.positions_mm[-1])
    ct_lo, ct_hi = float(ct.positions_mm[0]), float(ct.positions_mm[-1])
    cover = max(0.0, min(pet_hi, ct_hi) - max(pet_lo, ct_lo)) / max(pet_hi - pet_lo, 1e-6)
    if cover < MIN_CT_COVER:
        return f"the CT covers {100 * cover:.0f} % of the PET's axial extent (at least {100 * MIN_CT_COVER:.0f} % needed)"
    return ""


def study_ct(session: Session, settings: Settings, series: Series, pet: Volume) -> tuple[Volume | None, str]:
    """The attenuation CT (HU) of the PET series' study and '', or None and why there is none."""
    if series.study_id is None:
        return None, "no CT in the study"
    cts = session.exec(select(Series).where(Series.study_id == series.study_id, Series.modality == "CT",
                                            Series.state == "complete").order_by(col(Series.id))).all()
    reason = "no CT in the study"
    for ct in cts:
        try:
            volume = load_volume(series_files(settings, session, ct))
        except (DicomVolumeError, OSError, ValueError) as exc:  # a CT that does not stack: try the next one
            log.warning("CT series %s of study %s does not load (%s)", ct.series_uid, series.study_id, exc)
            reason = "the study's CT does not form one volume"
            continue
        reason = ct_problem(pet, volume)
        if not reason:
            return volume, ""
    return None, reason


def image_columns(session: Session, settings: Settings, series: Series, row: dict, first: pydicom.Dataset,
                  *, on_image: OnImage | None = None) -> dict:
    """The image columns of a PET series (:data:`expectations.header_table.IMAGE_COLUMNS`).

    All None when SUV is not computable (the ``suv_computable`` rule says why, and no image rule
    fires on a null). Loads the PET volume, scales it to SUVbw with the row's factor and hands it,
    with the study's CT, to :func:`expectations.image.analyse_pet`.
    """
    from expectations.image import analyse_pet  # the image analysis loads scipy: only when a PET is judged

    out: dict = dict.fromkeys(IMAGE_COLUMNS)
    factor = row.get("suv_factor_g_per_bq")
    if factor is None:
        return out
    try:
        volume = load_volume(series_files(settings, session, series))
    except (DicomVolumeError, OSError, ValueError) as exc:
        # SUV is known but the slices do not form a volume: the liver check says so (the error's
        # kind only: its text names spool paths, which are no business of the site's note).
        out.update(liver_assessable=False, liver_reason=f"the PET slices do not form one volume ({type(exc).__name__})")
        return out
    problem = geometry_problem(volume)
    if problem and not volume.has_gaps:
        # Positions cannot be trusted: the liver would be searched on the wrong side. Withheld.
        out.update(liver_assessable=False, liver_reason=f"not assessed: {problem}")
        return out
    suv = volume.array * np.float32(factor)
    # Missing slices: the planes above a gap would sit too low, so PET/CT alignment is not judged
    # (series_complete reports the gap); the liver statistics do not depend on it.
    ct, ct_reason = (None, f"the PET: {problem}") if problem else study_ct(session, settings, series, volume)
    try:
        qc = analyse_pet(suv, volume.grid, sul_per_suv=sul_per_suv(first, row.get("weight_kg")),
                         ct_hu=ct.array if ct is not None else None, ct_grid=ct.grid if ct is not None else None)
    except Exception as exc:  # noqa: BLE001 - an image the analysis cannot take must not stop the batch's header QC
        log.exception("image QC of series %s failed", series.series_uid)
        out.update(liver_assessable=False, liver_reason=f"the image analysis failed ({type(exc).__name__})")
        return out
    cols = qc.columns()
    centre = cols.pop("liver_voi_centre_mm", None) or (None, None, None)
    cols.pop("axial_coverage_mm", None)  # the header's (slice extent) stays: it holds without SUV too
    dip = qc.bed_dip or {}
    out.update({k: v for k, v in cols.items() if k in out})
    out.update(liver_reason=qc.liver.reason or "", liver_voi_x_mm=centre[0], liver_voi_y_mm=centre[1],
               liver_voi_z_mm=centre[2], bed_dip_z_from_mm=dip.get("z_from_mm"), bed_dip_z_to_mm=dip.get("z_to_mm"),
               petct_reason=ct_reason if ct is None else qc.petct_reason)
    if on_image is not None:
        try:
            on_image(series, suv, volume.grid, qc)
        except Exception:  # noqa: BLE001 - a figure that cannot be drawn must never undo or block the QC
            log.exception("the QC note figure of series %s could not be drawn", series.series_uid)
    return out


def build_row(session: Session, settings: Settings, series: Series, manual: Manual, *,
              on_image: OnImage | None = None) -> dict:
    """The full header-table row of one series: headers, image checks, store context and register
    columns. ``on_image`` sees the SUV volume and its analysis (the per-series feedback figure is
    drawn from it, so the volume is read once)."""
    ctx = _context(session, series)
    headers = series_headers(session, settings, series)
    row = header_row(headers)
    row.update(image_columns(session, settings, series, row, headers[0], on_image=on_image))
    row.update({k: v for k, v in ctx.items() if not k.startswith("_")})
    scanner = ctx["_scanner"]
    on = series.received_at  # aware UTC: compared with the time a scanner change was flagged
    if manual.accreditation_date == "scan" and row.get("study_date"):
        on = date.fromisoformat(row["study_date"])
    row["scanner_accredited"] = accredited_on(session, scanner.id if scanner else None, standard=manual.standard,
                                              scope=manual.trial, on=on)
    row["software_matches_register"] = bool(scanner) and row["software_versions"] == scanner.software_versions
    return row


def flag_scanner_changes(session: Session, rows: list[dict], *, actor: str = "qc") -> list[str]:
    """Flag registered scanners whose software version changed for re-qualification.

    The first series that shows the change sets ``Scanner.requalification_reason`` (kept until
    new phantom scans pass); an audit event records it. Returns the scanner codes flagged now.
    """
    flagged = []
    for row in rows:
        if row.get("software_matches_register") is not False or not row.get("scanner"):
            continue
        scanner = session.exec(select(Scanner).where(Scanner.code == row["scanner"])).one()
        if scanner.requalification_reason:
            continue
        flag_requalification(session, scanner, (
            f"SoftwareVersions {row['software_versions']!r} in series {row['series_uid']} differs from the "
            f"registered {scanner.software_versions!r}: send new phantom scans for re-qualification"), actor=actor)
        flagged.append(scanner.code)
    return flagged


def header_table(rows: list[dict], context_rows: list[dict] | None = None, *, baseline_label: str = "baseline"):
    """DataFrame of ``rows`` with the cross-scan columns computed against ``context_rows`` too."""
    keep = {r["series_uid"] for r in rows}
    all_rows = list(rows) + [r for r in (context_rows or []) if r["series_uid"] not in keep]
    df = pd.DataFrame(all_rows)
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = None
    df = add_cross_scan_columns(df, baseline_label=baseline_label)
    return df[df["series_uid"].isin(keep)][list(COLUMNS)].reset_index(drop=True)


def _number(row: dict, column: str, fmt: str = ".4g") -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):
        return "missing"
    return f"{value:{fmt}} {COLUMNS.get(column, ('', '', ''))[1]}".strip()


def _observed(finding: Finding, row: dict) -> str:
    rule = finding.rule
    if rule.column == "suv_factor_g_per_bq":
        return row.get("suv_error") or "not computable"
    if rule.column == "liver_assessable":
        return f"not assessable: {row.get('liver_reason') or 'no reason given'}"
    if rule.column == "petct_shift_mm" and finding.observed is not None:
        axes = ", ".join(f"{a} {_number(row, f'petct_shift_{a}_mm', '+.1f')}" for a in "xyz")
        return f"{finding.observed:.1f} mm (PET minus CT: {axes})"
    if rule.column == "bed_dip_planes" and finding.observed:
        z = [row.get(c) for c in ("bed_dip_z_from_mm", "bed_dip_z_to_mm")]
        known = all(isinstance(v, (int, float)) and v == v for v in z)  # a null read by pandas is NaN
        where = f", z {z[0]:.0f} to {z[1]:.0f} mm" if known else ""
        return f"{finding.observed:.0f} planes{where}"
    if rule.also:  # several columns: show each one
        return "; ".join(_number(row, column, "+.3g") for column, _ in rule.checks)
    value = finding.observed
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if finding.rule.column == "header_problems":
        return str(value)
    unit = COLUMNS.get(finding.rule.column, ("", "", ""))[1]
    if isinstance(value, float):
        return f"{value:.4g} {unit}".strip()
    return f"{value} {unit}".strip()


def _json_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (isinstance(v, float) and v != v)}


def record_findings(session: Session, manual: Manual, table: pd.DataFrame, findings: list[Finding],
                    *, actor: str = "qc") -> QcOutcome:
    """Write findings as Deviation rows and resolve open ones that now pass; idempotent.

    Reads the batch's series and deviations in two queries and writes in bulk, so a batch of
    thousands of series costs a few statements, not a few per series.
    """
    rows = {r["series_uid"]: r for r in table.to_dict(orient="records")}
    series_by_uid = {s.series_uid: s for s in session.exec(select(Series).where(col(Series.series_uid).in_(list(rows))))}
    uid_of = {s.id: uid for uid, s in series_by_uid.items()}
    existing = {(d.series_id, d.rule_id): d
                for d in session.exec(select(Deviation).where(col(Deviation.series_id).in_(list(uid_of))))}
    outcome = QcOutcome(series=len(rows))
    failing: set[tuple[int, str]] = set()
    now = utcnow()
    new = []
    for finding in findings:
        series = series_by_uid[finding.series_uid]
        row = rows[finding.series_uid]
        failing.add((series.id, finding.rule.id))
        fields = dict(manual_section=finding.rule.section, manual_version=manual.version,
                      expected=finding.rule.expected(), observed=_observed(finding, row),
                      severity=finding.rule.severity, message=finding.rule.message, corelab_version=__version__)
        dev = existing.get((series.id, finding.rule.id))
        if dev is None:
            new.append(Deviation(series_id=series.id, rule_id=finding.rule.id, created_at=now, updated_at=now,
                                 **fields))
        elif any(getattr(dev, k) != v for k, v in fields.items()):
            for k, v in fields.items():
                setattr(dev, k, v)
            dev.updated_at = now
            outcome.deviations_updated += 1
        outcome.findings.append({"series_uid": finding.series_uid, "site": row.get("site"),
                                 "subject": row.get("subject"), "visit": row.get("visit"),
                                 "rule_id": finding.rule.id, "severity": finding.rule.severity,
                                 "expected": fields["expected"], "observed": fields["observed"]})
    session.add_all(new)
    outcome.deviations_new = len(new)
    resolved = []
    for (series_id, rule_id), dev in existing.items():
        if dev.status == "open" and (series_id, rule_id) not in failing:
            dev.status, dev.updated_at = "resolved", now
            resolved.append({"deviation_id": dev.id, "series_uid": uid_of[series_id], "rule_id": rule_id})
    outcome.deviations_resolved = len(resolved)
    changed = []
    for uid, series in series_by_uid.items():
        row = _json_row(rows[uid])
        # Touch a series only when its judgement changed: a re-validation that finds the same
        # thing leaves the store exactly as it was.
        if (series.header_row, series.qc_state, series.qc_manual_version) != (row, "done", manual.version):
            series.header_row, series.qc_manual_version = row, manual.version
            changed.append(series)
    move_all(session, changed, qc_state="done", at=now, actor=actor, reason=f"judged by {manual.path.name}",
             detail={"manual_version": manual.version})
    judged = len(changed)
    if judged or new or outcome.deviations_updated or resolved:
        audit.append(session, actor=actor, action="qc.batch", entity="trial", entity_id=manual.trial,
                     detail={"manual": manual.path.name, "manual_version": manual.version,
                             "corelab_version": __version__, "series": len(rows), "judged": judged,
                             "new": outcome.deviations_new, "updated": outcome.deviations_updated,
                             "resolved": resolved})
    return outcome


def mark_nothing_to_check(session: Session, series: list[Series], *, actor: str) -> list[Series]:
    """Close the QC of series no imaging-manual rule applies to yet (CT/MR of a trial visit, a
    series of no trial): ``done``, with one audit event. The one place that does it, for the
    receiver's QC start and the QC flow alike; returns the series moved."""
    return move_all(session, [s for s in series if s.qc_state != "done"], qc_state="done", actor=actor,
                    reason="no imaging-manual rule applies to this series")


def qc_series_batch(session: Session, settings: Settings, manual: Manual, series: list[Series], *,
                    docs_dir: Path | None = None, on_image: OnImage | None = None) -> QcOutcome:
    """Validate a batch of trial PET series in one GX run and record the deviations."""
    if not series:
        return QcOutcome()
    rows = [build_row(session, settings, s, manual, on_image=on_image) for s in series]
    outcome_flags = flag_scanner_changes(session, rows)
    subjects = {r["subject"] for r in rows if r.get("subject")}
    context = [s.header_row for s in trial_pet_series(session, manual.trial, subjects=subjects) if s.header_row]
    table = header_table(rows, context, baseline_label=manual.baseline_visit)
    validation = validate(manual, table, docs_dir=docs_dir)
    outcome = record_findings(session, manual, table, validation.findings)
    outcome.scanners_flagged = outcome_flags
    outcome.data_docs = str(validation.data_docs) if validation.data_docs else None
    return outcome
