"""prefect.yaml names real flows with parameters they accept."""

import datetime as dt
import importlib
import inspect
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_is_a_flow_taking_its_parameters():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert {d["name"] for d in doc["deployments"]} >= {"demo", "qc-trial", "accredit-scanners", "forward-to-archive"}
    for dep in doc["deployments"]:
        path, name = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file()
        obj = getattr(importlib.import_module(path[:-3].replace("/", ".")), name)
        assert isinstance(obj, Flow), dep["entrypoint"]
        accepted = set(inspect.signature(obj.fn).parameters)
        assert set(dep.get("parameters", {})) <= accepted, dep["name"]
        assert dep["work_pool"]["name"] == "corelab-process"


def test_nightly_deployment_is_scheduled_and_never_overlaps():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    nightly = next(d for d in doc["deployments"] if d["name"] == "nightly-qc")
    assert nightly["entrypoint"] == "flows/nightly.py:nightly_qc"
    assert nightly["schedules"] == [{"cron": "30 2 * * *", "timezone": "Europe/London", "active": True}]
    assert nightly["concurrency_limit"] == 1


def test_corelab_serve_serves_the_prefect_yaml_deployments():
    """``corelab serve`` builds its deployments from prefect.yaml: same names, parameters, schedules
    and limits, with module entrypoints (importable from any working directory)."""
    from flows.serve import deployment_specs, runner_deployments

    specs = deployment_specs()
    served = {d.name: d for d in runner_deployments(specs)}
    assert set(served) == {s["name"] for s in specs}
    for spec in specs:
        dep = served[spec["name"]]
        module, fn = spec["entrypoint"].split(":")
        assert dep.entrypoint == f"{module[:-3].replace('/', '.')}.{fn}"
        assert dep.parameters == spec.get("parameters", {})
        limit = dep.concurrency_limit
        assert (limit if isinstance(limit, int) or limit is None else limit.limit) == spec.get("concurrency_limit")
        assert [(getattr(s.schedule, "cron", None), getattr(s.schedule, "interval", None), s.active)
                for s in dep.schedules or []] == \
            [(s.get("cron"), dt.timedelta(seconds=s["interval"]) if "interval" in s else None, s["active"])
             for s in spec.get("schedules", [])]
        assert [getattr(s.schedule, "timezone", None) for s in dep.schedules or [] if hasattr(s.schedule, "cron")] \
            == [s["timezone"] for s in spec.get("schedules", []) if "cron" in s]
        assert not dep.paused
