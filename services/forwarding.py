"""Forwarding accepted series to each trial's archive: its destination, what is due, a batch sent,
the backlog. Called alike by the CLI (``corelab archive``), the Prefect flow ``forward-to-archive``
and the portal's ``/archive`` page.

What is due for a trial's active destination: the newest version of every stored instance of the
trial's complete trial series (never a phantom, never a quarantined object, which is no
:class:`~corelab.models.Instance`), and under the rule ``evaluable`` only series whose state is
``evaluable`` by the portal's one rule (:func:`services.site_view.series_state`); minus instances
already delivered there. One :class:`~corelab.models.ArchiveDelivery` per instance and
destination makes forwarding idempotent: a delivered instance is never sent again, a new version
is a new instance and goes again.

A batch runs in two short transactions with the network in between and no transaction open:
claim (records ``pending``, ``attempts`` + 1), send, record (``sent`` or ``failed`` with the
reason) plus one audit event per series now wholly delivered. A pending record whose claim is
younger than :data:`CLAIM_LEASE_S` is left to the run that claimed it; an older one (a run that
died) is due again.

The password of a STOW-RS archive is never in the database, an audit event, a log or a page: it
is copied at set-up into ``<data dir>/secrets/archive-<trial>.password`` (mode 0600) and read
only by the sender.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from corelab import audit
from corelab.archive_send import (ArchiveError, Outgoing, check_ae_title, check_host_port, check_stow_url,
                                  send_cstore, send_stow)
from corelab.db import session_scope
from corelab.models import (FORWARD_RULES, ArchiveDelivery, ArchiveDestination, Instance, Series, Site, Study,
                            Subject, Trial, Visit, utcnow)
from corelab.settings import Settings
from services.site_view import flag_sets, series_state

LOG = logging.getLogger("corelab.archive")
BATCH_SIZE = 50
CLAIM_LEASE_S = 600.0
MAX_PASSWORD_BYTES = 1024
_DICOM_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^@]+):(?P<port>[0-9]{1,5})$")


class ForwardingError(ValueError):
    """A destination that cannot be set as given, or a trial without one; the message says the fix."""


@dataclass
class ForwardResult:
    """What one run forwarded for one trial."""

    trial: str
    target: str
    sent: int = 0
    failed: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)   # distinct reasons, no identifying values
    series_delivered: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# --- the destination -----------------------------------------------------------------------------------

def _trial(session: Session, code: str) -> Trial:
    trial = session.exec(select(Trial).where(Trial.code == code)).first()
    if trial is None:
        raise ForwardingError(f"no trial {code!r}: load it with `corelab register load`")
    return trial


def active_destination(session: Session, trial_id: int) -> ArchiveDestination | None:
    return session.exec(select(ArchiveDestination).where(ArchiveDestination.trial_id == trial_id,
                                                         col(ArchiveDestination.active))).first()


def target_of(dest: ArchiveDestination) -> str:
    """Where a destination sends, for pages, logs and audit (never a password)."""
    return f"{dest.ae_title}@{dest.host}:{dest.port}" if dest.kind == "dicom" else dest.url


def _password_path(settings: Settings, trial_code: str) -> Path:
    from corelab.validate import safe_join

    return safe_join(settings.data_dir / "secrets", f"archive-{trial_code}.password")


def _keep_password(settings: Settings, trial_code: str, password_file: Path) -> str:
    """Copy the password into a 0600 file of the data directory; its path relative to it."""
    source = Path(password_file)
    if not source.is_file():
        raise ForwardingError(f"password file {source} is not a readable file: write the archive password "
                              "into a file (one line) and give its path with --password-file")
    raw = source.read_bytes()
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ForwardingError(f"password file {source} holds {len(raw)} bytes (at most {MAX_PASSWORD_BYTES}): "
                              "it must hold the password alone")
    password = raw.decode("utf-8", errors="strict").rstrip("\r\n")
    if not password or "\n" in password:
        raise ForwardingError(f"password file {source} must hold the password on one line")
    target = _password_path(settings, trial_code)
    target.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file may have had other bits
        os.write(fd, password.encode())
    finally:
        os.close(fd)
    return str(target.relative_to(settings.data_dir))


def read_password(settings: Settings, dest: ArchiveDestination) -> str:
    if not dest.password_file:
        return ""
    path = settings.data_dir / dest.password_file
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        raise ArchiveError(f"the password file of the archive {target_of(dest)} is missing from the data "
                           "directory: run `corelab archive set` again with --password-file") from None


def set_destination(session: Session, settings: Settings, trial_code: str, *, dicom: str = "", stow_url: str = "",
                    username: str = "", password_file: Path | None = None, rule: str = "all",
                    actor: str) -> dict:
    """Point a trial at its archive: ``dicom="AE@host:port"`` or ``stow_url`` (+ ``username``,
    ``password_file``), with a ``rule`` (``all`` or ``evaluable``). Another target retires the
    old destination (the new archive gets everything); the same target keeps its records."""
    trial = _trial(session, trial_code)
    if bool(dicom) == bool(stow_url):
        raise ForwardingError("give exactly one destination: --dicom AE@host:port or --stow URL")
    if rule not in FORWARD_RULES:
        raise ForwardingError(f"rule {rule!r} is not one of {', '.join(FORWARD_RULES)}")
    try:
        if dicom:
            m = _DICOM_TARGET.match(dicom.strip())
            if not m:
                raise ForwardingError(f"--dicom {dicom!r} must be AE@host:port, e.g. ARCHIVE@pacs.example.org:104")
            host, port = check_host_port(m["host"], m["port"])
            new = dict(kind="dicom", ae_title=check_ae_title(m["ae"], "archive AE title"), host=host, port=port,
                       url="", username="")
        else:
            new = dict(kind="stow", ae_title="", host="", port=None, url=check_stow_url(stow_url),
                       username=username.strip())
            if len(new["username"]) > 255 or any(c in new["username"] for c in ":\r\n"):
                raise ForwardingError("--user must be one line of at most 255 characters, without ':'")
    except ValueError as exc:
        if isinstance(exc, ForwardingError):
            raise
        raise ForwardingError(str(exc)) from None
    if new["kind"] == "stow" and new["username"] and password_file is None:
        raise ForwardingError("--user needs --password-file (the password is never given on the command line)")
    dest = active_destination(session, trial.id)
    replaced = dest is not None
    same = dest is not None and all(getattr(dest, k) == new[k] for k in ("kind", "ae_title", "host", "port", "url"))
    if dest is not None and not same:
        dest.active, dest.updated_at = False, utcnow()
        session.add(dest)
        session.flush()
    if not same:
        dest = ArchiveDestination(trial_id=trial.id, **new)
    dest.username, dest.rule, dest.updated_at = new["username"], rule, utcnow()
    if password_file is not None and new["kind"] == "stow":
        dest.password_file = _keep_password(settings, trial.code, password_file)
    elif new["kind"] == "dicom":
        dest.password_file = ""
    session.add(dest)
    session.flush()
    audit.append(session, actor=actor, action="archive.set", entity="trial", entity_id=trial.code,
                 detail={"destination": dest.id, "kind": dest.kind, "target": target_of(dest), "rule": rule,
                         "user": dest.username, "password": "set" if dest.password_file else "none",
                         "replaced_target": replaced and not same})
    return describe(trial.code, dest)


def describe(trial_code: str, dest: ArchiveDestination) -> dict:
    return {"trial": trial_code, "kind": dest.kind, "target": target_of(dest), "user": dest.username,
            "password": "(kept in the data directory)" if dest.password_file else "(none)", "rule": dest.rule,
            "since": dest.created_at}


def show(session: Session, scope=None) -> list[dict]:
    """Every trial's active destination (those of ``scope``'s trials only, when given)."""
    rows = session.exec(select(Trial.code, ArchiveDestination).join(ArchiveDestination,
                        ArchiveDestination.trial_id == Trial.id).where(col(ArchiveDestination.active))
                        .order_by(col(Trial.code))).all()
    return [describe(code, dest) for code, dest in rows if scope is None or scope.sees_trial(code)]


# --- what is due ------------------------------------------------------------------------------------------

def eligible_series(session: Session, dest: ArchiveDestination) -> list[int]:
    """Ids of the trial's complete trial series that the destination's rule lets go."""
    ids = list(session.exec(select(Series.id).where(Series.trial_id == dest.trial_id, Series.kind == "trial",
                                                    Series.state == "complete").order_by(col(Series.id))))
    if dest.rule == "all" or not ids:
        return ids
    chosen = col(Series.id).in_(ids)
    queried, major = flag_sets(session, chosen)
    return [sid for sid, state, qc in session.exec(select(Series.id, Series.state, Series.qc_state).where(chosen))
            if series_state(state, qc, unresolved_query=sid in queried, major_open=sid in major)[0] == "evaluable"]


def due(session: Session, dest: ArchiveDestination, *, now: dt.datetime | None = None,
        leased: bool = True) -> list[tuple[Instance, ArchiveDelivery | None]]:
    """The instances to send (newest version of each SOP instance, not yet delivered), each with
    its record if it has one; ``leased`` False keeps those claimed by a running batch too."""
    series_ids = eligible_series(session, dest)
    if not series_ids:
        return []
    newest = (select(Instance.sop_instance_uid, func.max(Instance.version).label("v"))
              .where(col(Instance.series_id).in_(series_ids)).group_by(Instance.sop_instance_uid).subquery())
    rows = session.exec(
        select(Instance, ArchiveDelivery)
        .join(newest, (Instance.sop_instance_uid == newest.c.sop_instance_uid) & (Instance.version == newest.c.v))
        .join(ArchiveDelivery, (ArchiveDelivery.instance_id == Instance.id)
              & (ArchiveDelivery.destination_id == dest.id), isouter=True)
        .where(col(Instance.series_id).in_(series_ids)).order_by(col(Instance.series_id), col(Instance.id))).all()
    sent_bytes = set(session.exec(select(ArchiveDelivery.sop_instance_uid, ArchiveDelivery.sha256)
                                  .where(ArchiveDelivery.destination_id == dest.id, ArchiveDelivery.status == "sent")))
    horizon = (now or utcnow()) - dt.timedelta(seconds=CLAIM_LEASE_S)
    out = []
    for inst, rec in rows:
        if (inst.sop_instance_uid, inst.sha256) in sent_bytes:
            continue  # these very bytes are there already (the same instance, or an identical copy)
        if leased and rec is not None and rec.status == "pending" and rec.last_attempt_at and \
                rec.last_attempt_at > horizon:
            continue
        out.append((inst, rec))
    return out


# --- sending -------------------------------------------------------------------------------------------------

def _claim(session: Session, dest: ArchiveDestination, batch: list[tuple[Instance, ArchiveDelivery | None]]):
    now = utcnow()
    records = []
    for inst, rec in batch:
        rec = session.get(ArchiveDelivery, rec.id) if rec is not None else None
        if rec is None:
            rec = ArchiveDelivery(destination_id=dest.id, instance_id=inst.id, series_id=inst.series_id,
                                  sop_instance_uid=inst.sop_instance_uid, sha256=inst.sha256)
        rec.status, rec.attempts, rec.last_attempt_at = "pending", rec.attempts + 1, now
        session.add(rec)
        records.append(rec)
    session.flush()
    return records


def _send(settings: Settings, dest: ArchiveDestination, items: list[Outgoing], timeout_s: float) -> dict[int, str]:
    if dest.kind == "dicom":
        return send_cstore(items, calling_ae=settings.ae_title, called_ae=dest.ae_title, host=dest.host,
                           port=dest.port, timeout_s=timeout_s)
    return send_stow(items, url=dest.url, username=dest.username, password=read_password(settings, dest),
                     timeout_s=timeout_s)


def _record(session: Session, dest: ArchiveDestination, trial_code: str, outcome: dict[int, str], *,
            actor: str) -> int:
    """Store each answer; one audit event per series now wholly delivered. Returns that count."""
    now = utcnow()
    touched: set[int] = set()
    for rec_id, error in outcome.items():
        rec = session.get(ArchiveDelivery, rec_id)
        rec.status, rec.last_error = ("sent", "") if not error else ("failed", error[:500])
        rec.sent_at = now if not error else None
        session.add(rec)
        if not error:
            touched.add(rec.series_id)
    session.flush()
    if not touched:
        return 0
    waiting = {inst.series_id for inst, _ in due(session, dest, leased=False)}
    delivered = 0
    for series_id in sorted(touched - waiting):
        sent = session.exec(select(ArchiveDelivery.sha256).where(ArchiveDelivery.destination_id == dest.id,
                                                                 ArchiveDelivery.series_id == series_id,
                                                                 ArchiveDelivery.status == "sent")).all()
        now_sent = sum(1 for rid, err in outcome.items() if not err and session.get(ArchiveDelivery, rid).series_id
                       == series_id)
        audit.append(session, actor=actor, action="archive.delivered", entity="series", entity_id=series_id,
                     detail={"trial": trial_code, "destination": dest.id, "kind": dest.kind,
                             "target": target_of(dest), "instances": len(sent), "sent_now": now_sent,
                             "sha256_digest": hashlib.sha256("\n".join(sorted(sent)).encode()).hexdigest()})
        delivered += 1
    return delivered


def forward_trial(settings: Settings, trial_code: str, *, batch_size: int = BATCH_SIZE, timeout_s: float = 30.0,
                  max_batches: int | None = None, actor: str = "forward") -> ForwardResult:
    """Send what is due for one trial, batch after batch, until nothing is left, the archive
    fails a whole batch (then the run stops: the rest waits for the retry), or ``max_batches``."""
    if not 1 <= batch_size <= 1000:
        raise ForwardingError(f"batch size {batch_size} is outside 1-1000")
    with session_scope(settings) as s:
        dest = active_destination(s, _trial(s, trial_code).id)
        if dest is None:
            raise ForwardingError(f"trial {trial_code} has no archive: set one with `corelab archive set "
                                  f"{trial_code} --dicom AE@host:port` or `--stow URL`")
    result = ForwardResult(trial_code, target_of(dest))
    tried: set[int] = set()  # instances attempted in this run: a failure waits for the next run
    while max_batches is None or result.batches < max_batches:
        with session_scope(settings) as s:
            batch = [(i, r) for i, r in due(s, dest) if i.id not in tried][:batch_size]
            if not batch:
                break
            records = _claim(s, dest, batch)
            items = [Outgoing(r.id, settings.data_dir / i.path, i.sop_class_uid, i.sop_instance_uid)
                     for (i, _), r in zip(batch, records)]
        tried.update(i.id for i, _ in batch)
        result.batches += 1
        stop = False
        try:
            outcome = _send(settings, dest, items, timeout_s)
        except (ArchiveError, ValueError) as exc:
            outcome, stop = {item.key: str(exc) for item in items}, True
        with session_scope(settings) as s:
            result.series_delivered += _record(s, dest, trial_code, outcome, actor=actor)
        failures = [e for e in outcome.values() if e]
        result.sent += len(outcome) - len(failures)
        result.failed += len(failures)
        result.errors += [e for e in dict.fromkeys(failures) if e not in result.errors]
        LOG.info("archive %s (%s): batch %d: %d sent, %d failed", trial_code, result.target, result.batches,
                 len(outcome) - len(failures), len(failures))
        if stop:
            break
    return result


def forward(settings: Settings, trial_code: str | None = None, **options) -> list[ForwardResult]:
    """:func:`forward_trial` for one trial, or for every trial with an active destination."""
    with session_scope(settings) as s:
        codes = [trial_code] if trial_code else [row["trial"] for row in show(s)]
    return [forward_trial(settings, code, **options) for code in codes]


# --- the backlog ------------------------------------------------------------------------------------------------

def backlog(session: Session, scope=None, trial_code: str | None = None) -> list[dict]:
    """Per trial with an archive: destination, rule, waiting (pending and failed), sent, the oldest
    waiting series' completion, the newest error, and the series waiting (site, subject pseudonym,
    visit, modality, counts); only ``scope``'s trials when given."""
    out = []
    for row in show(session, scope):
        if trial_code and row["trial"] != trial_code:
            continue
        dest = active_destination(session, _trial(session, row["trial"]).id)
        waiting = due(session, dest, leased=False)
        failed = [r for _, r in waiting if r is not None and r.status == "failed"]
        newest_failure = max(failed, key=lambda r: r.last_attempt_at or r.created_at, default=None)
        per_series: dict[int, dict] = {}
        for inst, rec in waiting:
            entry = per_series.setdefault(inst.series_id, {"waiting": 0, "failed": 0})
            entry["waiting"] += 1
            entry["failed"] += rec is not None and rec.status == "failed"
        series_rows = []
        if per_series:
            for sid, site, modality, completed, pseudonym, visit in session.exec(
                    select(Series.id, Site.code, Series.modality, Series.completed_at, Subject.pseudonym, Visit.label)
                    .join(Site, Series.site_id == Site.id, isouter=True)
                    .join(Study, Series.study_id == Study.id, isouter=True)
                    .join(Visit, Study.visit_id == Visit.id, isouter=True)
                    .join(Subject, Visit.subject_id == Subject.id, isouter=True)
                    .where(col(Series.id).in_(list(per_series))).order_by(col(Series.completed_at), col(Series.id))):
                series_rows.append({"series_id": sid, "site": site, "subject": pseudonym, "visit": visit,
                                    "modality": modality, "completed_at": completed, **per_series[sid]})
        sent = session.exec(select(func.count()).select_from(ArchiveDelivery).where(
            ArchiveDelivery.destination_id == dest.id, ArchiveDelivery.status == "sent")).one()
        out.append({**row, "waiting": len(waiting), "pending": len(waiting) - len(failed), "failed": len(failed),
                    "sent": int(sent),
                    "oldest_waiting": min((r["completed_at"] for r in series_rows if r["completed_at"]), default=None),
                    "last_error": newest_failure.last_error if newest_failure else "",
                    "last_error_at": newest_failure.last_attempt_at if newest_failure else None,
                    "series": series_rows})
    return out


__all__ = ["BATCH_SIZE", "CLAIM_LEASE_S", "ForwardResult", "ForwardingError", "active_destination", "backlog",
           "describe", "due", "eligible_series", "forward", "forward_trial", "read_password", "set_destination",
           "show", "target_of"]
