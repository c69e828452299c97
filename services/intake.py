"""Use cases of what comes in: the site register, file drops and the quarantine."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, select

from corelab import audit
from corelab.ingest import ingest_path, release_quarantined
from corelab.models import QuarantineItem, Site
from corelab.register import add_site, load_register
from corelab.settings import Settings
from expectations.manual import trial_fields


def load_register_file(session: Session, path: Path | str) -> dict:
    """Load trial, sites and scanners from a register YAML."""
    return load_register(session, Path(path), trial_fields=trial_fields)


def register_site(session: Session, code: str, *, ae_title: str, host: str | None = None, name: str = "",
                  actor: str = "cli") -> dict:
    """Register a site and the AE title it sends from (or change them); audited as ``site.register``."""
    site = add_site(session, code=code, ae_title=ae_title, host=host, name=name or "", actor=actor)
    return {"site": site.code, "ae_title": site.ae_title, "host": site.host}


def site_rows(session: Session) -> list[dict]:
    return [{"site": s.code, "name": s.name, "ae_title": s.ae_title, "host": s.host or ""}
            for s in session.exec(select(Site).order_by(Site.code))]


def ingest_drop(session: Session, settings: Settings, path: Path | str, site_code: str):
    """Ingest one site's file drop (files, folders, zips); returns the ingest summary."""
    return ingest_path(session, settings, Path(path), site_code=site_code)


def start_drop_qc(settings: Settings, series_uids: list[str], on_complete=None) -> list[int]:
    """Start QC of the series a drop completed, as the DICOM node does: claim each once
    (``pending -> queued``) and hand it to ``on_complete`` (None: left queued for the nightly QC).
    Returns the ids this call claimed."""
    from sqlmodel import select

    from corelab.db import open_store, transaction
    from corelab.models import Series
    from corelab.series_completion import start_qc

    engine = open_store(settings)
    with transaction(engine) as session:
        ids = list(session.exec(select(Series.id).where(Series.series_uid.in_(series_uids),
                                                          Series.state == "complete")).all())
    return start_qc(engine, ids, on_complete, actor="ingest")


def release_quarantine_item(session: Session, settings: Settings, item_id: int, *, site_code: str | None = None,
                            actor: str = "cli"):
    """Check a quarantined object again and store it if it passes, audited as ``quarantine.release``
    (detail: status, series_uid, reason_code, reason; also when it stays quarantined).

    Returns the :class:`corelab.ingest.Outcome` (status ``quarantined`` when it still fails), or
    None when there is no open item ``item_id`` (nothing is audited then).
    """
    item = session.get(QuarantineItem, item_id)
    if item is None or item.released_at is not None:
        return None
    outcome = release_quarantined(session, settings, item, site_code=site_code)
    session.flush()
    audit.append(session, actor=actor, action="quarantine.release", entity="quarantine", entity_id=item_id,
                 detail={"status": outcome.status, "series_uid": outcome.series_uid or "",
                         "reason_code": outcome.reason_code or "", "reason": outcome.reason or ""})
    return outcome
