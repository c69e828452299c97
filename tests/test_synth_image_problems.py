"""synth.trial: the image problems (calibration error, CT moved, failed bed position, noisy scan)
are in the pixels where the ground truth says, with valid headers; the patient's liver and noise
are what the image checks need.

Everything is measured from the written DICOM (pydicom and rescale through
``corelab.dicomio.load_volume``) and the truth's SUV factor; the liver label comes from
``synth.patient.patient_maps`` on the truth's grid and lesions. The ``trial`` and ``headers``
fixtures are in tests/synth_fixtures.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from corelab.dicomio import load_volume
from corelab.grid import Grid
from synth.patient import BLOOD_POOL_SUV, LIVER_SUV, PATIENT_LABELS, Lesion, patient_maps
from synth.problems import IMAGE_PROBLEMS
from synth.spec import PROBLEM_CODES
from tests.synth_fixtures import headers, series_files, trial  # noqa: F401  (pytest fixtures)
from tests.test_synth_problems import _detect

VOI_RADIUS_MM = 15.0  # the 3 cm liver reference sphere
DEEP_MM = 20.0  # "deep inside" the liver: beyond the PSF's reach of its edges and lesions


# ------------------------------------------------------------------------------------------
# Helpers: SUV from the files, the liver label, a 3 cm VOI, body centroids
# ------------------------------------------------------------------------------------------


def _pet(trial) -> list[dict]:
    return [s for s in trial.series if s["kind"] == "trial" and s["modality"] == "PT"]


def _with(trial, code: str) -> dict:
    [entry] = [s for s in _pet(trial) if code in s["problems"]]
    return entry


def _clean(trial) -> list[dict]:
    return [s for s in _pet(trial) if not s["problems"]]


def _suv(trial, entry: dict) -> np.ndarray:
    vol = load_volume(series_files(trial.outdir, entry))
    assert vol.array.shape == tuple(entry["grid"]["shape"])
    return vol.array.astype(np.float64) * entry["truth"]["suvbw_factor_g_per_bq"]


def _grid(entry: dict) -> Grid:
    g = entry["grid"]
    return Grid(tuple(g["shape"]), tuple(g["voxel_mm"]), tuple(g["origin_mm"]))


def _liver_depth_mm(entry: dict) -> np.ndarray:
    """Distance of each voxel inside the liver label to the nearest non-liver voxel (lesions,
    other organs, and beyond the field of view), mm."""
    grid = _grid(entry)
    lesions = [Lesion(tuple(le["centre_mm"]), le["diameter_mm"], le["suv"], le["hu"])
               for le in entry["truth"]["lesions"]]
    labels = patient_maps(grid, rng=np.random.default_rng(0), lesions=lesions).labels
    liver = np.pad(labels == PATIENT_LABELS["liver"], 1)  # the FOV edge is not liver
    return ndimage.distance_transform_edt(liver, sampling=grid.voxel_mm)[1:-1, 1:-1, 1:-1]


def _liver_mean(suv: np.ndarray, depth: np.ndarray) -> float:
    deep = depth >= DEEP_MM
    assert deep.sum() >= 20
    return float(suv[deep].mean())


def _liver_cov_pct(suv: np.ndarray, entry: dict, depth: np.ndarray) -> float:
    """CoV in a 3 cm sphere at the deepest point of the liver (as a reference VOI sits)."""
    grid = _grid(entry)
    centre = np.unravel_index(np.argmax(depth), depth.shape)
    assert depth[centre] >= VOI_RADIUS_MM + 10.0  # the right lobe holds the VOI with a margin
    offsets = [(np.arange(n) - c) * d for n, c, d in zip(grid.shape, centre, grid.voxel_mm)]
    dz, dy, dx = np.meshgrid(*offsets, indexing="ij")
    voi = dz**2 + dy**2 + dx**2 <= VOI_RADIUS_MM**2
    values = suv[voi]
    return 100.0 * float(values.std(ddof=1) / values.mean())


def _body_centroid_xy(volume: np.ndarray, threshold: float, grid: Grid) -> np.ndarray:
    """Mean patient (x, y) of the body outline (holes such as the lungs filled), mm."""
    body = volume > threshold
    body = np.stack([ndimage.binary_fill_holes(plane) for plane in body])
    labelled, n = ndimage.label(body)
    body = labelled == 1 + int(np.argmax(ndimage.sum(body, labelled, range(1, n + 1))))
    _, j, i = np.nonzero(body)
    ox, oy, _ = grid.origin_mm
    _, vy, vx = grid.voxel_mm
    return np.array([ox + i.mean() * vx, oy + j.mean() * vy])


# ------------------------------------------------------------------------------------------
# Ground truth
# ------------------------------------------------------------------------------------------


def test_each_image_problem_is_listed_once_on_its_own_visit(trial):
    assert set(IMAGE_PROBLEMS) <= set(PROBLEM_CODES)
    entries = [p for p in trial.problems if p["code"] in IMAGE_PROBLEMS]
    assert sorted(p["code"] for p in entries) == sorted(IMAGE_PROBLEMS)
    assert all(p["modality"] == "PT" for p in entries)
    visits = {(p["subject"], p["visit"]) for p in entries}
    assert len(visits) == len(IMAGE_PROBLEMS)
    for p in entries:  # alone on its visit: no other problem there
        others = {q["code"] for q in trial.problems if (q["subject"], q["visit"]) == (p["subject"], p["visit"])}
        assert others == {p["code"]}, p["code"]
        assert p["attribute"] and "planted_value" in p and "expected" in p
    calib = next(p for p in entries if p["code"] == "liver_calibration_error")
    assert (calib["planted_value"], calib["expected"], calib["visit"]) == (3.6, 2.2, "followup")
    baseline = next(s for s in _pet(trial) if s["subject"] == calib["subject"] and s["visit"] == "baseline")
    assert baseline["problems"] == []  # the liver SUL reference of the follow-up is clean
    shift = next(p for p in entries if p["code"] == "ct_misaligned")
    assert sorted(np.abs(shift["planted_value"])) == [0.0, 0.0, 15.0] and shift["planted_value"][2] == 0.0
    ct = trial.series_by_uid(shift["ct_series_uid"])
    assert ct["modality"] == "CT" and ct["problems"] == ["ct_misaligned"]
    assert ct["truth"]["shift_vs_pet_mm"] == shift["planted_value"]
    for s in _pet(trial):
        assert s["truth"]["liver_suv_true"] == (3.6 if "liver_calibration_error" in s["problems"] else 2.2)


def test_headers_of_image_problem_series_stay_valid(trial, headers):
    for code in IMAGE_PROBLEMS:
        for entry in (s for s in trial.series if code in s["problems"]):
            files = headers[entry["series_uid"]]
            for header_code in PROBLEM_CODES:
                if header_code in IMAGE_PROBLEMS or (header_code == "followup_on_other_scanner"
                                                     and entry["visit"] == "baseline"):
                    continue
                assert not _detect(header_code, entry, files, trial), (code, header_code)


# ------------------------------------------------------------------------------------------
# Pixels
# ------------------------------------------------------------------------------------------


def test_liver_reads_its_true_suv_and_calibration_error_reads_3_6(trial):
    calib = _with(trial, "liver_calibration_error")
    normal = _clean(trial)[0]
    for entry, expected in ((calib, 3.6), (normal, LIVER_SUV)):
        assert entry["truth"]["liver_suv_true"] == expected
        mean = _liver_mean(_suv(trial, entry), _liver_depth_mm(entry))
        assert mean == pytest.approx(expected, rel=0.03), entry["path"]


def test_liver_noise_is_clinical_and_the_noisy_scan_is_not(trial):
    normal_covs = []
    for entry in _clean(trial):
        cov = _liver_cov_pct(_suv(trial, entry), entry, _liver_depth_mm(entry))
        normal_covs.append(cov)
        assert 6.0 <= cov <= 13.0, (entry["path"], cov)
    noisy = _with(trial, "noisy_scan")
    assert noisy["truth"]["noise_cov"] == 0.25
    cov = _liver_cov_pct(_suv(trial, noisy), noisy, _liver_depth_mm(noisy))
    assert cov > 20.0
    print(f"liver CoV in a 3 cm sphere: normal {np.round(normal_covs, 1)} %, noisy {cov:.1f} %")


def test_blood_pool_reads_its_suv(trial):
    entry = _clean(trial)[0]
    grid = _grid(entry)
    labels = patient_maps(grid, rng=np.random.default_rng(0), lesions=[]).labels
    aorta = labels == PATIENT_LABELS["blood_pool"]
    assert aorta.sum() >= grid.shape[0]  # a vessel through every plane
    # A 25 mm vessel under the PSF and coarse voxels: it keeps most of its contrast to the
    # surrounding tissue (SUV 1).
    blood = float(np.median(_suv(trial, entry)[aorta]))
    assert 1.3 <= blood <= BLOOD_POOL_SUV * 1.05


def test_misaligned_ct_is_moved_by_the_truth_vector(trial):
    problem = next(p for p in trial.problems if p["code"] == "ct_misaligned")
    for pet, want in ((trial.series_by_uid(problem["series_uid"]), problem["planted_value"][:2]),
                      (_clean(trial)[0], [0.0, 0.0])):
        ct = next(s for s in trial.series if s["study_uid"] == pet["study_uid"] and s["modality"] == "CT")
        ct_vol = load_volume(series_files(trial.outdir, ct))
        assert ct_vol.grid == _grid(pet)  # same geometry and headers: only the content moved
        moved = (_body_centroid_xy(ct_vol.array, -500.0, ct_vol.grid)
                 - _body_centroid_xy(_suv(trial, pet), 0.5, _grid(pet)))
        assert moved == pytest.approx(want, abs=2.0), pet["path"]


def test_missing_bed_planes_read_near_zero(trial):
    problem = next(p for p in trial.problems if p["code"] == "missing_bed_position")
    entry = trial.series_by_uid(problem["series_uid"])
    grid = _grid(entry)
    planes = problem["planes"]
    n = grid.shape[0]
    assert len(planes) * grid.voxel_mm[0] >= 10.0
    assert planes == list(range(planes[0], planes[-1] + 1))
    z = grid.axes_mm()[0]
    assert (problem["z_from_mm"], problem["z_to_mm"]) == pytest.approx((z[planes[0]], z[planes[-1]]))
    # away from the first and last 5 % of the field of view
    assert z[planes[0]] - 0.5 * grid.voxel_mm[0] >= z[0] - 0.5 * grid.voxel_mm[0] + 0.05 * n * grid.voxel_mm[0]
    assert z[planes[-1]] + 0.5 * grid.voxel_mm[0] <= z[-1] + 0.5 * grid.voxel_mm[0] - 0.05 * n * grid.voxel_mm[0]
    suv = _suv(trial, entry)
    profile = suv.reshape(n, -1).mean(axis=1)
    neighbours = [profile[planes[0] - 1], profile[planes[-1] + 1]]
    assert len(load_volume(series_files(trial.outdir, entry)).paths) == n  # planes present
    for k in planes:
        assert profile[k] < 0.15 * min(neighbours), k
    # and the liver (below the gap) is whole
    assert _liver_mean(suv, _liver_depth_mm(entry)) == pytest.approx(LIVER_SUV, rel=0.03)
