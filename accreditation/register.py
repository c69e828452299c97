"""The scanner register: phantom results in, accreditation status out.

EARL cadence: image-quality QC (NEMA IEC) once a year, calibration QC (uniform cylinder) every
quarter, and again after any hardware, software or dose-calibrator change. A scanner is
accredited for a standard and scope when its newest NEMA IEC result and its newest cylinder
result both pass; it is valid until the earlier of the two expiries. The cadence is a
parameter, not a constant of the code.

Statuses (``corelab.models.ACCREDITATION_STATUSES``):

* ``pending``: a NEMA IEC or a cylinder result is still missing;
* ``accredited``: both newest results pass and ``valid_until`` is not past;
* ``failed``: the newest NEMA IEC or cylinder result fails;
* ``expired``: both passed, but ``valid_until`` is past (new phantom scans are due);
* ``suspended``: the scanner changed (``Scanner.requalification_reason`` is set) and passing
  NEMA IEC and cylinder results analysed *after the change* have not both arrived yet. When
  they have, the reason is cleared (with an audit event) and the status follows the results.

Only decisive results count: a ``withheld`` result (sphere names in doubt, see
:func:`accreditation.evaluate.overall_verdict`) is kept in the history but grants, fails,
suspends, clears or expires nothing; the register rests on the newest *decisive* results, so
a scanner with no other NEMA IEC result stays ``pending``.

The time of a change is that of the newest ``scanner.requalification`` audit event of the
scanner (written by :func:`require_requalification`); a reason set without one (e.g. by ingest,
at first sight of a new serial number) dates from the scanner's ``first_seen``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlmodel import Session, col, select

from corelab import audit
from corelab.models import Accreditation, PhantomResult, Scanner, Series, Site, utcnow
from corelab.register import REQUALIFICATION_ACTION, flag_requalification, requalification_since  # noqa: F401

"""Audit action that dates a scanner change."""

DECISIVE_VERDICTS = ("pass", "fail")
"""Verdicts the register acts on; any other (``withheld``) leaves it as it was."""


@dataclass(frozen=True)
class Cadence:
    """How long a passing phantom result keeps a scanner accredited, days.

    Attributes
    ----------
    image_quality_days : int
        NEMA IEC image-quality QC, yearly (EARL).
    calibration_days : int
        Uniform-cylinder calibration QC, quarterly (EARL).
    warn_days : int
        Accreditations ending within this many days are listed as coming expiries.
    """

    image_quality_days: int = 365
    calibration_days: int = 92
    warn_days: int = 30


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _newest(session: Session, scanner_id: int, kind: str, standard: str,
            since: dt.datetime | None = None) -> PhantomResult | None:
    rows = session.exec(select(PhantomResult).where(PhantomResult.scanner_id == scanner_id,
                                                    PhantomResult.kind == kind,
                                                    col(PhantomResult.verdict).in_(DECISIVE_VERDICTS))
                        .where((PhantomResult.standard == standard) | (PhantomResult.kind == "uniform_cylinder"))
                        .order_by(col(PhantomResult.scan_date).desc(), col(PhantomResult.id).desc())).all()
    if since is not None:
        rows = [r for r in rows if _aware(r.analysed_at) > since]
    return rows[0] if rows else None


def require_requalification(session: Session, scanner_id: int, reason: str, *, actor: str = "accreditation",
                            cadence: Cadence = Cadence()) -> list[Accreditation]:
    """Record a scanner change (hardware, software, dose calibrator): its accreditations are
    suspended until passing NEMA IEC and cylinder results analysed after now arrive."""
    scanner = session.get(Scanner, scanner_id)
    if scanner is None:
        raise KeyError(f"no scanner with id {scanner_id}")
    flag_requalification(session, scanner, reason, actor=actor)
    accs = session.exec(select(Accreditation).where(Accreditation.scanner_id == scanner_id)).all()
    return [update_accreditation(session, scanner_id, standard=a.standard, scope=a.scope, cadence=cadence,
                                 actor=actor) for a in accs]


def effective_status(acc: Accreditation, *, today: dt.date | None = None) -> str:
    """The status as of ``today``: a stored ``accredited`` whose validity has ended reads ``expired``."""
    today = today or dt.date.today()
    if acc.status == "accredited" and acc.valid_until is not None and acc.valid_until < today:
        return "expired"
    return acc.status


def update_accreditation(session: Session, scanner_id: int, *, standard: str, scope: str,
                         cadence: Cadence = Cadence(), actor: str = "accreditation",
                         today: dt.date | None = None) -> Accreditation:
    """Recompute one scanner's accreditation for ``standard`` and ``scope`` from its phantom results."""
    today = today or dt.date.today()
    scanner = session.get(Scanner, scanner_id)
    since = requalification_since(session, scanner) if scanner is not None else None
    nema = _newest(session, scanner_id, "nema_iec", standard)
    cyl = _newest(session, scanner_id, "uniform_cylinder", standard)
    acc = session.exec(select(Accreditation).where(Accreditation.scanner_id == scanner_id,
                                                   Accreditation.standard == standard,
                                                   Accreditation.scope == scope)).first()
    if acc is None:
        acc = Accreditation(scanner_id=scanner_id, standard=standard, scope=scope)
        session.add(acc)
    before = (acc.status, acc.valid_from, acc.valid_until, list(acc.evidence or []))
    cleared = None
    if since is not None:
        nema_after = _newest(session, scanner_id, "nema_iec", standard, since)
        cyl_after = _newest(session, scanner_id, "uniform_cylinder", standard, since)
        if nema_after is not None and cyl_after is not None and nema_after.verdict == cyl_after.verdict == "pass":
            cleared, scanner.requalification_reason = scanner.requalification_reason, None
            session.add(scanner)
            nema, cyl = nema_after, cyl_after
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
    if status == "accredited" and valid_until < today:
        status = "expired"
    if scanner is not None and scanner.requalification_reason:
        # The validity window stays: it still covers what the scanner did before the change.
        status = "suspended"
    after = (status, valid_from, valid_until, evidence)
    if cleared is not None:
        audit.append(session, actor=actor, action="scanner.requalified", entity="scanner", entity_id=scanner_id,
                     detail={"scanner": scanner.code, "reason_cleared": cleared, "evidence": evidence})
    if after != before:
        acc.status, acc.valid_from, acc.valid_until, acc.evidence = after
        acc.updated_at = utcnow()
        session.flush()
        audit.append(session, actor=actor, action="accreditation.update", entity="accreditation",
                     entity_id=acc.id, detail={"scanner_id": scanner_id, "standard": standard, "scope": scope,
                                               "status": status, "evidence": evidence,
                                               "valid_until": valid_until.isoformat() if valid_until else None})
    return acc


