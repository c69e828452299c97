"""Deliver reports: to the site's outbox folder, and by e-mail when SMTP is configured.

A report with a site goes to ``<data dir>/outbox/<SITE>/`` of *that* site only (its
``Report.site_id``) and to the site's e-mail address; a report without a site (the trial
deviation report, for trial managers) goes to ``<data dir>/outbox/_trial/<TRIAL>/`` and to
``CORELAB_TRIAL_MANAGER_EMAIL``, never to a site. Each delivery is an audit event
(``report.deliver``), with the e-mail outcome; an e-mail that fails is logged and recorded,
and the outbox copy stands (nothing is raised).
"""

from __future__ import annotations

import logging
import shutil
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path

from sqlmodel import Session

from corelab import audit
from corelab.models import Report, Site, Trial
from corelab.settings import Settings
from reports.render import KINDS, report_files, safe_report_path

log = logging.getLogger(__name__)

TRIAL_OUTBOX = "_trial"
"""Outbox folder of trial-level reports (site codes never start with an underscore)."""

__all__ = ["deliver_report", "publish", "send_email", "outbox_for", "TRIAL_OUTBOX"]


def outbox_for(session: Session, settings: Settings, report: Report) -> tuple[Path, str | None]:
    """The outbox folder of a report and the e-mail address it goes to (None: no e-mail).

    Raises :class:`~reports.render.ReportError` when the site or trial code would make a path
    outside ``<data dir>/outbox/`` (codes are validated at registration; this guards rows
    registered before that, or edited in the store).
    """
    if report.site_id is not None:
        site = session.get(Site, report.site_id)
        return safe_report_path(settings.outbox_dir, site.code), site.email or None
    trial = session.get(Trial, report.trial_id) if report.trial_id is not None else None
    return safe_report_path(settings.outbox_dir, TRIAL_OUTBOX, trial.code if trial else "all"), \
        settings.trial_manager_email or None


def send_email(settings: Settings, to: str, subject: str, body: str, attachments: list[Path]) -> None:
    """Send one e-mail through ``settings.smtp_host`` (raises ``OSError``/``smtplib.SMTPException``)."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = settings.smtp_from, to, subject
    msg.set_content(body)
    for path in attachments:
        subtype = {".pdf": ("application", "pdf"), ".html": ("text", "html"),
                   ".json": ("application", "json")}.get(path.suffix, ("application", "octet-stream"))
        msg.add_attachment(path.read_bytes(), maintype=subtype[0], subtype=subtype[1], filename=path.name)
    if settings.smtp_security == "ssl":
        smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=30,
                                context=ssl.create_default_context())
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30)
    with smtp:
        if settings.smtp_security == "starttls":
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(msg)


def deliver_report(session: Session, settings: Settings, report: Report, *, actor: str = "corelab") -> dict:
    """Copy a report version (HTML, PDF, and signature once signed) to its outbox; e-mail it.

    Returns
    -------
    dict
        ``outbox`` (folder), ``files`` (names copied), ``email`` (address or None) and
        ``email_status`` (``sent``, ``not configured``, ``no address`` or the error).
    """
    outbox, address = outbox_for(session, settings, report)
    outbox.mkdir(parents=True, exist_ok=True)
    files = report_files(settings.data_dir, report)
    copied = []
    for name in ("html", "pdf", "signature"):
        if files[name].is_file():
            shutil.copy2(files[name], outbox / files[name].name)
            copied.append(files[name].name)
    if not settings.smtp_host:
        status = "not configured"
    elif not address:
        status = "no address"
    else:
        subject = f"[corelab] {KINDS.get(report.kind, report.kind)} {files['html'].stem}"
        body = (f"{KINDS.get(report.kind, report.kind)} {files['html'].stem}, version {report.version}"
                + (f", signed by {report.signed_by}" if report.signed_by else " (not yet signed)")
                + f".\nsha256 of the HTML: {report.sha256}\nThe PDF and the self-contained HTML are attached.\n")
        try:
            send_email(settings, address, subject, body,
                       [files["pdf"], files["html"]] + ([files["signature"]] if files["signature"].is_file() else []))
            status = "sent"
        except (OSError, smtplib.SMTPException) as exc:
            log.error("report %s: e-mail to %s failed: %s; it is in %s", report.id, address, exc, outbox)
            status = f"failed: {exc}"
    audit.append(session, actor=actor, action="report.deliver", entity="report", entity_id=report.id,
                 detail={"outbox": outbox.relative_to(settings.data_dir).as_posix()
                         if outbox.is_relative_to(settings.data_dir) else str(outbox),
                         "files": copied, "email": address if settings.smtp_host else None,
                         "email_status": status})
    return {"report_id": report.id, "outbox": str(outbox), "files": copied, "email": address,
            "email_status": status}


def publish(session: Session, settings: Settings, spec, *, force: bool = False, reason: str = "",
            deliver: bool = True, actor: str = "corelab") -> dict:
    """Render a :class:`~reports.render.ReportSpec` and deliver the new version.

    An unchanged report is neither rendered nor delivered again (see
    :func:`reports.render.render_report`).
    """
    from reports.render import render_report

    result = render_report(session, spec, data_dir=settings.data_dir, reports_dir=settings.reports_dir,
                           force=force, reason=reason, actor=actor)
    out = {"kind": spec.kind, "key": spec.key, **result.as_dict()}
    if result.status == "rendered" and deliver:
        report = session.get(Report, result.report_id)
        out["delivery"] = deliver_report(session, settings, report, actor=actor)
    return out
