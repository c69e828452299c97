"""SUVbw factors: real vendor headers, a real clinical slice, and one synthetic case per rule.

Expected numbers are computed here from the QIBA Appendix G formula with hand-chosen decay
times, never by calling the code under test:

    factor_g_per_bq = weight_kg * 1000 / (dose_bq * 2 ** (-decay_s / half_life_s))
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

from corelab.suv import SuvError, header_from_dataset, suv_stats, suvbw_factors
from corelab.suv_headers import ENHANCED_PET_IMAGE_STORAGE, PET_IMAGE_STORAGE

DATA = Path(__file__).with_name("data")
VENDOR = DATA / "suv-vendor-headers"
CLINICAL = DATA / "pet-clinical" / "acrin-flt-breast-wholebody.dcm"

RTOL = 1e-6
F18_HALF_LIFE_S = 6586.2
WEIGHT_KG = 70.0
DOSE_BQ = 3.7e8


def expected_factor(decay_s: float, *, weight_kg: float = WEIGHT_KG, dose_bq: float = DOSE_BQ,
                    half_life_s: float = F18_HALF_LIFE_S) -> float:
    return weight_kg * 1000.0 / (dose_bq * 2.0 ** (-decay_s / half_life_s))


def acr_time_s(duration_s: float, half_life_s: float = F18_HALF_LIFE_S) -> float:
    """Average count-rate time in a frame, written out independently of corelab.suv."""
    lam = math.log(2) / half_life_s
    return (1 / lam) * math.log(lam * duration_s / (1 - math.exp(-lam * duration_s)))


def header(**overrides):
    """A classic BQML/START slice: injection 10:00:00, series = acquisition = 11:00:00."""
    h = {
        "SOPClassUID": PET_IMAGE_STORAGE,
        "Units": "BQML",
        "DecayCorrection": "START",
        "CorrectedImage": ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"],
        "SeriesDate": "20240101",
        "SeriesTime": "110000",
        "AcquisitionDate": "20240101",
        "AcquisitionTime": "110000",
        "FrameReferenceTime": 0,
        "ActualFrameDuration": 120000,
        "PatientWeight": WEIGHT_KG,
        "RadionuclideTotalDose": DOSE_BQ,
        "RadionuclideHalfLife": F18_HALF_LIFE_S,
        "RadiopharmaceuticalStartTime": "100000",
        "RadiopharmaceuticalStartDateTime": "20240101100000",
    }
    h.update(overrides)
    return {k: v for k, v in h.items() if v is not None}


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
# One synthetic case per rule
# ------------------------------------------------------------------------------------------


def test_start_series_reference():
    r = suvbw_factors([header()])
    assert r.units_path == "BQML"
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3600), rel=1e-12)
    assert r.decayed_dose_bq == pytest.approx(DOSE_BQ * 2 ** (-3600 / F18_HALF_LIFE_S), rel=1e-12)
    assert r.uptake_min == pytest.approx(60.0)
    assert r.dose_unit_assumed == "Bq"
    assert r.warnings == ()


def test_admin_does_not_decay():
    r = suvbw_factors([header(DecayCorrection="ADMIN")])
    assert r.factors_g_per_bq[0] == pytest.approx(WEIGHT_KG * 1000 / DOSE_BQ, rel=1e-12)
    assert r.decayed_dose_bq == DOSE_BQ
    assert r.uptake_min == pytest.approx(60.0)


def test_admin_needs_no_times_or_half_life():
    r = suvbw_factors([header(DecayCorrection="ADMIN", RadionuclideHalfLife=None,
                              RadiopharmaceuticalStartTime=None,
                              RadiopharmaceuticalStartDateTime=None)])
    assert r.factors_g_per_bq[0] == pytest.approx(WEIGHT_KG * 1000 / DOSE_BQ, rel=1e-12)
    assert "uptake_unknown" in r.warning_codes


def test_none_decays_each_slice_to_its_own_frame():
    corrected = ["NORM", "ATTN", "SCAT"]
    slices = [header(DecayCorrection="NONE", CorrectedImage=corrected,
                     AcquisitionTime=f"11{2 * i:02d}00") for i in range(3)]
    r = suvbw_factors(slices)
    assert r.scan_time_source == "slice_mid_frame"
    mid = acr_time_s(120.0)
    assert 59.9 < mid < 60.0
    for i, factor in enumerate(r.factors_g_per_bq):
        assert factor == pytest.approx(expected_factor(3600 + 120 * i + mid), rel=1e-12)
    assert r.factors_g_per_bq[0] < r.factors_g_per_bq[1] < r.factors_g_per_bq[2]
    assert r.factor_g_per_bq is None  # not one series factor
    assert r.uptake_min == pytest.approx((3600 + mid) / 60)


def test_none_without_frame_duration_is_refused():
    with pytest.raises(SuvError) as err:
        suvbw_factors([header(DecayCorrection="NONE", ActualFrameDuration=None,
                              CorrectedImage=["ATTN"])])
    assert err.value.code == "missing_frame_duration"
    assert "ActualFrameDuration" in str(err.value)


def test_start_time_only_uses_series_date():
    r = suvbw_factors([header(RadiopharmaceuticalStartDateTime=None,
                              RadiopharmaceuticalStartTime="101500.5")])
    assert r.injection_time_source == "RadiopharmaceuticalStartTime"
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3600 - 900.5), rel=1e-12)
    assert "midnight_crossing" not in r.warning_codes


def test_midnight_crossing():
    r = suvbw_factors([header(SeriesDate="20240102", SeriesTime="003000",
                              AcquisitionDate="20240102", AcquisitionTime="003000",
                              RadiopharmaceuticalStartDateTime=None,
                              RadiopharmaceuticalStartTime="233000")])
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3600), rel=1e-12)
    assert r.injection_datetime.day == 1 and r.injection_datetime.hour == 23
    assert "midnight_crossing" in r.warning_codes
    assert r.uptake_min == pytest.approx(60.0)


def test_start_datetime_across_midnight_needs_no_guess():
    r = suvbw_factors([header(SeriesDate="20240102", SeriesTime="003000",
                              AcquisitionDate="20240102", AcquisitionTime="003000",
                              RadiopharmaceuticalStartDateTime="20240101233000")])
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3600), rel=1e-12)
    assert "midnight_crossing" not in r.warning_codes


def test_series_after_acquisition_uses_frame_reference_time_in_ms():
    mid = acr_time_s(120.0)
    # Two bed positions; FrameReferenceTime (ms) points each back to 11:00:00 exactly.
    slices = [
        header(SeriesTime="130000", AcquisitionTime="110000", FrameReferenceTime=mid * 1000),
        header(SeriesTime="130000", AcquisitionTime="110200",
               FrameReferenceTime=(120 + mid) * 1000),
    ]
    r = suvbw_factors(slices)
    assert r.scan_time_source == "acquisition_frame_reference"
    assert "series_after_acquisition" in r.warning_codes
    for factor in r.factors_g_per_bq:
        assert factor == pytest.approx(expected_factor(3600), rel=1e-9)


def test_series_after_acquisition_without_frame_times_uses_earliest_acquisition():
    slices = [header(SeriesTime="130000", AcquisitionTime="110400"),
              header(SeriesTime="130000", AcquisitionTime="110000")]
    r = suvbw_factors(slices)
    assert r.scan_time_source == "earliest_acquisition"
    assert r.factors_g_per_bq == pytest.approx([expected_factor(3600)] * 2, rel=1e-12)


def test_series_after_acquisition_prefers_ge_private_datetime():
    r = suvbw_factors([header(SeriesTime="130000", AcquisitionTime="110000",
                              GEPrivatePostInjectionDateTime="20240101110500")])
    assert r.scan_time_source == "ge_private"
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3900), rel=1e-12)


def test_gml_without_suv_type_is_taken_as_suvbw():
    r = suvbw_factors([header(Units="GML"), header(Units="GML")])
    assert r.factors_g_per_bq == (1.0, 1.0)
    assert r.units_path == "GML"
    assert r.suv_type == "BW"
    assert "gml_assumed_suvbw" in r.warning_codes
    assert "SUVType (0054,1006)" in r.warnings[0].message


def test_cm2ml_is_suvbsa_and_needs_the_height():
    # The full set of SUV Types is tested in tests/test_suv_types.py.
    with pytest.raises(SuvError) as err:
        suvbw_factors([header(Units="CM2ML")])
    assert err.value.code == "missing_height" and err.value.attribute == "PatientSize"
    assert "PatientSize (0010,1020)" in str(err.value) and "BQML" in str(err.value)


def test_other_units_are_refused():
    with pytest.raises(SuvError) as err:
        suvbw_factors([header(Units="CPS")])
    assert err.value.code == "unsupported_units"
    assert "CPS" in str(err.value)


def test_philips_cnts_suv_scale_factor():
    r = suvbw_factors([header(Units="CNTS",
                              PhilipsPETPrivateGroup={"SUVScaleFactor": "0.000728 "})])
    assert r.units_path == "CNTS-philips-suv"
    assert r.factors_g_per_bq == (0.000728,)


def test_philips_cnts_activity_concentration_factor():
    r = suvbw_factors([header(Units="CNTS",
                              PhilipsPETPrivateGroup={"ActivityConcentrationScaleFactor": "1.6"})])
    assert r.units_path == "CNTS-philips-activity"
    assert r.factors_g_per_bq[0] == pytest.approx(1.6 * expected_factor(3600), rel=1e-12)


def test_philips_factors_that_disagree_are_reported():
    r = suvbw_factors([header(Units="CNTS", PhilipsPETPrivateGroup={
        "SUVScaleFactor": "0.0009", "ActivityConcentrationScaleFactor": "1.6"})])
    assert r.factors_g_per_bq == (0.0009,)
    assert "philips_factors_disagree" in r.warning_codes


def test_cnts_without_philips_factors_is_refused():
    with pytest.raises(SuvError) as err:
        suvbw_factors([header(Units="CNTS", PhilipsPETPrivateGroup={})])
    assert err.value.code == "missing_philips_scale_factor"
    assert "7053,1000" in str(err.value) and "7053,1009" in str(err.value)


def test_enhanced_pet_dose_is_mbq():
    r = suvbw_factors([header(SOPClassUID=ENHANCED_PET_IMAGE_STORAGE, RadionuclideTotalDose=370.0)])
    assert r.dose_unit_assumed == "MBq"
    assert r.dose_bq == pytest.approx(3.7e8)
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3600), rel=1e-12)


def test_enhanced_pet_dose_in_bq_is_refused():
    with pytest.raises(SuvError) as err:
        suvbw_factors([header(SOPClassUID=ENHANCED_PET_IMAGE_STORAGE)])
    assert err.value.code == "dose_looks_like_bq"


def test_classic_dose_in_mbq_is_converted_with_a_warning():
    # Facts section 4: recognise the unit by its value, compute, warn, keep it a deviation.
    r = suvbw_factors([header(RadionuclideTotalDose=370.0)])
    assert r.dose_unit_assumed == "MBq"
    assert r.dose_bq == 370.0 * 1e6
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3600), rel=1e-12)
    [w] = [w for w in r.warnings if w.code == "dose_looks_like_mbq"]
    assert "RadionuclideTotalDose (0018,1074)" in w.message and "MBq" in w.message
    assert "370000000" in w.message  # the corrected value the site should send
    assert "deviation" in w.message and "20240101" not in w.message


@pytest.mark.parametrize("dose", [0.05, 2.0e11])
def test_dose_implausible_in_either_unit_is_refused(dose):
    # 0.05 MBq = 5e4 Bq is below 1e5 Bq; 2e11 Bq is above 1e11 Bq.
    with pytest.raises(SuvError) as err:
        suvbw_factors([header(RadionuclideTotalDose=dose)])
    assert err.value.code == "dose_implausible" and err.value.attribute == "RadionuclideTotalDose"


@pytest.mark.parametrize(
    ("overrides", "code", "keyword"),
    [
        ({"PatientWeight": None}, "missing_weight", "PatientWeight"),
        ({"PatientWeight": ""}, "missing_weight", "PatientWeight"),
        ({"PatientWeight": 0}, "missing_weight", "PatientWeight"),
        ({"RadionuclideTotalDose": None}, "missing_dose", "RadionuclideTotalDose"),
        ({"RadionuclideTotalDose": 0.0}, "missing_dose", "RadionuclideTotalDose"),
        ({"RadionuclideHalfLife": None}, "missing_half_life", "RadionuclideHalfLife"),
        ({"RadionuclideHalfLife": "  "}, "missing_half_life", "RadionuclideHalfLife"),
        ({"RadiopharmaceuticalStartTime": None, "RadiopharmaceuticalStartDateTime": None},
         "missing_injection_time", "RadiopharmaceuticalStartTime"),
        ({"Units": None}, "missing_units", "Units"),
        ({"DecayCorrection": None}, "missing_decay_correction", "DecayCorrection"),
        ({"SeriesDate": None, "SeriesTime": None, "AcquisitionDate": None,
          "AcquisitionTime": None}, "missing_scan_time", "SeriesTime"),
        ({"RadiopharmaceuticalStartDateTime": "20240101120000"}, "injection_after_scan",
         "RadiopharmaceuticalStartDateTime"),
        ({"CorrectedImage": ["NORM", "DECY"]}, "not_attenuation_corrected", "CorrectedImage"),
        ({"AcquisitionTime": "1161"}, "unparseable_value", "AcquisitionTime"),
    ],
)
def test_uncomputable_series_names_attribute_and_fix(overrides, code, keyword):
    with pytest.raises(SuvError) as err:
        suvbw_factors([header(**overrides)])
    e = err.value
    assert e.code == code
    assert e.attribute == keyword
    assert keyword in e.message
    assert "site should" in e.message  # actionable
    assert "20240101" not in str(e)  # no calendar dates in messages


def test_inconsistent_series_is_refused():
    with pytest.raises(SuvError) as err:
        suvbw_factors([header(), header(PatientWeight=80.0)])
    assert err.value.code == "inconsistent_series"
    assert err.value.attribute == "PatientWeight"
    assert "70.0" in str(err.value) and "80.0" in str(err.value)


def test_no_slices():
    with pytest.raises(SuvError) as err:
        suvbw_factors([])
    assert err.value.code == "no_slices"


def test_single_header_instead_of_list_is_a_type_error():
    with pytest.raises(TypeError):
        suvbw_factors(header())


def test_nested_radiopharmaceutical_sequence_in_a_dict():
    h = header()
    item = {k: h.pop(k) for k in ("RadionuclideTotalDose", "RadionuclideHalfLife",
                                   "RadiopharmaceuticalStartTime",
                                   "RadiopharmaceuticalStartDateTime")}
    h["RadiopharmaceuticalInformationSequence"] = [item]
    r = suvbw_factors([h])
    assert r.factors_g_per_bq[0] == pytest.approx(expected_factor(3600), rel=1e-12)


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
