"""Receiving objects into the spool: checksum, dedupe, quarantine, index.

One function, :func:`accept_object`, takes the bytes of one object as a site sent it and either
stores it durably in the spool (index row, temporary file, fsync, rename, commit) or puts it in
quarantine (:func:`corelab.quarantine.hold`; :func:`release_quarantined` tries it again) with a
reason that names the object (its ordinal in the drop and its sha256 prefix: never a file name),
the rule and the fix. The file drop (:func:`ingest_path`), the inbox and the DICOM node all go
through it, so they apply the same checks to the same store.

One guard per object: every check (:mod:`corelab.validate`, :mod:`corelab.deid`) runs before
any row is created, and anything unexpected while reading or checking quarantines the object as
``unreadable`` naming the step. Only resource failures (a write to the data directory, the
database) raise, and then the files this transaction wrote are removed again when it rolls back
(:func:`corelab.spool_io.write_tracked`), so the spool never holds a file without its row.

Duplicates and new versions
---------------------------
An object whose SOP Instance UID is already held is a *duplicate* (nothing stored, answered like
a stored one) when its bytes are those of a held version, or when its dataset is, file meta
aside (:func:`corelab.same_dataset.same_dataset`: the same series re-sent by file drop after
the node received it carries another ImplementationClassUID). Otherwise it is a *new version*
(``<SOP UID>.v<N>.dcm``, flagged for review), which replaces the earlier one in every reader
(:func:`corelab.series_files.newest_instance_rows`); ``Series.instance_count`` counts SOP
instances, not versions.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from sqlalchemy import distinct, func
from sqlmodel import Session, col, select

from corelab.completeness import assess, slice_position_mm
from corelab import audit
from corelab.db import retrying
from corelab.deid import DeidPolicy, check_deidentified, is_phantom
from corelab.fill_sheets import FILL_SHEET, FillSheetRefused, ReplaceRefused, attach
from corelab.ingest_outcome import IngestSummary, Outcome
from corelab.ingest_rows import check_instance, check_owner, series_for, trial_for
from corelab.lifecycle import move
from corelab.limits import FILL_SHEET_SUFFIX, Limits, iter_drop
from corelab.models import Instance, QuarantineItem, Series, Site, Study, utcnow
from corelab.quarantine import PARTIAL_CODES, hold
from corelab.same_dataset import held_copy
from corelab.series_files import newest_instance_rows, series_dir
from corelab.settings import Settings
from corelab.spool_io import durable_write, sha256_bytes, write_tracked
from corelab.validate import (HELD_PREFIX_BYTES, REQUIRED_UIDS, SOP_CLASSES, Rejected, check_deflate,
                              extract_facts, finite, object_label, parse_object, safe_join, step)


# --- one object --------------------------------------------------------------------------------------

def _checked(session: Session, settings: Settings, data: bytes, label: str, site: Site):
    """Every check, in order; returns ``(facts, trial, phantom, slice position)`` or raises :class:`Rejected`."""
    limits = Limits.from_settings(settings)
    if len(data) > limits.max_object_bytes:
        raise Rejected("too_large", f"{label}: {len(data)} bytes, over the limit of {limits.max_object_bytes} "
                                    f"bytes per object (CORELAB_MAX_OBJECT_BYTES); only its first {HELD_PREFIX_BYTES} "
                                    "bytes are kept. Send one image per object or ask the core lab to raise the "
                                    "limit", held=data[:HELD_PREFIX_BYTES])
    check_deflate(data, label, limits.max_inflated_bytes)
    ds = parse_object(data, label)
    try:  # from here on the UIDs are valid: a rejection marks the object's series, if it has one
        return _checked_values(session, ds, label, site)
    except Rejected as rej:
        rej.series_uid = str(ds.SeriesInstanceUID)
        raise


def _checked_values(session: Session, ds, label: str, site: Site):
    facts = extract_facts(ds, label)
    trial = trial_for(session, facts.protocol_id)
    with step("de-identification check", label):
        phantom = is_phantom(ds)
        policy = DeidPolicy.from_dict(trial.deid_policy if trial else None,
                                      pseudonym_pattern=trial.pseudonym_pattern if trial else "")
        failures = check_deidentified(ds, policy=policy)
    if failures:
        names = "; ".join(str(f) for f in failures)
        raise Rejected("deid_failed", f"{label}: de-identification check failed: {names}. Re-export the series "
                                      "through the trial's de-identification profile and send it again")
    with step("slice position", label):
        position = finite(slice_position_mm(ds))
    check_owner(session, facts, site, label)
    check_instance(session, facts, label)
    return facts, trial, phantom, position


def accept_object(session: Session, settings: Settings, data: bytes, *, site: Site | None,
                  source: str | None = None, ordinal: int | None = None, fill_sheet: bytes | None = None,
                  keep_rejected: bool = True) -> Outcome:
    """Store one received object, or quarantine it with its reason; never raise for bad input.

    Parameters
    ----------
    data : bytes
        The object as received (DICOM Part 10, file meta included).
    site : Site or None
        The sending site; None quarantines the object as ``unknown_site``.
    source : str, optional
        Ignored (kept for earlier callers): a file name or anything else a sender chose is never
        stored or shown. The object is named by ``ordinal`` and its sha256 prefix.
    ordinal : int, optional
        Its number in the drop or association (1, 2, ...), shown in reasons.
    keep_rejected : bool
        False (a release from quarantine) reports a rejection without holding the object again.

    Returns
    -------
    Outcome
        ``stored`` (a new SOP instance), ``duplicate`` (the bytes, or the dataset file meta aside,
        of a version held: nothing stored), ``new_version`` (other data under a held SOP Instance
        UID: stored beside it, flagged for review) or ``quarantined``.

    Raises only for resource failures (``OSError`` writing the data directory, SQLAlchemy errors).
    """
    digest = sha256_bytes(data)
    label = object_label(ordinal, digest)
    try:
        if site is None:
            raise Rejected("unknown_site", f"{label}: sent by a site that is not registered; register it with "
                                           "`corelab site add SITE --ae-title AET`, then release the object")
        facts, trial, phantom, position = _checked(session, settings, data, label, site)
        series = series_for(session, facts, site, trial, phantom, label)
    except Rejected as rej:
        return hold(session, settings, data, rej, label=label, site=site, series_uid=rej.series_uid,
                    keep=keep_rejected)
    series.last_received_at = utcnow()  # stability clock of the receiver
    # Written before the state is read: the UPDATE waits for a completion committing meanwhile
    # (the ticker claims the row first), and the state read after it is that completion's, so a
    # late object reopens the series it completed rather than being left out of it.
    session.flush()
    session.refresh(series, ["state", "completed_at"])
    existing = session.exec(select(Instance).where(Instance.sop_instance_uid == facts.sop_instance_uid)
                            .order_by(col(Instance.version).desc())).all()
    folder = series_dir(settings, series, session)
    # The same bytes, or (only then read from the spool) the same dataset under other file meta.
    if any(inst.sha256 == digest for inst in existing) or \
            (existing and held_copy(data, [settings.data_dir / inst.path for inst in existing]) is not None):
        _keep_fill_sheet(session, settings, series, fill_sheet)
        return Outcome(label, "duplicate", series.series_uid)
    version = existing[0].version + 1 if existing else 1
    name = facts.sop_instance_uid + (f".v{version}" if version > 1 else "") + ".dcm"
    path = safe_join(folder, name)
    # The row first: its unique (SOP Instance UID, version) makes a concurrent writer of the same
    # path wait or fail before either touches the file; the file is written before the commit.
    session.add(Instance(series_id=series.id, sop_instance_uid=facts.sop_instance_uid,
                         sop_class_uid=facts.sop_class_uid, version=version,
                         path=str(path.relative_to(settings.data_dir)), sha256=digest, size_bytes=len(data),
                         slice_position_mm=position, needs_review=version > 1))
    session.flush()
    write_tracked(session, path, data)
    _keep_fill_sheet(session, settings, series, fill_sheet)
    if version == 1:  # a count of SOP instances: a new version replaces one, it adds none
        # In SQL, not in Python: concurrent receivers add to the same series without losing counts.
        series.instance_count = Series.instance_count + 1
    if series.state == "complete":  # a late instance reopens a completed series
        move(session, series, state="receiving", actor="ingest", reason="an object arrived after completion",
             detail={"sop_instance_uid": facts.sop_instance_uid, "version": version})
        series.completed_at = None  # complete again when stable, whatever the two clocks said
    if facts.expected_count is not None:
        series.expected_count = facts.expected_count
    return Outcome(label, "new_version" if version > 1 else "stored", series.series_uid)


def _keep_fill_sheet(session: Session, settings: Settings, series: Series, fill_sheet: bytes | None) -> None:
    """Give the series the fill sheet dropped with its object, as ``corelab phantom fill`` would.

    Also for a duplicate: a series received over DICOM (no fill sheet) and dropped again with
    its fill sheet gets the sheet, though none of its objects is stored again. Through the same
    core (:func:`corelab.fill_sheets.attach`: checked, audited as ``ingest``, a failed series
    re-queued), as a site's: it never replaces a sheet the series has. The sheet makes a series
    of no trial a phantom; a trial series (it has a visit) keeps its kind and the sheet is not
    kept. A sheet not kept is audited once per drop (``phantom.fill_sheet_ignored``, with why).
    """
    if fill_sheet is None:
        return
    if series.kind == "unknown" and session.get(Study, series.study_id).visit_id is None:
        series.kind = "phantom"
    try:
        # queued_ok: a series the node received and queued, but whose run has not started, takes
        # the sheet its re-drop brings (the run reads it when it starts)
        attach(session, settings, series, fill_sheet, actor="ingest", replace=False, queued_ok=True)
    except FillSheetRefused as exc:
        if isinstance(exc, ReplaceRefused) and \
                (series_dir(settings, series, session) / FILL_SHEET).read_bytes() == fill_sheet:
            return  # the sheet it has: no news (every object of a drop comes with it)
        said = session.info.setdefault("corelab.ingest.fill_ignored", set())
        key = (series.id, sha256_bytes(fill_sheet))
        if key not in said:  # once per sheet and series, not per object
            said.add(key)
            audit.append(session, actor="ingest", action="phantom.fill_sheet_ignored", entity="series",
                         entity_id=series.series_uid, detail={"sha256": key[1], "why": str(exc)[:500]})


def complete_series(session: Session, series: Series, *, actor: str = "ingest") -> None:
    """Mark a series complete and fix its checksum over the instances it holds (a quarantined
    series keeps its state, with the checksum and completeness of what it holds).

    Everything is of the newest version of each SOP instance, as every reader reads it
    (:func:`corelab.series_files.series_files`): the checksum (so it is the checksum of the
    files the phantom analysis reads), the completeness, and ``instance_count``, counted again
    here so that a count left too high (by versions counted as instances before issue 16) is
    put right at the next completion.
    """
    # Newest version per SOP instance: a resent, corrected slice is not a repeated position.
    newest = newest_instance_rows(session, series)
    series.checksum = sha256_bytes("\n".join(sorted(inst.sha256 for inst in newest)).encode())
    # In SQL, so the count is of what the database holds when the row is written (as the
    # receivers' increments are).
    series.instance_count = (select(func.count(distinct(Instance.sop_instance_uid)))
                             .where(Instance.series_id == series.id).scalar_subquery())
    session.flush()  # and read back as a number by whoever reads the series next
    series.completeness = assess([inst.slice_position_mm for inst in newest], instance_count=len(newest),
                                 expected_count=series.expected_count)
    # Quarantined while an object of it is held, whichever writer came first: an object held
    # while a rival created the series, or (released) none held any more.
    held = session.exec(select(QuarantineItem.id).where(QuarantineItem.series_uid == series.series_uid,
                                                        QuarantineItem.site_id == series.site_id,
                                                        col(QuarantineItem.released_at).is_(None))).first()
    if held is not None and series.state != "quarantined":
        move(session, series, state="quarantined", actor=actor, reason="an object of the series is held in quarantine",
             detail={"quarantine_item": held})
    elif held is None and series.state == "quarantined":
        move(session, series, state="receiving", actor=actor, reason="no object of the series is held any more")
    if series.state != "quarantined":
        move(session, series, state="complete", actor=actor, reason="series stable",
             detail={"instances": len(newest), "complete": series.completeness["complete"]})
    series.completed_at = utcnow()


def ingest_path(session: Session, settings: Settings, path: Path, *, site_code: str) -> IngestSummary:
    """Ingest a file, folder or zip dropped by a site; every series touched is completed at once.

    Each object is stored or quarantined on its own (see :func:`accept_object`) and committed on
    its own, as the node commits each C-STORE: a large drop never holds the store's write lock for
    long (SQLite has one), and a race lost to another writer of the same series (the node, an
    upload) is retried for that object alone. One bad object never stops the rest. Symbolic links
    are not followed, limits are checked while reading.
    """
    site_id = session.exec(select(Site.id).where(Site.code == site_code)).first()
    summary = IngestSummary()
    for obj in iter_drop(Path(path), Limits.from_settings(settings)):
        outcome = retrying(partial(_one_of_drop, session, settings, obj, site_id), f"drop object {obj.ordinal}")
        summary.outcomes.append(outcome)
        if outcome.series_uid and outcome.series_uid not in summary.series_uids:
            summary.series_uids.append(outcome.series_uid)
    for uid in summary.series_uids:
        series = session.exec(select(Series).where(Series.series_uid == uid)).first()
        if series is not None:
            complete_series(session, series)
    return summary


def _one_of_drop(session: Session, settings: Settings, obj, site_id: int | None) -> Outcome:
    """One object of a drop, in its own transaction (rolled back when it raised)."""
    try:
        site = session.get(Site, site_id) if site_id is not None else None
        if obj.rejected is not None:
            outcome = hold(session, settings, b"", obj.rejected, label=obj.label, site=site, series_uid=None, keep=True)
        else:
            outcome = accept_object(session, settings, obj.data, site=site, ordinal=obj.ordinal, fill_sheet=obj.fill)
        session.commit()
        return outcome
    except BaseException:
        session.rollback()
        raise


def release_quarantined(session: Session, settings: Settings, item: QuarantineItem, *,
                        site_code: str | None = None) -> Outcome:
    """Try a quarantined object again, after the physicist fixed the cause (e.g. registered the site).

    The object goes through every check again; if it fails again it stays in quarantine with the
    new reason, and the old item is kept. An item that holds no bytes or only a prefix (a link,
    an unreadable file, an over-limit object) cannot be released: the site must send it again.
    """
    if not item.path or item.reason_code in PARTIAL_CODES:
        return Outcome(item.source_name, "quarantined", item.series_uid, item.reason_code,
                       f"{item.reason} (quarantine holds {'only a prefix' if item.path else 'no bytes'} of it: "
                       "it cannot be released, the site must send it again)")
    data = safe_join(settings.data_dir, *Path(item.path).parts).read_bytes()
    if site_code:
        site = session.exec(select(Site).where(Site.code == site_code)).first()
    else:
        site = session.get(Site, item.site_id) if item.site_id else None
    outcome = accept_object(session, settings, data, site=site, keep_rejected=False)
    if outcome.status == "quarantined":
        item.reason_code, item.reason = outcome.reason_code, outcome.reason
    else:
        item.released_at = utcnow()
        if outcome.series_uid:
            complete_series(session, session.exec(select(Series).where(Series.series_uid == outcome.series_uid)).one())
    return outcome


__all__ = ["FILL_SHEET_SUFFIX", "IngestSummary", "Outcome", "PARTIAL_CODES", "REQUIRED_UIDS", "Rejected",
           "SOP_CLASSES", "accept_object", "complete_series", "durable_write", "ingest_path", "iter_drop",
           "parse_object", "release_quarantined", "series_dir", "sha256_bytes"]
