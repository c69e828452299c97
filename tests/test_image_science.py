"""Image QC science (expectations.image) on synthetic patients with known truth, and one real slice.

Truth comes from synth.patient (labels, lesion list, the true liver SUV 2.2) and from the
noiseless blurred map averaged over the same VOI, never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from corelab.grid import Grid
from expectations.image import DEFAULTS, ImageQc, analyse_pet
from expectations.image.liver import measure_sphere
from synth.imaging import axial_window, blur_fwhm, reconstruction_noise
from synth.patient import PATIENT_LABELS, patient_maps

LIVER_SUV = 2.2
TRUNK = Grid.centred((60, 96, 96), (4.0, 4.0, 4.0))
BIG = Grid.centred((80, 128, 128), (3.0, 3.0, 3.0))
REAL_SLICE = Path(__file__).parent / "data" / "pet-clinical" / "acrin-flt-breast-wholebody.dcm"


def _scan(grid: Grid, seed: int, *, cov: float = 0.08, scale: float = 1.0):
    """(maps, noiseless blurred image, noisy image) of one synthetic patient, 7 mm FWHM, clinical noise."""
    rng = np.random.default_rng(seed)
    maps = patient_maps(grid, rng=rng)
    clean = blur_fwhm(maps.suv * scale, grid.voxel_mm, 7.0)
    noisy = reconstruction_noise(clean, grid.voxel_mm, rng=rng, cov=cov, level_kbq_ml=LIVER_SUV * scale, fwhm_mm=4.0)
    return maps, clean, noisy


def _liver_depth_mm(maps, index) -> float:
    """Independent check: depth of a voxel inside the liver label, mm."""
    liver = np.pad(maps.labels == PATIENT_LABELS["liver"], 1)
    return float(ndimage.distance_transform_edt(liver, sampling=maps.grid.voxel_mm)[tuple(np.asarray(index) + 1)])


def _check_voi(qc: ImageQc, maps, clean, truth: float, tol: float = 0.03) -> float:
    lv = qc.liver
    assert lv.assessable, lv.reason
    assert maps.labels[lv.centre_index] == PATIENT_LABELS["liver"]
    assert _liver_depth_mm(maps, lv.centre_index) >= 15.0
    # the sphere avoids every lesion (its voxels never overlap the lesion's)
    for les in maps.lesions:
        gap = np.linalg.norm(np.subtract(lv.centre_mm, les.centre_mm))
        assert gap > lv.radius_mm + les.diameter_mm / 2, (lv.centre_mm, les)
    expected = measure_sphere(clean, maps.grid, lv.centre_mm, lv.radius_mm).mean()
    assert lv.suv_mean == pytest.approx(expected, rel=tol)
    assert lv.suv_mean == pytest.approx(truth, rel=tol)
    return lv.suv_mean / truth - 1.0


@pytest.mark.parametrize("grid", [TRUNK, BIG], ids=["4mm", "3mm"])
def test_liver_voi_over_seeds(grid):
    errors = []
    for seed in range(5):
        maps, clean, noisy = _scan(grid, seed)
        qc = analyse_pet(noisy, grid, sul_per_suv=0.8)
        errors.append(_check_voi(qc, maps, clean, LIVER_SUV))
        assert 6.0 < qc.liver.cov_pct < 13.0
        assert qc.liver.sul_mean == pytest.approx(0.8 * qc.liver.suv_mean)
        # noiseless: the placement alone is exact
        assert analyse_pet(clean, grid).liver.suv_mean == pytest.approx(LIVER_SUV, rel=0.01)
    assert abs(np.mean(errors)) < 0.015


def test_lesion_in_liver_is_avoided():
    # a large hot lesion at the liver's deepest point: the VOI must move away from it
    maps0 = patient_maps(TRUNK, rng=np.random.default_rng(0))
    from synth.patient import Lesion
    c = np.asarray(TRUNK.centre_mm) + (-65.0, 0.0, -45.0)
    maps = patient_maps(TRUNK, rng=np.random.default_rng(0), lesions=[Lesion(tuple(c), 30.0, 6.0)])
    clean = blur_fwhm(maps.suv, TRUNK.voxel_mm, 7.0)
    qc = analyse_pet(clean, TRUNK)
    _check_voi(qc, maps, clean, LIVER_SUV, tol=0.01)
    assert maps0.suv.shape == maps.suv.shape


def test_calibration_error_scales_liver():
    for seed in (1, 2):
        maps, clean, noisy = _scan(TRUNK, seed, scale=1.64)
        qc = analyse_pet(noisy, TRUNK)
        _check_voi(qc, maps, clean, 1.64 * LIVER_SUV)
        assert qc.liver.suv_mean == pytest.approx(3.6, rel=0.03)


def test_noisy_scan_has_high_cov():
    maps, clean, noisy = _scan(TRUNK, 3, cov=0.25)
    qc = analyse_pet(noisy, TRUNK)
    assert qc.liver.assessable, qc.liver.reason
    assert qc.liver.cov_pct > 18.0
    assert analyse_pet(_scan(TRUNK, 3, cov=0.10)[2], TRUNK).liver.cov_pct < 13.0


def test_not_assessable_without_a_liver():
    maps, clean, noisy = _scan(TRUNK, 0)
    # thorax planes above the liver (liver top at grid centre + 15 mm, blur 7 mm)
    c = TRUNK.centre_mm[2]
    thorax, tgrid = axial_window(noisy, TRUNK, c + 40.0, c + 200.0)
    qc = analyse_pet(thorax, tgrid)
    assert not qc.liver.assessable and qc.liver.reason and qc.liver.suv_mean is None
    # a uniform cylinder
    z, y, x = np.meshgrid(*TRUNK.axes_mm(), indexing="ij")
    cyl = ((x / 150.0) ** 2 + (y / 100.0) ** 2 <= 1.0).astype(np.float32) * 1.3
    qc = analyse_pet(blur_fwhm(cyl, TRUNK.voxel_mm, 7.0), TRUNK)
    assert not qc.liver.assessable and "liver" in qc.liver.reason
    # a shrunk liver: liver voxels beyond 25 mm of the liver centre become soft tissue
    lc = np.asarray(TRUNK.centre_mm) + (-65.0, 0.0, -45.0)
    small = maps.suv.copy()
    far = (maps.labels == PATIENT_LABELS["liver"]) & ((x - lc[0]) ** 2 + (y - lc[1]) ** 2 + (z - lc[2]) ** 2 > 25.0 ** 2)
    small[far] = 1.0
    qc = analyse_pet(blur_fwhm(small, TRUNK.voxel_mm, 7.0), TRUNK)
    assert not qc.liver.assessable and qc.liver.reason
    assert json.dumps(qc.columns())


def test_real_clinical_slice_runs():
    ds = pydicom.dcmread(REAL_SLICE)
    img = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    dx, dy = (float(v) for v in ds.PixelSpacing)
    x0, y0, z0 = (float(v) for v in ds.ImagePositionPatient)
    grid = Grid((1, int(ds.Rows), int(ds.Columns)), (float(ds.SliceThickness), dy, dx), (x0, y0, z0))
    qc = analyse_pet(img[None] * 5.9e-4, grid)
    assert not qc.liver.assessable and qc.liver.reason
    assert qc.bed_dip is None and qc.petct_shift_mm is None and qc.petct_reason
    assert qc.axial_coverage_mm == pytest.approx(float(ds.SliceThickness))
    cols = qc.columns()
    assert cols["liver_assessable"] is False and cols["bed_dip_planes"] == 0
    assert json.dumps(cols)


def test_bed_dip():
    maps, clean, noisy = _scan(TRUNK, 4)
    assert analyse_pet(noisy, TRUNK).bed_dip is None
    dipped = noisy.copy()
    dipped[24:36] *= 0.1
    dip = analyse_pet(dipped, TRUNK).bed_dip
    z = TRUNK.axes_mm()[0]
    assert dip is not None and dip["planes"] == 12
    assert dip["z_from_mm"] == pytest.approx(z[24]) and dip["z_to_mm"] == pytest.approx(z[35])
    assert dip["depth_pct"] > 80
    assert analyse_pet(dipped, TRUNK).columns()["bed_dip_planes"] == 12
    # end-of-FOV fall-off is not a dip
    falloff = noisy * np.r_[np.linspace(0.05, 1.0, 6), np.ones(48), np.linspace(1.0, 0.05, 6)][:, None, None]
    assert analyse_pet(falloff.astype(np.float32), TRUNK).bed_dip is None


@pytest.fixture(scope="module")
def ct_maps():
    ct_grid = Grid.centred((120, 192, 192), (2.0, 2.0, 2.0), TRUNK.centre_mm)
    return patient_maps(ct_grid, rng=np.random.default_rng(0), lesions=[], supersample=1).hu, ct_grid


@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (15.0, 0.0, 0.0), (0.0, 15.0, 0.0), (0.0, 0.0, 10.0)])
def test_petct_shift(ct_maps, shift):
    hu, ct_grid = ct_maps
    moved = Grid(ct_grid.shape, ct_grid.voxel_mm, tuple(np.add(ct_grid.origin_mm, shift)))  # CT body moved by +shift
    maps, clean, noisy = _scan(TRUNK, 1)
    qc = analyse_pet(noisy, TRUNK, ct_hu=hu, ct_grid=moved)
    assert qc.petct_shift_mm is not None, qc.petct_reason
    np.testing.assert_allclose(qc.petct_shift_mm, -np.asarray(shift), atol=2.0)  # PET minus CT
    _check_voi(qc, maps, clean, LIVER_SUV)
    cols = qc.columns()
    assert cols["petct_shift_mm"] == pytest.approx(max(abs(s) for s in qc.petct_shift_mm), abs=0.1)


def test_no_ct_no_shift():
    qc = analyse_pet(_scan(TRUNK, 2)[2], TRUNK)
    assert qc.petct_shift_mm is None and qc.petct_reason == "no CT"
    assert qc.columns()["petct_shift_x_mm"] is None


def test_params_override_and_unknown():
    noisy = _scan(TRUNK, 2)[2]
    qc = analyse_pet(noisy, TRUNK, params={"min_liver_ml": 1e6})
    assert not qc.liver.assessable and "mL" in qc.liver.reason
    with pytest.raises(ValueError):
        analyse_pet(noisy, TRUNK, params={"no_such_parameter": 1})
    assert DEFAULTS["liver_radius_mm"] == 15.0


def test_bed_dip_does_not_move_z(ct_maps):
    # a failed bed position empties the PET outline over ~5 cm while the CT's stays whole: those
    # planes must not drag the z profiles apart
    hu, ct_grid = ct_maps
    noisy = _scan(TRUNK, 1)[2].copy()
    noisy[38:46] *= 0.03
    qc = analyse_pet(noisy, TRUNK, ct_hu=hu, ct_grid=ct_grid)
    assert qc.bed_dip is not None and qc.petct_shift_mm is not None, qc.petct_reason
    assert max(abs(s) for s in qc.petct_shift_mm) < 4.0


@pytest.fixture(scope="module")
def small_trial(tmp_path_factory):
    from synth.spec import small_spec
    from synth.trial import generate_trial
    root = tmp_path_factory.mktemp("small-trial")
    generate_trial(root, small_spec(), seed=2)
    return root, json.loads((root / "ground_truth.json").read_text())


def test_small_trial_visits_are_aligned(small_trial):
    # one clean visit per site, C03 included (PSF 10.5 mm: the hot liver under the lung base spills
    # further up, which a fixed lung threshold read as a 6 mm z shift)
    from corelab.dicomio import load_volume
    from synth.problems import IMAGE_PROBLEMS
    root, truth = small_trial
    series = [s for s in truth["series"] if s["kind"] == "trial"]
    ct = {(s["subject"], s["visit"]): s for s in series if s["modality"] == "CT"}
    seen = set()
    for s in series:
        # header problems (C03's scanner is not accredited) leave the pixels alone
        pixels_wrong = set(s["problems"]) & {*IMAGE_PROBLEMS, "missing_slice"}
        if s["modality"] != "PT" or pixels_wrong or s["site"] in seen:
            continue
        pet = load_volume(sorted((root / s["path"]).iterdir()))
        c = load_volume(sorted((root / ct[(s["subject"], s["visit"])]["path"]).iterdir()))
        suv = pet.array * np.float32(s["truth"]["suvbw_factor_g_per_bq"])
        qc = analyse_pet(suv, pet.grid, ct_hu=c.array, ct_grid=c.grid)
        assert qc.petct_shift_mm is not None, qc.petct_reason
        assert max(abs(v) for v in qc.petct_shift_mm) < 4.0, (s["subject"], s["visit"], qc.petct_shift_mm)
        seen.add(s["site"])
    assert seen == {"A01", "B02", "C03"}
