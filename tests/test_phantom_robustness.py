"""NEMA IEC analysis under the conditions a site's phantom scan comes in: shifts, rolls, tilts,
either orientation, 2-5 mm voxels, 4:1 to 10:1 fillings, noise, stray hot objects; the lung
residual, RCpeak placement, and failures that say what went wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from corelab.grid import Grid
from phantoms.cylinder import analyze_uniform_cylinder
from phantoms.localise import PhantomLocalisationError
from phantoms.nema_iec import analyze_nema_iec
from synth.digital_phantoms import nema_iec_phantom, uniform_cylinder
from synth.imaging import add_noise, blur_fwhm

B = 2.0  # kBq/mL background


def _image(voxel_mm, *, ratio=10.0, fwhm_mm=7.0, span_z_mm=100.0, noise_cov=0.0, seed=0, lung_kbq_ml=0.0,
           **pose):
    """A blurred (optionally noisy) IEC phantom image; voxel_mm scalar or (slice, row, col)."""
    vox = np.broadcast_to(np.asarray(voxel_mm, dtype=float), (3,))
    shape = (int(round(span_z_mm / vox[0])), int(round(330 / vox[1])), int(round(330 / vox[2])))
    g = Grid.centred(shape, tuple(vox))
    truth = nema_iec_phantom(g, sphere_kbq_ml=ratio * B, background_kbq_ml=B, lung_kbq_ml=lung_kbq_ml,
                             supersample=2, **pose)
    img = blur_fwhm(truth.activity_kbq_ml, g.voxel_mm, fwhm_mm)
    if noise_cov:
        # correlated noise, as in a reconstructed image: white noise smoothed over ~1 voxel
        rng = np.random.default_rng(seed)
        white = ndimage.gaussian_filter(rng.standard_normal(img.shape), 1.0)
        img = img * (1.0 + noise_cov * white / white.std())
    return g, truth, img.astype(np.float32)


def _analyse(g, truth, img, **kwargs):
    return analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=truth.sphere_kbq_ml,
                            background_kbq_ml=truth.background_kbq_ml, grid=g, **kwargs)


def _centre_errors(result, truth):
    return {s.diameter_mm: float(np.linalg.norm(np.subtract(s.centre_mm, truth.sphere_centres_mm[s.diameter_mm])))
            for s in result.spheres}


CASES = [
    # voxel mm, ratio, noise CoV, shift mm, roll deg, tilt deg
    pytest.param(2.0, 10.0, 0.0, (-30.0, 30.0, 8.0), -20.0, 4.0, id="2mm-10to1-shift-roll-tilt"),
    pytest.param(3.0, 8.0, 0.05, (30.0, -30.0, -10.0), 20.0, -3.0, id="3mm-8to1-noise5-shift-roll-tilt"),
    pytest.param((3.0, 4.0, 4.0), 10.0, 0.1, (12.0, 25.0, 0.0), 10.0, 0.0, id="3x4x4mm-noise10"),
    pytest.param(4.0, 4.0, 0.0, (25.0, -20.0, 5.0), -15.0, 5.0, id="4mm-4to1-tilt5"),
    pytest.param(4.0, 4.0, 0.1, (-30.0, -30.0, 0.0), 20.0, 2.0, id="4mm-4to1-noise10"),
    pytest.param(4.0, 6.0, 0.2, (0.0, 10.0, -5.0), -10.0, 0.0, id="4mm-6to1-noise20"),
    pytest.param(5.0, 10.0, 0.0, (30.0, 30.0, 10.0), 20.0, -4.0, id="5mm-10to1-shift-roll-tilt"),
    pytest.param(5.0, 4.0, 0.1, (-20.0, 15.0, 0.0), -20.0, 3.0, id="5mm-4to1-noise10"),
]


@pytest.mark.parametrize("voxel_mm, ratio, noise_cov, shift_mm, rotation_deg, tilt_deg", CASES)
def test_localises_every_sphere(voxel_mm, ratio, noise_cov, shift_mm, rotation_deg, tilt_deg):
    g, truth, img = _image(voxel_mm, ratio=ratio, noise_cov=noise_cov, shift_mm=shift_mm,
                           rotation_deg=rotation_deg, tilt_deg=tilt_deg)
    result = _analyse(g, truth, img)
    worst = max(_centre_errors(result, truth).values())
    # centroids of thresholded spheres carry partial-volume bias: up to ~0.2 voxel
    assert worst < max(1.0, 0.25 * np.max(voxel_mm)) + (1.0 if noise_cov else 0.0), _centre_errors(result, truth)
    assert np.linalg.norm(np.subtract(result.ring_centre_mm, truth.lung_axis_point_mm)) < 1.5
    assert abs(np.dot(result.phantom_axis, truth.lung_axis_direction)) == pytest.approx(1.0, abs=2e-3)
    assert result.n_background_rois == 60 and len(result.lung_residual_planes) == 5
    assert {37.0, 28.0, 22.0} <= {s.diameter_mm for s in result.spheres if s.detected}
    if noise_cov == 0:
        # RC rises with size, the 37 mm sphere is near full recovery, contrast is sane
        assert np.all(np.diff([s.rc_mean for s in result.spheres]) > 0)
        assert result.sphere(37.0).rc_max == pytest.approx(1.0, abs=0.02)
        assert 60.0 < result.sphere(37.0).percent_contrast < 100.0
        assert result.sphere(37.0).background_variability_pct < 1.0


@pytest.mark.parametrize("voxel_mm", [2.0, 4.0])
def test_either_orientation_gives_the_same_recovery(voxel_mm):
    """Turned end over end (lid towards the feet, as when scanned feet first) the sphere order is
    mirrored; the fit is a proper rotation, so every ROI follows and the results agree."""
    kwargs = dict(fwhm_mm=7.0, span_z_mm=80.0, shift_mm=(4.0, -6.0, 1.0))
    g, truth, img = _image(voxel_mm, rotation_deg=12.0, **kwargs)
    g2, truth2, img2 = _image(voxel_mm, rotation_deg=12.0, tilt_deg=180.0, **kwargs)
    a, b = _analyse(g, truth, img), _analyse(g2, truth2, img2)
    assert max(_centre_errors(b, truth2).values()) < 1.0
    assert np.dot(a.phantom_axis, b.phantom_axis) == pytest.approx(-1.0, abs=1e-3)
    assert b.n_background_rois == 60
    for sa, sb in zip(a.spheres, b.spheres):
        assert sb.rc_mean == pytest.approx(sa.rc_mean, abs=0.03)
        assert sb.percent_contrast == pytest.approx(sa.percent_contrast, abs=3.0)
    assert b.lung_residual_pct == pytest.approx(a.lung_residual_pct, abs=1.0)


def test_stray_hot_objects_are_ignored():
    """A hot syringe beside the phantom and hot noise specks do not take a sphere's place."""
    g, truth, img = _image(4.0, shift_mm=(10.0, 0.0, 0.0), rotation_deg=8.0)
    img = img.copy()
    # a 30 mm hot cylinder outside the body (a syringe lying on the couch), and two hot specks
    z, y, x = g.axes_mm()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    img[((xx - 145.0) ** 2 + (yy - 120.0) ** 2 <= 15.0**2) & (np.abs(zz) < 30)] = 40.0
    for cx, cy in ((-60.0, 40.0), (70.0, 30.0)):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 + zz**2 <= 6.0**2] = 60.0
    result = _analyse(g, truth, img)
    assert max(_centre_errors(result, truth).values()) < 1.0


