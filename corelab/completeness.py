"""Series completeness: is everything there that the headers say should be there?

A received series is compared with its own headers: the instance count against the count the
header announces (NumberOfSlices, else ImagesInAcquisition), and the slice positions (each
instance's ImagePositionPatient projected on its slice normal) for gaps and repeats. The result
is stored on the series and shown, never used to hide or drop anything: a flagged series still
goes to QC, where the physicist sees why.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Two positions closer than this fraction of the typical spacing are the same slice (a repeat);
# a step larger than (1 + this) times the typical spacing holds missing slices (a gap).
POSITION_TOLERANCE = 0.25


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
        steps = np.diff(np.asarray(known))
        distinct = steps[steps > 1e-3]
        if distinct.size:
            spacing = float(np.median(distinct))
            out["spacing_mm"] = round(spacing, 4)
            out["repeated_positions"] = int(np.sum(steps < POSITION_TOLERANCE * spacing))
            big = distinct[distinct > (1 + POSITION_TOLERANCE) * spacing]
            out["gaps"] = int(sum(round(step / spacing) - 1 for step in big))
        else:
            out["repeated_positions"] = len(known) - 1
    if out["repeated_positions"]:
        out["findings"].append(f"{out['repeated_positions']} instance(s) repeat a slice position")
    if out["gaps"]:
        out["findings"].append(f"{out['gaps']} slice(s) missing between received positions")
    out["complete"] = not out["findings"]
    return out
