"""Digital phantoms: geometry, exact partial volume, image formation, and the variety of real
scans (roll, reflections, glass walls, PSF overshoot, reconstruction noise, axial cut)."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
from scipy import ndimage

from corelab.dicomio import load_volume
from corelab.grid import Grid
from phantoms.geometry import NEMA_IEC_BODY, sphere_volume_ml
from synth.digital_phantoms import nema_iec_phantom, uniform_cylinder
from synth.imaging import add_noise, axial_window, blur_fwhm, psf_blur, reconstruction_noise
from synth.patient import PATIENT_LABELS, Lesion, patient_maps
from synth.spec import TrialSpec
from synth.trial import _write_phantom


def _sphere_sums_ml(truth, *, margin_mm):
    """Activity-weighted volume (mL) near each sphere, for a phantom filled 1 in the spheres only."""
    g = truth.grid
    z, y, x = g.axes_mm()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    voxel_ml = np.prod(g.voxel_mm) / 1000.0
    out = {}
    for d, (cx, cy, cz) in truth.sphere_centres_mm.items():
        near = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= (0.5 * d + margin_mm) ** 2
        out[d] = float(truth.activity_kbq_ml[near].sum() * voxel_ml)
    return out


def test_grid_centred_and_axes():
    g = Grid.centred((5, 4, 3), (2.0, 3.0, 4.0), centre_mm=(10.0, -20.0, 30.0))
    z, y, x = g.axes_mm()
    assert g.centre_mm == pytest.approx((10.0, -20.0, 30.0))
    assert x.mean() == pytest.approx(10.0) and y.mean() == pytest.approx(-20.0) and z.mean() == pytest.approx(30.0)
    assert np.diff(z) == pytest.approx(2.0) and np.diff(y) == pytest.approx(3.0) and np.diff(x) == pytest.approx(4.0)
    # origin is the (x, y, z) of voxel [0, 0, 0]
    assert g.origin_mm == pytest.approx((x[0], y[0], z[0]))
    assert g.mm_to_index(g.index_to_mm((1.5, 2.0, 0.25))) == pytest.approx((1.5, 2.0, 0.25))


@pytest.mark.parametrize(
    "voxel_mm, shift_mm, rotation_deg, tilt_deg",
    [(4.0, (0.0, 0.0, 0.0), 0.0, 0.0), (4.0, (3.3, -1.7, 1.1), 13.0, 4.0), (2.0, (0.9, 0.4, -0.6), -20.0, 0.0)],
)
def test_sphere_volumes_match_analytic(voxel_mm, shift_mm, rotation_deg, tilt_deg):
    n, nz = int(260 / voxel_mm), int(80 / voxel_mm)
    g = Grid.centred((nz, n, n), (voxel_mm,) * 3)
    truth = nema_iec_phantom(
        g, sphere_kbq_ml=1.0, background_kbq_ml=0.0, shift_mm=shift_mm, rotation_deg=rotation_deg, tilt_deg=tilt_deg
    )
    sums = _sphere_sums_ml(truth, margin_mm=2 * voxel_mm)
    for d, v in sums.items():
        assert v == pytest.approx(4.0 / 3.0 * math.pi * (d / 2) ** 3 / 1000.0, rel=0.02), d
        # the supersampling with the curvature-corrected ramp does much better than 2 %
        assert v == pytest.approx(sphere_volume_ml(d), rel=0.005), d
    assert truth.activity_kbq_ml.dtype == np.float32
    assert truth.activity_kbq_ml.max() <= 1.0 + 1e-6


def test_body_volume_matches_analytic():
    ph = NEMA_IEC_BODY
    g = Grid.centred((52, 80, 80), (4.0, 4.0, 4.0))
    truth = nema_iec_phantom(g, sphere_kbq_ml=0.0, background_kbq_ml=1.0, shift_mm=(0.0, 0.0, 27.0))
    ra, rc, w, depth = ph.interior_arc_radius_mm, ph.interior_corner_radius_mm, 70.0, ph.interior_box_depth_mm
    area_mm2 = math.pi * ra**2 / 2 + 2 * w * depth + math.pi * rc**2 / 2
    lung_mm2 = math.pi * ph.lung_outer_radius_mm**2
    expected_ml = (area_mm2 - lung_mm2) * ph.interior_length_mm / 1000.0 - sum(ph.sphere_volumes_ml.values())
    measured_ml = truth.activity_kbq_ml.sum() * 64.0 / 1000.0
    assert measured_ml == pytest.approx(expected_ml, rel=0.002)


def test_geometry_orientation_anterior_and_ring():
    g = Grid.centred((20, 80, 80), (4.0, 4.0, 4.0))
    truth = nema_iec_phantom(g, shift_mm=(10.0, 5.0, 0.0), rotation_deg=0.0)
    lx, ly, lz = truth.lung_axis_point_mm
    bx, by, bz = truth.body_centre_mm
    # lung insert is 35 mm anterior (negative y in LPS) of the body centre
    assert ly - by == pytest.approx(-35.0)
    assert (lx, ly, lz) == pytest.approx((10.0, 5.0, 0.0))
    # sphere plane 27 mm from the interior mid-plane, towards +z
    assert lz - bz == pytest.approx(27.0)
    centres = np.array([truth.sphere_centres_mm[d] for d in NEMA_IEC_BODY.sphere_diameters_mm])
    rel = centres - np.array([lx, ly, lz])
    assert np.linalg.norm(rel, axis=1) == pytest.approx(57.27)
    assert rel[:, 2] == pytest.approx(0.0)
    angles = np.degrees(np.arctan2(rel[:, 1], rel[:, 0])) % 360
    assert np.diff(angles) == pytest.approx(60.0)
    # the body is anterior-round: activity at 140 mm anterior of the body centre, none posterior
    j_ant = int(round(g.mm_to_index((bx, by - 140.0, bz))[1]))
    assert truth.activity_kbq_ml[10, j_ant, 40] == pytest.approx(2.0)


def test_rotation_and_tilt_move_spheres_rigidly():
    g = Grid.centred((20, 60, 60), (4.0, 4.0, 4.0))
    a = nema_iec_phantom(g, rotation_deg=0.0, supersample=1)
    b = nema_iec_phantom(g, rotation_deg=20.0, tilt_deg=5.0, supersample=1)
    pa = np.array([a.sphere_centres_mm[d] for d in sorted(a.sphere_centres_mm)])
    pb = np.array([b.sphere_centres_mm[d] for d in sorted(b.sphere_centres_mm)])
    # pairwise distances preserved
    da = np.linalg.norm(pa[:, None] - pa[None], axis=-1)
    db = np.linalg.norm(pb[:, None] - pb[None], axis=-1)
    assert db == pytest.approx(da)
    assert np.ptp(pb[:, 2]) > 5.0  # tilt moves spheres off one transverse plane
    assert b.lung_axis_direction[2] == pytest.approx(math.cos(math.radians(5.0)))


def test_blur_conserves_total_activity_and_keeps_known_values():
    # whole phantom inside the grid with > 2 FWHM margin
    g = Grid.centred((64, 84, 84), (4.0, 4.0, 4.0))
    # sphere plane 27 mm above the mid-plane: this shift centres the phantom's length on the grid
    truth = nema_iec_phantom(g, shift_mm=(0.0, 0.0, 27.0))
    blurred = blur_fwhm(truth.activity_kbq_ml, g.voxel_mm, 6.0)
    assert blurred.sum(dtype=np.float64) == pytest.approx(truth.activity_kbq_ml.sum(dtype=np.float64), rel=1e-5)
    # noiseless, blurred: sphere fill at the centre of the 37 mm sphere, background far from
    # any edge
    k, j, i = (int(round(v)) for v in g.mm_to_index(truth.sphere_centres_mm[37.0]))
    assert blurred[k, j, i] == pytest.approx(20.0, rel=0.002)
    bx, by, bz = truth.body_centre_mm
    k, j, i = (int(round(v)) for v in g.mm_to_index((bx + 100.0, by + 20.0, bz - 40.0)))
    assert blurred[k, j, i] == pytest.approx(2.0, rel=0.002)


def test_blur_fwhm_of_a_point_source():
    vol = np.zeros((41, 41, 41))
    vol[20, 20, 20] = 1.0
    out = blur_fwhm(vol, (2.0, 1.0, 1.0), (8.0, 6.0, 6.0))
    k = np.arange(41) - 20
    for axis, (fwhm, spacing) in enumerate(((8.0, 2.0), (6.0, 1.0), (6.0, 1.0))):
        prof = out.sum(axis=tuple(a for a in range(3) if a != axis))
        sigma_mm = math.sqrt(np.sum(prof * k**2) / prof.sum()) * spacing
        assert sigma_mm == pytest.approx(fwhm / 2.3548, rel=0.02)
    assert blur_fwhm(vol, (1.0, 1.0, 1.0), 0.0) == pytest.approx(vol)


def test_add_noise_cov_and_reproducibility():
    vol = np.full((20, 50, 50), 5.0)
    a = add_noise(vol, rng=np.random.default_rng(1), cov=0.1)
    b = add_noise(vol, rng=np.random.default_rng(1), cov=0.1)
    assert np.array_equal(a, b)
    assert a.std() / a.mean() == pytest.approx(0.1, rel=0.03)
    assert a.mean() == pytest.approx(5.0, rel=0.005)
    assert (add_noise(vol, rng=np.random.default_rng(2), cov=2.0) >= 0).all()
    with pytest.raises(ValueError):
        add_noise(vol, rng=np.random.default_rng(1), cov=-0.1)


def test_uniform_cylinder_volume_and_values():
    g = Grid.centred((60, 60, 60), (4.0, 4.0, 4.0))
    cyl = uniform_cylinder(g, concentration_kbq_ml=3.0, radius_mm=100.0, length_mm=200.0, shift_mm=(5.0, -7.0, 2.0))
    volume_ml = cyl.sum(dtype=np.float64) / 3.0 * 64.0 / 1000.0
    assert volume_ml == pytest.approx(math.pi * 100.0**2 * 200.0 / 1000.0, rel=0.002)
    k, j, i = (int(round(v)) for v in g.mm_to_index((5.0, -7.0, 2.0)))
    assert cyl[k, j, i] == pytest.approx(3.0)
    assert cyl[k, j, 0] == 0.0


def test_patient_maps_tissues_and_lesions():
    g = Grid.centred((40, 64, 96), (5.0, 4.0, 4.0))
    lesion = Lesion(centre_mm=(-60.0, 0.0, -45.0), diameter_mm=20.0, suv=8.0)
    maps = patient_maps(g, rng=np.random.default_rng(0), lesions=[lesion])
    assert maps.suv.dtype == np.float32 and maps.hu.dtype == np.int16 and maps.suv.shape == g.shape

    def at(xyz):
        k, j, i = (int(round(v)) for v in g.mm_to_index(xyz))
        return float(maps.suv[k, j, i]), int(maps.hu[k, j, i]), int(maps.labels[k, j, i])

    assert at((0.0, -120.0, 0.0))[:2] == (0.0, -1000)  # air anterior of the body
    assert at((90.0, -5.0, 70.0)) == (pytest.approx(0.4), -800, PATIENT_LABELS["lung"])  # left lung
    assert at((-100.0, 10.0, -30.0)) == (pytest.approx(2.2), 60, PATIENT_LABELS["liver"])  # liver
    assert at((0.0, 80.0, 0.0)) == (pytest.approx(1.5), 700, PATIENT_LABELS["spine"])
    assert at((0.0, -60.0, 0.0))[:2] == (pytest.approx(1.0), 40)  # soft tissue
    assert at(lesion.centre_mm) == (pytest.approx(8.0), 40, PATIENT_LABELS["lesion"])
    assert maps.lesions == (lesion,)
    # lesion truth: its excess SUV integrates to (8 - 2.2) x its volume
    z, y, x = g.axes_mm()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    near = (xx + 60.0) ** 2 + yy**2 + (zz + 45.0) ** 2 <= 18.0**2
    excess_ml = float((maps.suv[near] - 2.2).sum()) * np.prod(g.voxel_mm) / 1000.0
    assert excess_ml == pytest.approx((8.0 - 2.2) * lesion.volume_ml, rel=0.01)


def test_patient_maps_default_lesions_reproducible():
    g = Grid.centred((30, 48, 64), (6.0, 6.0, 6.0))
    a = patient_maps(g, rng=np.random.default_rng(7))
    b = patient_maps(g, rng=np.random.default_rng(7))
    assert a.lesions == b.lesions and len(a.lesions) == 3
    assert np.array_equal(a.suv, b.suv)
    assert all(4.0 <= les.suv <= 12.0 for les in a.lesions)


# ------------------------------------------------------------------------------------------
# Real-world variety: reflections, glass walls, PSF overshoot, reconstruction noise, axial cut
# ------------------------------------------------------------------------------------------
def test_mirrored_and_axial_flip_are_reflections_of_the_image():
    """With the ring centre at the grid centre, the mirrored phantom is the canonical image
    flipped left-right (columns), the axially flipped one flipped head-feet (planes), and both
    together the phantom turned end over end (a proper rotation)."""
    g = Grid.centred((24, 64, 64), (4.0, 4.0, 4.0))
    kw = dict(rotation_deg=23.0, supersample=2)
    base = nema_iec_phantom(g, **kw)
    mirrored = nema_iec_phantom(g, mirrored=True, **kw)
    flipped = nema_iec_phantom(g, axial_flip=True, **kw)
    both = nema_iec_phantom(g, mirrored=True, axial_flip=True, **kw)
    assert np.allclose(mirrored.activity_kbq_ml, base.activity_kbq_ml[:, :, ::-1], atol=1e-5)
    assert np.allclose(flipped.activity_kbq_ml, base.activity_kbq_ml[::-1], atol=1e-5)
    assert np.allclose(both.activity_kbq_ml, base.activity_kbq_ml[::-1, :, ::-1], atol=1e-5)
    assert np.linalg.det(mirrored.orientation) == pytest.approx(-1.0)
    assert np.linalg.det(flipped.orientation) == pytest.approx(-1.0)
    assert np.linalg.det(both.orientation) == pytest.approx(1.0)
    assert flipped.lung_axis_direction == pytest.approx((0.0, 0.0, -1.0))
    assert flipped.body_centre_mm[2] - flipped.lung_axis_point_mm[2] == pytest.approx(27.0)

    def ring_angles(truth):
        c = np.array([truth.sphere_centres_mm[d] for d in NEMA_IEC_BODY.sphere_diameters_mm])
        rel = c - np.asarray(truth.lung_axis_point_mm)
        return np.degrees(np.arctan2(rel[:, 1], rel[:, 0]))

    # round the ring by increasing size: +60 deg steps, mirrored -60 deg steps
    assert np.diff(np.unwrap(ring_angles(base), period=360)) == pytest.approx(60.0)
    assert np.diff(np.unwrap(ring_angles(mirrored), period=360)) == pytest.approx(-60.0)


@pytest.mark.parametrize("roll_deg", [0.0, 111.0, 259.0])
def test_roll_over_the_full_circle_is_rigid(roll_deg):
    g = Grid.centred((16, 64, 64), (4.0, 4.0, 4.0))
    a = nema_iec_phantom(g, supersample=1)
    b = nema_iec_phantom(g, rotation_deg=roll_deg, yaw_deg=3.0, supersample=1)
    pa = np.array([a.sphere_centres_mm[d] for d in sorted(a.sphere_centres_mm)])
    pb = np.array([b.sphere_centres_mm[d] for d in sorted(b.sphere_centres_mm)])
    da = np.linalg.norm(pa[:, None] - pa[None], axis=-1)
    assert np.linalg.norm(pb[:, None] - pb[None], axis=-1) == pytest.approx(da)
    rel = pb[0] - np.asarray(b.lung_axis_point_mm)
    # the 10 mm sphere sits at the roll angle (yaw 3 deg barely moves it in x, y)
    assert math.degrees(math.atan2(rel[1], rel[0])) % 360 == pytest.approx(roll_deg % 360, abs=0.2)


def test_glass_walls_are_cold_and_keep_the_inner_volume():
    g = Grid.centred((20, 80, 80), (2.0, 2.0, 2.0))
    kw = dict(rotation_deg=31.0, supersample=4)
    # spheres only: the wall does not change what the spheres hold
    hot = nema_iec_phantom(g, sphere_kbq_ml=1.0, background_kbq_ml=0.0, sphere_wall_mm=1.0, **kw)
    for d, v in _sphere_sums_ml(hot, margin_mm=4.0).items():
        assert v == pytest.approx(sphere_volume_ml(d), rel=0.005), d
    # background only: the walls remove a shell of background 1 mm thick round each sphere
    g2 = Grid.centred((20, 40, 40), (4.0, 4.0, 4.0))
    walled = nema_iec_phantom(g2, sphere_kbq_ml=0.0, background_kbq_ml=1.0, sphere_wall_mm=1.0, **kw)
    bare = nema_iec_phantom(g2, sphere_kbq_ml=0.0, background_kbq_ml=1.0, **kw)
    removed = bare.activity_kbq_ml.sum(dtype=np.float64) - walled.activity_kbq_ml.sum(dtype=np.float64)
    removed_ml = float(removed) * 0.064  # 4 mm voxels hold 0.064 mL
    shells_ml = sum(sphere_volume_ml(d + 2.0) - sphere_volume_ml(d) for d in NEMA_IEC_BODY.sphere_diameters_mm)
    assert removed_ml == pytest.approx(shells_ml, rel=0.01)
    assert walled.sphere_wall_mm == 1.0 and bare.sphere_wall_mm == 0.0
    with pytest.raises(ValueError):
        nema_iec_phantom(g2, sphere_wall_mm=-1.0)


def test_psf_overshoot_makes_small_spheres_read_hot():
    g = Grid.centred((24, 96, 96), (3.0, 3.0, 3.0))
    truth = nema_iec_phantom(g, supersample=2)
    act = truth.activity_kbq_ml
    assert np.array_equal(psf_blur(act, g.voxel_mm, 6.0), blur_fwhm(act, g.voxel_mm, 6.0))
    img = psf_blur(act, g.voxel_mm, 5.0, overshoot=0.5)
    # the kernel integrates to 1: activity kept (object well inside the grid), uniform
    # background unchanged
    cube = np.zeros((40, 40, 40))
    cube[15:25, 15:25, 15:25] = 1.0
    assert psf_blur(cube, (2.0, 2.0, 2.0), 5.0, overshoot=0.5).sum(dtype=np.float64) == pytest.approx(1000.0, rel=1e-5)
    bx, by, bz = truth.body_centre_mm
    k, j, i = (int(round(v)) for v in g.mm_to_index((bx - 60.0, by + 40.0, truth.lung_axis_point_mm[2])))
    assert img[k, j, i] == pytest.approx(2.0, rel=1e-3)
    z, y, x = g.axes_mm()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")

    def rc_max(d):
        cx, cy, cz = truth.sphere_centres_mm[d]
        return img[(xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= (0.5 * d + 5.0) ** 2].max() / 20.0

    assert rc_max(13.0) > 1.0 and rc_max(17.0) > rc_max(37.0) > 1.0
    with pytest.raises(ValueError):
        psf_blur(act, g.voxel_mm, 5.0, overshoot=-0.1)


def test_reconstruction_noise_cov_correlation_and_activity_dependence():
    vol = np.full((40, 60, 60), 2.0)
    vol[:, :, 30:] = 20.0  # a region ten times hotter
    vox = (2.0, 2.0, 2.0)
    a = reconstruction_noise(vol, vox, rng=np.random.default_rng(4), cov=0.12, level_kbq_ml=2.0, fwhm_mm=6.0)
    b = reconstruction_noise(vol, vox, rng=np.random.default_rng(4), cov=0.12, level_kbq_ml=2.0, fwhm_mm=6.0)
    assert np.array_equal(a, b) and a.dtype == np.float32
    cold, hot = a[:, :, 2:26], a[:, :, 34:58]
    assert cold.std() / cold.mean() == pytest.approx(0.12, rel=0.05)
    assert cold.mean() == pytest.approx(2.0, rel=0.01)
    # variance follows the activity: CoV / sqrt(10) ten times hotter
    assert hot.std() / hot.mean() == pytest.approx(0.12 / math.sqrt(10.0), rel=0.05)
    # correlated like a reconstruction: neighbours share much of their noise
    d = cold - cold.mean()
    assert float(np.mean(d[:, :, 1:] * d[:, :, :-1]) / d.var()) > 0.5
    white = reconstruction_noise(vol, vox, rng=np.random.default_rng(4), cov=0.12, level_kbq_ml=2.0, fwhm_mm=0.0)
    dw = white[:, :, 2:26] - 2.0
    assert abs(float(np.mean(dw[:, :, 1:] * dw[:, :, :-1]) / dw.var())) < 0.05
    # nothing added where there is no activity; never negative
    empty = np.zeros((8, 8, 8))
    assert not reconstruction_noise(empty, vox, rng=np.random.default_rng(0), cov=0.5, level_kbq_ml=1.0).any()
    assert (reconstruction_noise(vol, vox, rng=np.random.default_rng(1), cov=1.5, level_kbq_ml=2.0) >= 0).all()
    with pytest.raises(ValueError):
        reconstruction_noise(vol, vox, rng=np.random.default_rng(1), cov=-0.1, level_kbq_ml=2.0)


def test_axial_window_cuts_planes_and_keeps_the_grid():
    g = Grid.centred((20, 4, 4), (5.0, 2.0, 2.0), centre_mm=(0.0, 0.0, 10.0))
    vol = np.arange(20.0)[:, None, None] * np.ones((20, 4, 4))
    cut, sub = axial_window(vol, g, 0.0, 31.0)
    z = g.axes_mm()[0]
    kept = (z >= 0.0) & (z <= 31.0)
    assert cut.shape == (int(kept.sum()), 4, 4) and sub.shape == cut.shape
    assert sub.axes_mm()[0] == pytest.approx(z[kept])
    assert cut[:, 0, 0] == pytest.approx(np.flatnonzero(kept))
    with pytest.raises(ValueError, match="no plane"):
        axial_window(vol, g, 500.0, 600.0)


def test_demo_phantoms_are_noisy_and_varied(tmp_path):
    """The demo's NEMA phantoms: every scanner's at its own roll, both handednesses and both
    axial directions among them (seed 0), glass walls, background CoV within the spec's range
    and equal to what the ground truth records; the same seed writes the same bytes."""
    spec = TrialSpec.demo()
    day = dt.date(2031, 3, 4)
    poses = []
    for scanner in spec.scanners:
        entry = _write_phantom(tmp_path / scanner.id, spec, scanner, "nema_iec", 0, day)
        ph = entry["phantom"]
        poses.append((ph["rotation_deg"], ph["mirrored"], ph["axial_flip"], ph["tilt_deg"]))
        vol = load_volume(sorted((tmp_path / scanner.id / entry["path"]).glob("*.dcm")))
        # deep background: at least 4 voxels (16 mm) from any sphere, wall or edge
        body = nema_iec_phantom(Grid(vol.array.shape, vol.voxel_mm, vol.origin_mm), sphere_kbq_ml=0.0,
                                background_kbq_ml=1.0, shift_mm=spec.phantom.shift_mm, supersample=1,
                                **{k: ph[k] for k in ("rotation_deg", "mirrored", "axial_flip", "tilt_deg")})
        flat = ndimage.binary_erosion(body.activity_kbq_ml > 0.999, iterations=4)
        cov = float(vol.array[flat].std() / vol.array[flat].mean())
        low, high = spec.phantom.noise_cov
        assert low <= ph["noise_cov"] <= high and ph["sphere_wall_mm"] == 1.0
        assert cov == pytest.approx(ph["noise_cov"], rel=0.1), scanner.id
    assert len({p[0] for p in poses}) == len(poses)
    assert {p[1] for p in poses} == {True, False} and {p[2] for p in poses} == {True, False}
    again = _write_phantom(tmp_path / "again", spec, spec.scanners[0], "nema_iec", 0, day)
    first = sorted((tmp_path / spec.scanners[0].id / again["path"]).glob("*.dcm"))
    second = sorted((tmp_path / "again" / again["path"]).glob("*.dcm"))
    assert len(first) > 0 and [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
