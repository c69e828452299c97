"""QC of trial series against the imaging manual: header table -> GX -> deviations in the store.

Glue between the store and the pure parts (:mod:`expectations.header_table`,
:mod:`expectations.manual`). A batch is validated in one GX run. Re-validating the same series is
idempotent: deviations are keyed by (series, rule); an existing one is updated in place and keeps
its workflow status, and an open one whose rule now passes is marked resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import pandas as pd
import pydicom
from sqlmodel import Session, col, select

from corelab import __version__, audit
from corelab.models import Deviation, Instance, Scanner, Series, Site, Study, Subject, Trial, Visit, utcnow
from corelab.queries import accredited_on
from corelab.settings import Settings
from expectations.header_table import COLUMNS, add_cross_scan_columns, header_row
from expectations.manual import Finding, Manual, validate


@dataclass
class QcOutcome:
    series: int = 0
    deviations_new: int = 0
    deviations_updated: int = 0
    deviations_resolved: int = 0
    findings: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"series": self.series, "deviations_new": self.deviations_new,
                "deviations_updated": self.deviations_updated, "deviations_resolved": self.deviations_resolved,
                "findings": self.findings}


def series_headers(session: Session, settings: Settings, series: Series) -> list[pydicom.Dataset]:
    """Headers of the newest version of every instance of a series, read from the spool."""
    newest: dict[str, Instance] = {}
    for inst in session.exec(select(Instance).where(Instance.series_id == series.id)):
        if inst.sop_instance_uid not in newest or inst.version > newest[inst.sop_instance_uid].version:
            newest[inst.sop_instance_uid] = inst
    return [pydicom.dcmread(settings.data_dir / inst.path, stop_before_pixels=True) for inst in newest.values()]


def _context(session: Session, series: Series) -> dict:
    site = session.get(Site, series.site_id) if series.site_id else None
    scanner = session.get(Scanner, series.scanner_id) if series.scanner_id else None
    study = session.get(Study, series.study_id) if series.study_id else None
    visit = session.get(Visit, study.visit_id) if study and study.visit_id else None
    subject = session.get(Subject, visit.subject_id) if visit else None
    trial = session.get(Trial, subject.trial_id) if subject else None
    return {"site": site.code if site else None, "scanner": scanner.code if scanner else None,
            "visit": visit.label if visit else None, "subject": subject.pseudonym if subject else None,
            "trial": trial.code if trial else None, "_scanner": scanner, "_trial": trial}


def trial_pet_series(session: Session, trial_code: str, *, only_ids: list[int] | None = None) -> list[Series]:
    query = (select(Series).join(Study, Series.study_id == Study.id).join(Visit, Study.visit_id == Visit.id)
             .join(Subject, Visit.subject_id == Subject.id).join(Trial, Subject.trial_id == Trial.id)
             .where(Trial.code == trial_code, Series.modality == "PT", Series.kind == "trial",
                    Series.state == "complete").order_by(col(Series.id)))
    if only_ids is not None:
        query = query.where(col(Series.id).in_(only_ids))
    return list(session.exec(query))


def build_row(session: Session, settings: Settings, series: Series) -> dict:
    """The full header-table row of one series: headers, store context and register columns."""
    ctx = _context(session, series)
    row = header_row(series_headers(session, settings, series))
    row.update({k: v for k, v in ctx.items() if not k.startswith("_")})
    scanner, trial = ctx["_scanner"], ctx["_trial"]
    received = series.received_at.date() if series.received_at else date.today()
    # Header dates are shifted by de-identification, so the accreditation gate uses the receipt date.
    row["scanner_accredited"] = accredited_on(session, scanner.id if scanner else None,
                                              standard=trial.standard if trial else "EARL1",
                                              scope=trial.code if trial else "", on=received)
    row["software_matches_register"] = bool(scanner) and row["software_versions"] == scanner.software_versions
    return row


def header_table(rows: list[dict], context_rows: list[dict] | None = None, *, baseline_label: str = "baseline"):
    """DataFrame of ``rows`` with the cross-scan columns computed against ``context_rows`` too."""
    all_rows = list(rows) + [r for r in (context_rows or []) if r["series_uid"] not in {x["series_uid"] for x in rows}]
    df = pd.DataFrame(all_rows)
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = None
    df = add_cross_scan_columns(df, baseline_label=baseline_label)
    keep = {r["series_uid"] for r in rows}
    return df[df["series_uid"].isin(keep)][list(COLUMNS)].reset_index(drop=True)


def _observed(finding: Finding, row: dict) -> str:
    if finding.rule.column == "suv_factor_g_per_bq":
        return row.get("suv_error") or "not computable"
    value = finding.observed
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "yes" if value else "no"
    unit = COLUMNS.get(finding.rule.column, ("", "", ""))[1]
    if isinstance(value, float):
        return f"{value:.4g} {unit}".strip()
    return f"{value} {unit}".strip()


def record_findings(session: Session, manual: Manual, table: pd.DataFrame, findings: list[Finding],
                    *, actor: str = "qc") -> QcOutcome:
    """Write findings as Deviation rows (idempotent) and resolve open ones that now pass."""
    rows = {r["series_uid"]: r for r in table.to_dict(orient="records")}
    series_by_uid = {s.series_uid: s for s in session.exec(select(Series).where(col(Series.series_uid).in_(list(rows))))}
    outcome = QcOutcome(series=len(rows))
    failing = {(f.series_uid, f.rule.id) for f in findings}
    for finding in findings:
        series = series_by_uid[finding.series_uid]
        observed = _observed(finding, rows[finding.series_uid])
        dev = session.exec(select(Deviation).where(Deviation.series_id == series.id,
                                                   Deviation.rule_id == finding.rule.id)).first()
        fields = dict(manual_section=finding.rule.section, manual_version=manual.version,
                      expected=finding.rule.expected(), observed=observed, severity=finding.rule.severity,
                      message=finding.rule.message, corelab_version=__version__)
        if dev is None:
            session.add(Deviation(series_id=series.id, rule_id=finding.rule.id, **fields))
            outcome.deviations_new += 1
        elif any(getattr(dev, k) != v for k, v in fields.items()):
            for k, v in fields.items():
                setattr(dev, k, v)
            dev.updated_at = utcnow()
            outcome.deviations_updated += 1
        outcome.findings.append({"series_uid": finding.series_uid, "site": rows[finding.series_uid].get("site"),
                                 "subject": rows[finding.series_uid].get("subject"),
                                 "visit": rows[finding.series_uid].get("visit"), "rule_id": finding.rule.id,
                                 "severity": finding.rule.severity, "expected": finding.rule.expected(),
                                 "observed": observed})
    stale = session.exec(select(Deviation).where(col(Deviation.series_id).in_([s.id for s in series_by_uid.values()]),
                                                 Deviation.status == "open"))
    uid_of = {s.id: s.series_uid for s in series_by_uid.values()}
    for dev in stale:
        if (uid_of[dev.series_id], dev.rule_id) not in failing:
            dev.status, dev.updated_at = "resolved", utcnow()
            outcome.deviations_resolved += 1
            audit.append(session, actor=actor, action="deviation.auto_resolve", entity="deviation",
                         entity_id=dev.id, detail={"rule_id": dev.rule_id, "why": "rule passes on re-validation"})
    for uid, series in series_by_uid.items():
        series.header_row = {k: v for k, v in rows[uid].items() if not isinstance(v, float) or v == v}
        series.qc_state, series.qc_at = "done", utcnow()
    return outcome


def qc_series_batch(session: Session, settings: Settings, manual: Manual, series: list[Series]) -> QcOutcome:
    """Validate a batch of trial PET series in one GX run and record the deviations."""
    if not series:
        return QcOutcome()
    rows = [build_row(session, settings, s) for s in series]
    subjects = {r["subject"] for r in rows if r.get("subject")}
    context = [s.header_row for s in trial_pet_series(session, manual.trial)
               if s.header_row and s.header_row.get("subject") in subjects]
    table = header_table(rows, context)
    return record_findings(session, manual, table, validate(manual, table))
