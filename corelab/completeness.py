"""Series completeness: is everything there that the headers say should be there?

A received series is compared with its own headers: the instance count against the count the
header announces (NumberOfSlices, else ImagesInAcquisition), and the slice positions (each
instance's ImagePositionPatient projected on its slice normal) for gaps and repeats. The result
is stored on the series and shown, never used to hide or drop anything: a flagged series still
goes to QC, where the physicist sees why.

The missing-slice rule
----------------------
:func:`slice_steps` is the one rule for slices missing between received positions; completion
(:func:`assess`), the header table (``expectations.header_table.missing_slices``) and the volume
reader (``corelab.dicomio``) all count through it. The spacing is the median of the distinct
steps between sorted positions (a repeat is not a step); each step is read as the nearest whole
number of spacings, ``floor(step / spacing + 0.5)``, and holds that number minus one missing
slices. So a step is a gap from :data:`GAP_FACTOR` = 1.5 times the spacing, where it is nearer
two spacings than one. The three rules this replaces all counted ``round(step / spacing) - 1``
and differed only in which steps they looked at: completion's 1.25 x admitted steps between
1.25 and 1.5 x whose count was still zero, the header table's 1.5 x and the reader's regular grid
counted the same; 1.5 keeps every result (and every test) as it was, except exact ties of
half a spacing, which now count up (they are not on a regular grid, which the reader refuses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Two positions closer than this fraction of the typical spacing are the same slice (a repeat).
POSITION_TOLERANCE = 0.25
# Steps this small (mm) are no step at all when the typical spacing is worked out.
DISTINCT_STEP_MM = 1e-3
GAP_FACTOR = 1.5
"""A step of at least this many times the spacing holds missing slices (see the module's notes)."""


@dataclass(frozen=True)
class SliceSteps:
    """The steps between sorted slice positions, judged by the one missing-slice rule.

    ``spacing_mm``: median of the distinct steps (None without one); ``repeats``: steps shorter
    than :data:`POSITION_TOLERANCE` x the spacing (a repeated position); ``missing``: per step,
    the slices missing inside it.
    """

    positions_mm: tuple[float, ...]
    spacing_mm: float | None
    repeats: int
    missing: tuple[int, ...]

    @property
    def gaps(self) -> int:
        """Slices missing between received positions, in all."""
        return sum(self.missing)


def slice_steps(positions_mm: Sequence[float]) -> SliceSteps:
    """Judge the steps between ``positions_mm`` (sorted here) by the one missing-slice rule."""
    known = np.sort(np.asarray(list(positions_mm), dtype=float))
    steps = np.diff(known)
    distinct = steps[steps > DISTINCT_STEP_MM]
    if not distinct.size:
        return SliceSteps(tuple(known.tolist()), None, max(0, len(known) - 1), tuple(0 for _ in steps))
    spacing = float(np.median(distinct))
    missing = tuple(max(0, int(np.floor(step / spacing + 0.5)) - 1) if step >= GAP_FACTOR * spacing else 0
                    for step in steps)
    return SliceSteps(tuple(known.tolist()), spacing, int(np.sum(steps < POSITION_TOLERANCE * spacing)), missing)


def slice_position_mm(ds) -> float | None:
    """ImagePositionPatient projected on the slice normal (mm), or None when not computable.

    Sorting by this, rather than by one coordinate, works for any orientation (hazen#404).
    """
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
    except (AttributeError, TypeError, ValueError):
        return None
    if ipp.shape != (3,) or iop.shape != (6,):
        return None
    normal = np.cross(iop[:3], iop[3:])
    if not np.isfinite(normal).all() or np.linalg.norm(normal) == 0:
        return None
    return round(float(ipp @ (normal / np.linalg.norm(normal))), 4)


def assess(positions_mm: Sequence[float | None], *, instance_count: int, expected_count: int | None) -> dict:
    """Completeness of one series from its instances' slice positions and the header's count.

    Parameters
    ----------
    positions_mm : sequence of float or None
        One entry per stored instance (None where the instance has no position, e.g. multi-frame).
    instance_count : int
        Instances received.
    expected_count : int or None, keyword-only
        The count the headers announce (NumberOfSlices or ImagesInAcquisition), if any.

    Returns
    -------
    dict
        ``instances``, ``expected``, ``missing_by_count`` (expected - received when positive),
        ``repeated_positions`` (instances at an already-seen position), ``gaps`` (number of
        missing slices between received ones, from the typical spacing), ``spacing_mm`` and
        ``complete`` (no finding at all), ``findings`` (short texts for the site and physicist).
    """
    known = sorted(p for p in positions_mm if p is not None)
    out = {"instances": instance_count, "expected": expected_count, "missing_by_count": 0,
           "repeated_positions": 0, "gaps": 0, "spacing_mm": None, "findings": []}
    if expected_count:
        out["missing_by_count"] = max(0, expected_count - instance_count)
        if out["missing_by_count"]:
            out["findings"].append(f"{instance_count} of {expected_count} instances announced by the header")
        elif instance_count > expected_count:
            out["findings"].append(f"{instance_count} instances, more than the {expected_count} the header announces")
    if len(known) >= 2:
        judged = slice_steps(known)
        out["spacing_mm"] = round(judged.spacing_mm, 4) if judged.spacing_mm is not None else None
        out["repeated_positions"], out["gaps"] = judged.repeats, judged.gaps
    if out["repeated_positions"]:
        out["findings"].append(f"{out['repeated_positions']} instance(s) repeat a slice position")
    if out["gaps"]:
        out["findings"].append(f"{out['gaps']} slice(s) missing between received positions")
    out["complete"] = not out["findings"]
    return out
