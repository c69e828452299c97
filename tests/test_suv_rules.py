"""SUVbw factors: one synthetic case per rule of pet-qc-facts.md section 4 -- decay correction,
scan and injection times, units (GML, CM2ML, Philips CNTS, Enhanced PET), and the refusals that
name the attribute and the fix.

Expected numbers are computed here from the QIBA Appendix G formula with hand-chosen decay
times (``expected_factor`` in tests/suv_helpers.py), never by calling the code under test:

    factor_g_per_bq = weight_kg * 1000 / (dose_bq * 2 ** (-decay_s / half_life_s))
"""

from __future__ import annotations

import pytest

from corelab.suv import SuvError, suvbw_factors
from corelab.suv_headers import ENHANCED_PET_IMAGE_STORAGE, PET_IMAGE_STORAGE
from tests.suv_helpers import DOSE_BQ, F18_HALF_LIFE_S, WEIGHT_KG, acr_time_s, expected_factor


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
