"""Use cases of the admin pages: the accounts page's choices, adding a site, changing its AE title.

The writes go through :mod:`services.accounts` and :func:`services.intake.register_site`, so the
portal and ``corelab user`` / ``corelab sites add`` take the same path and leave the same audit
events (``user.*``, ``site.register``), with the admin's name as actor.
"""

from __future__ import annotations

import re

from sqlmodel import Session, col, select

from corelab.models import ROLES, Site, Trial
from corelab.register import RegisterError
from services import accounts, intake

# A host name or an IPv4/IPv6 address: never spaces, slashes or markup.
_HOST = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


def users_page(session: Session) -> dict:
    """Every account, and the roles, sites and trials an admin can choose from."""
    return {"users": accounts.user_rows(session), "roles": list(ROLES),
            "site_codes": list(session.exec(select(Site.code).order_by(col(Site.code)))),
            "trial_codes": list(session.exec(select(Trial.code).order_by(col(Trial.code))))}


def _host(host: str) -> str | None:
    host = host.strip()
    if host and not _HOST.match(host):
        raise RegisterError(f"host {host!r} is not a host name or IP address")
    return host or None


def add_site(session: Session, code: str, *, ae_title: str, host: str = "", name: str = "", actor: str) -> dict:
    """Register a new site; an existing code is refused (its AE title is changed with :func:`change_site`).

    Raises
    ------
    RegisterError
        A taken or malformed code, a malformed AE title or host.
    """
    code = code.strip()
    if session.exec(select(Site).where(Site.code == code)).first() is not None:
        raise RegisterError(f"site {code} is registered already: change its AE title in the table below")
    return intake.register_site(session, code, ae_title=ae_title.strip(), host=_host(host), name=name.strip(),
                                actor=actor)


def change_site(session: Session, code: str, *, ae_title: str, host: str = "", actor: str) -> dict | None:
    """Change a registered site's AE title and host; None when there is no such site."""
    site = session.exec(select(Site).where(Site.code == code)).first()
    if site is None:
        return None
    return intake.register_site(session, code, ae_title=ae_title.strip(), host=_host(host), name=site.name,
                                actor=actor)
