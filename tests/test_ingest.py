"""File-drop ingest: spool with checksums, duplicates, versions, quarantine with reasons, release."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
import pytest
from sqlmodel import select

from corelab.db import open_store, session_scope
from corelab.ingest import ingest_path, release_quarantined
from corelab.models import Instance, QuarantineItem, Series, Site, Study, Subject, Visit
from corelab.receiver_store import Store
from corelab.register import add_site, add_trial, load_register
from expectations.manual import trial_fields
from synth.spec import small_spec
from synth.trial import generate_trial
from tests import hostile_objects as hostile


@pytest.fixture(scope="session")
def small_trial(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small-trial")
    generate_trial(out, small_spec(), seed=1)
    return out


@pytest.fixture
def truth(small_trial) -> dict:
    return json.loads((small_trial / "ground_truth.json").read_text())


def _registered(settings, trial_dir):
    with session_scope(settings) as session:
        load_register(session, trial_dir / "register.yaml", trial_fields=trial_fields)


def _clean_pet(truth, site="B02") -> dict:
    return next(s for s in truth["series"] if s["site"] == site and s["kind"] == "trial"
                and s["modality"] == "PT" and not s["problems"])


def test_site_drop_is_stored_checksummed_and_completed(store_settings, small_trial, truth):
    _registered(store_settings, small_trial)
    with session_scope(store_settings) as session:
        summary = ingest_path(session, store_settings, small_trial / "sites" / "B02", site_code="B02")
    named = {p["series_uid"] for p in truth["problems"] if p["code"] == "patient_name_in_header"}
    expected_files = sum(s["n_files"] for s in truth["series"] if s["site"] == "B02" and s["series_uid"] not in named)
    expected_quarantined = sum(s["n_files"] for s in truth["series"] if s["site"] == "B02" and s["series_uid"] in named)
    assert summary.count("stored") == expected_files
    assert summary.count("quarantined") == expected_quarantined
    with session_scope(store_settings) as session:
        instances = session.exec(select(Instance)).all()
        assert len(instances) == expected_files
        for inst in instances[:50]:
            data = (store_settings.data_dir / inst.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == inst.sha256 and len(data) == inst.size_bytes
        entry = _clean_pet(truth)
        series = session.exec(select(Series).where(Series.series_uid == entry["series_uid"])).one()
        assert (series.state, series.kind, series.modality) == ("complete", "trial", "PT")
        assert series.instance_count == entry["n_files"] == series.expected_count
        digests = sorted(session.exec(select(Instance.sha256).where(Instance.series_id == series.id)))
        assert series.checksum == hashlib.sha256("\n".join(digests).encode()).hexdigest()
        visit = session.get(Visit, session.get(Study, series.study_id).visit_id)
        assert (session.get(Subject, visit.subject_id).pseudonym, visit.label) == (entry["subject"], entry["visit"])
        phantoms = session.exec(select(Series).where(Series.kind == "phantom")).all()
        assert len(phantoms) == 2  # one NEMA IEC and one cylinder for B02's one scanner
        for ph in phantoms:
            study = session.get(Study, ph.study_id)
            fill = store_settings.data_dir / "spool" / study.study_uid / ph.series_uid / "fill.yaml"
            assert fill.is_file() and "reference_time" in fill.read_text()


def test_same_bytes_twice_is_a_no_op(settings, small_trial, truth):
    _registered(settings, small_trial)
    folder = small_trial / _clean_pet(truth)["path"]
    with session_scope(settings) as session:
        first = ingest_path(session, settings, folder, site_code="B02")
    with session_scope(settings) as session:
        again = ingest_path(session, settings, folder, site_code="B02")
        assert again.count("duplicate") == first.count("stored") > 0 and again.count("stored") == 0
        assert len(session.exec(select(Instance)).all()) == first.count("stored")


def test_same_uid_other_bytes_is_kept_as_new_version_for_review(settings, small_trial, truth, tmp_path):
    _registered(settings, small_trial)
    src = sorted((small_trial / _clean_pet(truth)["path"]).glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.SeriesDescription = "resent after correction"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    with session_scope(settings) as session:
        ingest_path(session, settings, src, site_code="B02")
        out = ingest_path(session, settings, changed, site_code="B02")
    assert out.outcomes[0].status == "new_version"
    with session_scope(settings) as session:
        versions = session.exec(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
                                .order_by(Instance.version)).all()
        assert [(v.version, v.needs_review) for v in versions] == [(1, False), (2, True)]
        assert all((settings.data_dir / v.path).is_file() for v in versions)


def _bad_files(src: Path, tmp_path: Path) -> dict[str, Path]:
    good = src.read_bytes()
    bad = {}
    (tmp_path / "notes.txt").write_text("scan notes")
    bad["not_dicom"] = tmp_path / "notes.txt"
    (tmp_path / "cut.dcm").write_bytes(good[: len(good) // 2])
    bad["truncated"] = tmp_path / "cut.dcm"
    for code, change in {
        "missing_uid": lambda ds: delattr(ds, "SOPInstanceUID"),
        "unknown_sop_class": lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.481.5"),
        "deid_failed": lambda ds: setattr(ds, "PatientBirthDate", "19610203"),
    }.items():
        ds = pydicom.dcmread(io.BytesIO(good))
        ds.SOPInstanceUID = generate_uid()
        change(ds)
        path = tmp_path / f"{code}.dcm"
        ds.save_as(path, enforce_file_format=False)
        bad[code] = path
    return bad


def test_bad_input_goes_to_quarantine_with_reason_and_the_rest_goes_on(settings, small_trial, truth, tmp_path):
    _registered(settings, small_trial)
    drop = tmp_path / "drop"
    shutil.copytree(small_trial / _clean_pet(truth)["path"], drop)
    bad = _bad_files(sorted(drop.glob("*.dcm"))[0], tmp_path)
    for path in bad.values():
        shutil.copy(path, drop / path.name)
    with session_scope(settings) as session:
        summary = ingest_path(session, settings, drop, site_code="B02")
    assert summary.count("stored") == _clean_pet(truth)["n_files"]
    by_code = {o.reason_code: o for o in summary.outcomes if o.status == "quarantined"}
    assert set(by_code) == set(bad)
    for code, path in bad.items():
        reason = by_code[code].reason
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert reason.startswith("object #") and f"(sha256 {digest[:12]})" in reason  # names the object
        assert path.name not in reason and path.stem not in by_code[code].source   # never by its file name
        assert any(w in reason for w in ("send", "register", "export", "Re-export"))  # says the fix
    assert "PatientBirthDate" in by_code["deid_failed"].reason and "19610203" not in by_code["deid_failed"].reason
    with session_scope(settings) as session:
        items = session.exec(select(QuarantineItem)).all()
        for item in items:  # nothing lost: the bytes are kept as sent
            assert hashlib.sha256((settings.data_dir / item.path).read_bytes()).hexdigest() == item.sha256
        assert len(items) == len(bad)


def test_unknown_site_is_quarantined_then_released(settings, small_trial, truth):
    folder = small_trial / _clean_pet(truth)["path"]
    with session_scope(settings) as session:
        summary = ingest_path(session, settings, folder, site_code="B02")  # B02 not registered yet
    assert {o.reason_code for o in summary.outcomes} == {"unknown_site"}
    assert "corelab site add" in summary.outcomes[0].reason
    _registered(settings, small_trial)
    with session_scope(settings) as session:
        results = [release_quarantined(session, settings, item) for item in session.exec(select(QuarantineItem))]
    assert {r.status for r in results} == {"quarantined"}  # still no site on the item: stays, with its reason
    with session_scope(settings) as session:
        results = [release_quarantined(session, settings, item, site_code="B02")
                   for item in session.exec(select(QuarantineItem).where(QuarantineItem.released_at.is_(None)))
                   if item.reason_code == "unknown_site"]
        assert {r.status for r in results} == {"stored"}
        series = session.exec(select(Series).where(Series.series_uid == _clean_pet(truth)["series_uid"])).one()
        assert series.state == "complete" and series.instance_count == _clean_pet(truth)["n_files"]


def test_planted_name_is_quarantined_and_never_stored(settings, small_trial, truth):
    _registered(settings, small_trial)
    problem = next(p for p in truth["problems"] if p["code"] == "patient_name_in_header")
    name = problem["planted_value"]
    with session_scope(settings) as session:
        summary = ingest_path(session, settings, small_trial / "sites" / problem["site"], site_code=problem["site"])
        # Checked before any row: the failed series left no Series row behind.
        assert session.exec(select(Series).where(Series.series_uid == problem["series_uid"])).first() is None
    quarantined = [o for o in summary.outcomes if o.status == "quarantined"]
    assert quarantined and {o.reason_code for o in quarantined} == {"deid_failed"}
    assert all("PatientName" in o.reason for o in quarantined)
    for part in name.replace("^", " ").split():
        assert part.encode() not in settings.database_path.read_bytes()
        assert all(part not in o.reason for o in quarantined)
    assert not any((settings.spool_dir).rglob(f"*{problem['series_uid']}*"))


def test_zip_archive_is_opened(settings, small_trial, truth, tmp_path):
    _registered(settings, small_trial)
    entry = _clean_pet(truth)
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((small_trial / entry["path"]).glob("*.dcm")):
            zf.write(f, f"series/{f.name}")
    with session_scope(settings) as session:
        summary = ingest_path(session, settings, archive, site_code="B02")
    assert summary.count("stored") == entry["n_files"]
    assert summary.series_uids == [entry["series_uid"]]


# --- a SOP Instance UID belongs to one series: a new version is the same instance in the same series ---

def _lab_with_two_sites(settings):
    with session_scope(settings) as session:
        add_site(session, code="A01", ae_title="SITEA")
        add_site(session, code="B02", ae_title="SITEB")
        add_trial(session, code="T1", pseudonym_pattern=r"BENCH-\d{3}")


def _send(settings, data: bytes, site: str, how: str, tmp_path: Path):
    """One object through the real ingest path: the node's Store (C-STORE, STOW-RS) or a file drop."""
    if how == "store":
        with session_scope(settings) as session:
            site_id = session.exec(select(Site.id).where(Site.code == site)).one()
        uid = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
        return Store(settings, open_store(settings)).accept(data, sop_instance_uid=uid, site_id=site_id,
                                                          source="x", ordinal=1)
    drop = tmp_path / f"drop-{hashlib.sha256(data).hexdigest()[:8]}"
    drop.mkdir()
    (drop / "obj.dcm").write_bytes(data)
    with session_scope(settings) as session:
        return ingest_path(session, settings, drop, site_code=site).outcomes[0]


