"""DICOMweb reads over the store (PS3.18 QIDO-RS search, WADO-RS retrieve and metadata), one scope rule.

What a reader may see is decided by :func:`services.access.restrict` (a site its own studies, a
physicist every site), in SQL, on the row that owns the object: ``Study.site_id`` for a study,
``Series.site_id`` for a series and its instances. A study, series or instance the caller may
not see is not found, exactly as one that does not exist.

Only stored objects are served (an ``Instance`` row: a quarantined object never has one), and of
each SOP instance only its newest version, by the rule of :func:`corelab.series_files.newest_instance_rows`
(the newest version in its series). Attributes come from the store (UIDs, dates, pseudonyms,
descriptions, counts) and, for the rest (StudyTime, SeriesNumber, InstanceNumber, Rows,
``includefield``), from one stored file's header read without pixel data. Binary elements over
:data:`BULK_THRESHOLD` bytes are left out of every JSON answer (no bulk data is served).

Matching keys (values validated; anything else is a :class:`DicomwebError` 400):

    StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID   UID lists (comma separated or repeated)
    StudyDate          YYYYMMDD, or a range YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-
    PatientID          the subject pseudonym; * and ? wildcards
    Modality           (ModalitiesInStudy at the study level) one or more codes
    limit, offset, includefield (keyword, tag or ``all``), fuzzymatching (accepted, matching stays exact)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from sqlalchemy import distinct, func
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from corelab.models import Instance, Series, Study, Subject, Visit
from corelab.settings import Settings
from corelab.validate import is_valid_uid, safe_join
from services import paging
from services.access import Scope, restrict

LEVELS = ("study", "series", "instance")
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
"""Binary elements longer than this (bytes) are bulk data: left out of QIDO and metadata answers."""

MATCH_LEVEL = {"StudyInstanceUID": "study", "PatientID": "study", "StudyDate": "study", "ModalitiesInStudy": "study",
               "SeriesInstanceUID": "series", "Modality": "series", "SOPInstanceUID": "instance",
               "SOPClassUID": "instance"}
UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_UID_RULE = "one DICOM UID: digits and dots, no empty or zero-led component, at most 64 characters"

# The attributes each level answers by default (PS3.18 table 10.6.3-3 and what viewers list).
STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientName", "PatientID",
                "StudyID", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances", "RetrieveURL")
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                 "NumberOfSeriesRelatedInstances", "RetrieveURL")
INSTANCE_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SOPClassUID", "SOPInstanceUID",
                   "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "RetrieveURL")
# Across studies (/series, /instances) a viewer also needs the study a row belongs to.
STUDY_CONTEXT = ("StudyDate", "PatientID", "PatientName")

_PLURAL = {"study": "studies", "series": "series", "instance": "instances"}
_DATE = re.compile(r"\d{8}")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")
_PATIENT_ID = re.compile(r"[^\\\x00-\x1f\x7f]{1,64}")


class DicomwebError(ValueError):
    """A request that cannot be answered as asked: ``status`` (400, 404) and what to do instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class QidoQuery:
    """A validated QIDO-RS query at one level."""

    level: str
    uids: dict[str, list[str]] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    patient_id: str | None = None
    dates: tuple[date | None, date | None] | None = None
    include: list[str] = field(default_factory=list)
    include_all: bool = False
    limit: int = 100
    offset: int = 0


def check_uid(value: str, what: str) -> str:
    """``value`` if it is one valid UID, else a 400 naming ``what`` and the rule (never echoing the value)."""
    if not is_valid_uid(value):
        raise DicomwebError(400, f"{what} is not a valid UID ({_UID_RULE})")
    return value


