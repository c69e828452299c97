"""A phantom scan sent over DICOM gets its fill sheet (issue 16, point 1).

* End to end: the scans sent with dcmtk's storescu to a real node, the ``accredit-scanners``
  flow ends Failed naming them (and the alert is recorded), the worklist and the site's page say
  "awaiting fill sheet", ``corelab phantom fill ... --qc flow`` attaches each sheet and the
  series are accredited (a pass/fail result, the register updated).
* A bad fill sheet (missing key, not YAML, a word for a number, too big), a trial series and an
  unknown series are refused with a clear message, and nothing changes.
* The portal form: another site's series answers 404; the owning site attaches it; a bad sheet
  is shown again with its reason.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from sqlmodel import select

from corelab.db import session_scope
from corelab.ingest import ingest_path
from corelab.limits import MAX_FILL_SHEET_BYTES
from corelab.models import Accreditation, AuditEvent, PhantomResult, Series, Site, Trial
from corelab.receiver import Receiver, ReceiverConfig
from corelab.register import add_site
from corelab.series_files import series_dir
from services import site_view
from services.worklist import worklist
from tests.accreditation_helpers import _write_drop
from tests.receiver_helpers import storescu, wait_for

TRIAL = "FDG-RESP-01"


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    """Scanner A01-1's NEMA IEC and cylinder phantom scans with their fill sheets (tests/accreditation_helpers)."""
    return _write_drop(tmp_path_factory.mktemp("drop"))


def _fill_events(settings) -> list[AuditEvent]:
    with session_scope(settings) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == "phantom.fill_sheet")))


def _phantom_series(settings) -> dict[int, Series]:
    with session_scope(settings) as s:
        rows = s.exec(select(Series).where(Series.kind == "phantom")).all()
        for r in rows:
            s.expunge(r)
        return {r.id: r for r in rows}


def _prepare(settings, monkeypatch) -> None:
    monkeypatch.setenv("CORELAB_DATA_DIR", str(settings.data_dir))  # the CLI and the flows load settings themselves
    settings.ensure_dirs()
    with session_scope(settings) as s:
        s.add(Trial(code=TRIAL, standard="EARL1"))
        add_site(s, code="A01", ae_title="SITEA01")


