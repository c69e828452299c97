"""Resumable zip uploads from the browser: create, send chunks in order, ask the offset, finish.

A site user's browser sends a zip of DICOM files in pieces, so a large study survives a dropped
connection: the upload is created with its total size, each chunk says where it belongs
(``Content-Range: bytes a-b/total``) and is streamed to disk, and a chunk that does not start at
the current offset is refused with that offset, so the client resends from there. When every
byte is in, :func:`finish_upload` ingests the zip as that site through the file drop
(:func:`services.intake.ingest_drop`, with its hostile-input limits) and audits it.

Layout: ``<data dir>/uploads/<SITE>/<id>.part`` (the bytes so far), ``<id>.json`` (total size,
user, creation time), ``<id>.done.json`` (the summary, so a repeated finish answers the same and
ingests nothing twice). Folders are 0700, files 0600. Ids are random (``secrets.token_urlsafe``)
and looked up under the caller's site only: another site's id is not found. Uploads without
activity for :data:`STALE_AFTER_S` are removed by the sweep every create runs.

The zip's own name is checked (a ``.zip``) and then forgotten: a file name may carry a patient's
name, and nothing of it is stored, logged or shown.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from corelab import audit
from corelab.db import transaction
from corelab.models import Series, Site
from corelab.settings import Settings
from corelab.validate import safe_join
from services import intake

MAX_ZIP_BYTES = 8 * 2**30
"""Largest zip one upload may announce (8 GiB: a whole PET/CT study with room to spare; each object
inside still meets ``CORELAB_MAX_OBJECT_BYTES`` and the zip limits of the file drop)."""
MAX_CHUNK_BYTES = 64 * 2**20
"""Largest chunk one PUT may carry; the page sends :data:`CHUNK_BYTES`."""
CHUNK_BYTES = 8 * 2**20
"""Chunk size the page uses: a lost chunk costs at most 8 MiB of resending."""
MAX_OPEN_UPLOADS = 8
"""Unfinished uploads one site may hold at once (each reserves disk until finished or swept)."""
STALE_AFTER_S = 24 * 3600.0
"""An upload with no chunk for this long is removed (with its bytes) by the next create's sweep."""
DISK_MARGIN_BYTES = 1 * 2**30
"""Free space left on the data directory's disk beyond an announced upload, for the spool."""

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
    """Where one upload stands: ``offset`` bytes of ``total`` held."""

    upload_id: str
    site: str
    total: int
    offset: int
    finished: bool = False

    def as_dict(self) -> dict:
        return {"upload": self.upload_id, "site": self.site, "total": self.total, "offset": self.offset,
                "finished": self.finished, "url": f"/upload/zip/{self.upload_id}"}


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


