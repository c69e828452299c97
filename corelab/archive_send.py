"""The two ways an instance leaves for a trial's archive: DICOM C-STORE and DICOMweb STOW-RS.

Both senders take a batch of :class:`Outgoing` files and answer, per file, delivered (``""``) or
why not (a short reason with no identifying value); a failure of the whole batch (no
connection, association rejected, credentials refused) raises :class:`ArchiveError`, whose
message names the archive and the fix. Neither touches the database: the use case
(:mod:`services.forwarding`) records what they answer. Neither retries: retries with back-off
are declared on the Prefect task that calls them.

C-STORE sends the file's data set as stored (pynetdicom reads it from the file without decoding
it), so the archive receives the bytes the site sent; the file meta header is the archive's own
(C-STORE does not carry one). STOW-RS sends whole Part-10 files, streamed from the spool into
the request body (no batch is ever held in memory), and reads the archive's DICOM JSON answer
itself: ``dicomweb-client`` builds the whole body in memory, so it stays a test client.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("corelab.archive")

CHUNK_BYTES = 1 << 20  # what one read of a spool file puts in memory while a STOW-RS body streams
MAX_RESPONSE_BYTES = 16 << 20  # a STOW-RS answer lists UIDs: far less, even for a large batch
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
    from pynetdicom import AE, _config

    # Send each file's data set as stored, read in pieces, instead of decoding and re-encoding it
    # in memory (pynetdicom's default): the archive gets the site's bytes, memory stays bounded.
    # Only sending (send_c_store with a path) reads this flag; the node's SCP side does not.
    _config.STORE_SEND_CHUNKED_DATASET = True

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

class MultipartBody:
    """A ``multipart/related; type="application/dicom"`` body streamed from files.

    ``requests`` iterates it (chunks of :data:`CHUNK_BYTES`) and takes its length from
    ``len()``, so the request carries a Content-Length rather than chunked encoding (which some
    archives refuse) and never more than one chunk is in memory. A file whose size changed since
    the body was built raises OSError: the request is then broken off, never sent short.
    """

    def __init__(self, paths: Sequence[Path], boundary: str | None = None) -> None:
        self.boundary = boundary or f"corelab-{secrets.token_hex(16)}"
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._end = f"--{self.boundary}--\r\n".encode()
        self.parts = [(Path(p), Path(p).stat().st_size) for p in paths]
        self.length = sum(len(self._head) + size + 2 for _, size in self.parts) + len(self._end)

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for path, size in self.parts:
            yield self._head
            seen = 0
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK_BYTES):
                    seen += len(chunk)
                    if seen > size:
                        break
                    yield chunk
            if seen != size:
                raise OSError("a spool file changed size while it was being sent: run `corelab series check`")
            yield b"\r\n"
        yield self._end


def check_credentials_transport(url: str, username: str) -> None:
    """ValueError when HTTP Basic credentials would cross the network unencrypted: ``http://``
    with a user is allowed on the loopback interface only (127.0.0.1, ::1, localhost)."""
    parts = urllib.parse.urlsplit(url)
    if not username or parts.scheme != "http":
        return
    host = (parts.hostname or "").lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"STOW-RS URL {url!r} is plain http: the archive password would cross the network "
                         "unencrypted: use https://")


def send_stow(items: Sequence[Outgoing], *, url: str, username: str = "", password: str = "",
              timeout_s: float = 30.0) -> dict[int, str]:
    """Send ``items`` in one STOW-RS request whose body is streamed from the files
    (:class:`MultipartBody`), with HTTP Basic auth when ``username`` is given, and read the
    response's sequences (PS3.18 10.5.3, application/dicom+json) here.

    Returns
    -------
    dict
        ``key -> ""`` for an instance in the ReferencedSOPSequence and not in the FailedSOPSequence,
        else the reason (the FailureReason code, or not acknowledged).

    Raises
    ------
    ArchiveError
        No connection, a time-out, credentials refused (401/403), plain http with credentials to
        another host than loopback, or an HTTP answer that is not a STOW-RS response.
    """
    import requests

    url = check_stow_url(url)
    where = f"STOW-RS to {url}"
    try:
        check_credentials_transport(url, username)
    except ValueError as exc:
        raise ArchiveError(f"{where}: {exc}") from None
    out: dict[int, str] = {}
    sent = []
    for item in items:
        problem = _check_outgoing(item)
        if problem:
            out[item.key] = problem
        else:
            sent.append(item)
    if not sent:
        return out
    body = MultipartBody([item.path for item in sent])
    session = requests.Session()
    if username:
        session.auth = (username, password)
    try:
        response = session.post(f"{url}/studies", data=body, stream=True, timeout=(min(timeout_s, 10.0), timeout_s),
                                headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"})
        try:
            code = response.status_code
            if code in (401, 403):
                raise ArchiveError(f"{where}: HTTP {code}: the archive refused the credentials of user "
                                   f"{username!r}: check --user and the password file, then run "
                                   "`corelab archive set` again")
            answer = _stow_answer(response, where) if code in (200, 202, 409) else None
            if answer is None:
                raise ArchiveError(f"{where}: HTTP {code} without a STOW-RS response: check the URL "
                                   "(the DICOMweb base, e.g. .../dicom-web)")
        finally:
            response.close()
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise ArchiveError(f"{where}: no connection or no answer within {timeout_s:g} s "
                           f"({type(exc).__name__}): check that the archive runs and the URL") from None
    finally:
        session.close()
    referenced, failed = answer
    for item in sent:
        if item.sop_instance_uid in failed:
            reason = failed[item.sop_instance_uid]
            out[item.key] = f"the archive refused it: FailureReason 0x{reason:04X}" if reason is not None \
                else "the archive refused it (no FailureReason given)"
        elif item.sop_instance_uid in referenced:
            out[item.key] = ""
        else:
            out[item.key] = "not acknowledged in the STOW-RS response"
    return out


def _stow_answer(response, where: str) -> tuple[set[str], dict[str, int | None]] | None:
    """(referenced SOP Instance UIDs, failed UID -> FailureReason) of a STOW-RS response in DICOM
    JSON, read up to :data:`MAX_RESPONSE_BYTES`; None when the body is not one."""
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype not in ("application/dicom+json", "application/json"):
        return None
    raw = response.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
    if len(raw) > MAX_RESPONSE_BYTES:
        raise ArchiveError(f"{where}: the STOW-RS response is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if isinstance(data, list) and len(data) == 1:  # some archives wrap the one data set in an array
        data = data[0]
    if not isinstance(data, dict):
        return None

    def items(tag: str) -> list[dict]:
        element = data.get(tag)
        values = element.get("Value", []) if isinstance(element, dict) else []
        return [x for x in values if isinstance(x, dict)] if isinstance(values, list) else []

    def first(item: dict, tag: str):
        element = item.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return values[0] if isinstance(values, list) and values else None

    referenced = {uid for uid in (first(x, "00081155") for x in items("00081199")) if isinstance(uid, str)}
    failed: dict[str, int | None] = {}
    for x in items("00081198"):
        uid, reason = first(x, "00081155"), first(x, "00081197")
        if isinstance(uid, str):
            failed[uid] = reason if isinstance(reason, int) and 0 <= reason <= 0xFFFF else None
    return referenced, failed


__all__ = ["ArchiveError", "MAX_CONTEXTS", "MultipartBody", "Outgoing", "check_ae_title", "check_credentials_transport",
           "check_host_port", "check_stow_url", "send_cstore", "send_stow"]
