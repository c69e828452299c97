"""Receiving objects into the spool: checksum, dedupe, quarantine, index.

One function, :func:`accept_object`, takes the bytes of one object as a site sent it and either
stores it durably in the spool (temporary file, fsync, rename, then the index row) or puts it in
quarantine with a reason that names the file and the fix. The file drop (:func:`ingest_path`)
and, later, the DICOM receiver both go through it, so they apply the same checks to the same store.
Nothing is dropped: every object ends up either in the spool or in quarantine.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.errors import InvalidDicomError
from sqlmodel import Session, col, select

from corelab.completeness import assess, slice_position_mm
from corelab.deid import DeidPolicy, check_deidentified, is_phantom
from corelab.models import (Instance, QuarantineItem, Scanner, Series, Site, Study, Subject, Trial, Visit,
                            utcnow)
from corelab.register import flag_requalification
from corelab.settings import Settings

SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.128": "PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
FILL_SHEET_SUFFIX = ".fill.yaml"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Outcome:
    """What happened to one received object."""

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


class Rejected(Exception):
    """An object that must go to quarantine; ``code`` is machine-readable, the message says the fix."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


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


def _expected_pixel_bytes(ds) -> int | None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8 * frames
    except (AttributeError, TypeError, ValueError):
        return None


def _wrong_vr_keywords(ds) -> list[str]:
    """Standard top-level elements whose explicit VR contradicts the data dictionary (keywords only).

    Reads the raw elements' VRs without decoding their values; implicit-VR objects carry none.
    """
    wrong = []
    for tag in ds.keys():
        if tag.is_private or tag.group in (0x0002, 0xFFFE):
            continue
        vr = getattr(ds.get_item(tag), "VR", None)
        if vr in (None, "UN"):
            continue
        try:
            allowed = dictionary_VR(tag)
        except KeyError:
            continue
        if vr not in allowed.split(" or "):
            wrong.append(keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})")
    return wrong


