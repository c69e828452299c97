"""The demo's synthetic data: its trial and the score of what the pipeline found against its truth.

The synthetic trial is test and demo data, not the product, so of the product only ``flows/``
reaches it (``tests/test_layout.py``): these plain functions and the two thin tasks over them
live here rather than in ``services/`` and ``tasks/``. Everything else the demo does is an
ordinary use case (``services/``) behind an ordinary task.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

from prefect import task

from corelab.db import session_scope
from corelab.queries import deviation_rows, quarantine_rows
from corelab.settings import load_settings


def demo_first_scan_date(today: dt.date | None = None) -> str:
    """The demo's trial starts three weeks ago, so its phantom scans (three weeks before that)
    fall inside the quarterly calibration cadence and the scanners are accredited today."""
    return ((today or dt.date.today()) - dt.timedelta(days=21)).isoformat()


def synthesize_demo_trial(outdir: Path | str, seed: int, first_scan_date: str) -> dict:
    """Generate the demo trial, or reuse the identical one a previous demo run generated."""
    from synth.problems import GroundTruth
    from synth.spec import TrialSpec
    from synth.trial import generate_trial

    spec = dataclasses.replace(TrialSpec.demo(), first_scan_date=first_scan_date)
    if (Path(outdir) / "ground_truth.json").is_file():
        truth = GroundTruth.load(outdir)
        if truth.data["seed"] != seed or truth.data["spec"] != json.loads(json.dumps(spec.to_dict())):
            raise RuntimeError(f"{outdir} holds another synthetic trial; move it away or use another data dir")
    else:
        truth = generate_trial(Path(outdir), spec, seed=seed)
    register = truth.data["register"]
    return {"outdir": str(outdir), "register": str(Path(outdir) / "register.yaml"),
            "trial": register["trial_code"], "sites": [s["code"] for s in register["sites"]]}


def synthesize_trial(outdir: Path | str, *, seed: int = 0, spec_path: Path | str | None = None,
                     first_scan_date: str | None = None) -> dict:
    """Write a synthetic multi-site trial with its ground truth (``corelab synth``).

    Parameters
    ----------
    first_scan_date : str, optional
        ``YYYY-MM-DD`` of the first trial scan. Default: the spec file's ``first_scan_date`` if it
        names one, else :func:`demo_first_scan_date` (21 days ago, as the demo: the phantoms fall
        inside the calibration cadence and the accreditations read current, not long expired).
        The same seed and the same date give the same bytes.

    Raises
    ------
    ValueError
        ``first_scan_date`` is not an ISO date (the message quotes it).
    """
    import yaml

    from synth.spec import TrialSpec
    from synth.trial import generate_trial

    outdir = Path(outdir)
    spec = TrialSpec.from_yaml(spec_path) if spec_path else TrialSpec.demo()
    if first_scan_date is None and spec_path and "first_scan_date" in (yaml.safe_load(Path(spec_path).read_text())
                                                                        or {}):
        first_scan_date = spec.first_scan_date  # the spec file dates its own trial
    if first_scan_date is not None:
        try:
            dt.date.fromisoformat(first_scan_date)
        except ValueError:
            raise ValueError(f"--date {first_scan_date!r} is not a date; use YYYY-MM-DD") from None
    spec = dataclasses.replace(spec, first_scan_date=first_scan_date or demo_first_scan_date())
    truth = generate_trial(outdir, spec, seed=seed)
    return {"outdir": str(outdir.absolute()), "trial": truth.data["trial_code"], "seed": seed,
            "first_scan_date": spec.first_scan_date,
            "series": len(truth.series), "files": sum(s["n_files"] for s in truth.series),
            "problems": sorted({p["code"] for p in truth.problems}),
            "ground_truth": str((outdir / "ground_truth.json").absolute()),
            "register": str((outdir / "register.yaml").absolute())}


def score_against_truth(session, ground_truth_path: Path | str, trial_code: str) -> dict:
    """How many injected problems the pipeline found, missed, or reported without cause."""
    from synth.truth import score

    truth = json.loads(Path(ground_truth_path).read_text())
    return score(truth, deviation_rows(session, trial_code=trial_code),
                 quarantine_rows(session, include_released=True)).as_dict()


@task(name="synthesize-trial", task_run_name="synthesize trial seed {seed}")
def synthesize(outdir: str, seed: int, first_scan_date: str) -> dict:
    """Generate the demo trial, or reuse the identical one a previous demo run generated."""
    return synthesize_demo_trial(outdir, seed, first_scan_date)


@task(name="score-against-truth", task_run_name="score {trial_code} against ground truth")
def score_demo(ground_truth_path: str, trial_code: str) -> dict:
    """How many injected problems the pipeline found, missed, or reported without cause."""
    with session_scope(load_settings()) as session:
        return score_against_truth(session, ground_truth_path, trial_code)
