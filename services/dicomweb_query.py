"""DICOMweb search over the store (PS3.18 QIDO-RS), one scope rule.

Who sees what, and which rows are served (stored, newest version), is :mod:`services.dicomweb_metadata`;
the query parameters and matching rules are :mod:`services.dicomweb_match`.

Attributes come from the store (UIDs, dates, pseudonyms, descriptions, counts) and, for the rest
(StudyTime, PatientName, SeriesNumber, InstanceNumber, Rows, ``includefield``), from one stored
file's header read without pixel data: a study's and a series' first stored instance, an
instance's own file. Binary elements over :data:`~services.dicomweb_metadata.BULK_THRESHOLD`
bytes are left out (no bulk data is served).

Keys held in the database (UIDs, StudyDate, PatientID, Modality) are matched in SQL and paged by
the database. Keys held only in the header (PatientName, StudyID, StudyTime, ...) are matched on
each candidate study's first stored header, read in batches of :data:`BATCH` rows after the SQL
keys and the scope have narrowed the candidates; paging then counts matches. A search with such
a key therefore reads one header per candidate study: combine it with StudyDate or PatientID on
a large store.

No match is ``200 []`` (PS3.18 as amended by CP-2473), never 204.
"""

from __future__ import annotations

from datetime import date

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from sqlalchemy import distinct, func
from sqlmodel import Session, col, select

from corelab.models import Instance, Series, Study, Subject, Visit
from corelab.settings import Settings
from services import paging
from services.access import Scope, restrict
from services.dicomweb_match import QidoQuery, header_matches, sql_match
from services.dicomweb_metadata import is_bulk, newest, read_header, visible_series, visible_study, without_bulk

# services/forwarding_due.py imports the newest-version rule under its first name, from here.
_newest = newest

BATCH = 200
"""Rows fetched at a time when a header key is matched in Python."""

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


class _Headers:
    """Stored headers read once per request: by instance row, and each study's first stored one."""

    def __init__(self, session: Session, settings: Settings, scope: Scope):
        self.session, self.settings, self.scope = session, settings, scope
        self._by_instance: dict[int, Dataset] = {}
        self._first: dict[int, int | None] = {}

    def of(self, inst: Instance | None) -> Dataset | None:
        if inst is None:
            return None
        if inst.id not in self._by_instance:
            self._by_instance[inst.id] = read_header(self.session, self.settings, inst)
        return self._by_instance[inst.id]

    def prime(self, first: dict[int, int]) -> None:
        """Record each study's first stored instance row, already known to the caller."""
        self._first.update(first)

    def of_study(self, study_id: int) -> Dataset | None:
        if study_id not in self._first:
            stmt = (select(func.min(Instance.id)).join(Series, Series.id == Instance.series_id)
                    .where(Series.study_id == study_id, newest()))
            self._first[study_id] = self.session.exec(restrict(stmt, self.scope, site_id=Series.site_id,
                                                               trial_id=Series.trial_id)).first()
        first = self._first[study_id]
        return self.of(self.session.get(Instance, first)) if first else None


def _with_study_context(stmt):
    return (stmt.join(Visit, Visit.id == Study.visit_id, isouter=True)
            .join(Subject, Subject.id == Visit.subject_id, isouter=True))


def _study_filters(stmt, query: QidoQuery, dialect: str):
    if "StudyInstanceUID" in query.uids:
        stmt = stmt.where(col(Study.study_uid).in_(query.uids["StudyInstanceUID"]))
    if query.dates is not None:
        first, last = query.dates
        if first:
            stmt = stmt.where(col(Study.study_date) >= first)
        if last:
            stmt = stmt.where(col(Study.study_date) <= last)
    if query.patient_id is not None:
        stmt = stmt.where(sql_match(col(Subject.pseudonym), query.patient_id, dialect))
    return stmt


def _stored_series():
    return select(Instance.id).where(Instance.series_id == Series.id).exists()


