"""Runs and artifacts a physicist can read (issue 16, point 3).

The real QC flow runs on a small lab under the Prefect test harness; the run and task names and
the deviation table are read back from the Prefect API. The Data Docs it writes are then read
through the real portal, as each role.
"""

from __future__ import annotations

import json
import os

import pytest
from sqlmodel import select

from corelab.db import session_scope
from corelab.models import Series, Trial
from corelab.queries import deviation_rows
from portal.app import create_app
from portal.datadocs_views import DATA_DOCS_CSP
from services import accounts
from services.datadocs import data_docs_site, gx_project_dir
from tests.portal_helpers import PASSWORD, build_portal_lab, client_for, planted_identifiers

pytestmark = pytest.mark.prefect

OTHER = "OTHER-02"  # a second trial, with Data Docs of its own and a manager of its own
COLUMNS = ["site", "subject", "visit", "rule", "severity", "expected", "observed", "status", "manual section",
           "deviation", "series"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = build_portal_lab(tmp_path_factory.mktemp("readable"))
    with session_scope(lab.settings) as s:
        s.add(Trial(code=OTHER, title="another trial"))
    with session_scope(lab.settings) as s:
        accounts.add_user(s, "tm-other", role="trial-manager", trials=[OTHER], full_name="Other Manager",
                          password=PASSWORD, actor="test")
    site = data_docs_site(lab.settings, OTHER)
    (site / "validations").mkdir(parents=True)
    (site / "index.html").write_text("<html><body>docs of the other trial</body></html>")
    return lab


def _pet(lab, site: str, *, with_problems: bool) -> list[dict]:
    """Trial PET series of ``site`` that the store holds complete (as the ground truth describes them)."""
    from expectations.qc import trial_pet_series

    with session_scope(lab.settings) as s:
        stored = {x.series_uid for x in trial_pet_series(s, lab.trial)}
    return [s for s in lab.truth["series"] if s["kind"] == "trial" and s["modality"] == "PT" and s["site"] == site
            and bool(s["problems"]) == with_problems and s["series_uid"] in stored]


def _ids(lab, uids: list[str]) -> list[int]:
    with session_scope(lab.settings) as s:
        by_uid = {x.series_uid: x.id for x in s.exec(select(Series).where(Series.series_uid.in_(uids)))}
    return [by_uid[u] for u in uids]


@pytest.fixture(scope="module")
def runs(lab, prefect_harness):
    """Three QC runs: one series, three series, every series of the trial; per run its flow run,
    task runs and artifacts as the Prefect API holds them."""
    from prefect import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId)

    from flows.qc import qc_trial

    one = _pet(lab, "A01", with_problems=True)[0]
    three = _pet(lab, "A01", with_problems=False)[:1] + _pet(lab, "B02", with_problems=True)[:2]
    old = os.environ.get("CORELAB_DATA_DIR")
    os.environ["CORELAB_DATA_DIR"] = str(lab.settings.data_dir)  # the flow and its tasks load the settings
    try:
        states = {"one": qc_trial(lab.trial, series_ids=_ids(lab, [one["series_uid"]]), return_state=True),
                  "three": qc_trial(lab.trial, series_ids=_ids(lab, [s["series_uid"] for s in three]),
                                    return_state=True),
                  "all": qc_trial(lab.trial, pending_only=False, return_state=True)}
    finally:
        if old is None:
            os.environ.pop("CORELAB_DATA_DIR", None)
        else:
            os.environ["CORELAB_DATA_DIR"] = old
    out = {"truth": {"one": [one], "three": three}}
    with get_client(sync_client=True) as client:
        for key, state in states.items():
            assert state.is_completed(), f"the {key} QC run ended {state.type}"
            run_id = state.state_details.flow_run_id
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            out[key] = {"summary": state.result(), "flow_run": client.read_flow_run(run_id),
                        "task_runs": client.read_task_runs(flow_run_filter=FlowRunFilter(
                            id=FlowRunFilterId(any_=[run_id]))),
                        "artifacts": {a.key: a for a in artifacts}}
    return out


