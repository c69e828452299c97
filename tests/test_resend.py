"""Re-sending a series must not break it (issue 16, point 2).

A phantom series is received over DICOM by the real node (dcmtk ``storescu``), then the site
drops the same files again, written by its export tool: other file meta (ImplementationClassUID,
version name, source AE title), or another transfer syntax (dcmtk ``dcmconv``). They are
duplicates: no version is added, the series still counts N instances and the phantom still
analyses. A real new version (one slice's pixels changed) is version 2, and every reader (series
files, instance count, completeness, checksum, header QC, series list) sees N instances with it.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlmodel import select

from accreditation.evaluate import evaluate_series_folder
from corelab.db import session_scope
from corelab.dicomio import load_volume
from corelab.models import Instance, Series
from corelab.receiver import Receiver, ReceiverConfig
from corelab.register import add_site
from corelab.same_dataset import dataset_part, same_dataset
from corelab.series_files import newest_instance_rows, series_dir, series_files
from flows.cli import main as cli_main
from phantoms.fill import load_fill_sheet
from services.intake import ingest_drop
from services.lookup import series_rows
from tests.accreditation_helpers import _write_drop
from tests.receiver_helpers import storescu, wait_for

pytestmark = pytest.mark.dcmtk

EXPORT_TOOL_UID = "1.2.826.0.1.3680043.10.543.99"  # a site export tool's ImplementationClassUID


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Scanner A01-1's NEMA IEC and cylinder phantom scans as written by a site: ``(out, nema, cyl)``."""
    return _write_drop(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def node(settings):
    """A running node with site A01 sending as A01SCU; series complete 1 s after their last object."""
    with session_scope(settings) as session:
        add_site(session, code="A01", ae_title="A01SCU")
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=1.0, tick_s=0.2)).start()
    yield receiver
    receiver.stop()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _received(settings, node, files: list[Path]) -> tuple[int, dict[str, str]]:
    """Send ``files`` with storescu, wait for completion; ``(series id, {SOP UID: sha256 held})``."""
    storescu(node.port, files, aet="A01SCU")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    def complete() -> bool:
        with session_scope(settings) as session:
            series = session.exec(select(Series).where(Series.series_uid == uid)).first()
            return series is not None and series.state == "complete"
    wait_for(complete, 30)
    with session_scope(settings) as session:
        series = session.exec(select(Series).where(Series.series_uid == uid)).one()
        rows = session.exec(select(Instance).where(Instance.series_id == series.id)).all()
        assert len(rows) == len(files) == series.instance_count and {r.version for r in rows} == {1}
        return series.id, {r.sop_instance_uid: r.sha256 for r in rows}


def _export(src: Path, dst: Path, *, pixels_changed: bool = False) -> None:
    """Write ``src`` to ``dst`` as a site's export tool would: its own file meta (and, when asked,
    one pixel changed: a real correction)."""
    ds = pydicom.dcmread(src)
    ds.file_meta.ImplementationClassUID = EXPORT_TOOL_UID
    ds.file_meta.ImplementationVersionName = "SITE_EXPORT_2"
    ds.file_meta.SourceApplicationEntityTitle = "EXPORTER"
    if pixels_changed:
        pixels = ds.pixel_array.copy()
        pixels.flat[pixels.size // 2] += 1
        ds.PixelData = pixels.tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)


def _drop_folder(tmp_path: Path, series: Path, fill_sheet: Path) -> tuple[Path, Path]:
    """``(drop, its series folder)``: the series folder with its fill sheet beside it, as sites drop."""
    out = tmp_path / "drop" / series.name
    out.mkdir(parents=True)
    shutil.copy(fill_sheet, out.parent / f"{series.name}.fill.yaml")
    return out.parent, out


