"""QIDO-RS query parameters, validated, and the matching rules of PS3.4 C.2.2.2 applied to them.

Matching keys (values validated; anything else is a :class:`DicomwebError` 400):

    StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID   UID lists (comma separated or repeated)
    StudyDate          YYYYMMDD, or a range YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-
    PatientID          the subject pseudonym; * and ? wildcards, case-sensitive on every database
    Modality           (ModalitiesInStudy at the study level) one or more codes
    PatientName, AccessionNumber, StudyID, ReferringPhysicianName
                       exact or * and ? wildcards, case-sensitive, on the study's stored (de-identified) header
    StudyTime          HHMMSS (HH and HHMM too) or a range of them, on the study's stored header
    limit, offset, includefield (keyword, tag or ``all``), fuzzymatching (true or false: corelab
    matches literally either way; with true the answer carries a Warning header, PS3.18 8.3.4.1)

An empty value is universal matching: the attribute is returned and nothing is filtered; so is a
value of a single ``*`` (PS3.4 C.2.2.2.4). A header key with no value in the store matches only
universal matching (a de-identified object never holds an AccessionNumber or ReferringPhysicianName).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from corelab.validate import is_valid_uid
from services import paging

LEVELS = ("study", "series", "instance")
HEADER_KEYS = {"PatientName": 64, "AccessionNumber": 16, "StudyID": 16, "ReferringPhysicianName": 64,
               "StudyTime": 28}
"""Study attributes matched on the study's stored header (not in the database), with their longest value."""
MATCH_LEVEL = {"StudyInstanceUID": "study", "PatientID": "study", "StudyDate": "study", "ModalitiesInStudy": "study",
               **{key: "study" for key in HEADER_KEYS},
               "SeriesInstanceUID": "series", "Modality": "series", "SOPInstanceUID": "instance",
               "SOPClassUID": "instance"}
UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_UID_RULE = "one DICOM UID: digits and dots, no empty or zero-led component, at most 64 characters"
_PLURAL = {"study": "studies", "series": "series", "instance": "instances"}
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"([01]\d|2[0-3])(?:([0-5]\d)(?:([0-5]\d)(?:\.(\d{1,6}))?)?)?")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")
_TEXT = re.compile(r"[^\\\x00-\x1f\x7f]+")
MAX_STARS = 4  # per value: SQL LIKE and GLOB backtrack on each *


