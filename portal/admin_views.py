"""Admin pages (users, sites and AE titles) and every user's own account page (API tokens).

    GET  /admin/users                       admin: every account, and a form to add one
    POST /admin/users                       admin: add a user (password and/or OIDC subject)
    POST /admin/users/{name}/disable        admin: disable (sessions end, tokens stop working)
    POST /admin/users/{name}/reset          admin: new password (unlocks)
    POST /admin/users/{name}/change         admin: role, sites, trials, printed name, enable
    GET  /admin/sites                       admin: registered sites, a form to add one
    POST /admin/sites                       admin: register a site and its AE title
    POST /admin/sites/{code}/change         admin: change a site's AE title and host
    GET  /account                           anyone: who am I, my API tokens
    POST /account/tokens                    anyone (in a browser session): a new token, shown once
    POST /account/tokens/{id}/revoke        anyone: revoke one of one's own tokens

Every change goes through ``services`` with the admin (or the user) as the audit actor. A token
is created for oneself only (least privilege; ``corelab user token`` serves admins on the
machine), and its page is rendered directly, never redirected, so the token sits in no cookie,
URL or history entry and is never shown again.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, HTTPException, Request

from corelab.accounts import AccountError, verify_password_again
from corelab.register import RegisterError
from portal.pages import done, not_found, page
from portal.security import ANY_ROLE, Ctx, require
from services import accounts, admin_view, intake

router = APIRouter()
ADMIN = require("admin")


def _users_page(request: Request, ctx: Ctx, *, status_code: int = 200, **values):
    with ctx.db() as s:
        data = admin_view.users_page(s)
    return page(request, ctx, "admin_users.html", status_code=status_code, **data, **values)


def _sites_page(request: Request, ctx: Ctx, *, status_code: int = 200, **values):
    with ctx.db() as s:
        sites = intake.site_rows(s)
    return page(request, ctx, "admin_sites.html", status_code=status_code, sites=sites, **values)


@router.get("/admin/users")
def users(request: Request, ctx: Ctx = Depends(ADMIN)):
    return _users_page(request, ctx)


@router.post("/admin/users")
def add_user(request: Request, ctx: Ctx = Depends(ADMIN), name: str = Form("", max_length=64),
             full_name: str = Form("", max_length=200), role: str = Form("", max_length=32),
             sites: list[str] = Form([]), trials: list[str] = Form([]), password: str = Form("", max_length=1024),
             oidc_subject: str = Form("", max_length=255)):
    try:
        with ctx.db() as s:
            accounts.add_user(s, name.strip(), role=role, sites=sites, trials=trials, full_name=full_name.strip(),
                              password=password or None, oidc_subject=oidc_subject.strip() or None,
                              actor=ctx.scope.user)
    except AccountError as exc:
        return _users_page(request, ctx, status_code=400, error=str(exc))
    return done(request, ctx, "/admin/users", f"user {name.strip()} added")


@router.post("/admin/users/{name}/disable")
def disable_user(request: Request, name: str, ctx: Ctx = Depends(ADMIN)):
    if name == ctx.scope.user:
        return _users_page(request, ctx, status_code=400,
                           error="you cannot disable your own account: another admin must do it")
    try:
        with ctx.db() as s:
            accounts.disable_user(s, name, actor=ctx.scope.user)
    except AccountError as exc:
        return _users_page(request, ctx, status_code=400, error=str(exc))
    return done(request, ctx, "/admin/users", f"user {name} disabled: their sessions and API tokens stop now")


@router.post("/admin/users/{name}/reset")
def reset_password(request: Request, name: str, ctx: Ctx = Depends(ADMIN),
                   password: str = Form("", max_length=1024)):
    try:
        with ctx.db() as s:
            accounts.reset_password(s, name, password, actor=ctx.scope.user)
    except AccountError as exc:
        return _users_page(request, ctx, status_code=400, error=str(exc))
    return done(request, ctx, "/admin/users", f"new password set for {name}; the account is unlocked")


@router.post("/admin/users/{name}/change")
def change_user(request: Request, name: str, ctx: Ctx = Depends(ADMIN), role: str = Form("", max_length=32),
                sites: list[str] = Form([]), trials: list[str] = Form([]),
                full_name: str = Form("", max_length=200), enable: bool = Form(False)):
    if name == ctx.scope.user:
        # The change would end the admin's own session and could take away the admin role.
        return _users_page(request, ctx, status_code=400,
                           error="you cannot change your own account here: another admin, or `corelab user change`")
    try:
        with ctx.db() as s:
            accounts.change_user(s, name, actor=ctx.scope.user, role=role or None, sites=sites, trials=trials,
                                 full_name=full_name.strip() or None, enable=enable)
    except AccountError as exc:
        return _users_page(request, ctx, status_code=400, error=str(exc))
    return done(request, ctx, "/admin/users", f"user {name} changed; their sessions ended")


@router.get("/admin/sites")
def sites(request: Request, ctx: Ctx = Depends(ADMIN)):
    return _sites_page(request, ctx)


@router.post("/admin/sites")
def add_site(request: Request, ctx: Ctx = Depends(ADMIN), code: str = Form("", max_length=32),
             ae_title: str = Form("", max_length=16), host: str = Form("", max_length=253),
             name: str = Form("", max_length=200)):
    try:
        with ctx.db() as s:
            added = admin_view.add_site(s, code, ae_title=ae_title, host=host, name=name, actor=ctx.scope.user)
    except RegisterError as exc:
        return _sites_page(request, ctx, status_code=400, error=str(exc))
    return done(request, ctx, "/admin/sites", f"site {added['site']} registered with AE title {added['ae_title']}")


@router.post("/admin/sites/{code}/change")
def change_site(request: Request, code: str, ctx: Ctx = Depends(ADMIN), ae_title: str = Form("", max_length=16),
                host: str = Form("", max_length=253)):
    try:
        with ctx.db() as s:
            changed = admin_view.change_site(s, code, ae_title=ae_title, host=host, actor=ctx.scope.user)
    except RegisterError as exc:
        return _sites_page(request, ctx, status_code=400, error=str(exc))
    if changed is None:
        raise not_found("site")
    return done(request, ctx, "/admin/sites", f"site {code} now sends as AE title {changed['ae_title']}")


def _account_page(request: Request, ctx: Ctx, *, status_code: int = 200, **values):
    with ctx.db() as s:
        tokens = accounts.token_rows(s, ctx.scope.user)
    return page(request, ctx, "account.html", status_code=status_code, tokens=tokens, **values)


@router.get("/account")
def account(request: Request, ctx: Ctx = Depends(require(*ANY_ROLE))):
    return _account_page(request, ctx)


@router.post("/account/tokens")
def create_token(request: Request, ctx: Ctx = Depends(require(*ANY_ROLE)), label: str = Form("", max_length=100),
                 days: int = Form(90, ge=1, le=365), password: str = Form("", max_length=1024)):
    if ctx.via != "session":
        # A leaked token must not mint tokens that outlive its revocation.
        raise HTTPException(403, "create API tokens in a browser session, not with a token")
    with ctx.db() as s:
        # The password again: a session left open (or stolen) must not become a long-lived token.
        ok = verify_password_again(s, ctx.user(s), password, purpose="create API token",
                                   max_failed=ctx.settings.portal_max_failed_logins,
                                   lockout_minutes=ctx.settings.portal_lockout_minutes)
        created = accounts.create_token(s, ctx.scope.user, label=label.strip(), days=days,
                                        actor=ctx.scope.user) if ok else None
    if created is None:
        return _account_page(request, ctx, status_code=401, error="Token refused: the password is wrong, or the "
                             "account is locked (the failed attempt is recorded).")
    # Rendered here, not redirected: the token must sit in no cookie, URL or history entry.
    return _account_page(request, ctx, status_code=201, new_token=created["token"],
                         new_token_expires=created["expires_at"])


@router.post("/account/tokens/{token_id}/revoke")
def revoke_token(request: Request, token_id: int, ctx: Ctx = Depends(require(*ANY_ROLE))):
    try:
        with ctx.db() as s:
            # Only one's own tokens: another user's id answers as a missing one.
            if token_id not in {t["id"] for t in accounts.token_rows(s, ctx.scope.user)}:
                raise not_found("token")
            accounts.revoke_token(s, token_id, actor=ctx.scope.user)
    except AccountError as exc:
        return _account_page(request, ctx, status_code=400, error=str(exc))
    return done(request, ctx, "/account", f"token {token_id} revoked")
