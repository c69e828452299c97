"""Receiving objects into the spool: checksum, dedupe, quarantine, index.

One function, :func:`accept_object`, takes the bytes of one object as a site sent it and either
stores it durably in the spool (index row, temporary file, fsync, rename, commit) or puts it in
quarantine with a reason that names the object (its ordinal in the drop and its sha256 prefix:
never a file name), the rule and the fix. The file drop (:func:`ingest_path`), the inbox and the
DICOM node all go through it, so they apply the same checks to the same store.

One guard per object: every check (:mod:`corelab.validate`, :mod:`corelab.deid`) runs before
any row is created, and anything unexpected while reading or checking quarantines the object as
``unreadable`` naming the step. Only resource failures (a write to the data directory, the
database) raise, and then the files this transaction wrote are removed again when it rolls back,
so the spool never holds a file without its row.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import event
from sqlmodel import Session, col, select

from corelab.completeness import assess, slice_position_mm
from corelab.deid import DeidPolicy, check_deidentified, is_phantom
from corelab.lifecycle import move
from corelab.limits import FILL_SHEET_SUFFIX, Limits, iter_drop
from corelab.models import (Instance, QuarantineItem, Scanner, Series, Site, Study, Subject, Trial, Visit,
                            utcnow)
from corelab.register import flag_requalification
from corelab.series_files import newest_instance_rows, series_dir
from corelab.settings import Settings
from corelab.validate import (HELD_PREFIX_BYTES, REQUIRED_UIDS, SOP_CLASSES, ObjectFacts, Rejected, check_deflate,
                              extract_facts, finite, object_label, parse_object, safe_join, step)

_CODE_UNSAFE = re.compile(r"[^A-Z0-9_-]")
_WRITTEN = "corelab.ingest.written"
PARTIAL_CODES = ("too_large", "zip_bomb")  # quarantine holds only a prefix of these


@dataclass(frozen=True)
class Outcome:
    """What happened to one received object; ``source`` is its label (ordinal, sha256 prefix)."""

    source: str
    status: str  # stored | duplicate | new_version | quarantined
    series_uid: str | None = None
    reason_code: str | None = None
    reason: str | None = None


@dataclass
class IngestSummary:
    outcomes: list[Outcome] = field(default_factory=list)
    series_uids: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def as_dict(self) -> dict:
        return {
            "objects": len(self.outcomes),
            "stored": self.count("stored"),
            "duplicates": self.count("duplicate"),
            "new_versions": self.count("new_version"),
            "quarantined": self.count("quarantined"),
            "series": self.series_uids,
            "quarantine": [
                {"source": o.source, "reason_code": o.reason_code, "reason": o.reason}
                for o in self.outcomes if o.status == "quarantined"
            ],
        }


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def durable_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that once this returns the bytes survive a crash.

    Temporary file in the same folder, fsync, atomic rename, fsync of the folder: a half-written
    file is never visible under its final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- files written by a transaction are removed when it does not commit -----------------------------

def _forget_written(session: Session) -> None:
    # SQLAlchemy 2 also calls after_commit when a savepoint is released (the audit log appends in
    # one): only the outermost commit makes the files permanent
    if session.in_nested_transaction():
        return
    session.info[_WRITTEN] = []


def _remove_unless_committed(session: Session, transaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended: committed ones were forgotten
        for path in session.info.get(_WRITTEN, []):
            path.unlink(missing_ok=True)
        session.info[_WRITTEN] = []


def _write_tracked(session: Session, path: Path, data: bytes) -> None:
    """Durable write whose file is deleted again if the session's transaction rolls back."""
    if _WRITTEN not in session.info:
        session.info[_WRITTEN] = []
        event.listen(session, "after_commit", _forget_written)
        event.listen(session, "after_transaction_end", _remove_unless_committed)
    durable_write(path, data)
    session.info[_WRITTEN].append(path)


# --- looking up and creating rows (only for objects that passed every check) ---------------------------

