"""Attaching a fill sheet to a received phantom series: the one core of every route that gives one.

A phantom series analyses against ``fill.yaml`` in its spool folder. It gets there three ways:
dropped with the scan (``X.fill.yaml``, :mod:`corelab.ingest`), ``corelab phantom fill`` and the
portal's form (both through :func:`services.phantoms.attach_fill_sheet`, which adds the full
check of :mod:`phantoms.fill`). Each goes through :func:`attach`: the sheet is checked, the
series' accreditation is claimed for the change, the file is written so that a rollback undoes
it, the change is audited and the series is put back on the accreditation queue. The kernel
cannot import :mod:`phantoms`, so :func:`attach` takes the full check as ``parse``; the ingest
checks the form (:func:`check_form`) and the analysis the rest.

One sheet per analysis
----------------------
A series whose accreditation is ``queued`` or ``running`` is refused: the run would read one
sheet or the other, and a second run would start beside it (a file drop, which never replaces a
sheet, may give a queued series the sheet it lacks: ``queued_ok``). Otherwise one conditional
``UPDATE ... WHERE id = ? AND qc_state IN ('pending', 'done', 'failed')`` takes the series' row
for this transaction (so no start can claim it meanwhile) before the move ``done | failed ->
pending`` (:func:`corelab.lifecycle.move`), audited in the same transaction.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import event, update
from sqlmodel import Session

from corelab import audit
from corelab.lifecycle import move
from corelab.limits import MAX_FILL_SHEET_BYTES, bounded_yaml
from corelab.models import Series
from corelab.series_files import series_dir
from corelab.settings import Settings
from corelab.spool_io import durable_write, write_tracked

__all__ = ["BUSY", "FILL_SHEET", "FillSheetRefused", "ReplaceRefused", "SeriesBusy", "SheetMalformed", "attach",
           "check_form"]

FILL_SHEET = "fill.yaml"
"""Name of a received phantom series' fill sheet in its spool folder (as a file drop writes it)."""

BUSY = "its accreditation is queued or running: wait for it to end, then give the sheet"
"""Why a sheet is refused while an analysis of the series is queued or running."""

# The keys phantoms.fill turns into numbers: a text there is named here, not as a bare float() error.
_NUMERIC = ("sphere_kbq_ml", "background_kbq_ml", "lung_kbq_ml", "concentration_kbq_ml", "half_life_s")
_RESTORE = "corelab.fill_sheets.restore"


class FillSheetRefused(ValueError):
    """The sheet cannot be attached to this series (malformed, not a phantom, analysis queued or running)."""


class SheetMalformed(FillSheetRefused):
    """The sheet itself is wrong in form (too large, not UTF-8, not a YAML mapping, a word for a number)."""


class SeriesBusy(FillSheetRefused):
    """The series' accreditation is queued or running: the sheet must wait for it to end."""


class ReplaceRefused(FillSheetRefused):
    """The series has a sheet already and this caller may not replace it (a site: the physicist may)."""


def check_form(data: bytes, *, source: str = "fill sheet") -> tuple[str, dict]:
    """The text and the mapping of a fill sheet, checked for its form: size, UTF-8, a YAML mapping,
    numbers where numbers belong. Raises :class:`SheetMalformed` naming the fix."""
    if len(data) > MAX_FILL_SHEET_BYTES:
        raise SheetMalformed(f"{source}: {len(data)} bytes, over the limit of {MAX_FILL_SHEET_BYTES} bytes for a "
                             "fill sheet (a few hundred bytes of YAML); send the fill sheet itself")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SheetMalformed(f"{source}: not UTF-8 text (byte {exc.start}); save it as a plain-text YAML "
                             "file") from None
    try:
        doc = bounded_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SheetMalformed(f"{source}: not valid YAML{where}; write one 'key: value' per line "
                             "(see the fill sheet example in the README)") from None
    except ValueError as exc:
        raise SheetMalformed(f"{source}: {exc} (see the fill sheet example in the README)") from None
    if not isinstance(doc, dict):
        raise SheetMalformed(f"{source}: a fill sheet is a YAML mapping of keys (kind, sphere_kbq_ml, ..., "
                             f"reference_time, radionuclide), not a {type(doc).__name__}")
    for key in _NUMERIC:
        value = doc.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise SheetMalformed(f"{source}: '{key}' is {str(value)[:40]!r}; give a number "
                                 f"({'s' if key == 'half_life_s' else 'kBq/mL'})")
        # A half-life is positive, an activity concentration not negative (a cold insert is 0).
        if value is not None and (value <= 0 if key == "half_life_s" else value < 0):
            raise SheetMalformed(f"{source}: '{key}' is {value}; give a {'positive' if key == 'half_life_s' else 'non-negative'} "
                                 f"number ({'s' if key == 'half_life_s' else 'kBq/mL'})")
    return text, doc


