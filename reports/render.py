"""Render a report from its saved data and figures: versioned HTML + PDF, recorded and frozen.

A report builder (``reports/accreditation.py``, ``reports/site_qc.py``, ``reports/trial.py``)
returns a :class:`ReportSpec`: the JSON-ready data the report shows, figure makers, and the
template. :func:`render_report` then

1. hashes the data (without its ``meta`` part: time of generation, turnaround up to this
   report) and compares it with the newest version of the same report (same kind and key);
   when it is unchanged nothing is written and that version is returned (status
   ``unchanged``): re-rendering unchanged content is a no-op, so a nightly or repeated run
   leaves the store and the outboxes as they were;
2. otherwise writes version N+1 beside the others, never over one:
   ``<reports>/<kind>/<key>/<key>-vN.json`` (the data, MRIQC style), ``-vN-figures/*.png``,
   ``-vN.html`` (self-contained: figures embedded) and ``-vN.pdf`` (WeasyPrint, from the same
   HTML), and records a :class:`~corelab.models.Report` row (``sha256`` of the HTML,
   ``replaces_id`` naming the version it supersedes) and a ``report.render`` audit event with
   the hashes of both files.

A signed version is frozen: :func:`sign_report` checks that its files still match the stored
hashes, stores the signer, time and reason, and appends a ``report.sign`` audit event (the
e-signature; the audit log is hash-chained, ``corelab audit verify``). Signing never changes a
file; a correction is a new version rendered with ``force=True`` and a reason, which names the
version it replaces. The signature record (``-vN.signature.json``, delivered with the report)
carries the audit chain's head hash and event count at signing (``audit_head_hash``,
``audit_count``): a copy of the anchor outside the store, which ``corelab audit verify`` checks.

Every report and outbox path is built with :func:`corelab.validate.safe_join`: a kind, key or
stored path that is not plain names under the data directory (a site code ``../../X`` registered
before codes were validated, an edited ``Report.path``) raises :class:`ReportError`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlmodel import Session, col, select

from corelab import __version__, audit
from corelab.models import Report, Site, Trial, utcnow
from corelab.validate import UnsafePath, safe_join
from reports.figures import png_data_uri

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)

KINDS = {"accreditation": "Scanner accreditation report", "site_qc": "Site QC report",
         "trial_deviations": "Trial deviation report", "series_qc": "Series QC note"}

__all__ = ["ReportSpec", "RenderResult", "ReportError", "render_report", "sign_report", "report_rows",
           "report_files", "content_sha256", "KINDS"]


class ReportError(ValueError):
    """A report operation that is not allowed (unknown report, edited file, signed twice)."""


@dataclass
class ReportSpec:
    """What a report builder hands to :func:`render_report`.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    key : str
        Names the report within its kind (scanner and standard, site and period, trial); the
        versions of one report share it. Letters, digits, ``-``, ``_`` and ``.`` only.
    title : str
    template : str
        Template file in ``reports/templates``.
    data : dict
        JSON-ready content; saved as the report's JSON and hashed (except ``data["meta"]``).
    figures : dict of str to callable
        Name -> function returning a finished matplotlib Figure, or PNG bytes already drawn (an
        image panel drawn while the volume was in memory); called only when rendering.
    site_id, trial_id : int or None
        The site the report belongs to (a site receives only its own reports) and the trial.
    """

    kind: str
    key: str
    title: str
    template: str
    data: dict
    figures: dict[str, Callable] = field(default_factory=dict)
    site_id: int | None = None
    trial_id: int | None = None


@dataclass(frozen=True)
class RenderResult:
    status: str  # "rendered" | "unchanged"
    report_id: int
    version: int
    html: Path
    pdf: Path
    json: Path

    def as_dict(self) -> dict:
        return {"status": self.status, "report_id": self.report_id, "version": self.version,
                "html": str(self.html), "pdf": str(self.pdf), "json": str(self.json)}


def _canonical(data) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def content_sha256(data: dict) -> str:
    """sha256 of the report data without its ``meta`` part (what decides a new version)."""
    return hashlib.sha256(_canonical({k: v for k, v in data.items() if k != "meta"})).hexdigest()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def safe_report_path(root: Path, *parts: str) -> Path:
    """``root / parts...`` checked to stay inside ``root`` (:func:`corelab.validate.safe_join`)."""
    try:
        return safe_join(root, *parts)
    except UnsafePath as exc:
        raise ReportError(f"unsafe report path: {exc}; fix the site, scanner or trial code (see "
                          "`corelab site list`)") from None


def report_files(data_dir: Path, report: Report) -> dict[str, Path]:
    """The files of a report version: html, pdf, json (and signature once signed)."""
    rel = Path(report.path)
    if rel.is_absolute():
        raise ReportError(f"report {report.id}: stored path {report.path!r} is not relative to the data directory")
    html = safe_report_path(data_dir, *rel.parts)
    stem = html.with_suffix("")
    return {"html": html, "pdf": stem.with_suffix(".pdf"), "json": stem.with_suffix(".json"),
            "signature": Path(f"{stem}.signature.json")}


def _latest(session: Session, kind: str, key: str) -> Report | None:
    prefix = f"reports/{kind}/{key}/"
    return session.exec(select(Report).where(Report.kind == kind, col(Report.path).startswith(prefix))
                        .order_by(col(Report.version).desc())).first()


class _OnceFontSubsetWarning(logging.Filter):
    """Let WeasyPrint's "Using fontTools instead of HarfBuzz-Subset" through once per process.

    Without the HarfBuzz subset library (Debian ``libharfbuzz-subset0``) WeasyPrint subsets each
    font of each PDF with fontTools and warns every time: three fonts a report, 26 lines in a demo.
    The PDFs are right either way, so the one line that says what to install is enough; every
    other WeasyPrint warning (a CSS rule it ignored, a font it could not load) still shows.
    """

    NEEDLE = "instead of HarfBuzz-Subset"

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.NEEDLE not in str(record.msg):
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = (str(record.msg) + " (Debian: apt-get install libharfbuzz-subset0; the PDFs are right "
                      "without it. corelab shows this once per process.)")
        return True


def _quiet_font_subset_warnings() -> None:
    weasy = logging.getLogger("weasyprint")
    if not any(isinstance(f, _OnceFontSubsetWarning) for f in weasy.filters):
        weasy.addFilter(_OnceFontSubsetWarning())


def html_to_pdf(html: str, pdf_path: Path) -> None:
    """Write ``html`` as a PDF with WeasyPrint (Pango does the text layout)."""
    from weasyprint import HTML

    _quiet_font_subset_warnings()
    HTML(string=html, base_url=str(TEMPLATES)).write_pdf(pdf_path)


def render_report(session: Session, spec: ReportSpec, *, data_dir: Path, reports_dir: Path,
                  force: bool = False, reason: str = "", actor: str = "corelab") -> RenderResult:
    """Render ``spec`` as a new version, or return the newest one when its content is unchanged.

    Parameters
    ----------
    force : bool
        Render a new version even when the content is unchanged (a correction; give a reason).
    reason : str
        Why this version was made; recorded in the audit event and shown in the report.
    """
    if spec.kind not in KINDS:
        raise ReportError(f"unknown report kind {spec.kind!r}; one of {sorted(KINDS)}")
    digest = content_sha256(spec.data)
    latest = _latest(session, spec.kind, spec.key)
    if latest is not None and not force:
        files = report_files(data_dir, latest)
        if files["json"].is_file() and json.loads(files["json"].read_text()).get("content_sha256") == digest:
            return RenderResult("unchanged", latest.id, latest.version, files["html"], files["pdf"], files["json"])
    version = (latest.version + 1) if latest is not None else 1
    folder = safe_report_path(reports_dir, spec.kind, spec.key)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{spec.key}-v{version}"
    fig_dir = Path(f"{stem}-figures")
    fig_dir.mkdir(exist_ok=True)
    figures = {}
    for name, make in spec.figures.items():
        made = make()  # a Figure, or PNG bytes drawn earlier (an image figure needs the array in memory)
        png = made if isinstance(made, bytes) else base64.b64decode(png_data_uri(made).split(",", 1)[1])
        (fig_dir / f"{name}.png").write_bytes(png)
        figures[name] = "data:image/png;base64," + base64.b64encode(png).decode()
    now = utcnow()
    report_meta = {"kind": spec.kind, "kind_title": KINDS[spec.kind], "key": spec.key, "title": spec.title,
                   "version": version, "replaces_version": latest.version if latest is not None else None,
                   "reason": reason, "generated_at": now.strftime("%Y-%m-%d %H:%M UTC"),
                   "corelab_version": __version__, "content_sha256": digest,
                   "report_id_text": f"{spec.kind}/{spec.key} v{version}"}
    html = _env.get_template(spec.template).render(report=report_meta, figures=figures, **spec.data)
    html_path, pdf_path, json_path = stem.with_suffix(".html"), stem.with_suffix(".pdf"), stem.with_suffix(".json")
    html_path.write_text(html)
    html_to_pdf(html, pdf_path)
    html_sha, pdf_sha = _sha256_file(html_path), _sha256_file(pdf_path)
    json_path.write_text(json.dumps({"report": report_meta, "content_sha256": digest, "html_sha256": html_sha,
                                     "pdf_sha256": pdf_sha, "data": spec.data}, indent=1, sort_keys=True,
                                    default=str))
    rel = html_path.absolute().relative_to(data_dir.absolute()).as_posix()
    report = Report(kind=spec.kind, site_id=spec.site_id, trial_id=spec.trial_id, path=rel, sha256=html_sha,
                    version=version, replaces_id=latest.id if latest is not None else None, created_at=now)
    session.add(report)
    session.flush()
    audit.append(session, actor=actor, action="report.render", entity="report", entity_id=report.id,
                 detail={"kind": spec.kind, "key": spec.key, "version": version, "replaces_id": report.replaces_id,
                         "html_sha256": html_sha, "pdf_sha256": pdf_sha, "content_sha256": digest,
                         "reason": reason})
    return RenderResult("rendered", report.id, version, html_path, pdf_path, json_path)


def find_report(session: Session, ref: str | int, *, data_dir: Path) -> Report:
    """A report by id, or by the path of its HTML or PDF file."""
    if isinstance(ref, int) or str(ref).isdigit():
        report = session.get(Report, int(ref))
    else:
        path = Path(ref)
        path = path if path.is_absolute() else Path.cwd() / path
        try:
            rel = path.with_suffix(".html").absolute().relative_to(data_dir.absolute()).as_posix()
        except ValueError:
            rel = None
        report = session.exec(select(Report).where(Report.path == rel)).first() if rel else None
    if report is None:
        raise ReportError(f"no report {ref!r}: `corelab report list` names them (id or file)")
    return report


SIGN_MEANING = "reviewed and approved"
"""The meaning of a corelab e-signature (21 CFR 11.50), printed with the name and time."""


def sign_report(session: Session, ref: str | int, *, signer: str, reason: str, data_dir: Path,
                login: str | None = None) -> Report:
    """E-sign a report version: check its files, store signer and time, append ``report.sign``.

    ``signer`` is the printed name; ``login`` the account that signed (the portal's user; the
    command line's ``--as`` name when None): it is the audit event's actor and is kept in the
    signature record, so two people of the same printed name are told apart.

    Raises
    ------
    ReportError
        When the report is unknown or already signed, the reason or signer is empty, or a file
        no longer matches the hash recorded when it was rendered (it was edited).
    """
    if not signer.strip() or not reason.strip():
        raise ReportError("a signature needs a name (--as) and a reason (--reason)")
    report = find_report(session, ref, data_dir=data_dir)
    if report.signed_at is not None:
        raise ReportError(f"report {report.id} ({report.path}) was already signed by {report.signed_by} at "
                          f"{report.signed_at:%Y-%m-%d %H:%M}; a correction is a new version "
                          "(`corelab report render ... --force --reason ...`)")
    files = report_files(data_dir, report)
    if not files["html"].is_file() or _sha256_file(files["html"]) != report.sha256:
        raise ReportError(f"{files['html']} does not match the sha256 recorded when it was rendered: "
                          "it was edited or removed; render a new version instead")
    saved = json.loads(files["json"].read_text())
    if not files["pdf"].is_file() or _sha256_file(files["pdf"]) != saved.get("pdf_sha256"):
        raise ReportError(f"{files['pdf']} does not match the sha256 recorded when it was rendered")
    now = utcnow()
    report.signed_by, report.signed_at = signer, now
    session.add(report)
    session.flush()
    event = audit.append(session, actor=login or signer, action="report.sign", entity="report", entity_id=report.id,
                         detail={"path": report.path, "html_sha256": report.sha256, "pdf_sha256": saved["pdf_sha256"],
                                 "version": report.version, "reason": reason, "meaning": SIGN_MEANING,
                                 "printed_name": signer})
    session.flush()
    # The chain's head and length as of this signature (the sign event is the head): an anchor
    # outside the store that leaves with the report (`corelab audit verify` checks it).
    head = audit.position(session, event)
    files["signature"].write_text(json.dumps({
        "report": report.path, "version": report.version, "signed_by": signer, "login": login or signer,
        "signed_at": now.isoformat(), "meaning": SIGN_MEANING, "reason": reason, "html_sha256": report.sha256,
        "pdf_sha256": saved["pdf_sha256"],
        "audit_event_id": event.id, "audit_event_hash": event.hash,
        "audit_head_hash": event.hash, "audit_count": head}, indent=1))
    return report


def report_rows(session: Session, *, data_dir: Path | None = None) -> list[dict]:
    """Every report version, newest first, as plain dicts."""
    sites = {s.id: s.code for s in session.exec(select(Site))}
    trials = {t.id: t.code for t in session.exec(select(Trial))}
    out = []
    for r in session.exec(select(Report).order_by(col(Report.id).desc())):
        parts = r.path.split("/")
        out.append({"id": r.id, "kind": r.kind, "key": parts[2] if len(parts) > 3 else "", "version": r.version,
                    "site": sites.get(r.site_id, ""), "trial": trials.get(r.trial_id, ""),
                    "replaces_id": r.replaces_id, "path": r.path, "sha256": r.sha256,
                    "signed_by": r.signed_by or "", "signed_at": r.signed_at, "created_at": r.created_at})
    return out
