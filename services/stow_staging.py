"""Where a STOW-RS body waits until it is ingested: one folder per request, held by a lock, its bytes
counted against a process-wide budget and the disk's free-space floor.

- **The folder** is ``<data dir>/incoming/stow/<pid>-<hex>``, mode 0700. While the request runs it
  holds an exclusive ``flock`` on the folder's ``.lock``
  (:data:`corelab.series_completion.STAGING_LOCK`); the lock dies with the process, so
  :func:`corelab.series_completion.remove_stale_staging` removes exactly the folders whose lock it
  can take, whatever PID or PID namespace made them (a container's PID 1 is reused, another
  namespace's PIDs are not ours to judge).
- **The budget** (``dicomweb_staging_budget_bytes``): all requests of this process stage at most
  that many bytes at once. A declared Content-Length is reserved before the body is read; a
  chunked body reserves as it arrives. Over it: :class:`~services.multipart.StowError` 503 with
  Retry-After, nothing stored: the client sends again once other requests are done.
- **The floor** (``dicomweb_min_free_bytes``): the data directory's disk keeps that much free. A
  declared body that would go below it is refused before reading, any body as soon as it does:
  507 (Insufficient Storage, RFC 4918), nothing stored.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import threading
from pathlib import Path

from corelab.series_completion import STAGING_LOCK
from corelab.settings import Settings
from services.multipart import StowError

RETRY_AFTER_S = 60


class StagingBudget:
    """Bytes reserved by the staging requests of this process (thread safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reserved = 0

    def take(self, n: int, limit: int) -> bool:
        with self._lock:
            if self.reserved + n > limit:
                return False
            self.reserved += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.reserved -= n


BUDGET = StagingBudget()


def _busy(settings: Settings) -> StowError:
    return StowError(503, f"the core lab is staging too much at once (over {settings.dicomweb_staging_budget_bytes} "
                          "bytes, CORELAB_DICOMWEB_STAGING_BUDGET_BYTES): nothing was stored; send the request again "
                          f"in {RETRY_AFTER_S} s, or in smaller requests", {"Retry-After": str(RETRY_AFTER_S)})


def _full(settings: Settings) -> StowError:
    return StowError(507, "the core lab's disk is nearly full (it keeps "
                          f"{settings.dicomweb_min_free_bytes} bytes free, CORELAB_DICOMWEB_MIN_FREE_BYTES): nothing "
                          "was stored; tell the core lab, and send the request again later")


class Staging:
    """One request's staging folder, its lock and its reservation; :meth:`close` gives all back.

    Parameters
    ----------
    settings : Settings
    declared : int or None
        The request's Content-Length (reserved at once), or None for a chunked body (reserved
        by :meth:`grow` as it arrives).
    """

    def __init__(self, settings: Settings, declared: int | None, *, budget: StagingBudget = BUDGET):
        self.settings, self.declared, self.budget = settings, declared, budget
        self.reserved, self.folder, self._lock_fd = 0, None, None
        root = settings.stow_staging_dir
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        if declared is not None:
            if shutil.disk_usage(root).free - declared < settings.dicomweb_min_free_bytes:
                raise _full(settings)
            self.grow(declared)
        try:
            self.folder, self._lock_fd = _locked_folder(root)
        except BaseException:
            self.close()
            raise

    def grow(self, n: int) -> None:
        """Reserve ``n`` more bytes, or :class:`StowError` 503."""
        if not self.budget.take(n, self.settings.dicomweb_staging_budget_bytes):
            raise _busy(self.settings)
        self.reserved += n

    def check_floor(self) -> None:
        """:class:`StowError` 507 once the disk's free space is below the floor."""
        if shutil.disk_usage(self.folder).free < self.settings.dicomweb_min_free_bytes:
            raise _full(self.settings)

    def close(self) -> None:
        """Remove the folder, then release its lock and the reservation (idempotent)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.budget.give(self.reserved)
        self.reserved = 0


def _locked_folder(root: Path) -> tuple[Path, int]:
    """A new folder under ``root`` with its lock held. A clean-up may lock a folder between its
    mkdir and our lock (it then removes it): try a new one."""
    for _ in range(5):
        folder = root / f"{os.getpid()}-{secrets.token_hex(8)}"
        folder.mkdir(mode=0o700)
        try:
            fd = os.open(folder / STAGING_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(folder / STAGING_LOCK, follow_symlinks=False).st_ino:
                return folder, fd
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
    raise OSError("no staging folder could be locked")


__all__ = ["BUDGET", "RETRY_AFTER_S", "Staging", "StagingBudget"]
