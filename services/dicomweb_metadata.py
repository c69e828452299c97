"""The stored instances a DICOMweb read serves (WADO-RS look-ups), their spool files and headers.

What a reader may see is decided by :func:`services.access.restrict` (a site its own studies, a
physicist every site), in SQL, on the row that owns the object: ``Study.site_id`` for a study,
``Series.site_id`` for a series and its instances. A study, series or instance the caller may
not see is not found, exactly as one that does not exist.

Only stored objects are served (an ``Instance`` row: a quarantined object never has one), and of
each SOP instance only its newest version (the newest version in its series, the rule of
:func:`corelab.series_files.newest_instance_rows`). A spool file that is missing, not its indexed
size or not readable is a :class:`~services.dicomweb_match.DicomwebError` 500 naming the series
and what the core lab must do, raised before any answer starts (:func:`check_spool_files`).
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from corelab.models import Instance, Series, Study
from corelab.settings import Settings
from corelab.validate import safe_join
from services.access import Scope, restrict
from services.dicomweb_match import DicomwebError

LOG = logging.getLogger("corelab.dicomweb")
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
"""Binary elements longer than this (bytes) are bulk data: left out of QIDO and metadata answers."""


def newest():
    """SQL condition: the Instance row is the newest version of its SOP instance in its series."""
    newer = aliased(Instance)
    return ~select(newer.id).where(newer.series_id == Instance.series_id,
                                   newer.sop_instance_uid == Instance.sop_instance_uid,
                                   newer.version > Instance.version).exists()


def visible_study(session: Session, scope: Scope, study_uid: str) -> Study:
    """The study, if it exists and ``scope`` may see it; else 404."""
    stmt = restrict(select(Study).where(Study.study_uid == study_uid), scope, site_id=Study.site_id)
    study = session.exec(stmt).first()
    if study is None:
        raise DicomwebError(404, "no such study (or not one you may see)")
    return study


def visible_series(session: Session, scope: Scope, study_uid: str, series_uid: str) -> Series:
    """The series of that study, if ``scope`` may see it; else 404."""
    stmt = restrict(select(Series).join(Study, Study.id == Series.study_id)
                    .where(Study.study_uid == study_uid, Series.series_uid == series_uid),
                    scope, site_id=Series.site_id, trial_id=Series.trial_id)
    series = session.exec(stmt).first()
    if series is None:
        raise DicomwebError(404, "no such series in that study (or not one you may see)")
    return series


def instances(session: Session, scope: Scope, study_uid: str, series_uid: str | None = None,
              sop_uid: str | None = None) -> list[Instance]:
    """The newest stored version of each instance of the study, series or one instance, in the
    order received; 404 when there is none the scope may see."""
    stmt = (select(Instance).join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
            .where(Study.study_uid == study_uid, newest()))
    if series_uid is not None:
        stmt = stmt.where(Series.series_uid == series_uid)
    if sop_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_uid)
    stmt = restrict(stmt, scope, site_id=Series.site_id, trial_id=Series.trial_id)
    rows = list(session.exec(stmt.order_by(col(Series.id), col(Instance.id))))
    if not rows:
        what = "instance" if sop_uid else "series" if series_uid else "study"
        raise DicomwebError(404, f"no such {what} (or not one you may see)")
    return rows


def stored_path(settings: Settings, inst: Instance) -> Path:
    """The spool file of an instance (its stored relative path, re-checked to stay in the data directory)."""
    return safe_join(settings.data_dir, *PurePosixPath(inst.path).parts)


def spool_fault(session: Session, inst: Instance, why: str) -> DicomwebError:
    """The 500 for an instance whose spool file cannot be served, logged for the core lab.

    The answer names the series UID (what the core lab looks up) and the fix, never a path or a
    header value; the log adds the instance row.
    """
    series = session.get(Series, inst.series_id)
    series_uid = series.series_uid if series is not None else "?"
    LOG.error("dicomweb: the spool file of instance row %s (series %s) is %s", inst.id, series_uid, why)
    return DicomwebError(500, f"series {series_uid}: a stored file of this series is {why}, so it cannot be "
                              "served; the core lab must restore the spool file from its backup (or have the "
                              "site send the series again); the portal's log names the instance row")


def check_spool_files(session: Session, settings: Settings, rows: list[Instance]) -> list[Path]:
    """The spool file of each row, after checking that every one exists with its indexed size.

    Raises :class:`DicomwebError` 500 (see :func:`spool_fault`) for the first that does not, so a
    streamed answer never starts with a file it cannot finish.
    """
    paths = []
    for inst in rows:
        path = stored_path(settings, inst)
        if not path.is_file():
            raise spool_fault(session, inst, "missing")
        if path.stat().st_size != inst.size_bytes:
            raise spool_fault(session, inst, "not its recorded size (damaged)")
        paths.append(path)
    return paths


def read_header(session: Session, settings: Settings, inst: Instance) -> Dataset:
    """The stored header of an instance (no pixel data); a missing, damaged or unreadable spool
    file is a :class:`DicomwebError` 500 (see :func:`spool_fault`)."""
    (path,) = check_spool_files(session, settings, [inst])
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
        raise spool_fault(session, inst, "not readable as DICOM (damaged)") from None


def transfer_syntax(path: Path) -> str:
    """The transfer syntax a stored file is written in (from its file meta)."""
    return str(read_file_meta_info(path).TransferSyntaxUID)


def is_bulk(elem) -> bool:
    return elem.VR in BULK_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD


def without_bulk(ds: Dataset) -> Dataset:
    """``ds`` with binary elements over :data:`BULK_THRESHOLD` bytes removed, at every depth."""
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                without_bulk(item)
        elif is_bulk(elem):
            del ds[elem.tag]
    return ds


def metadata(path: Path) -> dict:
    """DICOM JSON of a stored file's header: no pixel data, no bulk data."""
    return without_bulk(pydicom.dcmread(path, stop_before_pixels=True)).to_json_dict(suppress_invalid_tags=True)
