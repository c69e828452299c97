"""Phantom analysis against analytic truth, and verdicts against the EARL standards."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import erf

from accreditation.standards import load_standard, verdict
from corelab.grid import Grid
from phantoms.cylinder import analyze_uniform_cylinder
from phantoms.localise import PhantomLocalisationError
from phantoms.nema_iec import analyze_nema_iec
from synth.digital_phantoms import nema_iec_phantom, uniform_cylinder
from synth.imaging import add_noise, block_mean, blur_fwhm

S, B = 20.0, 2.0  # kBq/mL, the EARL 10:1 filling


# ---------------------------------------------------------------------------------------------
# Independent references (no code from phantoms/)
# ---------------------------------------------------------------------------------------------
def _ball_blur_profile(r, a, sigma):
    """Uniform ball of radius a (value 1) convolved with an isotropic 3-D Gaussian, at radius r."""
    r = np.asarray(r, dtype=float)
    s2 = math.sqrt(2.0) * sigma
    small = r < 1e-6
    rr = np.where(small, 1.0, r)
    out = 0.5 * (erf((a - rr) / s2) + erf((a + rr) / s2)) + sigma / (rr * math.sqrt(2.0 * math.pi)) * (
        np.exp(-((a + rr) ** 2) / (2 * sigma**2)) - np.exp(-((a - rr) ** 2) / (2 * sigma**2))
    )
    centre = erf(a / s2) - math.sqrt(2.0 / math.pi) * a / sigma * math.exp(-(a**2) / (2 * sigma**2))
    return np.where(small, centre, out)


def _local_axes(grid, centre, half_mm):
    z, y, x = grid.axes_mm()
    return (
        z[np.abs(z - centre[2]) <= half_mm],
        y[np.abs(y - centre[1]) <= half_mm],
        x[np.abs(x - centre[0]) <= half_mm],
    )


def _a50_reference(values):
    """RCmax and RCmean of a local image of one sphere, by the EARL A50 definition."""
    vmax = values.max()
    labels, _ = ndimage.label(values >= B + 0.5 * (vmax - B))
    k = np.unravel_index(np.argmax(values), values.shape)
    return vmax / S, values[labels == labels[k]].mean() / S


def continuous_reference(grid, centre, diameter_mm, fwhm_mm, *, n_sub=7):
    """Sphere (x) Gaussian (x) voxel box, evaluated at the voxel centres.

    The digital phantom holds voxel *means* of the activity, so the ideal image of it is the
    continuous sphere convolved with the Gaussian and with the voxel box (averaged over the
    voxel by an n_sub^3 midpoint rule), sampled at voxel centres.
    """
    sigma = fwhm_mm / 2.3548
    zs, ys, xs = _local_axes(grid, centre, 0.5 * diameter_mm + 12.0)
    u = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    dz, dy, dx = grid.voxel_mm
    acc = np.zeros((len(zs), len(ys), len(xs)))
    for oz in u * dz:
        for oy in u * dy:
            for ox in u * dx:
                r = np.sqrt(
                    (zs[:, None, None] + oz - centre[2]) ** 2
                    + (ys[None, :, None] + oy - centre[1]) ** 2
                    + (xs[None, None, :] + ox - centre[0]) ** 2
                )
                acc += _ball_blur_profile(r, 0.5 * diameter_mm, sigma)
    return _a50_reference(B + (S - B) * acc / n_sub**3)


def discrete_reference(grid, centre, diameter_mm, fwhm_mm, *, n_sub=10):
    """Voxel means of the sphere by fine point sampling, then a sampled Gaussian kernel.

    Models the plain digital image (voxel-mean activity, then a Gaussian sampled at voxel
    centres, as ``blur_fwhm`` does), which at FWHM = 1.5 voxels departs from the continuous
    model by up to ~0.03 in RC.
    """
    sigma = fwhm_mm / 2.3548
    zs, ys, xs = _local_axes(grid, centre, 0.5 * diameter_mm + 6.0 * sigma + 8.0)
    u = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    dz, dy, dx = grid.voxel_mm
    frac = np.zeros((len(zs), len(ys), len(xs)))
    for oz in u * dz:
        for oy in u * dy:
            for ox in u * dx:
                frac += (
                    (zs[:, None, None] + oz - centre[2]) ** 2
                    + (ys[None, :, None] + oy - centre[1]) ** 2
                    + (xs[None, None, :] + ox - centre[0]) ** 2
                ) <= (0.5 * diameter_mm) ** 2
    frac /= n_sub**3
    for axis, spacing in enumerate(grid.voxel_mm):
        half = int(math.ceil(5 * sigma / spacing))
        k = np.arange(-half, half + 1) * spacing
        kernel = np.exp(-(k**2) / (2 * sigma**2))
        frac = np.apply_along_axis(lambda v: np.convolve(v, kernel / kernel.sum(), mode="same"), axis, frac)
    values = B + (S - B) * frac
    keep = _local_axes(grid, centre, 0.5 * diameter_mm + 12.0)
    sel = np.ix_(np.isin(zs, keep[0]), np.isin(ys, keep[1]), np.isin(xs, keep[2]))
    return _a50_reference(values[sel])


def _phantom(voxel_mm, *, fwhm_mm, span_z_mm=80.0, oversample=1, **kwargs):
    """Image of a noiseless IEC phantom; ``oversample`` > 1 renders and blurs on a grid that
    many times finer, then averages back to ``voxel_mm`` (the voxel-integrated image)."""
    n = int(round(330 / voxel_mm))
    g = Grid.centred((int(round(span_z_mm / voxel_mm)), n, n), (voxel_mm,) * 3)
    f = int(oversample)
    fine = Grid.centred(tuple(f * k for k in g.shape), tuple(v / f for v in g.voxel_mm), g.centre_mm)
    truth = nema_iec_phantom(fine, sphere_kbq_ml=S, background_kbq_ml=B, **kwargs)
    img = blur_fwhm(truth.activity_kbq_ml, fine.voxel_mm, fwhm_mm)
    return g, truth, (block_mean(img, f) if f > 1 else img)


def _oversample_for(voxel_mm, fwhm_mm):
    """Fine-grid factor that keeps the fine voxel at or below FWHM / 3."""
    return max(1, math.ceil(voxel_mm / (fwhm_mm / 3.0) - 1e-9))


# small off-grid offsets so that sphere centres do not sit on voxel centres
_OFFSET = dict(shift_mm=(1.3, -0.7, 0.9), rotation_deg=7.0)


@pytest.fixture(scope="module", params=[2.0, 3.0, 4.0], ids=lambda v: f"{v:g}mm")
def noiseless_6mm(request):
    """The voxel-integrated image of a 6 mm FWHM Gaussian PSF (rendered on a grid of at most
    2 mm, blurred there, averaged to the voxel size)."""
    g, truth, img = _phantom(request.param, fwhm_mm=6.0, oversample=_oversample_for(request.param, 6.0), **_OFFSET)
    result = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    return g, truth, result


def test_rc_matches_continuous_model(noiseless_6mm):
    """RCmax and RCmean agree within 0.01 with sphere (x) Gaussian (x) voxel box, every sphere.

    Measured when written: worst difference 0.003 (2 mm voxels, 10 mm sphere).
    """
    g, truth, result = noiseless_6mm
    for s in result.spheres:
        rc_max, rc_mean = continuous_reference(g, truth.sphere_centres_mm[s.diameter_mm], s.diameter_mm, 6.0)
        assert s.rc_max == pytest.approx(rc_max, abs=0.01), s.diameter_mm
        assert s.rc_mean == pytest.approx(rc_mean, abs=0.01), s.diameter_mm


@pytest.mark.parametrize("voxel_mm", [3.0, 4.0])
def test_rc_matches_discrete_model(voxel_mm):
    """On the plain digital image (sampled Gaussian on voxel means, no oversampling) the analysis
    agrees within 0.01 with an independent model of that same discrete image (measured: 0.006)."""
    g, truth, img = _phantom(voxel_mm, fwhm_mm=6.0, **_OFFSET)
    result = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    for s in result.spheres:
        rc_max, rc_mean = discrete_reference(g, truth.sphere_centres_mm[s.diameter_mm], s.diameter_mm, 6.0)
        assert s.rc_max == pytest.approx(rc_max, abs=0.01), s.diameter_mm
        assert s.rc_mean == pytest.approx(rc_mean, abs=0.01), s.diameter_mm


def test_noiseless_contrast_and_variability(noiseless_6mm):
    g, truth, result = noiseless_6mm
    assert result.n_background_rois == 60
    for s in result.spheres:
        assert s.background_mean_kbq_ml == pytest.approx(B, rel=0.002)
        assert s.background_variability_pct < 0.5
        assert 0.0 < s.percent_contrast < 100.0
    q = [s.percent_contrast for s in result.spheres]
    assert q[-1] > 75.0 and q[-1] > q[0]
    # RC grows with sphere size; the 37 mm sphere recovers fully in its max
    assert result.sphere(37.0).rc_max == pytest.approx(1.0, abs=0.005)
    assert np.all(np.diff([s.rc_mean for s in result.spheres]) > 0)
    assert result.coordinates == "patient"
    d = result.to_dict()
    assert d["spheres"][0]["diameter_mm"] == 10.0 and "rc_peak" in d["spheres"][0]


@pytest.mark.parametrize(
    "shift_mm, rotation_deg, tilt_deg",
    [((30.0, -30.0, 10.0), 20.0, 0.0), ((-30.0, 30.0, -10.0), -20.0, 3.0), ((30.0, 30.0, 0.0), -20.0, -3.0),
     ((-30.0, -30.0, 5.0), 180.0, 0.0)],
)
def test_localisation_under_shift_and_rotation(shift_mm, rotation_deg, tilt_deg):
    g, truth, img = _phantom(4.0, fwhm_mm=7.0, span_z_mm=100.0, shift_mm=shift_mm, rotation_deg=rotation_deg,
                             tilt_deg=tilt_deg)
    result = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    for s in result.spheres:
        assert np.linalg.norm(np.subtract(s.centre_mm, truth.sphere_centres_mm[s.diameter_mm])) < 1.0
    assert np.linalg.norm(np.subtract(result.ring_centre_mm, truth.lung_axis_point_mm)) < 1.0
    assert abs(np.dot(result.phantom_axis, truth.lung_axis_direction)) == pytest.approx(1.0, abs=1e-3)


def test_noisy_phantom_localises():
    g, truth, img = _phantom(4.0, fwhm_mm=7.0, span_z_mm=100.0, shift_mm=(12.0, -8.0, 4.0), rotation_deg=10.0)
    noisy = add_noise(img, rng=np.random.default_rng(42), cov=0.1)
    result = analyze_nema_iec(noisy, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    for s in result.spheres:
        assert np.linalg.norm(np.subtract(s.centre_mm, truth.sphere_centres_mm[s.diameter_mm])) < 2.0
    assert result.sphere(37.0).background_variability_pct > 0.5
    assert result.sphere(37.0).rc_mean == pytest.approx(0.85, abs=0.05)


def test_known_centres_skip_the_search():
    g, truth, img = _phantom(4.0, fwhm_mm=6.0, span_z_mm=60.0, **_OFFSET)
    found = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    given = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g,
                             centres_mm=truth.sphere_centres_mm)
    assert given.fit_rms_mm < 1e-6
    for a, b in zip(given.spheres, found.spheres):
        assert a.rc_max == pytest.approx(b.rc_max) and a.rc_mean == pytest.approx(b.rc_mean, abs=1e-3)


def test_phantom_turned_over_localises():
    # tilt 180 deg: the phantom lies the other way round (lid towards -z), sphere order mirrored
    g, truth, img = _phantom(4.0, fwhm_mm=7.0, span_z_mm=60.0, rotation_deg=15.0, tilt_deg=180.0)
    result = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    for s in result.spheres:
        assert np.linalg.norm(np.subtract(s.centre_mm, truth.sphere_centres_mm[s.diameter_mm])) < 1.0
    assert result.n_background_rois == 60


def test_too_few_spheres_is_explicit():
    # at 16 mm FWHM only the 37 and 28 mm spheres rise above half the contrast
    g, truth, img = _phantom(4.0, fwhm_mm=16.0, span_z_mm=60.0)
    with pytest.raises(PhantomLocalisationError, match=r"found 2 hot sphere\(s\) .*need at least 3"):
        analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)


def test_index_coordinates_without_grid():
    g, truth, img = _phantom(4.0, fwhm_mm=7.0, span_z_mm=60.0)
    result = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B)
    assert result.coordinates == "index"
    expected = np.subtract(truth.sphere_centres_mm[37.0], g.origin_mm)
    assert np.linalg.norm(np.subtract(result.sphere(37.0).centre_mm, expected)) < 1.0


def test_localisation_failure_is_explicit():
    g = Grid.centred((20, 60, 60), (4.0, 4.0, 4.0))
    flat = np.full(g.shape, B, dtype=np.float32)
    with pytest.raises(PhantomLocalisationError, match="found 0 hot sphere"):
        analyze_nema_iec(flat, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B)
    with pytest.raises(ValueError, match="must exceed"):
        analyze_nema_iec(flat, g.voxel_mm, sphere_kbq_ml=B, background_kbq_ml=B)


# EARL1 on noiseless Gaussian-blurred phantoms at 4 mm voxels (measured when written, over
# random sub-voxel placements and rolls): 6.5 mm and sharper fail (10-22 mm spheres above their
# bands); 7.0 mm passes by a hair or fails on the 22 mm RCmean (0.795 > 0.78) depending on the
# placement; 7.5 and 8.0 mm pass with margin >= 0.014 everywhere; 8.5 mm is marginal; 9.0 mm and
# broader fail (13-17 mm spheres below their bands). At 2 mm voxels: 7.5-9.0 mm pass.
EARL1_PASSING_FWHM_MM = (7.5, 8.0)
EARL1_FAILING_FWHM_MM = 10.0


@pytest.mark.parametrize("fwhm_mm", EARL1_PASSING_FWHM_MM)
def test_earl1_passes_at_moderate_resolution(fwhm_mm):
    g, truth, img = _phantom(4.0, fwhm_mm=fwhm_mm, span_z_mm=100.0, shift_mm=(5.0, -3.0, 2.0), rotation_deg=5.0)
    result = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    v = verdict(result, load_standard("EARL1"))
    assert v.passed, [(c.metric, c.diameter_mm, round(c.value, 3)) for c in v.failures]
    assert len(v.checks) == 12 and all(c.margin >= 0 for c in v.checks)


def test_earl1_fails_at_10mm_fwhm_small_spheres_below_band():
    g, truth, img = _phantom(4.0, fwhm_mm=EARL1_FAILING_FWHM_MM, span_z_mm=100.0)
    result = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    v = verdict(result, load_standard("EARL1"))
    assert not v.passed
    failed = {(c.metric, c.diameter_mm) for c in v.failures}
    assert ("rc_max", 10.0) in failed and ("rc_max", 13.0) in failed
    for c in v.failures:
        assert c.diameter_mm <= 17.0 and c.value < c.low and c.margin < 0
    # a Gaussian blur cannot overshoot, so EARL2 RCmax (37 mm band starts at 1.05) fails too
    assert not verdict(result, load_standard("EARL2")).passed


def test_standards_load_and_unverified_rcpeak():
    e1, e2 = load_standard("EARL1"), load_standard("EARL2")
    assert e1.metrics["rc_mean"][37.0].low == 0.76 and e1.metrics["rc_max"][10.0].high == 0.57
    assert "rc_peak" not in e1.metrics
    assert e2.metrics["rc_mean"][10.0].low == 0.39 and e2.metrics["rc_max"][17.0].high == 1.38
    peak = e2.metrics["rc_peak"]
    assert not peak[13.0].verified and (peak[13.0].low, peak[13.0].high) == (0.45, 0.69)
    assert (peak[10.0].low, peak[10.0].high) == (0.27, 0.41)
    for std in (e1, e2):
        assert std.calibration["calibration_bias_pct"].low == -10.0
        assert std.source and std.version


def test_cylinder_calibration_error_reported():
    g = Grid.centred((64, 64, 64), (4.0, 4.0, 4.0))
    true = 5.0
    img = uniform_cylinder(g, concentration_kbq_ml=0.95 * true, shift_mm=(12.0, -9.0, 6.0))
    img = blur_fwhm(img, g.voxel_mm, 7.0)
    img = add_noise(img, rng=np.random.default_rng(3), cov=0.1)
    result = analyze_uniform_cylinder(img, g.voxel_mm, concentration_kbq_ml=true, grid=g)
    assert result.calibration_bias_pct == pytest.approx(-5.0, abs=0.5)
    assert result.radius_mm == pytest.approx(100.0, abs=3.0)
    assert result.length_mm == pytest.approx(200.0, abs=8.0)
    assert result.centre_mm == pytest.approx((12.0, -9.0, 6.0), abs=2.0)
    assert result.cov_pct == pytest.approx(10.0, abs=1.0)
    assert len(result.slice_means_kbq_ml) == len(result.slice_z_mm) >= 30
    assert result.max_nonuniformity_pct > 0 > result.min_nonuniformity_pct
    v = verdict(result, load_standard("EARL1"))
    assert v.passed and v.checks[0].margin == pytest.approx(5.0, abs=0.5)
    worse = analyze_uniform_cylinder(img * (0.88 / 0.95), g.voxel_mm, concentration_kbq_ml=true)
    vw = verdict(worse, load_standard("EARL1"))
    assert not vw.passed and vw.checks[0].margin == pytest.approx(-2.0, abs=0.5)


def test_cylinder_axial_nonuniformity():
    g = Grid.centred((60, 60, 60), (4.0, 4.0, 4.0))
    img = uniform_cylinder(g, concentration_kbq_ml=5.0)
    z = g.axes_mm()[0]
    img = img * (1.0 + 0.001 * z)[:, None, None]  # +/-6.7 % over the central 133 mm
    result = analyze_uniform_cylinder(img, g.voxel_mm, concentration_kbq_ml=5.0, grid=g)
    assert result.calibration_bias_pct == pytest.approx(0.0, abs=0.2)
    assert result.max_nonuniformity_pct == pytest.approx(-result.min_nonuniformity_pct, abs=0.3)
    assert 5.5 < result.max_nonuniformity_pct < 7.5


def test_cylinder_not_found():
    g = Grid.centred((10, 20, 20), (4.0, 4.0, 4.0))
    with pytest.raises(PhantomLocalisationError, match="no voxel above half"):
        analyze_uniform_cylinder(np.zeros(g.shape), g.voxel_mm, concentration_kbq_ml=5.0)


def test_results_serialise_to_strict_json():
    import json

    g, truth, img = _phantom(4.0, fwhm_mm=7.0, span_z_mm=24.0)  # too short for most background ROIs
    result = analyze_nema_iec(img, g.voxel_mm, sphere_kbq_ml=S, background_kbq_ml=B, grid=g)
    d = result.to_dict()
    json.dumps(d, allow_nan=False)
    json.dumps(verdict(result, load_standard("EARL2")).to_dict(), allow_nan=False)
    assert d["spheres"][5]["diameter_mm"] == 37.0 and isinstance(d["ring_centre_mm"], list)