def attach(session: Session, settings: Settings, series: Series, data: bytes, *, actor: str, replace: bool,
           parse: Callable[[dict, str], Any] | None = None, queued_ok: bool = False) -> dict:
    """Give the phantom ``series`` its fill sheet ``data`` and put it back on the accreditation queue.

    Parameters
    ----------
    replace : bool
        Whether this caller may replace a sheet the series has (the core lab); False (a site)
        raises :class:`ReplaceRefused` when it has one.
    parse : callable, optional
        The full check, ``parse(mapping, source)`` returning the sheet (with its ``kind``) or
        raising; None checks the form only.
    queued_ok : bool
        Take the sheet of a series whose run is queued but not started, leaving it queued (the
        run reads the sheet when it starts; nothing starts a second one): the file drop, whose
        sheet comes with the scan. Else a queued series is refused like a running one.

    Returns
    -------
    dict
        ``series_id``, ``series_uid``, ``kind`` (of the sheet), ``sha256``, ``replaced`` (the earlier
        sheet's sha256, '' when none), ``qc_state`` and ``requeued`` (whether this call moved it
        back to ``pending``).

    Raises
    ------
    FillSheetRefused
        Not a phantom, a malformed sheet, a sheet this caller may not replace, or the series'
        accreditation is queued or running; nothing is written. ``parse``'s own error for a sheet
        it refuses.
    """
    uid = series.series_uid
    if series.kind != "phantom":
        raise FillSheetRefused(f"series {uid} is not a phantom scan (kind {series.kind}): a fill sheet belongs to "
                               "a phantom series (`corelab series list` shows each series' kind)")
    source = f"fill sheet for series {uid}"
    text, doc = check_form(data, source=source)
    fill = parse(doc, source) if parse is not None else None
    path = series_dir(settings, series, session) / FILL_SHEET
    session.flush()  # this session's own changes of the row first: the UPDATE below must see them
    takes = ("pending", "done", "failed") + (("queued",) if queued_ok else ())
    # Takes the row for this transaction (no claim, run start or other sheet can pass it) and says
    # whether the series may take a sheet now; the state itself is moved by the lifecycle.
    held = session.execute(update(Series).where(Series.id == series.id,
                                                Series.qc_state.in_(takes))
                           .values(qc_at=Series.qc_at).execution_options(synchronize_session=False)).rowcount
    session.refresh(series, ["qc_state", "qc_at"])
    # Read only now, with the row held: the sheet another request committed a moment ago is the one
    # this call refuses to replace, or replaces, or (rolled back) writes back.
    old = path.read_bytes() if path.is_file() else None
    if old is not None and not replace:
        raise ReplaceRefused(f"series {uid} has its fill sheet already; replacing it is for the core lab's physicist "
                             "(ask them, with the corrected sheet)")
    if held != 1:
        raise SeriesBusy(f"series {uid}: {BUSY}")
    encoded = text.encode("utf-8")
    sha256 = hashlib.sha256(encoded).hexdigest()
    replaced = hashlib.sha256(old).hexdigest() if old is not None else ""
    _write_undoable(session, path, encoded, old)
    kind = str(getattr(fill, "kind", None) or doc.get("kind") or "")
    audit.append(session, actor=actor, action="phantom.fill_sheet", entity="series", entity_id=uid,
                 detail={"sha256": sha256, "bytes": len(encoded), "kind": kind, "replaced": replaced})
    requeued = False
    if series.qc_state in ("done", "failed"):
        # Back to pending, as a new arrival: its start is claimed once (the node's ticker, or
        # whoever claims it), so nobody has to remember to start a run and no two runs start.
        requeued = move(session, series, qc_state="pending", actor=actor,
                        reason="fill sheet replaced" if replaced else "fill sheet given",
                        detail={"fill_sheet_sha256": sha256})
    session.flush()
    return {"series_id": series.id, "series_uid": uid, "kind": kind, "sha256": sha256, "replaced": replaced,
            "qc_state": series.qc_state, "requeued": requeued}


# --- the file goes with its transaction -----------------------------------------------------------

def _write_undoable(session: Session, path: Path, data: bytes, old: bytes | None) -> None:
    """Write the sheet so that a rollback of the session's transaction undoes it: the new file is
    removed (:func:`corelab.spool_io.write_tracked`) and the sheet it replaced written back."""
    write_tracked(session, path, data)
    if old is None:
        return
    if _RESTORE not in session.info:
        session.info[_RESTORE] = []
        # Registered after write_tracked's own listeners (it registers on its first call, above),
        # so on a rollback the old sheet is written back after the new one was removed.
        event.listen(session, "after_commit", _forget_restores)
        event.listen(session, "after_transaction_end", _restore_unless_committed)
    session.info[_RESTORE].append((path, old))


def _forget_restores(session: Session) -> None:
    if session.in_nested_transaction():  # a released savepoint (the audit log's) is not the commit
        return
    session.info[_RESTORE] = []


def _restore_unless_committed(session: Session, transaction) -> None:
    if transaction.parent is None:
        for path, old in reversed(session.info.get(_RESTORE, [])):  # the oldest sheet is written last
            durable_write(path, old)
        session.info[_RESTORE] = []
