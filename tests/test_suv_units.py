"""SUV inputs in the wrong unit or place (issue 10, item 4): doses in MBq and weights in g
recognised by their value, the Philips private creator of the CNTS factors, the synthetic
trial's "dose in MBq" series, and the real vendor headers still normalised by body weight.

Expected values are worked out by hand (pet-qc-facts.md section 4), never by calling corelab.
The SUV Types themselves are in tests/test_suv_types.py.
"""

from __future__ import annotations

import io
import json

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from corelab.suv import SuvError, header_from_dataset, suvbw_factors
from corelab.suv_headers import PET_IMAGE_STORAGE
from tests.suv_helpers import F18_HALF_LIFE_S, SUV_X, VENDOR, gml


# ------------------------------------------------------------------------------------------
# Units recognised by their value: weight in g, dose in MBq
# ------------------------------------------------------------------------------------------


def bqml(**overrides):
    """Classic BQML/START slice: injection 10:00, scan 11:00, 70 kg, 370 MBq."""
    h = {"SOPClassUID": PET_IMAGE_STORAGE, "Units": "BQML", "DecayCorrection": "START",
         "CorrectedImage": ["ATTN", "DECY"], "SeriesDate": "20240101", "SeriesTime": "110000",
         "AcquisitionDate": "20240101", "AcquisitionTime": "110000", "PatientWeight": 70.0,
         "RadionuclideTotalDose": 3.7e8, "RadionuclideHalfLife": F18_HALF_LIFE_S,
         "RadiopharmaceuticalStartDateTime": "20240101100000"}
    h.update(overrides)
    return {k: v for k, v in h.items() if v is not None}


# 70 kg * 1000 / (3.7e8 Bq * 2^(-3600 / 6586.2)) g/Bq
FACTOR_70KG_370MBQ = 70.0 * 1000 / (3.7e8 * 2 ** (-3600 / F18_HALF_LIFE_S))


def test_bqml_result_is_normalised_by_body_weight():
    r = suvbw_factors([bqml()])
    assert r.factors_g_per_bq[0] == pytest.approx(FACTOR_70KG_370MBQ, rel=1e-12)
    assert r.suv_type == "BW"
    assert r.to_dict()["normalisation"] == {"suv_type": "BW", "name": "bw", "value": 70.0, "unit": "kg",
                                            "sex_used": None, "male_female": None}


def test_weight_in_grams_is_converted_with_a_warning():
    r = suvbw_factors([bqml(PatientWeight=70000.0)])
    assert r.weight_kg == 70.0
    assert r.factors_g_per_bq[0] == pytest.approx(FACTOR_70KG_370MBQ, rel=1e-12)
    [w] = [w for w in r.warnings if w.code == "weight_looks_like_grams"]
    assert "PatientWeight (0010,1030)" in w.message and " g " in w.message and "70 kg" in w.message
    assert "weight_implausible" not in r.warning_codes


def test_weight_at_the_grams_threshold_stays_kg():
    r = suvbw_factors([bqml(PatientWeight=1000.0)])  # > 1000 means g; 1000 itself is kg
    assert r.weight_kg == 1000.0
    assert "weight_looks_like_grams" not in r.warning_codes and "weight_implausible" in r.warning_codes


def test_weight_in_grams_in_a_gml_conversion():
    r = suvbw_factors([gml(SUVType="LBMJAMES128", PatientWeight=80000.0)])
    assert SUV_X * r.factors_g_per_bq[0] == pytest.approx(3.826771653543307, rel=1e-12)
    assert "weight_looks_like_grams" in r.warning_codes


def test_dose_in_mbq_and_weight_in_grams_together():
    r = suvbw_factors([bqml(PatientWeight=70000.0, RadionuclideTotalDose=370.0)])
    assert r.factors_g_per_bq[0] == pytest.approx(FACTOR_70KG_370MBQ, rel=1e-12)
    assert {"weight_looks_like_grams", "dose_looks_like_mbq"} <= set(r.warning_codes)
    assert r.dose_unit_assumed == "MBq"
    messages = " ".join(w.message for w in r.warnings)
    assert "RadionuclideTotalDose (0018,1074)" in messages and "20240101" not in messages


def test_dose_just_below_the_bq_threshold_is_taken_as_mbq():
    r = suvbw_factors([bqml(RadionuclideTotalDose=99999.0, DecayCorrection="ADMIN")])
    # 99999 MBq = 9.9999e10 Bq (ADMIN: no decay): factor = 70000 / 9.9999e10
    assert r.factors_g_per_bq[0] == pytest.approx(70000 / 9.9999e10, rel=1e-12)
    r = suvbw_factors([bqml(RadionuclideTotalDose=1e5, DecayCorrection="ADMIN")])
    assert r.dose_unit_assumed == "Bq" and r.factors_g_per_bq[0] == pytest.approx(70000 / 1e5)


# ------------------------------------------------------------------------------------------
# Philips CNTS: factors without their private creator, or under another one; factor 0
# ------------------------------------------------------------------------------------------