def expiring_accreditations(session: Session, *, within_days: int = Cadence().warn_days,
                            today: dt.date | None = None) -> list[dict]:
    """Accreditations whose validity ends within ``within_days`` of ``today`` (or has just ended).

    Returns one dict per accreditation, soonest first: scanner, site, standard, scope, status
    (as of today), valid_until (ISO date), days_left (negative when already expired), and what
    is due.
    """
    today = today or dt.date.today()
    horizon = today + dt.timedelta(days=within_days)
    query = (select(Accreditation, Scanner, Site).join(Scanner, Accreditation.scanner_id == Scanner.id)
             .join(Site, Scanner.site_id == Site.id)
             .where(col(Accreditation.valid_until).is_not(None), Accreditation.valid_until <= horizon,
                    col(Accreditation.status).in_(("accredited", "expired"))))
    out = []
    for acc, sc, site in session.exec(query):
        days_left = (acc.valid_until - today).days
        if days_left < -within_days:
            continue  # long expired: not a coming expiry
        out.append({"scanner": sc.code, "site": site.code, "standard": acc.standard, "scope": acc.scope,
                    "status": effective_status(acc, today=today), "valid_until": acc.valid_until.isoformat(),
                    "days_left": days_left,
                    "due": "new NEMA IEC and uniform-cylinder phantom scans" if days_left < 0 else
                           f"phantom scans before {acc.valid_until.isoformat()}"})
    return sorted(out, key=lambda r: (r["days_left"], r["scanner"], r["standard"]))


def scanner_record(session: Session, code: str, *, today: dt.date | None = None) -> dict | None:
    """A scanner, its accreditations and the history of its phantom results (newest first).

    None when no scanner has this code.
    """
    today = today or dt.date.today()
    sc = session.exec(select(Scanner).where(Scanner.code == code)).first()
    if sc is None:
        return None
    site = session.get(Site, sc.site_id)
    accs = session.exec(select(Accreditation).where(Accreditation.scanner_id == sc.id)
                        .order_by(col(Accreditation.standard), col(Accreditation.scope))).all()
    results = session.exec(select(PhantomResult, Series).join(Series, PhantomResult.series_id == Series.id)
                           .where(PhantomResult.scanner_id == sc.id)
                           .order_by(col(PhantomResult.analysed_at).desc(), col(PhantomResult.id).desc())).all()

    def summary(r: PhantomResult) -> dict:
        m = r.metrics or {}
        if r.kind == "nema_iec":
            return {"rc_mean": {f"{s['diameter_mm']:g}": s.get("rc_mean") for s in m.get("spheres", [])},
                    "rc_max": {f"{s['diameter_mm']:g}": s.get("rc_max") for s in m.get("spheres", [])},
                    "lung_residual": m.get("lung_residual")}
        return {"calibration_bias_pct": m.get("calibration_bias_pct"), "suv_mean": m.get("suv_mean")}

    return {
        "scanner": {"code": sc.code, "site": site.code if site else "", "manufacturer": sc.manufacturer,
                    "model": sc.model, "serial_number": sc.serial_number, "software_versions": sc.software_versions,
                    "requalification_reason": sc.requalification_reason},
        "accreditations": [{"standard": a.standard, "scope_kind": a.scope_kind, "scope": a.scope,
                            "status": effective_status(a, today=today), "stored_status": a.status,
                            "valid_from": a.valid_from.isoformat() if a.valid_from else None,
                            "valid_until": a.valid_until.isoformat() if a.valid_until else None,
                            "days_left": (a.valid_until - today).days if a.valid_until else None,
                            "evidence": list(a.evidence or [])} for a in accs],
        "phantom_results": [{"id": r.id, "kind": r.kind, "verdict": r.verdict, "scan_date":
                             r.scan_date.isoformat() if r.scan_date else None,
                             "analysed_at": _aware(r.analysed_at).isoformat(), "standard": r.standard,
                             "standard_version": r.standard_version, "corelab_version": r.corelab_version,
                             "input_sha256": r.input_sha256, "series_uid": s.series_uid, "key_figures": summary(r)}
                            for r, s in results],
    }
