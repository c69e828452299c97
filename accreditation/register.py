"""The scanner register: phantom results in, accreditation status out.

EARL cadence: image-quality QC (NEMA IEC) once a year, calibration QC (uniform cylinder) every
quarter, and again after any hardware or software change. A scanner is accredited for a standard
and scope when its newest NEMA IEC result and its newest cylinder result both pass; it is valid
until the earlier of the two expiries. The cadence is a parameter, not a constant of the code.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlmodel import Session, col, select

from corelab import audit
from corelab.models import Accreditation, PhantomResult, utcnow


@dataclass(frozen=True)
class Cadence:
    image_quality_days: int = 365
    calibration_days: int = 92


def _newest(session: Session, scanner_id: int, kind: str, standard: str) -> PhantomResult | None:
    return session.exec(select(PhantomResult).where(PhantomResult.scanner_id == scanner_id,
                                                    PhantomResult.kind == kind)
                        .where((PhantomResult.standard == standard) | (PhantomResult.kind == "uniform_cylinder"))
                        .order_by(col(PhantomResult.scan_date).desc(), col(PhantomResult.id).desc())).first()


def update_accreditation(session: Session, scanner_id: int, *, standard: str, scope: str,
                         cadence: Cadence = Cadence(), actor: str = "accreditation") -> Accreditation:
    """Recompute one scanner's accreditation for ``standard`` and ``scope`` from its phantom results."""
    nema = _newest(session, scanner_id, "nema_iec", standard)
    cyl = _newest(session, scanner_id, "uniform_cylinder", standard)
    acc = session.exec(select(Accreditation).where(Accreditation.scanner_id == scanner_id,
                                                   Accreditation.standard == standard,
                                                   Accreditation.scope == scope)).first()
    if acc is None:
        acc = Accreditation(scanner_id=scanner_id, standard=standard, scope=scope)
        session.add(acc)
    before = (acc.status, acc.valid_from, acc.valid_until, list(acc.evidence or []))
    evidence = [r.id for r in (nema, cyl) if r is not None]
    if nema is None or cyl is None:
        status, valid_from, valid_until = "pending", None, None
    elif nema.verdict == "pass" and cyl.verdict == "pass":
        status = "accredited"
        valid_from = max(d for d in (nema.scan_date, cyl.scan_date) if d)
        valid_until = min(nema.scan_date + dt.timedelta(days=cadence.image_quality_days),
                          cyl.scan_date + dt.timedelta(days=cadence.calibration_days))
    else:
        status, valid_from, valid_until = "failed", None, None
    if status == "accredited" and valid_until < dt.date.today():
        status = "expired"
    after = (status, valid_from, valid_until, evidence)
    if after != before:
        acc.status, acc.valid_from, acc.valid_until, acc.evidence = after
        acc.updated_at = utcnow()
        session.flush()
        audit.append(session, actor=actor, action="accreditation.update", entity="accreditation",
                     entity_id=acc.id, detail={"scanner_id": scanner_id, "standard": standard, "scope": scope,
                                               "status": status, "evidence": evidence,
                                               "valid_until": valid_until.isoformat() if valid_until else None})
    return acc
