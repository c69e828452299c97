"""SUV Types (issue 10, item 4): the SUV Types of GML/CM2ML images, sex O or missing, the
refusals that name the attribute, and what ``corelab suv --json`` reports.

Every expected value is worked out here by hand from the formulas of pet-qc-facts.md section 4,
never by calling corelab (W weight in kg, H height in cm = PatientSize in m x 100):

    SUVbw = SUVx * W_g / N_x   (N_x: LBM or IBW in g, or BSA in cm2)

The running example is W = 80 kg, H = 180 cm (PatientSize 1.80), so (W/H)^2 = 0.1975308642,
BMI = 80 / 1.8^2 = 24.69135802 kg/m2, and an image value SUVx = 3.0 (``gml`` in
tests/suv_helpers.py). Doses in MBq, weights in g and the Philips private creator are in
tests/test_suv_units.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from corelab.suv import SuvError, suvbw_factors
from tests.suv_helpers import H_CM, SUV_X, W_KG, gml


# --- Hand arithmetic, one line per formula (values checked with a calculator) ---------------
R = (W_KG / H_CM) ** 2                      # 0.19753086419753085
BMI = W_KG / (H_CM / 100) ** 2              # 24.691358024691358
LBM_MORGAN_M = 1.10 * W_KG - 120 * R        # 88 - 23.7037037 = 64.2962963 kg
LBM_MORGAN_F = 1.07 * W_KG - 148 * R        # 85.6 - 29.2345679 = 56.3654321 kg
LBM_JAMES_M = 1.10 * W_KG - 128 * R         # 88 - 25.2839506 = 62.7160494 kg
LBM_JAMES_F = 1.07 * W_KG - 148 * R         # 56.3654321 kg
LBM_JANMA_M = 9270 * W_KG / (6680 + 216 * BMI)   # 741600 / 12013.3333 = 61.7314095 kg
LBM_JANMA_F = 9270 * W_KG / (8780 + 244 * BMI)   # 741600 / 14804.6914 = 50.0922297 kg
IBW_M = 48.0 + 1.06 * (H_CM - 152)          # 48 + 29.68 = 77.68 kg
IBW_F = 45.5 + 0.91 * (H_CM - 152)          # 45.5 + 25.48 = 70.98 kg
BSA_M2 = 0.007184 * H_CM ** 0.725 * W_KG ** 0.425  # 0.007184 * 43.1628 * 6.43886 = 1.996421 m2


def suvbw_by_hand(n_kg=None, *, bsa_m2=None, weight_kg=W_KG, suv_x=SUV_X):
    """SUVbw = SUVx * W_g / N_x, N_x in g (kg x 1000) or cm2 (m2 x 1e4)."""
    n = bsa_m2 * 1e4 if bsa_m2 is not None else n_kg * 1000
    return suv_x * weight_kg * 1000 / n


def test_the_hand_arithmetic_itself():
    # Pin the hand values so a slip in the lines above cannot pass silently.
    assert LBM_MORGAN_M == pytest.approx(64.2962963, abs=1e-7)
    assert LBM_JAMES_M == pytest.approx(62.7160494, abs=1e-7)
    assert LBM_JAMES_F == LBM_MORGAN_F == pytest.approx(56.3654321, abs=1e-7)
    assert LBM_JANMA_M == pytest.approx(61.7314095, abs=1e-7)
    assert LBM_JANMA_F == pytest.approx(50.0922297, abs=1e-7)
    assert (IBW_M, IBW_F) == (pytest.approx(77.68), pytest.approx(70.98))
    assert BSA_M2 == pytest.approx(1.996421, abs=1e-6)


# ------------------------------------------------------------------------------------------
# Every SUV Type, both sexes
# ------------------------------------------------------------------------------------------


def test_worked_example_gml_lbmjames128_male_80kg_180cm():
    # LBM = 1.10*80 - 128*(80/180)^2 = 62.716049 kg; SUVbw = 3.0 * 80000 / 62716.049 = 3.826772
    r = suvbw_factors([gml(SUVType="LBMJAMES128")] * 2)
    assert SUV_X * r.factors_g_per_bq[0] == pytest.approx(3.826771653543307, rel=1e-12)
    assert r.factors_g_per_bq == pytest.approx((80 / LBM_JAMES_M,) * 2, rel=1e-12)
    assert r.suv_type == "LBMJAMES128"
    n = r.normalisation
    assert (n.name, n.unit, n.sex_used) == ("lbm_james128", "kg", "M")
    assert n.value == pytest.approx(62.716049, abs=1e-6)
    assert r.warnings == ()


@pytest.mark.parametrize(
    ("suv_type", "sex", "name", "n_kg"),
    [
        ("LBM", "M", "lbm", LBM_MORGAN_M),
        ("LBM", "F", "lbm", LBM_MORGAN_F),
        ("LBMJAMES128", "M", "lbm_james128", LBM_JAMES_M),
        ("LBMJAMES128", "F", "lbm_james128", LBM_JAMES_F),
        ("LBMJANMA", "M", "lbm_janma", LBM_JANMA_M),
        ("LBMJANMA", "F", "lbm_janma", LBM_JANMA_F),
        ("IBW", "M", "ibw", IBW_M),
        ("IBW", "F", "ibw", IBW_F),
    ],
)
def test_gml_suv_types_convert_to_suvbw(suv_type, sex, name, n_kg):
    r = suvbw_factors([gml(SUVType=suv_type, PatientSex=sex)])
    assert SUV_X * r.factors_g_per_bq[0] == pytest.approx(suvbw_by_hand(n_kg), rel=1e-12)
    assert r.units_path == "GML" and r.suv_type == suv_type
    assert (r.normalisation.name, r.normalisation.sex_used) == (name, sex)
    assert r.normalisation.value == pytest.approx(n_kg, rel=1e-12)
    assert r.to_dict()["normalisation"]["unit"] == "kg"


def test_sex_changes_the_result():
    # The Morgan and James formulas differ only for men; both differ from women's.
    male = suvbw_factors([gml(SUVType="LBM")]).factors_g_per_bq[0]
    female = suvbw_factors([gml(SUVType="LBM", PatientSex="F")]).factors_g_per_bq[0]
    james = suvbw_factors([gml(SUVType="LBMJAMES128")]).factors_g_per_bq[0]
    assert male == pytest.approx(80 / 64.2962963, rel=1e-8)
    assert female == pytest.approx(80 / 56.3654321, rel=1e-8)
    assert james == pytest.approx(80 / 62.7160494, rel=1e-8)


def test_gml_bw_is_factor_one_and_reports_the_weight():
    r = suvbw_factors([gml(SUVType="BW", PatientSize=None, PatientSex=None)])
    assert r.factors_g_per_bq == (1.0,)
    assert r.warnings == ()  # an explicit SUV Type: no assumption
    assert r.normalisation.to_dict() == {"suv_type": "BW", "name": "bw", "value": 80.0, "unit": "kg",
                                         "sex_used": None, "male_female": None}


def test_gml_bw_needs_no_weight():
    r = suvbw_factors([gml(SUVType="BW", PatientWeight=None)])
    assert r.factors_g_per_bq == (1.0,) and r.normalisation.value is None


def test_cm2ml_is_suvbsa_du_bois():
    # BSA = 0.007184 * 180^0.725 * 80^0.425 = 1.996421 m2 = 19964.21 cm2
    # SUVbw = 3.0 * 80000 g / 19964.21 cm2 = 12.021512
    for suv_type in (None, "BSA"):
        r = suvbw_factors([gml(Units="CM2ML", SUVType=suv_type, PatientSex=None)])
        assert SUV_X * r.factors_g_per_bq[0] == pytest.approx(suvbw_by_hand(bsa_m2=BSA_M2), rel=1e-12)
        assert SUV_X * r.factors_g_per_bq[0] == pytest.approx(12.0215124, rel=1e-8)
        assert r.units_path == "CM2ML" and r.suv_type == "BSA"
        n = r.to_dict()["normalisation"]
        assert (n["name"], n["unit"], n["sex_used"]) == ("bsa_dubois", "m2", None)
        assert n["value"] == pytest.approx(1.996421, abs=1e-6)
        assert "sex_not_specified" not in r.warning_codes  # BSA does not depend on sex


# ------------------------------------------------------------------------------------------
# Sex O or missing: mean of the male and female values, and the result says so
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sex", ["O", None])
@pytest.mark.parametrize(
    ("suv_type", "male", "female"),
    [("LBM", LBM_MORGAN_M, LBM_MORGAN_F), ("LBMJAMES128", LBM_JAMES_M, LBM_JAMES_F),
     ("LBMJANMA", LBM_JANMA_M, LBM_JANMA_F), ("IBW", IBW_M, IBW_F)],
)
def test_sex_other_or_missing_uses_the_mean(suv_type, male, female, sex):
    mean = (male + female) / 2  # e.g. James: (62.7160494 + 56.3654321) / 2 = 59.5407407 kg
    r = suvbw_factors([gml(SUVType=suv_type, PatientSex=sex)])
    assert SUV_X * r.factors_g_per_bq[0] == pytest.approx(suvbw_by_hand(mean), rel=1e-12)
    n = r.to_dict()["normalisation"]
    assert n["sex_used"] == "mean_M_F"
    assert n["male_female"] == pytest.approx([male, female], rel=1e-12)
    [w] = [w for w in r.warnings if w.code == "sex_not_specified"]
    assert "PatientSex (0010,0040)" in w.message and (sex or "missing") in w.message
    assert "mean" in w.message


def test_james_mean_by_hand():
    # (62.7160494 + 56.3654321) / 2 = 59.5407407 kg; SUVbw = 3.0 * 80 / 59.5407407 = 4.0308534
    r = suvbw_factors([gml(SUVType="LBMJAMES128", PatientSex="O")])
    assert SUV_X * r.factors_g_per_bq[0] == pytest.approx(4.0308534, rel=1e-7)


def test_lowercase_sex_is_read_and_other_values_refused():
    assert suvbw_factors([gml(SUVType="IBW", PatientSex="f")]).normalisation.sex_used == "F"
    with pytest.raises(SuvError) as err:
        suvbw_factors([gml(SUVType="IBW", PatientSex="X")])
    assert err.value.code == "unparseable_value" and err.value.attribute == "PatientSex"
    assert "PatientSex (0010,0040)" in err.value.message and "site should" in err.value.message


# ------------------------------------------------------------------------------------------
# Refusals name the attribute, its tag and the fix
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "code", "attribute", "tag"),
    [
        ({"SUVType": "LBM", "PatientSize": None}, "missing_height", "PatientSize", "(0010,1020)"),
        ({"SUVType": "IBW", "PatientSize": 0}, "missing_height", "PatientSize", "(0010,1020)"),
        ({"Units": "CM2ML", "PatientSize": None}, "missing_height", "PatientSize", "(0010,1020)"),
        ({"SUVType": "LBMJANMA", "PatientWeight": None}, "missing_weight", "PatientWeight", "(0010,1030)"),
        ({"SUVType": "IBW", "PatientWeight": 0}, "missing_weight", "PatientWeight", "(0010,1030)"),
        ({"SUVType": "LBM", "PatientSize": 180}, "height_implausible", "PatientSize", "(0010,1020)"),
        ({"SUVType": "SUL"}, "unsupported_suv_type", "SUVType", "(0054,1006)"),
        ({"Units": "CM2ML", "SUVType": "BW"}, "suv_type_contradicts_units", "SUVType", "(0054,1006)"),
        ({"SUVType": "BSA"}, "suv_type_contradicts_units", "SUVType", "(0054,1006)"),
    ],
)
def test_conversion_needing_a_missing_attribute_is_refused(overrides, code, attribute, tag):
    with pytest.raises(SuvError) as err:
        suvbw_factors([gml(**overrides)])
    e = err.value
    assert (e.code, e.attribute) == (code, attribute)
    assert f"{attribute} {tag}" in e.message or f"{attribute} is" in e.message
    assert tag in e.message
    assert "site should" in e.message


def test_missing_weight_points_at_a_weight_in_the_height_field():
    with pytest.raises(SuvError) as err:
        suvbw_factors([gml(SUVType="LBM", PatientWeight=None, PatientSize=80.0)])
    assert err.value.code == "missing_weight"
    assert "PatientSize (0010,1020) holds 80" in err.value.message


def test_lbm_formula_that_goes_negative_is_refused():
    # Morgan female, 200 kg, 1.40 m: 1.07*200 - 148*(200/140)^2 = 214 - 302.04 = -88.04 kg
    with pytest.raises(SuvError) as err:
        suvbw_factors([gml(SUVType="LBM", PatientSex="F", PatientWeight=200.0, PatientSize=1.40)])
    assert err.value.code == "normalisation_not_positive"
    assert "-88.04" in err.value.message


# ------------------------------------------------------------------------------------------
# corelab suv --json
# ------------------------------------------------------------------------------------------


def _write_gml_series(out: Path, **header) -> Path:
    from corelab.grid import Grid
    from synth.dicom_header import PetSeriesHeader
    from synth.dicom_writer import write_pet_series

    grid = Grid.centred((3, 4, 4), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    start = dt.datetime(2024, 1, 1, 11, 0, 0)
    pet = PetSeriesHeader(study_uid=generate_uid(), series_uid=generate_uid(),
                          frame_of_reference_uid=generate_uid(), patient_name="X", patient_id="X",
                          study_datetime=start, series_datetime=start, units="GML",
                          injection_datetime=start - dt.timedelta(hours=1), dose_bq=3.7e8,
                          **header)
    write_pet_series(out, np.full(grid.shape, SUV_X), grid, pet)
    return out


def test_cli_suv_json_reports_suv_type_normalisation_and_warnings(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("CORELAB_DATA_DIR", str(tmp_path / "data"))
    folder = _write_gml_series(tmp_path / "gml", patient_sex="O", patient_weight_kg=80.0,
                               patient_size_m=1.80, extra={"SUVType": "LBMJAMES128"})
    assert main(["suv", str(folder), "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["error"] is None and entry["units"] == "GML"
    assert entry["suv_type"] == "LBMJAMES128"
    n = entry["normalisation"]
    assert (n["name"], n["unit"], n["sex_used"]) == ("lbm_james128", "kg", "mean_M_F")
    assert n["value"] == pytest.approx((LBM_JAMES_M + LBM_JAMES_F) / 2, rel=1e-12)
    assert [w["code"] for w in entry["warnings"]] == ["sex_not_specified"]
    # SUVbw = 3.0 * 80 / 59.5407407 = 4.0308534 in every voxel (pixels quantised to 16 bits)
    assert entry["suv_max"] == pytest.approx(4.0308534, rel=1e-4)
    assert entry["factor_g_per_bq"] == pytest.approx(80 / ((LBM_JAMES_M + LBM_JAMES_F) / 2), rel=1e-12)


def test_cli_suv_text_shows_the_normalisation(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("CORELAB_DATA_DIR", str(tmp_path / "data"))
    folder = _write_gml_series(tmp_path / "gml", patient_sex="M", patient_weight_kg=80.0,
                               patient_size_m=1.80, extra={"SUVType": "IBW"})
    assert main(["suv", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "IBW: ibw 77.68 kg (sex M)" in out


def test_cli_suv_json_names_a_missing_height(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("CORELAB_DATA_DIR", str(tmp_path / "data"))
    folder = _write_gml_series(tmp_path / "gml", patient_sex="M", patient_weight_kg=80.0,
                               extra={"SUVType": "LBM"})
    assert main(["suv", str(folder), "--json"]) == 1
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["error"]["code"] == "missing_height" and entry["error"]["attribute"] == "PatientSize"
