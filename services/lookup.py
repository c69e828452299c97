"""Read-only use cases: what a physicist or trial manager looks up (and checks) in the store."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session

from corelab import audit, queries
from corelab.settings import Settings


def settings_info(settings: Settings) -> dict:
    """The settings in force and the schema revision of the store."""
    from corelab.db import current_revision, open_store

    data = settings.as_dict()
    data["schema_revision"] = current_revision(open_store(settings))
    return data


def series_rows(session: Session) -> list[dict]:
    return queries.series_rows(session)


def quarantine_rows(session: Session, *, include_released: bool = False) -> list[dict]:
    return queries.quarantine_rows(session, include_released=include_released)


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
