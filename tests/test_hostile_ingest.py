"""Hostile input by file drop and inbox (issue 11): every crafted object is stored or quarantined
with its specific reason, nothing leaves the data directory, no spool file is left without its row,
no identifier reaches the store, the output or the logs, and a poison entry is moved aside."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlmodel import select

from corelab import inbox as inbox_module
from corelab.db import open_store, session_scope, transaction
from corelab.deid import SHOWN_TEXT
from corelab.inbox import inbox_dir, rejected_dir, scan_inbox
from corelab.ingest import ingest_path, release_quarantined
from corelab.models import Instance, QuarantineItem, Series, Study, Subject, Visit
from corelab.register import add_site, add_trial
from corelab.settings import SettingsError, load_settings
from corelab.validate import UnsafePath, is_valid_uid, safe_join
from flows.cli import main as cli_main
from tests import hostile_objects as hostile

LIMITS = {"CORELAB_MAX_OBJECT_BYTES": str(256 * 1024), "CORELAB_MAX_INFLATED_BYTES": str(1 << 20),
          "CORELAB_MAX_ZIP_MEMBERS": "20"}
VISITS = ["baseline", "followup"]


@pytest.fixture
def lab(settings_env, monkeypatch):
    env = dict(settings_env, **LIMITS)
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # for the CLI calls
    settings = load_settings(env)
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
        add_site(session, code="S2", ae_title="SITE2")
        add_trial(session, code="T1", pseudonym_pattern=r"BENCH-\d{3}", deid_policy={"visit_labels": VISITS})
    return settings


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send(lab, files: dict[str, bytes], via: str, tmp_path: Path, site: str = "S1") -> None:
    """Put ``files`` (relative name -> bytes) in a drop folder or an inbox entry and ingest it."""
    root = tmp_path / "drop" if via == "drop" else inbox_dir(lab) / site / "entry"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    if via == "drop":
        with session_scope(lab) as session:
            ingest_path(session, lab, root, site_code=site)
    else:
        scan_inbox(lab, open_store(lab), settle_s=0)
        assert not root.exists()


def assert_store_consistent(lab) -> None:
    """Every spool file has its row and matches its sha256; every held quarantine file too."""
    with session_scope(lab) as session:
        rows = {r.path: r.sha256 for r in session.exec(select(Instance))}
        held = {q.path: q.sha256 for q in session.exec(select(QuarantineItem)) if q.path}
    spool = {str(p.relative_to(lab.data_dir)) for p in lab.spool_dir.rglob("*.dcm")}
    assert spool == set(rows), "spool files without rows, or rows without files"
    for path, digest in {**rows, **held}.items():
        assert sha((lab.data_dir / path).read_bytes()) == digest, path
    assert not list(lab.data_dir.rglob("*.partial"))


def quarantined_by_sha(lab) -> dict[str, QuarantineItem]:
    with session_scope(lab) as session:
        return {q.sha256: q for q in session.exec(select(QuarantineItem))}


@pytest.mark.parametrize("via", ["drop", "inbox"])
def test_every_hostile_object_gets_its_reason_and_the_rest_goes_on(lab, tmp_path, via):
    objects = {name: build() for name, (_, build) in hostile.CASES.items()}
    good = [hostile.valid() for _ in range(3)]
    files = {f"{name}.dcm": data for name, data in objects.items()}
    files.update({f"good{i}.dcm": data for i, data in enumerate(good)})
    before = {p for p in tmp_path.rglob("*") if lab.data_dir not in p.parents}
    send(lab, files, via, tmp_path)
    items = quarantined_by_sha(lab)
    for name, data in objects.items():
        item = items[sha(data)]
        assert item.reason_code == hostile.CASES[name][0], (name, item.reason)
        assert item.reason.startswith("object #") and f"(sha256 {sha(data)[:12]})" in item.reason
        assert name not in item.reason and name not in item.source_name  # never the file name
    with session_scope(lab) as session:
        assert sorted(r.sha256 for r in session.exec(select(Instance))) == sorted(map(sha, good))
        assert session.exec(select(Series)).all().__len__() == 3  # quarantined objects made no series
    assert_store_consistent(lab)
    after = {p for p in tmp_path.rglob("*") if lab.data_dir not in p.parents}
    assert after - before <= {tmp_path / "drop", *(tmp_path / "drop" / n for n in files)}  # nothing outside
    written = [p.relative_to(lab.data_dir).parts for p in lab.data_dir.rglob("*") if p.is_file()]
    assert all(parts[0] in ("spool", "quarantine") for parts in written if parts[-1].endswith((".dcm", ".head")))
    assert all(len(parts) == 4 for parts in written if parts[0] == "spool")  # spool/<study>/<series>/<sop>


def test_uids_that_once_shared_a_spool_file_lose_no_bytes(lab, tmp_path):
    study, series = "1.2.5", "1.2.5.1"
    objects = [hostile.valid(study=study, series=series, SOPInstanceUID=u) for u in
               ("1.2.5/6", "1.2.5_6", "1.2.5 6", "1.2.5.6")]
    send(lab, {f"{i}.dcm": d for i, d in enumerate(objects)}, "drop", tmp_path)
    items = quarantined_by_sha(lab)
    assert [items[sha(d)].reason_code for d in objects[:3]] == ["invalid_uid"] * 3
    with session_scope(lab) as session:
        (row,) = session.exec(select(Instance)).all()
        assert row.path == f"spool/{study}/{series}/1.2.5.6.dcm" and row.sha256 == sha(objects[3])
    assert_store_consistent(lab)


@pytest.mark.parametrize("via", ["drop", "inbox"])
def test_limits_are_checked_while_streaming_and_only_a_prefix_is_kept(lab, tmp_path, via):
    big = hostile.valid(matrix=512)                              # 512 KiB of pixels > 256 KiB
    bomb_member, many = 64 << 20, 25                             # 64 MiB of zeros; 25 > 20 members
    zips = tmp_path / "zips"
    zips.mkdir()
    hostile.zip_with(zips / "bomb.zip", {"a/slice.dcm": bomb_member})
    hostile.zip_with(zips / "many.zip", {f"m{i}.dcm": hostile.valid() for i in range(many)})
    files = {"big.dcm": big, "deflated.dcm": hostile.deflated(64 << 20),
             "bomb.zip": (zips / "bomb.zip").read_bytes(), "many.zip": (zips / "many.zip").read_bytes()}
    tracemalloc.start()
    try:
        send(lab, files, via, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, f"peak {peak} bytes: something was read whole"
    with session_scope(lab) as session:
        items = session.exec(select(QuarantineItem)).all()
        assert session.exec(select(Instance)).all() == []
    assert sorted(i.reason_code for i in items) == ["too_large", "zip_bomb", "zip_bomb", "zip_bomb"]
    for item in items:
        held = (lab.data_dir / item.path).read_bytes()
        assert len(held) <= 64 * 1024 and sha(held) == item.sha256
        assert "CORELAB_MAX_" in item.reason and "only its first" in item.reason
    with session_scope(lab) as session:
        refused = release_quarantined(session, lab, items[0], site_code="S1")
    assert refused.status == "quarantined" and "cannot be released" in refused.reason
    assert_store_consistent(lab)


@pytest.mark.parametrize("via", ["drop", "inbox"])
def test_symlinks_in_a_drop_are_not_followed(lab, tmp_path, via):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = hostile.valid()
    (outside / "secret.dcm").write_bytes(secret)
    (outside / "dir").mkdir()
    (outside / "dir" / "also.dcm").write_bytes(hostile.valid())
    good = hostile.valid()
    root = tmp_path / "drop" if via == "drop" else inbox_dir(lab) / "S1" / "entry"
    root.mkdir(parents=True)
    (root / "good.dcm").write_bytes(good)
    (root / "link.dcm").symlink_to(outside / "secret.dcm")
    (root / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    os.mkfifo(root / "pipe.dcm")  # reading it would block for ever: it is never opened for reading
    link = zipfile.ZipInfo("series/link.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(root / "links.zip", "w") as archive:
        archive.writestr(link, str(outside / "secret.dcm"))
    if via == "inbox":
        (inbox_dir(lab) / "S1" / "toplink").symlink_to(outside / "secret.dcm")
        assert scan_inbox(lab, open_store(lab), settle_s=0)["S1"]["entries"] == 2
        assert not (inbox_dir(lab) / "S1" / "toplink").exists() and (outside / "secret.dcm").is_file()
    else:
        with session_scope(lab) as session:
            ingest_path(session, lab, root, site_code="S1")
    with session_scope(lab) as session:
        items = session.exec(select(QuarantineItem)).all()
        codes = sorted(i.reason_code for i in items)
        assert codes == ["symlink"] * (4 if via == "inbox" else 3) + ["unreadable"]
        assert "step 'open'" in next(i.reason for i in items if i.reason_code == "unreadable")
        assert all(i.path == "" and i.sha256 == "" for i in items)          # nothing of the target held
        assert [r.sha256 for r in session.exec(select(Instance))] == [sha(good)]
        assert "cannot be released" in release_quarantined(session, lab, items[0]).reason
    assert_store_consistent(lab)


def test_deidentification_is_checked_before_any_row(lab, tmp_path):
    named = hostile.valid(PatientID="Qzvorak-1", ClinicalTrialSubjectID="Qzvorak-1",
                          ClinicalTrialTimePointID="baseline")
    send(lab, {"x.dcm": named}, "drop", tmp_path)
    with session_scope(lab) as session:
        for table in (Study, Series, Subject, Visit, Instance):
            assert session.exec(select(table)).all() == [], table.__name__
        (item,) = session.exec(select(QuarantineItem)).all()
    assert item.reason_code == "deid_failed" and "ClinicalTrialSubjectID" in item.reason
    ok = hostile.valid(ClinicalTrialSubjectID="BENCH-002", ClinicalTrialTimePointID="followup")
    send(lab, {"y.dcm": ok}, "drop", tmp_path)
    with session_scope(lab) as session:
        assert [s.pseudonym for s in session.exec(select(Subject))] == ["BENCH-002"]
        assert [v.label for v in session.exec(select(Visit))] == ["followup"]


def test_descriptions_are_checked_for_the_patients_own_name_and_id(settings):
    with session_scope(settings) as session:  # a trial without a pseudonym pattern: names are not refused
        site = add_site(session, code="S1", ae_title="SITE1")
        add_trial(session, code="T0")
    from corelab.ingest import accept_object

    cases = {"SeriesDescription": "WB qzvorak late", "StudyDescription": "PET 4711x9", "ProtocolName": "QZVORAK"}
    with session_scope(settings) as session:
        for keyword, value in cases.items():
            data = hostile.valid(PatientName=f"{hostile.NAME}^Anna", PatientID="4711x9", **{keyword: value})
            out = accept_object(session, settings, data, site=site, ordinal=1)
            assert (out.reason_code, keyword in out.reason) == ("deid_failed", True), out.reason
        clean = accept_object(session, settings, hostile.valid(PatientName=f"{hostile.NAME}^Anna"), site=site)
        assert clean.status == "stored"  # no pattern: the name itself is not checked, and never stored
    assert hostile.NAME.encode() not in settings.database_path.read_bytes()


def test_another_sites_series_uid_is_a_conflict(lab, tmp_path):
    first = hostile.dataset()
    send(lab, {"a.dcm": hostile.encode(first)}, "drop", tmp_path / "a", site="S1")
    intruder = hostile.valid(study=first.StudyInstanceUID, series=first.SeriesInstanceUID)
    send(lab, {"b.dcm": intruder}, "drop", tmp_path / "b", site="S2")
    assert quarantined_by_sha(lab)[sha(intruder)].reason_code == "uid_conflict"


@pytest.mark.parametrize("via", ["drop", "inbox"])
def test_a_planted_name_in_any_field_never_reaches_store_output_or_logs(lab, tmp_path, via, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    planted = {f"f{i}.dcm": hostile.planted(k) for i, k in enumerate(SHOWN_TEXT)}
    planted["subject.dcm"] = hostile.planted("ClinicalTrialSubjectID", hostile.NAME)
    planted["visit.dcm"] = hostile.planted("ClinicalTrialTimePointID", hostile.NAME)
    named_file = {f"{hostile.NAME}^Anna/{hostile.NAME}.dcm": hostile.valid()}  # a name only in the file name
    if via == "drop":
        root = tmp_path / "drop"
        for name, data in {**planted, **named_file}.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        assert cli_main(["ingest", str(root), "--site", "S1", "--json"]) == 0
    else:
        send(lab, {**planted, **named_file}, "inbox", tmp_path)
    items = quarantined_by_sha(lab)
    assert {items[sha(d)].reason_code for d in planted.values()} == {"deid_failed"}
    assert len(items) == len(planted)
    assert cli_main(["quarantine", "list", "--json"]) == 0
    assert cli_main(["series", "list", "--json"]) == 0
    out = capsys.readouterr().out
    produced = [out.encode(), caplog.text.encode()]
    for path in lab.data_dir.rglob("*"):  # the store, its WAL, the spool: all but quarantine's own bytes
        if path.is_file() and "quarantine" not in path.relative_to(lab.data_dir).parts:
            produced.append(path.read_bytes())
    blob = b"\n".join(produced)
    assert hostile.NAME.encode() not in blob and hostile.NAME.upper().encode() not in blob


def test_an_object_whose_commit_fails_leaves_no_file_and_those_committed_stay(lab, tmp_path):
    """A drop commits object by object: when the store fails from the second object on, the first
    is kept (file and row), and the files written for the ones that never committed are removed."""
    files = {f"{i}.dcm": hostile.valid() for i in range(3)} | {"bad.dcm": hostile.cut(0.5)}
    (tmp_path / "drop").mkdir()
    for name, data in files.items():
        (tmp_path / "drop" / name).write_bytes(data)
    commits = {"n": 0}

    def store_fails_after_the_first(_session):
        commits["n"] += 1
        if commits["n"] > 1:
            raise OperationalError("COMMIT", {}, Exception("database is gone"))

    with pytest.raises(OperationalError):
        with transaction(open_store(lab)) as session:
            event.listen(session, "before_commit", store_fails_after_the_first)
            ingest_path(session, lab, tmp_path / "drop", site_code="S1")
    assert commits["n"] > 2, "the failed object was not retried"
    with session_scope(lab) as s:
        rows = s.exec(select(Instance)).all()
    assert len(rows) == 1 and rows[0].sha256 == hashlib.sha256(files["0.dcm"]).hexdigest()
    assert [p for p in lab.spool_dir.rglob("*") if p.is_file()] == [lab.data_dir / rows[0].path]
    assert not [p for p in lab.quarantine_dir.rglob("*") if p.is_file()]


def test_inbox_moves_a_poison_entry_aside_once_and_goes_on(lab, monkeypatch):
    real = inbox_module.ingest_path

    def flaky(session, settings, path, *, site_code):
        if path.name == "a-poison":
            raise TypeError("a defect")
        return real(session, settings, path, site_code=site_code)

    monkeypatch.setattr(inbox_module, "ingest_path", flaky)
    for name in ("a-poison", "b-good"):
        (inbox_dir(lab) / "S1" / name).mkdir(parents=True)
        (inbox_dir(lab) / "S1" / name / "x.dcm").write_bytes(hostile.valid())
    engine = open_store(lab)
    summary = scan_inbox(lab, engine, settle_s=0)
    assert summary["S1"]["rejected_entries"] == 1 and summary["S1"]["stored"] == 1
    assert not any((inbox_dir(lab) / "S1").iterdir())
    (moved,) = (rejected_dir(lab) / "S1").iterdir()
    assert (moved / "x.dcm").is_file() and "poison" not in moved.name
    with session_scope(lab) as session:
        (item,) = session.exec(select(QuarantineItem)).all()
    assert item.reason_code == "unreadable" and "inbox entry #1" in item.reason and "TypeError" in item.reason
    assert scan_inbox(lab, engine, settle_s=0) == {}  # never retried


def test_inbox_leaves_every_entry_when_the_store_is_down(lab, monkeypatch):
    def down(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(inbox_module, "ingest_path", down)
    (inbox_dir(lab) / "S1" / "e").mkdir(parents=True)
    (inbox_dir(lab) / "S1" / "e" / "x.dcm").write_bytes(hostile.valid())
    for _ in range(inbox_module.MAX_ATTEMPTS + 1):
        scan_inbox(lab, open_store(lab), settle_s=0)
    assert (inbox_dir(lab) / "S1" / "e" / "x.dcm").is_file() and not rejected_dir(lab).exists()


def test_uid_rule_and_safe_join(tmp_path):
    for good in ("0", "1.2.840.10008.1.2", "2.25." + "9" * 39, "1.0.3"):
        assert is_valid_uid(good), good
    for bad in ("", "..", ".1", "1.", "1..2", "1.02", "01.2", "1.2.5/6", "1.2.5_6", "1.2.5 6", "1.a", "1." + "2" * 63):
        assert not is_valid_uid(bad), bad
    assert safe_join(tmp_path, "spool", "1.2", "3.dcm") == tmp_path / "spool" / "1.2" / "3.dcm"
    (tmp_path / "out").symlink_to("/", target_is_directory=True)
    for parts in (("..",), ("a", "../../x"), ("a/b",), ("",), ("x\x00",), ("out", "etc"), ("..", "x")):
        with pytest.raises(UnsafePath):
            safe_join(tmp_path, *parts)


def test_limits_are_settings_and_site_outboxes_stay_inside(settings_env):
    settings = load_settings(dict(settings_env, CORELAB_MAX_ZIP_MEMBERS="7"))
    assert (settings.max_zip_members, settings.max_object_bytes, settings.max_inflated_bytes) == \
        (7, 512 << 20, 512 << 20)
    with pytest.raises(SettingsError, match="max_object_bytes"):
        load_settings(dict(settings_env, CORELAB_MAX_OBJECT_BYTES="0"))
    with pytest.raises(UnsafePath):
        settings.site_outbox("../../X")
    assert os.fspath(settings.site_outbox("A01")).endswith("outbox/A01")


def test_values_a_database_would_refuse_are_cleaned_on_both_backends(store_settings, tmp_path):
    """NUL and control characters, over-long text and absurd counts are stored cleaned (PostgreSQL
    refuses NUL and too-long or out-of-range values; that must never read as "store unavailable")."""
    with session_scope(store_settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
        add_trial(session, code="T1", pseudonym_pattern=r"BENCH-\d{3}", deid_policy={"visit_labels": VISITS})
    odd = hostile.valid(SeriesDescription="WB\x00FDG\x07", Modality="PTXXXXXXXXXXXXXXXXXX", NumberOfSlices=None,
                        ImagesInAcquisition="99999999999",
                        DeviceSerialNumber="S" * 200, Manufacturer="ACME\x00", StudyDescription="x" * 300)
    hostile_files = {f"{name}.dcm": build() for name, (_, build) in hostile.CASES.items()}
    send(store_settings, {"odd.dcm": odd, **hostile_files}, "drop", tmp_path)
    with session_scope(store_settings) as session:
        (series,) = session.exec(select(Series)).all()
        assert (series.description, series.modality, series.expected_count) == ("WBFDG", "PTXXXXXXXXXXXXXX", None)
        assert len(session.exec(select(QuarantineItem)).all()) == len(hostile_files)
    assert_store_consistent(store_settings)