def _reused(first, **attrs) -> bytes:
    """An object with ``first``'s SOP Instance UID (file meta too) and other bytes."""
    ds = hostile.dataset(SOPInstanceUID=first.SOPInstanceUID, SeriesDescription="WB FDG recon 2", **attrs)
    ds.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    return hostile.encode(ds)


def _state_of(settings, series_uid: str) -> tuple:
    with session_scope(settings) as session:
        series = session.exec(select(Series).where(Series.series_uid == series_uid)).one()
        rows = session.exec(select(Instance.series_id, Instance.version, Instance.sha256)).all()
        return series.state, series.instance_count, sorted(rows)


@pytest.mark.parametrize("how", ["store", "drop"])
@pytest.mark.parametrize("sender, same_study", [("B02", False), ("A01", False), ("A01", True)])
def test_a_sop_instance_uid_held_in_another_series_is_a_uid_conflict(settings, tmp_path, how, sender, same_study):
    """Another site's object (new study and series) or the same site's other series (a new study, or a
    re-reconstruction in the same study) reusing A01's SOP Instance UID is never a new version of A01's
    instance: quarantined as uid_conflict, with the fix, naming nothing of A01's object."""
    _lab_with_two_sites(settings)
    first = hostile.dataset(SeriesDescription="WB FDG")
    assert _send(settings, hostile.encode(first), "A01", how, tmp_path).status == "stored"
    before = _state_of(settings, first.SeriesInstanceUID)
    study = first.StudyInstanceUID if same_study else None
    intruder = _reused(first, study=study)
    out = _send(settings, intruder, sender, how, tmp_path)
    assert (out.status, out.reason_code) == ("quarantined", "uid_conflict"), out.reason
    assert "SOPInstanceUID" in out.reason and "new SOP Instance UIDs" in out.reason  # what is wrong, the fix
    assert out.reason.startswith("object #") and hashlib.sha256(intruder).hexdigest()[:12] in out.reason
    for value in (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID, "A01"):
        assert value not in out.reason
    assert _state_of(settings, first.SeriesInstanceUID) == before  # A01's series and instance untouched
    intruder_series = str(pydicom.dcmread(io.BytesIO(intruder)).SeriesInstanceUID)
    with session_scope(settings) as session:
        assert session.exec(select(Series).where(Series.series_uid == intruder_series)).first() is None
        item = session.exec(select(QuarantineItem)).one()
        assert item.sha256 == hashlib.sha256(intruder).hexdigest() and item.series_uid == intruder_series
        assert session.get(Site, item.site_id).code == sender
        assert (settings.data_dir / item.path).read_bytes() == intruder