def _trial_for(session: Session, protocol: str) -> Trial | None:
    if protocol:
        trial = session.exec(select(Trial).where(Trial.code == protocol)).first()
        if trial:
            return trial
    trials = session.exec(select(Trial)).all()
    return trials[0] if len(trials) == 1 else None


def _scanner_for(session: Session, site: Site, facts: ObjectFacts) -> Scanner | None:
    key = (facts.manufacturer, facts.model, facts.serial_number)
    if not all(key):
        return None
    scanner = session.exec(select(Scanner).where(Scanner.manufacturer == key[0], Scanner.model == key[1],
                                                 Scanner.serial_number == key[2])).first()
    if scanner is None:
        # A scanner the register does not know yet: record it, so QC finds it unaccredited. The
        # same make and model under a new serial at this site is a replaced or repaired scanner.
        sibling = session.exec(select(Scanner).where(Scanner.site_id == site.id, Scanner.manufacturer == key[0],
                                                     Scanner.model == key[1])).first()
        # A code as the register would accept one (A-Z, 0-9, '_', '-'; at most 32): it names paths.
        code = f"{site.code}-{_CODE_UNSAFE.sub('_', key[2].upper())}"[:32]
        if session.exec(select(Scanner.id).where(Scanner.code == code)).first() is not None:
            code = f"{code[:23]}-{sha256_bytes(key[2].encode())[:8].upper()}"  # two serials, one cleaned code
        scanner = Scanner(site_id=site.id, code=code, manufacturer=key[0], model=key[1], serial_number=key[2],
                          software_versions=facts.software_versions)
        session.add(scanner)
        session.flush()
        if sibling is not None:
            flag_requalification(session, scanner, (
                f"new serial number {key[2]} for the {key[1]} registered at {site.code} as {sibling.code} "
                f"(serial {sibling.serial_number}): send phantom scans to qualify it"), actor="ingest")
    scanner.last_seen = utcnow()
    return scanner


def _visit_for(session: Session, trial: Trial, site: Site, facts: ObjectFacts) -> Visit:
    subject = session.exec(select(Subject).where(Subject.trial_id == trial.id,
                                                 Subject.pseudonym == facts.subject)).first()
    if subject is None:
        subject = Subject(trial_id=trial.id, site_id=site.id, pseudonym=facts.subject)
        session.add(subject)
        session.flush()
    visit = session.exec(select(Visit).where(Visit.subject_id == subject.id, Visit.label == facts.visit_label)).first()
    if visit is None:
        visit = Visit(subject_id=subject.id, label=facts.visit_label)
        session.add(visit)
        session.flush()
    return visit


def _check_owner(session: Session, facts: ObjectFacts, site: Site, label: str) -> None:
    """The study and series UIDs must not already belong to another site or (series) another study."""
    study = session.exec(select(Study).where(Study.study_uid == facts.study_uid)).first()
    series = session.exec(select(Series).where(Series.series_uid == facts.series_uid)).first()
    other_study = series is not None and (study is None or series.study_id != study.id)
    if (study is not None and study.site_id not in (None, site.id)) or \
            (series is not None and series.site_id not in (None, site.id)) or other_study:
        raise Rejected("uid_conflict", f"{label}: its StudyInstanceUID or SeriesInstanceUID already belongs to "
                                       "another site's or another study's series; send it with the UIDs the "
                                       "scanner assigned, or ask the core lab to check the series")


def _check_instance(session: Session, facts: ObjectFacts, label: str) -> None:
    """A SOP Instance UID belongs to one series: only that series (so, after :func:`_check_owner`,
    the same study and site) may send a new version of it. Otherwise readers that take the newest
    version per SOP Instance UID would show another series' object, perhaps another site's."""
    held_in = session.exec(select(Series.series_uid).join(Instance, col(Instance.series_id) == Series.id)
                           .where(Instance.sop_instance_uid == facts.sop_instance_uid).distinct()).all()
    if any(uid != facts.series_uid for uid in held_in):
        raise Rejected("uid_conflict", f"{label}: its SOPInstanceUID is already held in another series; a new "
                                       "version must keep the Study and Series UIDs of the instance it replaces, "
                                       "and a new series (a re-reconstruction, another scan) needs new SOP Instance "
                                       "UIDs: export it again with new UIDs, or ask the core lab to check the series")


