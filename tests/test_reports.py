"""Reports: accreditation, site QC and trial deviation reports (HTML and PDF), queries and waivers,
sign-off and versions, delivery to the site outboxes and by e-mail (a loopback SMTP server).

One small synthetic trial is ingested, accredited and checked without Prefect; the reports are
rendered from it and their content is checked against the stored results.
"""

from __future__ import annotations

import dataclasses
import email
import json
import re
import shutil
import socketserver
import subprocess
import threading
from email import policy
from pathlib import Path

import pytest
from PIL import Image
from sqlmodel import select

from corelab import audit
from corelab.db import session_scope
from corelab.models import AuditEvent, Deviation, PhantomResult, Report, Scanner, Site
from corelab.queries import deviation_rows
from expectations.qc import trial_pet_series
from tests.lab_helpers import build_lab

PDFTOPPM, PDFTOTEXT, PDFIMAGES = shutil.which("pdftoppm"), shutil.which("pdftotext"), shutil.which("pdfimages")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A data directory holding a small synthetic trial: ingested, accredited and checked."""
    return build_lab(tmp_path_factory.mktemp("reports"))


def _pdf_text(pdf: Path) -> str:
    return subprocess.run([PDFTOTEXT, "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def _pdf_images(pdf: Path) -> int:
    out = subprocess.run([PDFIMAGES, "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines()[2:] if " image " in line)


def _pages_not_blank(pdf: Path, tmp_path: Path) -> int:
    """Turn every page into a PNG with pdftoppm and check that each carries ink; return pages."""
    prefix = tmp_path / pdf.stem
    subprocess.run([PDFTOPPM, "-r", "30", "-png", str(pdf), str(prefix)], check=True, timeout=120)
    pages = sorted(tmp_path.glob(f"{pdf.stem}-*.png"))
    assert pages, f"pdftoppm made no page of {pdf}"
    for page in pages:
        grey = Image.open(page).convert("L")
        dark = sum(grey.histogram()[:200])
        assert dark > 0.005 * grey.width * grey.height, f"{page.name} is blank"
    return len(pages)


def _render(settings, spec, **kw):
    from reports.delivery import publish

    with session_scope(settings) as session:
        return publish(session, settings, spec, **kw)


def test_accreditation_report_shows_the_results(lab, tmp_path):
    from reports.accreditation import accreditation_report

    settings, truth = lab
    for code, banner in (("A01-1", "ACCREDITED"), ("C03-1", "NOT ACCREDITED")):
        with session_scope(settings) as session:
            spec = accreditation_report(session, code, settings=settings)
            sc = session.exec(select(Scanner).where(Scanner.code == code)).one()
            results = {r.kind: r for r in session.exec(select(PhantomResult).where(PhantomResult.scanner_id == sc.id))}
        out = _render(settings, spec)
        html, pdf = Path(out["html"]).read_text(), Path(out["pdf"])
        pdf_text = _pdf_text(pdf)
        nema, cyl = results["nema_iec"].metrics, results["uniform_cylinder"].metrics
        assert re.search(rf">\s*{banner}\s*<", html) and banner in pdf_text
        if banner == "ACCREDITED":
            assert "NOT ACCREDITED" not in html
        for text in (html, pdf_text):
            for value in (sc.serial_number, sc.software_versions, sc.model, "EARL1",
                          results["nema_iec"].scan_date.isoformat(), f"{cyl['calibration_bias_pct']:+.2f}",
                          f"{cyl['cov_pct']:.2f}", f"{results['nema_iec'].fill['fill_kbq_ml']['sphere_kbq_ml']:.3f}"):
                assert value in text, (code, value)
            for s in nema["spheres"]:
                for metric in ("rc_mean", "rc_max", "rc_peak"):
                    assert f"{s[metric]:.3f}" in text, (code, s["diameter_mm"], metric)
        margins = [c for c in nema["checks"]["checks"] if c["verified"]]
        assert all(f"{c['margin']:+.3f}" in html for c in margins)
        # recovery, sphere assignment, profile, two image panels
        assert html.count('src="data:image/png;base64,') == 5
        assert _pdf_images(pdf) >= 5
        assert "Sphere assignment" in html and "Sphere assignment" in pdf_text
        for name in ("recovery", "sphere_assignment", "profile", "nema_planes", "cylinder_planes"):
            assert (Path(out["html"]).with_suffix("").parent / f"{code}_EARL1-v1-figures" / f"{name}.png").is_file()
        assert _pages_not_blank(pdf, tmp_path) >= 2
        saved = json.loads(Path(out["json"]).read_text())
        assert saved["data"]["accreditation"]["status"] == ("accredited" if banner == "ACCREDITED" else "failed")
    assert "Reviewed and signed by" in html and "Validity" in html


def test_queries_waivers_versions_and_signature(lab, tmp_path):
    from corelab.site_queries import QueryError, answer_query, open_query, resolve_query, waive_deviation
    from reports.render import ReportError, sign_report
    from reports.site_qc import month_period, site_qc_report

    settings, truth = lab
    since, until, label = month_period()

    def site_spec(site="A01"):
        with session_scope(settings) as session:
            return site_qc_report(session, site, since=since, until=until, label=label)

    first = _render(settings, site_spec())
    assert first["status"] == "rendered" and first["version"] == 1
    assert _render(settings, site_spec())["status"] == "unchanged"  # same content: nothing new
    html_v1 = Path(first["html"]).read_bytes()
    with session_scope(settings) as session:
        a01 = [d for d in deviation_rows(session, site_code="A01") if d["status"] == "open"]
        assert len(a01) >= 2
        q = open_query(session, a01[0]["id"], "Please send the corrected series.", actor="physicist")
        qid, waived_id = q.id, a01[1]["id"]
        with pytest.raises(QueryError, match="another site"):
            answer_query(session, qid, "not ours", site_code="B02")
        answer_query(session, qid, "Resent on Monday.", site_code="A01")
        waive_deviation(session, waived_id, "clinically acceptable, agreed with the trial PI", actor="Dr Physicist")
        assert session.get(Deviation, a01[0]["id"]).status == "queried"
    second = _render(settings, site_spec())
    assert second["version"] == 2 and Path(second["html"]) != Path(first["html"])
    html = Path(second["html"]).read_text()
    assert "Resent on Monday." in html and "clinically acceptable, agreed with the trial PI" in html
    assert f"query {qid}: answered" in html
    with session_scope(settings) as session:
        resolve_query(session, qid, actor="physicist", text="series received")
        assert session.get(Deviation, a01[0]["id"]).status == "resolved"
        actions = [e.action for e in session.exec(select(AuditEvent))]
        for action in ("query.open", "query.answer", "query.resolve", "deviation.waive", "report.render"):
            assert action in actions
        v2 = session.get(Report, second["report_id"])
        assert v2.replaces_id == first["report_id"]
        # sign v2: frozen; a second signature and a signature of an edited file are refused
        sign_report(session, v2.id, signer="Dr Physicist", reason="reviewed and approved", data_dir=settings.data_dir)
        with pytest.raises(ReportError, match="already signed"):
            sign_report(session, v2.id, signer="X", reason="again", data_dir=settings.data_dir)
        assert not audit.verify(session)
        sign_event = session.exec(select(AuditEvent).where(AuditEvent.action == "report.sign")).one()
        assert sign_event.detail["html_sha256"] == v2.sha256 and sign_event.actor == "Dr Physicist"
    signed_bytes = Path(second["html"]).read_bytes()
    third = _render(settings, site_spec())  # the resolved query changes the content: v3, v2 untouched
    assert third["version"] == 3 and Path(second["html"]).read_bytes() == signed_bytes
    assert Path(first["html"]).read_bytes() == html_v1
    forced = _render(settings, site_spec(), force=True, reason="correction: wrong period label")
    assert forced["version"] == 4 and "correction: wrong period label" in Path(forced["html"]).read_text()
    Path(forced["html"]).write_text("edited")
    with session_scope(settings) as session:
        with pytest.raises(ReportError, match="does not match"):
            sign_report(session, forced["report_id"], signer="Dr Physicist", reason="ok", data_dir=settings.data_dir)


class _SMTPHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib: EHLO, MAIL, RCPT, DATA, QUIT."""

    def handle(self):
        self.wfile.write(b"220 127.0.0.1 test smtpd\r\n")
        envelope = {"to": []}
        while line := self.rfile.readline():
            cmd = line.strip().upper()
            if cmd.startswith((b"EHLO", b"HELO")):
                self.wfile.write(b"250 127.0.0.1\r\n")
            elif cmd.startswith(b"MAIL FROM:"):
                envelope = {"from": line.strip()[10:].decode(), "to": []}
                self.wfile.write(b"250 OK\r\n")
            elif cmd.startswith(b"RCPT TO:"):
                envelope["to"].append(line.strip()[8:].decode().strip("<>"))
                self.wfile.write(b"250 OK\r\n")
            elif cmd == b"DATA":
                self.wfile.write(b"354 end with .\r\n")
                body = []
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    body.append(data[1:] if data.startswith(b"..") else data)
                self.server.messages.append({**envelope, "message": email.message_from_bytes(
                    b"".join(body), policy=policy.default)})
                self.wfile.write(b"250 queued\r\n")
            elif cmd == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 OK\r\n")


