"""The portal under test: a small core lab (tests/lab_helpers.py) with reports, a query and one
user of each role, and a logged-in test client per user (imported, not a conftest).

Users (password ``PASSWORD`` for all):

    site-a   site user of A01          site-b   site user of B02
    phys     physicist ("Dr P. Hysicist")
    tm       trial manager of the trial
    admin    admin
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import select

from corelab.db import get_engine, session_scope
from corelab.models import Deviation, Report, Series, Site
from corelab.settings import Settings, load_settings
from services import accounts, reports, review
from tests.lab_helpers import build_lab

PASSWORD = "correct horse battery 42"
USERS = {
    "site-a": {"role": "site", "sites": ["A01"], "full_name": "Site A Coordinator"},
    "site-b": {"role": "site", "sites": ["B02"], "full_name": "Site B Coordinator"},
    "phys": {"role": "physicist", "full_name": "Dr P. Hysicist"},
    "tm": {"role": "trial-manager", "full_name": "Trial Manager"},
    "admin": {"role": "admin", "full_name": "Core Lab Admin"},
}


@dataclass
class PortalLab:
    settings: Settings
    truth: dict
    trial: str
    ids: dict  # ids of objects per site: {"A01": {"series": [...], "deviation": [...], "query": [...], ...}}


def _ids_by_site(settings: Settings) -> dict:
    from corelab.models import QuarantineItem, Query

    out: dict = {}
    with session_scope(settings) as s:
        sites = {x.id: x.code for x in s.exec(select(Site))}
        for series in s.exec(select(Series)):
            out.setdefault(sites.get(series.site_id), {}).setdefault("series", []).append(series.id)
        for dev, series in s.exec(select(Deviation, Series).join(Series, Deviation.series_id == Series.id)):
            out.setdefault(sites.get(series.site_id), {}).setdefault("deviation", []).append(dev.id)
        for q in s.exec(select(Query)):
            out.setdefault(sites.get(q.site_id), {}).setdefault("query", []).append(q.id)
        for r in s.exec(select(Report)):
            out.setdefault(sites.get(r.site_id), {}).setdefault("report", []).append(r.id)
        for item in s.exec(select(QuarantineItem)):
            out.setdefault(sites.get(item.site_id), {}).setdefault("quarantine", []).append(item.id)
    return out


_TEMPLATE: dict[str, PortalLab] = {}


def build_portal_lab(root: Path) -> PortalLab:
    """A copy, in ``root``, of the portal lab (see :func:`make_portal_lab`).

    The lab is built once per test process and its data directory copied for each test module
    (paths in the store are relative to the data directory), so each module may change its own
    copy freely and the 17 s build is paid once.
    """
    if "lab" not in _TEMPLATE:
        base = Path(tempfile.mkdtemp(prefix="corelab-portal-lab-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        _TEMPLATE["lab"] = make_portal_lab(base)
        get_engine(_TEMPLATE["lab"].settings).dispose()  # SQLite checkpoints its WAL: the copy is whole
    template = _TEMPLATE["lab"]
    shutil.copytree(template.settings.data_dir, root / "corelab-data")
    settings = load_settings({"CORELAB_DATA_DIR": str(root / "corelab-data")})
    return PortalLab(settings, copy.deepcopy(template.truth), template.trial, copy.deepcopy(template.ids))


def make_portal_lab(root: Path) -> PortalLab:
    """The lab, its reports published (site QC of A01 and B02, accreditation of every scanner, the
    trial deviation report), one query open at each of A01 and B02, and the users above."""
    settings, truth = build_lab(root)
    trial = truth["trial_code"]
    with session_scope(settings) as s:
        reports.publish_trial_report(s, settings, trial, deliver=False)
        reports.publish_trial_accreditation_reports(s, settings, trial)
        for site in ("A01", "B02"):
            reports.publish_site_qc_report(s, settings, site, deliver=False)
    with session_scope(settings) as s:
        for site in ("A01", "B02"):
            dev = s.exec(select(Deviation).join(Series, Deviation.series_id == Series.id).join(
                Site, Series.site_id == Site.id).where(Site.code == site, Deviation.status == "open")
                .order_by(Deviation.id)).first()
            if dev is not None:
                review.open_query(s, dev.id, f"Please check the injected activity of this {site} scan.",
                                  actor="phys")
        for name, spec in USERS.items():
            accounts.add_user(s, name, role=spec["role"], sites=spec.get("sites"),
                              trials=[trial] if spec["role"] == "trial-manager" else None,
                              full_name=spec["full_name"], password=PASSWORD, actor="test")
    return PortalLab(settings, truth, trial, _ids_by_site(settings))


def planted_identifiers(truth: dict) -> list[str]:
    """The parts of the patient names planted in headers by the synthetic trial (each at least 3
    characters): none may ever appear on a page."""
    names = [str(p["planted_value"]) for p in truth["problems"] if p["code"] == "patient_name_in_header"]
    assert names, "the test trial plants no patient name: the page checks would prove nothing"
    return sorted({part for name in names for part in re.split(r"[\^ ]+", name) if len(part) >= 3})


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF token"
    return found.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD):
    """Log ``client`` in through the login form; returns the final response."""
    form = client.get("/login")
    return client.post("/login", data={"name": name, "password": password, "csrf_token": csrf_of(form.text)})


def client_for(app, name: str | None) -> TestClient:
    """A test client logged in as ``name`` (None: not logged in)."""
    client = TestClient(app, follow_redirects=True)
    if name:
        response = login(client, name)
        assert response.status_code == 200 and "/login" not in str(response.url), f"{name} could not log in"
    return client


def post_form(client: TestClient, page_url: str, action: str, data: dict):
    """POST ``data`` to ``action`` with the CSRF token read from ``page_url``."""
    token = csrf_of(client.get(page_url).text)
    return client.post(action, data={**data, "csrf_token": token})


@contextlib.contextmanager
def served_portal(settings: Settings) -> Iterator[str]:
    """The portal over ``settings``' store, served by uvicorn in a thread on a free loopback port,
    for real HTTP clients (dicomweb-client, httpx, a browser): yields its base URL."""
    from portal.serve import start_portal_thread
    from synth.net import free_port, wait_port

    settings = dataclasses.replace(settings, portal_port=free_port())
    server, thread = start_portal_thread(settings)
    try:
        wait_port(settings.portal_port, 30)
        yield f"http://127.0.0.1:{settings.portal_port}"
    finally:
        server.should_exit = True
        thread.join(10)
