"""The index rows a stored object belongs to: trial, scanner, subject, visit, study, series.

Only for objects that passed every check (:mod:`corelab.ingest` calls these after
:mod:`corelab.validate` and :mod:`corelab.deid`), except :func:`check_owner` and
:func:`check_instance`, which are two of those checks: a study, series or SOP instance UID
already held for another site or series is refused before any row is created.
"""

from __future__ import annotations

import re

from sqlmodel import Session, col, select

from corelab.models import Instance, QuarantineItem, Scanner, Series, Site, Study, Subject, Trial, Visit, utcnow
from corelab.register import flag_requalification
from corelab.spool_io import sha256_bytes
from corelab.validate import ObjectFacts, Rejected

__all__ = ["check_instance", "check_owner", "series_for", "trial_for"]

_CODE_UNSAFE = re.compile(r"[^A-Z0-9_-]")


def trial_for(session: Session, protocol: str) -> Trial | None:
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


def _uid_conflict(label: str, series_uid: str | None = None) -> Rejected:
    rej = Rejected("uid_conflict", f"{label}: its StudyInstanceUID or SeriesInstanceUID already belongs to "
                                    "another site's or another study's series; send it with the UIDs the "
                                    "scanner assigned, or ask the core lab to check the series")
    rej.series_uid = series_uid
    return rej


def _foreign_series(series_site: int | None, series_study_uid: str | None, facts: ObjectFacts, site: Site) -> bool:
    return series_site not in (None, site.id) or series_study_uid != facts.study_uid


def check_owner(session: Session, facts: ObjectFacts, site: Site, label: str) -> None:
    """The study and series UIDs must not already belong to another site or (series) another study.

    The series and its study's UID are read in one statement: read apart, a rival writer of the
    same new series (another association, another STOW-RS request) could commit between the two
    reads, and its series would look like one of another study.
    """
    held = session.exec(select(Series.site_id, Study.study_uid).outerjoin(Study, col(Series.study_id) == Study.id)
                        .where(Series.series_uid == facts.series_uid)).first()
    study_site = session.exec(select(Study.site_id).where(Study.study_uid == facts.study_uid)).first()
    if (held is not None and _foreign_series(held[0], held[1], facts, site)) or study_site not in (None, site.id):
        raise _uid_conflict(label)


def check_instance(session: Session, facts: ObjectFacts, label: str) -> None:
    """A SOP Instance UID belongs to one series: only that series (so, after :func:`check_owner`,
    the same study and site) may send a new version of it. Otherwise readers that take the newest
    version per SOP Instance UID would show another series' object, perhaps another site's."""
    held_in = session.exec(select(Series.series_uid).join(Instance, col(Instance.series_id) == Series.id)
                           .where(Instance.sop_instance_uid == facts.sop_instance_uid).distinct()).all()
    if any(uid != facts.series_uid for uid in held_in):
        raise Rejected("uid_conflict", f"{label}: its SOPInstanceUID is already held in another series; a new "
                                       "version must keep the Study and Series UIDs of the instance it replaces, "
                                       "and a new series (a re-reconstruction, another scan) needs new SOP Instance "
                                       "UIDs: export it again with new UIDs, or ask the core lab to check the series")


def series_for(session: Session, facts: ObjectFacts, site: Site, trial: Trial | None, phantom: bool,
               label: str) -> Series:
    """The series the object belongs to, created (with its study, subject and visit) if new.

    Raises :class:`Rejected` (``uid_conflict``) when the rows it would use belong to another site
    or study: :func:`check_owner` ran before, but a rival may have committed them since.
    """
    series = session.exec(select(Series).where(Series.series_uid == facts.series_uid)).first()
    if series is not None:
        study_uid = session.exec(select(Study.study_uid).where(Study.id == series.study_id)).first()
        if _foreign_series(series.site_id, study_uid, facts, site):
            raise _uid_conflict(label, facts.series_uid)
        return series
    study = session.exec(select(Study).where(Study.study_uid == facts.study_uid)).first()
    if study is not None and study.site_id not in (None, site.id):
        raise _uid_conflict(label, facts.series_uid)
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

