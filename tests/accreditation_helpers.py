"""Helpers shared by the phantom-accreditation tests on real-world input (imported, not a conftest).

The ``drop`` fixture writes one scanner's NEMA IEC and cylinder phantom scans as a site drops
them; ``_phantoms`` finds the received phantom series in a data directory. Used by
tests/test_accreditation_withheld.py and tests/test_accreditation_resend.py.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlmodel import select

from corelab.db import session_scope
from corelab.ingest import series_dir
from corelab.models import Series
from phantoms.fill import load_fill_sheet
from synth.spec import small_spec

DAY = dt.date(2031, 3, 4)


# ---------------------------------------------------------------------------------------------
# fixtures: one scanner's NEMA IEC and cylinder phantom scans, as a site drops them
# ---------------------------------------------------------------------------------------------
def _write_drop(out: Path) -> tuple[Path, dict, dict]:
    """Scanner A01-1's NEMA IEC and cylinder phantom scans written to ``out``: ``(out, nema, cyl)``."""
    from synth.trial import _write_phantom

    spec = small_spec()
    scanner = next(s for s in spec.scanners if s.id == "A01-1")
    scanner.nema_fwhm_mm = 7.5  # inside every EARL1 band at 5 mm voxels (as in test_reports)
    nema = _write_phantom(out, spec, scanner, "nema_iec", 0, DAY)
    cyl = _write_phantom(out, spec, scanner, "uniform_cylinder", 0, DAY)
    return out, nema, cyl


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    return _write_drop(tmp_path_factory.mktemp("drop"))


def _phantoms(settings) -> dict[str, tuple[int, Path]]:
    with session_scope(settings) as session:
        rows = session.exec(select(Series).where(Series.kind == "phantom")).all()
        out = {}
        for s in rows:
            folder = series_dir(settings, s, session)
            out[load_fill_sheet(folder / "fill.yaml").kind] = (s.id, folder)
        return out
