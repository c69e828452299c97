"""Quarantine: holding an object that failed a check, with its reason.

:func:`hold` keeps the object's bytes (or, for an over-limit object, a prefix) under
``<data dir>/quarantine/<date>/`` with a :class:`~corelab.models.QuarantineItem` that names the
object by its label (ordinal and sha256 prefix, never a file name), the rule and the fix, and
marks the sender's series ``quarantined``. Releasing a held object is sending it through
:func:`corelab.ingest.accept_object` again: :func:`corelab.ingest.release_quarantined` (there,
as this module is imported by the ingest and imports nothing of it).
"""

from __future__ import annotations

import uuid
from sqlmodel import Session, col, select

from corelab.ingest_outcome import Outcome
from corelab.lifecycle import move
from corelab.models import QuarantineItem, Series, Site, utcnow
from corelab.settings import Settings
from corelab.spool_io import sha256_bytes, write_tracked
from corelab.validate import Rejected, safe_join

__all__ = ["PARTIAL_CODES", "hold"]

PARTIAL_CODES = ("too_large", "zip_bomb")  # quarantine holds only a prefix of these


def hold(session: Session, settings: Settings, data: bytes, rej: Rejected, *, label: str,
         site: Site | None, series_uid: str | None, keep: bool) -> Outcome:
    """Hold the object (or the prefix ``rej.held``) with its reason; mark its series if it is the sender's."""
    series = session.exec(select(Series).where(Series.series_uid == series_uid)).first() if series_uid else None
    if series is not None and (site is None or series.site_id not in (None, site.id)):
        series = None  # another site's series (uid_conflict): an intruder neither holds it nor completes it
    if series is not None:
        series.last_received_at = utcnow()  # the receiver's stability clock counts quarantined objects
        session.flush()  # then the state, as a completion committing meanwhile left it (see accept_object)
        session.refresh(series, ["state"])
        if series.state != "quarantined":
            move(session, series, state="quarantined", actor="ingest", reason=rej.code)
    shown_uid = series.series_uid if series is not None else None
    if not keep:
        return Outcome(label, "quarantined", shown_uid, rej.code, str(rej))
    held = data if rej.held is None else rej.held
    digest = sha256_bytes(held) if held else ""
    if digest:
        same = session.exec(select(QuarantineItem).where(QuarantineItem.sha256 == digest,
                                                         col(QuarantineItem.released_at).is_(None))).first()
        if same is not None:  # the same bytes are already held: sending them again changes nothing
            why = same.reason.split(": ", 1)[-1]
            return Outcome(label, "quarantined", shown_uid, same.reason_code,
                           f"{label}: already held in quarantine (item {same.id}): {why}")
    path = None
    if held:
        suffix = ".head" if rej.held is not None else ".dcm"
        path = safe_join(settings.data_dir, "quarantine", utcnow().strftime("%Y-%m-%d"),
                         f"{digest[:16]}-{uuid.uuid4().hex[:8]}{suffix}")
    session.add(QuarantineItem(site_id=site.id if site else None, source_name=label,
                               path=str(path.relative_to(settings.data_dir)) if path else "",
                               series_uid=series_uid, sha256=digest, reason_code=rej.code, reason=str(rej)))
    session.flush()
    if path is not None:
        write_tracked(session, path, held)
    return Outcome(label, "quarantined", shown_uid, rej.code, str(rej))
