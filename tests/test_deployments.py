"""prefect.yaml names real flows with parameters they accept."""

import importlib
import inspect
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_is_a_flow_taking_its_parameters():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert {d["name"] for d in doc["deployments"]} >= {"demo", "qc-trial", "accredit-scanners"}
    for dep in doc["deployments"]:
        path, name = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file()
        obj = getattr(importlib.import_module(path[:-3].replace("/", ".")), name)
        assert isinstance(obj, Flow), dep["entrypoint"]
        accepted = set(inspect.signature(obj.fn).parameters)
        assert set(dep.get("parameters", {})) <= accepted, dep["name"]
        assert dep["work_pool"]["name"] == "corelab-process"