def test_given_centres_rescue_a_phantom_that_cannot_be_localised():
    # at 16 mm FWHM only two spheres rise above half the contrast: the search gives up, and
    # says how to give the centres by hand
    g, truth, img = _image(4.0, fwhm_mm=16.0, span_z_mm=60.0)
    with pytest.raises(PhantomLocalisationError, match=r"found 2 hot sphere.*--centres FILE"):
        _analyse(g, truth, img)
    given = {d: c for d, c in truth.sphere_centres_mm.items() if d >= 22.0}
    result = _analyse(g, truth, img, centres_mm=given)
    assert result.localisation == "given centres"
    assert max(_centre_errors(result, truth).values()) < 1e-6
    assert result.sphere(10.0).rc_max < 0.3


def test_failures_name_the_problem():
    g, truth, img = _image(4.0, span_z_mm=60.0)
    with pytest.raises(PhantomLocalisationError, match=r"not IEC sphere diameters"):
        _analyse(g, truth, img, centres_mm={36.0: (0, 0, 0), 28.0: (1, 0, 0), 22.0: (0, 1, 0)})
    with pytest.raises(PhantomLocalisationError, match=r"gives 2 sphere"):
        _analyse(g, truth, img, centres_mm={37.0: (0, 0, 0), 28.0: (1, 0, 0)})
    wrong = {d: np.add(c, (0.0, 0.0, 25.0 if d == 37.0 else 0.0)) for d, c in truth.sphere_centres_mm.items()}
    with pytest.raises(PhantomLocalisationError, match=r"do not fit the IEC sphere ring: RMS"):
        _analyse(g, truth, img, centres_mm=wrong)
    with pytest.raises(ValueError, match="rc_peak_placement"):
        _analyse(g, truth, img, rc_peak_placement="centre")
    # the sphere plane outside the image: nothing hot at all
    g2 = Grid.centred((10, 80, 80), (4.0, 4.0, 4.0))
    far = nema_iec_phantom(g2, sphere_kbq_ml=20.0, background_kbq_ml=B, shift_mm=(0.0, 0.0, 80.0))
    with pytest.raises(PhantomLocalisationError, match=r"found 0 hot sphere.*sphere plane is in the image"):
        analyze_nema_iec(far.activity_kbq_ml, g2.voxel_mm, sphere_kbq_ml=20.0, background_kbq_ml=B, grid=g2)


