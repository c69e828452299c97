"""The trial manager's pages (a physicist sees them too): deviations per site, subject and visit
with filters and rates, a trial's rates, its newest deviation report and its exports (audited)."""

from __future__ import annotations

import urllib.parse

from fastapi import APIRouter, Depends, Query, Request

from portal.pages import not_found, page
from portal.report_views import send
from portal.security import Ctx, require
from services import trial_view

router = APIRouter()
MANAGERS = ("physicist", "trial-manager")


def _page_url(filters: dict, page_no: int, per_page: int) -> str:
    params = {**filters, "page": page_no}
    if per_page != 100:
        params["per_page"] = per_page
    return "/deviations?" + urllib.parse.urlencode(params)


@router.get("/deviations")
def deviations(request: Request, trial: str = "", site: str = "", subject: str = "", visit: str = "",
               severity: str = "", status: str = "", rule: str = "", page_no: int = Query(1, alias="page", ge=1),
               per_page: int = Query(100, ge=1, le=500), ctx: Ctx = Depends(require(*MANAGERS))):
    filters = {"trial": trial, "site": site, "subject": subject, "visit": visit, "severity": severity,
               "status": status, "rule": rule}
    with ctx.db() as s:
        data = trial_view.deviation_overview(s, ctx.scope, filters=filters, page=page_no, per_page=per_page)
    n = data["page"]
    return page(request, ctx, "deviations.html", data=data,
                prev_url=_page_url(data["filters"], n - 1, data["per_page"]) if n > 1 else "",
                next_url=_page_url(data["filters"], n + 1, data["per_page"]) if n < data["pages"] else "")


def _check_trial(ctx: Ctx, code: str) -> None:
    if not ctx.scope.sees_trial(code):
        raise not_found("trial")


@router.get("/trials/{code}")
def trial_page(request: Request, code: str, ctx: Ctx = Depends(require(*MANAGERS))):
    _check_trial(ctx, code)
    with ctx.db() as s:
        trial = trial_view.trial_overview(s, code)
    if trial is None:
        raise not_found("trial")
    return page(request, ctx, "trial.html", trial=trial)


@router.get("/trials/{code}/exports/{fmt}/{table}")
def trial_export(code: str, fmt: str, table: str, ctx: Ctx = Depends(require(*MANAGERS))):
    _check_trial(ctx, code)
    with ctx.db() as s:
        download = trial_view.export_download(s, ctx.settings, code, fmt, table, actor=ctx.scope.user)
    if download is None:
        raise not_found("export")
    return send(download)
