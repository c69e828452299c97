"""Helpers of the forwarding tests: the portal lab narrowed to three series of the trial, a real
Orthanc, what is due computed from the index independently of the use case, what Orthanc holds."""

from __future__ import annotations

import hashlib

import pytest

import pydicom
from sqlmodel import select

from corelab.db import get_engine, session_scope
from corelab.ingest import complete_series
from corelab.models import ArchiveDelivery, Instance, QuarantineItem, Series, Trial
from corelab.receiver_store import Store
from services import forwarding
from services.site_view import flag_sets, series_state
from synth.orthanc import Orthanc
from tests.portal_helpers import build_portal_lab

OTHER_TRIAL = "OTHER-02"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dataset_part(data: bytes) -> bytes:
    """A Part-10 file without preamble and file meta: what C-STORE carries (the archive writes its own meta)."""
    assert data[128:132] == b"DICM", "not a DICOM Part-10 file"
    assert data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def narrowed_lab(tmp_path):
    """The portal lab with three series left in the trial: an evaluable PET, a PET that is not
    evaluable (or a second PET), and a CT (QC pending: not evaluable)."""
    lab = build_portal_lab(tmp_path)
    with session_scope(lab.settings) as s:
        trial = s.exec(select(Trial).where(Trial.code == lab.trial)).one()
        other = Trial(code=OTHER_TRIAL)
        s.add(other)
        s.flush()
        rows = s.exec(select(Series).where(Series.trial_id == trial.id, Series.kind == "trial")
                      .order_by(Series.id)).all()
        queried, major = flag_sets(s, Series.trial_id == trial.id)
        state = {x.id: series_state(x.state, x.qc_state, unresolved_query=x.id in queried,
                                    major_open=x.id in major)[0] for x in rows}
        pets = [x for x in rows if x.modality == "PT"]
        good = next(x for x in pets if state[x.id] == "evaluable")
        bad = next((x for x in pets if state[x.id] != "evaluable"), next(x for x in pets if x is not good))
        ct = next(x for x in rows if x.modality == "CT")
        keep = {good.id, bad.id, ct.id}
        for x in rows:
            if x.id not in keep:
                x.trial_id = other.id
                s.add(x)
    lab.keep, lab.evaluable = sorted(keep), sorted(k for k in keep if state[k] == "evaluable")
    return lab


def expected_per_series(lab, only_series: list[int] | None = None) -> dict[tuple[int, str], Instance]:
    """(series id, SOP Instance UID) -> newest stored version in that series, over the trial's
    complete trial series (from the index, each series on its own)."""
    out: dict[tuple[int, str], Instance] = {}
    with session_scope(lab.settings) as s:
        trial = s.exec(select(Trial).where(Trial.code == lab.trial)).one()
        for series in s.exec(select(Series).where(Series.trial_id == trial.id, Series.kind == "trial",
                                                  Series.state == "complete")):
            if only_series is not None and series.id not in only_series:
                continue
            for inst in s.exec(select(Instance).where(Instance.series_id == series.id)):
                key = (series.id, inst.sop_instance_uid)
                if key not in out or inst.version > out[key].version:
                    out[key] = inst
    return out


def expected(lab, only_series: list[int] | None = None) -> dict[str, Instance]:
    """SOP Instance UID -> newest stored version (:func:`expected_per_series`; the lab holds no
    SOP Instance UID in two series, which this checks)."""
    per_series = expected_per_series(lab, only_series)
    out = {uid: inst for (_, uid), inst in per_series.items()}
    assert len(out) == len(per_series), "a SOP Instance UID in two series: use expected_per_series"
    return out


def held(server: Orthanc) -> dict[str, bytes]:
    """SOP Instance UID -> file, of everything Orthanc holds."""
    return {server.sop_instance_uid(i): server.instance_file(i) for i in server.instances()}


