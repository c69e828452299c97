"""The two ways an instance leaves for a trial's archive: DICOM C-STORE and DICOMweb STOW-RS.

Both senders take a batch of :class:`Outgoing` files and answer, per file, delivered (``""``) or
why not (a short reason with no identifying value); a failure of the whole batch (no
connection, association rejected, credentials refused) raises :class:`ArchiveError`, whose
message names the archive and the fix. Neither touches the database: the use case
(:mod:`services.forwarding`) records what they answer. Neither retries: retries with back-off
are declared on the Prefect task that calls them.

C-STORE sends the file's data set as stored (pynetdicom reads it from the file without decoding
it), so the archive receives the bytes the site sent; the file meta header is the archive's own
(C-STORE does not carry one). STOW-RS sends whole Part-10 files.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("corelab.archive")

MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 odd ids 1..255)
# 0xB000 coercion, 0xB006 elements discarded, 0xB007 data set does not match SOP class: the
# archive kept the object (PS3.4 B.2.3), so it counts as delivered.
WARNING_STATUSES = range(0xB000, 0xC000)
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_HOST = re.compile(r"^[A-Za-z0-9.\-:\[\]]{1,253}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class ArchiveError(RuntimeError):
    """The whole batch could not be delivered; the message names the archive and what to do."""


@dataclass(frozen=True)
class Outgoing:
    """One file to send. ``key`` is the caller's (the delivery record id)."""

    key: int
    path: Path
    sop_class_uid: str
    sop_instance_uid: str


# --- validation: every value from outside, before use ------------------------------------------------

def check_ae_title(value: str, what: str = "AE title") -> str:
    """``value`` stripped, or ValueError naming the rule (1-16 printable ASCII, no backslash)."""
    value = (value or "").strip()
    if not _AE_TITLE.match(value):
        raise ValueError(f"{what} {value!r} is not a DICOM AE title: 1 to 16 printable ASCII characters, "
                         "no backslash")
    return value


def check_host_port(host: str, port) -> tuple[str, int]:
    host = (host or "").strip()
    if not _HOST.match(host):
        raise ValueError(f"archive host {host!r} is not a host name or IP address")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"archive port {port!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"archive port {port} is outside 1-65535")
    return host, port


def check_stow_url(url: str) -> str:
    """A DICOMweb base URL: http(s), a host, no credentials, query or fragment; no trailing slash."""
    url = (url or "").strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"STOW-RS URL {url!r} must be an http:// or https:// URL with a host, e.g. "
                         "https://archive.example.org/dicom-web")
    if parts.username or parts.password:
        raise ValueError("the STOW-RS URL must not carry credentials: give the user with --user and the password "
                         "in a file with --password-file")
    if parts.query or parts.fragment:
        raise ValueError(f"STOW-RS URL {url!r} must not have a query or fragment: give the DICOMweb base URL")
    return url.rstrip("/")


def _check_outgoing(item: Outgoing) -> str:
    """Empty when the file's meta header names the SOP instance and class the index holds."""
    from pydicom.filereader import read_file_meta_info

    if not (_UID.match(item.sop_class_uid) and _UID.match(item.sop_instance_uid)):
        return "the index holds an invalid UID for this instance"
    try:
        meta = read_file_meta_info(item.path)
    except (OSError, ValueError, EOFError) as exc:
        return f"spool file unreadable ({type(exc).__name__}): run `corelab series check`"
    if str(meta.get("MediaStorageSOPInstanceUID", "")) != item.sop_instance_uid:
        return "spool file does not hold the indexed SOP instance"
    return ""


# --- C-STORE ----------------------------------------------------------------------------------------------

def send_cstore(items: Sequence[Outgoing], *, calling_ae: str, called_ae: str, host: str, port: int,
                timeout_s: float = 30.0) -> dict[int, str]:
    """Send ``items`` by C-STORE, one association per group of at most :data:`MAX_CONTEXTS`
    (SOP class, transfer syntax) pairs, each proposed exactly as stored.

    Returns
    -------
    dict
        ``key -> ""`` when the archive answered success or a warning (0xB000 range), else the reason.

    Raises
    ------
    ArchiveError
        No association (refused, rejected, no answer within ``timeout_s``).
    """
    from pydicom.filereader import read_file_meta_info

    calling_ae, called_ae = check_ae_title(calling_ae, "calling AE title"), check_ae_title(called_ae, "called AE title")
    host, port = check_host_port(host, port)
    where = f"C-STORE to {called_ae}@{host}:{port}"
    out: dict[int, str] = {}
    groups: list[list[tuple[Outgoing, tuple[str, str]]]] = [[]]
    contexts: list[set] = [set()]
    for item in items:
        problem = _check_outgoing(item)
        if problem:
            out[item.key] = problem
            continue
        ts = str(read_file_meta_info(item.path).TransferSyntaxUID)
        pair = (item.sop_class_uid, ts)
        if pair not in contexts[-1] and len(contexts[-1]) == MAX_CONTEXTS:
            groups.append([])
            contexts.append(set())
        contexts[-1].add(pair)
        groups[-1].append((item, pair))
    for group, pairs in zip(groups, contexts):
        if group:
            out.update(_one_association(group, sorted(pairs), calling_ae, called_ae, host, port, timeout_s, where))
    return out


