"""Scale-out: phantom analyses cached by input checksum, and fan-out on a local Dask cluster."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from sqlmodel import func, select

from corelab.db import session_scope
from corelab.ingest import ingest_path
from corelab.models import PhantomResult, Series
from corelab.register import load_register
from expectations.manual import trial_fields
from synth.spec import small_spec
from synth.trial import generate_trial

pytestmark = pytest.mark.prefect


@pytest.fixture
def phantom_store(tmp_path, monkeypatch, prefect_harness):
    monkeypatch.setenv("CORELAB_DATA_DIR", str(tmp_path / "data"))
    from corelab.settings import load_settings

    settings = load_settings()
    spec = dataclasses.replace(small_spec(), first_scan_date=(dt.date.today() - dt.timedelta(days=21)).isoformat())
    generate_trial(tmp_path / "trial", spec, seed=4)
    with session_scope(settings) as session:
        load_register(session, tmp_path / "trial" / "register.yaml", trial_fields=trial_fields)
        for site in ("A01", "B02", "C03"):
            ingest_path(session, settings, tmp_path / "trial" / "sites" / site / "phantoms", site_code=site)
        series = [(s.id, s.series_uid) for s in session.exec(select(Series).where(Series.kind == "phantom"))]
    return settings, series


def _results(settings) -> int:
    with session_scope(settings) as session:
        return session.exec(select(func.count()).select_from(PhantomResult)).one()


def test_a_rerun_does_not_recompute_a_phantom(phantom_store, monkeypatch):
    import tasks.phantoms
    from flows.accredit import accredit_scanners

    settings, series = phantom_store
    calls = []
    real = tasks.phantoms.evaluate_series_folder
    monkeypatch.setattr(tasks.phantoms, "evaluate_series_folder",
                        lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = accredit_scanners(scope="FDG-RESP-01", series=series[:2])
    assert len(calls) == 2 and _results(settings) == 2
    second = accredit_scanners(scope="FDG-RESP-01", series=series[:2])
    assert len(calls) == 2, "a re-run recomputed a cached phantom analysis"
    assert _results(settings) == 2  # and stored nothing twice
    assert [r["verdict"] for r in second] == [r["verdict"] for r in first]


def test_fan_out_on_a_local_dask_cluster(phantom_store):
    from prefect_dask import DaskTaskRunner

    from accreditation.evaluate import evaluate_series_folder
    from corelab.ingest import series_dir
    from flows.accredit import accredit_scanners
    from phantoms.fill import load_fill_sheet

    settings, series = phantom_store
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None})
    results = accredit_scanners.with_options(task_runner=runner)(scope="FDG-RESP-01", series=series)
    assert len(results) == len(series) == _results(settings)
    with session_scope(settings) as session:  # the same verdicts as an analysis in this process
        for r, (sid, _uid) in zip(results, series):
            folder = series_dir(settings, session.get(Series, sid), session)
            assert r["verdict"] == evaluate_series_folder(folder, load_fill_sheet(folder / "fill.yaml")).verdict
