"""Over 200 mutated objects: no crash, each quarantined with a specific reason, and no planted
identifying value anywhere but the quarantined bytes themselves."""

from __future__ import annotations

import hashlib
import json
import logging
import random

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlmodel import select

from corelab.db import open_store, session_scope
from corelab.inbox import inbox_dir, scan_inbox
from corelab.ingest import ingest_path
from corelab.models import QuarantineItem
from corelab.receiver import Receiver, ReceiverConfig
from corelab.register import add_site, add_trial
from flows.cli import main as cli_main
from tests.receiver_helpers import instance_count, small_series, storescu

pytestmark = pytest.mark.dcmtk

WRONG_VR = [("PatientWeight", "US", 70), ("SliceThickness", "US", 2), ("Rows", "DS", "8"), ("InstanceNumber", "UL", 1),
            ("Modality", "UL", 7), ("SeriesTime", "US", 10), ("PatientSex", "FD", 1.0), ("Units", "SS", 3),
            ("RescaleSlope", "FL", 0.5), ("NumberOfSlices", "DS", "9")]
MISSING = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"]


def _planted(i: int) -> str:
    return f"Qzvorak{i:03d}"  # a made-up surname: unique, so any leak is found by grep


def _identifiable(ds: Dataset, i: int) -> None:
    name = _planted(i)
    kind = i % 8
    if kind == 0:
        ds.PatientName = f"{name}^Anna"
    elif kind == 1:
        ds.OtherPatientNames = f"{name}^Old"
    elif kind == 2:
        ds.ReferringPhysicianName = f"Dr^{name}"
    elif kind == 3:
        ds.InstitutionName = f"{name} General Hospital"
    elif kind == 4:
        ds.PatientAddress = f"1 {name} Road"
    elif kind == 5:  # nested in a sequence item
        item = ds.RadiopharmaceuticalInformationSequence[0]
        item.PersonName = f"{name}^Tech"
    elif kind == 6:  # a private group outside the vendor SUV groups
        block = ds.private_block(0x0011, "ACME_SITE_TOOL", create=True)
        block.add_new(0x01, "LO", name)
    else:
        ds.PatientComments = f"referred by {name}"


@pytest.fixture
def mutated(tmp_path):
    """{expected reason codes: [files]} built from one valid PET slice; 210 files."""
    rng = random.Random(7)
    template = small_series(tmp_path / "template", 1, matrix=16)[0]
    good = template.read_bytes()
    out = tmp_path / "mutated"
    out.mkdir()
    groups: dict[frozenset, list] = {}

    def add(codes: set[str], name: str, data: bytes) -> None:
        path = out / name
        path.write_bytes(data)
        groups.setdefault(frozenset(codes), []).append(path)

    def variant(change) -> bytes:
        ds = pydicom.dcmread(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        change(ds)
        from io import BytesIO
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        return buf.getvalue()

    for i, cut in enumerate(sorted(rng.sample(range(1, len(good) - 1), 50))):  # preamble to last pixel
        add({"truncated", "not_dicom", "missing_uid"}, f"cut{i:03d}.dcm", good[:cut])
    for i in range(30):  # garbage, half of it behind a valid preamble
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
        add({"not_dicom", "truncated"}, f"junk{i:03d}.dcm", (b"\0" * 128 + b"DICM" + junk) if i % 2 else junk)
    for i in range(30):
        keyword, vr, value = WRONG_VR[i % len(WRONG_VR)]
        add({"wrong_vr"}, f"vr{i:03d}.dcm",
            variant(lambda ds: ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr, value)))
    for i in range(40):
        keyword = MISSING[i % 4]
        add({"missing_uid"}, f"uid{i:03d}.dcm",
            variant(lambda ds: delattr(ds, keyword) if i % 8 < 4 else setattr(ds, keyword, "")))
    for i in range(40):
        add({"deid_failed"}, f"name{i:03d}.dcm", variant(lambda ds: _identifiable(ds, i)))
    for i in range(20):
        add({"unknown_sop_class"}, f"sop{i:03d}.dcm",
            variant(lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.481.5")))
    assert sum(map(len, groups.values())) == 210
    return groups


def test_mutated_input_is_quarantined_with_specific_reasons_and_nothing_identifying_leaks(
        settings, tmp_path, mutated, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CORELAB_DATA_DIR", str(settings.data_dir))  # for the CLI calls below
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
        add_trial(session, code="T1", pseudonym_pattern=r"BENCH-\d{3}")
    engine = open_store(settings)
    drop = inbox_dir(settings) / "S1" / "batch"
    drop.mkdir(parents=True)
    for files in mutated.values():
        for f in files:
            (drop / f.name).write_bytes(f.read_bytes())
    summary = scan_inbox(settings, engine, settle_s=0)
    assert summary["S1"]["quarantined"] == 210 and summary["S1"]["stored"] == 0
    # The same over the network for the identifiable ones: answered 0xB007, the node keeps going.
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=3600)).start()
    try:
        names = mutated[frozenset({"deid_failed"})]
        storescu(receiver.port, names, aet="SITE1", extra=("-nh",))
        good = small_series(tmp_path / "good", 3, matrix=16)
        storescu(receiver.port, good, aet="SITE1")
    finally:
        receiver.stop()
    # Objects from a site that is not registered: quarantined too (file drop path).
    with session_scope(settings) as session:
        unknown = ingest_path(session, settings, small_series(tmp_path / "other", 1, matrix=4)[0],
                              site_code="NOSUCH")
    assert [o.reason_code for o in unknown.outcomes] == ["unknown_site"]

    with session_scope(settings) as session:
        all_items = session.exec(select(QuarantineItem)).all()
        items = {i.sha256: i for i in all_items}  # an object is known by its bytes, never by a file name
        assert len(items) == len(all_items) and instance_count(session) == 3
    dropped = set()
    for codes, files in mutated.items():
        for f in files:
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            item = items[digest]
            dropped.add(digest)
            assert item.reason_code in codes, (f.name, item.reason_code, item.reason)
            assert digest[:12] in item.reason and f.name not in item.reason + item.source_name
            assert len(item.reason) > 40
    for f in mutated[frozenset({"deid_failed"})]:
        assert items[hashlib.sha256(f.read_bytes()).hexdigest()].reason_code == "deid_failed"
    # Network copies: same bytes as the dropped ones? No: pynetdicom writes its own file meta,
    # so they are held as separate items, each with the de-identification reason.
    net = [i for digest, i in items.items() if digest not in dropped and i.reason_code != "unknown_site"]
    assert len(net) == 40 and {i.reason_code for i in net} == {"deid_failed"}

    # Grep everything corelab produced: the store, its WAL, the logs, the CLI's JSON.
    assert cli_main(["quarantine", "list", "--objects", "--json"]) == 0
    assert cli_main(["series", "list", "--json"]) == 0
    out = capsys.readouterr().out
    quarantine, end = json.JSONDecoder().raw_decode(out)
    assert len(quarantine) == len(items) >= 250 and json.loads(out[end:])
    produced = [settings.database_path.read_bytes(), caplog.text.encode(), out.encode()]
    wal = settings.database_path.with_name(settings.database_path.name + "-wal")
    if wal.exists():
        produced.append(wal.read_bytes())
    for path in settings.data_dir.rglob("*"):
        if path.is_file() and "quarantine" not in path.parts and "inbox" not in path.parts:
            if path.suffix != ".dcm":  # the spool holds only objects that passed
                produced.append(path.read_bytes())
    blob = b"\n".join(produced)
    assert b"Qzvorak" not in blob