def search(session: Session, settings: Settings, scope: Scope, query: QidoQuery, *, base_url: str,
           study_uid: str | None = None, series_uid: str | None = None) -> list[dict]:
    """One page of QIDO-RS results (DICOM JSON objects) for ``query``, within ``study_uid`` /
    ``series_uid`` when the path names them (404 when it names one the scope may not see; 500
    when a header to be read is missing or damaged in the spool)."""
    if study_uid is not None:
        visible_study(session, scope, study_uid)
    if series_uid is not None:
        visible_series(session, scope, study_uid, series_uid)
    dialect, headers = session.get_bind().dialect.name, _Headers(session, settings, scope)
    if query.level == "study":
        stmt = _with_study_context(select(Study, Subject).where(
            select(Series.id).where(Series.study_id == Study.id, _stored_series()).exists()))
        if query.modalities:
            stmt = stmt.where(select(Series.id).where(Series.study_id == Study.id, _stored_series(),
                                                      col(Series.modality).in_(query.modalities)).exists())
        stmt = restrict(_study_filters(stmt, query, dialect), scope, site_id=Study.site_id).order_by(col(Study.id))
        return _page(session, stmt, query, headers, lambda rows: _study_rows(session, scope, rows, base_url, headers))
    if query.level == "series":
        stmt = _with_study_context(select(Series, Study, Subject).join(Study, Study.id == Series.study_id)
                                   .where(_stored_series()))
    else:
        stmt = _with_study_context(select(Instance, Series, Study, Subject)
                                   .join(Series, Series.id == Instance.series_id)
                                   .join(Study, Study.id == Series.study_id).where(newest()))
        for key, column in (("SOPInstanceUID", Instance.sop_instance_uid), ("SOPClassUID", Instance.sop_class_uid)):
            if key in query.uids:
                stmt = stmt.where(col(column).in_(query.uids[key]))
    stmt = _study_filters(stmt, query, dialect)
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    if series_uid is not None:
        stmt = stmt.where(Series.series_uid == series_uid)
    if "SeriesInstanceUID" in query.uids:
        stmt = stmt.where(col(Series.series_uid).in_(query.uids["SeriesInstanceUID"]))
    if query.modalities:
        stmt = stmt.where(col(Series.modality).in_(query.modalities))
    stmt = restrict(stmt, scope, site_id=Series.site_id, trial_id=Series.trial_id)
    across = study_uid is None
    if query.level == "series":
        stmt = stmt.order_by(col(Series.id))
        return _page(session, stmt, query, headers, lambda rows: _series_rows(session, rows, base_url, headers,
                                                                              across=across))
    stmt = stmt.order_by(col(Instance.id))
    return _page(session, stmt, query, headers, lambda rows: _instance_rows(rows, base_url, headers, across=across))


def _page(session: Session, stmt, query: QidoQuery, headers: _Headers, build) -> list[dict]:
    """The page ``query`` asks for: by the database alone, or, with a header key, by matching each
    candidate's study header in batches and counting matches for offset and limit."""
    if not query.header:
        _total, rows = paging.page(session, stmt, limit=query.limit, offset=query.offset)
        return [_json(store, header, fields, query) for store, header, fields in build(rows)]
    matched: list = []
    skip, start = query.offset, 0
    while len(matched) < query.limit:
        rows = list(session.exec(stmt.limit(BATCH).offset(start)))
        start += len(rows)
        for row in rows:
            study = next(x for x in row if isinstance(x, Study))
            if not header_matches(query, headers.of_study(study.id)):
                continue
            if skip:
                skip -= 1
            elif len(matched) < query.limit:
                matched.append(row)
        if len(rows) < BATCH:
            break
    return [_json(store, header, fields, query) for store, header, fields in build(matched)]