def test_a_one_series_run_and_its_task_are_named_after_the_scan(lab, runs):
    s = runs["truth"]["one"][0]
    want = f"qc {lab.trial} {s['site']} {s['subject']} {s['visit']} PT"
    assert runs["one"]["flow_run"].name == want
    batch = [t.name for t in runs["one"]["task_runs"] if t.task_key.startswith("qc_batch")]
    assert batch == [want]
    names = [runs[k]["flow_run"].name for k in ("one", "three", "all")]
    assert not any(part in name.upper() for name in names for part in planted_identifiers(lab.truth))


def test_a_run_of_several_series_names_them_within_bounds(lab, runs):
    three = runs["truth"]["three"]
    name = runs["three"]["flow_run"].name
    scans = sorted(f"{s['site']} {s['subject']} {s['visit']}" for s in three)
    head = f"qc {lab.trial}: 3 series, "
    assert name.startswith(head) and len(name) <= 100
    listed = name[len(head):].split(", ")
    more = int(listed.pop()[1:-len(" more")]) if listed[-1].startswith("+") else 0
    assert listed == scans[:len(listed)] and len(listed) >= 1 and len(listed) + more == 3
    everything = runs["all"]["flow_run"].name
    n_pet = sum(len(_pet(lab, site, with_problems=p)) for site in ("A01", "B02", "C03") for p in (True, False))
    assert everything == f"qc {lab.trial}: all series" and runs["all"]["summary"]["series"] == n_pet
    [batch] = [t.name for t in runs["all"]["task_runs"] if t.task_key.startswith("qc_batch")]
    per_site = {site: len(_pet(lab, site, with_problems=True)) + len(_pet(lab, site, with_problems=False))
                for site in ("A01", "B02", "C03")}
    assert batch == f"qc {lab.trial}: {n_pet} series, " + ", ".join(f"{k} ({n})" for k, n in per_site.items() if n)
    assert all(len(r["flow_run"].name) <= 100 for r in (runs["one"], runs["three"], runs["all"]))


def test_deviation_table_reads_first_and_equals_the_store(lab, runs):
    for key in ("one", "three", "all"):
        artifact = runs[key]["artifacts"][f"deviations-{lab.trial.lower()}"]
        table = json.loads(artifact.data)
        assert table and all(list(row) == COLUMNS for row in table)
        uids = {f["series_uid"] for f in runs[key]["summary"]["findings"]}
        with session_scope(lab.settings) as s:
            stored = [d for d in deviation_rows(s, trial_code=lab.trial) if d["series_uid"] in uids]
        want = sorted((d["site"], d["subject"], d["visit"], d["rule_id"], d["severity"], d["expected"], d["observed"],
                       d["status"], d["manual_section"], d["id"], "..." + d["series_uid"][-12:]) for d in stored)
        assert sorted(tuple(row.values()) for row in table) == want
        assert all(len(row["series"]) == 15 for row in table)


def test_data_docs_link_points_to_the_portal_and_says_where_the_files_are(lab, runs):
    link = runs["one"]["artifacts"][f"data-docs-{lab.trial.lower()}"]
    assert link.data == f"[Data Docs of {lab.trial}]({lab.settings.public_url}/datadocs/{lab.trial}/)"
    site = data_docs_site(lab.settings, lab.trial)
    assert str(site.resolve()) in link.description and (site / "index.html").is_file()
    assert runs["one"]["summary"]["data_docs"] == str(site / "index.html")


@pytest.fixture(scope="module")
def clients(lab, runs):
    app = create_app(lab.settings)
    return {name: client_for(app, name) for name in ("phys", "site-a", "tm", "tm-other")}


