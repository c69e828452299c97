"""Portal reports: scoped list, audited downloads, and the physicist's e-signature with the
password asked again."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from sqlmodel import col, select

from corelab.accounts import get_user
from corelab.db import session_scope
from corelab.models import AuditEvent, Report
from portal.app import create_app
from reports.render import report_files
from services.access import may_see, scope_of
from tests.portal_helpers import PASSWORD, build_portal_lab, client_for, post_form


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("portal_reports"))


@pytest.fixture(scope="module")
def app(lab):
    return create_app(lab.settings)


def _listed(html: str) -> set[int]:
    return {int(x) for x in re.findall(r'<td><a href="/reports/(\d+)">\d+</a></td>', html)}


def _events(lab, action: str) -> list[AuditEvent]:
    with session_scope(lab.settings) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(col(AuditEvent.id))))


def _report(lab, report_id: int) -> Report:
    with session_scope(lab.settings) as s:
        return s.get(Report, report_id)


def test_site_lists_only_its_own_reports(lab, app):
    listed = _listed(client_for(app, "site-a").get("/reports").text)
    assert listed == set(lab.ids["A01"]["report"]) and listed
    assert not listed & set(lab.ids["B02"]["report"])


def test_trial_manager_lists_what_may_see_allows(lab, app):
    html = client_for(app, "tm").get("/reports").text
    with session_scope(lab.settings) as s:
        scope = scope_of(s, get_user(s, "tm"))
        expected = {r.id for r in s.exec(select(Report)) if may_see(s, scope, "report", r.id)}
        trial_reports = {r.id for r in s.exec(select(Report).where(Report.kind == "trial_deviations"))}
    assert _listed(html) == expected and trial_reports <= expected
    # A site QC report covers every trial of its site: not a trial manager's to read.
    with session_scope(lab.settings) as s:
        site_qc = [r.id for r in s.exec(select(Report).where(Report.kind == "site_qc"))]
        accreditation = {r.id for r in s.exec(select(Report).where(Report.kind == "accreditation"))}
    assert site_qc and not set(site_qc) & _listed(html) and accreditation <= _listed(html)
    client = client_for(app, "tm")
    assert all(client.get(f"/reports/{i}/file/html").status_code == 404 for i in site_qc)


def test_physicist_lists_every_version_newest_first(lab, app):
    html = client_for(app, "phys").get("/reports").text
    ids = [int(x) for x in re.findall(r'<td><a href="/reports/(\d+)">\d+</a></td>', html)]
    with session_scope(lab.settings) as s:
        every = sorted((r.id for r in s.exec(select(Report))), reverse=True)
    assert ids == every
    assert "awaiting signature" in html


def test_another_sites_report_is_not_found(lab, app):
    client = client_for(app, "site-a")
    other = lab.ids["B02"]["report"][0]
    for url in (f"/reports/{other}", f"/reports/{other}/file/pdf", f"/reports/{other}/file/html",
                "/reports/999999", "/reports/999999/file/pdf"):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "%PDF" not in response.text


def test_site_downloads_its_pdf_and_the_download_is_audited(lab, app):
    client = client_for(app, "site-a")
    report_id = lab.ids["A01"]["report"][0]
    response = client.get(f"/reports/{report_id}/file/pdf")
    assert response.status_code == 200 and response.content.startswith(b"%PDF")
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["content-disposition"].startswith("attachment;")
    digest = hashlib.sha256(response.content).hexdigest()
    with session_scope(lab.settings) as s:
        on_disk = report_files(lab.settings.data_dir, s.get(Report, report_id))["pdf"].read_bytes()
    assert digest == hashlib.sha256(on_disk).hexdigest()
    event = _events(lab, "report.download")[-1]
    assert (event.actor, event.entity, event.entity_id) == ("site-a", "report", str(report_id))
    assert event.detail["part"] == "pdf" and event.detail["sha256"] == digest
    assert event.detail["path"].endswith(".pdf") and not event.detail["path"].startswith("/")


def test_html_is_shown_sandboxed_and_unknown_part_is_404(lab, app):
    client = client_for(app, "site-a")
    report_id = lab.ids["A01"]["report"][0]
    response = client.get(f"/reports/{report_id}/file/html")
    assert response.status_code == 200 and "<html" in response.text.lower()
    assert "sandbox" in response.headers["content-security-policy"]
    assert "script-src" not in response.headers["content-security-policy"]  # default-src 'none' covers it
    for part in ("json", "figures", "signature"):  # unsigned: no signature record yet
        assert client.get(f"/reports/{report_id}/file/{part}").status_code == 404, part


def test_trial_manager_cannot_sign(lab, app):
    client = client_for(app, "tm")
    with session_scope(lab.settings) as s:
        trial_report = s.exec(select(Report).where(Report.kind == "trial_deviations")).first().id
    page = client.get(f"/reports/{trial_report}")
    assert page.status_code == 200 and 'action="/reports/' not in page.text  # no sign form offered
    response = post_form(client, f"/reports/{trial_report}", f"/reports/{trial_report}/sign",
                         {"password": PASSWORD, "reason": "reviewed and approved"})
    assert response.status_code == 403
    assert _report(lab, trial_report).signed_by is None


def test_physicist_signs_with_the_password_asked_again(lab, app):
    client = client_for(app, "phys")
    report_id = lab.ids["A01"]["report"][-1]
    assert _report(lab, report_id).signed_at is None
    page = client.get(f"/reports/{report_id}")
    assert f'action="/reports/{report_id}/sign"' in page.text and 'name="password"' in page.text

    wrong = post_form(client, f"/reports/{report_id}", f"/reports/{report_id}/sign",
                      {"password": "not my password at all", "reason": "reviewed and approved"})
    assert wrong.status_code == 401 and "Signature refused" in wrong.text
    assert _report(lab, report_id).signed_by is None
    failure = _events(lab, "reauth.failure")[-1]
    assert failure.actor == "phys" and failure.detail["purpose"] == f"sign report {report_id}"
    assert not [e for e in _events(lab, "report.sign") if e.entity_id == str(report_id)]

    right = post_form(client, f"/reports/{report_id}", f"/reports/{report_id}/sign",
                      {"password": PASSWORD, "reason": "reviewed and approved"})
    assert right.status_code == 200 and str(right.url).endswith(f"/reports/{report_id}")
    assert "Signed by Dr P. Hysicist" in right.text and "reviewed and approved" in right.text
    report = _report(lab, report_id)
    assert report.signed_by == "Dr P. Hysicist" and report.signed_at is not None
    signature = report_files(lab.settings.data_dir, report)["signature"]
    record = json.loads(signature.read_text())
    assert record["signed_by"] == "Dr P. Hysicist" and record["html_sha256"] == report.sha256
    assert record["login"] == "phys" and record["meaning"] == "reviewed and approved"
    sign = [e for e in _events(lab, "report.sign") if e.entity_id == str(report_id)]
    assert len(sign) == 1 and sign[0].detail["meaning"] == "reviewed and approved" and sign[0].actor == "phys"
    assert sign[0].detail["printed_name"] == "Dr P. Hysicist"
    assert record["audit_event_id"] == sign[0].id
    assert _events(lab, "reauth.success")[-1].actor == "phys"

    listing = client_for(app, "site-a").get("/reports").text
    assert "signed by Dr P. Hysicist at" in listing and "— reviewed and approved" in listing
    sig = client_for(app, "site-a").get(f"/reports/{report_id}/file/signature")
    assert sig.status_code == 200 and sig.json()["signed_by"] == "Dr P. Hysicist"
    assert sig.headers["content-disposition"].startswith("attachment;")

    again = post_form(client, f"/reports/{report_id}", f"/reports/{report_id}/sign",
                      {"password": PASSWORD, "reason": "reviewed and approved"})
    assert again.status_code == 409 and "already signed" in again.text
    assert len([e for e in _events(lab, "report.sign") if e.entity_id == str(report_id)]) == 1


def test_sign_without_csrf_token_is_refused(lab, app):
    client = client_for(app, "phys")
    report_id = lab.ids["B02"]["report"][0]
    response = client.post(f"/reports/{report_id}/sign", data={"password": PASSWORD})
    assert response.status_code == 403 and _report(lab, report_id).signed_by is None


def test_signing_counts_towards_the_lockout(lab, app):
    """A session left open cannot be used to guess the password at the signature: wrong passwords
    there lock the account as failed logins do, and a locked account cannot sign."""
    from services import accounts

    with session_scope(lab.settings) as s:
        accounts.add_user(s, "phys2", role="physicist", full_name="Dr Second", password=PASSWORD, actor="test")
        unsigned = s.exec(select(Report).where(col(Report.signed_at).is_(None)).order_by(col(Report.id))).first()
    client = client_for(app, "phys2")
    url = f"/reports/{unsigned.id}"
    for _ in range(lab.settings.portal_max_failed_logins):
        assert post_form(client, url, f"{url}/sign", {"password": "guess guess guess"}).status_code == 401
    assert [e for e in _events(lab, "login.lockout") if e.actor == "phys2"]
    assert post_form(client, url, f"{url}/sign", {"password": PASSWORD}).status_code == 401
    assert _report(lab, unsigned.id).signed_at is None