@pytest.mark.dcmtk
@pytest.mark.prefect
def test_phantoms_sent_over_dicom_get_their_fill_sheets_and_are_accredited(settings, drop, monkeypatch, capsys,
                                                                          prefect_harness):
    from flows.accredit import accredit_scanners
    from flows.cli import main

    out, nema, cyl = drop
    _prepare(settings, monkeypatch)
    receiver = Receiver(settings, ReceiverConfig(port=0, bind_address="127.0.0.1", stable_s=1.0, tick_s=0.2)).start()
    try:
        storescu(receiver.port, sorted((out / nema["path"]).glob("*.dcm")) + sorted((out / cyl["path"]).glob("*.dcm")),
                 aet="SITEA01")

        def queued() -> bool:
            rows = _phantom_series(settings).values()
            return len(rows) == 2 and all(r.state == "complete" and r.qc_state == "queued" for r in rows)
        wait_for(queued, timeout_s=120, interval_s=0.3, what="both phantom series complete and queued")
    finally:
        receiver.stop()
    series = _phantom_series(settings)
    by_uid = {r.series_uid: r.id for r in series.values()}
    assert set(by_uid) == {nema["series_uid"], cyl["series_uid"]}

    # the run cannot do its job: it ends Failed, naming each series and the fix, and the alert is recorded
    state = accredit_scanners(scope=TRIAL, series=[(i, r.series_uid) for i, r in series.items()], return_state=True)
    assert state.is_failed()
    for uid in by_uid:
        assert uid[-12:] in state.message
    assert "2 of 2 phantom series could not be analysed" in state.message and "corelab phantom fill" in state.message
    assert "A01-" in state.message  # the scanner is named (no empty scanner column)
    alerts = [json.loads(p.read_text()) for p in (settings.data_dir / "alerts").glob("*.json")]
    assert any(a["flow"] == "accredit-scanners" and nema["series_uid"][-12:] in a["message"] for a in alerts)
    assert {r.qc_state for r in _phantom_series(settings).values()} == {"failed"}
    # the default selection of the next runs leaves them out (failed and alerted once); named, they are taken
    from tasks.phantoms import find_phantom_series
    assert find_phantom_series.fn() == []
    again = accredit_scanners(scope=TRIAL, series=[(i, r.series_uid) for i, r in series.items()], return_state=True)
    assert again.is_failed() and "2 of 2 phantom series could not be analysed" in again.message

    # the state is visible, with what to do: in the worklist and on the site's page
    with session_scope(settings) as s:
        waiting = worklist(s, settings=settings)["awaiting_fill"]
        assert {r["id"] for r in waiting["rows"]} == set(series) and waiting["total"] == 2
        assert all("corelab phantom fill" in r["action"] for r in waiting["rows"])
        arrivals = worklist(s, settings=settings)["arrivals"]["rows"]
        assert {r["note"] for r in arrivals if r["kind"] == "phantom"} == {"awaiting fill sheet"}
        assert worklist(s)["awaiting_fill"]["total"] == 0  # without the spool's place it cannot say
        rows = site_view.site_grid(s, "A01", settings=settings)["phantoms"]
        assert [r["verdict"] for r in rows] == ["awaiting fill sheet"] * 2 and all(r["todo"] for r in rows)
        detail = site_view.series_detail(s, by_uid[nema["series_uid"]], settings=settings)
        assert detail["awaiting_fill_sheet"] and detail["note"].startswith("awaiting fill sheet")

    # the physicist attaches each fill sheet; --qc flow runs the accreditation in this process
    for meta in (nema, cyl):
        sheet = out / meta["phantom"]["fill_sheet"]
        assert main(["phantom", "fill", meta["series_uid"], str(sheet), "--qc", "flow"]) == 0
        printed = capsys.readouterr().out
        assert "qc_state: done" in printed and f"sha256: {hashlib.sha256(sheet.read_bytes()).hexdigest()}" in printed
    with session_scope(settings) as s:
        results = {s.get(Series, r.series_id).series_uid: r for r in s.exec(select(PhantomResult))}
        assert set(results) == set(by_uid)
        assert {r.verdict for r in results.values()} <= {"pass", "fail"}
        assert results[nema["series_uid"]].kind == "nema_iec" and results[cyl["series_uid"]].kind == "uniform_cylinder"
        [acc] = s.exec(select(Accreditation)).all()  # the register: both decisive results taken in
        assert acc.status in ("accredited", "failed", "expired") and acc.scope == TRIAL
        assert {r.qc_state for r in s.exec(select(Series))} == {"done"}
        assert worklist(s, settings=settings)["awaiting_fill"]["total"] == 0
        assert "awaiting fill sheet" not in [r["verdict"] for r in site_view.site_grid(s, "A01", settings=settings)
                                             ["phantoms"]]
    events = _fill_events(settings)
    assert len(events) == 2 and all(e.actor.startswith("cli:") and len(e.detail["sha256"]) == 64
                                    and e.detail["replaced"] == "" for e in events)
    for meta in (nema, cyl):
        with session_scope(settings) as s:
            folder = series_dir(settings, s.get(Series, by_uid[meta["series_uid"]]), s)
        assert (folder / "fill.yaml").read_bytes() == (out / meta["phantom"]["fill_sheet"]).read_bytes()

    # a sheet given again replaces the first, audited with the one it replaced; the series is pending
    # again, for the node's ticker to start like a new arrival
    sheet = out / nema["phantom"]["fill_sheet"]
    changed = sheet.read_text() + "# corrected by the site\n"
    (settings.data_dir / "again.yaml").write_text(changed)
    assert main(["phantom", "fill", nema["series_uid"], str(settings.data_dir / "again.yaml")]) == 0
    assert "qc_state: pending" in capsys.readouterr().out
    last = _fill_events(settings)[-1]
    assert last.detail["replaced"] == hashlib.sha256(sheet.read_bytes()).hexdigest()
    assert last.detail["sha256"] == hashlib.sha256(changed.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# bad fill sheets and wrong series change nothing
# ---------------------------------------------------------------------------------------------
def _phantom_without_sheet(settings, out: Path, meta: dict, tmp_path: Path, site: str = "A01") -> int:
    """The phantom series ingested as a drop without its fill sheet (as DICOM would bring it)."""
    folder = tmp_path / f"drop-{site}" / Path(meta["path"]).name
    shutil.copytree(out / meta["path"], folder)
    with session_scope(settings) as s:
        ingest_path(s, settings, folder.parent, site_code=site)
    with session_scope(settings) as s:
        return s.exec(select(Series.id).where(Series.series_uid == meta["series_uid"])).one()


def test_a_bad_fill_sheet_or_a_wrong_series_is_refused_and_changes_nothing(settings, drop, monkeypatch, capsys,
                                                                           tmp_path):
    from flows.cli import main
    from synth.small_series import write_pet_slices

    out, nema, _ = drop
    _prepare(settings, monkeypatch)
    series_id = _phantom_without_sheet(settings, out, nema, tmp_path)
    pet = tmp_path / "pet"
    write_pet_slices(pet, n=3, matrix=8)
    with session_scope(settings) as s:
        ingest_path(s, settings, pet, site_code="A01")
        trial_uid = s.exec(select(Series.series_uid).where(Series.kind != "phantom")).one()
        folder = series_dir(settings, s.get(Series, series_id), s)
    before = {r.id: (r.qc_state, r.state) for r in _phantom_series(settings).values()}
    good = (out / nema["phantom"]["fill_sheet"]).read_text()
    cases = {
        "missing key": (good.replace("reference_time", "reference_tme"), "'reference_time' is missing"),
        "not yaml": ("kind: nema_iec\nsphere_kbq_ml: [20\n", "not valid YAML at line"),
        "a word": (good.replace("sphere_kbq_ml:", "sphere_kbq_ml: twenty #"), "'sphere_kbq_ml' is 'twenty'"),
        "a list": ("- 1\n- 2\n", "a fill sheet is a YAML mapping"),
        "too big": (good + "#" * MAX_FILL_SHEET_BYTES, f"over the limit of {MAX_FILL_SHEET_BYTES} bytes"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        assert main(["phantom", "fill", nema["series_uid"], str(path), "--qc", "queue"]) == 2, name
        err = capsys.readouterr().err
        assert expected in err and "nothing was changed" in err, (name, err)
    good_path = tmp_path / "good.yaml"
    good_path.write_text(good)
    assert main(["phantom", "fill", trial_uid, str(good_path)]) == 2
    assert "is not a phantom scan" in capsys.readouterr().err
    assert main(["phantom", "fill", "1.2.3.4.5", str(good_path)]) == 2
    assert "no series '1.2.3.4.5'" in capsys.readouterr().err
    assert not (folder / "fill.yaml").exists() and _fill_events(settings) == []
    assert {r.id: (r.qc_state, r.state) for r in _phantom_series(settings).values()} == before
    # and the same sheet, correct, is taken: the complete, pending series is left pending, for the
    # node's ticker to start like a new arrival
    assert main(["phantom", "fill", nema["series_uid"], str(good_path), "--qc", "queue"]) == 0
    printed = capsys.readouterr().out
    assert "qc_state: pending" in printed and "the DICOM node (corelab serve/receive) starts" in printed
    assert (folder / "fill.yaml").read_text() == good and len(_fill_events(settings)) == 1


# ---------------------------------------------------------------------------------------------
# the portal form
# ---------------------------------------------------------------------------------------------
def test_the_portal_form_is_the_owning_sites_and_the_physicists(settings, drop, monkeypatch, tmp_path):
    from portal.app import create_app
    from services import accounts
    from tests.portal_helpers import PASSWORD, client_for, csrf_of

    out, nema, cyl = drop
    _prepare(settings, monkeypatch)
    with session_scope(settings) as s:
        add_site(s, code="B02", ae_title="SITEB02")
        for name, role, sites in (("site-a", "site", ["A01"]), ("site-b", "site", ["B02"]), ("phys", "physicist", None),
                                  ("tm", "trial-manager", None)):
            accounts.add_user(s, name, role=role, sites=sites, trials=[TRIAL] if role == "trial-manager" else None,
                              full_name=name, password=PASSWORD, actor="test")
    series_id = _phantom_without_sheet(settings, out, nema, tmp_path)
    with session_scope(settings) as s:
        folder = series_dir(settings, s.get(Series, series_id), s)
        assert s.exec(select(Site.code).join(Series, Series.site_id == Site.id).where(Series.id == series_id)).one() \
            == "A01"
    app = create_app(settings)
    good = (out / nema["phantom"]["fill_sheet"]).read_bytes()
    url = f"/series/{series_id}/fill-sheet"

    # another site: 404 as for a series that does not exist, with a valid session and token
    other = client_for(app, "site-b")
    token = csrf_of(other.get("/account").text)
    response = other.post(url, data={"csrf_token": token, "text": good.decode()}, follow_redirects=False)
    assert response.status_code == 404 and nema["series_uid"] not in response.text
    response = other.post(url, data={"csrf_token": token}, files={"file": ("f.yaml", good, "text/yaml")},
                          follow_redirects=False)
    assert response.status_code == 404
    # a trial manager reads but does not attach; no token: refused
    tm = client_for(app, "tm")
    assert tm.post(url, data={"csrf_token": csrf_of(tm.get("/account").text), "text": good.decode()},
                   follow_redirects=False).status_code == 403
    site_a = client_for(app, "site-a")
    assert site_a.post(url, data={"text": good.decode()}, follow_redirects=False).status_code == 403
    assert not (folder / "fill.yaml").exists() and _fill_events(settings) == []

    # the owning site: the form is on its series page; a bad sheet comes back with its reason
    page = site_a.get(f"/series/{series_id}")
    assert page.status_code == 200 and f'action="{url}"' in page.text
    token = csrf_of(page.text)
    bad = site_a.post(url, data={"csrf_token": token, "text": "kind: nema_iec\nradionuclide: F-18\n"},
                      follow_redirects=False)
    assert bad.status_code == 400 and "&#39;sphere_kbq_ml&#39; is missing" in bad.text
    assert "nothing was changed" in bad.text and not (folder / "fill.yaml").exists()
    big = site_a.post(url, data={"csrf_token": token},
                      files={"file": ("f.yaml", good + b"#" * MAX_FILL_SHEET_BYTES, "text/yaml")},
                      follow_redirects=False)
    assert big.status_code == 400 and "over the limit" in big.text and not (folder / "fill.yaml").exists()
    done = site_a.post(url, data={"csrf_token": token}, files={"file": ("fill.yaml", good, "text/yaml")})
    assert done.status_code == 200 and "Fill sheet (nema_iec" in done.text
    assert (folder / "fill.yaml").read_bytes() == good
    [event] = _fill_events(settings)
    assert event.actor == "site-a" and event.detail["sha256"] == hashlib.sha256(good).hexdigest()
    # the site cannot replace it (after a verdict it would choose the values that judge its scan)
    token = csrf_of(site_a.get(f"/series/{series_id}").text)
    again = site_a.post(url, data={"csrf_token": token, "text": good.decode() + "# other values\n"},
                        follow_redirects=False)
    assert again.status_code == 403 and "replacing it is for the core lab&#39;s physicist" in again.text
    assert (folder / "fill.yaml").read_bytes() == good and len(_fill_events(settings)) == 1

    # the physicist replaces it through the same form (pasted text)
    phys = client_for(app, "phys")
    text = good.decode() + "# checked by the physicist\n"
    replaced = phys.post(url, data={"csrf_token": csrf_of(phys.get(f"/series/{series_id}").text), "text": text})
    assert replaced.status_code == 200 and "replaces the sheet given before" in replaced.text
    assert (folder / "fill.yaml").read_text() == text
    assert _fill_events(settings)[-1].detail["replaced"] == hashlib.sha256(good).hexdigest()


# ---------------------------------------------------------------------------------------------
# one analysis at a time, a sheet with its transaction, a re-drop through the same route
# ---------------------------------------------------------------------------------------------
def _qc_events(settings, series_uid: str) -> list[tuple[str, str]]:
    with session_scope(settings) as s:
        return [(e.detail.get("from"), e.detail.get("to")) for e in s.exec(
            select(AuditEvent).where(AuditEvent.action == "series.qc_state", AuditEvent.entity_id == series_uid)
            .order_by(AuditEvent.id))]


def _move(settings, series_id: int, qc_state: str) -> None:
    from corelab.lifecycle import move

    with session_scope(settings) as s:
        move(s, s.get(Series, series_id), qc_state=qc_state, actor="test", reason="as a run would")


def test_a_sheet_waits_while_an_accreditation_is_queued_or_running_and_only_a_claimed_series_is_started(
        settings, drop, monkeypatch, capsys, tmp_path):
    from corelab.db import open_store
    from corelab.fill_sheets import BUSY
    from corelab.series_completion import claim_qc
    from flows.cli import main
    from services import phantoms
    from tasks.phantoms import accredit_phantom

    out, nema, cyl = drop
    _prepare(settings, monkeypatch)
    series_id = _phantom_without_sheet(settings, out, nema, tmp_path)
    with session_scope(settings) as s:
        folder = series_dir(settings, s.get(Series, series_id), s)
    sheet = out / nema["phantom"]["fill_sheet"]
    assert claim_qc(open_store(settings), series_id, actor="test")  # the node handed it out: queued
    for state in ("queued", "running"):
        if state == "running":
            _move(settings, series_id, "running")
        assert main(["phantom", "fill", nema["series_uid"], str(sheet), "--qc", "queue"]) == 2
        err = capsys.readouterr().err
        assert BUSY in err and "nothing was changed" in err, err
        assert _phantom_series(settings)[series_id].qc_state == state
    assert not (folder / "fill.yaml").exists() and _fill_events(settings) == []

    # the run ends (failed: no sheet); the sheet is taken and the series pending again, in one transaction
    _move(settings, series_id, "failed")
    with session_scope(settings) as s:
        result = phantoms.attach_fill_sheet(s, settings, series_id, sheet.read_bytes(), actor="phys")
    assert result["qc_state"] == "pending" and result["requeued"]
    assert _qc_events(settings, nema["series_uid"])[-1] == ("failed", "pending")
    # another starter (the node's ticker) claims it first: hand_over starts nothing beside it
    started: list[int] = []
    assert claim_qc(open_store(settings), series_id, actor="receiver")
    assert phantoms.hand_over(settings, result, started.append) is False and started == []
    assert _phantom_series(settings)[series_id].qc_state == "queued"
    # a pending series it claims itself is handed over, once
    _move(settings, series_id, "failed")
    with session_scope(settings) as s:
        result = phantoms.attach_fill_sheet(s, settings, series_id, sheet.read_bytes(), actor="phys")
    assert phantoms.hand_over(settings, result, started.append) is True and started == [series_id]
    assert phantoms.hand_over(settings, result, started.append) is False and started == [series_id]

    # a re-check of a failed series runs as "running" (so a sheet given meanwhile waits for it)
    cyl_id = _phantom_without_sheet(settings, out, cyl, tmp_path)
    _move(settings, cyl_id, "failed")
    answer = accredit_phantom.fn(cyl_id, cyl["series_uid"], "EARL1", TRIAL, "A01-1")
    assert answer["awaiting_fill_sheet"] and _phantom_series(settings)[cyl_id].qc_state == "failed"
    assert _qc_events(settings, cyl["series_uid"])[-2:] == [("failed", "running"), ("running", "failed")]


def test_a_sheet_given_in_a_transaction_that_rolls_back_leaves_the_old_one_and_no_event(settings, drop,
                                                                                      monkeypatch, tmp_path):
    from services import phantoms

    out, nema, _ = drop
    _prepare(settings, monkeypatch)
    series_id = _phantom_without_sheet(settings, out, nema, tmp_path)
    with session_scope(settings) as s:
        folder = series_dir(settings, s.get(Series, series_id), s)
    good = (out / nema["phantom"]["fill_sheet"]).read_bytes()
    _move(settings, series_id, "failed")
    events = len(_qc_events(settings, nema["series_uid"]))

    class Boom(RuntimeError):
        pass

    # no sheet before: none after
    with pytest.raises(Boom):
        with session_scope(settings) as s:
            phantoms.attach_fill_sheet(s, settings, series_id, good, actor="phys")
            assert (folder / "fill.yaml").read_bytes() == good  # written before the commit ...
            raise Boom
    assert not (folder / "fill.yaml").exists() and _fill_events(settings) == []  # ... and removed by the rollback
    assert _phantom_series(settings)[series_id].qc_state == "failed"
    assert len(_qc_events(settings, nema["series_uid"])) == events
    # a sheet replaced in a transaction that rolls back: the old one is back, byte for byte
    with session_scope(settings) as s:
        phantoms.attach_fill_sheet(s, settings, series_id, good, actor="phys")
    _move(settings, series_id, "done")
    for _ in range(2):  # twice in one transaction: the first sheet is what is left
        with pytest.raises(Boom):
            with session_scope(settings) as s:
                phantoms.attach_fill_sheet(s, settings, series_id, good + b"# one\n", actor="phys")
                phantoms.attach_fill_sheet(s, settings, series_id, good + b"# two\n", actor="phys")
                assert (folder / "fill.yaml").read_bytes() == good + b"# two\n"
                raise Boom
    assert (folder / "fill.yaml").read_bytes() == good
    assert len(_fill_events(settings)) == 1 and _phantom_series(settings)[series_id].qc_state == "done"
    assert sorted(p.name for p in folder.iterdir() if "fill" in p.name) == ["fill.yaml"]  # no temporary left


def _redrop(settings, out: Path, meta: dict, tmp_path: Path, name: str, sheet: bytes | None):
    """The phantom series dropped again (all its objects duplicates), with ``sheet`` as its X.fill.yaml."""
    folder = tmp_path / name / Path(meta["path"]).name
    shutil.copytree(out / meta["path"], folder)
    if sheet is not None:
        folder.with_name(folder.name + ".fill.yaml").write_bytes(sheet)
    with session_scope(settings) as s:
        summary = ingest_path(s, settings, folder.parent, site_code="A01")
    assert {o.status for o in summary.outcomes} == {"duplicate"}
    return summary


def _ignored(settings) -> list[AuditEvent]:
    with session_scope(settings) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == "phantom.fill_sheet_ignored")
                           .order_by(AuditEvent.id)))


