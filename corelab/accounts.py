"""Accounts of the portal: users and roles, argon2id passwords, lock-out, API tokens.

The only writer of :class:`~corelab.models.User` and :class:`~corelab.models.ApiToken`. Every
change is an audit event (``user.add``, ``user.change``, ``user.disable``, ``user.reset``,
``token.create``, ``token.revoke``) and so is every login attempt (``login.success``,
``login.failure``, ``login.lockout``). No password, hash or token ever reaches the audit log.

Roles (least privilege):

- ``site``: reads and answers for its own site(s) only;
- ``trial-manager``: reads every site of their trial(s), changes nothing;
- ``physicist``: works every site (queries, waivers, quarantine, signatures);
- ``admin``: manages users, sites and AE titles.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlmodel import Session, col, select

from corelab import audit
from corelab.models import ROLES, ApiToken, Site, Trial, User, WebSession, utcnow

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
MIN_PASSWORD = 12
TOKEN_PREFIX = "clt_"
_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (argon2-cffi's default)
_DUMMY_HASH = _HASHER.hash("corelab: spent on unknown names so that timing does not tell them")


class AccountError(ValueError):
    """An account change that is not allowed; the message says why and what to do."""


@dataclass(frozen=True)
class LoginResult:
    """What a login attempt came to. ``user`` is set only on success; ``reason`` is for the
    audit log, ``message`` for the person (it never tells whether the name exists)."""

    user: User | None
    reason: str
    message: str


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def check_password_rules(name: str, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters")
    if name.lower() in password.lower():
        raise AccountError("a password must not contain the login name")


def _password_ok(user: User | None, password: str) -> bool:
    stored = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
    try:
        ok = _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        ok = False
    return ok and user is not None and bool(user.password_hash)


def get_user(session: Session, name: str) -> User | None:
    return session.exec(select(User).where(User.name == name)).first()


def _require_user(session: Session, name: str) -> User:
    user = get_user(session, name)
    if user is None:
        raise AccountError(f"no user {name!r}: `corelab user list` shows them")
    return user


def _check_scope(session: Session, role: str, sites: list[str], trials: list[str]) -> None:
    if role not in ROLES:
        raise AccountError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if role == "site" and not sites:
        raise AccountError("a site user needs at least one --site")
    if role == "trial-manager" and not trials:
        raise AccountError("a trial manager needs at least one --trial")
    if role != "site" and sites:
        raise AccountError(f"--site scopes site users only; a {role} sees what the role allows")
    if role != "trial-manager" and trials:
        raise AccountError(f"--trial scopes trial managers only; a {role} sees what the role allows")
    known_sites = set(session.exec(select(Site.code).where(col(Site.code).in_(sites)))) if sites else set()
    if set(sites) - known_sites:
        raise AccountError(f"no site {sorted(set(sites) - known_sites)}: register it first (`corelab sites add`)")
    known_trials = set(session.exec(select(Trial.code).where(col(Trial.code).in_(trials)))) if trials else set()
    if set(trials) - known_trials:
        raise AccountError(f"no trial {sorted(set(trials) - known_trials)}: load the register first")


def add_user(session: Session, name: str, *, role: str, sites: list[str] | None = None,
             trials: list[str] | None = None, full_name: str = "", password: str | None = None,
             oidc_subject: str | None = None, actor: str) -> User:
    """Create an account. It needs a password, an OpenID Connect subject, or both.

    Raises
    ------
    AccountError
        A malformed or taken name, an unknown role, site or trial, a weak password, or neither
        a password nor an OIDC subject.
    """
    sites, trials = sorted(set(sites or [])), sorted(set(trials or []))
    if not NAME_PATTERN.match(name):
        raise AccountError(f"user name {name!r} must be 2-64 of a-z, 0-9, '.', '_', '-' (lower case)")
    if get_user(session, name) is not None:
        raise AccountError(f"user {name!r} exists: `corelab user reset` or `user change` it")
    _check_scope(session, role, sites, trials)
    if not password and not oidc_subject:
        raise AccountError("a user needs a password or an OpenID Connect subject (--oidc)")
    if password:
        check_password_rules(name, password)
    if oidc_subject and session.exec(select(User).where(User.oidc_subject == oidc_subject)).first():
        raise AccountError("that OpenID Connect subject is bound to another user")
    user = User(name=name, full_name=full_name or name, role=role, sites=sites, trials=trials,
                password_hash=hash_password(password) if password else "", oidc_subject=oidc_subject or None,
                password_changed_at=utcnow() if password else None)
    session.add(user)
    session.flush()
    audit.append(session, actor=actor, action="user.add", entity="user", entity_id=user.id,
                 detail={"name": name, "role": role, "sites": sites, "trials": trials,
                         "password": bool(password), "oidc": bool(oidc_subject)})
    return user


def change_user(session: Session, name: str, *, actor: str, role: str | None = None, sites: list[str] | None = None,
                trials: list[str] | None = None, full_name: str | None = None, enable: bool = False) -> User:
    """Change a user's role, scope or printed name, or enable a disabled account; their
    sessions end, so the new rights apply at the next login."""
    user = _require_user(session, name)
    before = {"role": user.role, "sites": list(user.sites), "trials": list(user.trials), "disabled": user.disabled,
              "full_name": user.full_name}
    new_role = role or user.role
    new_sites = sorted(set(sites)) if sites is not None else ([] if new_role != "site" else list(user.sites))
    new_trials = sorted(set(trials)) if trials is not None else (
        [] if new_role != "trial-manager" else list(user.trials))
    _check_scope(session, new_role, new_sites, new_trials)
    user.role, user.sites, user.trials = new_role, new_sites, new_trials
    if full_name is not None:
        user.full_name = full_name
    if enable:
        user.disabled, user.failed_logins, user.locked_until = False, 0, None
    session.add(user)
    ended = end_sessions(session, user)
    audit.append(session, actor=actor, action="user.change", entity="user", entity_id=user.id,
                 detail={"name": name, "before": before,
                         "after": {"role": user.role, "sites": user.sites, "trials": user.trials,
                                   "disabled": user.disabled, "full_name": user.full_name},
                         "sessions_ended": ended})
    return user


def disable_user(session: Session, name: str, *, actor: str) -> User:
    """Disable an account: it cannot log in, its sessions end and its API tokens stop working."""
    user = _require_user(session, name)
    user.disabled = True
    session.add(user)
    ended = end_sessions(session, user)
    audit.append(session, actor=actor, action="user.disable", entity="user", entity_id=user.id,
                 detail={"name": name, "sessions_ended": ended})
    return user


def reset_password(session: Session, name: str, password: str, *, actor: str) -> User:
    """Set a new password; this unlocks the account and ends its sessions."""
    user = _require_user(session, name)
    check_password_rules(name, password)
    user.password_hash, user.password_changed_at = hash_password(password), utcnow()
    user.failed_logins, user.locked_until = 0, None
    session.add(user)
    ended = end_sessions(session, user)
    revoked = _revoke_all_tokens(session, user)  # a token made in a stolen session dies with the password
    audit.append(session, actor=actor, action="user.reset", entity="user", entity_id=user.id,
                 detail={"name": name, "sessions_ended": ended, "tokens_revoked": revoked})
    return user


def _revoke_all_tokens(session: Session, user: User) -> list[int]:
    now, ids = utcnow(), []
    for row in session.exec(select(ApiToken).where(ApiToken.user_id == user.id, col(ApiToken.revoked_at).is_(None))):
        row.revoked_at = now
        session.add(row)
        ids.append(row.id)
    return ids


def end_sessions(session: Session, user: User) -> int:
    """End every open web session of ``user``; returns how many."""
    now, n = utcnow(), 0
    for ws in session.exec(select(WebSession).where(WebSession.user_id == user.id,
                                                     col(WebSession.ended_at).is_(None))):
        ws.ended_at = now
        session.add(ws)
        n += 1
    session.flush()
    return n


def _locked(user: User, now: datetime) -> bool:
    return user.locked_until is not None and user.locked_until > now


def authenticate(session: Session, name: str, password: str, *, max_failed: int, lockout_minutes: float,
                 source: str = "") -> LoginResult:
    """Check a name and password; count failures and lock the account after ``max_failed`` in a row.

    The caller commits whatever the result, so failures and lock-outs are recorded. Unknown
    names cost the same hash as known ones; the message never tells which part was wrong.
    """
    now = utcnow()
    user = get_user(session, name) if NAME_PATTERN.match(name or "") else None
    ok = _password_ok(user, password)
    # One message for every refusal, so that a stranger learns nothing about which names exist
    # or are locked; the audit log keeps the reason.
    generic = (f"wrong name or password, or the account is locked or disabled (after {max_failed} failed "
               f"logins in a row an account is locked for {lockout_minutes:g} minutes; the core lab can "
               "unlock it)")
    if user is None:
        # Not the typed name: it may be a password typed into the wrong box.
        audit.append(session, actor="(unknown user)", action="login.failure", entity="user",
                     detail={"reason": "unknown user", "source": source})
        return LoginResult(None, "unknown user", generic)
    if user.disabled:
        audit.append(session, actor=user.name, action="login.failure", entity="user", entity_id=user.id,
                     detail={"reason": "disabled", "source": source})
        return LoginResult(None, "disabled", generic)
    if _locked(user, now):
        audit.append(session, actor=user.name, action="login.failure", entity="user", entity_id=user.id,
                     detail={"reason": "locked", "source": source})
        return LoginResult(None, "locked", generic)
    if not ok:
        _count_failure(session, user, max_failed=max_failed, lockout_minutes=lockout_minutes, source=source,
                       action="login.failure")
        return LoginResult(None, "wrong password", generic)
    user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
    session.add(user)
    audit.append(session, actor=user.name, action="login.success", entity="user", entity_id=user.id,
                 detail={"via": "password", "source": source})
    return LoginResult(user, "ok", "")


def _count_failure(session: Session, user: User, *, max_failed: int, lockout_minutes: float, source: str,
                   action: str, detail: dict | None = None) -> None:
    """One more failed password: audited, and the account locked at ``max_failed`` in a row."""
    user.failed_logins += 1
    if user.failed_logins >= max_failed:
        user.locked_until = utcnow() + timedelta(minutes=lockout_minutes)
        audit.append(session, actor=user.name, action="login.lockout", entity="user", entity_id=user.id,
                     detail={"failed_logins": user.failed_logins, "until": user.locked_until.isoformat(),
                             "source": source, **(detail or {})})
    else:
        audit.append(session, actor=user.name, action=action, entity="user", entity_id=user.id,
                     detail={"reason": "wrong password", "failed_logins": user.failed_logins, "source": source,
                             **(detail or {})})
    session.add(user)


def verify_password_again(session: Session, user: User, password: str, *, purpose: str, max_failed: int,
                          lockout_minutes: float) -> bool:
    """Re-authentication inside a session (an e-signature's second component, a new API token):
    the password must be the user's own, and the account neither disabled nor locked. A failure
    is audited and counts towards the lock-out, as a failed login does, so a session left open
    cannot be used to guess the password."""
    if user.disabled or _locked(user, utcnow()):
        audit.append(session, actor=user.name, action="reauth.failure", entity="user", entity_id=user.id,
                     detail={"purpose": purpose, "reason": "disabled" if user.disabled else "locked"})
        return False
    if not _password_ok(user, password):
        _count_failure(session, user, max_failed=max_failed, lockout_minutes=lockout_minutes, source="",
                       action="reauth.failure", detail={"purpose": purpose})
        return False
    user.failed_logins = 0
    session.add(user)
    audit.append(session, actor=user.name, action="reauth.success", entity="user", entity_id=user.id,
                 detail={"purpose": purpose})
    return True


def oidc_login(session: Session, subject: str, *, source: str = "") -> LoginResult:
    """Log in the account bound to an OpenID Connect subject (the provider has verified it)."""
    user = session.exec(select(User).where(User.oidc_subject == subject)).first()
    if user is None or user.disabled:
        reason = "no account bound to this identity" if user is None else "disabled"
        audit.append(session, actor=user.name if user else "(oidc)", action="login.failure", entity="user",
                     entity_id=user.id if user else "", detail={"reason": reason, "via": "oidc", "source": source})
        return LoginResult(None, reason, "no corelab account is bound to this identity, or it is disabled; "
                                         "ask the core lab")
    user.failed_logins, user.last_login_at = 0, utcnow()
    session.add(user)
    audit.append(session, actor=user.name, action="login.success", entity="user", entity_id=user.id,
                 detail={"via": "oidc", "source": source})
    return LoginResult(user, "ok", "")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def create_token(session: Session, name: str, *, label: str = "", days: int | None = 365,
                 actor: str) -> tuple[str, ApiToken]:
    """A new API token for ``name``: returns the token (shown once, never stored) and its row."""
    user = _require_user(session, name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, label=label, token_sha256=sha256_hex(token), prefix=token[:10],
                   expires_at=utcnow() + timedelta(days=days) if days else None)
    session.add(row)
    session.flush()
    audit.append(session, actor=actor, action="token.create", entity="apitoken", entity_id=row.id,
                 detail={"user": name, "label": label, "prefix": row.prefix,
                         "expires_at": row.expires_at.isoformat() if row.expires_at else None})
    return token, row


def revoke_token(session: Session, token_id: int, *, actor: str) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        raise AccountError(f"no active token {token_id}: `corelab user tokens NAME` lists them")
    row.revoked_at = utcnow()
    session.add(row)
    audit.append(session, actor=actor, action="token.revoke", entity="apitoken", entity_id=row.id,
                 detail={"prefix": row.prefix})
    return row


def user_of_token(session: Session, token: str) -> User | None:
    """The active user an API token belongs to, or None (unknown, revoked, expired, disabled)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = session.exec(select(ApiToken).where(ApiToken.token_sha256 == sha256_hex(token))).first()
    now = utcnow()
    if row is None or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        row.last_used_at = now  # at most once a minute: a busy client does not write on every call
        session.add(row)
    return user


def user_rows(session: Session) -> list[dict]:
    now = utcnow()
    return [{"id": u.id, "name": u.name, "full_name": u.full_name, "role": u.role, "sites": ",".join(u.sites),
             "trials": ",".join(u.trials), "password": bool(u.password_hash), "oidc": bool(u.oidc_subject),
             "disabled": u.disabled, "locked": _locked(u, now), "last_login_at": u.last_login_at}
            for u in session.exec(select(User).order_by(col(User.name)))]


def token_rows(session: Session, name: str) -> list[dict]:
    user = _require_user(session, name)
    return [{"id": t.id, "label": t.label, "prefix": t.prefix, "created_at": t.created_at,
             "expires_at": t.expires_at, "last_used_at": t.last_used_at, "revoked_at": t.revoked_at}
            for t in session.exec(select(ApiToken).where(ApiToken.user_id == user.id).order_by(col(ApiToken.id)))]