def _series_for(session: Session, facts: ObjectFacts, site: Site, trial: Trial | None, phantom: bool) -> Series:
    series = session.exec(select(Series).where(Series.series_uid == facts.series_uid)).first()
    if series is not None:
        return series
    study = session.exec(select(Study).where(Study.study_uid == facts.study_uid)).first()
    if study is None:
        visit_id = _visit_for(session, trial, site, facts).id if trial is not None and not phantom else None
        study = Study(study_uid=facts.study_uid, site_id=site.id, visit_id=visit_id, study_date=facts.study_date,
                      description=facts.study_description)
        session.add(study)
        session.flush()
    scanner = _scanner_for(session, site, facts)
    held = session.exec(select(QuarantineItem.id).where(QuarantineItem.series_uid == facts.series_uid,
                                                        col(QuarantineItem.released_at).is_(None))).first()
    # A series' trial, once: the trial of the study's visit (what QC, deviations and reports
    # join through), else the trial the object named (a phantom has no visit).
    visit_trial = (session.exec(select(Subject.trial_id).join(Visit, Visit.subject_id == Subject.id)
                                .where(Visit.id == study.visit_id)).first() if study.visit_id else None)
    series = Series(series_uid=facts.series_uid, study_id=study.id, site_id=site.id,
                    trial_id=visit_trial or (trial.id if trial else None),
                    scanner_id=scanner.id if scanner else None, modality=facts.modality,
                    kind="phantom" if phantom else ("trial" if trial else "unknown"),
                    description=facts.series_description, state="quarantined" if held else "receiving")
    session.add(series)
    session.flush()
    return series


# --- quarantine --------------------------------------------------------------------------------------