def _readers(settings, series_id: int) -> dict:
    """What each reader of the stored series sees."""
    from expectations.qc import series_headers

    with session_scope(settings) as session:
        series = session.get(Series, series_id)
        newest = newest_instance_rows(session, series)
        return {"rows": session.exec(select(Instance).where(Instance.series_id == series_id)).all(),
                "files": series_files(settings, session, series), "folder": series_dir(settings, series, session),
                "count": series.instance_count, "completeness": dict(series.completeness),
                "checksum": series.checksum, "newest_checksum": _sha("\n".join(sorted(i.sha256 for i in newest))
                                                                    .encode()),
                "headers": series_headers(session, settings, series),
                "listed": next(r["instances"] for r in series_rows(session) if r["series_uid"] == series.series_uid)}


@pytest.mark.parametrize("rewrite", ["file_meta", "transfer_syntax"])
def test_a_drop_of_a_dicom_received_phantom_adds_no_version_and_it_still_analyses(
        settings, settings_env, node, phantom, tmp_path, monkeypatch, rewrite):
    out, nema, _ = phantom
    original = sorted((out / nema["path"]).glob("*.dcm"))
    n = len(original)
    series_id, held = _received(settings, node, original)
    # the site exports the same series again and drops it, with its fill sheet
    root, folder = _drop_folder(tmp_path, out / nema["path"], out / nema["phantom"]["fill_sheet"])
    for src in original:
        if rewrite == "file_meta":
            _export(src, folder / src.name)
        else:  # dcmtk writes implicit VR little endian, with dcmtk's own file meta
            subprocess.run(["/usr/bin/dcmconv", "+ti", str(src), str(folder / src.name)], check=True,
                           capture_output=True)
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes()
            for p in folder.glob("*.dcm")}
    # other bytes than the node holds for every instance: a sha256 alone would keep each as a new version
    assert sent.keys() == held.keys() and all(_sha(data) != held[uid] for uid, data in sent.items())
    syntax = {pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).file_meta.TransferSyntaxUID
              for d in sent.values()}
    assert syntax == ({ExplicitVRLittleEndian} if rewrite == "file_meta" else {ImplicitVRLittleEndian})
    with session_scope(settings) as session:
        spooled = {r.sop_instance_uid: (settings.data_dir / r.path).read_bytes()
                   for r in session.exec(select(Instance).where(Instance.series_id == series_id))}
    # the first is told by the encoded dataset alone, the second only element by element
    assert all((dataset_part(data)[1] == dataset_part(spooled[uid])[1]) == (rewrite == "file_meta")
               for uid, data in sent.items())

    if rewrite == "file_meta":  # `corelab ingest`, as the physicist ran it
        monkeypatch.setenv("CORELAB_DATA_DIR", settings_env["CORELAB_DATA_DIR"])
        assert cli_main(["ingest", str(root), "--site", "A01", "--json"]) == 0
        with session_scope(settings) as session:
            again = ingest_drop(session, settings, root, "A01")  # and once more: still nothing new
    else:
        with session_scope(settings) as session:
            again = ingest_drop(session, settings, root, "A01")
    assert (again.count("duplicate"), again.count("stored"), again.count("new_version"),
            again.count("quarantined")) == (n, 0, 0, 0)

    seen = _readers(settings, series_id)
    assert sorted((r.sop_instance_uid, r.version, r.sha256) for r in seen["rows"]) == \
        sorted((uid, 1, sha) for uid, sha in held.items())
    assert seen["count"] == seen["listed"] == seen["completeness"]["instances"] == len(seen["files"]) == n
    assert seen["completeness"]["complete"] and seen["completeness"]["repeated_positions"] == 0
    assert seen["checksum"] == seen["newest_checksum"]
    # the fill sheet the drop brought is kept, and the phantom analyses on what the node received
    assert (seen["folder"] / "fill.yaml").is_file()
    fill = load_fill_sheet(seen["folder"] / "fill.yaml")
    stored = evaluate_series_folder(seen["folder"], fill, paths=seen["files"])
    intended = evaluate_series_folder(out / nema["path"], fill)
    assert stored.kind == "nema_iec" and stored.metrics["spheres"]
    assert [s["rc_max"] for s in stored.metrics["spheres"]] == [s["rc_max"] for s in intended.metrics["spheres"]]