class DicomwebError(ValueError):
    """A request that cannot be answered as asked: ``status`` (400, 404, 500) and what to do instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class QidoQuery:
    """A validated QIDO-RS query at one level.

    ``header`` holds the header keys to match (keyword -> the text asked for; StudyTime as its
    (earliest, latest) bounds); ``fuzzy`` that fuzzymatching=true was asked for (and not done).
    """

    level: str
    uids: dict[str, list[str]] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    patient_id: str | None = None
    dates: tuple[date | None, date | None] | None = None
    header: dict[str, str | tuple[str, str]] = field(default_factory=dict)
    include: list[str] = field(default_factory=list)
    include_all: bool = False
    fuzzy: bool = False
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
        if keyword and tag_for_keyword(keyword) == int(name, 16):  # not a repeating group's (60xx3000)
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


def _range(text: str, key: str, parse):
    """(first, last) of a single value or a range ``a-b``, ``-b``, ``a-`` (None: open end)."""
    low, dash, high = text.partition("-")
    if not dash:
        return parse(low, False), parse(low, True)
    if not low and not high:
        raise DicomwebError(400, f"{key} range has neither end: give a-, -b or a-b")
    first, last = (parse(low, False) if low else None), (parse(high, True) if high else None)
    if first and last and first > last:
        raise DicomwebError(400, f"{key} range ends before it starts: give the earlier value first")
    return first, last


def time_key(text: str, *, latest: bool = False) -> str | None:
    """A TM value as ``HHMMSS.ffffff`` (comparable as text); the parts left out are filled with
    the earliest (or, ``latest``, the last) moment they may stand for. None when not a TM value."""
    m = _TIME.fullmatch(text.strip().replace(":", ""))
    if m is None:
        return None
    fill = "59" if latest else "00"
    hh, mm, ss, frac = m.group(1), m.group(2) or fill, m.group(3) or fill, m.group(4) or ""
    return f"{hh}{mm}{ss}.{frac.ljust(6, '9' if latest else '0')}"


def _time(text: str, latest: bool) -> str:
    key = time_key(text, latest=latest)
    if key is None or ":" in text:
        raise DicomwebError(400, "StudyTime must be HHMMSS (or HH, HHMM, HHMMSS.ffffff) or a range of them")
    return key


def _int(text: str, name: str, low: int, high: int) -> int:
    if not re.fullmatch(r"\d{1,9}", text) or not low <= int(text) <= high:
        raise DicomwebError(400, f"{name} must be a whole number from {low} to {high}")
    return int(text)


def parse_query(items: list[tuple[str, str]], level: str) -> QidoQuery:
    """Validate the query parameters of a search at ``level`` (study, series, instance).

    Raises :class:`DicomwebError` (400) for an unknown parameter, a key of a lower level, a
    malformed UID, date, time, modality, text, limit or offset, or an attribute not in the dictionary.
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
            query.fuzzy = value == "true"
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
    if key in query.header or (key == "PatientID" and query.patient_id is not None) or (
            key == "StudyDate" and query.dates is not None):
        raise DicomwebError(400, f"{key} is given more than once: give one value (or one range)")
    if value in ("", "*") and key not in UID_KEYS:
        query.include.append(key)  # universal matching: the attribute is returned, nothing is filtered
        return
    if key in UID_KEYS:
        query.uids.setdefault(key, []).extend(check_uid(v.strip(), key) for v in re.split(r"[,\\]", value))
    elif key in ("Modality", "ModalitiesInStudy"):
        for code in re.split(r"[,\\]", value):
            if not _MODALITY.fullmatch(code.strip()):
                raise DicomwebError(400, f"{key} must be modality codes such as PT or CT (upper case)")
            query.modalities.append(code.strip())
    elif key == "StudyDate":
        query.dates = _range(value, key, lambda text, _latest: _date(text))
    elif key == "StudyTime":
        query.header[key] = _range(value, key, _time)
    else:  # PatientID and the header's text keys
        longest = HEADER_KEYS.get(key, 64)
        if len(value) > longest or not _TEXT.fullmatch(value):
            raise DicomwebError(400, f"{key} must be 1-{longest} characters without backslash or control "
                                     "characters (* and ? are wildcards)")
        value = re.sub(r"\*+", "*", value)  # ** matches what * does
        if value.count("*") > MAX_STARS:
            raise DicomwebError(400, f"{key} has more than {MAX_STARS} * wildcards; give fewer (each * already "
                                     "matches any run of characters)")
        if key == "PatientID":
            query.patient_id = value
        else:
            query.header[key] = value


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def sql_match(column, value: str, dialect: str):
    """A case-sensitive SQL condition: ``column`` equals ``value``, or matches it with * and ?.

    SQLite's LIKE ignores the case of ASCII letters and PostgreSQL's does not, so SQLite is asked
    with GLOB (case-sensitive, * and ? as in DICOM; ``[`` made literal) and PostgreSQL with LIKE.
    """
    if not has_wildcard(value):
        return column == value
    if dialect == "sqlite":
        return column.op("GLOB")(value.replace("[", "[[]"))
    pattern = re.sub(r"([\\%_])", r"\\\1", value).replace("*", "%").replace("?", "_")
    return column.like(pattern, escape="\\")


def _text_match(stored: str, wanted: str) -> bool:
    """Whether ``stored`` matches ``wanted`` with * (any run) and ? (any one character).

    Greedy with one backtrack point (the last *), so at most len(stored) x len(wanted) steps:
    a backtracking regular expression of ".*" runs is exponential in the number of *.
    """
    if not has_wildcard(wanted):
        return stored == wanted
    s = w = 0
    star, mark = -1, 0
    while s < len(stored):
        if w < len(wanted) and wanted[w] in ("?", stored[s]) and wanted[w] != "*":
            s, w = s + 1, w + 1
        elif w < len(wanted) and wanted[w] == "*":
            star, mark, w = w, s, w + 1
        elif star >= 0:
            mark += 1
            s, w = mark, star + 1
        else:
            return False
    return all(c == "*" for c in wanted[w:])


def header_matches(query: QidoQuery, header: Dataset | None) -> bool:
    """Whether a study's stored header satisfies every header key of ``query`` (case-sensitive; an
    attribute absent or empty in the header matches nothing but universal matching)."""
    for key, wanted in query.header.items():
        stored = str(header.get(key, "") or "").strip() if header is not None else ""
        if not stored:
            return False
        if key == "StudyTime":
            first, last = wanted
            moment = time_key(stored)
            if moment is None or (first and moment < first) or (last and moment > last):
                return False
        elif not _text_match(stored, wanted):
            return False
    return True
