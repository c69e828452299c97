"""Use cases of accounts: users, roles, passwords, API tokens (``corelab user``, the admin pages)."""

from __future__ import annotations

from sqlmodel import Session

from corelab import accounts


def add_user(session: Session, name: str, *, role: str, actor: str, sites: list[str] | None = None,
             trials: list[str] | None = None, full_name: str = "", password: str | None = None,
             oidc_subject: str | None = None) -> dict:
    user = accounts.add_user(session, name, role=role, sites=sites, trials=trials, full_name=full_name,
                             password=password, oidc_subject=oidc_subject, actor=actor)
    return {"user": user.name, "role": user.role, "sites": user.sites, "trials": user.trials}


def change_user(session: Session, name: str, *, actor: str, **changes) -> dict:
    user = accounts.change_user(session, name, actor=actor, **changes)
    return {"user": user.name, "role": user.role, "sites": user.sites, "trials": user.trials,
            "disabled": user.disabled}


def disable_user(session: Session, name: str, *, actor: str) -> dict:
    user = accounts.disable_user(session, name, actor=actor)
    return {"user": user.name, "disabled": user.disabled}


def reset_password(session: Session, name: str, password: str, *, actor: str) -> dict:
    user = accounts.reset_password(session, name, password, actor=actor)
    return {"user": user.name, "unlocked": True}


def create_token(session: Session, name: str, *, actor: str, label: str = "", days: int | None = 365) -> dict:
    token, row = accounts.create_token(session, name, label=label, days=days, actor=actor)
    return {"token": token, "id": row.id, "user": name, "label": label, "expires_at": row.expires_at}


def revoke_token(session: Session, token_id: int, *, actor: str) -> dict:
    row = accounts.revoke_token(session, token_id, actor=actor)
    return {"token_id": row.id, "revoked_at": row.revoked_at}


def user_rows(session: Session) -> list[dict]:
    return accounts.user_rows(session)


def token_rows(session: Session, name: str) -> list[dict]:
    return accounts.token_rows(session, name)
