"""Finishing a zip upload: its ingest runs in the background, the caller polls for the summary.

A zip may be 8 GiB; checking and storing every object in it takes minutes, longer than a browser
or a proxy keeps a request open. So :func:`start_finish` only checks that every byte is in, takes
the upload's lock, writes ``<id>.ingest.json`` (``ingesting``) and hands the lock to a thread of
this process, then answers at once; :func:`services.uploads.upload_state` (``GET
/upload/zip/{id}``) says ``ingesting``, then ``finished`` with the summary, or ``failed`` with
what to do. The lock makes it one ingest per upload: a second finish meanwhile is told
``ingesting`` and starts nothing. :data:`INGEST_SLOT` makes it one ingest at a time in the
process: two ingests would only wait for each other on the store's write lock.

An ingest whose thread died with its process (a restart) leaves ``ingesting`` without a lock
holder: the poll says ``failed`` and a new finish starts it again. Nothing of an ingest that did
not commit is kept; one that committed but did not save its summary is ingested again, which
stores nothing twice (every object is then a duplicate).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from corelab import audit
from corelab.db import transaction
from corelab.models import Series, Site
from corelab.settings import Settings
from services import intake, uploads
from services.uploads import UploadError, UploadState

LOG = logging.getLogger("corelab.portal")
INGEST_SLOT = threading.Lock()
"""Held by the zip ingest running in this process; the next one waits for it (state ``ingesting``)."""
FAILED = ("the core lab's store could not take the zip; nothing from it was acknowledged: finish again later "
          "(the zip is kept)")


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


def ingest_upload(engine: Engine, settings: Settings, site: str, upload_id: str, part: Path, total: int, *,
                  actor: str) -> dict:
    """Ingest a complete upload's bytes as ``site`` (the file drop: each object stored or
    quarantined with its reason, every series it touched completed at once) and audit
    ``upload.finish`` with the counts and the zip's sha256, in one transaction; returns the
    summary. The caller holds the upload's lock.

    QC is not started here: the series are complete and ``pending``, and the DICOM node's ticker
    (:func:`corelab.series_completion.complete_stable_series`) claims them on its next tick, as for
    any arrival; without a running node, the nightly QC takes them.
    """
    sha256 = _sha256_file(part)
    with transaction(engine) as session:
        summary = intake.ingest_drop(session, settings, part, site)
        counts = {k: v for k, v in summary.as_dict().items() if k not in ("series", "quarantine")}
        result = {"upload": upload_id, "site": site, "total": total, "sha256": sha256, **counts,
                  "quarantine": [{"reason_code": o.reason_code, "reason": o.reason}
                                 for o in summary.outcomes if o.status == "quarantined"],
                  "series": _series_links(session, summary.series_uids, site),
                  "site_url": f"/sites/{site}", "repeated": False}
        audit.append(session, actor=actor, action="upload.finish", entity="upload", entity_id=upload_id,
                     detail={"site": site, "bytes": total, "sha256": sha256, **counts})
    return result


def _run(fd: int, engine: Engine, settings: Settings, site: str, upload_id: str, part: Path, total: int,
         actor: str) -> None:
    """The background ingest; ``fd`` holds the upload's lock and is closed (released) at the end."""
    marker = uploads.ingest_marker(part)
    try:
        with INGEST_SLOT:
            result = ingest_upload(engine, settings, site, upload_id, part, total, actor=actor)
        # The summary first: from then on every look (poll, finish, sweep) sees the upload finished.
        uploads.write_private_json(part.with_name(f"{upload_id}.done.json"), result)
        for path in (part, part.with_name(f"{upload_id}.json"), marker):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    except Exception as exc:  # the store, not the zip: bad objects are quarantined inside
        LOG.error("upload ingest for site %s failed (%s)", site, type(exc).__name__)
        with contextlib.suppress(OSError):
            uploads.write_private_json(marker, {"state": "failed", "detail": FAILED, "at": time.time()})
    finally:
        os.close(fd)


def start_finish(engine: Engine, settings: Settings, site: str, upload_id: str, *,
                 actor: str) -> tuple[int, dict]:
    """Start ingesting a complete upload in the background; returns (HTTP status, body): 202 and
    the upload's state (``ingesting``) when started or already running, 200 and the summary
    (``repeated`` True) when it was finished before. 409 (raised) while bytes are missing."""
    state = uploads.upload_state(settings, site, upload_id)
    if state.finished:
        return 200, {**state.summary, "repeated": True}
    if state.offset != state.total:
        raise UploadError(409, f"the upload holds {state.offset} of {state.total} bytes: send the rest, then finish",
                          offset=state.offset)
    part = uploads.uploads_dir(settings) / site / f"{upload_id}.part"
    try:
        fd = uploads.lock_upload(part)
    except UploadError:  # a running ingest (or the last chunk's request, still closing)
        state = uploads.upload_state(settings, site, upload_id)
        if state.state == "ingesting":
            return 202, state.as_dict()
        if state.finished:
            return 200, {**state.summary, "repeated": True}
        raise
    except FileNotFoundError:  # finished between the looks
        state = uploads.upload_state(settings, site, upload_id)
        return 200, {**state.summary, "repeated": True}
    try:
        if part.with_name(f"{upload_id}.done.json").exists():  # finished by whoever held the lock before us
            os.close(fd)
            state = uploads.upload_state(settings, site, upload_id)
            return 200, {**state.summary, "repeated": True}
        uploads.write_private_json(uploads.ingest_marker(part), {"state": "ingesting", "at": time.time()})
        threading.Thread(target=_run, args=(fd, engine, settings, site, upload_id, part, state.total, actor),
                         name=f"upload-ingest-{site}", daemon=True).start()
    except BaseException:
        os.close(fd)
        raise
    return 202, UploadState(upload_id, site, state.total, state.total, state="ingesting").as_dict()


__all__ = ["FAILED", "INGEST_SLOT", "ingest_upload", "start_finish"]
