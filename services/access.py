"""Who may see what: a user's scope, and the site (or trial) that owns a stored object.

Least privilege, decided here once for the portal and its API: a site user sees their own
site(s); a trial manager reads the sites and objects of their trial(s); a physicist and an admin
see every site. Ownership is looked up from the store, never taken from the request, so an id
from another site is simply not found (the portal answers 404, as for an id that does not exist).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, distinct, or_
from sqlmodel import Session, col, select

from corelab.models import (Deviation, QuarantineItem, Query, Report, Scanner, Series, Site, Subject,
                            Trial, User)


@dataclass(frozen=True)
class Scope:
    """What one user may see and do. ``sites`` / ``trials`` None: every one."""

    user: str
    full_name: str
    role: str
    sites: frozenset[str] | None
    trials: frozenset[str] | None

    @property
    def reviews(self) -> bool:
        """Works deviations, queries, quarantine and signatures (a physicist)."""
        return self.role == "physicist"

    @property
    def answers(self) -> bool:
        """Answers queries for their site(s)."""
        return self.role == "site"

    def sees_site(self, code: str | None) -> bool:
        return self.sites is None or (code is not None and code in self.sites)

    def sees_trial(self, code: str | None) -> bool:
        return self.trials is None or (code is not None and code in self.trials)

    def site_filter(self) -> list[str] | None:
        """Site codes to restrict a listing to (None: no restriction)."""
        return None if self.sites is None else sorted(self.sites)

    def trial_filter(self) -> list[str] | None:
        """Trial codes to restrict a listing to (None: no restriction; empty for a site user)."""
        return None if self.trials is None else sorted(self.trials)


def trial_sites(session: Session, trial_codes: list[str]) -> frozenset[str]:
    """Sites with a subject or a series in any of the trials."""
    ids = list(session.exec(select(Trial.id).where(col(Trial.code).in_(trial_codes))))
    by_subject = session.exec(select(distinct(Site.code)).join(Subject, Subject.site_id == Site.id)
                              .where(col(Subject.trial_id).in_(ids)))
    by_series = session.exec(select(distinct(Site.code)).join(Series, Series.site_id == Site.id)
                             .where(col(Series.trial_id).in_(ids)))
    return frozenset(by_subject) | frozenset(by_series)


def scope_of(session: Session, user: User) -> Scope:
    if user.role == "site":
        return Scope(user.name, user.full_name, user.role, frozenset(user.sites), frozenset())
    if user.role == "trial-manager":
        return Scope(user.name, user.full_name, user.role, trial_sites(session, list(user.trials)),
                     frozenset(user.trials))
    return Scope(user.name, user.full_name, user.role, None, None)


def _site_code(session: Session, site_id: int | None) -> str | None:
    site = session.get(Site, site_id) if site_id is not None else None
    return site.code if site else None


def _trial_code(session: Session, trial_id: int | None) -> str | None:
    trial = session.get(Trial, trial_id) if trial_id is not None else None
    return trial.code if trial else None


def owner(session: Session, kind: str, obj_id: int) -> tuple[str | None, str | None] | None:
    """(site code, trial code) of a stored object; None when there is no such object.

    kind: series, deviation, query, quarantine, report, scanner.
    """
    if kind == "series":
        s = session.get(Series, obj_id)
        return None if s is None else (_site_code(session, s.site_id), _trial_code(session, s.trial_id))
    if kind == "deviation":
        d = session.get(Deviation, obj_id)
        return None if d is None else owner(session, "series", d.series_id)
    if kind == "query":
        q = session.get(Query, obj_id)
        if q is None:
            return None
        dev_owner = owner(session, "deviation", q.deviation_id) or (None, None)
        return _site_code(session, q.site_id), dev_owner[1]
    if kind == "quarantine":
        item = session.get(QuarantineItem, obj_id)
        return None if item is None else (_site_code(session, item.site_id), None)
    if kind == "report":
        r = session.get(Report, obj_id)
        return None if r is None else (_site_code(session, r.site_id), _trial_code(session, r.trial_id))
    if kind == "scanner":
        sc = session.get(Scanner, obj_id)
        return None if sc is None else (_site_code(session, sc.site_id), None)
    raise ValueError(f"unknown kind {kind!r}")


SITE_WIDE_REPORTS = ("site_qc",)
"""Report kinds that cover every trial of a site: a trial manager, who reads their own trials
only, does not see them (a site QC report lists other trials' scans and deviations)."""


def may_see(session: Session, scope: Scope, kind: str, obj_id: int) -> bool:
    """Whether ``scope`` may read the object (False also when it does not exist).

    A site user needs the object's site to be theirs. A trial manager needs the object's trial
    to be theirs, or, for an object of no trial (a quarantined file, a scanner, its accreditation
    report), its site to be one of their trials' sites; never a report of :data:`SITE_WIDE_REPORTS`.
    """
    found = owner(session, kind, obj_id)
    if found is None:
        return False
    site, trial = found
    if scope.role == "trial-manager" and kind == "report" and session.get(Report, obj_id).kind in SITE_WIDE_REPORTS:
        return False
    if scope.role == "trial-manager":
        return scope.sees_trial(trial) if trial is not None else scope.sees_site(site)
    return scope.sees_site(site)


def restrict(stmt, scope: Scope, *, site_id, trial_id=None, always_of_a_trial: bool = False, report_kind=None):
    """``stmt`` limited in SQL to the rows ``scope`` may see, by the rule of :func:`may_see`; the one
    scope filter of the listings (pages and API), so a listing never holds a row its reader could
    not open by id.

    Parameters
    ----------
    site_id, trial_id
        The columns (in ``stmt``) of the site and trial that own a row; ``trial_id`` None for
        objects of no trial (a quarantined file, a scanner): a trial manager sees them by site.
    always_of_a_trial : bool
        Every row has a trial (deviations, queries: QC judges only trial series), so a trial
        manager is restricted by trial alone: the same rows as may_see's rule, in a simpler query.
    report_kind
        For a listing of reports, the column of their kind (site-wide reports are not a trial
        manager's).
    """
    site_ids = select(Site.id).where(col(Site.code).in_(sorted(scope.sites or ())))
    if scope.role == "trial-manager" and report_kind is not None:
        stmt = stmt.where(col(report_kind).not_in(SITE_WIDE_REPORTS))
    if scope.role == "trial-manager" and trial_id is not None:
        in_trials = col(trial_id).in_(select(Trial.id).where(col(Trial.code).in_(sorted(scope.trials or ()))))
        if always_of_a_trial:
            return stmt.where(in_trials)
        return stmt.where(or_(in_trials, and_(col(trial_id).is_(None), col(site_id).in_(site_ids))))
    return stmt if scope.sites is None else stmt.where(col(site_id).in_(site_ids))