def test_a_changed_slice_is_version_2_and_every_reader_sees_n_instances_with_it(settings, node, phantom, tmp_path):
    out, nema, _ = phantom
    original = sorted((out / nema["path"]).glob("*.dcm"))
    n = len(original)
    series_id, held = _received(settings, node, original)
    changed = original[n // 2]
    changed_uid = str(pydicom.dcmread(changed, stop_before_pixels=True).SOPInstanceUID)
    # the whole series exported again by the site's tool, one slice corrected
    root, folder = _drop_folder(tmp_path, out / nema["path"], out / nema["phantom"]["fill_sheet"])
    for src in original:
        _export(src, folder / src.name, pixels_changed=src == changed)
    with session_scope(settings) as session:
        again = ingest_drop(session, settings, root, "A01")
    assert (again.count("duplicate"), again.count("new_version"), again.count("stored")) == (n - 1, 1, 0)

    seen = _readers(settings, series_id)
    versions = sorted((r.version, r.needs_review) for r in seen["rows"] if r.sop_instance_uid == changed_uid)
    assert versions == [(1, False), (2, True)] and len(seen["rows"]) == n + 1
    v2 = seen["folder"] / f"{changed_uid}.v2.dcm"
    assert v2 in seen["files"] and seen["folder"] / f"{changed_uid}.dcm" not in seen["files"]
    assert seen["count"] == seen["listed"] == seen["completeness"]["instances"] == len(seen["files"]) == n
    assert seen["completeness"]["complete"] and seen["completeness"]["repeated_positions"] == 0
    assert seen["checksum"] == seen["newest_checksum"] and _sha(v2.read_bytes()) in {r.sha256 for r in seen["rows"]}
    assert [Path(h.filename).name for h in seen["headers"] if str(h.SOPInstanceUID) == changed_uid] == [v2.name]
    assert len(seen["headers"]) == n
    # the volume read is the received one with the corrected slice, and the phantom still analyses
    volume = load_volume(seen["files"])
    first = load_volume(original)
    differs = [k for k in range(volume.array.shape[0]) if not np.array_equal(volume.array[k], first.array[k])]
    assert len(differs) == 1 and volume.array.shape == first.array.shape
    fill = load_fill_sheet(seen["folder"] / "fill.yaml")
    evaluation = evaluate_series_folder(seen["folder"], fill, paths=seen["files"])
    assert evaluation.metrics["spheres"] and evaluation.input_sha256 == seen["checksum"]
    assert any(f"{changed_uid}.dcm" in note and "not used" in note for note in evaluation.notes)


def test_same_dataset_compares_the_dataset_not_the_file_meta(phantom, tmp_path):
    """The rule on its own: file meta and an uncompressed syntax do not matter, one value does;
    a compressed copy is never called the same (it is kept as a new version, for review)."""
    out, nema, _ = phantom
    src = sorted((out / nema["path"]).glob("*.dcm"))[0]
    base = src.read_bytes()
    variants = {}
    for name, args in {"implicit": ("/usr/bin/dcmconv", "+ti"), "deflated": ("/usr/bin/dcmconv", "+td"),
                       "rle": ("/usr/bin/dcmcrle",)}.items():
        subprocess.run([*args, str(src), str(tmp_path / name)], check=True, capture_output=True)
        variants[name] = (tmp_path / name).read_bytes()
    _export(src, tmp_path / "meta")
    ds = pydicom.dcmread(src)
    ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} corrected"
    ds.save_as(tmp_path / "described", enforce_file_format=True)
    other_uid = pydicom.dcmread(src)
    other_uid.ContentDate = "19991231"
    other_uid.save_as(tmp_path / "dated", enforce_file_format=True)
    meta = (tmp_path / "meta").read_bytes()

    assert meta != base and same_dataset(base, meta) and same_dataset(meta, base)
    assert same_dataset(base, variants["implicit"]) and same_dataset(variants["implicit"], meta)
    assert same_dataset(base, variants["deflated"])
    assert not same_dataset(base, variants["rle"])  # compressed: never the same (the module says why)
    assert not same_dataset(base, (tmp_path / "described").read_bytes())
    assert not same_dataset(variants["implicit"], (tmp_path / "dated").read_bytes())
    assert not same_dataset(base, b"not dicom") and not same_dataset(base, base[:200])
