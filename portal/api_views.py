"""The JSON API for machine clients: ``Authorization: Bearer <token>`` (a token from /account).

A browser session works too, but then a POST must carry the session's ``X-CSRF-Token`` header.
Every listing is scoped in SQL as the pages are (``services.api_view``) and paginated with
``limit`` (at most 1000) and ``offset``; an object addressed by id that the caller may not see
answers 404, exactly as one that does not exist. The listings are for the users of trial data
(site, physicist, trial manager); an admin manages accounts and sites, not trial data.

    GET  /api/v1/me                     who the token belongs to, and what it may see
    GET  /api/v1/series                 ?since=ISO-datetime&limit&offset
    GET  /api/v1/deviations             ?site&status&severity&limit&offset
    GET  /api/v1/queries                ?open_only&limit&offset
    POST /api/v1/queries/{id}/answer    {"text": "..."} (site users)
    GET  /api/v1/reports                ?kind&limit&offset
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, HTTPException
from fastapi import Query as Param
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from corelab.site_queries import MAX_TEXT, QueryError
from portal.pages import not_found
from portal.security import ANY_ROLE, READERS, Ctx, require
from services import api_view, review
from services.access import may_see, owner

router = APIRouter(prefix="/api/v1")

Limit = Param(100, ge=1, le=api_view.MAX_LIMIT, description="rows per page, at most 1000")
Offset = Param(0, ge=0, le=10_000_000)
Code = Param(None, max_length=32)


class AnswerBody(BaseModel):
    """A site's answer to a query."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_TEXT)

    @field_validator("text")
    @classmethod
    def not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("the answer is empty")
        return value


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, "since must be an ISO 8601 date-time, e.g. 2024-05-01T00:00:00Z") from None
    # A time without an offset is read as UTC, the store's time zone.
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@router.get("/me")
def me(ctx: Ctx = Depends(require(*ANY_ROLE))):
    scope = ctx.scope
    return {"name": scope.user, "full_name": scope.full_name, "role": scope.role,
            "sites": scope.site_filter(), "trials": scope.trial_filter(),
            "via": ctx.via}


@router.get("/series")
def series(since: str | None = Param(None, max_length=40), limit: int = Limit, offset: int = Offset,
           ctx: Ctx = Depends(require(*READERS))):
    when = _since(since)
    with ctx.db() as s:
        return api_view.series_page(s, ctx.scope, since=when, limit=limit, offset=offset)


@router.get("/deviations")
def deviations(site: str | None = Code, status: str | None = Code, severity: str | None = Code,
               limit: int = Limit, offset: int = Offset, ctx: Ctx = Depends(require(*READERS))):
    with ctx.db() as s:
        return api_view.deviation_page(s, ctx.scope, site=site, status=status, severity=severity,
                                       limit=limit, offset=offset)


@router.get("/queries")
def queries(open_only: bool = False, limit: int = Limit, offset: int = Offset,
            ctx: Ctx = Depends(require(*READERS))):
    with ctx.db() as s:
        return api_view.query_page(s, ctx.scope, open_only=open_only, limit=limit, offset=offset)


@router.post("/queries/{query_id}/answer")
def answer(query_id: int, body: AnswerBody, ctx: Ctx = Depends(require("site"))):
    try:
        with ctx.db() as s:
            if not may_see(s, ctx.scope, "query", query_id):
                raise not_found("query")
            # The query's own site answers (may_see has checked it is one of the user's sites).
            site_code = owner(s, "query", query_id)[0]
            return review.answer_query(s, query_id, body.text, site_code=site_code, actor=ctx.scope.user)
    except QueryError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=409)


@router.get("/reports")
def reports(kind: str | None = Code, limit: int = Limit, offset: int = Offset,
            ctx: Ctx = Depends(require(*READERS))):
    with ctx.db() as s:
        return api_view.report_page(s, ctx.scope, kind=kind, limit=limit, offset=offset)