def parse_object(data: bytes, source: str):
    """Parse and validate one object; raise :class:`Rejected` with the reason and the fix."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise Rejected("not_dicom", f"{source}: not a DICOM file (no DICM preamble or readable header); "
                                    "send DICOM Part 10 files only") from None
    except Exception as exc:  # pydicom raises many types on cut-off data
        raise Rejected("truncated", f"{source}: the DICOM data ends early or is corrupt ({type(exc).__name__}); "
                                    "send the file again") from None
    missing = [kw for kw in REQUIRED_UIDS if not str(ds.get(kw, "")).strip()]
    if len(missing) == len(REQUIRED_UIDS):  # bytes behind a preamble that decode to no DICOM at all
        raise Rejected("not_dicom", f"{source}: not a DICOM object (none of {', '.join(REQUIRED_UIDS)} is "
                                    "readable); send DICOM Part 10 files only")
    if missing:
        raise Rejected("missing_uid", f"{source}: missing {', '.join(missing)}; "
                                      "export the series again from the scanner or PACS")
    if ds.SOPClassUID not in SOP_CLASSES:
        raise Rejected("unknown_sop_class", f"{source}: SOP class {ds.SOPClassUID} is not accepted; "
                                            "send the images as one of: "
                                            f"{', '.join(sorted(set(SOP_CLASSES.values())))}")
    wrong = _wrong_vr_keywords(ds)
    if wrong:
        raise Rejected("wrong_vr", f"{source}: {', '.join(wrong)} encoded with the wrong value representation; "
                                   "export the series again from the scanner or PACS")
    if not any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Rejected("truncated", f"{source}: no pixel data (the file ends before the image); send it again")
    if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = _expected_pixel_bytes(ds)
        if expected is not None and len(ds.PixelData) < expected:
            raise Rejected("truncated", f"{source}: pixel data has {len(ds.PixelData)} of {expected} bytes; "
                                        "the file was cut off in transfer, send it again")
    return ds


def _trial_for(session: Session, ds) -> Trial | None:
    protocol = str(ds.get("ClinicalTrialProtocolID", "")).strip()
    if protocol:
        trial = session.exec(select(Trial).where(Trial.code == protocol)).first()
        if trial:
            return trial
    trials = session.exec(select(Trial)).all()
    return trials[0] if len(trials) == 1 else None


def _scanner_for(session: Session, site: Site, ds) -> Scanner | None:
    key = (str(ds.get("Manufacturer", "")).strip(), str(ds.get("ManufacturerModelName", "")).strip(),
           str(ds.get("DeviceSerialNumber", "")).strip())
    if not all(key):
        return None
    scanner = session.exec(select(Scanner).where(Scanner.manufacturer == key[0], Scanner.model == key[1],
                                                 Scanner.serial_number == key[2])).first()
    if scanner is None:
        # A scanner the register does not know yet: record it, so QC finds it unaccredited. The
        # same make and model under a new serial at this site is a replaced or repaired scanner.
        sibling = session.exec(select(Scanner).where(Scanner.site_id == site.id, Scanner.manufacturer == key[0],
                                                     Scanner.model == key[1])).first()
        scanner = Scanner(site_id=site.id, code=f"{site.code}-{_SAFE.sub('_', key[2])}", manufacturer=key[0],
                          model=key[1], serial_number=key[2],
                          software_versions=str(ds.get("SoftwareVersions", "")))
        session.add(scanner)
        session.flush()
        if sibling is not None:
            flag_requalification(session, scanner, (
                f"new serial number {key[2]} for the {key[1]} registered at {site.code} as {sibling.code} "
                f"(serial {sibling.serial_number}): send phantom scans to qualify it"), actor="ingest")
    scanner.last_seen = utcnow()
    return scanner


def _dicom_date(value) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


def _series_for(session: Session, ds, site: Site, trial: Trial | None) -> Series:
    series = session.exec(select(Series).where(Series.series_uid == ds.SeriesInstanceUID)).first()
    if series is not None:
        return series
    study = session.exec(select(Study).where(Study.study_uid == ds.StudyInstanceUID)).first()
    phantom = is_phantom(ds)
    if study is None:
        visit_id = None
        if trial is not None and not phantom:
            visit_id = _visit_for(session, trial, site, ds).id
        study = Study(study_uid=ds.StudyInstanceUID, site_id=site.id, visit_id=visit_id,
                      study_date=_dicom_date(ds.get("StudyDate")),
                      description=str(ds.get("StudyDescription", "")))
        session.add(study)
        session.flush()
    scanner = _scanner_for(session, site, ds)
    series = Series(series_uid=ds.SeriesInstanceUID, study_id=study.id, site_id=site.id,
                    scanner_id=scanner.id if scanner else None, modality=str(ds.get("Modality", "")),
                    kind="phantom" if phantom else ("trial" if trial else "unknown"),
                    description=str(ds.get("SeriesDescription", "")))
    session.add(series)
    session.flush()
    return series


def _visit_for(session: Session, trial: Trial, site: Site, ds) -> Visit:
    pseudonym = str(ds.get("ClinicalTrialSubjectID", "") or ds.get("PatientID", "")).strip()
    subject = session.exec(select(Subject).where(Subject.trial_id == trial.id, Subject.pseudonym == pseudonym)).first()
    if subject is None:
        subject = Subject(trial_id=trial.id, site_id=site.id, pseudonym=pseudonym)
        session.add(subject)
        session.flush()
    label = str(ds.get("ClinicalTrialTimePointID", "")).strip() or "unspecified"
    visit = session.exec(select(Visit).where(Visit.subject_id == subject.id, Visit.label == label)).first()
    if visit is None:
        visit = Visit(subject_id=subject.id, label=label)
        session.add(visit)
        session.flush()
    return visit


def _quarantine(session: Session, settings: Settings, data: bytes, *, source: str, site: Site | None,
                code: str, reason: str, series: Series | None = None) -> Outcome:
    digest = sha256_bytes(data)
    if series is not None:
        series.state = "quarantined"
    held = session.exec(select(QuarantineItem).where(QuarantineItem.sha256 == digest,
                                                     col(QuarantineItem.released_at).is_(None))).first()
    if held is not None:  # the same bytes are already held: sending them again changes nothing
        return Outcome(source, "quarantined", held.series_uid, held.reason_code, held.reason)
    rel = Path("quarantine") / utcnow().strftime("%Y-%m-%d") / f"{digest[:16]}-{_SAFE.sub('_', Path(source).name)}"
    durable_write(settings.data_dir / rel, data)
    session.add(QuarantineItem(site_id=site.id if site else None, source_name=Path(source).name, path=str(rel),
                               series_uid=series.series_uid if series else None, sha256=digest,
                               reason_code=code, reason=reason))
    return Outcome(source, "quarantined", series.series_uid if series else None, code, reason)


def accept_object(session: Session, settings: Settings, data: bytes, *, source: str, site: Site | None,
                  fill_sheet: bytes | None = None, keep_rejected: bool = True) -> Outcome:
    """Store one received object, or quarantine it with its reason; never raise for bad input.

    ``keep_rejected=False`` (a release from quarantine) reports a rejection without writing the
    object to quarantine a second time.
    """
    def quarantine(session, settings, data, **kwargs) -> Outcome:
        if keep_rejected:
            return _quarantine(session, settings, data, **kwargs)
        series = kwargs.get("series")
        return Outcome(kwargs["source"], "quarantined", series.series_uid if series else None,
                       kwargs["code"], kwargs["reason"])

    if site is None:
        return quarantine(session, settings, data, source=source, site=None, code="unknown_site",
                          reason=f"{source}: sent by a site that is not registered; register it with "
                                 "`corelab site add SITE --ae-title AET`, then release the file")
    try:
        ds = parse_object(data, source)
    except Rejected as rej:
        return quarantine(session, settings, data, source=source, site=site, code=rej.code, reason=str(rej))
    trial = _trial_for(session, ds)
    series = _series_for(session, ds, site, trial)
    series.last_received_at = utcnow()  # stability clock of the receiver, quarantined objects included
    failures = check_deidentified(ds, policy=DeidPolicy.from_dict(trial.deid_policy if trial else None,
                                                                  pseudonym_pattern=trial.pseudonym_pattern if trial else ""))
    if failures:
        names = "; ".join(str(f) for f in failures)
        return quarantine(session, settings, data, source=source, site=site, code="deid_failed", series=series,
                          reason=f"{source}: de-identification check failed: {names}. Re-export the series "
                                 "through the trial's de-identification profile and send it again")
    digest = sha256_bytes(data)
    existing = session.exec(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
                            .order_by(col(Instance.version).desc())).all()
    if any(inst.sha256 == digest for inst in existing):
        return Outcome(source, "duplicate", series.series_uid)
    version = existing[0].version + 1 if existing else 1
    rel_dir = Path("spool") / _SAFE.sub("_", ds.StudyInstanceUID) / _SAFE.sub("_", ds.SeriesInstanceUID)
    name = _SAFE.sub("_", ds.SOPInstanceUID) + (f".v{version}" if version > 1 else "") + ".dcm"
    durable_write(settings.data_dir / rel_dir / name, data)
    if fill_sheet is not None:
        series.kind = "phantom"
        fill_path = settings.data_dir / rel_dir / "fill.yaml"
        if not fill_path.exists():
            durable_write(fill_path, fill_sheet)
    session.add(Instance(series_id=series.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                         version=version, path=str(rel_dir / name), sha256=digest, size_bytes=len(data),
                         slice_position_mm=slice_position_mm(ds),
                         needs_review=version > 1))
    # In SQL, not in Python: concurrent receivers add to the same series without losing counts.
    series.instance_count = Series.instance_count + 1
    if series.state == "complete":  # a late instance reopens a completed series
        series.state = "receiving"
    for keyword in ("NumberOfSlices", "ImagesInAcquisition"):
        if ds.get(keyword):
            series.expected_count = int(ds.get(keyword))
            break
    return Outcome(source, "new_version" if version > 1 else "stored", series.series_uid)


def series_dir(settings: Settings, series: Series, session: Session) -> Path:
    study = session.get(Study, series.study_id)
    return settings.data_dir / "spool" / _SAFE.sub("_", study.study_uid) / _SAFE.sub("_", series.series_uid)


def complete_series(session: Session, series: Series) -> None:
    """Mark a series complete and fix its checksum over the instances it holds."""
    digests = sorted(session.exec(select(Instance.sha256).where(Instance.series_id == series.id)).all())
    series.checksum = sha256_bytes("\n".join(digests).encode())
    # Newest version per SOP instance: a resent, corrected slice is not a repeated position.
    newest: dict[str, tuple[int, float | None]] = {}
    for uid, version, position in session.exec(select(Instance.sop_instance_uid, Instance.version,
                                                      Instance.slice_position_mm)
                                               .where(Instance.series_id == series.id)):
        if uid not in newest or version > newest[uid][0]:
            newest[uid] = (version, position)
    series.completeness = assess([p for _, p in newest.values()], instance_count=len(newest),
                                 expected_count=series.expected_count)
    if series.state != "quarantined":
        series.state = "complete"
    series.completed_at = utcnow()


def iter_drop(path: Path) -> Iterator[tuple[str, bytes, bytes | None]]:
    """Yield ``(source name, bytes, fill sheet bytes or None)`` for every file below ``path``.

    Zip archives are opened; a fill sheet ``X.fill.yaml`` applies to the objects in folder ``X``
    beside it (or in the folder that holds it).
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    fills = {p.with_name(p.name[: -len(FILL_SHEET_SUFFIX)]): p.read_bytes()
             for p in files if p.name.endswith(FILL_SHEET_SUFFIX)}
    fills.update({p.parent: p.read_bytes() for p in files if p.name.endswith(FILL_SHEET_SUFFIX)
                  and p.parent not in fills})
    for file in files:
        if file.name.endswith(FILL_SHEET_SUFFIX) or file.name.startswith("."):
            continue
        fill = next((fills[d] for d in (file.parent, *file.parents) if d in fills), None)
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                for member in archive.infolist():
                    if not member.is_dir():
                        yield f"{file.name}:{member.filename}", archive.read(member), fill
        else:
            yield str(file.relative_to(path) if path.is_dir() else file.name), file.read_bytes(), fill


