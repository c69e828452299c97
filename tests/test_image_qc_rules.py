"""Image rules of the imaging manual (liver reference, noise, coverage, bed dip, PET/CT alignment)
and the per-series QC note that goes to the site right after QC.

The rules are checked on header-table rows built to break each one (as tests/test_manual.py
does); the columns, the "not assessable" path, scans without CT and the QC notes on a small
synthetic trial stored, accredited and checked without Prefect (tests/lab_helpers.build_lab).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import Deviation, Report, Series, Site
from expectations.header_table import IMAGE_COLUMNS, add_cross_scan_columns
from expectations.manual import load_manual, validate
from tests.lab_helpers import build_lab

PDFTOTEXT = shutil.which("pdftotext") or "pdftotext"  # poppler-utils, from .ci/system-deps


@pytest.fixture(scope="module")
def manual():
    return load_manual("FDG-RESP-01")


def _row(uid, **over):
    """A clean row: header columns of tests/test_manual.py plus normal image columns."""
    base = {"series_uid": uid, "units": "BQML", "decay_correction": "START", "corrected_attn_decy": True,
            "weight_kg": 70.0, "suv_factor_g_per_bq": 2e-4, "activity_mbq": 250.0, "activity_mbq_per_kg": 3.6,
            "uptake_min": 61.0, "scanner_accredited": True, "software_matches_register": True, "slices_missing": 0,
            "header_problems": "", "axial_coverage_mm": 160.0,
            "liver_assessable": True, "liver_reason": "", "liver_suv_mean": 2.1, "liver_suv_sd": 0.2,
            "liver_cov_pct": 10.0, "liver_sul_mean": 1.6, "bed_dip_planes": 0, "petct_shift_mm": 3.0,
            "petct_shift_x_mm": 1.0, "petct_shift_y_mm": -3.0, "petct_shift_z_mm": 2.0, "petct_reason": "",
            "liver_sul_diff_vs_baseline_pct": 5.0, "liver_sul_diff_vs_baseline": 0.08}
    return {**base, **over}


@pytest.mark.parametrize("over, rule", [
    ({"liver_suv_mean": 3.6}, "liver_suv_range"),
    ({"liver_suv_mean": 1.2}, "liver_suv_range"),
    ({"liver_sul_diff_vs_baseline_pct": 25.0, "liver_sul_diff_vs_baseline": 0.25}, "liver_sul_vs_baseline"),
    ({"liver_sul_diff_vs_baseline_pct": -15.0, "liver_sul_diff_vs_baseline": -0.35}, "liver_sul_vs_baseline"),
    ({"liver_sul_diff_vs_baseline_pct": 30.0, "liver_sul_diff_vs_baseline": 0.5}, "liver_sul_vs_baseline"),
    ({"liver_cov_pct": 15.5}, "liver_noise"),
    ({"liver_assessable": False, "liver_reason": "no liver-like region", "liver_suv_mean": None,
      "liver_suv_sd": None, "liver_cov_pct": None, "liver_sul_mean": None}, "liver_assessable"),
    ({"axial_coverage_mm": 90.0}, "axial_coverage"),
    ({"bed_dip_planes": 5}, "bed_position_missing"),
    ({"petct_shift_mm": 15.0, "petct_shift_z_mm": 15.0}, "petct_alignment"),
])
def test_each_image_rule_fires_alone(manual, over, rule):
    table = pd.DataFrame([_row("clean-1"), _row("bad", **over), _row("clean-2")])
    assert [(f.series_uid, f.rule.id) for f in validate(manual, table).findings] == [("bad", rule)]


def test_boundaries_hold_and_nulls_are_not_checked(manual):
    table = pd.DataFrame([
        _row("edge", liver_suv_mean=3.0, liver_cov_pct=15.0, petct_shift_mm=10.0, axial_coverage_mm=100.0,
             liver_sul_diff_vs_baseline_pct=-20.0, liver_sul_diff_vs_baseline=0.3),
        _row("no-ct", petct_shift_mm=None, petct_shift_x_mm=None, petct_shift_y_mm=None, petct_shift_z_mm=None,
             petct_reason="no CT"),
        _row("baseline", liver_sul_diff_vs_baseline_pct=None, liver_sul_diff_vs_baseline=None),
    ])
    assert validate(manual, table).findings == []


def test_no_image_rule_fires_without_suv(manual):
    """SUV not computable: every image column null, and only the SUV rule speaks."""
    row = _row("no-suv", suv_factor_g_per_bq=None, **dict.fromkeys(IMAGE_COLUMNS),
               liver_sul_diff_vs_baseline_pct=None, liver_sul_diff_vs_baseline=None)
    assert {f.rule.id for f in validate(manual, pd.DataFrame([row])).findings} == {"suv_computable"}


def test_image_rules_have_sources_and_messages(manual):
    text = manual.path.read_text()
    ids = ("liver_suv_range", "liver_sul_vs_baseline", "liver_noise", "liver_assessable", "axial_coverage",
           "bed_position_missing", "petct_alignment")
    rules = {r.id: r for r in manual.rules}
    assert set(ids) <= set(rules) and manual.version != "1.0.0"
    assert "own choice" in rules["liver_noise"].message and "EANM" in rules["liver_suv_range"].message
    assert "PERCIST" in rules["liver_sul_vs_baseline"].message and "PERCIST" in text
    assert rules["liver_sul_vs_baseline"].expected() == "-20 to 20 % and -0.3 to 0.3 g/mL"
    assert {r.severity for r in rules.values() if r.id in ("liver_suv_range", "bed_position_missing",
                                                          "petct_alignment")} == {"major"}


def test_liver_sul_change_against_the_baseline():
    df = pd.DataFrame([
        {"subject": "S1", "visit": "baseline", "scanner": "A", "liver_sul_mean": 1.5},
        {"subject": "S1", "visit": "followup", "scanner": "A", "liver_sul_mean": 1.8},
        {"subject": "S2", "visit": "baseline", "scanner": "A", "liver_sul_mean": None},
        {"subject": "S2", "visit": "followup", "scanner": "A", "liver_sul_mean": 1.8},
    ])
    out = add_cross_scan_columns(df)
    assert out["liver_sul_diff_vs_baseline_pct"].tolist()[:2] == [None, pytest.approx(20.0)]
    assert out["liver_sul_diff_vs_baseline"].tolist()[1] == pytest.approx(0.3)
    assert out["liver_sul_diff_vs_baseline_pct"].tolist()[2:] == [None, None]


def test_observed_values_are_readable():
    from expectations.manual import Finding
    from expectations.qc import _observed

    rules = {r.id: r for r in load_manual("FDG-RESP-01").rules}
    row = _row("x", liver_reason="no liver-like region of 3 cm found", petct_shift_mm=15.2,
               petct_shift_z_mm=-15.2, bed_dip_planes=4, bed_dip_z_from_mm=-40.0, bed_dip_z_to_mm=-20.0,
               liver_sul_diff_vs_baseline_pct=25.0, liver_sul_diff_vs_baseline=0.4)
    assert _observed(Finding("x", rules["liver_assessable"], False), row) == \
        "not assessable: no liver-like region of 3 cm found"
    assert _observed(Finding("x", rules["petct_alignment"], 15.2), row).startswith("15.2 mm (PET minus CT: x +1.0")
    assert _observed(Finding("x", rules["bed_position_missing"], 4), row) == "4 planes, z -40 to -20 mm"
    assert _observed(Finding("x", rules["liver_sul_vs_baseline"], 25.0), row) == "+25 %; +0.4 g/mL"


def test_figure_shows_the_voi_and_is_reproducible():
    from corelab.grid import Grid
    from reports.image_figures import series_qc_png

    grid = Grid.centred((30, 40, 40), (4.0, 5.0, 5.0))
    suv = np.zeros(grid.shape, np.float32)
    suv[5:25, 10:30, 10:30] = 1.0
    suv[10:20, 12:24, 8:18] = 2.2  # a liver on the patient's right (low x)
    centre = grid.index_to_mm((15, 18, 13))
    png = series_qc_png(suv, grid, centre_mm=centre, label="liver SUVmean 2.20")
    assert png == series_qc_png(suv, grid, centre_mm=centre, label="liver SUVmean 2.20")
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    assert pixels.std() > 10  # not blank
    orange = (pixels[..., 0] > 200) & (pixels[..., 1] > 100) & (pixels[..., 1] < 160) & (pixels[..., 2] < 80)
    assert orange.sum() > 50  # the VOI circles are drawn


# --------------------------------------------------------------------------------------------
# On a stored synthetic trial
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_lab(tmp_path_factory.mktemp("imageqc"))


def _pet(settings):
    with session_scope(settings) as session:
        return [(s.id, s.series_uid, dict(s.header_row), s.site_id)
                for s in session.exec(select(Series).where(Series.modality == "PT", Series.kind == "trial",
                                                           Series.qc_state == "done").order_by(Series.id))]


def test_image_columns_filled_with_suv_and_null_without(lab):
    settings, truth = lab
    rows = [r for _, _, r, _ in _pet(settings)]
    with_suv = [r for r in rows if r.get("suv_factor_g_per_bq") is not None]
    without = [r for r in rows if r.get("suv_factor_g_per_bq") is None]
    assert with_suv and without
    for r in with_suv:
        assert isinstance(r["liver_assessable"], bool) and r["bed_dip_planes"] is not None
        assert r["liver_reason"] == "" if r["liver_assessable"] else r["liver_reason"]
        if r["liver_assessable"]:
            assert r["liver_suv_mean"] > 0 and r["liver_cov_pct"] > 0 and r["liver_voi_z_mm"] is not None
    assert any(r["liver_assessable"] for r in with_suv)
    for r in without:
        assert all(r.get(c) is None for c in IMAGE_COLUMNS), r["series_uid"]
    with session_scope(settings) as session:
        rules = {(d.series_id, d.rule_id) for d in session.exec(select(Deviation))}
    image_rules = {"liver_suv_range", "liver_sul_vs_baseline", "liver_noise", "liver_assessable",
                   "bed_position_missing", "petct_alignment"}
    no_suv_ids = {sid for sid, _, r, _ in _pet(settings) if r.get("suv_factor_g_per_bq") is None}
    assert not {rule for sid, rule in rules if sid in no_suv_ids} & image_rules


def _rejudge(settings, series_id, monkeypatch, **patches):
    import expectations.qc as qc

    for name, value in patches.items():
        monkeypatch.setattr(qc, name, value)
    manual = load_manual("FDG-RESP-01")
    with session_scope(settings) as session:
        series = session.get(Series, series_id)
        qc.qc_series_batch(session, settings, manual, [series])
        row = dict(series.header_row)
        devs = {d.rule_id: d.observed for d in session.exec(select(Deviation).where(
            Deviation.series_id == series_id, Deviation.status == "open"))}
    monkeypatch.undo()
    with session_scope(settings) as session:  # judge it again as it is, for the tests after this one
        qc.qc_series_batch(session, settings, manual, [session.get(Series, series_id)])
    return row, devs


def test_scan_without_ct_has_no_alignment_check(lab, monkeypatch):
    settings, _ = lab
    sid = next(sid for sid, _, r, _ in _pet(settings) if r.get("suv_factor_g_per_bq") is not None)
    row, devs = _rejudge(settings, sid, monkeypatch, study_ct=lambda *a: (None, "no CT in the study"))
    assert row.get("petct_shift_mm") is None and row.get("petct_shift_x_mm") is None and row["petct_reason"]
    assert "petct_alignment" not in devs


def test_liver_not_assessable_is_a_deviation_with_its_reason(lab, monkeypatch):
    """A uniform body with no liver-like region: the check says why, never a guess."""
    import expectations.qc as qc
    from corelab.dicomio import load_volume

    settings, _ = lab
    sid = next(sid for sid, _, r, _ in _pet(settings) if r.get("suv_factor_g_per_bq") is not None)

    def no_liver(paths):
        volume = load_volume(paths)
        k, j, i = np.indices(volume.array.shape)
        nz, ny, nx = volume.array.shape
        body = ((j - ny / 2) ** 2 + (i - nx / 2) ** 2) < (0.4 * nx) ** 2
        volume.array = np.where(body, np.float32(np.median(volume.array[volume.array > 0])), 0).astype(np.float32)
        return volume

    row, devs = _rejudge(settings, sid, monkeypatch, load_volume=no_liver)
    assert row["liver_assessable"] is False and row["liver_reason"] and row.get("liver_suv_mean") is None
    assert devs["liver_assessable"] == f"not assessable: {row['liver_reason']}"
    assert not {"liver_suv_range", "liver_noise"} & set(devs)
    assert qc.load_volume is load_volume


def _pdf_text(pdf: Path) -> str:
    return subprocess.run([PDFTOTEXT, "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def test_series_qc_notes_published_after_qc_and_idempotent(lab):
    """One note per judged PET series, HTML + PDF with the figure, delivered to its site only;
    the QC path (figure drawn at QC time) and a later call (figure from the files) agree."""
    from expectations.qc import qc_series_batch
    from services.reports import figure_collector, publish_feedback_after_qc

    settings, truth = lab
    pets = _pet(settings)
    ids = [sid for sid, *_ in pets]
    first = publish_feedback_after_qc(settings, ids, {})  # figures drawn again from the files
    assert first["failed"] == [] and first["rendered"] == len(ids)
    figures, on_image = figure_collector()
    manual = load_manual("FDG-RESP-01")
    with session_scope(settings) as session:
        qc_series_batch(session, settings, manual, [session.get(Series, i) for i in ids], on_image=on_image)
    assert set(figures) == {sid for sid, _, r, _ in pets if r.get("suv_factor_g_per_bq") is not None}
    again = publish_feedback_after_qc(settings, ids, figures)  # as tasks.qc.qc_batch does
    assert again == {"rendered": 0, "unchanged": len(ids), "failed": []}

    with session_scope(settings) as session:
        reports = session.exec(select(Report).where(Report.kind == "series_qc")).all()
        sites = {s.id: s.code for s in session.exec(select(Site))}
        devs = {}
        for d in session.exec(select(Deviation).where(Deviation.status == "open")):
            devs.setdefault(d.series_id, []).append((d.rule_id, d.severity))
        assert len(reports) == len(ids) and all(r.version == 1 for r in reports)
        assert {r.site_id for r in reports} == {site for *_, site in pets}
        paths = [(settings.data_dir / r.path, sites[r.site_id]) for r in reports]
    by_uid = {uid: (sid, row) for sid, uid, row, _ in pets}
    checked = 0
    for html, site in paths:
        doc = json.loads(html.with_suffix(".json").read_text())
        data = doc["data"]
        sid, row = by_uid[data["series_uid"]]
        assert data["site"]["code"] == site and data["subject"] == row["subject"]
        assert data["evaluable"] == (not any(sev == "major" for _, sev in devs.get(sid, [])))
        assert sorted(d["rule_id"] for d in data["deviations"]) == sorted(r for r, _ in devs.get(sid, []))
        outbox = settings.outbox_dir
        assert (outbox / site / html.name).is_file()
        assert not any((outbox / other / html.name).exists() for other in ("A01", "B02", "C03") if other != site)
        if data["figure_sha256"] is None:
            continue
        png = Path(f"{html.with_suffix('')}-figures") / "liver_voi.png"
        assert hashlib.sha256(png.read_bytes()).hexdigest() == data["figure_sha256"]
        assert np.asarray(Image.open(png).convert("L"), dtype=float).std() > 10
        if not row.get("liver_assessable") or checked >= 3:
            continue
        text = _pdf_text(html.with_suffix(".pdf"))
        assert row["subject"] in text and f"{row['liver_suv_mean']:.2f}" in text
        for rule, _ in devs.get(sid, []):
            assert rule in text
        checked += 1
    assert checked


def _volume(planes: int, *, z0: float = 0.0, dz: float = 4.0, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            gaps=()):
    from corelab.dicomio import Volume

    return Volume(array=np.ones((planes, 8, 8), np.float32), voxel_mm=(dz, 4.0, 4.0), origin_mm=(0.0, 0.0, z0),
                  orientation=orientation, positions_mm=z0 + dz * np.arange(planes), paths=[],
                  missing_positions_mm=list(gaps))


def test_the_attenuation_ct_must_cover_the_pet():
    """A topogram, a chest-only CT or a CT of another orientation is not the PET's CT: alignment
    and the liver's HU are then not judged (a false major misalignment otherwise)."""
    from expectations.qc import ct_problem

    pet = _volume(48)
    assert ct_problem(pet, _volume(96, dz=2.0)) == ""
    assert "localiser" in ct_problem(pet, _volume(1))
    assert "covers 41 %" in ct_problem(pet, _volume(40, z0=108.0, dz=2.0))
    assert "orientation" in ct_problem(pet, _volume(96, dz=2.0, orientation=(0, 1, 0, 0, 0, -1)))