def _one_association(group, pairs, calling_ae, called_ae, host, port, timeout_s, where) -> dict[int, str]:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, ts in pairs:  # one context per pair: the archive cannot pick a syntax we would re-encode
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise ArchiveError(f"{where}: association rejected: check that the archive knows calling AE title "
                               f"{calling_ae!r} and that its own AE title is {called_ae!r}")
        raise ArchiveError(f"{where}: no association (connection refused, aborted or no answer within "
                           f"{timeout_s:g} s): check that the archive runs and the host and port")
    out: dict[int, str] = {}
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        for item, pair in group:
            if not assoc.is_established:
                out[item.key] = "association lost before this instance was sent"
                continue
            if pair not in accepted:
                out[item.key] = (f"the archive did not accept SOP class {pair[0]} in transfer syntax {pair[1]}: "
                                 "configure it to store this SOP class")
                continue
            status = assoc.send_c_store(item.path)
            code = getattr(status, "Status", None)
            if code is None:
                out[item.key] = f"no response within {timeout_s:g} s or connection lost"
            elif code == 0x0000 or code in WARNING_STATUSES:
                out[item.key] = ""
            else:
                out[item.key] = f"the archive answered C-STORE status 0x{int(code):04X}"
    finally:
        if assoc.is_established:
            assoc.release()
    return out


# --- STOW-RS ------------------------------------------------------------------------------------------------

def send_stow(items: Sequence[Outgoing], *, url: str, username: str = "", password: str = "",
              timeout_s: float = 30.0) -> dict[int, str]:
    """Send ``items`` in one STOW-RS request with ``dicomweb_client`` (HTTP Basic auth through a
    ``requests.Session`` when ``username`` is given) and read the response's sequences.

    Returns
    -------
    dict
        ``key -> ""`` for an instance in the ReferencedSOPSequence and not in the FailedSOPSequence,
        else the reason (the FailureReason code, or not acknowledged).

    Raises
    ------
    ArchiveError
        No connection, a time-out, credentials refused (401/403), or any other HTTP error
        without a STOW-RS response body.
    """
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    url = check_stow_url(url)
    where = f"STOW-RS to {url}"
    out: dict[int, str] = {}
    datasets, sent = [], []
    for item in items:
        problem = _check_outgoing(item)
        if problem:
            out[item.key] = problem
            continue
        datasets.append(pydicom.dcmread(item.path))
        sent.append(item)
    if not datasets:
        return out
    session = requests.Session()
    if username:
        session.auth = (username, password)
    client = DICOMwebClient(url, session=session, timeout=(min(timeout_s, 10.0), timeout_s))
    client.set_http_retry_params(retry=False)  # retries belong to the Prefect task, with back-off
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        response = _response_body(exc.response)
        code = exc.response.status_code if exc.response is not None else 0
        if code in (401, 403):
            raise ArchiveError(f"{where}: HTTP {code}: the archive refused the credentials of user {username!r}: "
                               "check --user and the password file, then run `corelab archive set` again") from None
        if response is None:
            raise ArchiveError(f"{where}: HTTP {code} without a STOW-RS response: check the URL "
                               "(the DICOMweb base, e.g. .../dicom-web)") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise ArchiveError(f"{where}: no connection or no answer within {timeout_s:g} s "
                           f"({type(exc).__name__}): check that the archive runs and the URL") from None
    finally:
        session.close()
    referenced = {str(x.get("ReferencedSOPInstanceUID", "")) for x in response.get("ReferencedSOPSequence", [])}
    failed = {str(x.get("ReferencedSOPInstanceUID", "")): x.get("FailureReason")
              for x in response.get("FailedSOPSequence", [])}
    for item in sent:
        if item.sop_instance_uid in failed:
            reason = failed[item.sop_instance_uid]
            out[item.key] = f"the archive refused it: FailureReason 0x{int(reason):04X}" if reason is not None \
                else "the archive refused it (no FailureReason given)"
        elif item.sop_instance_uid in referenced:
            out[item.key] = ""
        else:
            out[item.key] = "not acknowledged in the STOW-RS response"
    return out


def _response_body(response):
    """The STOW-RS response data set of an HTTP error (409 Conflict, 202 ...), or None."""
    import pydicom

    if response is None or not response.content:
        return None
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip()
    if ctype not in ("application/dicom+json", "application/json"):
        return None
    try:
        return pydicom.Dataset.from_json(response.content)
    except (ValueError, TypeError, KeyError):
        return None


__all__ = ["ArchiveError", "MAX_CONTEXTS", "Outgoing", "check_ae_title", "check_host_port", "check_stow_url",
           "send_cstore", "send_stow"]