def test_lung_residual():
    g, truth, img = _image(4.0, span_z_mm=80.0, lung_kbq_ml=1.0)
    r = _analyse(g, truth, img)
    # 30 mm ROI inside the 42 mm insert: 1.0 / 2.0 plus a little spill-in from the blur
    assert r.lung_residual_pct == pytest.approx(50.0, abs=2.0)
    assert len(r.lung_residual_per_plane_pct) == 5 and np.ptp(r.lung_residual_per_plane_pct) < 0.5
    g, truth, img = _image(4.0, span_z_mm=80.0, lung_kbq_ml=0.0)
    cold = _analyse(g, truth, img)
    assert 0.0 <= cold.lung_residual_pct < 5.0
    d = cold.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["lung_residual"] == pytest.approx(cold.lung_residual_pct)
    assert set(d["background_variability"]) == {"10", "13", "17", "22", "28", "37"}
    assert d["rc_peak_placement"] == "max_voxel"


def test_rc_peak_placements():
    g, truth, img = _image(4.0, fwhm_mm=7.0, span_z_mm=80.0, shift_mm=(1.3, -0.7, 0.9))
    noisy = add_noise(img, rng=np.random.default_rng(5), cov=0.15)
    on_max = _analyse(g, truth, noisy)
    best = _analyse(g, truth, noisy, rc_peak_placement="max_mean")
    assert best.rc_peak_placement == "max_mean"
    for a, b in zip(on_max.spheres, best.spheres):
        # the highest 1 mL mean is at least the 1 mL mean on the hottest voxel, if that voxel
        # lies within the sphere's radius of its centre (the search region of max_mean)
        if np.linalg.norm(np.subtract(a.peak_centre_mm, a.centre_mm)) <= 0.5 * a.diameter_mm:
            assert b.rc_peak >= a.rc_peak - 1e-9
        assert np.linalg.norm(np.subtract(b.peak_centre_mm, b.centre_mm)) <= 0.5 * b.diameter_mm + 1e-6
    clean = _analyse(g, truth, img, rc_peak_placement="max_mean")
    assert clean.sphere(37.0).rc_peak == pytest.approx(1.0, abs=0.01)


def test_cylinder_suv_mean():
    g = Grid.centred((56, 64, 64), (4.0, 4.0, 4.0))
    img = blur_fwhm(uniform_cylinder(g, concentration_kbq_ml=4.75), g.voxel_mm, 7.0)
    r = analyze_uniform_cylinder(img, g.voxel_mm, concentration_kbq_ml=5.0, grid=g)
    assert r.suv_mean == pytest.approx(0.95, abs=0.005)
    assert r.calibration_bias_pct == pytest.approx((r.suv_mean - 1.0) * 100.0)
    assert r.to_dict()["suv_mean"] == pytest.approx(r.suv_mean)
