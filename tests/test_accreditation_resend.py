"""Phantom accreditation on real-world input (issue 10), continued.

* A re-sent slice: the spool keeps both versions; QC, the phantom analysis and the report read
  the newest version of each instance only.
* A fill sheet without ``kind`` is read by its concentrations.

The ``drop`` fixture is in tests/accreditation_helpers.py; the withheld verdict is in
tests/test_accreditation_withheld.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from accreditation.evaluate import evaluate_series_folder
from corelab.db import session_scope
from corelab.dicomio import DicomVolumeError, load_volume, newest_instances
from corelab.ingest import ingest_path
from corelab.models import Series, Site
from phantoms.fill import FillSheetError, load_fill_sheet, parse_fill_sheet
from tests.accreditation_helpers import _phantoms
from tests.accreditation_helpers import drop  # noqa: F401  (pytest fixture)


# ---------------------------------------------------------------------------------------------
# a re-sent slice: the newest version of each instance, everywhere
# ---------------------------------------------------------------------------------------------
def _halved(src: Path, dst: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(dst)


def _sphere_slice(files: list[Path], z_mm: float) -> Path:
    return min(files, key=lambda f: abs(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                                        - z_mm))


def test_a_re_sent_slice_is_read_in_its_newest_version_everywhere(settings, drop, tmp_path):
    from expectations.qc import series_headers
    from reports.accreditation import series_volume

    out, nema, _ = drop
    original = out / nema["path"]
    files = sorted(original.glob("*.dcm"))
    z = float(np.mean([c[2] for c in nema["phantom"]["sphere_centres_mm"].values()]))
    fixed = _sphere_slice(files, z)
    # the site sends the series with the slice through the spheres damaged (pixel values halved) ...
    first = tmp_path / "first" / original.name
    shutil.copytree(original, first)
    shutil.copy(out / nema["phantom"]["fill_sheet"], first.parent / f"{original.name}.fill.yaml")
    _halved(fixed, first / fixed.name)
    # ... then sends that slice again, corrected
    resend = tmp_path / "resend"
    resend.mkdir()
    shutil.copy(fixed, resend / fixed.name)
    settings.ensure_dirs()
    with session_scope(settings) as session:
        session.add(Site(code="A01", ae_title="A01"))
        session.flush()
        ingest_path(session, settings, first.parent, site_code="A01")
        summary = ingest_path(session, settings, resend, site_code="A01")
        assert summary.count("new_version") == 1
    [(series_id, folder)] = _phantoms(settings).values()
    uid = str(pydicom.dcmread(fixed, stop_before_pixels=True).SOPInstanceUID)
    in_spool = sorted(folder.glob("*.dcm"))
    assert len(in_spool) == len(files) + 1
    assert (folder / f"{uid}.dcm").is_file() and (folder / f"{uid}.v2.dcm").is_file()

    newest = newest_instances(in_spool)
    assert len(newest) == len(files) and folder / f"{uid}.v2.dcm" in newest and folder / f"{uid}.dcm" not in newest
    # the phantom analysis: the result of the corrected series, with a note of what was set aside
    fill = load_fill_sheet(folder / "fill.yaml")
    spooled = evaluate_series_folder(folder, fill)
    intended = evaluate_series_folder(original, fill)
    damaged = evaluate_series_folder(first, fill)
    rcs = [[s[k] for k in ("rc_max", "rc_mean", "rc_peak")] for s in spooled.metrics["spheres"]]
    assert rcs == [[s[k] for k in ("rc_max", "rc_mean", "rc_peak")] for s in intended.metrics["spheres"]]
    assert rcs != [[s[k] for k in ("rc_max", "rc_mean", "rc_peak")] for s in damaged.metrics["spheres"]]
    assert any(f"{uid}.dcm" in n and "not used" in n for n in spooled.notes)
    assert spooled.input_sha256 == intended.input_sha256  # the checksum of the files read
    with session_scope(settings) as session:
        series = session.get(Series, series_id)
        # QC's headers: one per instance, the re-sent one from its second version
        headers = series_headers(session, settings, series)
        assert len(headers) == len(files)
        assert [Path(h.filename).name for h in headers if str(h.SOPInstanceUID) == uid] == [f"{uid}.v2.dcm"]
        # the report's image panels
        assert np.array_equal(series_volume(settings, session, series_id).array,
                              load_volume(sorted(original.glob("*.dcm"))).array)


def test_two_unversioned_copies_of_one_instance(tmp_path, drop):
    out, nema, _ = drop
    files = sorted((out / nema["path"]).glob("*.dcm"))
    folder = tmp_path / "site-folder"
    folder.mkdir()
    for f in files[:3]:
        shutil.copy(f, folder / f.name)
    shutil.copy(files[0], folder / "copy-of-first.dcm")  # the same bytes twice: either will do
    assert len(newest_instances(sorted(folder.glob("*.dcm")))) == 3
    _halved(files[1], folder / "other-second.dcm")  # other bytes, no version in the name: ambiguous
    with pytest.raises(DicomVolumeError, match=r"other-second.dcm.*same SOPInstanceUID.*\.v<N>\.dcm"):
        newest_instances(sorted(folder.glob("*.dcm")))
    (folder / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(DicomVolumeError, match="junk.dcm: cannot read its SOPInstanceUID"):
        newest_instances([folder / "junk.dcm"])


# ---------------------------------------------------------------------------------------------
# a fill sheet without kind
# ---------------------------------------------------------------------------------------------
_REF = {"reference_time": "2031-03-04T09:15:00", "radionuclide": "F-18"}


def test_fill_sheet_kind_from_its_concentrations():
    nema = parse_fill_sheet({**_REF, "sphere_kbq_ml": 20.0, "background_kbq_ml": 2.0, "lung_kbq_ml": 0.0})
    assert nema.kind == "nema_iec" and nema.kind_source.startswith("inferred")
    cyl = parse_fill_sheet({**_REF, "concentration_kbq_ml": 5.0})
    assert cyl.kind == "uniform_cylinder" and cyl.kind_source.startswith("inferred")
    given = parse_fill_sheet({**_REF, "kind": "uniform_cylinder", "concentration_kbq_ml": 5.0})
    assert given.kind_source == "given"
    for doc in ({}, {**_REF}, {**_REF, "sphere_kbq_ml": 20.0},  # empty, no concentration, no background
                {**_REF, "sphere_kbq_ml": 20.0, "background_kbq_ml": 2.0, "concentration_kbq_ml": 5.0},  # both
                {**_REF, "background_kbq_ml": 2.0, "concentration_kbq_ml": 5.0}):
        with pytest.raises(FillSheetError, match=r"'kind' is None; use nema_iec or uniform_cylinder; without it"):
            parse_fill_sheet(doc, source="fill.yaml")
    with pytest.raises(FillSheetError, match=r"'kind' is 'nema'; use nema_iec or uniform_cylinder$"):
        parse_fill_sheet({**_REF, "kind": "nema", "sphere_kbq_ml": 20.0, "background_kbq_ml": 2.0})


def test_a_fill_sheet_without_kind_evaluates_and_says_so(drop, tmp_path):
    out, nema, _ = drop
    doc = yaml.safe_load((out / nema["phantom"]["fill_sheet"]).read_text())
    del doc["kind"]
    (tmp_path / "fill.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "empty.yaml").write_text("")
    fill = load_fill_sheet(tmp_path / "fill.yaml")
    ev = evaluate_series_folder(out / nema["path"], fill)
    assert ev.kind == "nema_iec" and any("names no kind: read as nema_iec" in n for n in ev.notes)
    with pytest.raises(FillSheetError, match="empty.yaml: 'kind' is None"):
        load_fill_sheet(tmp_path / "empty.yaml")