def test_pet_geometry_problems_withhold_what_depends_on_positions():
    from expectations.qc import geometry_problem

    assert geometry_problem(_volume(48)) == ""
    assert "missing" in geometry_problem(_volume(47, gaps=[40.0]))
    assert "orientation" in geometry_problem(_volume(48, orientation=(-1, 0, 0, 0, 1, 0)))
    assert "zero" in geometry_problem(_volume(48, dz=0.0))


def test_missing_slices_or_a_scout_ct_never_raise_a_misalignment(lab, monkeypatch):
    """With a gap in the PET's slices its planes are not on one grid: no PET/CT verdict (the gap
    is series_complete's). A scout-like CT: no CT, and the liver is still found on the PET."""
    from corelab.dicomio import load_volume

    settings, _ = lab
    sid = next(sid for sid, _, r, _ in _pet(settings) if r.get("suv_factor_g_per_bq") is not None)

    def with_gap(paths):
        volume = load_volume(paths)
        if volume.units == "HU":
            return volume
        volume.missing_positions_mm = [float(volume.positions_mm[5]) + 1.0]
        return volume

    row, devs = _rejudge(settings, sid, monkeypatch, load_volume=with_gap)
    assert row.get("petct_shift_mm") is None and "missing" in row["petct_reason"]
    assert "petct_alignment" not in devs and row["liver_assessable"] is True

    def scout_ct(paths):
        volume = load_volume(paths)
        if volume.units == "HU":
            volume.array, volume.positions_mm = volume.array[:1], volume.positions_mm[:1]
        return volume

    row, devs = _rejudge(settings, sid, monkeypatch, load_volume=scout_ct)
    assert row.get("petct_shift_mm") is None and "localiser" in row["petct_reason"]
    assert row["liver_assessable"] is True and "petct_alignment" not in devs
