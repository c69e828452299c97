"""SUVbw factors: real vendor headers, a real clinical slice, the pydicom Dataset adapter, suv_stats.

Expected numbers are computed here from the QIBA Appendix G formula with hand-chosen decay
times, never by calling the code under test:

    factor_g_per_bq = weight_kg * 1000 / (dose_bq * 2 ** (-decay_s / half_life_s))

One synthetic case per rule is in tests/test_suv_rules.py; the hand-written formula is in
tests/suv_helpers.py.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from corelab.suv import header_from_dataset, suv_stats, suvbw_factors
from corelab.suv_headers import PET_IMAGE_STORAGE
from tests.suv_helpers import VENDOR, acr_time_s, expected_factor

DATA = Path(__file__).with_name("data")
CLINICAL = DATA / "pet-clinical" / "acrin-flt-breast-wholebody.dcm"

RTOL = 1e-6


# ------------------------------------------------------------------------------------------
# Ground truth from outside the project
# ------------------------------------------------------------------------------------------

with (VENDOR / "expected_suvbw.csv").open(newline="") as fh:
    VENDOR_CASES = list(csv.DictReader(fh))


def test_all_eight_vendor_cases_are_present():
    assert len(VENDOR_CASES) == 8
    for row in VENDOR_CASES:
        assert (VENDOR / row["metadata_file"]).is_file()


@pytest.mark.parametrize("row", VENDOR_CASES, ids=[r["case"] for r in VENDOR_CASES])
def test_vendor_case_every_instance(row):
    # The CSV gives one factor per case (series); every instance must reproduce it.
    instances = json.loads((VENDOR / row["metadata_file"]).read_text())
    assert len(instances) == 3
    expected = float(row["expected_suvbw_factor_g_per_Bq"])
    result = suvbw_factors(instances)
    assert len(result.factors_g_per_bq) == len(instances)
    for factor in result.factors_g_per_bq:
        assert factor == pytest.approx(expected, rel=RTOL)


def test_vendor_paths_taken():
    def run(case):
        return suvbw_factors(json.loads((VENDOR / f"{case}-instances.json").read_text()))

    assert run("PHILIPS_CNTS_AND_SUV").units_path == "CNTS-philips-suv"
    both = run("PHILIPS_CNTS_AND_BQML_SUV")
    assert both.units_path == "CNTS-philips-suv"
    assert "philips_factors_disagree" not in both.warning_codes  # the two factors agree
    assert run("PHILIPS_BQML").units_path == "BQML"
    post = run("BQML_AC_DT_lessThan_S_DT_SIEMENS")
    assert post.scan_time_source == "acquisition_frame_reference"
    assert "series_after_acquisition" in post.warning_codes
    assert run("CPS_AND_BQML_AC_DT_-_S_DT").scan_time_source == "earliest_acquisition"
    assert run("RADIOPHARM_DATETIME_UNDEFINED").injection_time_source == \
        "RadiopharmaceuticalStartTime"
    assert run("GE_MEDICAL_AND_BQML").injection_time_source == "RadiopharmaceuticalStartDateTime"


def test_half_frame_approximation_would_miss_the_post_processed_fixture():
    # Why the exact average-count-rate time is used: AcquisitionTime + D/2 - FrameReferenceTime
    # misses BQML_AC_DT_lessThan_S_DT_SIEMENS by more than the 1e-6 tolerance.
    h = json.loads((VENDOR / "BQML_AC_DT_lessThan_S_DT_SIEMENS-instances.json").read_text())[0]
    expected = next(float(r["expected_suvbw_factor_g_per_Bq"]) for r in VENDOR_CASES
                    if r["case"] == "BQML_AC_DT_lessThan_S_DT_SIEMENS")
    acq_s = 12 * 3600 + 35 * 60 + 14.999995
    inj_s = 11 * 3600 + 41 * 60
    half = h["ActualFrameDuration"] / 2000 - h["FrameReferenceTime"] / 1000
    exact = acr_time_s(h["ActualFrameDuration"] / 1000) - h["FrameReferenceTime"] / 1000
    f_half = expected_factor(acq_s + half - inj_s, weight_kg=65, dose_bq=225e6)
    f_exact = expected_factor(acq_s + exact - inj_s, weight_kg=65, dose_bq=225e6)
    assert abs(f_half - expected) / expected > 5e-6
    assert f_exact == pytest.approx(expected, rel=1e-9)


def test_clinical_slice_read_with_pydicom():
    ds = pydicom.dcmread(CLINICAL)
    h = header_from_dataset(ds)
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(h)
    assert h["Units"] == "BQML" and h["DecayCorrection"] == "START"
    assert h["RadionuclideTotalDose"] == pytest.approx(178340011.59668)
    for result in (suvbw_factors([h]), suvbw_factors([ds])):
        assert result.factors_g_per_bq[0] == pytest.approx(5.942485e-4, rel=RTOL)
        assert result.scan_time_source == "series"
        # injection 14:17:00, series 15:23:16.921
        assert result.uptake_min == pytest.approx(66 + 16.921 / 60, rel=1e-9)
        assert result.warnings == ()


# ------------------------------------------------------------------------------------------
# Dataset adapter
# ------------------------------------------------------------------------------------------


def _dataset(**overrides) -> Dataset:
    ds = Dataset()
    ds.PatientName = "NOT^EXTRACTED"
    ds.PatientID = "NOT-EXTRACTED"
    ds.SOPClassUID = PET_IMAGE_STORAGE
    ds.Units = "CNTS"
    ds.DecayCorrection = "START"
    ds.CorrectedImage = ["ATTN", "DECY"]
    ds.SeriesDate, ds.SeriesTime = "20240101", "130000"
    ds.AcquisitionDate, ds.AcquisitionTime = "20240101", "110000"
    ds.FrameReferenceTime = "0"
    ds.ActualFrameDuration = 120000
    ds.PatientWeight = "70"
    item = Dataset()
    item.RadionuclideTotalDose = "370000000"
    item.RadionuclideHalfLife = "6586.2"
    item.RadiopharmaceuticalStartTime = "100000"
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    ge = ds.private_block(0x0009, "GEMS_PETD_01", create=True)
    ge.add_new(0x0D, "DT", "20240101110500")
    philips = ds.private_block(0x7053, "Philips PET Private Group", create=True)
    philips.add_new(0x00, "DS", "0.000551")
    philips.add_new(0x09, "DS", "1.602563")
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def test_header_from_dataset_reads_private_tags_and_nothing_identifying():
    h = header_from_dataset(_dataset())
    assert h["GEPrivatePostInjectionDateTime"] == "20240101110500"
    assert h["PhilipsPETPrivateGroup"] == {"SUVScaleFactor": 0.000551,
                                           "ActivityConcentrationScaleFactor": 1.602563}
    assert h["RadionuclideTotalDose"] == 370000000.0
    assert h["PatientWeight"] == 70.0
    assert "NOT" not in json.dumps(h)


def test_dataset_philips_activity_factor_and_ge_time():
    ds = _dataset()
    del ds[0x70531000]  # keep only (7053,1009)
    r = suvbw_factors([ds])
    assert r.units_path == "CNTS-philips-activity"
    assert r.scan_time_source == "ge_private"  # series 13:00 is after acquisition 11:00
    assert r.factors_g_per_bq[0] == pytest.approx(1.602563 * expected_factor(3900), rel=1e-12)


def test_header_from_dataset_without_private_groups():
    ds = _dataset(Units="BQML")
    del ds[0x00090010], ds[0x0009100D], ds[0x70531000], ds[0x70531009], ds[0x70530010]
    h = header_from_dataset(ds)
    assert "GEPrivatePostInjectionDateTime" not in h and "PhilipsPETPrivateGroup" not in h
    r = suvbw_factors([ds])
    assert r.scan_time_source == "earliest_acquisition"
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3600), rel=1e-12)


# ------------------------------------------------------------------------------------------
# suv_stats
# ------------------------------------------------------------------------------------------


def test_suv_stats_per_slice_factors_and_zero_voxels():
    volume = np.array([[[0, 1000], [3000, 0]],
                       [[2000, 4000], [0, 0]]], dtype=np.int32)
    # SUVs: slice 0 -> 1.0, 3.0 ; slice 1 -> 1.0, 2.0 (zeros excluded)
    smin, smean, smax = suv_stats(volume, [1e-3, 5e-4])
    assert (smin, smax) == (pytest.approx(1.0), pytest.approx(3.0))
    assert smean == pytest.approx((1.0 + 3.0 + 1.0 + 2.0) / 4)


def test_suv_stats_empty_and_mismatch():
    assert all(math.isnan(v) for v in suv_stats(np.zeros((2, 3, 3)), [1.0, 1.0]))
    with pytest.raises(ValueError, match="one factor per slice"):
        suv_stats(np.ones((3, 2, 2)), [1.0, 1.0])
