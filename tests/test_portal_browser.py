"""Each role's main journey through the portal in a real browser: Debian's Chromium
(/usr/bin/chromium), driven by Playwright, against the portal served by uvicorn on loopback.

- a site answers a query and downloads its report;
- a physicist waives a deviation and signs a report (the password is asked again);
- a trial manager downloads an export;
- an admin's users page.

Every page the browser shows is kept and searched for the patient names planted in the synthetic
trial's headers. Each role's main page is photographed; with ``CORELAB_SCREENSHOTS=docs`` the
pictures are written to ``docs/`` (the README shows them).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import AuditEvent, Deviation, Query, Report, Series, Site
from tests.portal_helpers import PASSWORD, build_portal_lab, planted_identifiers, served_portal

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[1] / "docs"
# The flags of a browser on a closed network: no background connections, no first-run pages.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def base_url(lab):
    with served_portal(lab.settings) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: .ci/system-deps installs it"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


class Journey:
    """One user's browser tab; keeps the HTML of every page it showed."""

    def __init__(self, browser, base_url: str, tmp_path: Path):
        self.context = browser.new_context(base_url=base_url, accept_downloads=True,
                                           viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.pages: list[str] = []
        self.tmp_path = tmp_path

    def seen(self) -> None:
        self.pages.append(self.page.content())

    def login(self, name: str) -> None:
        self.page.goto("/login")
        self.page.fill("input[name=name]", name)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.click("button[type=submit]")
        self.page.wait_for_load_state()
        assert "/login" not in self.page.url, f"{name} could not log in"
        self.seen()

    def click(self, selector: str) -> None:
        self.page.click(selector)
        self.page.wait_for_load_state()
        self.seen()

    def download(self, selector: str) -> bytes:
        with self.page.expect_download() as info:
            self.page.click(selector)
        path = self.tmp_path / info.value.suggested_filename
        info.value.save_as(path)
        return path.read_bytes()

    def screenshot(self, name: str) -> Path:
        path = self.tmp_path / f"portal-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        grey = Image.open(path).convert("L")
        assert sum(grey.histogram()[:160]) > 0.01 * grey.width * grey.height, f"{path.name} is blank"
        if os.environ.get("CORELAB_SCREENSHOTS") == "docs":
            shutil.copy(path, DOCS / path.name)
        return path

    def close(self, lab) -> None:
        names = planted_identifiers(lab.truth)
        for html in self.pages:
            assert not any(n in html.upper() for n in names), "a planted patient name reached a page"
        self.context.close()


def _audit(lab, action: str, actor: str) -> list[AuditEvent]:
    with session_scope(lab.settings) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action, AuditEvent.actor == actor)))


def test_site_answers_a_query_and_downloads_its_report(lab, base_url, browser, tmp_path):
    j = Journey(browser, base_url, tmp_path)
    j.login("site-a")
    assert j.page.url.endswith("/sites/A01") and "A01" in j.page.inner_text("h1")
    badges = j.page.locator("span.state").all_inner_texts()
    assert "query open" in badges
    j.screenshot("site")

    j.click("nav >> text=Queries")
    [query_id] = lab.ids["A01"]["query"]
    j.click(f"a[href='/queries/{query_id}']")
    j.page.fill("textarea[name=text]", "The activity was 312 MBq; the meter was recalibrated.")
    j.click("text=Send the answer")
    assert "recalibrated" in j.page.content()
    with session_scope(lab.settings) as s:
        query = s.get(Query, query_id)
        assert query.status == "answered" and query.thread[-1]["text"].endswith("recalibrated.")
    assert _audit(lab, "query.answer", "site-a")

    j.click("nav >> text=Reports")
    with session_scope(lab.settings) as s:
        a01 = s.exec(select(Site).where(Site.code == "A01")).one()
        report = s.exec(select(Report).where(Report.site_id == a01.id, Report.kind == "site_qc")).first()
    j.click(f"a[href='/reports/{report.id}']")
    pdf = j.download("text=Download PDF")
    assert pdf.startswith(b"%PDF")
    import hashlib

    [event] = [e for e in _audit(lab, "report.download", "site-a") if e.entity_id == str(report.id)]
    assert event.detail["sha256"] == hashlib.sha256(pdf).hexdigest()
    j.close(lab)


def test_physicist_waives_a_deviation_and_signs_a_report(lab, base_url, browser, tmp_path):
    j = Journey(browser, base_url, tmp_path)
    j.login("phys")
    assert j.page.url.endswith("/worklist")
    j.screenshot("physicist")

    with session_scope(lab.settings) as s:
        dev = s.exec(select(Deviation).join(Series).join(Site).where(Site.code == "C03", Deviation.status == "open")
                     .order_by(Deviation.id)).first()
        unsigned = s.exec(select(Report).where(Report.signed_at.is_(None), Report.kind == "accreditation")
                          .order_by(Report.id)).first()
    j.page.goto(f"/series/{dev.series_id}")
    form = j.page.locator(f"form[action='/deviations/{dev.id}/waive']")
    form.locator("textarea[name=reason]").fill("Uptake 2 min outside the window; quantitation unaffected.")
    form.locator("button[type=submit]").click()
    j.page.wait_for_load_state()
    j.seen()
    assert "waived" in j.page.content()
    with session_scope(lab.settings) as s:
        assert s.get(Deviation, dev.id).status == "waived"
    assert [e for e in _audit(lab, "deviation.waive", "phys") if e.entity_id == str(dev.id)]

    j.page.goto(f"/reports/{unsigned.id}")
    j.page.fill("input[name=password]", PASSWORD)
    j.click("text=Sign this report")
    assert "Dr P. Hysicist" in j.page.content() and "reviewed and approved" in j.page.content()
    with session_scope(lab.settings) as s:
        signed = s.get(Report, unsigned.id)
        assert signed.signed_by == "Dr P. Hysicist" and signed.signed_at is not None
    assert _audit(lab, "reauth.success", "phys")
    j.close(lab)


def test_trial_manager_downloads_an_export(lab, base_url, browser, tmp_path):
    j = Journey(browser, base_url, tmp_path)
    j.login("tm")
    assert "/deviations" in j.page.url
    j.screenshot("trial-manager")
    j.click(f"nav >> text=Trial {lab.trial}")
    data = j.download(f"a[href='/trials/{lab.trial}/exports/csv/deviations']")
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    with session_scope(lab.settings) as s:
        stored = s.exec(select(Deviation)).all()
    assert len(rows) == len(stored) and rows
    assert _audit(lab, "export.download", "tm")
    j.close(lab)


def test_admin_main_page(lab, base_url, browser, tmp_path):
    j = Journey(browser, base_url, tmp_path)
    j.login("admin")
    assert j.page.url.endswith("/admin/users")
    assert "site-a" in j.page.content() and "Dr P. Hysicist" in j.page.content()
    j.screenshot("admin")
    j.close(lab)