def _quarantine(session: Session, settings: Settings, data: bytes, rej: Rejected, *, label: str,
                site: Site | None, series_uid: str | None, keep: bool) -> Outcome:
    """Hold the object (or the prefix ``rej.held``) with its reason; mark its series if it is the sender's."""
    series = session.exec(select(Series).where(Series.series_uid == series_uid)).first() if series_uid else None
    if series is not None and (site is None or series.site_id not in (None, site.id)):
        series = None  # another site's series (uid_conflict): an intruder neither holds it nor completes it
    if series is not None:
        move(session, series, state="quarantined", actor="ingest", reason=rej.code)
        series.last_received_at = utcnow()  # the receiver's stability clock counts quarantined objects
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
        _write_tracked(session, path, held)
    return Outcome(label, "quarantined", shown_uid, rej.code, str(rej))


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
    trial = _trial_for(session, facts.protocol_id)
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
    _check_owner(session, facts, site, label)
    _check_instance(session, facts, label)
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

    Raises only for resource failures (``OSError`` writing the data directory, SQLAlchemy errors).
    """
    digest = sha256_bytes(data)
    label = object_label(ordinal, digest)
    try:
        if site is None:
            raise Rejected("unknown_site", f"{label}: sent by a site that is not registered; register it with "
                                           "`corelab site add SITE --ae-title AET`, then release the object")
        facts, trial, phantom, position = _checked(session, settings, data, label, site)
    except Rejected as rej:
        return _quarantine(session, settings, data, rej, label=label, site=site, series_uid=rej.series_uid,
                           keep=keep_rejected)
    series = _series_for(session, facts, site, trial, phantom)
    series.last_received_at = utcnow()  # stability clock of the receiver
    existing = session.exec(select(Instance).where(Instance.sop_instance_uid == facts.sop_instance_uid)
                            .order_by(col(Instance.version).desc())).all()
    if any(inst.sha256 == digest for inst in existing):
        return Outcome(label, "duplicate", series.series_uid)
    version = existing[0].version + 1 if existing else 1
    name = facts.sop_instance_uid + (f".v{version}" if version > 1 else "") + ".dcm"
    path = safe_join(series_dir(settings, series, session), name)
    # The row first: its unique (SOP Instance UID, version) makes a concurrent writer of the same
    # path wait or fail before either touches the file; the file is written before the commit.
    session.add(Instance(series_id=series.id, sop_instance_uid=facts.sop_instance_uid,
                         sop_class_uid=facts.sop_class_uid, version=version,
                         path=str(path.relative_to(settings.data_dir)), sha256=digest, size_bytes=len(data),
                         slice_position_mm=position, needs_review=version > 1))
    session.flush()
    _write_tracked(session, path, data)
    if fill_sheet is not None:
        series.kind = "phantom"
        fill_path = path.with_name("fill.yaml")
        if not fill_path.exists():
            _write_tracked(session, fill_path, fill_sheet)
    # In SQL, not in Python: concurrent receivers add to the same series without losing counts.
    series.instance_count = Series.instance_count + 1
    if series.state == "complete":  # a late instance reopens a completed series
        move(session, series, state="receiving", actor="ingest", reason="an object arrived after completion",
             detail={"sop_instance_uid": facts.sop_instance_uid, "version": version})
    if facts.expected_count is not None:
        series.expected_count = facts.expected_count
    return Outcome(label, "new_version" if version > 1 else "stored", series.series_uid)


def complete_series(session: Session, series: Series, *, actor: str = "ingest") -> None:
    """Mark a series complete and fix its checksum over the instances it holds (a quarantined
    series keeps its state, with the checksum and completeness of what it holds)."""
    digests = sorted(session.exec(select(Instance.sha256).where(Instance.series_id == series.id)).all())
    series.checksum = sha256_bytes("\n".join(digests).encode())
    # Newest version per SOP instance: a resent, corrected slice is not a repeated position.
    newest = newest_instance_rows(session, series)
    series.completeness = assess([inst.slice_position_mm for inst in newest], instance_count=len(newest),
                                 expected_count=series.expected_count)
    if series.state != "quarantined":
        move(session, series, state="complete", actor=actor, reason="series stable",
             detail={"instances": len(newest), "complete": series.completeness["complete"]})
    series.completed_at = utcnow()


# Objects of a drop committed together (see ingest_path).
COMMIT_EVERY = 50


def ingest_path(session: Session, settings: Settings, path: Path, *, site_code: str) -> IngestSummary:
    """Ingest a file, folder or zip dropped by a site; every series touched is completed at once.

    Each object is stored or quarantined on its own (see :func:`accept_object`); one bad object
    never stops the rest. Symbolic links are not followed, limits are checked while reading.
    """
    site = session.exec(select(Site).where(Site.code == site_code)).first()
    summary = IngestSummary()
    for obj in iter_drop(Path(path), Limits.from_settings(settings)):
        if obj.rejected is not None:
            outcome = _quarantine(session, settings, b"", obj.rejected, label=obj.label, site=site,
                                  series_uid=None, keep=True)
        else:
            outcome = accept_object(session, settings, obj.data, site=site, ordinal=obj.ordinal,
                                    fill_sheet=obj.fill)
        summary.outcomes.append(outcome)
        if outcome.series_uid and outcome.series_uid not in summary.series_uids:
            summary.series_uids.append(outcome.series_uid)
        if len(summary.outcomes) % COMMIT_EVERY == 0:
            # A large drop must not hold the store's write lock for minutes (SQLite has one lock:
            # the DICOM node would answer "out of resources" meanwhile). Each object stands on its
            # own, so committing what is done loses nothing; series are completed at the end (or,
            # after a crash, by the node's stability ticker).
            session.commit()
    for uid in summary.series_uids:
        series = session.exec(select(Series).where(Series.series_uid == uid)).first()
        if series is not None:
            complete_series(session, series)
    return summary


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