def _study_rows(session, scope, rows, base_url, headers: _Headers) -> list[tuple]:
    ids = [study.id for study, _ in rows]
    counts = select(Series.study_id, func.count(distinct(Series.id)), func.count(distinct(Instance.sop_instance_uid)),
                    func.min(Instance.id)).join(Instance, Instance.series_id == Series.id)
    counts = restrict(counts.where(col(Series.study_id).in_(ids), newest()), scope, site_id=Series.site_id,
                      trial_id=Series.trial_id).group_by(Series.study_id)
    counted = list(session.exec(counts))
    by_study = {sid: (n_series, n_inst) for sid, n_series, n_inst, _ in counted}
    headers.prime({sid: first for sid, _, _, first in counted})
    modalities: dict[int, set[str]] = {}
    for sid, modality in session.exec(select(Series.study_id, Series.modality).where(
            col(Series.study_id).in_(ids), _stored_series())):
        modalities.setdefault(sid, set()).add(modality)
    out = []
    for study, subject in rows:
        n_series, n_inst = by_study.get(study.id, (0, 0))
        store = {"StudyInstanceUID": study.study_uid, "StudyDate": _da(study.study_date),
                 "StudyDescription": study.description,
                 "ModalitiesInStudy": sorted(filter(None, modalities.get(study.id, ()))),
                 "NumberOfStudyRelatedSeries": n_series, "NumberOfStudyRelatedInstances": n_inst,
                 "RetrieveURL": f"{base_url}/studies/{study.study_uid}"}
        if subject is not None:
            store["PatientID"] = subject.pseudonym
        out.append((store, headers.of_study(study.id), STUDY_FIELDS))
    return out


def _series_rows(session, rows, base_url, headers: _Headers, *, across: bool) -> list[tuple]:
    ids = [series.id for series, _, _ in rows]
    counts = (select(Instance.series_id, func.count(distinct(Instance.sop_instance_uid)), func.min(Instance.id))
              .where(col(Instance.series_id).in_(ids), newest()).group_by(Instance.series_id))
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
        header = headers.of(session.get(Instance, first)) if first else None
        out.append((store, header, SERIES_FIELDS + (STUDY_CONTEXT if across else ())))
    return out


def _instance_rows(rows, base_url, headers: _Headers, *, across: bool) -> list[tuple]:
    out = []
    for inst, series, study, subject in rows:
        store = {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": series.series_uid,
                 "Modality": series.modality, "SOPClassUID": inst.sop_class_uid,
                 "SOPInstanceUID": inst.sop_instance_uid, "StudyDate": _da(study.study_date),
                 "RetrieveURL": f"{base_url}/studies/{study.study_uid}/series/{series.series_uid}"
                                f"/instances/{inst.sop_instance_uid}"}
        if subject is not None:
            store["PatientID"] = subject.pseudonym
        out.append((store, headers.of(inst), INSTANCE_FIELDS + (STUDY_CONTEXT if across else ())))
    return out


def _da(day: date | None) -> str:
    return day.strftime("%Y%m%d") if day else ""


def _json(store: dict, header: Dataset | None, fields: tuple[str, ...], query: QidoQuery) -> dict:
    """The DICOM JSON of one result: ``fields``, the matched keys and the query's includefields,
    from the store where it knows them, else from ``header`` (an attribute it lacks is returned
    empty when it was a matching key, so universal matching always returns it)."""
    ds = Dataset()
    keys = [*query.include, *query.header]
    wanted = list(dict.fromkeys([*fields, *keys]))
    if query.include_all and header is not None:
        wanted += [elem.keyword for elem in header if elem.keyword and elem.keyword not in wanted]
    for keyword in wanted:
        tag = tag_for_keyword(keyword)
        if keyword in store:
            vr = "UR" if keyword == "RetrieveURL" else dictionary_VR(tag)
            ds.add_new(tag, vr, store[keyword])
        elif header is not None and keyword in header:
            elem = header[keyword]
            if not is_bulk(elem):
                ds.add(elem)
        elif keyword in keys and " or " not in dictionary_VR(tag):
            ds.add_new(tag, dictionary_VR(tag), None)
    return without_bulk(ds).to_json_dict(suppress_invalid_tags=True)
