"""Shared by the STOW-RS tests: a served portal, tokens, good objects, bodies and what a request
could leave behind. The lab is the portal test lab (sites A01, B02; users site-a, site-b, phys,
tm); its trial's pseudonym pattern is ``FDGR01-<site>-<nnn>``, so the good objects carry such
pseudonyms."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re

import httpx
import pydicom
from pydicom.uid import generate_uid
from sqlmodel import func, select

from corelab.db import session_scope
from corelab.models import AuditEvent, Instance, QuarantineItem, Site
from portal.serve import start_portal_thread
from services import accounts
from synth.net import free_port, wait_port
from synth.small_series import pet_slice

BOUNDARY = "corelab-test-7f3a"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _serve(settings):
    settings = dataclasses.replace(settings, portal_port=free_port())
    server, thread = start_portal_thread(settings)
    wait_port(settings.portal_port, 30)
    return server, thread, f"http://127.0.0.1:{settings.portal_port}"


def _token(lab, name: str, **kw) -> str:
    with session_scope(lab.settings) as s:
        return accounts.create_token(s, name, actor="test", label="stow test", **kw)["token"]


def _site_id(lab, code: str) -> int:
    with session_scope(lab.settings) as s:
        return s.exec(select(Site.id).where(Site.code == code)).one()


def _datasets(lab, n: int, *, site: str = "A01", study: str | None = None, series: str | None = None):
    """``n`` slices of one de-identified PET series that pass the lab trial's checks, as a site's
    script holds them after ``dcmread`` of its files (with the PS3.10 preamble; a dataset built in
    memory has none, see the test of that case)."""
    study, series, frame = study or generate_uid(), series or generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = pet_slice(study=study, series=series, frame=frame, pixels=bytes(range(128)), matrix=8, index=i, n=n)
        ds.PatientName = ds.PatientID = ds.ClinicalTrialSubjectID = f"FDGR01-{site}-901"
        ds.ClinicalTrialProtocolID, ds.ClinicalTrialTimePointID = lab.trial, "baseline"
        ds.preamble = b"\0" * 128
        out.append(ds)
    return out


def _encode(ds) -> bytes:
    """The bytes dicomweb-client sends for a dataset (its own encoding: pydicom.dcmwrite)."""
    with io.BytesIO() as b:
        pydicom.dcmwrite(b, ds)
        return b.getvalue()


def _body(parts, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/related body; a part is bytes (application/dicom) or (bytes, content type)."""
    out = b""
    for part in parts:
        data, media = (part, "application/dicom") if isinstance(part, bytes) else part
        out += f"--{boundary}\r\nContent-Type: {media}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def _post(base_url, token, body, *, content_type: str = MULTIPART, path: str = "/dicomweb/studies",
          headers: dict | None = None, **kw):
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json", **(headers or {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(base_url + path, content=body, headers=headers, timeout=60, **kw)


def _state(lab) -> dict:
    """What a request could leave behind: rows, spool and quarantine files, staging folders."""
    data = lab.settings.data_dir
    with session_scope(lab.settings) as s:
        instances = s.exec(select(func.count()).select_from(Instance)).one()
        held = s.exec(select(func.count()).select_from(QuarantineItem)).one()
    staging = lab.settings.stow_staging_dir
    return {"instances": instances, "quarantined": held,
            "spool": sum(1 for p in (data / "spool").rglob("*") if p.is_file()),
            "quarantine_files": sum(1 for p in (data / "quarantine").rglob("*") if p.is_file()),
            "staging": sorted(p.name for p in staging.iterdir()) if staging.exists() else []}


def _failed(response) -> list[dict]:
    return response.json().get("00081198", {}).get("Value", [])


def _reason_codes(response) -> list[str]:
    return [re.match(r"\w+ \((\w+)\)", item["00091001"]["Value"][0]).group(1) for item in _failed(response)]


def _stow_events(lab) -> list[AuditEvent]:
    with session_scope(lab.settings) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == "dicomweb.stow").order_by(AuditEvent.id)))


def accounts_sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