def _cnts_dataset(creator: str | None, *, suv_factor="0.000551", activity_factor=None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = PET_IMAGE_STORAGE
    ds.Units = "CNTS"
    ds.DecayCorrection = "START"
    ds.PatientWeight = "70"
    if creator is not None:
        ds.add_new(0x70530010, "LO", creator)
    ds.add_new(0x70531000, "DS", suv_factor)
    if activity_factor is not None:
        ds.add_new(0x70531009, "DS", activity_factor)
    return ds


def _round_trip_implicit(ds: Dataset) -> Dataset:
    """Write and read back in implicit VR: the private elements come back as UN bytes."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.mark.parametrize("implicit", [False, True])
def test_philips_factor_without_its_private_creator_is_accepted_with_a_warning(implicit):
    ds = _cnts_dataset(None)
    if implicit:
        ds = _round_trip_implicit(ds)
        assert ds[0x70531000].VR == "UN"
    assert header_from_dataset(ds)["PhilipsPETPrivateGroup"] == {"SUVScaleFactor": pytest.approx(0.000551)
                                                                 if not implicit else "0.000551",
                                                                 "PrivateCreator": ""}
    r = suvbw_factors([ds])
    assert r.units_path == "CNTS-philips-suv" and r.factors_g_per_bq == (0.000551,)
    [w] = [w for w in r.warnings if w.code == "philips_private_creator_missing"]
    assert "(7053,0010)" in w.message


def test_philips_factor_under_another_private_creator_is_refused():
    ds = _cnts_dataset("ACME PRIVATE 1")
    with pytest.raises(SuvError) as err:
        suvbw_factors([ds])
    e = err.value
    assert e.code == "philips_private_creator_mismatch"
    assert "ACME PRIVATE 1" in e.message and "(7053,0010)" in e.message and "site should" in e.message


def test_philips_factor_under_its_own_creator_gives_no_warning():
    r = suvbw_factors([_cnts_dataset("Philips PET Private Group")])
    assert r.factors_g_per_bq == (0.000551,) and r.warnings == ()


def test_another_creator_does_not_matter_for_bqml():
    ds = _cnts_dataset("ACME PRIVATE 1")
    ds.Units = "BQML"  # the factors are not used: no refusal; the BQML inputs are then missing
    with pytest.raises(SuvError) as err:
        suvbw_factors([ds])
    assert err.value.code != "philips_private_creator_mismatch"


def test_philips_factor_zero_means_not_convertible():
    with pytest.raises(SuvError) as err:
        suvbw_factors([_cnts_dataset("Philips PET Private Group", suv_factor="0")])
    assert err.value.code == "philips_not_convertible"
    assert "factor 0 means not convertible" in err.value.message


def test_philips_suv_factor_zero_falls_back_to_the_activity_factor():
    h = bqml(Units="CNTS", PhilipsPETPrivateGroup={"SUVScaleFactor": "0",
                                                   "ActivityConcentrationScaleFactor": "1.6"})
    r = suvbw_factors([h])
    assert r.units_path == "CNTS-philips-activity"
    assert r.factors_g_per_bq[0] == pytest.approx(1.6 * FACTOR_70KG_370MBQ, rel=1e-12)


def test_philips_factor_zero_without_creator_is_still_not_convertible():
    with pytest.raises(SuvError) as err:
        suvbw_factors([_cnts_dataset(None, suv_factor="0")])
    assert err.value.code == "philips_not_convertible"


# ------------------------------------------------------------------------------------------
# QC still reports the synthetic trial's "dose in MBq" although SUV now converts it
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    from synth.spec import small_spec
    from synth.trial import generate_trial

    return generate_trial(tmp_path_factory.mktemp("suv-trial"), small_spec(), seed=7)


def test_dose_in_mbq_series_gets_suv_and_still_its_deviations(trial):
    import pandas as pd

    from expectations.header_table import header_row
    from expectations.manual import load_manual, validate
    from synth.truth import FINDINGS_OF_PROBLEM
    from tests.synth_fixtures import series_files

    [problem] = [p for p in trial.problems if p["code"] == "dose_in_mbq"]
    [entry] = [s for s in trial.series if s["series_uid"] == problem["series_uid"]]
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in series_files(trial.outdir, entry)]
    assert float(datasets[0].RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose) < 1e5

    row = header_row(datasets)
    # SUV is computed with the dose converted to Bq, and agrees with the ground truth ...
    assert row["suv_error"] is None
    assert row["suv_factor_g_per_bq"] == pytest.approx(entry["truth"]["suvbw_factor_g_per_bq"], rel=1e-6)
    # ... while the header rules still see the MBq entry and report it to the site.
    manual = load_manual("FDG-RESP-01")
    header_rules = {"activity_plausible_mbq", "activity_per_kg", "suv_computable"}
    found = {f.rule.id for f in validate(manual, pd.DataFrame([row])).findings} & header_rules
    assert found == {"activity_plausible_mbq", "activity_per_kg"}
    assert FINDINGS_OF_PROBLEM["dose_in_mbq"] == found
    assert not any(p["series_uid"] == entry["series_uid"] and p["code"] != "dose_in_mbq"
                   for p in trial.problems)


# ------------------------------------------------------------------------------------------
# The real vendor headers: still SUVbw, normalised by the recorded weight, no new warnings
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(VENDOR.glob("*-instances.json")), ids=lambda p: p.stem)
def test_vendor_headers_are_bw_normalised_without_unit_guesses(path):
    import csv

    instances = json.loads(path.read_text())
    with (VENDOR / "expected_suvbw.csv").open(newline="") as fh:
        expected = {r["metadata_file"]: float(r["expected_suvbw_factor_g_per_Bq"]) for r in csv.DictReader(fh)}
    r = suvbw_factors(instances)
    assert all(abs(f / expected[path.name] - 1) < 1e-6 for f in r.factors_g_per_bq)
    assert r.suv_type == "BW"
    n = r.to_dict()["normalisation"]
    assert (n["name"], n["unit"], n["value"]) == ("bw", "kg", float(instances[0]["PatientWeight"]))
    new_codes = {"dose_looks_like_mbq", "weight_looks_like_grams", "philips_private_creator_missing",
                 "sex_not_specified"}
    assert not new_codes & set(r.warning_codes)
