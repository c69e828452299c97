"""Resumable zip uploads from the browser: create, send chunks in order, ask the offset, finish.

A site user's browser sends a zip of DICOM files in pieces, so a large study survives a dropped
connection: the upload is created with its total size, each chunk says where it belongs
(``Content-Range: bytes a-b/total``) and is streamed to disk, and a chunk that does not start at
the current offset is refused with that offset, so the client resends from there. When every
byte is in, :func:`services.upload_finish.start_finish` ingests the zip in the background as that
site through the file drop (:func:`services.intake.ingest_drop`, with its hostile-input limits) and
audits it; the caller polls :func:`upload_state` until the summary is there.

Layout: ``<data dir>/uploads/<SITE>/<id>.part`` (the bytes so far), ``<id>.json`` (total size,
user, creation time), ``<id>.ingest.json`` (while the ingest runs, or why it
failed), ``<id>.done.json`` (the summary, so a repeated finish answers the same and ingests
nothing twice). Folders are 0700, files 0600. Ids are random (``secrets.token_urlsafe``)
and looked up under the caller's site only: another site's id is not found. Uploads without
activity for :data:`STALE_AFTER_S` are removed by the sweep every create runs.

Disk space is promised, not hoped for: a create needs the zip's size, plus the bytes every other
open upload (of any site) has still to send, plus :data:`DISK_MARGIN_BYTES` free; each chunk
checks again (the spool or anything else may have filled the disk since) and is refused with 507,
keeping nothing of it.

The zip's own name is checked (a ``.zip``) and then forgotten: a file name may carry a patient's
name, and nothing of it is stored, logged or shown.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from corelab.settings import Settings
from corelab.validate import safe_join

MAX_ZIP_BYTES = 8 * 2**30
"""Largest zip one upload may announce (8 GiB: a whole PET/CT study with room to spare; each object
inside still meets ``CORELAB_MAX_OBJECT_BYTES`` and the zip limits of the file drop)."""
MAX_CHUNK_BYTES = 64 * 2**20
"""Largest chunk one PUT may carry; the page sends :data:`CHUNK_BYTES`."""
CHUNK_BYTES = 8 * 2**20
"""Chunk size the page uses: a lost chunk costs at most 8 MiB of resending."""
MAX_OPEN_UPLOADS = 8
"""Unfinished uploads one site may hold at once (each reserves disk until finished or swept)."""
MAX_SITE_RESERVED_BYTES = 2 * MAX_ZIP_BYTES
"""Bytes one site's unfinished uploads may still have to send, all together (the disk is shared)."""
STALE_AFTER_S = 24 * 3600.0
"""An upload with no chunk for this long is removed (with its bytes) by the next create's sweep."""
DISK_MARGIN_BYTES = 1 * 2**30
"""Free space left on the data directory's disk beyond what open uploads still have to send, for
the spool (checked at each create and each chunk)."""

_ID = re.compile(r"^[A-Za-z0-9_-]{32,64}$")
_RANGE = re.compile(r"^bytes (\d{1,15})-(\d{1,15})/(\d{1,15})$")
_FILE = 0o600


class UploadError(Exception):
    """A request about an upload that cannot be served: ``status`` is the HTTP status to answer,
    the message says what is wrong and what to do; ``offset`` the bytes held so far, when known."""

    def __init__(self, status: int, message: str, *, offset: int | None = None):
        super().__init__(message)
        self.status, self.message, self.offset = status, message, offset


@dataclass(frozen=True)
class UploadState:
    """Where one upload stands: ``offset`` bytes of ``total`` held; ``state`` is ``receiving``,
    ``ingesting``, ``failed`` (``detail`` says why and what to do) or ``finished`` (``summary``)."""

    upload_id: str
    site: str
    total: int
    offset: int
    finished: bool = False
    state: str = "receiving"
    detail: str | None = None
    summary: dict | None = None

    def as_dict(self) -> dict:
        body = {"upload": self.upload_id, "site": self.site, "total": self.total, "offset": self.offset,
                "finished": self.finished, "state": self.state, "url": f"/upload/zip/{self.upload_id}"}
        if self.detail:
            body["detail"] = self.detail
        if self.summary is not None:
            body["summary"] = self.summary
        return body


# --- where uploads live -------------------------------------------------------------------------------

def uploads_dir(settings: Settings) -> Path:
    return settings.data_dir / "uploads"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask, and an existing folder keeps its own
    return path


