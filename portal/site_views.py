"""A site's pages: the subject x visit grid of its scans, one series' QC result, its scanners.

Read only; site users, physicists and trial managers, each within their scope. A site or series
outside the caller's scope answers 404, exactly as one that does not exist.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from portal.pages import not_found, page
from portal.security import READERS, Ctx, require
from services import site_view
from services.access import may_see

router = APIRouter()


@router.get("/sites/{code}")
def site_grid(code: str, request: Request, ctx: Ctx = Depends(require(*READERS))):
    """The site's trial scans by subject and visit, coloured by state (services.site_view.series_state)."""
    if not ctx.scope.sees_site(code):
        raise not_found("site")
    # A trial manager sees their trials' scans only, even at a site shared with other trials.
    trials = sorted(ctx.scope.trials or ()) if ctx.scope.role == "trial-manager" else None
    with ctx.db() as s:
        grid = site_view.site_grid(s, code, trials=trials, settings=ctx.settings)
    if grid is None:
        raise not_found("site")
    return page(request, ctx, "site_grid.html", grid=grid)


@router.get("/series/{series_id}")
def series_page(series_id: int, request: Request, ctx: Ctx = Depends(require(*READERS))):
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "series", series_id):
            raise not_found("series")
        series = site_view.series_detail(s, series_id, settings=ctx.settings)
    return page(request, ctx, "series.html", series=series)


@router.get("/scanners")
def scanners(request: Request, ctx: Ctx = Depends(require(*READERS))):
    with ctx.db() as s:
        rows = site_view.scanner_overview(s, ctx.scope.site_filter())
    return page(request, ctx, "scanners.html", scanners=rows, warn_days=site_view.EXPIRY_WARN_DAYS)
