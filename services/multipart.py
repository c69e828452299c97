"""The multipart/related body of a STOW-RS request (RFC 2046, DICOM PS3.18 8.6.1.2), parsed as it
arrives, one file per part: no whole body, and no whole part, in memory.

:func:`boundary_of` checks the request's Content-Type (``multipart/related;
type="application/dicom"; boundary=...``) or raises :class:`StowError` 415 saying what to send.
:class:`MultipartStager` takes the body chunk by chunk and writes each part to its own file in a
staging folder (:mod:`services.stow_staging`); it counts every byte against the per-part
(``max_object_bytes``), per-request (``dicomweb_max_request_bytes``) and part-count
(``dicomweb_max_parts``) limits (413), and :meth:`MultipartStager.close` raises 400 unless the
closing delimiter arrived: a truncated body stores nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# RFC 2046 5.1.1: 1-70 characters, the last not a space.
BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_PARAM_RE = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;"\s]*)\s*')
MAX_PART_HEADER_BYTES = 16 * 1024   # one part's header block
PREAMBLE = b"\0" * 128 + b"DICM"     # PS3.10 7.1: what precedes the File Meta Information
HEAD_BYTES = len(PREAMBLE)          # enough of a part to tell whether it has its preamble


class StowError(Exception):
    """A request this server cannot take as a whole: ``status``, a message saying what to send,
    and ``headers`` for the answer (Retry-After on 503)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, dict(headers or {})


def lacks_preamble(head: bytes) -> bool:
    """Whether a part starts with its File Meta Information group (0002) but no preamble and
    ``DICM``: a tag (0002,xxxx) in little endian and an explicit VR of two capital letters."""
    head = bytes(head)
    return head[128:132] != b"DICM" and head[:2] == b"\x02\x00" and head[4:6].isalpha() and head[4:6].isupper()


# --- the request's media type ---------------------------------------------------------------------

