"""A small core lab for tests that need a whole store: one synthetic trial ingested, its phantoms
accredited and its PET series checked against the imaging manual (no Prefect).

Used by tests/test_reports.py and the portal tests (imported, not a conftest).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

from sqlmodel import select

from accreditation.evaluate import evaluate_series_folder, record_evaluation
from corelab.db import session_scope
from corelab.ingest import ingest_path, series_dir
from corelab.models import Series
from corelab.register import load_register
from corelab.settings import Settings, load_settings
from expectations.manual import load_manual, trial_fields
from expectations.qc import qc_series_batch, trial_pet_series
from phantoms.fill import load_fill_sheet
from synth.spec import small_spec
from synth.trial import generate_trial

SITES = ("A01", "B02", "C03")


def build_lab(root: Path) -> tuple[Settings, dict]:
    """Generate, ingest, accredit and check the small trial under ``root``; returns the settings
    of its data directory and the trial's ground truth."""
    trial_dir = root / "trial"
    spec = dataclasses.replace(small_spec(), first_scan_date=(dt.date.today() - dt.timedelta(days=21)).isoformat())
    for scanner in spec.scanners:
        if scanner.accredited:
            scanner.nema_fwhm_mm = 7.5  # inside every EARL1 band at the small spec's 5 mm voxels (measured)
    generate_trial(trial_dir, spec, seed=2)
    truth = json.loads((trial_dir / "ground_truth.json").read_text())
    settings = load_settings({"CORELAB_DATA_DIR": str(root / "corelab-data")})
    settings.ensure_dirs()
    code = truth["trial_code"]
    with session_scope(settings) as session:
        load_register(session, trial_dir / "register.yaml", trial_fields=trial_fields)
        for site in SITES:
            ingest_path(session, settings, trial_dir / "sites" / site, site_code=site)
    with session_scope(settings) as session:
        for series in session.exec(select(Series).where(Series.kind == "phantom", Series.state == "complete")):
            folder = series_dir(settings, series, session)
            record_evaluation(session, series, evaluate_series_folder(folder, load_fill_sheet(folder / "fill.yaml")),
                              scope=code)
    manual = load_manual(code)
    with session_scope(settings) as session:
        qc_series_batch(session, settings, manual, trial_pet_series(session, code, needing_version=manual.version))
    return settings, truth