def _keyword(name: str, what: str) -> str:
    """A DICOM keyword from a keyword or an 8-hex-digit tag; 400 for anything else."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    elif re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,63}", name) and tag_for_keyword(name) is not None:
        return name
    raise DicomwebError(400, f"{what}: not a DICOM attribute keyword or tag (e.g. StudyDate or 00080020)")


def _date(text: str) -> date:
    if not _DATE.fullmatch(text):
        raise DicomwebError(400, "StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either end may be left out)")
    try:
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise DicomwebError(400, "StudyDate is not a calendar date (YYYYMMDD)") from None


def _date_range(text: str) -> tuple[date | None, date | None]:
    low, dash, high = text.partition("-")
    if not dash:
        day = _date(low)
        return day, day
    if not low and not high:
        raise DicomwebError(400, "StudyDate range has neither end: give YYYYMMDD-, -YYYYMMDD or both")
    first, last = (_date(low) if low else None), (_date(high) if high else None)
    if first and last and first > last:
        raise DicomwebError(400, "StudyDate range ends before it starts: give the earlier date first")
    return first, last


def _int(text: str, name: str, low: int, high: int) -> int:
    if not re.fullmatch(r"\d{1,9}", text) or not low <= int(text) <= high:
        raise DicomwebError(400, f"{name} must be a whole number from {low} to {high}")
    return int(text)


def parse_query(items: list[tuple[str, str]], level: str) -> QidoQuery:
    """Validate the query parameters of a search at ``level`` (study, series, instance).

    Raises :class:`DicomwebError` (400) for an unknown parameter, a key of a lower level, a
    malformed UID, date, modality, pseudonym, limit or offset, or an attribute not in the dictionary.
    """
    query = QidoQuery(level)
    seen: set[str] = set()
    for name, value in items:
        if name in ("limit", "offset", "fuzzymatching") and name in seen:
            raise DicomwebError(400, f"{name} is given more than once: give it once")
        seen.add(name)
        if name == "limit":
            query.limit = _int(value, "limit", 1, paging.MAX_LIMIT)
        elif name == "offset":
            query.offset = _int(value, "offset", 0, 10_000_000)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise DicomwebError(400, "fuzzymatching must be true or false")
        elif name == "includefield":
            for part in filter(None, (p.strip() for p in value.split(","))):
                if part == "all":
                    query.include_all = True
                else:
                    query.include.append(_keyword(part, "includefield"))
        else:
            _add_match(query, _keyword(name, "query parameter"), value)
    return query


def _add_match(query: QidoQuery, key: str, value: str) -> None:
    if key == "Modality" and query.level == "study":
        key = "ModalitiesInStudy"
    if key not in MATCH_LEVEL:
        raise DicomwebError(400, f"{key} is not a matching key here; corelab matches on {', '.join(MATCH_LEVEL)}")
    if LEVELS.index(MATCH_LEVEL[key]) > LEVELS.index(query.level):
        level = MATCH_LEVEL[key]
        raise DicomwebError(400, f"{key} is matched at the {level} level: search /{_PLURAL[level]} to match on it")
    if value == "":
        query.include.append(key)  # universal matching: the attribute is returned, nothing is filtered
        return
    if key in UID_KEYS:
        query.uids.setdefault(key, []).extend(check_uid(v.strip(), key) for v in re.split(r"[,\\]", value))
    elif key in ("Modality", "ModalitiesInStudy"):
        for code in re.split(r"[,\\]", value):
            if not _MODALITY.fullmatch(code.strip()):
                raise DicomwebError(400, f"{key} must be modality codes such as PT or CT (upper case)")
            query.modalities.append(code.strip())
    elif key == "PatientID":
        if query.patient_id is not None or not _PATIENT_ID.fullmatch(value):
            raise DicomwebError(400, "PatientID must be given once, 1-64 characters without backslash or control "
                                     "characters (* and ? are wildcards)")
        query.patient_id = value
    else:  # StudyDate
        if query.dates is not None:
            raise DicomwebError(400, "StudyDate is given more than once: give one date or one range")
        query.dates = _date_range(value)


# --- the store -------------------------------------------------------------------------------------

def _newest():
    """Instance rows that are the newest version of their SOP instance in their series."""
    newer = aliased(Instance)
    return ~select(newer.id).where(newer.series_id == Instance.series_id,
                                   newer.sop_instance_uid == Instance.sop_instance_uid,
                                   newer.version > Instance.version).exists()


def _with_study_context(stmt):
    return (stmt.join(Visit, Visit.id == Study.visit_id, isouter=True)
            .join(Subject, Subject.id == Visit.subject_id, isouter=True))


def _study_filters(stmt, query: QidoQuery):
    if "StudyInstanceUID" in query.uids:
        stmt = stmt.where(col(Study.study_uid).in_(query.uids["StudyInstanceUID"]))
    if query.dates is not None:
        first, last = query.dates
        if first:
            stmt = stmt.where(col(Study.study_date) >= first)
        if last:
            stmt = stmt.where(col(Study.study_date) <= last)
    if query.patient_id is not None:
        if "*" in query.patient_id or "?" in query.patient_id:
            pattern = re.sub(r"([\\%_])", r"\\\1", query.patient_id).replace("*", "%").replace("?", "_")
            stmt = stmt.where(col(Subject.pseudonym).like(pattern, escape="\\"))
        else:
            stmt = stmt.where(Subject.pseudonym == query.patient_id)
    return stmt


def _stored_series():
    return select(Instance.id).where(Instance.series_id == Series.id).exists()


def search(session: Session, settings: Settings, scope: Scope, query: QidoQuery, *, base_url: str,
           study_uid: str | None = None, series_uid: str | None = None) -> list[dict]:
    """One page of QIDO-RS results (DICOM JSON objects) for ``query``, within ``study_uid`` /
    ``series_uid`` when the path names them (404 when it names one the scope may not see)."""
    if study_uid is not None:
        visible_study(session, scope, study_uid)
    if series_uid is not None:
        visible_series(session, scope, study_uid, series_uid)
    if query.level == "study":
        stmt = _with_study_context(select(Study, Subject).where(
            select(Series.id).where(Series.study_id == Study.id, _stored_series()).exists()))
        if query.modalities:
            stmt = stmt.where(select(Series.id).where(Series.study_id == Study.id, _stored_series(),
                                                      col(Series.modality).in_(query.modalities)).exists())
        stmt = restrict(_study_filters(stmt, query), scope, site_id=Study.site_id).order_by(col(Study.id))
        _total, rows = paging.page(session, stmt, limit=query.limit, offset=query.offset)
        return _study_rows(session, settings, scope, query, rows, base_url)
    if query.level == "series":
        stmt = _with_study_context(select(Series, Study, Subject).join(Study, Study.id == Series.study_id)
                                   .where(_stored_series()))
    else:
        stmt = _with_study_context(select(Instance, Series, Study, Subject)
                                   .join(Series, Series.id == Instance.series_id)
                                   .join(Study, Study.id == Series.study_id).where(_newest()))
        for key, column in (("SOPInstanceUID", Instance.sop_instance_uid), ("SOPClassUID", Instance.sop_class_uid)):
            if key in query.uids:
                stmt = stmt.where(col(column).in_(query.uids[key]))
    stmt = _study_filters(stmt, query)
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    if series_uid is not None:
        stmt = stmt.where(Series.series_uid == series_uid)
    if "SeriesInstanceUID" in query.uids:
        stmt = stmt.where(col(Series.series_uid).in_(query.uids["SeriesInstanceUID"]))
    if query.modalities:
        stmt = stmt.where(col(Series.modality).in_(query.modalities))
    stmt = restrict(stmt, scope, site_id=Series.site_id, trial_id=Series.trial_id)
    stmt = stmt.order_by(col(Series.id) if query.level == "series" else col(Instance.id))
    _total, rows = paging.page(session, stmt, limit=query.limit, offset=query.offset)
    if query.level == "series":
        return _series_rows(session, settings, query, rows, base_url, across=study_uid is None)
    return _instance_rows(settings, query, rows, base_url, across=study_uid is None)


def _study_rows(session, settings, scope, query, rows, base_url) -> list[dict]:
    ids = [study.id for study, _ in rows]
    counts = select(Series.study_id, func.count(distinct(Series.id)), func.count(distinct(Instance.sop_instance_uid)),
                    func.min(Instance.id)).join(Instance, Instance.series_id == Series.id)
    counts = restrict(counts.where(col(Series.study_id).in_(ids), _newest()), scope, site_id=Series.site_id,
                      trial_id=Series.trial_id).group_by(Series.study_id)
    by_study = {sid: (n_series, n_inst, first) for sid, n_series, n_inst, first in session.exec(counts)}
    modalities: dict[int, set[str]] = {}
    for sid, modality in session.exec(select(Series.study_id, Series.modality).where(
            col(Series.study_id).in_(ids), _stored_series())):
        modalities.setdefault(sid, set()).add(modality)
    out = []
    for study, subject in rows:
        n_series, n_inst, first = by_study.get(study.id, (0, 0, None))
        store = {"StudyInstanceUID": study.study_uid, "StudyDate": _da(study.study_date),
                 "StudyDescription": study.description,
                 "ModalitiesInStudy": sorted(filter(None, modalities.get(study.id, ()))),
                 "NumberOfStudyRelatedSeries": n_series, "NumberOfStudyRelatedInstances": n_inst,
                 "RetrieveURL": f"{base_url}/studies/{study.study_uid}"}
        if subject is not None:
            store["PatientID"] = subject.pseudonym
        header = _header(settings, session.get(Instance, first)) if first else None
        out.append(_json(store, header, STUDY_FIELDS, query))
    return out


def _series_rows(session, settings, query, rows, base_url, *, across: bool) -> list[dict]:
    ids = [series.id for series, _, _ in rows]
    counts = (select(Instance.series_id, func.count(distinct(Instance.sop_instance_uid)), func.min(Instance.id))
              .where(col(Instance.series_id).in_(ids), _newest()).group_by(Instance.series_id))
    by_series = {sid: (n, first) for sid, n, first in session.exec(counts)}
    out = []
    for series, study, subject in rows:
        n_inst, first = by_series.get(series.id, (0, None))
        store = {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": series.series_uid,
                 "Modality": series.modality, "SeriesDescription": series.description,
                 "NumberOfSeriesRelatedInstances": n_inst, "StudyDate": _da(study.study_date),
                 "RetrieveURL": f"{base_url}/studies/{study.study_uid}/series/{series.series_uid}"}
        if subject is not None:
            store["PatientID"] = subject.pseudonym
        header = _header(settings, session.get(Instance, first)) if first else None
        out.append(_json(store, header, SERIES_FIELDS + (STUDY_CONTEXT if across else ()), query))
    return out


def _instance_rows(settings, query, rows, base_url, *, across: bool) -> list[dict]:
    out = []
    for inst, series, study, subject in rows:
        store = {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": series.series_uid,
                 "Modality": series.modality, "SOPClassUID": inst.sop_class_uid,
                 "SOPInstanceUID": inst.sop_instance_uid, "StudyDate": _da(study.study_date),
                 "RetrieveURL": f"{base_url}/studies/{study.study_uid}/series/{series.series_uid}"
                                f"/instances/{inst.sop_instance_uid}"}
        if subject is not None:
            store["PatientID"] = subject.pseudonym
        out.append(_json(store, _header(settings, inst), INSTANCE_FIELDS + (STUDY_CONTEXT if across else ()), query))
    return out


def _da(day: date | None) -> str:
    return day.strftime("%Y%m%d") if day else ""


def _json(store: dict, header: Dataset | None, fields: tuple[str, ...], query: QidoQuery) -> dict:
    """The DICOM JSON of one result: ``fields`` and the query's includefields, from the store where
    it knows them, else from ``header``."""
    ds = Dataset()
    wanted = list(dict.fromkeys([*fields, *query.include]))
    if query.include_all and header is not None:
        wanted += [elem.keyword for elem in header if elem.keyword and elem.keyword not in wanted]
    for keyword in wanted:
        if keyword in store:
            tag = tag_for_keyword(keyword)
            vr = "UR" if keyword == "RetrieveURL" else dictionary_VR(tag)
            ds.add_new(tag, vr, store[keyword])
        elif header is not None and keyword in header:
            elem = header[keyword]
            if not _is_bulk(elem):
                ds.add(elem)
    return without_bulk(ds).to_json_dict(suppress_invalid_tags=True)


def _is_bulk(elem) -> bool:
    return elem.VR in BULK_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD


def without_bulk(ds: Dataset) -> Dataset:
    """``ds`` with binary elements over :data:`BULK_THRESHOLD` bytes removed, at every depth."""
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                without_bulk(item)
        elif _is_bulk(elem):
            del ds[elem.tag]
    return ds


def stored_path(settings: Settings, inst: Instance) -> Path:
    """The spool file of an instance (its stored relative path, re-checked to stay in the data directory)."""
    return safe_join(settings.data_dir, *PurePosixPath(inst.path).parts)


def _header(settings: Settings, inst: Instance | None) -> Dataset | None:
    return pydicom.dcmread(stored_path(settings, inst), stop_before_pixels=True) if inst is not None else None


# --- WADO-RS --------------------------------------------------------------------------------------

def visible_study(session: Session, scope: Scope, study_uid: str) -> Study:
    """The study, if it exists with stored objects and ``scope`` may see it; else 404."""
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
            .where(Study.study_uid == study_uid, _newest()))
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


def transfer_syntax(path: Path) -> str:
    """The transfer syntax a stored file is written in (from its file meta)."""
    return str(read_file_meta_info(path).TransferSyntaxUID)


def metadata(path: Path) -> dict:
    """DICOM JSON of a stored file's header: no pixel data, no bulk data."""
    return without_bulk(pydicom.dcmread(path, stop_before_pixels=True)).to_json_dict(suppress_invalid_tags=True)
