"""Read-only use cases: what a physicist or trial manager looks up (and checks) in the store."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from corelab import audit, queries
from corelab.models import QuarantineItem, Series, Site, Study, Subject, Trial, Visit
from corelab.settings import Settings


class LookupInputError(ValueError):
    """A look-up asked with a value that cannot be used (a bad date, an unknown site or trial);
    the message gives the value and the form expected."""


def settings_info(settings: Settings) -> dict:
    """The settings in force and the schema revision of the store."""
    from corelab.db import current_revision, open_store

    data = settings.as_dict()
    data["schema_revision"] = current_revision(open_store(settings))
    return data


def series_rows(session: Session) -> list[dict]:
    return queries.series_rows(session)


def parse_since(text: str | None = None, *, today: bool = False, now: dt.datetime | None = None) -> dt.datetime | None:
    """The start of a look-up window, as an aware UTC datetime (None: no window).

    Parameters
    ----------
    text : str, optional
        ``YYYY-MM-DD`` (that day's 00:00 UTC) or an ISO 8601 date-time; one without an offset
        is read as UTC, like every time in the store.
    today : bool
        The current UTC day from 00:00, as the portal's worklist counts "today".
    now : datetime, optional
        The present (tests); default the clock.

    Raises
    ------
    LookupInputError
        ``text`` is not a date or date-time (the message quotes it and shows the forms).
    """
    if today:
        day = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).date()
        return dt.datetime.combine(day, dt.time.min, tzinfo=dt.timezone.utc)
    if text is None:
        return None
    value = text.strip()
    try:
        if len(value) == 10:  # fromisoformat would read a bare date as midnight anyway; say so explicitly
            return dt.datetime.combine(dt.date.fromisoformat(value), dt.time.min, tzinfo=dt.timezone.utc)
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise LookupInputError(f"--since {text!r} is not a date or date-time; use YYYY-MM-DD or "
                               "YYYY-MM-DDTHH:MM[:SS][+HH:MM] (no offset: UTC)") from None
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


def _code_id(session: Session, table, code: str | None, what: str) -> int | None:
    """The id of the site or trial ``code`` names (None when not asked); an unknown code raises,
    so a typo does not read as "nothing received"."""
    if code is None:
        return None
    found = session.exec(select(table.id).where(table.code == code)).first()
    if found is None:
        known = ", ".join(session.exec(select(table.code).order_by(col(table.code))).all()) or "none registered"
        raise LookupInputError(f"no {what} {code!r} (known: {known})")
    return found


def series_list(session: Session, *, since: dt.datetime | None = None, site_code: str | None = None,
                trial_code: str | None = None) -> list[dict]:
    """Received series with their site, subject and visit, newest first (``corelab series list``).

    Parameters
    ----------
    since : datetime, optional
        Keep the series whose first object arrived at or after it (aware; see :func:`parse_since`).
    site_code, trial_code : str, optional
        Keep one site's or one trial's series; an unknown code raises :class:`LookupInputError`.

    Returns
    -------
    list of dict
        ``site, subject, visit, modality, kind, instances, expected, state, qc_state, received``
        (the first arrival, aware UTC) and ``series_uid``; subject and visit are empty for a
        series of no visit (a phantom).
    """
    site_id = _code_id(session, Site, site_code, "site")
    trial_id = _code_id(session, Trial, trial_code, "trial")
    query = (select(Series, Site.code, Subject.pseudonym, Visit.label)
             .join(Site, Series.site_id == Site.id, isouter=True)
             .join(Study, Series.study_id == Study.id, isouter=True)
             .join(Visit, Study.visit_id == Visit.id, isouter=True)
             .join(Subject, Visit.subject_id == Subject.id, isouter=True)
             .order_by(col(Series.received_at).desc(), col(Series.id).desc()))
    if since is not None:
        query = query.where(col(Series.received_at) >= since)
    if site_id is not None:
        query = query.where(Series.site_id == site_id)
    if trial_id is not None:
        query = query.where(Series.trial_id == trial_id)
    return [{"site": site or "", "subject": subject or "", "visit": visit or "", "modality": s.modality,
             "kind": s.kind, "instances": s.instance_count,
             "expected": s.expected_count if s.expected_count is not None else "", "state": s.state,
             "qc_state": s.qc_state, "received": s.received_at, "series_uid": s.series_uid}
            for s, site, subject, visit in session.exec(query)]


def quarantine_rows(session: Session, *, include_released: bool = False) -> list[dict]:
    return queries.quarantine_rows(session, include_released=include_released)


def quarantine_groups(session: Session, *, include_released: bool = False) -> list[dict]:
    """Held-back objects grouped by site and series, newest group first (``corelab quarantine list``).

    One row per (site, series UID); objects whose series could not be read form one "no series"
    row per site. Counted in the database (a flood of junk is one row, not thousands).

    Returns
    -------
    list of dict
        ``site`` ("(unknown)" for an unknown sender), ``series_uid`` (None: no series),
        ``subject`` and ``visit`` (when the series is in the store, else empty), ``objects``,
        ``reason_codes`` (sorted) and ``newest`` (the newest arrival, aware UTC).
    """
    query = (select(QuarantineItem.site_id, QuarantineItem.series_uid, QuarantineItem.reason_code,
                    func.count(), func.max(QuarantineItem.received_at))
             .group_by(QuarantineItem.site_id, QuarantineItem.series_uid, QuarantineItem.reason_code))
    if not include_released:
        query = query.where(col(QuarantineItem.released_at).is_(None))
    groups: dict[tuple, dict] = {}
    for site_id, series_uid, code, n, newest in session.exec(query):
        g = groups.setdefault((site_id, series_uid), {"objects": 0, "codes": set(), "newest": newest})
        g["objects"] += n
        g["codes"].add(code)
        g["newest"] = max(g["newest"], newest)
    sites = {s.id: s.code for s in session.exec(select(Site))}
    uids = sorted({uid for _site, uid in groups if uid})
    where = {}  # (site id, series UID) -> (subject, visit): only a series of the item's own site
    for i in range(0, len(uids), 500):  # stay under the bound-parameter limit of SQLite
        where.update({(site_id, uid): (subject, visit) for site_id, uid, subject, visit in session.exec(
            select(Series.site_id, Series.series_uid, Subject.pseudonym, Visit.label)
            .join(Study, Series.study_id == Study.id).join(Visit, Study.visit_id == Visit.id)
            .join(Subject, Visit.subject_id == Subject.id).where(col(Series.series_uid).in_(uids[i:i + 500])))})
    rows = [{"site": sites.get(site_id, "(unknown)"), "series_uid": uid,
             "subject": where.get((site_id, uid), ("", ""))[0], "visit": where.get((site_id, uid), ("", ""))[1],
             "objects": g["objects"], "reason_codes": sorted(g["codes"]), "newest": _aware(g["newest"])}
            for (site_id, uid), g in groups.items()]
    return sorted(rows, key=lambda r: (r["newest"], r["site"], r["series_uid"] or ""), reverse=True)


def _aware(value: dt.datetime) -> dt.datetime:
    """func.max() bypasses the column type, so SQLite hands back a naive UTC datetime (or text)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def deviation_rows(session: Session, *, trial_code: str | None = None, site_code: str | None = None) -> list[dict]:
    return queries.deviation_rows(session, trial_code=trial_code, site_code=site_code)


def accreditation_overview(session: Session, *, within_days: int = 30) -> tuple[list[dict], list[dict]]:
    """Every accreditation (an ended one reads expired, with days to expiry) and those expiring
    within ``within_days``."""
    from accreditation.register import expiring_accreditations

    rows = queries.accreditation_rows(session)
    expiring = expiring_accreditations(session, within_days=within_days)
    soon = {(e["scanner"], e["standard"], e["scope"]): e for e in expiring}
    for row in rows:
        e = soon.get((row["scanner"], row["standard"], row["scope"]))
        if e is not None:
            row["status"] = e["status"]  # an accreditation whose validity has ended reads expired
        row["expires_in_days"] = e["days_left"] if e else ""
    return rows, expiring


def scanner_record(session: Session, scanner_code: str) -> dict | None:
    """One scanner: its accreditations and the history of its phantom results (None: no scanner)."""
    from accreditation.register import scanner_record as record

    return record(session, scanner_code)


def verify_audit(session: Session, settings: Settings):
    """Recompute the audit chain; compare it with the anchor file and the heads in signature records.

    Returns the check result (its problems include unreadable signature records) and the number
    of signature records read.
    """
    signed, unreadable = audit.signature_anchors(settings.reports_dir)
    result = audit.check(session, audit.anchor_path(settings.data_dir), extra_anchors=signed)
    result.problems[:0] = unreadable
    return result, len(signed)


def suv_of_path(path: Path) -> list[dict] | None:
    """SUV factors and SUV min/mean/max of the PET series in a file or folder (None: no files)."""
    from corelab.suv import suv_of_files

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return suv_of_files(files) if files else None


def analyse_phantom_folder(path: Path, fill_sheet: Path, *, standard: str = "EARL1", centres: Path | None = None,
                           rc_peak: str = "max_voxel") -> dict:
    """Analyse a phantom series folder with its fill sheet against a standard (no store)."""
    from accreditation.evaluate import evaluate_series_folder, load_centres
    from phantoms.fill import load_fill_sheet

    centres_mm = load_centres(centres) if centres else None
    return evaluate_series_folder(path, load_fill_sheet(fill_sheet), standard=standard, centres_mm=centres_mm,
                                  rc_peak_placement=rc_peak).to_dict()