@pytest.fixture
def smtp_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SMTPHandler)
    server.daemon_threads = True
    server.messages = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_delivery_to_outboxes_and_email_each_site_only_its_own(lab, smtp_server):
    from reports.accreditation import accreditation_report
    from reports.delivery import TRIAL_OUTBOX
    from reports.site_qc import month_period, site_qc_report
    from reports.trial import trial_deviation_report

    base, truth = lab
    settings = dataclasses.replace(base, smtp_host="127.0.0.1", smtp_port=smtp_server.server_address[1],
                                   smtp_from="corelab@lab.test", trial_manager_email="tm@trial.test")
    since, until, _ = month_period()
    with session_scope(settings) as session:
        for site in session.exec(select(Site)):
            site.email = f"qc@{site.code.lower()}.test"
        pseudonyms: dict[str, set] = {}
        for d in deviation_rows(session):
            pseudonyms.setdefault(d["site"], set()).add(d["subject"])
    outs = {}
    for site in ("B02", "C03"):
        with session_scope(settings) as session:
            spec = site_qc_report(session, site, since=since, until=until, label="delivery-test")
        outs[site] = _render(settings, spec)
    with session_scope(settings) as session:
        spec = accreditation_report(session, "B02-1", settings=settings)
    outs["B02-1"] = _render(settings, spec, force=True, reason="delivery test")
    with session_scope(settings) as session:
        spec = trial_deviation_report(session, truth["trial_code"])
    outs["trial"] = _render(settings, spec)
    assert all(o["delivery"]["email_status"] == "sent" for o in outs.values()), outs
    for site in ("B02", "C03"):
        names = sorted(p.name for p in settings.site_outbox(site).iterdir())
        assert names and all(n.startswith(site) for n in names), names
        others = {s for site_, subs in pseudonyms.items() if site_ != site for s in subs}
        for path in settings.site_outbox(site).iterdir():
            text = path.read_bytes()
            assert not any(s.encode() in text for s in others if s), (path, "another site's subject")
    assert sorted(p.name for p in (settings.outbox_dir / TRIAL_OUTBOX / truth["trial_code"]).iterdir())
    by_to = {}
    for m in smtp_server.messages:
        by_to.setdefault(m["to"][0], []).append(m["message"])
    assert set(by_to) == {"qc@b02.test", "qc@c03.test", "tm@trial.test"}
    for addr, site in (("qc@b02.test", "B02"), ("qc@c03.test", "C03")):
        for msg in by_to[addr]:
            files = [part.get_filename() for part in msg.iter_attachments()]
            assert files and all(f.startswith(site) for f in files), files
            assert any(f.endswith(".pdf") for f in files)
    assert len(by_to["qc@b02.test"]) == 2  # its site QC report and its scanner's accreditation report


