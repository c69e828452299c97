"""A series' files: where the spool keeps them, and the one list every reader of a series uses.

The spool keeps every version of an instance a site sent (``<SOP UID>.dcm`` is version 1,
``<SOP UID>.v<N>.dcm`` version N, see :mod:`corelab.ingest`). :func:`series_files` is the one
entry point for reading a stored series (header QC, phantom analysis, the reports' image
panels, completion's slice positions): the newest version of each instance, from the index
(``Instance.sop_instance_uid``, ``Instance.version``), in the order received. Files outside
the spool (a site's folder, a test's folder) go through :func:`corelab.dicomio.newest_instances`,
the same rule read from the files themselves.
"""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, col, select

from corelab.models import Instance, Series, Study
from corelab.settings import Settings
from corelab.validate import safe_join

__all__ = ["newest_instance_rows", "series_dir", "series_files"]


def series_dir(settings: Settings, series: Series, session: Session) -> Path:
    """The spool folder of a series: ``<data dir>/spool/<study UID>/<series UID>``."""
    study = session.get(Study, series.study_id)
    return safe_join(settings.data_dir, "spool", study.study_uid, series.series_uid)


def newest_instance_rows(session: Session, series: Series) -> list[Instance]:
    """The index row of the newest version of each instance of ``series``, in the order received."""
    newest: dict[str, Instance] = {}
    for inst in session.exec(select(Instance).where(Instance.series_id == series.id).order_by(col(Instance.id))):
        if inst.sop_instance_uid not in newest or inst.version > newest[inst.sop_instance_uid].version:
            newest[inst.sop_instance_uid] = inst
    return sorted(newest.values(), key=lambda inst: inst.id)


def series_files(settings: Settings, session: Session, series: Series) -> list[Path]:
    """The files to read for ``series``: the newest version of each instance, in the order received."""
    return [settings.data_dir / inst.path for inst in newest_instance_rows(session, series)]
