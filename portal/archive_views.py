"""The archive page: per trial, where accepted series go, the rule, and the forwarding backlog.

A physicist sees every trial; a trial manager their own trials (the use case filters by scope).
Read-only: the destination is set with ``corelab archive set`` (its password never reaches a page).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from portal.pages import page
from portal.security import Ctx, require
from services import forwarding

router = APIRouter()


@router.get("/archive")
def archive_page(request: Request, ctx: Ctx = Depends(require("physicist", "trial-manager"))):
    with ctx.db() as s:
        rows = forwarding.backlog(s, ctx.scope)
    return page(request, ctx, "archive.html", trials=rows)