def boundary_of(content_type: str | None) -> str:
    """The multipart boundary of a STOW-RS request's Content-Type, or :class:`StowError` 415.

    Accepted: ``multipart/related; type="application/dicom"; boundary=B`` (parameters in any
    order, ``type`` quoted or not, names case-insensitive), B a boundary as RFC 2046 defines it.
    """
    want = ('send Content-Type: multipart/related; type="application/dicom"; boundary=<1-70 characters of '
            "RFC 2046>, one DICOM PS3.10 object per part")
    value = (content_type or "").strip()
    media, _, rest = value.partition(";")
    if media.strip().lower() != "multipart/related":
        raise StowError(415, f"this is not a multipart/related request: {want}")
    params: dict[str, str] = {}
    rest = ";" + rest if rest else ""
    pos = 0
    while pos < len(rest):
        found = _PARAM_RE.match(rest, pos)
        if found is None:
            raise StowError(415, f"the Content-Type's parameters cannot be read: {want}")
        name, raw = found.group(1).lower(), found.group(2)
        if name in params:
            raise StowError(415, f"the Content-Type names {name!r} twice: {want}")
        params[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        pos = found.end()
    if params.get("type", "").lower() != "application/dicom":
        raise StowError(415, "only parts of type application/dicom are accepted (no metadata and bulk data "
                             f"requests): {want}")
    boundary = params.get("boundary", "")
    if not BOUNDARY_RE.fullmatch(boundary):
        raise StowError(415, f"the multipart boundary is missing or not valid per RFC 2046: {want}")
    return boundary


# --- the body, part by part -----------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One staged part: its number in the request (1, 2, ...), file, media type and size."""

    ordinal: int
    path: Path
    media_type: str
    size: int
    preamble_added: bool = False


class MultipartStager:
    """Parse a multipart body incrementally (RFC 2046), one file per part under ``folder``.

    Feed it the body's chunks in order (:meth:`feed`), then :meth:`close`. Memory: the chunk
    being parsed plus at most one delimiter (or one part's headers, :data:`MAX_PART_HEADER_BYTES`)
    and a part's first :data:`HEAD_BYTES`. It writes files: a caller on an event loop feeds it in a
    worker thread.

    A part that starts with its File Meta Information but lacks the 128-byte preamble and
    ``DICM`` gets them while it is written (``Part.preamble_added``): pydicom, and so
    dicomweb-client, writes a dataset built in memory that way, and its file meta still names
    the transfer syntax, so nothing is guessed. Anything else is written as sent, for ingest to
    judge. ``max_part_bytes`` counts the bytes written.
    """

    def __init__(self, folder: Path, boundary: str, *, max_part_bytes: int, max_request_bytes: int,
                 max_parts: int):
        self.folder, self.max_part_bytes, self.max_request_bytes = folder, max_part_bytes, max_request_bytes
        self.max_parts = max_parts
        self._head: bytearray | None = None  # a part's first bytes, until it is known whether it has a preamble
        self.delimiter = b"\r\n--" + boundary.encode("ascii")
        # The first delimiter may open the body without a CRLF before it: pretend there was one.
        self._buf = bytearray(b"\r\n")
        self._state = "preamble"  # preamble | boundary_line | headers | body | done
        self._file = None
        self._part_size = 0
        self.received = 0
        self.parts: list[Part] = []

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_request_bytes:
            raise StowError(413, f"the request is over the limit of {self.max_request_bytes} bytes "
                                 "(CORELAB_DICOMWEB_MAX_REQUEST_BYTES): nothing was stored; send the study in "
                                 "several requests")
        if self._state == "done":
            return  # the epilogue: ignored
        self._buf += chunk
        while self._step():
            pass

    def _step(self) -> bool:
        """One parser transition; False when more bytes are needed."""
        buf, keep = self._buf, len(self.delimiter) - 1
        if self._state in ("preamble", "body"):
            at = buf.find(self.delimiter)
            end = at if at >= 0 else max(0, len(buf) - keep)
            if self._state == "body":
                self._write(end)
            del buf[:end]
            if at < 0:
                return False
            del buf[:len(self.delimiter)]
            self._end_part()
            self._state = "boundary_line"
            return True
        if self._state == "boundary_line":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "done"
                buf.clear()
                return False
            eol = buf.find(b"\r\n")
            if eol < 0 or buf[:eol].strip(b" \t"):
                if eol >= 0 or len(buf) > 256:
                    raise StowError(400, "a line starting with the boundary delimiter is not a boundary (the "
                                         "boundary occurs inside a part, or the body is malformed): nothing "
                                         "was stored; use a boundary that occurs in no part")
                return False
            del buf[:eol + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            end = 0 if buf[:2] == b"\r\n" else buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_PART_HEADER_BYTES:
                    raise StowError(400, f"part #{len(self.parts) + 1}: its headers are longer than "
                                         f"{MAX_PART_HEADER_BYTES} bytes: nothing was stored")
                return False
            media = _part_media_type(bytes(buf[:end]), len(self.parts) + 1)
            del buf[:end + (2 if end == 0 else 4)]
            self._start_part(media)
            self._state = "body"
            return True
        return False

    def _start_part(self, media_type: str) -> None:
        ordinal = len(self.parts) + 1
        if ordinal > self.max_parts:
            raise StowError(413, f"more than {self.max_parts} parts in one request (CORELAB_DICOMWEB_MAX_PARTS): "
                                 "nothing was stored; send the study in several requests")
        path = self.folder / f"{ordinal:06d}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._part_size, self._head, self._preamble = 0, bytearray(), False
        self.parts.append(Part(ordinal, path, media_type, 0))

    def _write(self, n: int) -> None:
        if n <= 0:
            return
        with memoryview(self._buf) as view:
            if self._head is None:
                self._emit(view[:n])
                return
            self._head += view[:n]
        if len(self._head) >= HEAD_BYTES:
            self._flush_head()

    def _flush_head(self) -> None:
        head, self._head = self._head, None
        self._preamble = lacks_preamble(head)
        if self._preamble:
            self._emit(PREAMBLE)
        self._emit(head)

    def _emit(self, data) -> None:
        self._part_size += len(data)
        if self._part_size > self.max_part_bytes:
            raise StowError(413, f"part #{len(self.parts)} is over the limit of {self.max_part_bytes} bytes per "
                                 "object (CORELAB_MAX_OBJECT_BYTES): nothing was stored; send one image per "
                                 "object or ask the core lab to raise the limit")
        self._file.write(data)

    def _end_part(self) -> None:
        if self._file is not None:
            if self._head is not None:
                self._flush_head()
            self._file.close()
            self._file = None
            last = self.parts[-1]
            self.parts[-1] = Part(last.ordinal, last.path, last.media_type, self._part_size, self._preamble)

    def abort(self) -> None:
        """Close the part being written (the caller then removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[Part]:
        """The staged parts, once the closing delimiter arrived; else :class:`StowError` 400."""
        self.abort()
        if self._state != "done":
            raise StowError(400, "the body ended before its closing boundary (truncated, or the client hung up): "
                                 "nothing was stored; send the whole request again")
        if not self.parts:
            raise StowError(400, "the request holds no part: nothing was stored; send one DICOM object per part")
        return self.parts


def _part_media_type(block: bytes, ordinal: int) -> str:
    """The part's Content-Type media type, lower case ("" when absent); other headers are ignored."""
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise StowError(400, f"part #{ordinal}: its headers are not ASCII: nothing was stored") from None
    media = ""
    for line in text.split("\r\n") if text else ():
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise StowError(400, f"part #{ordinal}: a header line is malformed: nothing was stored")
        if name.lower() == "content-type":
            media = value.split(";", 1)[0].strip().lower()
    return media




__all__ = ["HEAD_BYTES", "MultipartStager", "PREAMBLE", "Part", "StowError", "boundary_of", "lacks_preamble"]