def test_a_physicist_reads_the_data_docs_through_the_portal(lab, clients):
    phys = clients["phys"]
    contents = phys.get(f"/datadocs/{lab.trial}/")
    assert contents.status_code == 200 and contents.headers["content-type"].startswith("text/html")
    site = data_docs_site(lab.settings, lab.trial)
    pages = sorted(p.relative_to(site).as_posix() for p in site.glob("validations/**/*.html"))
    assert len(pages) == 3 and all(f'href="{p}"' in contents.text for p in pages)  # one per QC run
    names = planted_identifiers(lab.truth)
    for path in pages + ["index.html", "static/styles/data_docs_default_styles.css"]:
        r = phys.get(f"/datadocs/{lab.trial}/{path}")
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == DATA_DOCS_CSP
        assert r.headers["content-type"].startswith("text/css" if path.endswith(".css") else "text/html")
        assert not any(n in r.text.upper() for n in names), f"{path} shows a planted patient name"
    validation = phys.get(f"/datadocs/{lab.trial}/{pages[-1]}").text
    assert lab.trial in validation and "scanner_accredited" in validation


def test_a_site_user_may_not_read_data_docs(lab, clients):
    for path in ("", "index.html"):
        assert clients["site-a"].get(f"/datadocs/{lab.trial}/{path}").status_code == 403


def test_paths_outside_the_trials_docs_folder_are_not_served(lab, clients):
    phys = clients["phys"]
    project = gx_project_dir(lab.settings, lab.trial)
    outside = project / "gx" / "great_expectations.yml"  # three levels above the docs folder
    secret = outside.read_text()[:200]
    assert secret.strip()
    site = data_docs_site(lab.settings, lab.trial)
    (site / "notes.txt").write_text("not a docs file")
    (site / "link.html").symlink_to(outside)
    base = f"/datadocs/{lab.trial}"
    for path in ("../../../great_expectations.yml", "%2e%2e/%2e%2e/%2e%2e/great_expectations.yml",
                 "%2E%2E%2F%2E%2E%2F%2E%2E%2Fgreat_expectations.yml", f"/{outside}", f"%2F{str(outside)[1:]}",
                 "..%5C..%5C..%5Cgreat_expectations.yml", "notes.txt", "link.html", "nothing.html",
                 f"../../../../../{OTHER}/gx/uncommitted/data_docs/local_site/index.html",
                 "%2e%2e/" * 5 + f"{OTHER}/gx/uncommitted/data_docs/local_site/index.html"):
        r = phys.get(f"{base}/{path}")
        assert r.status_code == 404, f"{path}: {r.status_code}"
        assert secret not in r.text and "docs of the other trial" not in r.text
    assert phys.get(f"{base}/index.html").status_code == 200  # the same client is not refused wholesale


def test_another_trials_docs_only_for_its_readers(lab, clients):
    assert clients["phys"].get(f"/datadocs/{OTHER}/index.html").status_code == 200
    other = clients["tm-other"].get(f"/datadocs/{OTHER}/index.html")
    assert other.status_code == 200 and "docs of the other trial" in other.text
    assert clients["tm"].get(f"/datadocs/{OTHER}/index.html").status_code == 404
    assert clients["tm"].get(f"/datadocs/{OTHER}/").status_code == 404
    assert clients["tm-other"].get(f"/datadocs/{lab.trial}/").status_code == 404
    assert clients["tm"].get(f"/datadocs/{lab.trial}/").status_code == 200
    assert clients["phys"].get("/datadocs/NO-SUCH-TRIAL/").status_code == 404


def test_a_received_series_handed_to_the_deployment_is_named_before_a_worker_takes_it(lab, runs):
    """``corelab receive --qc deployment``: the flow run waits for a worker under the scan's name."""
    from uuid import UUID

    from prefect import get_client

    from flows.receive import QC_DEPLOYMENT, QcStarter

    s = runs["truth"]["one"][0]
    flow_name, deployment_name = QC_DEPLOYMENT.split("/")
    with get_client(sync_client=True) as client:
        client.create_deployment(flow_id=client.create_flow_from_name(flow_name), name=deployment_name,
                                 entrypoint="flows/qc.py:qc_trial")
        [started] = QcStarter(lab.settings, mode="deployment").run(_ids(lab, [s["series_uid"]]))
        run = client.read_flow_run(UUID(started["flow_run_id"]))
    assert run.name == f"qc {lab.trial} {s['site']} {s['subject']} {s['visit']} PT"
    assert run.state.is_scheduled()  # no worker here: the name is the one given at the start
