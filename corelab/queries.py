"""Read-side views of the store for the command line, artifacts and reports.

Rows are plain dicts of non-identifying values (pseudonyms, codes, UIDs, measurements).
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, select

from corelab.models import (Accreditation, Deviation, QuarantineItem, Scanner, Series, Site, Study, Subject,
                            Trial, Visit)


def series_rows(session: Session) -> list[dict]:
    sites = {s.id: s.code for s in session.exec(select(Site))}
    scanners = {s.id: s.code for s in session.exec(select(Scanner))}
    return [{"series_uid": s.series_uid, "site": sites.get(s.site_id, ""), "scanner": scanners.get(s.scanner_id, ""),
             "kind": s.kind, "modality": s.modality, "instances": s.instance_count,
             "expected": s.expected_count if s.expected_count is not None else "", "state": s.state,
             "qc_state": s.qc_state, "received_at": s.received_at, "completed_at": s.completed_at,
             "completeness": "; ".join((s.completeness or {}).get("findings", []))}
            for s in session.exec(select(Series).order_by(col(Series.id)))]


def quarantine_rows(session: Session, *, include_released: bool = False) -> list[dict]:
    sites = {s.id: s.code for s in session.exec(select(Site))}
    query = select(QuarantineItem).order_by(col(QuarantineItem.id))
    if not include_released:
        query = query.where(col(QuarantineItem.released_at).is_(None))
    return [{"id": q.id, "site": sites.get(q.site_id, "(unknown)"), "source": q.source_name,
             "reason_code": q.reason_code, "reason": q.reason, "series_uid": q.series_uid, "received_at": q.received_at,
             "released_at": q.released_at, "sha256": q.sha256}
            for q in session.exec(query)]


def deviation_rows(session: Session, *, trial_code: str | None = None, site_code: str | None = None) -> list[dict]:
    query = (select(Deviation, Series, Site, Study, Visit, Subject, Trial)
             .join(Series, Deviation.series_id == Series.id)
             .join(Site, Series.site_id == Site.id, isouter=True)
             .join(Study, Series.study_id == Study.id, isouter=True)
             .join(Visit, Study.visit_id == Visit.id, isouter=True)
             .join(Subject, Visit.subject_id == Subject.id, isouter=True)
             .join(Trial, Series.trial_id == Trial.id, isouter=True)
             .order_by(col(Deviation.severity), col(Site.code), col(Subject.pseudonym), col(Visit.label),
                       col(Deviation.rule_id)))
    if trial_code:
        query = query.where(Trial.code == trial_code)
    if site_code:
        query = query.where(Site.code == site_code)
    return [{"id": d.id, "trial": t.code if t else "", "site": site.code if site else "",
             "subject": subj.pseudonym if subj else "", "visit": v.label if v else "",
             "series_uid": s.series_uid, "rule_id": d.rule_id, "manual_section": d.manual_section,
             "manual_version": d.manual_version,
             "severity": d.severity, "expected": d.expected, "observed": d.observed, "status": d.status,
             "message": d.message}
            for d, s, site, _study, v, subj, t in session.exec(query)]


def accreditation_rows(session: Session) -> list[dict]:
    query = (select(Accreditation, Scanner, Site).join(Scanner, Accreditation.scanner_id == Scanner.id)
             .join(Site, Scanner.site_id == Site.id).order_by(col(Scanner.code), col(Accreditation.standard)))
    return [{"scanner": sc.code, "site": site.code, "manufacturer": sc.manufacturer, "model": sc.model,
             "standard": a.standard, "scope": a.scope, "status": a.status, "valid_from": a.valid_from,
             "valid_until": a.valid_until, "evidence": a.evidence}
            for a, sc, site in session.exec(query)]


def accredited_on(session: Session, scanner_id: int | None, *, standard: str, scope: str, on) -> bool:
    """Whether the scanner was accredited for ``standard`` and ``scope`` at ``on``.

    ``on`` is a date (a scan date) or an aware datetime (a receipt time). An accreditation counts
    inside its validity window whatever it says today: an ``expired`` one covered the scans made
    before it lapsed, and a ``suspended`` one (a scanner change awaiting new phantoms) still
    covers what came before the change.
    """
    from corelab.register import requalification_since

    if scanner_id is None:
        return False
    day = on.date() if isinstance(on, datetime) else on
    rows = session.exec(select(Accreditation).where(Accreditation.scanner_id == scanner_id,
                                                    Accreditation.standard == standard,
                                                    Accreditation.scope == scope)).all()
    for acc in rows:
        if acc.status not in ("accredited", "expired", "suspended") or acc.valid_from is None:
            continue
        if not (acc.valid_from <= day and (acc.valid_until is None or day <= acc.valid_until)):
            continue
        if acc.status != "suspended":
            return True
        since = requalification_since(session, session.get(Scanner, scanner_id))
        if since is None or (on < since if isinstance(on, datetime) else day < since.date()):
            return True
    return False