def test_a_redrop_with_its_fill_sheet_takes_the_route_of_phantom_fill(settings, drop, monkeypatch, tmp_path):
    from pydicom.uid import generate_uid

    from synth.small_series import pet_slice
    from tasks.phantoms import accredit_phantom

    out, nema, cyl = drop
    _prepare(settings, monkeypatch)
    series_id = _phantom_without_sheet(settings, out, nema, tmp_path)
    with session_scope(settings) as s:
        folder = series_dir(settings, s.get(Series, series_id), s)
    assert accredit_phantom.fn(series_id, nema["series_uid"], "EARL1", TRIAL, "A01-1")["awaiting_fill_sheet"]
    assert _phantom_series(settings)[series_id].qc_state == "failed"
    good = (out / nema["phantom"]["fill_sheet"]).read_bytes()
    n = len(list((out / nema["path"]).glob("*.dcm")))
    assert n > 1

    # a malformed sheet is checked and not kept: said once (not per object), the series still waits
    _redrop(settings, out, nema, tmp_path, "bad", b"kind: nema_iec\nsphere_kbq_ml: [20\n")
    [ignored] = _ignored(settings)
    assert ignored.actor == "ingest" and "not valid YAML" in ignored.detail["why"]
    assert not (folder / "fill.yaml").exists() and _phantom_series(settings)[series_id].qc_state == "failed"
    # the right sheet: written, audited by "ingest" once, the failed series re-queued
    _redrop(settings, out, nema, tmp_path, "good", good)
    assert (folder / "fill.yaml").read_bytes() == good
    [event] = _fill_events(settings)
    assert event.actor == "ingest" and event.detail["sha256"] == hashlib.sha256(good).hexdigest()
    assert _phantom_series(settings)[series_id].qc_state == "pending"
    assert _qc_events(settings, nema["series_uid"])[-1] == ("failed", "pending")
    # the same sheet again is no news; another one does not replace it (that is the physicist's)
    _redrop(settings, out, nema, tmp_path, "same", good)
    assert len(_fill_events(settings)) == 1 and len(_ignored(settings)) == 1
    _redrop(settings, out, nema, tmp_path, "other", good + b"# other values\n")
    assert (folder / "fill.yaml").read_bytes() == good and len(_fill_events(settings)) == 1
    assert "replacing it is for the core lab's physicist" in _ignored(settings)[-1].detail["why"]
    # a series the node queued, its run not started, takes the sheet its re-drop brings and stays queued
    from corelab.db import open_store
    from corelab.series_completion import claim_qc
    cyl_id = _phantom_without_sheet(settings, out, cyl, tmp_path)
    assert claim_qc(open_store(settings), cyl_id, actor="receiver")
    cyl_sheet = (out / cyl["phantom"]["fill_sheet"]).read_bytes()
    _redrop(settings, out, cyl, tmp_path, "queued", cyl_sheet)
    with session_scope(settings) as s:
        assert (series_dir(settings, s.get(Series, cyl_id), s) / "fill.yaml").read_bytes() == cyl_sheet
    assert _phantom_series(settings)[cyl_id].qc_state == "queued" and len(_fill_events(settings)) == 2

    # a trial series (it has a visit) dropped again with a fill sheet stays a trial series, without it
    trial_dir = tmp_path / "trial" / "pet"
    trial_dir.mkdir(parents=True)
    study, uid, frame = generate_uid(), generate_uid(), generate_uid()
    for i in range(2):
        ds = pet_slice(study=study, series=uid, frame=frame, pixels=bytes(8 * 8 * 2), matrix=8, index=i, n=2)
        ds.ClinicalTrialProtocolID, ds.ClinicalTrialSubjectID, ds.ClinicalTrialTimePointID = TRIAL, "A01-001", "BL"
        ds.PatientID = ds.PatientName = "A01-001"
        ds.save_as(trial_dir / f"{i}.dcm", enforce_file_format=True)
    with session_scope(settings) as s:
        ingest_path(s, settings, trial_dir.parent, site_code="A01")
    (trial_dir.parent / "pet.fill.yaml").write_bytes(good)
    with session_scope(settings) as s:
        summary = ingest_path(s, settings, trial_dir.parent, site_code="A01")
        assert {o.status for o in summary.outcomes} == {"duplicate"}
        series = s.exec(select(Series).where(Series.series_uid == uid)).one()
        from corelab.models import Study
        assert series.kind == "trial" and s.get(Study, series.study_id).visit_id is not None
        assert not (series_dir(settings, series, s) / "fill.yaml").exists()
    assert "is not a phantom scan" in _ignored(settings)[-1].detail["why"]