@contextlib.contextmanager
def _locked(path: Path):
    """Hold the upload's lock: one chunk or finish at a time (a retry racing its own first try is
    told to wait, not allowed to write the same bytes twice)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UploadError(409, "another request for this upload is still running: wait for it, ask the "
                                   "offset and go on from there") from None
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
    open_ids = {f.name.split(".", 1)[0] for f in folder.glob("*.json") if not f.name.endswith(".done.json")}
    open_ids -= {f.name.split(".", 1)[0] for f in folder.glob("*.done.json")}
    if len(open_ids) >= MAX_OPEN_UPLOADS:
        raise UploadError(429, f"site {site} has {len(open_ids)} unfinished uploads, the most allowed at once is "
                               f"{MAX_OPEN_UPLOADS}: finish or resume those first (unused ones are removed after a "
                               "day)")
    free = shutil.disk_usage(folder).free
    if free < total + DISK_MARGIN_BYTES:
        raise UploadError(507, f"the core lab's disk has {free} bytes free, too little for a zip of {total} bytes "
                               "and the spool: try later or tell the core lab")
    upload_id = secrets.token_urlsafe(24)
    part, meta, _done = _paths(settings, site, upload_id)
    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), _FILE))
    fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), _FILE)
    with os.fdopen(fd, "w") as fh:
        json.dump({"total": total, "user": user, "created": time.time()}, fh)
    return UploadState(upload_id, site, total, 0)


def upload_state(settings: Settings, site: str, upload_id: str) -> UploadState:
    """The upload's offset (bytes durably held) and total; 404 for an unknown or another site's id."""
    part, info, done = _meta(settings, site, upload_id)
    if done.exists():
        return UploadState(upload_id, site, info["total"], info["total"], finished=True)
    return UploadState(upload_id, site, info["total"], part.stat().st_size)


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
        self.upload_id, self.site, self.total = upload_id, site, int(info["total"])
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


# --- finish ---------------------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _series_links(session: Session, series_uids: list[str], site: str) -> list[dict]:
    rows = session.exec(select(Series).join(Site, Series.site_id == Site.id)
                        .where(col(Series.series_uid).in_(series_uids), Site.code == site).order_by(col(Series.id)))
    return [{"id": s.id, "url": f"/series/{s.id}", "modality": s.modality, "instances": s.instance_count,
             "state": s.state} for s in rows]


def finish_upload(engine: Engine, settings: Settings, site: str, upload_id: str, *, actor: str) -> dict:
    """Ingest a complete upload as ``site`` (the file drop: each object stored or quarantined with
    its reason, every series it touched completed at once), audit ``upload.finish`` with the
    counts and the zip's sha256, then drop the zip's bytes. Returns the summary; a repeated finish
    returns the same summary (``repeated`` True) and ingests nothing.

    One transaction for the ingest and its audit event, under the upload's lock. A crash after the
    commit but before the summary is saved leaves the zip in place: finishing again ingests it
    again, which stores nothing twice (every object is then a duplicate, a no-op).

    QC is not started here: the series are complete and ``pending``, and the DICOM node's ticker
    (``corelab serve`` / ``corelab receive``, :func:`corelab.series_completion.complete_stable_series`)
    claims them on its next tick and hands them to its QC starter, as for any arrival; without a
    running node, the nightly QC takes them.
    """
    part, info, done = _meta(settings, site, upload_id)
    if done.exists():
        return {**info, "repeated": True}
    with _locked(part):
        if done.exists():  # finished by the request that held the lock before us
            return {**json.loads(done.read_text()), "repeated": True}
        held = part.stat().st_size
        if held != info["total"]:
            raise UploadError(409, f"the upload holds {held} of {info['total']} bytes: send the rest, then finish",
                              offset=held)
        sha256 = _sha256_file(part)
        with transaction(engine) as session:
            summary = intake.ingest_drop(session, settings, part, site)
            counts = {k: v for k, v in summary.as_dict().items() if k not in ("series", "quarantine")}
            result = {"upload": upload_id, "site": site, "total": info["total"], "sha256": sha256, **counts,
                      "quarantine": [{"reason_code": o.reason_code, "reason": o.reason}
                                     for o in summary.outcomes if o.status == "quarantined"],
                      "series": _series_links(session, summary.series_uids, site),
                      "site_url": f"/sites/{site}", "repeated": False}
            audit.append(session, actor=actor, action="upload.finish", entity="upload", entity_id=upload_id,
                         detail={"site": site, "bytes": info["total"], "sha256": sha256, **counts})
        fd = os.open(done, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), _FILE)
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh)
        meta = part.with_name(f"{upload_id}.json")
        for path in (part, meta):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return result


__all__ = ["CHUNK_BYTES", "ChunkWriter", "MAX_CHUNK_BYTES", "MAX_OPEN_UPLOADS", "MAX_ZIP_BYTES", "STALE_AFTER_S",
           "UploadError", "UploadState", "check_zip_name", "create_upload", "finish_upload",
           "parse_content_range", "sweep_stale", "upload_state", "uploads_dir"]
