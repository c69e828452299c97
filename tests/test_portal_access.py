"""Least privilege, tried: every route of the portal against every role, and every route that
takes an id against another site's ids.

The routes are read from the application itself, and each route's allowed roles from its
``require(...)`` dependency, so a new route is tried without touching this test. A route that
takes no login (the login page, static files) must say so in ``PUBLIC``.
"""

from __future__ import annotations

import hashlib

import pytest
from fastapi.routing import APIRoute
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import Deviation, Instance, QuarantineItem, Query, Report, Series, Site, Study, User
from portal.app import create_app
from tests.portal_helpers import build_portal_lab, client_for, csrf_of, planted_identifiers

PUBLIC = {"/login", "/login/oidc", "/login/oidc/callback"}
ROLE_USER = {"site": "site-a", "physicist": "phys", "trial-manager": "tm", "admin": "admin"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("access"))


@pytest.fixture(scope="module")
def app(lab):
    return create_app(lab.settings)


@pytest.fixture(scope="module")
def clients(app):
    return {role: client_for(app, name) for role, name in ROLE_USER.items()}


def _api_routes(routes):
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # FastAPI >= 0.150 keeps an included router as a branch
            yield from _api_routes(route.original_router.routes)


def _routes(app) -> list[tuple[APIRoute, tuple[str, ...] | None]]:
    out = []
    for route in _api_routes(app.routes):
        roles = None
        for dep in route.dependant.dependencies:
            roles = getattr(dep.call, "roles", roles)
        out.append((route, roles))
    return out


def _send(client, method: str, url: str):
    """A request with a valid CSRF token and plausible fields, so that only access control can refuse it."""
    token = csrf_of(client.get("/account").text)
    if url.startswith("/api/"):
        return client.request(method, url, json={"text": "x"}, headers={"X-CSRF-Token": token},
                              follow_redirects=False)
    return client.request(method, url, data={"csrf_token": token, "text": "x", "reason": "x", "password": "x"},
                          follow_redirects=False)


def _store_digest(settings) -> str:
    """A digest of every row a portal change could touch (audit events excluded: reads append them)."""
    with session_scope(settings) as s:
        rows = [repr(sorted(r.model_dump().items())) for model in (Deviation, Query, Report, QuarantineItem, Site, User)
                for r in s.exec(select(model))]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _b02_values(lab) -> dict[str, str]:
    """Path parameters naming objects of site B02 (site-a's neighbour) and of its user."""
    ids = lab.ids["B02"]
    return {"series": ids["series"][0], "deviations": ids["deviation"][0], "queries": ids["query"][0],
            "reports": ids["report"][0], "quarantine": ids["quarantine"][0], "sites": "B02", "trials": lab.trial,
            "users": "site-b", "tokens": 1, "dicomweb": _dicomweb_uids(lab, "B02")}


def _dicomweb_uids(lab, site: str) -> dict[str, str]:
    """The UIDs of a stored study, series and instance of ``site``, for the /dicomweb/... routes."""
    with session_scope(lab.settings) as s:
        inst, series, study = s.exec(
            select(Instance, Series, Study).join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id).join(Site, Series.site_id == Site.id)
            .where(Site.code == site).order_by(Instance.id)).first()
        return {"studies": study.study_uid, "series": series.series_uid, "instances": inst.sop_instance_uid}


def _fill(path: str, values: dict) -> str:
    """Put B02's objects into a route's path: the parameter after /<collection>/ names one of it."""
    if path.startswith("/dicomweb/"):  # DICOMweb names objects by UID, not by row id
        values = {**values, **values["dicomweb"]}
    parts = path.strip("/").split("/")
    out = []
    for i, part in enumerate(parts):
        if part.startswith("{"):
            name = part.strip("{}")
            collection = parts[i - 1] if i else ""
            value = values.get(collection, {"part": "pdf", "fmt": "csv", "table": "deviations"}.get(name, "1"))
            out.append(str(value))
        else:
            out.append(part)
    return "/" + "/".join(out)


