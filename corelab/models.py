"""The domain model of the core lab (SQLModel tables).

Conventions
-----------
- Times are aware UTC (``utcnow()``); SQLModel's ``UTCDateTime`` column type stores them as UTC
  on SQLite and PostgreSQL alike and refuses a naive datetime, so no local time slips in.
- Status fields are plain strings checked against the ``Literal`` lists below, so a migration is
  not needed to add a value, and the vocabulary still has one place.
- No table holds a patient-identifying value: a subject is its trial pseudonym, dates in headers
  arrive shifted, and a failed de-identification check stores the attribute's keyword, never its
  value.
- Schema changes go through Alembic migrations in ``corelab/migrations``; nothing calls
  ``create_all`` at run time.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Literal, get_args

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

SeriesState = Literal["receiving", "complete", "quarantined"]
# queued: a completed series whose QC start was claimed (exactly once) and handed to a flow.
QcState = Literal["pending", "queued", "running", "done", "failed"]
SeriesKind = Literal["trial", "phantom", "unknown"]
AccreditationStatus = Literal["pending", "accredited", "failed", "expired", "suspended"]
Severity = Literal["major", "minor"]
DeviationStatus = Literal["open", "queried", "resolved", "waived"]
QueryStatus = Literal["open", "answered", "resolved"]
ReportKind = Literal["accreditation", "site_qc", "trial_deviations", "demo_summary", "series_qc"]

SERIES_STATES: tuple[str, ...] = get_args(SeriesState)
QC_STATES: tuple[str, ...] = get_args(QcState)
ACCREDITATION_STATUSES: tuple[str, ...] = get_args(AccreditationStatus)
DEVIATION_STATUSES: tuple[str, ...] = get_args(DeviationStatus)


def utcnow() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class Trial(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    code: str = Field(index=True, unique=True, max_length=64)
    title: str = ""
    imaging_manual: str = Field(default="", description="file name of the imaging manual (expectations/manuals)")
    manual_version: str = ""
    standard: str = Field(default="EARL1", description="accreditation standard required of scanners")
    pseudonym_pattern: str = Field(default="", description="regex a subject pseudonym must match")
    deid_policy: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}"),
                              description="de-identification check options (corelab.deid.DeidPolicy fields)")
    created_at: datetime = Field(default_factory=utcnow)


class Site(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    code: str = Field(index=True, unique=True, max_length=64)
    name: str = ""
    ae_title: str = Field(index=True, max_length=16, description="calling AE title allowed for this site")
    host: str | None = Field(default=None, description="optional sender host the AE must come from")
    email: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Scanner(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("manufacturer", "model", "serial_number"),)
    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    code: str = Field(index=True, unique=True, max_length=64, description="the core lab's name for it, e.g. A01-1")
    manufacturer: str
    model: str
    serial_number: str
    software_versions: str = Field(default="", description="as registered; a change triggers re-qualification")
    first_seen: datetime = Field(default_factory=utcnow)
    last_seen: datetime | None = None
    requalification_reason: str | None = Field(
        default=None, description="why new phantom scans are due (software or hardware change), until they pass")


class Accreditation(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    scanner_id: int = Field(foreign_key="scanner.id", index=True)
    standard: str = Field(description="EARL1, EARL2, ...")
    scope_kind: str = Field(default="trial", description="trial | tracer")
    scope: str = Field(description="trial code or tracer name")
    status: str = Field(default="pending", description="one of ACCREDITATION_STATUSES")
    valid_from: date | None = None
    valid_until: date | None = None
    evidence: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False),
                           description="ids of the PhantomResults this rests on")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Subject(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("trial_id", "pseudonym"),)
    id: int | None = Field(default=None, primary_key=True)
    trial_id: int = Field(foreign_key="trial.id", index=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    pseudonym: str = Field(max_length=64)


class Visit(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("subject_id", "label"),)
    id: int | None = Field(default=None, primary_key=True)
    subject_id: int = Field(foreign_key="subject.id", index=True)
    label: str = Field(description="timepoint, e.g. baseline, follow-up")


class Study(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    study_uid: str = Field(index=True, unique=True, max_length=64)
    site_id: int | None = Field(default=None, foreign_key="site.id", index=True)
    visit_id: int | None = Field(default=None, foreign_key="visit.id", index=True)
    study_date: date | None = Field(default=None, description="as sent (shifted by the site's de-identification)")
    description: str = ""


class Series(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    series_uid: str = Field(index=True, unique=True, max_length=64)
    study_id: int | None = Field(default=None, foreign_key="study.id", index=True)
    site_id: int | None = Field(default=None, foreign_key="site.id", index=True)
    scanner_id: int | None = Field(default=None, foreign_key="scanner.id", index=True)
    trial_id: int | None = Field(default=None, foreign_key="trial.id", index=True,
                                 description="set at ingest: the trial of the study's visit, else the one the "
                                             "object named (a phantom); None for a series of no trial")
    modality: str = Field(default="", max_length=16)
    kind: str = Field(default="unknown", description="trial | phantom | unknown")
    description: str = ""
    received_at: datetime = Field(default_factory=utcnow)
    completed_at: datetime | None = None
    last_received_at: datetime | None = Field(
        default=None, index=True, description="newest arrival; the series is stable when this is old enough")
    instance_count: int = 0
    expected_count: int | None = Field(default=None, description="from the header's own counts")
    checksum: str | None = Field(default=None, description="sha256 over the sorted instance sha256s")
    completeness: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}"),
                               description="at completion: count vs the header's counts, position gaps/repeats")
    state: str = Field(default="receiving", description="one of SERIES_STATES")
    qc_state: str = Field(default="pending", description="one of QC_STATES")
    qc_at: datetime | None = None
    qc_manual_version: str | None = Field(default=None, description="version of the imaging manual that judged it")
    header_row: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False),
                             description="the derived header-table row of the last QC")


class Instance(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("sop_instance_uid", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    series_id: int = Field(foreign_key="series.id", index=True)
    sop_instance_uid: str = Field(index=True, max_length=64)
    sop_class_uid: str = Field(max_length=64)
    version: int = Field(default=1, description="a second copy with other bytes is kept as version 2, ...")
    path: str = Field(description="spool path, relative to the data directory")
    sha256: str = Field(max_length=64)
    size_bytes: int
    slice_position_mm: float | None = Field(
        default=None, description="ImagePositionPatient projected on the slice normal (completeness check)")
    needs_review: bool = False
    received_at: datetime = Field(default_factory=utcnow)


class QuarantineItem(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    site_id: int | None = Field(default=None, foreign_key="site.id", index=True)
    source_name: str = Field(description="the object's label: its ordinal in the drop or association and its sha256 prefix, never a file name")
    series_uid: str | None = Field(default=None, index=True, max_length=64,
                                   description="the series it belongs to, when it could be read")
    path: str = Field(description="quarantine path, relative to the data directory")
    sha256: str = Field(max_length=64)
    reason_code: str = Field(index=True, description="not_dicom | truncated | missing_uid | invalid_uid | unreadable | bad_pixel_data | too_large | zip_bomb | symlink | uid_conflict | unknown_sop_class | unknown_site | deid_failed | ...")
    reason: str = Field(sa_column=Column(Text, nullable=False), description="what is wrong and what to do")
    received_at: datetime = Field(default_factory=utcnow)
    released_at: datetime | None = None


class PhantomResult(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    series_id: int = Field(foreign_key="series.id", index=True)
    scanner_id: int | None = Field(default=None, foreign_key="scanner.id", index=True)
    kind: str = Field(description="nema_iec | uniform_cylinder")
    standard: str = ""
    standard_version: str = ""
    verdict: str = Field(default="", description="pass | fail | error")
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    fill: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False),
                       description="the fill-sheet values used, with where each came from")
    corelab_version: str = ""
    input_sha256: str = Field(default="", description="the series checksum the result was computed from")
    scan_date: date | None = None
    analysed_at: datetime = Field(default_factory=utcnow)


class Deviation(SQLModel, table=True):
    # One row per series and rule keeps re-validation idempotent.
    __table_args__ = (UniqueConstraint("series_id", "rule_id"),)
    id: int | None = Field(default=None, primary_key=True)
    series_id: int = Field(foreign_key="series.id", index=True)
    rule_id: str = Field(index=True, max_length=64)
    manual_section: str = ""
    manual_version: str = ""
    expected: str = ""
    observed: str = ""
    severity: str = Field(default="minor", description="major: not evaluable; minor: note it")
    status: str = Field(default="open", description="one of DEVIATION_STATUSES")
    message: str = Field(default="", sa_column=Column(Text, nullable=False))
    corelab_version: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Query(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    deviation_id: int = Field(foreign_key="deviation.id", index=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    status: str = Field(default="open", description="open | answered | resolved")
    thread: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False),
                         description="messages: [{at, by, text}]")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Report(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(description="one of ReportKind")
    site_id: int | None = Field(default=None, foreign_key="site.id", index=True)
    trial_id: int | None = Field(default=None, foreign_key="trial.id", index=True)
    path: str = Field(description="relative to the data directory")
    sha256: str = Field(max_length=64)
    version: int = 1
    replaces_id: int | None = Field(default=None, foreign_key="report.id")
    signed_by: str | None = None
    signed_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    """Append-only, hash-chained: each row's hash covers its content and the previous hash.

    ``prev_hash`` is unique, so two writers racing to append after the same event cannot fork
    the chain: the loser's insert fails and it appends again after the winner.
    """

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow)
    actor: str
    action: str = Field(index=True)
    entity: str = ""
    entity_id: str = ""
    detail: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str = Field(max_length=64, unique=True)
    hash: str = Field(max_length=64, unique=True)


# --- people: portal accounts, API tokens and web sessions -----------------------------------------

Role = Literal["site", "physicist", "trial-manager", "admin"]
ROLES: tuple[str, ...] = get_args(Role)


class User(SQLModel, table=True):
    """A portal account. ``sites`` scopes a site user; ``trials`` scopes a trial manager.

    No password is stored, only its argon2id hash; an account that logs in only through the
    institution's OpenID Connect provider has no hash (``password_hash`` empty) and is matched by
    ``oidc_subject``.
    """

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64, description="login name")
    full_name: str = Field(default="", description="printed name, shown with an e-signature")
    role: str = Field(description="one of ROLES")
    sites: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"),
                        description="site codes a site user belongs to")
    trials: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"),
                         description="trial codes a trial manager reads")
    password_hash: str = ""
    oidc_subject: str | None = Field(default=None, unique=True, max_length=255,
                                     description="the OpenID Connect `sub` (of the one configured issuer) "
                                                 "bound to this account")
    disabled: bool = False
    failed_logins: int = Field(default=0, description="consecutive failed logins since the last success")
    locked_until: datetime | None = None
    password_changed_at: datetime | None = None
    last_login_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class ApiToken(SQLModel, table=True):
    """A machine client's bearer token: only its sha256 is stored (the token is shown once)."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    label: str = ""
    token_sha256: str = Field(max_length=64, unique=True)
    prefix: str = Field(default="", max_length=16, description="first characters, to recognise a token in a list")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class WebSession(SQLModel, table=True):
    """A logged-in browser session, server side: the cookie carries a random key, the table its
    sha256, so a stolen table does not log anyone in. Issued only at login (no fixation)."""

    id: int | None = Field(default=None, primary_key=True)
    key_sha256: str = Field(max_length=64, unique=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    csrf_token: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    last_seen_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    via: str = Field(default="password", description="password | oidc")


# --- forwarding accepted series to the trial's archive ----------------------------------------------

ArchiveKind = Literal["dicom", "stow"]
ForwardRule = Literal["all", "evaluable"]
DeliveryStatus = Literal["pending", "sent", "failed"]
ARCHIVE_KINDS: tuple[str, ...] = get_args(ArchiveKind)
FORWARD_RULES: tuple[str, ...] = get_args(ForwardRule)
DELIVERY_STATUSES: tuple[str, ...] = get_args(DeliveryStatus)


class ArchiveDestination(SQLModel, table=True):
    """A trial's archive. One active row per trial; pointing the trial at another archive retires
    the row (``active`` False) so the new one receives everything again, while a change of rule or
    credentials keeps it. No password here: ``password_file`` names a 0600 file in the data
    directory."""

    id: int | None = Field(default=None, primary_key=True)
    trial_id: int = Field(foreign_key="trial.id", index=True)
    kind: str = Field(description="one of ARCHIVE_KINDS: dicom (C-STORE) | stow (STOW-RS)")
    ae_title: str = Field(default="", max_length=16, description="called AE title (dicom)")
    host: str = Field(default="", max_length=255, description="archive host (dicom)")
    port: int | None = Field(default=None, description="archive DICOM port (dicom)")
    url: str = Field(default="", max_length=2048, description="DICOMweb base URL (stow)")
    username: str = Field(default="", max_length=255, description="HTTP Basic user (stow)")
    password_file: str = Field(default="", description="relative to the data directory; empty: no password")
    rule: str = Field(default="all", description="one of FORWARD_RULES")
    active: bool = Field(default=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class ArchiveDelivery(SQLModel, table=True):
    """One instance (one version of a SOP instance) to one destination: idempotent forwarding."""

    __table_args__ = (UniqueConstraint("destination_id", "instance_id"),)
    id: int | None = Field(default=None, primary_key=True)
    destination_id: int = Field(foreign_key="archivedestination.id", index=True)
    instance_id: int = Field(foreign_key="instance.id", index=True)
    series_id: int = Field(foreign_key="series.id", index=True)
    sop_instance_uid: str = Field(max_length=64)
    sha256: str = Field(max_length=64, description="sha256 of the file sent")
    status: str = Field(default="pending", index=True, description="one of DELIVERY_STATUSES")
    attempts: int = 0
    last_error: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""),
                            description="why the last attempt failed (no identifying value)")
    created_at: datetime = Field(default_factory=utcnow)
    last_attempt_at: datetime | None = None
    sent_at: datetime | None = None