def _site_dir(settings: Settings, site: str) -> Path:
    _private_dir(uploads_dir(settings))
    return _private_dir(safe_join(uploads_dir(settings), site))


def ingest_marker(part: Path) -> Path:
    """The file saying an upload's ingest is running (or why it failed), beside its bytes."""
    return part.with_name(part.name.removesuffix(".part") + ".ingest.json")


def write_private_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` (0600) whole or not at all: a poll reading it meanwhile sees the
    old content or the new, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), _FILE)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _paths(settings: Settings, site: str, upload_id: str) -> tuple[Path, Path, Path]:
    """(bytes, metadata, summary) of an upload; a malformed id is simply not found."""
    if not isinstance(upload_id, str) or not _ID.match(upload_id):
        raise UploadError(404, "no such upload, or not yours: start the upload again")
    folder = _site_dir(settings, site)
    return (safe_join(folder, f"{upload_id}.part"), safe_join(folder, f"{upload_id}.json"),
            safe_join(folder, f"{upload_id}.done.json"))


def _meta(settings: Settings, site: str, upload_id: str) -> tuple[Path, dict, Path]:
    part, meta, done = _paths(settings, site, upload_id)
    if done.exists():
        return part, json.loads(done.read_text()), done
    if not meta.exists() or not part.exists():
        raise UploadError(404, "no such upload, or not yours (unfinished uploads are removed after a day): "
                               "start the upload again")
    return part, json.loads(meta.read_text()), done


def lock_upload(path: Path) -> int:
    """Take the upload's lock (one chunk or ingest at a time; a retry racing its own first try is
    told to wait, not allowed to write the same bytes twice); returns the open file descriptor
    holding it: closing it releases the lock, whichever thread closes it."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UploadError(409, "another request for this upload is still running: wait for it, ask the "
                               "offset and go on from there") from None
    return fd


@contextlib.contextmanager
def _locked(path: Path):
    fd = lock_upload(path)
    try:
        yield fd
    finally:
        os.close(fd)


# --- create, sweep, offset -----------------------------------------------------------------------------

def check_zip_name(name: str) -> None:
    """The client's file name must name a zip; it is not kept (it may carry a patient's name)."""
    if not isinstance(name, str) or not name.strip() or len(name) > 255 or any(ord(c) < 32 for c in name):
        raise UploadError(422, "the zip's name is missing, longer than 255 characters or has control "
                               "characters: choose the .zip file again")
    if not name.lower().endswith(".zip"):
        raise UploadError(415, "only a .zip archive is taken here; send single DICOM files or a folder "
                               "with the 'Folder or files' form of the upload page (STOW-RS)")


def _busy(part: Path) -> bool:
    """Whether a request holds the upload's lock (a finish still ingesting an old upload)."""
    try:
        with _locked(part):
            return False
    except UploadError:
        return True
    except OSError:  # gone (only its summary is left) or not a plain file: nothing holds it
        return False


def sweep_stale(settings: Settings, *, now: float | None = None) -> int:
    """Remove uploads (every site's) with no activity for :data:`STALE_AFTER_S`; returns how many.

    Cheap: one directory listing per site. An upload whose lock is held (a chunk arriving) is left.
    """
    root = uploads_dir(settings)
    if not root.is_dir():
        return 0
    cutoff = (now if now is not None else time.time()) - STALE_AFTER_S
    removed = 0
    for site_dir in (p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        newest: dict[str, float] = {}
        for f in site_dir.iterdir():
            upload_id = f.name.split(".", 1)[0]
            newest[upload_id] = max(newest.get(upload_id, 0.0), f.lstat().st_mtime)
        for upload_id, mtime in newest.items():
            if mtime >= cutoff or not _ID.match(upload_id) or _busy(site_dir / f"{upload_id}.part"):
                continue
            for f in site_dir.glob(f"{upload_id}.*"):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            removed += 1
    return removed


def _open_uploads(settings: Settings):
    """(site, id, total, held) of every unfinished upload, all sites (finished ones hold no meta)."""
    root = uploads_dir(settings)
    if not root.is_dir():
        return
    for site_dir in (p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for meta in site_dir.glob("*.json"):
            upload_id, _dot, rest = meta.name.partition(".")
            if rest != "json" or not _ID.match(upload_id):
                continue
            try:
                total = int(json.loads(meta.read_text())["total"])
                held = (site_dir / f"{upload_id}.part").stat().st_size
            except (OSError, ValueError, KeyError, TypeError):  # finished or removed meanwhile
                continue
            yield site_dir.name, upload_id, total, held


def reserved_bytes(settings: Settings, *, besides: str | None = None) -> int:
    """Bytes every open upload (all sites; but ``besides``) has announced and not yet sent."""
    return sum(max(total - held, 0) for _site, upload_id, total, held in _open_uploads(settings)
               if upload_id != besides)


@contextlib.contextmanager
def _creating(settings: Settings):
    """One create at a time (across processes): two creates must not both count on the same space."""
    fd = os.open(_private_dir(uploads_dir(settings)) / ".create.lock",
                 os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), _FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_upload(settings: Settings, site: str, *, name: str, total: int, user: str) -> UploadState:
    """Announce a zip of ``total`` bytes for ``site`` (a site the caller may send for, checked by
    the caller); returns the new upload at offset 0."""
    check_zip_name(name)
    if not isinstance(total, int) or total < 1:
        raise UploadError(422, f"the zip's size must be a positive number of bytes (got {total!r})")
    if total > MAX_ZIP_BYTES:
        raise UploadError(413, f"the zip is {total} bytes, over the limit of {MAX_ZIP_BYTES} bytes per upload: "
                               "split the study into several zips, or send it as files (STOW-RS)")
    sweep_stale(settings)
    folder = _site_dir(settings, site)
    with _creating(settings):  # counted under the lock: two creates cannot both take the last place
        open_ids = {f.name.split(".", 1)[0] for f in folder.glob("*.json") if not f.name.endswith(".done.json")}
        open_ids -= {f.name.split(".", 1)[0] for f in folder.glob("*.done.json")}
        if len(open_ids) >= MAX_OPEN_UPLOADS:
            raise UploadError(429, f"site {site} has {len(open_ids)} unfinished uploads, the most allowed at once is "
                                   f"{MAX_OPEN_UPLOADS}: finish or resume those first (unused ones are removed after "
                                   "a day)")
        own = sum(max(total_ - held, 0) for code, _id, total_, held in _open_uploads(settings) if code == site)
        if own + total > MAX_SITE_RESERVED_BYTES:
            # One site must not take the disk space every site's uploads share by announcing zips it never sends.
            raise UploadError(429, f"site {site}'s unfinished uploads still have {own} bytes to send; with this zip "
                                   f"of {total} bytes that is over {MAX_SITE_RESERVED_BYTES} bytes per site: finish or "
                                   "resume those first (unused ones are removed after a day)")
        free = shutil.disk_usage(folder).free
        if free < reserved_bytes(settings) + total + DISK_MARGIN_BYTES:
            # (other sites' uploads are not described: a site learns nothing of another's)
            raise UploadError(507, f"the core lab's disk has {free} bytes free, too little for a zip of {total} bytes "
                                   "next to the uploads in progress and the spool: try later or tell the core lab")
        upload_id = secrets.token_urlsafe(24)
        part, meta, _done = _paths(settings, site, upload_id)
        os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), _FILE))
        fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), _FILE)
        with os.fdopen(fd, "w") as fh:
            json.dump({"total": total, "user": user, "created": time.time()}, fh)
    return UploadState(upload_id, site, total, 0)


def upload_state(settings: Settings, site: str, upload_id: str) -> UploadState:
    """The upload's offset (bytes durably held), total and state (with the summary once
    finished); 404 for an unknown or another site's id."""
    part, info, done = _meta(settings, site, upload_id)
    if done.exists():
        return UploadState(upload_id, site, info["total"], info["total"], finished=True, state="finished",
                           summary=info)
    try:
        held = part.stat().st_size
        ingest = json.loads(ingest_marker(part).read_text())
    except FileNotFoundError:  # no ingest started, or one ended between the looks (its summary is there)
        if done.exists() or not part.exists():
            return upload_state(settings, site, upload_id)
        return UploadState(upload_id, site, info["total"], part.stat().st_size)
    if ingest.get("state") == "ingesting" and not _busy(part):  # its thread is gone (the portal restarted)
        if done.exists():  # no: it ended between the two looks
            return upload_state(settings, site, upload_id)
        ingest = {"state": "failed", "detail": "the check of the zip was interrupted (the core lab restarted): "
                                               "finish again"}
    return UploadState(upload_id, site, info["total"], held, state=ingest.get("state", "failed"),
                       detail=ingest.get("detail"))


# --- chunks ---------------------------------------------------------------------------------------------

def parse_content_range(header: str | None, total: int) -> tuple[int, int]:
    """``bytes a-b/total`` -> (a, b + 1); 416 for a missing, malformed or unsatisfiable range."""
    found = _RANGE.match(header or "")
    if not found:
        raise UploadError(416, "each chunk needs a header 'Content-Range: bytes FIRST-LAST/TOTAL' (byte positions, "
                               "LAST included)")
    first, last, declared = (int(g) for g in found.groups())
    if declared != total:
        raise UploadError(416, f"Content-Range says the zip is {declared} bytes, but the upload was created for "
                               f"{total}: create a new upload for a different file")
    if last < first or last >= total:
        raise UploadError(416, f"Content-Range bytes {first}-{last} is not within 0-{total - 1}")
    if last - first + 1 > MAX_CHUNK_BYTES:
        raise UploadError(413, f"a chunk of {last - first + 1} bytes is over the limit of {MAX_CHUNK_BYTES} bytes: "
                               "send smaller chunks")
    return first, last + 1


class ChunkWriter:
    """Appends one chunk to an upload, holding its lock; nothing of a chunk that does not arrive
    whole is kept (the part file is cut back to where the chunk started).

    Use as a context manager: ``write`` each piece as it arrives, then ``commit`` (fsync; the
    new offset counts only then). Leaving without ``commit`` discards the chunk.
    """

    def __init__(self, settings: Settings, site: str, upload_id: str, content_range: str | None,
                 content_length: str | None):
        self.part, info, done = _meta(settings, site, upload_id)
        self.settings, self.upload_id, self.site, self.total = settings, upload_id, site, int(info["total"])
        if done.exists():
            raise UploadError(409, "this upload is finished; nothing more can be added", offset=self.total)
        self.start, self.end = parse_content_range(content_range, self.total)
        if content_length is not None and content_length.strip() != str(self.end - self.start):
            raise UploadError(400, f"Content-Length {content_length[:20]!r} does not match Content-Range "
                                   f"({self.end - self.start} bytes)")
        self._lock = _locked(self.part)
        self._fd: int | None = None
        self.written = 0
        self.committed = False

    def __enter__(self) -> ChunkWriter:
        self._fd = self._lock.__enter__()
        offset = os.fstat(self._fd).st_size
        if self.start != offset:
            self._lock.__exit__(None, None, None)
            what = "overlaps bytes already held" if self.start < offset else "leaves a gap"
            raise UploadError(409, f"the chunk starts at byte {self.start} and {what}: the upload holds {offset} "
                                   f"bytes, send from byte {offset}", offset=offset)
        need = (self.end - self.start) + reserved_bytes(self.settings, besides=self.upload_id) + DISK_MARGIN_BYTES
        free = shutil.disk_usage(self.part).free
        if free < need:  # the disk filled since the create (the spool, anything): refuse before writing
            self._lock.__exit__(None, None, None)
            raise UploadError(507, f"the core lab's disk has {free} bytes free, too little for this chunk next to the "
                                   f"uploads in progress and the spool: nothing of it was kept, the upload holds "
                                   f"{offset} bytes; send from there later, or tell the core lab", offset=offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        return self

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.end - self.start:
            raise UploadError(400, f"the chunk is longer than its Content-Range ({self.end - self.start} bytes)",
                              offset=self.start)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.written += len(data)

    def commit(self) -> UploadState:
        if self.written != self.end - self.start:
            raise UploadError(400, f"the chunk holds {self.written} bytes but its Content-Range "
                                   f"{self.end - self.start}: send it again", offset=self.start)
        os.fsync(self._fd)  # the offset a client is told is on disk, whatever happens next
        self.committed = True
        return UploadState(self.upload_id, self.site, self.total, self.end)

    def __exit__(self, *exc) -> None:
        try:
            if not self.committed:
                os.ftruncate(self._fd, self.start)
        finally:
            self._lock.__exit__(None, None, None)


__all__ = ["CHUNK_BYTES", "ChunkWriter", "DISK_MARGIN_BYTES", "MAX_CHUNK_BYTES", "MAX_OPEN_UPLOADS", "MAX_ZIP_BYTES",
           "STALE_AFTER_S", "UploadError", "UploadState", "check_zip_name", "create_upload", "ingest_marker",
           "lock_upload", "parse_content_range", "reserved_bytes", "sweep_stale", "upload_state", "uploads_dir",
           "write_private_json"]
