"""Use cases of phantom series: a fill sheet attached to a received series, and who waits for one.

A phantom scan sent over DICOM (or STOW-RS, or a drop without ``X.fill.yaml``) arrives without
its fill sheet: the ``accredit-scanners`` flow cannot analyse it and the series *awaits its fill
sheet*. :func:`attach_fill_sheet` is the route to give it one, called alike by ``corelab phantom
fill`` and the portal's form: it checks the sheet in full (:func:`check_fill_sheet`) and hands
it to :func:`corelab.fill_sheets.attach`, the core the file drop uses too (which claims the
series, writes ``fill.yaml`` with its transaction, audits and re-queues). A site may give the
sheet only while the series awaits it; replacing one is the physicist's (or the core lab's, on
the command line). :func:`hand_over` starts only a series it claimed itself.
:func:`awaiting_fill_sheet` is the one rule of that state, read by the worklist, the site's pages
and the default selection of ``accredit-scanners``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sqlmodel import Session, col, select

from corelab import fill_sheets
from corelab.fill_sheets import FILL_SHEET, FillSheetRefused, ReplaceRefused, SeriesBusy
from corelab.models import Series
from corelab.series_files import series_dir
from corelab.settings import Settings
from phantoms.fill import FillSheet, FillSheetError, parse_fill_sheet

__all__ = ["FILL_SHEET", "FillSheetRefused", "ReplaceRefused", "SeriesBusy", "TODO", "attach_fill_sheet",
           "awaiting_fill_sheet", "check_fill_sheet", "hand_over"]

TODO = ("send its fill sheet: `corelab phantom fill SERIES_UID FILE` (core lab), or the fill-sheet form on the "
        "series page of the portal (physicist or the site)")
"""What to do about a series awaiting its fill sheet; shown in the worklist and on the site's pages."""


def _parse(doc: dict, source: str) -> FillSheet:
    return parse_fill_sheet(doc, source=source)


def check_fill_sheet(data: bytes, *, source: str = "fill sheet") -> tuple[str, FillSheet]:
    """Read a fill sheet sent by a person: its text and the parsed sheet.

    Parameters
    ----------
    data : bytes
        The file as sent (UTF-8 YAML, at most :data:`corelab.limits.MAX_FILL_SHEET_BYTES`).
    source : str
        How errors name it.

    Raises
    ------
    FillSheetError
        Too large, not UTF-8, not YAML, not a mapping, or what :func:`phantoms.fill.parse_fill_sheet`
        refuses; the message names the key and the fix.
    """
    try:
        text, doc = fill_sheets.check_form(data, source=source)
    except fill_sheets.SheetMalformed as exc:
        raise FillSheetError(str(exc)) from None
    return text, _parse(doc, source)


def attach_fill_sheet(session: Session, settings: Settings, series_id: int, data: bytes, *, actor: str,
                      replace: bool = True) -> dict:
    """Give a received phantom series its fill sheet and put it back on the accreditation queue.

    The sheet is checked in full, then :func:`corelab.fill_sheets.attach` refuses a series whose
    accreditation is queued or running, writes ``fill.yaml`` so that a rollback undoes it (a sheet
    given before is replaced: the analysis cache keys on the sheet's text), audits
    ``phantom.fill_sheet`` (actor, series, sha256 and size, the sha256 of the sheet it replaced)
    and moves a series whose QC is done or failed back to ``pending`` in the same transaction.
    Its start is claimed once: by :func:`hand_over`, the node's ticker or the next
    ``accredit-scanners`` run.

    Parameters
    ----------
    replace : bool
        Whether the caller may replace a sheet the series has: the physicist and the core lab's
        command line may, a site may not (it gives the sheet while the series awaits it).

    Returns
    -------
    dict
        ``series_id``, ``series_uid``, ``kind`` (of the sheet), ``sha256``, ``replaced`` (the earlier
        sheet's sha256, '' when none), ``qc_state`` and ``requeued`` (whether this call re-queued it).

    Raises
    ------
    FillSheetError
        The sheet itself is wrong (nothing is written).
    FillSheetRefused
        No such series or not a phantom (nothing is written); :class:`SeriesBusy` when its
        accreditation is queued or running; :class:`ReplaceRefused` when it has a sheet and
        ``replace`` is False.
    """
    series = session.get(Series, series_id)
    if series is None:
        raise FillSheetRefused(f"no series {series_id}")
    try:
        return fill_sheets.attach(session, settings, series, data, actor=actor, replace=replace, parse=_parse)
    except fill_sheets.SheetMalformed as exc:  # the sheet is wrong, as parse_fill_sheet says it
        raise FillSheetError(str(exc)) from None


def hand_over(settings: Settings, result: dict, on_complete: Callable[[int], None] | None) -> bool:
    """Start the accreditation of a series :func:`attach_fill_sheet` re-queued, as ingest starts QC.

    Only a series this call claims itself (``pending -> queued``,
    :func:`corelab.series_completion.start_qc`) goes to ``on_complete``: one claimed by another
    (the node's ticker), or still receiving, is started by whoever claims it, never a second time
    here. ``on_complete`` None: it is left pending, for the node's ticker (``corelab
    serve``/``receive``) or the next ``accredit-scanners`` run. Returns whether it was handed over.
    """
    from corelab.db import open_store
    from corelab.series_completion import start_qc

    if on_complete is None or result["qc_state"] != "pending":
        return False
    return bool(start_qc(open_store(settings), [result["series_id"]], on_complete, actor="phantom.fill"))


def awaiting_fill_sheet(session: Session, settings: Settings, series_ids: Iterable[int]) -> set[int]:
    """Which of ``series_ids`` are phantom series awaiting their fill sheet: not analysed to the end
    (QC not done) and no ``fill.yaml`` in the spool folder; the one rule of that state.

    A result that failed for want of a fill sheet leaves the series ``failed`` without the file, so
    it is in this set until the sheet is given.
    """
    ids = list(series_ids)
    if not ids:
        return set()
    rows = session.exec(select(Series).where(col(Series.id).in_(ids), Series.kind == "phantom",
                                             Series.qc_state != "done")).all()
    return {s.id for s in rows if not (series_dir(settings, s, session) / FILL_SHEET).is_file()}


def series_id_of(session: Session, series_uid: str) -> int:
    """The id of the series ``series_uid``; :class:`FillSheetRefused` when there is none."""
    found = session.exec(select(Series.id).where(Series.series_uid == series_uid.strip())).first()
    if found is None:
        raise FillSheetRefused(f"no series {series_uid[:70]!r}; `corelab series list` names the received series")
    return found


def accreditation_state(session: Session, series_id: int) -> dict:
    """Where a phantom series stands: ``qc_state`` and its newest result's ``verdict`` and id
    ('' and None when it has none)."""
    from corelab.models import PhantomResult

    series = session.get(Series, series_id)
    newest = session.exec(select(PhantomResult).where(PhantomResult.series_id == series_id)
                          .order_by(col(PhantomResult.id).desc())).first()
    return {"qc_state": series.qc_state, "verdict": newest.verdict if newest else "",
            "phantom_result_id": newest.id if newest else None}