def test_the_default_accreditation_leaves_out_series_that_failed_awaiting_their_sheet(settings, drop, monkeypatch,
                                                                                     tmp_path):
    from services import phantoms
    from tasks.phantoms import accredit_phantom, find_phantom_series

    out, nema, cyl = drop
    _prepare(settings, monkeypatch)
    ids = {m["series_uid"]: _phantom_without_sheet(settings, out, m, tmp_path) for m in (nema, cyl)}
    found = lambda: {uid for _, uid, _ in find_phantom_series.fn()}  # noqa: E731
    assert found() == set(ids)  # never analysed: the first run finds the sheet missing, fails and alerts
    accredit_phantom.fn(ids[nema["series_uid"]], nema["series_uid"], "EARL1", TRIAL, "A01-1")
    assert _phantom_series(settings)[ids[nema["series_uid"]]].qc_state == "failed"
    assert found() == {cyl["series_uid"]}  # not again at every run: it waits on the worklist
    assert {uid for _, uid, _ in find_phantom_series.fn(pending_only=False)} == set(ids)
    with session_scope(settings) as s:  # its sheet puts it back
        phantoms.attach_fill_sheet(s, settings, ids[nema["series_uid"]],
                                   (out / nema["phantom"]["fill_sheet"]).read_bytes(), actor="phys")
    assert found() == set(ids)


