"""Property-based fuzzing of accept_object (issue 11): at least 1,000 objects mutated from one valid
synthetic PET slice (byte flips, truncation, element value mutation, VR changes, file-meta damage)
are each stored or quarantined with a specific reason, nothing raises, and afterwards every stored
and every held object matches its sha256; the same objects as one file drop change nothing."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlmodel import select

from corelab.db import open_store, session_scope, transaction
from corelab.ingest import accept_object, ingest_path
from corelab.models import Site
from corelab.register import add_site, add_trial
from tests import hostile_objects as hostile
from tests.test_hostile_ingest import assert_store_consistent

EXAMPLES = 1000
REASONS = {"not_dicom", "truncated", "wrong_vr", "missing_uid", "invalid_uid", "unknown_sop_class", "deid_failed",
           "unreadable", "bad_pixel_data", "too_large", "zip_bomb", "uid_conflict"}
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}
VRS = sorted({"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH", "SL", "SS",
              "ST", "TM", "UI", "UL", "US", "ZZ", "\x00\x00"} | LONG_VRS)
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50",
                     "1.2.840.10008.1.2.5", "1.2.3", "", "1.2.840.10008.1.2.1\\1.2"]


def _template() -> tuple[bytes, list[tuple[int, str, int, int]]]:
    """The valid object and its top-level elements as ``(vr offset, vr, length offset, value offset)``."""
    good = hostile.encode(hostile.dataset(matrix=8, ClinicalTrialSubjectID="BENCH-001",
                                          ClinicalTrialTimePointID="baseline"))
    ds = pydicom.dcmread(io.BytesIO(good))
    elements = []
    for tag in ds.keys():
        raw = ds.get_item(tag)
        long_form = raw.VR in LONG_VRS
        vr_at = raw.value_tell - (8 if long_form else 4)
        elements.append((vr_at, raw.VR, raw.value_tell - (4 if long_form else 2), raw.value_tell))
    return good, elements


GOOD, ELEMENTS = _template()
META_END = ELEMENTS[0][0]


def _set_value(data: bytes, index: int, value: bytes) -> bytes:
    """Replace one top-level element's value (length field fixed), if it is still where it was."""
    vr_at, vr, length_at, value_at = ELEMENTS[index]
    if len(data) != len(GOOD) or vr == "SQ":
        return data
    old = struct.unpack_from("<I" if vr in LONG_VRS else "<H", data, length_at)[0]
    if vr not in LONG_VRS:
        value = value[:0xFFFE]
    value += b"\0" * (len(value) % 2)
    length = struct.pack("<I" if vr in LONG_VRS else "<H", len(value))
    return data[:length_at] + length + value + data[value_at + old:]


values = st.one_of(st.binary(max_size=80), st.text(max_size=80).map(lambda t: t.encode("utf-8", "replace")),
                   st.sampled_from([b"..", b"1.2.5/6", b"1." + b"2" * 298, b"1.2\\3.4", b"20241399", b"Qzvorak^Anna",
                                    b"\x00" * 8, b"-1", b"99999999999999999999", b"NaN", b"inf", b"\\" * 40]))
byte_flips = st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)), min_size=1, max_size=6).map(
    lambda flips: ("flip", flips))
truncations = st.integers(0, len(GOOD) - 1).map(lambda n: ("cut", n))
value_changes = st.tuples(st.integers(0, len(ELEMENTS) - 1), values).map(lambda t: ("value", t))
vr_changes = st.tuples(st.integers(0, len(ELEMENTS) - 1), st.sampled_from(VRS)).map(lambda t: ("vr", t))
meta_damage = st.one_of(
    st.sampled_from(TRANSFER_SYNTAXES).map(lambda ts: ("syntax", ts)),
    st.sampled_from(["no_meta", "no_preamble", "group_length", "meta_cut"]).map(lambda k: ("meta", k)))
mutations = st.lists(st.one_of(byte_flips, truncations, value_changes, vr_changes, meta_damage),
                     min_size=1, max_size=3)


def mutate(data: bytes, steps) -> bytes:
    for kind, arg in steps:
        if kind == "flip":
            buf = bytearray(data)
            for at, mask in arg:
                if at < len(buf):
                    buf[at] ^= mask
            data = bytes(buf)
        elif kind == "cut":
            data = data[:arg]
        elif kind == "value":
            data = _set_value(data, *arg)
        elif kind == "vr" and len(data) == len(GOOD):
            vr_at = ELEMENTS[arg[0]][0]
            data = data[:vr_at] + arg[1].encode("latin-1") + data[vr_at + 2:]
        elif kind == "syntax":  # the same body under a file meta naming another (or no) transfer syntax
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = hostile.PET, "1.2.3.4"
            if arg:
                meta.TransferSyntaxUID = arg
            data = hostile.with_meta(None, meta, data[META_END:])
        elif kind == "meta":
            data = {"no_meta": b"\0" * 128 + b"DICM" + data[META_END:], "no_preamble": data[132:],
                    "group_length": data[:140] + b"\xff\xff\x00\x00" + data[144:],
                    "meta_cut": data[: META_END // 2]}[arg]
    return data


@pytest.fixture
def fuzz_store(settings_env):
    from corelab.settings import load_settings

    settings = load_settings(dict(settings_env, CORELAB_MAX_OBJECT_BYTES=str(64 * 1024),
                                  CORELAB_MAX_INFLATED_BYTES=str(256 * 1024)))
    with session_scope(settings) as session:
        add_site(session, code="S1", ae_title="SITE1")
        add_trial(session, code="T1", pseudonym_pattern=r"BENCH-\d{3}", deid_policy={"visit_labels": ["baseline"]})
    return settings


def test_mutated_objects_are_stored_or_quarantined_with_a_specific_reason(fuzz_store, tmp_path):
    engine = open_store(fuzz_store)
    with transaction(engine) as session:
        site_id = session.exec(select(Site.id).where(Site.code == "S1")).one()
    seen: list[bytes] = []
    outcomes: dict[str, int] = {}

    @hsettings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))
    @given(mutations)
    def one(steps):
        data = mutate(GOOD, steps)
        seen.append(data)
        with transaction(engine) as session:
            outcome = accept_object(session, fuzz_store, data, site=session.get(Site, site_id), ordinal=len(seen))
        assert outcome.status in ("stored", "duplicate", "new_version", "quarantined")
        if outcome.status == "quarantined":
            assert outcome.reason_code in REASONS, outcome
            assert outcome.reason.startswith(f"object #{len(seen)} (sha256 ")
            assert outcome.reason_code != "unreadable" or "at step '" in outcome.reason
        key = outcome.reason_code or outcome.status
        outcomes[key] = outcomes.get(key, 0) + 1

    one()
    assert len(seen) >= EXAMPLES, f"only {len(seen)} objects were tried"
    assert outcomes.get("stored", 0) + outcomes.get("new_version", 0) > 0 and len(outcomes) >= 6, outcomes
    assert_store_consistent(fuzz_store)
    # The same objects as one file drop: every one is a duplicate or quarantined again, none raises.
    drop = tmp_path / "drop"
    drop.mkdir()
    for i, data in enumerate(seen):
        (drop / f"{i:05d}.dcm").write_bytes(data)
    with session_scope(fuzz_store) as session:
        summary = ingest_path(session, fuzz_store, drop, site_code="S1")
    assert len(summary.outcomes) == len(seen) and summary.count("stored") + summary.count("new_version") == 0
    assert_store_consistent(fuzz_store)
