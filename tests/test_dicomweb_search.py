"""QIDO-RS matching keys a viewer searches on (PS3.18 table 10.6.1-5), fuzzymatching, empty answers,
and case-sensitive wildcard matching on both database backends.

Expected results are computed independently: from each study's stored header read here (the
values a viewer is shown) and matched with :func:`fnmatch.fnmatchcase`, never by the code under test.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlmodel import select

from corelab.accounts import create_token
from corelab.db import get_engine, open_store, session_scope
from corelab.models import Instance, Series, Site, Study
from corelab.receiver_store import Store
from corelab.register import add_site, add_trial
from services import dicomweb_query as dq
from services.dicomweb_match import parse_query
from services.access import Scope
from tests import hostile_objects as hostile
from tests.portal_helpers import build_portal_lab, served_portal

STUDY_KEYS = ("PatientName", "PatientID", "StudyID", "StudyTime", "AccessionNumber", "ReferringPhysicianName")
TAGS = {"PatientName": "00100010", "StudyID": "00200010", "StudyTime": "00080030", "AccessionNumber": "00080050",
        "ReferringPhysicianName": "00080090", "StudyInstanceUID": "0020000D"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("dicomweb-search"))


@pytest.fixture(scope="module")
def server(lab):
    with served_portal(lab.settings) as url:
        yield url + "/dicomweb"


@pytest.fixture(scope="module")
def tokens(lab):
    with session_scope(lab.settings) as s:
        return {name: create_token(s, name, label="qido test", days=1, actor="test")[0] for name in ("phys", "site-a")}


@pytest.fixture(scope="module")
def headers(lab) -> dict[str, dict[str, str]]:
    """{study UID: {keyword: the stored header's value as text}} for every study with a stored object."""
    out: dict = {}
    with session_scope(lab.settings) as s:
        rows = s.exec(select(Study.study_uid, Instance.path).join(Series, Series.study_id == Study.id)
                      .join(Instance, Instance.series_id == Series.id)).all()
    for uid, path in rows:
        if uid not in out:
            ds = pydicom.dcmread(lab.settings.data_dir / path, stop_before_pixels=True)
            out[uid] = {k: str(ds.get(k, "") or "") for k in STUDY_KEYS}
    return out


def _client(server, tokens, name="phys") -> DICOMwebClient:
    return DICOMwebClient(server, headers={"Authorization": f"Bearer {tokens[name]}"})


def _uids(found: list[dict]) -> set[str]:
    return {x[TAGS["StudyInstanceUID"]]["Value"][0] for x in found}


def test_a_viewer_searches_studies_by_name_and_the_other_required_keys(server, tokens, headers):
    client = _client(server, tokens)
    names = sorted({h["PatientName"] for h in headers.values()})
    trial_name = next(n for n in names if not n.startswith("PHANTOM"))
    cases = {("PatientName", trial_name), ("PatientName", trial_name[:-1] + "?"), ("PatientName", "PHANTOM^*"),
             ("PatientName", "phantom^*"), ("PatientName", "*NEMA"), ("StudyID", "2"), ("StudyID", "1"),
             ("AccessionNumber", "A*"), ("ReferringPhysicianName", "Doe^*"), ("AccessionNumber", "*"),
             ("PatientName", trial_name.lower())}
    for key, value in cases:
        found = client.search_for_studies(search_filters={key: value}, get_remaining=True)
        expected = {u for u, h in headers.items() if value == "*" or fnmatchcase(h[key], value)}
        assert _uids(found) == expected, (key, value)
        for item in found:  # the value each result is shown with is the one it was matched on
            shown = (item.get(TAGS[key], {}).get("Value") or [""])[0]
            shown = shown.get("Alphabetic", "") if isinstance(shown, dict) else shown
            assert shown == headers[_uids([item]).pop()][key]
    # Each matched somewhere, and case matters: the lower-case name finds nothing.
    assert _uids(client.search_for_studies(search_filters={"PatientName": "PHANTOM^*"}))
    assert client.search_for_studies(search_filters={"PatientName": trial_name.lower()}) == []
    # A time range (padded to HHMMSS on both ends, the stored fraction ignored).
    found = client.search_for_studies(search_filters={"StudyTime": "1000-115959"}, get_remaining=True)
    expected = {u for u, h in headers.items() if "100000" <= h["StudyTime"][:6] <= "115959"}
    assert _uids(found) == expected and 0 < len(expected) < len(headers)
    # Universal matching returns the attribute for every study, empty where the store holds none.
    found = client.search_for_studies(search_filters={"AccessionNumber": "", "ReferringPhysicianName": ""},
                                      get_remaining=True)
    assert _uids(found) == set(headers)
    assert all(TAGS["AccessionNumber"] in x and TAGS["ReferringPhysicianName"] in x for x in found)
    # Combined with a key matched in the database, and with paging after the header match.
    pseudonym = headers[next(u for u, h in headers.items() if h["PatientName"] == trial_name)]["PatientID"]
    both = client.search_for_studies(search_filters={"PatientID": pseudonym, "StudyID": "2"})
    assert _uids(both) == {u for u, h in headers.items() if h["PatientID"] == pseudonym and h["StudyID"] == "2"}
    one_by_one, offset = [], 0
    while page := client.search_for_studies(search_filters={"PatientName": "PHANTOM^*"}, limit=1, offset=offset):
        one_by_one += page
        offset += 1
    assert [x for x in _uids(one_by_one)] and len(one_by_one) == len(_uids(one_by_one)) == \
        len({u for u, h in headers.items() if h["PatientName"].startswith("PHANTOM^")})


def test_bad_values_of_the_new_keys_are_400_without_echo(server, tokens):
    for query, words in {"StudyTime=25": "StudyTime", "StudyTime=1200-1100": "ends before",
                         "StudyID=" + "9" * 17: "StudyID", "PatientName=a%5Cb": "PatientName",
                         "PatientSex=F": "not a matching key"}.items():
        response = requests.get(f"{server}/studies?{query}", headers={"Authorization": f"Bearer {tokens['phys']}"},
                                timeout=10)
        assert response.status_code == 400 and words in response.json()["detail"], (query, response.text)
        assert "9" * 17 not in response.text


def test_a_site_name_search_stays_in_its_site(server, tokens, headers, lab):
    with session_scope(lab.settings) as s:
        mine = set(s.exec(select(Study.study_uid).join(Site, Site.id == Study.site_id).where(Site.code == "A01"))
                   .all()) & set(headers)
    found = _client(server, tokens, "site-a").search_for_studies(search_filters={"PatientName": "*"},
                                                                 get_remaining=True)
    assert _uids(found) == mine and mine != set(headers)
    found = _client(server, tokens, "site-a").search_for_studies(search_filters={"PatientName": "PHANTOM^*"},
                                                                 get_remaining=True)
    assert _uids(found) == {u for u in mine if headers[u]["PatientName"].startswith("PHANTOM^")}


def test_fuzzymatching_is_answered_with_a_warning_and_no_result_is_200_empty(server, tokens):
    auth = {"Authorization": f"Bearer {tokens['phys']}"}
    fuzzy = requests.get(f"{server}/studies?PatientName=PHANTOM*&fuzzymatching=true", headers=auth, timeout=10)
    assert fuzzy.status_code == 200 and fuzzy.json()
    warning = fuzzy.headers.get("warning", "")
    assert warning.startswith("299 ") and '"fuzzymatching not supported' in warning, warning
    plain = requests.get(f"{server}/studies?PatientName=PHANTOM*&fuzzymatching=false", headers=auth, timeout=10)
    assert plain.status_code == 200 and "warning" not in plain.headers and plain.json() == fuzzy.json()
    # No match: 200 and an empty array (PS3.18 as amended by CP-2473), not 204.
    for path in ("/studies?PatientName=NOBODY", "/series?StudyID=NONE", "/instances?AccessionNumber=NONE"):
        empty = requests.get(server + path, headers=auth, timeout=10)
        assert empty.status_code == 200 and empty.json() == [], path


@pytest.fixture
def mixed_case_store(store_settings):
    """Three subjects whose pseudonyms differ only in case, on SQLite or PostgreSQL."""
    open_store(store_settings)
    with session_scope(store_settings) as s:
        site_id = add_site(s, code="S1", ae_title="SITE1").id
        add_trial(s, code="T1", pseudonym_pattern=r"[A-Za-z]{3}[-_]\d{3}", deid_policy={"visit_labels": ["baseline"]})
    store, studies = Store(store_settings, get_engine(store_settings)), {}
    for pseudonym in ("Abc-001", "abc-002", "ABC-003", "abc_004"):
        ds = hostile.dataset(PatientName=pseudonym, PatientID=pseudonym, ClinicalTrialTimePointID="baseline")
        outcome = store.accept(hostile.encode(ds), sop_instance_uid=ds.SOPInstanceUID, site_id=site_id, source="test")
        assert outcome.status == "stored", outcome
        studies[pseudonym] = str(ds.StudyInstanceUID)
    return store_settings, studies


@pytest.mark.postgres
def test_patient_id_wildcards_are_case_sensitive_on_both_backends(mixed_case_store):
    settings, studies = mixed_case_store
    scope = Scope(user="phys", full_name="P", role="physicist", sites=None, trials=None)
    for pattern in ("abc-*", "A?c-*", "ABC*", "*-00?", "abc?00*", "abc_00*", "abc%", "Abc-001", "abc-001", "*"):
        query = parse_query([("PatientID", pattern)], "study")
        with session_scope(settings) as s:
            found = dq.search(s, settings, scope, query, base_url="http://x/dicomweb")
        expected = {studies[p] for p in studies if fnmatchcase(p, pattern)}
        assert {x[TAGS["StudyInstanceUID"]]["Value"][0] for x in found} == expected, pattern
