"""Forwarding accepted series to each trial's archive: its destination, what is due, a batch sent,
the backlog. Called alike by the CLI (``corelab archive``), the Prefect flow ``forward-to-archive``
and the portal's ``/archive`` page.

What is due for a trial's active destination: per series, the newest version of every stored
instance of the trial's complete trial series (never a phantom, never a quarantined object, which
is no :class:`~corelab.models.Instance`), and under the rule ``evaluable`` only series whose state
is ``evaluable`` by the portal's one rule (:func:`services.site_view.series_state`) and no new
version awaiting review; minus instances already delivered there (selected in SQL:
:mod:`services.forwarding_due`). One :class:`~corelab.models.ArchiveDelivery` per instance and
destination makes forwarding idempotent: a delivered instance is never sent again, a new version
is a new instance and goes again, recorded as a *replacement*: an archive that keeps the first
object of a SOP Instance UID (Orthanc's default) answers success and keeps the old one, so the
archive must accept replacements; the backlog counts them.

A batch runs in two short transactions with the network in between and no transaction open:
claim (one conditional UPDATE per record: ``pending``, ``attempts`` + 1; a record another run
holds is skipped), send, record (``sent`` or ``failed`` with the reason, only on records still
held with that attempt) plus one audit event per series now wholly delivered. A pending record
whose claim is younger than :data:`CLAIM_LEASE_S` is left to the run that claimed it; an older
one (a run that died) is due again. A send that breaks off with an unexpected error records its
batch failed before the error goes on to the task's retry.

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

from sqlalchemy import update
from sqlmodel import Session, col, select

from corelab import audit
from corelab.archive_send import (ArchiveError, Outgoing, check_ae_title, check_credentials_transport,
                                  check_host_port, check_stow_url, send_cstore, send_stow)
from corelab.db import session_scope
from corelab.models import FORWARD_RULES, ArchiveDelivery, ArchiveDestination, Instance, Series, Trial, utcnow
from corelab.settings import Settings
from services import forwarding_due
from services.forwarding_due import CLAIM_LEASE_S, REPLACEMENT_NOTE, eligible_series

LOG = logging.getLogger("corelab.archive")
BATCH_SIZE = 50
BATCH_BYTES = 64 << 20  # one STOW-RS request or association: a retry resends at most this much
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
    replacements: int = 0  # sent over an earlier version: kept only by an archive that accepts replacements

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
            check_credentials_transport(new["url"], new["username"])
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


# --- sending -------------------------------------------------------------------------------------------------

def _send(settings: Settings, dest: ArchiveDestination, items: list[Outgoing], timeout_s: float) -> dict[int, str]:
    if dest.kind == "dicom":
        return send_cstore(items, calling_ae=settings.ae_title, called_ae=dest.ae_title, host=dest.host,
                           port=dest.port, timeout_s=timeout_s)
    return send_stow(items, url=dest.url, username=dest.username, password=read_password(settings, dest),
                     timeout_s=timeout_s)


def _record(session: Session, dest: ArchiveDestination, trial_code: str, outcome: dict[int, str],
            claimed: dict[int, tuple[int, int, int, bool]], *, actor: str) -> tuple[int, int]:
    """Store each answer (``outcome``: record id -> error) on the records this run still owns;
    one audit event per series now wholly delivered. Returns (series delivered, replacements sent)."""
    touched: set[int] = set()
    replacements = 0
    for rec_id, error in outcome.items():
        attempts, series_id, replacing = claimed[rec_id][1:]
        note = REPLACEMENT_NOTE if replacing and not error else ""
        if forwarding_due.record(session, rec_id, attempts, error, note) and not error:
            touched.add(series_id)
            replacements += bool(note)
    session.flush()
    # Two runs recording the last instances of one series: each holds the series' row (in id order)
    # before asking what still waits, so the second asks after the first committed and exactly one
    # of them sees the series wholly delivered.
    for series_id in sorted(touched):
        session.execute(update(Series).where(col(Series.id) == series_id).values(description=Series.description)
                        .execution_options(synchronize_session=False))
    delivered = 0
    for series_id in sorted(touched - forwarding_due.waiting_series(session, dest, touched)):
        sent, replaced = zip(*session.exec(select(ArchiveDelivery.sha256, ArchiveDelivery.last_error).where(
            ArchiveDelivery.destination_id == dest.id, ArchiveDelivery.series_id == series_id,
            ArchiveDelivery.status == "sent")).all())
        now_sent = sum(1 for rid, err in outcome.items() if not err and claimed[rid][2] == series_id)
        audit.append(session, actor=actor, action="archive.delivered", entity="series", entity_id=series_id,
                     detail={"trial": trial_code, "destination": dest.id, "kind": dest.kind,
                             "target": target_of(dest), "instances": len(sent), "sent_now": now_sent,
                             "replacements": sum(1 for note in replaced if note == REPLACEMENT_NOTE),
                             "sha256_digest": hashlib.sha256("\n".join(sorted(sent)).encode()).hexdigest()})
        delivered += 1
    return delivered, replacements


def _next_batch(settings: Settings, dest: ArchiveDestination, batch_size: int, batch_bytes: int,
                started: dt.datetime) -> tuple[list[Outgoing], dict[int, tuple[int, int, int, bool]], int]:
    """Select up to ``batch_size`` due rows (at most ``batch_bytes`` together, at least one) and
    claim them: (items won, record id -> (instance id, attempts, series id, replacing), rows seen)."""
    with session_scope(settings) as s:
        rows = forwarding_due.due(s, dest, limit=batch_size, not_since=started)
        total, chosen = 0, []
        for inst, _rec, replacing in rows:
            if chosen and total + inst.size_bytes > batch_bytes:
                break
            total += inst.size_bytes
            chosen.append((inst, replacing))
        if not chosen:
            return [], {}, 0
        won = forwarding_due.claim(s, dest, [inst for inst, _ in chosen])
        items, claimed = [], {}
        for inst, replacing in chosen:
            if inst.id in won:
                rec_id, attempts = won[inst.id]
                claimed[rec_id] = (inst.id, attempts, inst.series_id, replacing)
                items.append(Outgoing(rec_id, settings.data_dir / inst.path, inst.sop_class_uid,
                                      inst.sop_instance_uid))
    return items, claimed, len(chosen)


def forward_trial(settings: Settings, trial_code: str, *, batch_size: int = BATCH_SIZE,
                  batch_bytes: int = BATCH_BYTES, timeout_s: float = 30.0, max_batches: int | None = None,
                  actor: str = "forward") -> ForwardResult:
    """Send what is due for one trial, batch after batch (at most ``batch_size`` instances and
    ``batch_bytes`` bytes each), until nothing is left, the archive fails a whole batch (then the
    run stops: the rest waits for the retry), or ``max_batches``. Another run at the same time
    sends other instances: each batch is claimed row by row.

    Raises
    ------
    Exception
        Whatever else broke a send (a spool file gone, a library error): the batch is first
        recorded failed with the error's type, so the retry sends it again.
    """
    if not 1 <= batch_size <= 1000:
        raise ForwardingError(f"batch size {batch_size} is outside 1-1000")
    if batch_bytes < 1:
        raise ForwardingError(f"batch bytes {batch_bytes} must be positive")
    with session_scope(settings) as s:
        dest = active_destination(s, _trial(s, trial_code).id)
        if dest is None:
            raise ForwardingError(f"trial {trial_code} has no archive: set one with `corelab archive set "
                                  f"{trial_code} --dicom AE@host:port` or `--stow URL`")
    result = ForwardResult(trial_code, target_of(dest))
    started = utcnow()  # a row attempted since then failed in this run: it waits for the next run
    lost = 0
    while max_batches is None or result.batches < max_batches:
        items, claimed, seen = _next_batch(settings, dest, batch_size, batch_bytes, started)
        if not seen:
            break
        if not items:  # another run claimed all of them between our select and our claim
            lost += 1
            if lost > 3:
                break
            continue
        result.batches += 1
        stop = False
        try:
            outcome = _send(settings, dest, items, timeout_s)
        except (ArchiveError, ValueError) as exc:
            outcome, stop = {item.key: str(exc) for item in items}, True
        except Exception as exc:
            # left pending, the batch would count as claimed for the lease and the retry would
            # send nothing: record it failed first, then let the task's retry take it
            LOG.error("archive %s (%s): batch %d broke off: %s", trial_code, result.target, result.batches,
                      type(exc).__name__)
            reason = f"the send broke off ({type(exc).__name__}): see the corelab log; retried on the next run"
            with session_scope(settings) as s:
                _record(s, dest, trial_code, {item.key: reason for item in items}, claimed, actor=actor)
            raise
        with session_scope(settings) as s:
            delivered, replacements = _record(s, dest, trial_code, outcome, claimed, actor=actor)
        result.series_delivered += delivered
        result.replacements += replacements
        failures = [e for e in outcome.values() if e]
        result.sent += len(outcome) - len(failures)
        result.failed += len(failures)
        result.errors += [e for e in dict.fromkeys(failures) if e not in result.errors]
        LOG.info("archive %s (%s): batch %d: %d sent, %d failed", trial_code, result.target, result.batches,
                 len(outcome) - len(failures), len(failures))
        if replacements:
            LOG.warning("archive %s (%s): %d sent as replacements of earlier versions: the archive must accept "
                        "replacements (Orthanc: OverwriteInstances true)", trial_code, result.target, replacements)
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
    """Per trial with an archive (only ``scope``'s trials when given): destination, rule, and
    :func:`services.forwarding_due.backlog_of`: waiting (pending and failed), held for review,
    sent (as replacements), the newest error, the oldest waiting series, the first series."""
    out = []
    for row in show(session, scope):
        if trial_code and row["trial"] != trial_code:
            continue
        dest = active_destination(session, _trial(session, row["trial"]).id)
        out.append({**row, **forwarding_due.backlog_of(session, dest)})
    return out


def due(session: Session, dest: ArchiveDestination, **options) -> list[tuple[Instance, ArchiveDelivery | None]]:
    """What is due for ``dest`` (see :func:`services.forwarding_due.due`), as (instance, record)."""
    return [(inst, rec) for inst, rec, _ in forwarding_due.due(session, dest, **options)]


__all__ = ["BATCH_BYTES", "BATCH_SIZE", "CLAIM_LEASE_S", "ForwardResult", "ForwardingError", "active_destination", "backlog",
           "describe", "due", "eligible_series", "forward", "forward_trial", "read_password", "set_destination",
           "show", "target_of"]