def test_trial_report_and_no_identifier_anywhere(lab, tmp_path):
    from reports.exports import export_trial
    from reports.trial import trial_deviation_report

    settings, truth = lab
    code = truth["trial_code"]
    with session_scope(settings) as session:
        exports = export_trial(session, code, settings.exports_dir, fmt="csv")
        spec = trial_deviation_report(session, code, exports=exports)
        devs = deviation_rows(session, trial_code=code)
        n_pet = len(trial_pet_series(session, code))
    out = _render(settings, spec)
    html, pdf_text = Path(out["html"]).read_text(), _pdf_text(Path(out["pdf"]))
    majors = {d["series_uid"] for d in devs if d["severity"] == "major" and d["status"] in ("open", "queried")}
    rate = f"{100 * len(majors) / n_pet:.0f} %"
    for text in (html, pdf_text):
        assert rate in text and code in text
        for site in ("A01", "B02", "C03"):
            assert site in text
    for d in devs:
        assert d["rule_id"] in html and d["subject"] in html
    first_minor = html.find(">minor<")
    assert first_minor == -1 or html.rfind(">major<") < first_minor  # major deviations first
    assert 'href="file://' in html and "_deviations.csv" in html
    assert html.count('src="data:image/png;base64,') == 1 and _pdf_images(Path(out["pdf"])) >= 1
    _pages_not_blank(Path(out["pdf"]), tmp_path)
    # the planted patient name reaches no report, figure, JSON or outbox file
    name = next(p["planted_value"] for p in truth["problems"] if p["code"] == "patient_name_in_header")
    parts = [p.encode() for p in name.replace("^", " ").split() if len(p) > 2]
    produced = [p for root in (settings.reports_dir, settings.outbox_dir) for p in root.rglob("*") if p.is_file()]
    assert len(produced) > 10
    for path in produced:
        data = path.read_bytes()
        assert not any(part in data for part in parts), f"planted identifier in {path}"
    for pdf in settings.reports_dir.rglob("*.pdf"):
        text = _pdf_text(pdf)
        assert not any(part.decode() in text for part in parts), f"planted identifier in {pdf}"


