"""Imaging manual -> Great Expectations suite -> findings; header table columns."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from expectations.header_table import COLUMNS, add_cross_scan_columns, iterations_subsets, missing_slices
from expectations.manual import SUITES_DIR, ManualError, compile_suite, load_manual, suite_name, validate, write_suite


@pytest.fixture(scope="module")
def manual():
    return load_manual("FDG-RESP-01")


def test_every_rule_checks_a_documented_column(manual):
    assert manual.rules and manual.columns <= set(COLUMNS)
    assert {r.severity for r in manual.rules} <= {"major", "minor"}


def test_stored_suite_is_the_compiled_manual(manual, tmp_path):
    """The suite kept in the repo is what the manual compiles to (recompile when the manual changes)."""
    fresh = json.loads(write_suite(manual, tmp_path).read_text())
    stored = json.loads((SUITES_DIR / f"{suite_name(manual)}.json").read_text())
    assert fresh == stored
    assert len(compile_suite(manual).expectations) == sum(len(r.checks) for r in manual.rules)


def _row(uid, **over):
    base = {"series_uid": uid, "units": "BQML", "decay_correction": "START", "corrected_attn_decy": True,
            "weight_kg": 70.0, "suv_factor_g_per_bq": 2e-4, "activity_mbq": 250.0, "activity_mbq_per_kg": 3.6,
            "uptake_min": 61.0, "uptake_diff_vs_baseline_min": None, "same_scanner_as_baseline": None,
            "scanner_accredited": True, "software_matches_register": True, "slices_missing": 0,
            "same_reconstruction_as_baseline": None, "days_since_baseline": None, "header_problems": ""}
    return {**base, **over}


@pytest.mark.parametrize("over, rule", [
    ({"units": "CNTS"}, "units_bqml"),
    ({"weight_kg": None}, "weight_recorded"),
    ({"activity_mbq": 0.00037}, "activity_plausible_mbq"),
    ({"activity_mbq_per_kg": 6.1}, "activity_per_kg"),
    ({"uptake_min": 54.9}, "uptake_window"),
    ({"uptake_min": 75.1}, "uptake_window"),
    ({"uptake_diff_vs_baseline_min": -10.5}, "followup_uptake_matches_baseline"),
    ({"same_scanner_as_baseline": False}, "same_scanner_as_baseline"),
    ({"scanner_accredited": False}, "scanner_accredited"),
    ({"software_matches_register": False}, "scanner_software_registered"),
    ({"slices_missing": 1}, "series_complete"),
    ({"same_reconstruction_as_baseline": False}, "same_reconstruction_as_baseline"),
    ({"days_since_baseline": 70}, "followup_visit_window"),
    ({"header_problems": "missing: DeviceSerialNumber"}, "header_complete"),
    ({"corrected_attn_decy": False}, "attenuation_and_decay_corrected"),
])
def test_each_rule_fires_alone_in_one_batch(manual, over, rule):
    table = pd.DataFrame([_row("clean-1"), _row("bad", **over), _row("clean-2")])
    findings = validate(manual, table).findings
    assert [(f.series_uid, f.rule.id) for f in findings] == [("bad", rule)]


def test_boundaries_are_inclusive_and_nulls_not_flagged_by_range_rules(manual):
    table = pd.DataFrame([_row("a", uptake_min=55.0), _row("b", uptake_min=75.0, uptake_diff_vs_baseline_min=10.0)])
    assert validate(manual, table).findings == []


def test_missing_column_is_a_finding_of_its_not_null_rule(manual):
    table = pd.DataFrame([{k: v for k, v in _row("x").items() if k != "weight_kg"}])
    assert {f.rule.id for f in validate(manual, table).findings} == {"weight_recorded"}


def test_manual_errors_name_the_rule(tmp_path):
    bad = tmp_path / "T.yaml"
    bad.write_text("trial: T\nversion: 1\nrules:\n  - {id: r1, section: '1', severity: fatal, column: x, "
                   "check: in_set, message: m}\n")
    with pytest.raises(ManualError, match="r1 has severity 'fatal'"):
        load_manual(bad)
    with pytest.raises(ManualError, match="not found"):
        load_manual("NO-SUCH-TRIAL")


def test_cross_scan_columns():
    recon = {"reconstruction_method": "PSF+TOF 4i5s", "iterations": 4, "subsets": 5, "convolution_kernel": "G4",
             "matrix": "200x200"}
    df = pd.DataFrame([
        {"subject": "S1", "visit": "baseline", "scanner": "A", "uptake_min": 60.0, "study_date": "2021-03-01", **recon},
        {"subject": "S1", "visit": "followup", "scanner": "B", "uptake_min": 72.5, "study_date": "2021-04-19",
         **recon, "subsets": 10},
        {"subject": "S3", "visit": "baseline", "scanner": "A", "uptake_min": 60.0, "study_date": None, **recon},
        {"subject": "S3", "visit": "followup", "scanner": "A", "uptake_min": 59.0, "study_date": None, **recon},
        {"subject": "S2", "visit": "followup", "scanner": "A", "uptake_min": 60.0, "study_date": None, **recon},
    ])
    out = add_cross_scan_columns(df)
    assert out["uptake_diff_vs_baseline_min"].tolist() == [None, 12.5, None, -1.0, None]
    assert out["same_scanner_as_baseline"].tolist() == [None, False, None, True, None]
    assert out["same_reconstruction_as_baseline"].tolist() == [None, False, None, True, None]
    assert out["days_since_baseline"].tolist() == [None, 49, None, None, None]


@pytest.mark.parametrize("method, expected", [("PSF+TOF 4i5s", (4, 5)), ("OSEM3D 2i21s", (2, 21)),
                                              ("BLOB-OS-TF 3i 11s", (3, 11)), ("VPFXS", (None, None))])
def test_iterations_and_subsets_parsed(method, expected):
    assert iterations_subsets(method) == expected


def test_missing_slices_from_gaps_and_header_count():
    positions = np.arange(10) * 3.0
    assert missing_slices(positions, expected=10) == 0
    assert missing_slices(np.delete(positions, 4), expected=10) == 1     # a gap inside
    assert missing_slices(positions[:-1], expected=10) == 1               # the last one, only the count knows
    assert missing_slices(np.delete(positions, [3, 4]), expected=None) == 2


def test_the_manuals_visit_list_reaches_the_deidentification_check(tmp_path):
    """A label in ClinicalTrialTimePointID that is not one of the manual's visits is refused:
    the manual's list becomes the trial's policy, and a register's own policy adds to it."""
    from sqlmodel import Session

    from corelab.db import make_engine, migrate
    from corelab.deid import DeidPolicy
    from corelab.models import Trial
    from corelab.register import load_register
    from expectations.manual import trial_fields

    assert trial_fields("FDG-RESP-01")["deid_policy"] == {"visit_labels": ["baseline", "followup"]}
    register = tmp_path / "register.yaml"
    register.write_text("trial_code: FDG-RESP-01\ndeid_policy: {private_tags: remove_all}\nsites: []\n")
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    migrate(engine)
    with Session(engine) as session:
        load_register(session, register, trial_fields=trial_fields)
        session.commit()
        trial = session.query(Trial).one()
        policy = DeidPolicy.from_dict(trial.deid_policy)
    assert policy.visit_labels == ("baseline", "followup") and trial.deid_policy["private_tags"] == "remove_all"