def ingest_path(session: Session, settings: Settings, path: Path, *, site_code: str) -> IngestSummary:
    """Ingest a file, folder or zip dropped by a site; every series touched is completed at once."""
    site = session.exec(select(Site).where(Site.code == site_code)).first()
    summary = IngestSummary()
    for source, data, fill in iter_drop(path):
        outcome = accept_object(session, settings, data, source=source, site=site, fill_sheet=fill)
        summary.outcomes.append(outcome)
        if outcome.series_uid and outcome.series_uid not in summary.series_uids:
            summary.series_uids.append(outcome.series_uid)
    for uid in summary.series_uids:
        complete_series(session, session.exec(select(Series).where(Series.series_uid == uid)).one())
    return summary


def release_quarantined(session: Session, settings: Settings, item: QuarantineItem, *,
                        site_code: str | None = None) -> Outcome:
    """Try a quarantined object again, after the physicist fixed the cause (e.g. registered the site).

    The object goes through every check again; if it fails again it stays in quarantine with the
    new reason, and the old item is kept.
    """
    data = (settings.data_dir / item.path).read_bytes()
    if site_code:
        site = session.exec(select(Site).where(Site.code == site_code)).first()
    else:
        site = session.get(Site, item.site_id) if item.site_id else None
    outcome = accept_object(session, settings, data, source=item.source_name, site=site, keep_rejected=False)
    if outcome.status == "quarantined":
        item.reason_code, item.reason = outcome.reason_code, outcome.reason
    else:
        item.released_at = utcnow()
        if outcome.series_uid:
            complete_series(session, session.exec(select(Series).where(Series.series_uid == outcome.series_uid)).one())
    return outcome


__all__ = ["Outcome", "IngestSummary", "Rejected", "accept_object", "ingest_path", "complete_series",
           "durable_write", "iter_drop", "parse_object", "release_quarantined", "series_dir",
           "SOP_CLASSES", "shutil"]