def test_every_route_declares_who_may_use_it(app):
    routes = _routes(app)
    assert len(routes) > 30 and {r.path for r, _ in routes} >= {"/login", "/worklist", "/sites/{code}"}
    for route, roles in routes:
        if route.path in PUBLIC:
            continue
        assert roles is not None, f"{route.path} has no require(...): every page needs a login"
        assert roles and set(roles) <= set(ROLE_USER), f"{route.path}: unknown roles {roles}"


def test_roles_not_allowed_are_refused_on_every_route(app, clients, lab):
    values = _b02_values(lab)
    before = _store_digest(lab.settings)
    tried = 0
    for route, roles in _routes(app):
        if route.path in PUBLIC or roles is None:
            continue
        url = _fill(route.path, values)
        for role, client in clients.items():
            if role in roles:
                continue
            for method in route.methods - {"HEAD"}:
                response = _send(client, method, url)
                assert response.status_code in (403, 404), f"{role} {method} {url}: {response.status_code}"
                tried += 1
    assert tried > 20
    assert _store_digest(lab.settings) == before, "a refused request changed the store"


def test_a_site_user_never_reaches_another_sites_objects(app, clients, lab):
    """site-a, with a valid session and CSRF token, asks for every B02 object on every route that
    site users may use: 404 (or 403), never the data, and nothing changes."""
    values = _b02_values(lab)
    client = clients["site"]
    with session_scope(lab.settings) as s:
        b02_uids = [x.series_uid for x in s.exec(select(Series).join(Site).where(Site.code == "B02"))]
    before = _store_digest(lab.settings)
    tried = 0
    for route, roles in _routes(app):
        if roles is None or "site" not in roles or "{" not in route.path:
            continue
        url = _fill(route.path, values)
        for method in route.methods - {"HEAD"}:
            response = _send(client, method, url)
            assert response.status_code in (403, 404), f"site-a {method} {url}: {response.status_code}"
            assert not any(uid in response.text for uid in b02_uids), f"{url} shows a B02 series UID"
            tried += 1
    assert tried >= 5
    assert _store_digest(lab.settings) == before


def test_listings_of_a_site_user_hold_only_their_site(app, clients, lab):
    client = clients["site"]
    with session_scope(lab.settings) as s:
        theirs = {x.series_uid for x in s.exec(select(Series).join(Site).where(Site.code != "A01"))}
    for route, roles in _routes(app):
        if roles is None or "site" not in roles or "{" in route.path or "GET" not in route.methods:
            continue
        response = client.get(route.path)
        assert response.status_code in (200, 303, 403, 404), f"{route.path}: {response.status_code}"
        leaked = [uid for uid in theirs if uid in response.text]
        assert not leaked, f"{route.path} shows other sites' series: {leaked[:3]}"
        assert "B02" not in response.text, f"{route.path} names site B02"


def _own_values(lab) -> dict:
    """Path parameters naming objects of site A01 (site-a's own), so that every page renders."""
    ids = lab.ids["A01"]
    return {"series": ids["series"][0], "deviations": ids["deviation"][0], "queries": ids["query"][0],
            "reports": ids["report"][0], "quarantine": 1, "sites": "A01", "trials": lab.trial,
            "users": "site-a", "tokens": 1, "dicomweb": _dicomweb_uids(lab, "A01")}


def test_no_patient_identifier_on_any_page(app, clients, lab):
    """Every page (each GET route, as each role allowed it, on site A01's objects) is searched for
    the patient name the synthetic trial planted in a header."""
    names = planted_identifiers(lab.truth)
    shown = 0
    for route, roles in _routes(app):
        if roles is None or "GET" not in route.methods:
            continue
        url = _fill(route.path, _own_values(lab))
        for role in roles:
            response = clients[role].get(url, follow_redirects=True)
            text = response.text.upper()
            assert not any(name in text for name in names), f"{role} {url} shows a planted patient name"
            shown += response.status_code == 200
    assert shown > 40, "too few pages rendered for the search to mean anything"
