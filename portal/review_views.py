"""The physicist's worklist, queries to sites (threads, answers, resolutions), waivers and the quarantine.

Who may do what: a physicist works every site (opens, resolves, waives, releases); a site user
reads and answers the queries and reads the quarantine of their own site(s); a trial manager
reads the queries of their trials. An id of something the user may not see answers 404, as a
missing one does.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request

from corelab.site_queries import MAX_TEXT, QueryError
from portal.pages import done, local_path, not_found, page
from portal.security import READERS, Ctx, require
from services import intake, review
from services import worklist as work
from services.access import may_see, owner

router = APIRouter()

"""Longest message in a query thread (the thread goes to the site's report)."""


def _text_problem(text: str, what: str) -> str:
    """Why a message cannot be sent ('' when it can)."""
    if not text.strip():
        return f"the {what} is empty: write it in the box"
    if len(text) > MAX_TEXT:
        return f"the {what} is {len(text)} characters long; at most {MAX_TEXT} fit in a query thread"
    return ""


def _problem_page(request: Request, ctx: Ctx, status: int, message: str):
    return page(request, ctx, "error.html", status_code=status, status=status, message=message)


@router.get("/worklist")
def worklist_page(request: Request, ctx: Ctx = Depends(require("physicist"))):
    with ctx.db() as s:
        data = work.worklist(s, settings=ctx.settings)
    return page(request, ctx, "worklist.html", w=data)


@router.get("/queries")
def queries_page(request: Request, ctx: Ctx = Depends(require(*READERS))):
    with ctx.db() as s:
        data = work.query_list(s, ctx.scope)
    return page(request, ctx, "queries.html", queries=data)


def _query_page(request: Request, ctx: Ctx, query_id: int, *, status_code: int = 200, error: str = "",
                text: str = ""):
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "query", query_id):
            raise not_found("query")
        data = work.query_thread(s, query_id)
    return page(request, ctx, "query.html", status_code=status_code, q=data, error=error, text=text,
                max_text=MAX_TEXT)


@router.get("/queries/{query_id}")
def query_page(request: Request, query_id: int, ctx: Ctx = Depends(require(*READERS))):
    return _query_page(request, ctx, query_id)


@router.post("/queries/{query_id}/answer")
def answer(request: Request, query_id: int, text: str = Form(""), ctx: Ctx = Depends(require("site"))):
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "query", query_id):
            raise not_found("query")
        error, status = _text_problem(text, "answer"), 400
        if not error:
            site_code = owner(s, "query", query_id)[0]  # a user of two sites answers for the query's own
            try:
                review.answer_query(s, query_id, text.strip(), site_code=site_code, actor=ctx.scope.user)
                return done(request, ctx, f"/queries/{query_id}", f"Your answer to query {query_id} was sent "
                            "to the core lab.")
            except QueryError as exc:  # the query was resolved meanwhile
                error, status = str(exc), 409
    return _query_page(request, ctx, query_id, status_code=status, error=error, text=text[:MAX_TEXT])


@router.post("/queries/{query_id}/resolve")
def resolve(request: Request, query_id: int, text: str = Form(""), ctx: Ctx = Depends(require("physicist"))):
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "query", query_id):
            raise not_found("query")
        error, status = (_text_problem(text, "resolution") if len(text) > MAX_TEXT else ""), 400
        if not error:
            try:
                review.resolve_query(s, query_id, actor=ctx.scope.user, text=text.strip())
                return done(request, ctx, f"/queries/{query_id}", f"Query {query_id} resolved; its deviation "
                            "is resolved.")
            except QueryError as exc:
                error, status = str(exc), 409
    return _query_page(request, ctx, query_id, status_code=status, error=error, text=text[:MAX_TEXT])


@router.post("/deviations/{deviation_id}/query")
def open_query(request: Request, deviation_id: int, text: str = Form(""),
               ctx: Ctx = Depends(require("physicist"))):
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "deviation", deviation_id):
            raise not_found("deviation")
        problem = _text_problem(text, "question")
        if problem:
            return _problem_page(request, ctx, 400, problem)
        try:
            data = review.open_query(s, deviation_id, text.strip(), actor=ctx.scope.user)
        except QueryError as exc:
            return _problem_page(request, ctx, 409, str(exc))
    return done(request, ctx, f"/queries/{data['query']}", f"Query {data['query']} sent to the site.")


@router.post("/deviations/{deviation_id}/waive")
def waive(request: Request, deviation_id: int, reason: str = Form(""), next: str = Form(""),
          ctx: Ctx = Depends(require("physicist"))):
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "deviation", deviation_id):
            raise not_found("deviation")
        if not reason.strip():
            return _problem_page(request, ctx, 400, "a waiver needs a reason: say why this deviation is "
                                 "acceptable, then waive it again")
        if len(reason) > MAX_TEXT:
            return _problem_page(request, ctx, 400, f"the reason is {len(reason)} characters long; at most "
                                 f"{MAX_TEXT} fit")
        try:
            data = review.waive_deviation(s, deviation_id, reason.strip(), actor=ctx.scope.user)
        except QueryError as exc:
            return _problem_page(request, ctx, 409, str(exc))
        series_id = work.deviation_series(s, deviation_id)
    return done(request, ctx, local_path(next, f"/series/{series_id}"),
                f"Deviation {data['rule_id']} waived.")


@router.get("/quarantine")
def quarantine_page(request: Request, ctx: Ctx = Depends(require("site", "physicist"))):
    with ctx.db() as s:
        data = work.quarantine_groups(s, ctx.scope)
    return page(request, ctx, "quarantine.html", quarantine=data)


@router.post("/quarantine/{item_id}/release")
def release(request: Request, item_id: int, ctx: Ctx = Depends(require("physicist"))):
    with ctx.db() as s:
        if not may_see(s, ctx.scope, "quarantine", item_id):
            raise not_found("quarantined object")
        try:
            outcome = intake.release_quarantine_item(s, ctx.settings, item_id, actor=ctx.scope.user)
        except OSError as exc:  # the quarantined bytes are gone from the disk: nothing to check again
            return _problem_page(request, ctx, 409, f"quarantine item {item_id}: its file cannot be read "
                                 f"({exc.strerror or exc}); the site must send the object again")
    if outcome is None:
        raise not_found("open quarantine item")
    if outcome.status == "quarantined":
        message = f"Item {item_id} is still quarantined ({outcome.reason_code or ''}): {outcome.reason or ''}"
    else:
        message = f"Item {item_id} released and stored ({outcome.status}) in series {outcome.series_uid or ''}."
    return done(request, ctx, "/quarantine", message)
