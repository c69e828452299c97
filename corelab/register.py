"""The site and scanner register: who may send, from which AE title, with which scanners.

Codes and AE titles are validated here, at registration, because they end up in file paths
(``outbox/<SITE>/``, ``reports/<kind>/<SITE>_<month>/``) and in the receiver's checks:

- **Site codes, scanner ids and trial codes** (:data:`CODE_PATTERN`): 1-32 characters, upper-case
  letters ``A-Z``, digits, ``_`` and ``-``, starting with a letter or digit. So ``../../X``,
  ``a/b``, ``.``, an empty code and a leading ``_`` (reserved: ``outbox/_trial/``) are refused.
- **AE titles** (:data:`AE_TITLE_PATTERN`): 1-16 characters of the DICOM default character
  repertoire (ISO 646, ``0x20``-``0x7E``) without backslash or control characters, and neither
  starting nor ending with a space (PS3.5 calls leading and trailing spaces non-significant; we
  store the title without them and the receiver refuses a calling AE title sent with leading
  spaces, see :func:`corelab.dicom_handlers.ae_title_problem`). Inner spaces are allowed (``SITE A``).

A refused value raises :class:`RegisterError` naming the entry, the rule and the fix.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path

import yaml
from sqlmodel import Session, col, select

from corelab import audit
from corelab.deid import DeidPolicy
from corelab.models import AuditEvent, Scanner, Site, Trial

CODE_PATTERN = r"^[A-Z0-9][A-Z0-9_-]{0,31}$"
"""Site codes, scanner ids and trial codes: safe as one path component on every file system."""
AE_TITLE_PATTERN = r"^[\x21-\x5b\x5d-\x7e](?:[\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$"
"""DICOM AE title: 1-16 characters of the default repertoire, no backslash or control character,
no leading or trailing space (inner spaces allowed)."""
_CODE = re.compile(CODE_PATTERN)
_AE = re.compile(AE_TITLE_PATTERN)
CODE_RULE = "1-32 characters A-Z, 0-9, '_' or '-', starting with a letter or digit"
AE_TITLE_RULE = ("1-16 characters of the DICOM default repertoire (printable ASCII) without backslash, "
                 "not starting or ending with a space")


class RegisterError(ValueError):
    """A register entry is invalid; the message names the entry and the fix."""


def is_valid_code(code: object) -> bool:
    """True when ``code`` may be a site code, scanner id or trial code (:data:`CODE_PATTERN`)."""
    return isinstance(code, str) and _CODE.fullmatch(code) is not None


def is_valid_ae_title(value: object) -> bool:
    """True when ``value`` is an AE title as registered (:data:`AE_TITLE_PATTERN`)."""
    return isinstance(value, str) and _AE.fullmatch(value) is not None


def check_code(code: object, what: str = "site code") -> str:
    """Return ``code`` when valid, else raise :class:`RegisterError` naming the rule."""
    if not is_valid_code(code):
        raise RegisterError(f"{what} {code!r} is refused: a {what} must be {CODE_RULE} "
                            "(it names folders such as outbox/<SITE>/ and report folders), e.g. A01")
    return code


def add_site(session: Session, *, code: str, ae_title: str, host: str | None = None, name: str = "",
             actor: str = "cli") -> Site:
    """Register a site (or update its AE title and host).

    Raises
    ------
    RegisterError
        When the code does not match :data:`CODE_PATTERN` or the AE title does not match
        :data:`AE_TITLE_PATTERN`.
    """
    check_code(code, "site code")
    if not is_valid_ae_title(ae_title):
        raise RegisterError(f"site {code}: AE title {ae_title!r} is not a valid DICOM AE title "
                            f"({AE_TITLE_RULE})")
    site = session.exec(select(Site).where(Site.code == code)).first()
    if site is not None and (site.ae_title, site.host, site.name) == (ae_title, host, name or site.name):
        return site
    if site is None:
        site = Site(code=code, ae_title=ae_title, host=host, name=name)
        session.add(site)
    else:
        site.ae_title, site.host, site.name = ae_title, host, name or site.name
    session.flush()
    audit.append(session, actor=actor, action="site.register", entity="site", entity_id=code,
                 detail={"ae_title": ae_title, "host": host})
    return site


def add_scanner(session: Session, site: Site, *, code: str, manufacturer: str, model: str, serial_number: str,
                software_versions: str = "") -> Scanner:
    check_code(code, "scanner id")
    scanner = session.exec(select(Scanner).where(Scanner.code == code)).first()
    if scanner is None:
        scanner = Scanner(site_id=site.id, code=code, manufacturer=manufacturer, model=model,
                          serial_number=serial_number, software_versions=software_versions)
        session.add(scanner)
    else:
        scanner.site_id, scanner.manufacturer, scanner.model = site.id, manufacturer, model
        scanner.serial_number, scanner.software_versions = serial_number, software_versions
    session.flush()
    return scanner


def add_trial(session: Session, *, code: str, title: str = "", imaging_manual: str = "", manual_version: str = "",
              standard: str = "EARL1", pseudonym_pattern: str = "", deid_policy: dict | None = None) -> Trial:
    check_code(code, "trial code")
    trial = session.exec(select(Trial).where(Trial.code == code)).first()
    if trial is None:
        trial = Trial(code=code)
        session.add(trial)
    trial.title, trial.imaging_manual, trial.manual_version = title, imaging_manual, manual_version
    trial.standard, trial.pseudonym_pattern = standard, pseudonym_pattern
    if deid_policy is not None:
        try:  # refuse a malformed policy at load, not at the first scan
            DeidPolicy.from_dict(deid_policy)
        except (TypeError, ValueError) as exc:
            raise RegisterError(f"trial {code}: deid_policy: {exc}") from None
        trial.deid_policy = dict(deid_policy)
    session.flush()
    return trial


def load_register(session: Session, path: Path, *,
                  trial_fields: Callable[[str], dict] | None = None) -> dict:
    """Load a register YAML into the store; loading it again changes nothing.

    Format::

        trial_code: FDG-RESP-01          # optional
        deid_policy: {private_tags: remove_all}   # optional, corelab.deid.DeidPolicy fields
        trial_name: ...
        sites:    [{code: A01, ae_title: SITE_A01, name: ..., host: ..., email: ...}]
        scanners: [{id: A01-1, site: A01, manufacturer: SIEMENS, model: ..., serial: ...,
                    software_versions: ...}]

    ``trial_fields(trial_code)`` may supply the trial's manual, manual version, standard and
    pseudonym pattern (the callers pass :func:`expectations.manual.trial_fields`; the kernel does
    not read manuals itself).
    """
    doc = yaml.safe_load(Path(path).read_text()) or {}
    out = {"trial": None, "sites": 0, "scanners": 0}
    if doc.get("trial_code"):
        # Checked before the manual is looked up by it (a code must never become a path part).
        trial_code = check_code(str(doc["trial_code"]), "trial code")
        fields = dict(trial_fields(trial_code)) if trial_fields else {}
        fields["title"] = doc.get("trial_name") or fields.get("title", "")
        if doc.get("deid_policy") is not None:
            # the register's policy adds to the manual's (its visit list) rather than replacing it
            fields["deid_policy"] = {**fields.get("deid_policy", {}), **doc["deid_policy"]}
        out["trial"] = add_trial(session, code=trial_code, **fields).code
    sites = {}
    for i, entry in enumerate(doc.get("sites", [])):
        missing = [k for k in ("code", "ae_title") if not entry.get(k)]
        if missing:
            raise RegisterError(f"{path}: site #{i + 1} lacks {', '.join(missing)}")
        code = str(entry["code"])  # YAML reads 101 as a number; the code is the text
        sites[code] = add_site(session, code=code, ae_title=str(entry["ae_title"]),
                               host=entry.get("host"), name=entry.get("name", ""), actor="register")
        if entry.get("email") and sites[code].email != entry["email"]:
            sites[code].email = entry["email"]  # where its reports are e-mailed
        out["sites"] += 1
    for i, entry in enumerate(doc.get("scanners", [])):
        missing = [k for k in ("id", "site", "manufacturer", "model", "serial") if not entry.get(k)]
        if missing:
            raise RegisterError(f"{path}: scanner #{i + 1} lacks {', '.join(missing)}")
        site = sites.get(str(entry["site"])) or session.exec(select(Site).where(Site.code == str(entry["site"]))).first()
        if site is None:
            raise RegisterError(f"{path}: scanner {entry['id']} names site {entry['site']}, which is not registered")
        add_scanner(session, site, code=str(entry["id"]), manufacturer=entry["manufacturer"], model=entry["model"],
                    serial_number=str(entry["serial"]), software_versions=str(entry.get("software_versions", "")))
        out["scanners"] += 1
    return out


REQUALIFICATION_ACTION = "scanner.requalification"


def flag_requalification(session: Session, scanner: Scanner, reason: str, *, actor: str) -> None:
    """Record that a scanner changed and needs new phantom scans (reason kept until they pass).

    The audit event dates the change: phantom results analysed before it do not re-qualify.
    """
    scanner.requalification_reason = reason
    session.add(scanner)
    session.flush()
    audit.append(session, actor=actor, action=REQUALIFICATION_ACTION, entity="scanner", entity_id=scanner.id,
                 detail={"scanner": scanner.code, "reason": reason})


def requalification_since(session: Session, scanner: Scanner) -> dt.datetime | None:
    """When the scanner's pending change happened (None when no change is pending)."""
    if not scanner.requalification_reason:
        return None
    event = session.exec(select(AuditEvent).where(AuditEvent.action == REQUALIFICATION_ACTION,
                                                  AuditEvent.entity == "scanner",
                                                  AuditEvent.entity_id == str(scanner.id))
                         .order_by(col(AuditEvent.id).desc())).first()
    when = event.at if event is not None else scanner.first_seen
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)

