"""Writing received bytes to the data directory: checksums, durable writes, and files that go with
their transaction.

The ingest (:mod:`corelab.ingest`) and the quarantine (:mod:`corelab.quarantine`) write through
:func:`write_tracked`: the file is durable before the commit, and removed again when the
session's outermost transaction rolls back, so the spool never holds a file without its row.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sqlalchemy import event
from sqlmodel import Session

__all__ = ["durable_write", "sha256_bytes", "write_tracked"]

_WRITTEN = "corelab.ingest.written"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def durable_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that once this returns the bytes survive a crash.

    Temporary file in the same folder, fsync, atomic rename, fsync of the folder: a half-written
    file is never visible under its final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _forget_written(session: Session) -> None:
    # SQLAlchemy 2 also calls after_commit when a savepoint is released (the audit log appends in
    # one): only the outermost commit makes the files permanent
    if session.in_nested_transaction():
        return
    session.info[_WRITTEN] = []


def _remove_unless_committed(session: Session, transaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended: committed ones were forgotten
        for path in session.info.get(_WRITTEN, []):
            path.unlink(missing_ok=True)
        session.info[_WRITTEN] = []


def write_tracked(session: Session, path: Path, data: bytes) -> None:
    """Durable write whose file is deleted again if the session's transaction rolls back."""
    if _WRITTEN not in session.info:
        session.info[_WRITTEN] = []
        event.listen(session, "after_commit", _forget_written)
        event.listen(session, "after_transaction_end", _remove_unless_committed)
    durable_write(path, data)
    session.info[_WRITTEN].append(path)
