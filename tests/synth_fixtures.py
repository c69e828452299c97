"""Shared helpers for the DICOM I/O and synthetic-trial tests (imported, not a conftest).

The ``trial`` and ``headers`` fixtures serve tests/test_synth.py and tests/test_synth_problems.py:
import them by name (module scope: each test module generates its own trial).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from synth.problems import GroundTruth
from synth.spec import small_spec
from synth.trial import generate_trial

DCIODVFY = shutil.which("dciodvfy")
DCENTVFY = shutil.which("dcentvfy")

SEED = 7
SERIES_LEVEL = ("uptake_out_of_window", "missing_weight", "wrong_units", "dose_in_mbq",
                "patient_name_in_header", "missing_slice")


def series_files(outdir: Path, entry: dict) -> list[Path]:
    return sorted((outdir / entry["path"]).glob("*.dcm"))


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for one file (it exits 1 when there are any)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    if proc.returncode != 0 and not errors:
        errors = [f"dciodvfy exit {proc.returncode}"]
    return errors


def dcentvfy_errors(paths: list[Path]) -> list[str]:
    proc = subprocess.run([DCENTVFY, *map(str, paths)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def parse_dicom_datetime(date: str, time: str) -> dt.datetime:
    """DA + TM (with or without a fraction) as a naive datetime."""
    time = time.strip()
    whole, _, frac = time.partition(".")
    base = dt.datetime.strptime(date.strip() + whole, "%Y%m%d%H%M%S")
    return base + dt.timedelta(microseconds=int((frac + "000000")[:6]) if frac else 0)


def injection_and_start(ds: pydicom.Dataset) -> tuple[dt.datetime, dt.datetime]:
    """Injection (RadiopharmaceuticalStartDateTime) and series start datetimes of a PET file."""
    item = ds.RadiopharmaceuticalInformationSequence[0]
    inj = str(item.RadiopharmaceuticalStartDateTime)
    injection = parse_dicom_datetime(inj[:8], inj[8:])
    start = parse_dicom_datetime(ds.SeriesDate, ds.SeriesTime)
    return injection, start


@pytest.fixture(scope="module")
def trial(tmp_path_factory) -> GroundTruth:
    return generate_trial(tmp_path_factory.mktemp("trial"), small_spec(), seed=SEED)


@pytest.fixture(scope="module")
def headers(trial) -> dict[str, list[pydicom.Dataset]]:
    """Headers of every file, by series UID."""
    return {s["series_uid"]: [pydicom.dcmread(p, stop_before_pixels=True)
                              for p in series_files(trial.outdir, s)] for s in trial.series}
