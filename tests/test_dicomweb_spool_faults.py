"""A spool file missing or damaged under QIDO-RS and WADO-RS: the answer is a JSON 500 given before
any body starts, naming the series and what the core lab must do, never a 200 cut short (truncated
JSON or multipart) or a bare "Internal Server Error". Run on a copy of the portal lab whose spool
files the test deletes and truncates, and restores to show the same request then succeeds."""

from __future__ import annotations

import json

import pytest
import requests
from sqlmodel import col, select

from corelab.accounts import create_token
from corelab.db import session_scope
from corelab.models import Instance, Series, Site, Study
from tests.portal_helpers import build_portal_lab, planted_identifiers, served_portal

ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("dicomweb-spool-faults"))


@pytest.fixture(scope="module")
def server(lab):
    with served_portal(lab.settings) as url:
        yield url + "/dicomweb"


@pytest.fixture(scope="module")
def token(lab):
    with session_scope(lab.settings) as s:
        return create_token(s, "phys", label="spool fault test", days=1, actor="test")[0]


@pytest.fixture(scope="module")
def target(lab):
    """One A01 PET study: its UID, one of its series, and that series' spool files (row order)."""
    with session_scope(lab.settings) as s:
        series = s.exec(select(Series).join(Site, Site.id == Series.site_id)
                        .where(Site.code == "A01", Series.modality == "PT", Series.kind == "trial")
                        .order_by(col(Series.id))).first()
        study = s.get(Study, series.study_id)
        files = [lab.settings.data_dir / i.path for i in s.exec(select(Instance).where(
            Instance.series_id == series.id).order_by(col(Instance.id)))]
        every = [lab.settings.data_dir / i.path for i in s.exec(select(Instance).join(Series).where(
            Series.study_id == study.id))]
    return {"study": study.study_uid, "series": series.series_uid, "files": files, "study_files": every}


def _paths(t) -> dict[str, tuple[str, str]]:
    """Each read of the damaged series, with the Accept it is asked with."""
    study, series = t["study"], t["series"]
    base = f"/studies/{study}/series/{series}"
    return {"series metadata": (f"{base}/metadata", "application/dicom+json"),
            "study metadata": (f"/studies/{study}/metadata", "application/dicom+json"),
            "series retrieve": (base, ANY_SYNTAX), "study retrieve": (f"/studies/{study}", ANY_SYNTAX),
            "instances search": (f"{base}/instances", "application/dicom+json")}


def _get(server, token, path, accept):
    return requests.get(server + path, headers={"Authorization": f"Bearer {token}", "Accept": accept}, timeout=30)


def _assert_store_fault(response, target, lab, what):
    assert response.status_code == 500, (what, response.status_code, response.text[:200])
    assert response.headers["content-type"].startswith("application/json"), what
    detail = response.json()["detail"]  # a whole JSON document, not a body cut short
    assert target["series"] in detail and "restore the spool file" in detail, (what, detail)
    assert str(lab.settings.data_dir) not in detail and "spool/" not in detail
    assert not [n for n in planted_identifiers(lab.truth) if n in detail.upper()]


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_spool_file_is_a_json_500_before_any_body(server, token, lab, target, damage):
    victim = target["files"][len(target["files"]) // 2]
    kept = victim.read_bytes()
    reads = _paths(target)
    for what, (path, accept) in reads.items():  # all fine first: the lab copy is whole
        assert _get(server, token, path, accept).status_code == 200, what
    try:
        if damage == "deleted":
            victim.unlink()
        else:
            victim.write_bytes(kept[: len(kept) // 3])
        for what, (path, accept) in reads.items():  # a search reads the header of each instance it lists
            _assert_store_fault(_get(server, token, path, accept), target, lab, what)
        sop = _sop_of(lab, victim)
        one = f"/studies/{target['study']}/series/{target['series']}/instances/{sop}"
        _assert_store_fault(_get(server, token, one + "/metadata", "application/dicom+json"), target, lab, "instance")
        _assert_store_fault(_get(server, token, one, ANY_SYNTAX), target, lab, "instance retrieve")
    finally:
        victim.write_bytes(kept)
    for what, (path, accept) in reads.items():  # restored: every read succeeds again
        response = _get(server, token, path, accept)
        assert response.status_code == 200, what
        if "metadata" in what:
            assert len(json.loads(response.content)) >= len(target["files"])


def test_a_study_search_whose_header_file_is_gone_is_a_json_500(server, token, lab, target):
    kept = {p: p.read_bytes() for p in target["study_files"]}
    try:
        for p in kept:
            p.unlink()
        response = _get(server, token, f"/studies?StudyInstanceUID={target['study']}", "application/dicom+json")
        assert response.status_code == 500 and response.headers["content-type"].startswith("application/json")
        detail = response.json()["detail"]
        assert "restore the spool file" in detail and "series" in detail, detail
        # Other studies are still searchable.
        assert _get(server, token, "/studies?StudyDate=19000101-", "application/dicom+json").status_code == 500
        others = _get(server, token, f"/studies?PatientID={_other_pseudonym(lab, target)}", "application/dicom+json")
        assert others.status_code == 200 and others.json()
    finally:
        for p, data in kept.items():
            p.write_bytes(data)
    assert _get(server, token, f"/studies?StudyInstanceUID={target['study']}",
                "application/dicom+json").status_code == 200


def _sop_of(lab, path) -> str:
    rel = path.relative_to(lab.settings.data_dir).as_posix()
    with session_scope(lab.settings) as s:
        return s.exec(select(Instance.sop_instance_uid).where(Instance.path == rel)).one()


def _other_pseudonym(lab, target) -> str:
    from corelab.models import Subject, Visit

    with session_scope(lab.settings) as s:
        return s.exec(select(Subject.pseudonym).join(Visit, Visit.subject_id == Subject.id)
                      .join(Study, Study.visit_id == Visit.id).join(Site, Site.id == Study.site_id)
                      .where(Site.code == "B02")).first()