@pytest.mark.parametrize("how", ["store", "drop"])
def test_the_same_instance_in_the_same_series_is_still_a_new_version(settings, tmp_path, how):
    """The rule does not stop a site correcting its own instance: same study, series and site."""
    _lab_with_two_sites(settings)
    first = hostile.dataset()
    _send(settings, hostile.encode(first), "A01", how, tmp_path)
    out = _send(settings, _reused(first, study=first.StudyInstanceUID, series=first.SeriesInstanceUID),
                "A01", how, tmp_path)
    assert out.status == "new_version" and out.series_uid == first.SeriesInstanceUID
    with session_scope(settings) as session:
        series = session.exec(select(Series).where(Series.series_uid == first.SeriesInstanceUID)).one()
        versions = session.exec(select(Instance.version, Instance.series_id)).all()
        assert sorted(versions) == [(1, series.id), (2, series.id)]


@pytest.mark.parametrize("how", ["store", "drop"])
def test_another_sites_object_naming_a01s_series_leaves_that_series_as_it_was(settings, tmp_path, how):
    """uid_conflict holds the intruder; A01's series keeps its state (it is not quarantined by B02)."""
    _lab_with_two_sites(settings)
    first = hostile.dataset()
    _send(settings, hostile.encode(first), "A01", how, tmp_path)
    before = _state_of(settings, first.SeriesInstanceUID)
    intruder = hostile.valid(study=first.StudyInstanceUID, series=first.SeriesInstanceUID)
    out = _send(settings, intruder, "B02", how, tmp_path)
    assert (out.status, out.reason_code) == ("quarantined", "uid_conflict")
    assert _state_of(settings, first.SeriesInstanceUID) == before