def test_cli_query_waive_render_list_sign(lab, monkeypatch, capsys):
    from flows.cli import main

    settings, truth = lab
    monkeypatch.setenv("CORELAB_DATA_DIR", str(settings.data_dir))
    with session_scope(settings) as session:
        dev = next(d for d in deviation_rows(session, site_code="B02") if d["status"] == "open")
        other = next(d for d in deviation_rows(session, site_code="B02") if d["status"] == "open"
                     and d["id"] != dev["id"])
    assert main(["query", "open", str(dev["id"]), "--text", "Please check the weight.", "--as", "phys",
                 "--json"]) == 0
    qid = json.loads(capsys.readouterr().out)["query"]
    assert main(["query", "answer", str(qid), "--text", "72 kg", "--as", "A01"]) == 2  # not A01's query
    assert "another site" in capsys.readouterr().err
    assert main(["query", "answer", str(qid), "--text", "72 kg", "--as", "B02"]) == 0
    capsys.readouterr()
    assert main(["query", "list", "--site", "B02", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["id"] == qid and r["status"] == "answered" and r["thread"][-1]["text"] == "72 kg" for r in rows)
    assert main(["deviation", "waive", str(other["id"]), "--reason", "accepted by the PI", "--as", "phys"]) == 0
    assert main(["query", "resolve", str(qid), "--as", "phys"]) == 0
    capsys.readouterr()
    assert main(["report", "render", "site-qc", "--site", "B02", "--json"]) == 0
    [out] = json.loads(capsys.readouterr().out)
    assert out["status"] == "rendered" and Path(out["pdf"]).is_file()
    assert main(["report", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["id"] == out["report_id"] and r["kind"] == "site_qc" for r in rows)
    assert main(["sign", str(out["report_id"]), "--as", "Dr Physicist", "--reason", "approved", "--json"]) == 0
    signed = json.loads(capsys.readouterr().out)
    assert signed["signed_by"] == "Dr Physicist"
    assert (settings.site_outbox("B02") / Path(out["html"]).with_suffix(".signature.json").name).is_file()
    assert main(["sign", str(out["report_id"]), "--as", "X", "--reason", "again"]) == 2
    assert main(["audit", "verify"]) == 0
