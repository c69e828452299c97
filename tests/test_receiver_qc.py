"""A series received over DICOM starts the Prefect QC flow once, for that series only."""

from __future__ import annotations

import json

import pytest
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import Deviation, Series
from corelab.receiver import Receiver, ReceiverConfig
from corelab.register import load_register
from expectations.manual import trial_fields
from synth.spec import small_spec
from synth.trial import generate_trial
from tests.receiver_helpers import qc_claims, storescu, wait_for
from tests.synth_fixtures import series_files

pytestmark = [pytest.mark.dcmtk, pytest.mark.prefect]


@pytest.fixture(scope="module")
def trial_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rx-trial")
    generate_trial(out, small_spec(), seed=3)
    return out


def test_received_trial_series_runs_qc_flow_once(prefect_harness, trial_dir, settings, monkeypatch):
    from flows.receive import QcStarter

    monkeypatch.setenv("CORELAB_DATA_DIR", str(settings.data_dir))  # the flows load settings themselves
    truth = json.loads((trial_dir / "ground_truth.json").read_text())
    with session_scope(settings) as session:
        load_register(session, trial_dir / "register.yaml", trial_fields=trial_fields)
    pet = next(s for s in truth["series"] if s["site"] == "B02" and s["kind"] == "trial" and s["modality"] == "PT"
               and not s["problems"])
    ct = next(s for s in truth["series"] if s["site"] == "B02" and s["kind"] == "trial" and s["modality"] == "CT")
    ae = next(s["ae_title"] for s in truth["register"]["sites"] if s["code"] == "B02")
    starter = QcStarter(settings, mode="flow")
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=1.0, tick_s=0.2),
                        on_complete=starter).start()
    try:
        storescu(receiver.port, series_files(trial_dir, pet) + series_files(trial_dir, ct), aet=ae)

        def qc_done() -> bool:
            with session_scope(settings) as session:
                return {s.qc_state for s in session.exec(select(Series))} == {"done"}
        wait_for(qc_done, timeout_s=240, interval_s=0.5, what="QC of both series")
        storescu(receiver.port, series_files(trial_dir, pet), aet=ae)  # resent: a no-op
        receiver.tick()
        starter.join()
    finally:
        receiver.stop()
    with session_scope(settings) as session:
        pet_row = session.exec(select(Series).where(Series.series_uid == pet["series_uid"])).one()
        assert pet_row.qc_manual_version and pet_row.header_row
        assert qc_claims(session, pet["series_uid"]) == 1 and qc_claims(session, ct["series_uid"]) == 1
        # QC really ran: the only finding is the scanner's missing accreditation (no phantom sent).
        assert [d.rule_id for d in session.exec(select(Deviation).where(Deviation.series_id == pet_row.id))] == \
            ["scanner_accredited"]
    qc_runs = [r for r in starter.runs if r["kind"] == "qc"]
    assert len(qc_runs) == 1 and qc_runs[0]["parameters"]["series_ids"] == [pet_row.id]