def records(lab) -> list[ArchiveDelivery]:
    with session_scope(lab.settings) as s:
        return list(s.exec(select(ArchiveDelivery).order_by(ArchiveDelivery.id)))


def set_dicom(lab, server: Orthanc, rule: str = "all") -> None:
    with session_scope(lab.settings) as s:
        forwarding.set_destination(s, lab.settings, lab.trial, dicom=f"{server.ae_title}@127.0.0.1:{server.dicom_port}",
                                   rule=rule, actor="test")


def set_stow(lab, server: Orthanc, tmp_path, password: str | None = None, rule: str = "all") -> None:
    pw = tmp_path / "archive.pw"
    pw.write_text((password or server.password) + "\n")
    with session_scope(lab.settings) as s:
        forwarding.set_destination(s, lab.settings, lab.trial, stow_url=server.dicomweb_url, username=server.username,
                                   password_file=pw, rule=rule, actor="test")


def assert_holds_exactly(lab, server: Orthanc, want: dict[str, Instance], *, whole_file: bool) -> None:
    got = held(server)
    assert set(got) == set(want)
    for uid, inst in want.items():
        spool = (lab.settings.data_dir / inst.path).read_bytes()
        assert sha(spool) == inst.sha256
        if whole_file:
            assert sha(got[uid]) == inst.sha256, uid
        else:
            assert sha(dataset_part(got[uid])) == sha(dataset_part(spool)), uid


def never_sent_elsewhere(lab, server: Orthanc) -> None:
    """Phantoms, the other trial's series and quarantined objects are not in the archive."""
    got = set(server.instances() and held(server))
    with session_scope(lab.settings) as s:
        trial = s.exec(select(Trial).where(Trial.code == lab.trial)).one()
        others = set(s.exec(select(Instance.sop_instance_uid).join(Series, Instance.series_id == Series.id)
                            .where((Series.kind != "trial") | (Series.trial_id != trial.id))))
        quarantined = [lab.settings.data_dir / q.path for q in s.exec(select(QuarantineItem))]
    assert others and not (got & others)
    assert quarantined, "the lab holds no quarantined object: the check would prove nothing"
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).get("SOPInstanceUID", "")) for p in quarantined}
    assert not (got & uids)


def start_orthanc(tmp_path, *, overwrite: bool = True) -> Orthanc:
    """A fresh Orthanc that counts what it receives; ``overwrite`` False is Orthanc's default."""
    return Orthanc(tmp_path / "orthanc", overwrite_instances=overwrite, count_received=True).start()


def store_new_version(lab, inst: Instance, name: str = "v2.dcm") -> Instance:
    """Store other bytes under ``inst``'s SOP Instance UID through the receiver's store, complete
    the series again; returns the new version's row."""
    ds = pydicom.dcmread(lab.settings.data_dir / inst.path)
    ds.WindowCenter, ds.WindowWidth = 123, 456
    path = lab.settings.data_dir / name
    ds.save_as(path, enforce_file_format=True)
    with session_scope(lab.settings) as s:
        site_id = s.get(Series, inst.series_id).site_id
    outcome = Store(lab.settings, get_engine(lab.settings)).accept(
        path.read_bytes(), sop_instance_uid=inst.sop_instance_uid, site_id=site_id, source="test")
    assert outcome.status == "new_version"
    with session_scope(lab.settings) as s:
        complete_series(s, s.get(Series, inst.series_id), actor="test")
        return s.exec(select(Instance).where(Instance.sop_instance_uid == inst.sop_instance_uid)
                      .order_by(Instance.version.desc())).first()


@pytest.fixture
def lab(tmp_path):
    """A fresh, narrowed lab per test (forwarding changes its records)."""
    return narrowed_lab(tmp_path)


@pytest.fixture
def orthanc(tmp_path):
    """A real Orthanc per test; its storage is thrown away, so no clean shutdown is waited for (~3 s)."""
    server = start_orthanc(tmp_path)
    yield server
    server.stop(kill=True)