def test_a_series_whose_held_objects_are_all_released_completes_and_may_start_qc(settings, tmp_path):
    """A series is quarantined while an object of it is held; when the last one is released (its
    cause fixed), completion takes it back to receiving and complete, with QC pending for its start."""
    from corelab.quarantine import hold
    from corelab.validate import Rejected
    from services.intake import release_quarantine_item
    _lab_with_two_sites(settings)
    first = hostile.dataset()
    assert _send(settings, hostile.encode(first), "A01", "store", tmp_path).status == "stored"
    second = hostile.encode(hostile.dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID))
    with session_scope(settings) as session:  # held for a cause the core lab has since fixed
        site = session.exec(select(Site).where(Site.code == "A01")).one()
        rej = Rejected("deid_failed", "object #2: a cause since fixed")
        hold(session, settings, second, rej, label="object #2", site=site, series_uid=first.SeriesInstanceUID,
             keep=True)
    assert _state_of(settings, first.SeriesInstanceUID)[0] == "quarantined"
    with session_scope(settings) as session:
        item = session.exec(select(QuarantineItem)).one()
        assert release_quarantine_item(session, settings, item.id, actor="phys").status == "stored"
    with session_scope(settings) as session:
        series = session.exec(select(Series).where(Series.series_uid == first.SeriesInstanceUID)).one()
        assert (series.state, series.qc_state, series.instance_count) == ("complete", "pending", 2)
