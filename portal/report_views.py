"""Reports: the list a user may see, one version's page, its files (downloads are audited) and the
physicist's e-signature, which asks for the password again (21 CFR 11: two components)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from corelab import accounts
from portal.pages import done, not_found, page
from portal.security import READERS, Ctx, require
from reports.render import ReportError, SIGN_MEANING
from services import reports, trial_view
from services.access import may_see

router = APIRouter()

# A report's HTML is self-contained (inline styles, figures as data: URIs) and runs no script:
# it is shown sandboxed, with just what it needs, instead of under the portal's own policy.
REPORT_HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


def send(download: trial_view.Download, *, attachment: bool = True) -> Response:
    """A download as a response; the ``X-Content-SHA256`` header is the hash the audit event holds."""
    disposition = "attachment" if attachment else "inline"
    headers = {"Content-Disposition": f'{disposition}; filename="{download.filename}"',
               "X-Content-SHA256": download.sha256}
    if not attachment:
        headers["Content-Security-Policy"] = REPORT_HTML_CSP
    return Response(download.content, media_type=download.media_type, headers=headers)


def _report_page(request: Request, ctx: Ctx, report_id: int, *, error: str = "", status_code: int = 200):
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "report", report_id):
            raise not_found("report")
        report = trial_view.report_detail(s, ctx.settings, report_id)
    return page(request, ctx, "report.html", status_code=status_code, report=report, error=error,
                meaning=SIGN_MEANING)


@router.get("/reports")
def report_list(request: Request, ctx: Ctx = Depends(require(*READERS))):
    with ctx.db() as s:
        rows = trial_view.report_listing(s, ctx.scope)
    return page(request, ctx, "reports.html", reports=rows)


@router.get("/reports/{report_id}")
def report_view(request: Request, report_id: int, ctx: Ctx = Depends(require(*READERS))):
    return _report_page(request, ctx, report_id)


@router.get("/reports/{report_id}/file/{part}")
def report_file(report_id: int, part: str, ctx: Ctx = Depends(require(*READERS))):
    if part not in trial_view.REPORT_PARTS:
        raise not_found("file")
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "report", report_id):
            raise not_found("report")
        try:
            download = trial_view.report_download(s, ctx.settings, report_id, part, actor=ctx.scope.user)
        except ReportError:  # a stored path outside the data directory: never served
            download = None
    if download is None:
        raise not_found("file")
    return send(download, attachment=part != "html")


@router.post("/reports/{report_id}/sign")
def report_sign(request: Request, report_id: int, password: str = Form("", max_length=1024),
                reason: str = Form("", max_length=300), ctx: Ctx = Depends(require("physicist"))):
    error = ""
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "report", report_id):
            raise not_found("report")
        user = ctx.user(s)
        # The failed attempt is audited and counted; this transaction commits it.
        ok = accounts.verify_password_again(s, user, password, purpose=f"sign report {report_id}",
                                            max_failed=ctx.settings.portal_max_failed_logins,
                                            lockout_minutes=ctx.settings.portal_lockout_minutes)
        if ok:
            try:
                with s.begin_nested():  # a refused signature leaves nothing but the re-authentication
                    reports.sign_and_deliver(s, ctx.settings, str(report_id), signer=user.full_name or user.name,
                                             reason=reason.strip() or SIGN_MEANING, login=user.name)
            except ReportError as exc:
                error = str(exc)
    if not ok:
        return _report_page(request, ctx, report_id, status_code=401,
                            error="Signature refused: the password is wrong, or the account is locked. Enter your own "
                                  "password again to sign (the failed attempt is recorded and counts towards the "
                                  "lock-out).")
    if error:
        return _report_page(request, ctx, report_id, status_code=409, error=error)
    return done(request, ctx, f"/reports/{report_id}",
                f"Report {report_id} signed by {user.full_name or user.name}: {SIGN_MEANING}.")
