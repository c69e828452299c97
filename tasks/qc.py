"""Prefect tasks for trial-scan QC: thin wrappers over expectations.qc.

Runs are named after what they check (:func:`qc_run_name`): the site, the subject's pseudonym
(the trial's, never a patient's name), the visit and the modality, so the run list says which
scan a run judged.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

from prefect import task
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from corelab.db import session_scope
from corelab.lifecycle import move_all, start_running
from corelab.models import Series, Site, Study, Subject, Visit
from corelab.settings import Settings, load_settings
from expectations.manual import load_manual
from expectations.qc import mark_nothing_to_check, qc_series_batch, trial_pet_series
from services import lookup, reports
from services.datadocs import gx_project_dir

LOG = logging.getLogger("corelab.qc")
MAX_NAME = 100  # Prefect shows (and stores) short names best; a batch's name is cut to this
FEW = 5  # up to this many series are named one by one, more are counted per site
_UNSAFE = re.compile(r"[^A-Za-z0-9._:+-]+")


def _label(value, max_len: int = 32) -> str:
    """A stored value as one short, plain token of a run name (register and header values are
    whatever a site typed: spaces, slashes and control characters become ``_``)."""
    return _UNSAFE.sub("_", str(value or "?")).strip("_")[:max_len] or "?"


def _describe(settings: Settings, series_ids: list[int]) -> list[tuple[str, str, str, str]]:
    """(site, subject pseudonym, visit, modality) of each series found, sorted."""
    query = (select(Site.code, Subject.pseudonym, Visit.label, Series.modality)
             .select_from(Series).join(Site, Series.site_id == Site.id, isouter=True)
             .join(Study, Series.study_id == Study.id, isouter=True)
             .join(Visit, Study.visit_id == Visit.id, isouter=True)
             .join(Subject, Visit.subject_id == Subject.id, isouter=True)
             .where(col(Series.id).in_(series_ids)))
    with session_scope(settings) as session:
        return sorted(tuple(_label(v) for v in row) for row in session.exec(query))


def qc_run_name(trial_code: str, series_ids: list[int] | None, pending_only: bool = True, *,
                settings: Settings | None = None) -> str:
    """The name of a QC flow or task run: what it checks, in at most :data:`MAX_NAME` characters.

    One series: ``qc FDG-RESP-01 A01 FDGR01-A01-003 baseline PT``; several:
    ``qc FDG-RESP-01: 3 series, A01 FDGR01-A01-003 baseline, B02 FDGR01-B02-001 baseline, +1 more``
    (as many as fit); more than :data:`FEW`: ``qc FDG-RESP-01: 40 series, A01 (12), B02 (28)``;
    no ids: ``qc FDG-RESP-01: pending series`` (or all series). ``settings``: the store to read
    (default: :func:`corelab.settings.load_settings`, as the flow's tasks do).
    """
    head = f"qc {_label(trial_code)}"
    if series_ids is None:
        return f"{head}: {'pending' if pending_only else 'all'} series"
    if not series_ids:
        return f"{head}: no series"
    try:
        rows = _describe(settings or load_settings(), series_ids)
    except SQLAlchemyError as exc:  # a name is a label: the run itself reports a store that is down
        LOG.warning("cannot name the QC run of %d series: %s", len(series_ids), type(exc).__name__)
        rows = []
    if len(series_ids) == 1 and len(rows) == 1:
        return _cut(f"{head} {' '.join(rows[0])}")
    head = f"{head}: {len(series_ids)} series"
    if not rows:
        return head
    scans = [" ".join(r[:3]) for r in rows]
    if len(scans) > FEW:  # a batch: how many per site says more than a cut list of subjects
        return _cut(f"{head}, " + ", ".join(f"{site} ({n})" for site, n in sorted(Counter(r[0] for r in rows).items())))
    name = head
    for i, scan in enumerate(scans):
        rest = len(scans) - i - 1
        if len(f"{name}, {scan}") + (len(f", +{rest} more") if rest else 0) > MAX_NAME:
            return f"{name}, +{len(scans) - i} more"
        name = f"{name}, {scan}"
    return name


def _cut(name: str) -> str:
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 1].rstrip(", ") + "…"


def _batch_run_name(parameters: dict) -> str:
    return qc_run_name(parameters["trial_code"], parameters["series_ids"])


def _with_store_state(settings, trial_code: str, findings: list[dict]) -> list[dict]:
    """Each finding with its deviation's id, status and manual section as the store holds them
    (after the batch's commit), so the run's table is what a physicist finds in the worklist."""
    if not findings:
        return findings
    with session_scope(settings) as session:
        stored = {(d["series_uid"], d["rule_id"]): d for d in lookup.deviation_rows(session, trial_code=trial_code)}
    out = []
    for f in findings:
        d = stored.get((f["series_uid"], f["rule_id"]), {})
        out.append({**f, "deviation_id": d.get("id"), "status": d.get("status", ""),
                    "manual_section": d.get("manual_section", "")})
    return out


@task(name="find-trial-series", task_run_name="find {trial_code} series")
def find_trial_series(trial_code: str, pending_only: bool = True) -> list[int]:
    """Series to check: those not yet judged by the manual's current version (or all)."""
    version = load_manual(trial_code).version if pending_only else None
    with session_scope(load_settings()) as session:
        return [s.id for s in trial_pet_series(session, trial_code, needing_version=version)]


@task(name="qc-batch", task_run_name=_batch_run_name, retries=1, retry_delay_seconds=[5])
def qc_batch(trial_code: str, series_ids: list[int], n_series: int) -> dict:
    """Validate one batch of series in one Great Expectations run, record the deviations, then
    publish each series' QC note to its site (:func:`services.reports.publish_feedback_after_qc`)."""
    manual = load_manual(trial_code)
    settings = load_settings()
    docs_dir = gx_project_dir(settings, trial_code)  # per trial: its Data Docs show no other trial

    def batch(session):
        return list(session.exec(select(Series).where(col(Series.id).in_(series_ids)).order_by(col(Series.id))))

    with session_scope(settings) as session:  # committed, so the running state shows while GX runs
        start_running(session, batch(session), actor="qc")
    figures, on_image = reports.figure_collector()  # the note's figure is drawn while each volume is loaded
    try:
        with session_scope(settings) as session:
            out = qc_series_batch(session, settings, manual, batch(session), docs_dir=docs_dir,
                                  on_image=on_image).as_dict()
    except Exception as exc:
        with session_scope(settings) as session:  # a retry starts them again from failed
            move_all(session, [s for s in batch(session) if s.qc_state == "running"], qc_state="failed", actor="qc",
                     reason=f"QC of the batch failed: {type(exc).__name__}: {exc}")
        raise
    out["findings"] = _with_store_state(settings, trial_code, out["findings"])
    # The judgement is committed: now each site gets its per-series note (seconds after QC).
    out["feedback"] = reports.publish_feedback_after_qc(settings, series_ids, figures)
    return out


@task(name="mark-non-pet-done", task_run_name="mark CT series checked")
def mark_non_pet_done() -> int:
    """CT series of a study carry no manual rules yet: mark them checked so none waits forever."""
    with session_scope(load_settings()) as session:
        rows = session.exec(select(Series).where(Series.modality != "PT", Series.state == "complete",
                                                 Series.qc_state == "pending")).all()
        return len(mark_nothing_to_check(session, list(rows), actor="qc"))