def test_the_portal_refuses_a_form_over_its_limit_before_reading_it(settings, drop, monkeypatch, tmp_path):
    from portal.app import create_app
    from portal.body_limit import MAX_FORM_BYTES
    from services import accounts
    from tests.portal_helpers import PASSWORD, client_for, csrf_of

    out, nema, _ = drop
    _prepare(settings, monkeypatch)
    with session_scope(settings) as s:
        accounts.add_user(s, "site-a", role="site", sites=["A01"], full_name="site-a", password=PASSWORD, actor="test")
    series_id = _phantom_without_sheet(settings, out, nema, tmp_path)
    app = create_app(settings)
    site_a = client_for(app, "site-a")
    token = csrf_of(site_a.get(f"/series/{series_id}").text)
    url = f"/series/{series_id}/fill-sheet"
    assert MAX_FORM_BYTES == 2 * MAX_FILL_SHEET_BYTES + 64 * 1024
    # not multipart at all: were it parsed first, it would be a 400; its size answers first
    junk = b"x" * (MAX_FORM_BYTES + 1)
    for client in (site_a, client_for(app, None)):
        response = client.post(url, content=junk, headers={"Content-Type": "multipart/form-data; boundary=zz",
                                                           "X-CSRF-Token": token}, follow_redirects=False)
        assert response.status_code == 413, response.text
        assert f"over the limit of {MAX_FORM_BYTES} bytes" in response.text and "nothing was changed" in response.text
    # a body of unknown length (chunked) is not read either
    response = site_a.post(url, content=iter([b"text=kind%3A+nema_iec"]), follow_redirects=False,
                           headers={"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": token})
    assert response.status_code == 411 and "Content-Length" in response.text
    with session_scope(settings) as s:
        assert not (series_dir(settings, s.get(Series, series_id), s) / "fill.yaml").exists()
    # at the limit it is read (and the sheet's own limit answers)
    good = (out / nema["phantom"]["fill_sheet"]).read_bytes()
    fine = site_a.post(url, data={"csrf_token": token}, files={"file": ("f.yaml", good, "text/yaml")})
    assert fine.status_code == 200 and "Fill sheet (nema_iec" in fine.text
