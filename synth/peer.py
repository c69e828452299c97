"""The peer tool pynemaiqpet, run in a virtual environment of its own (it needs pydicom < 3; corelab
pins 3.0): for the peer comparison test and the phantom benchmark.

The environment is created on first use under ``~/.cache/corelab-bench/pynemaiqpet-venv``
(override with ``CORELAB_BENCH_PEER_VENV``). The peer runs as its command-line tool ``wb_nema_iq``
does: ``fit_WB_NEMA_sphere_profiles(vol, voxsize, sameSignal=True, Rfix=[18.5 ... 5.0], dfix=1.5)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["PEER_REQUIREMENTS", "peer_venv", "ensure_peer", "run_peer"]

PEER_REQUIREMENTS = ("pynemaiqpet==0.5.4", "pydicom<3")

_PEER_SCRIPT = r'''
import json, sys, time, statistics
import matplotlib
matplotlib.use("Agg")
import numpy as np
import pymirc.fileio as pmf
from pynemaiqpet.nema_wb import fit_WB_NEMA_sphere_profiles

repeats, jobs = int(sys.argv[1]), sys.argv[2:]
radii = [18.5, 14.0, 11.0, 8.5, 6.5, 5.0]

def load(folder):
    dcm = pmf.DicomVolume(folder + "/*.dcm")
    return dcm.get_data(), dcm.voxsize

def analyse(vol, voxsize):
    return fit_WB_NEMA_sphere_profiles(vol, voxsize, sameSignal=True, Rfix=radii, dfix=1.5)[1]

for folder, true_bq_ml in zip(jobs[::2], map(float, jobs[1::2])):
    t_load, t_fit = [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); vol, voxsize = load(folder); t1 = time.perf_counter()
        res = analyse(vol, voxsize); t2 = time.perf_counter()
        t_load.append(t1 - t0); t_fit.append(t2 - t1)
    rows = [{"diameter_mm": round(2 * float(r)), "rc_mean": float(a) / true_bq_ml, "rc_max": float(m) / true_bq_ml}
            for r, a, m in zip(res["R"], res["mean_a50"], res["max"])]
    print(json.dumps({"folder": folder, "load_s": statistics.median(t_load), "analysis_s": statistics.median(t_fit),
                      "spheres": rows}), flush=True)
'''


def peer_venv() -> Path:
    return Path(os.environ.get("CORELAB_BENCH_PEER_VENV",
                               Path.home() / ".cache" / "corelab-bench" / "pynemaiqpet-venv"))


def ensure_peer(venv: Path | None = None) -> Path:
    """The peer's Python, creating its virtual environment on first use."""
    venv = venv or peer_venv()
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import pynemaiqpet, pymirc, pydicom; assert int(pydicom.__version__[0]) < 3"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating the pynemaiqpet environment in {venv} (first use) ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True)
    subprocess.run(probe, check=True)
    return python


def run_peer(series: list[tuple[Path, float]], *, repeats: int = 1, python: Path | None = None) -> list[dict]:
    """Analyse DICOM series folders with pynemaiqpet, in its own environment, in one process.

    Parameters
    ----------
    series : list of (folder, true sphere concentration in Bq/mL)
    repeats : int
        Analyses per series (the times returned are medians).
    python : Path, optional
        The peer's Python (default: :func:`ensure_peer`).

    Returns
    -------
    list of dict
        Per series, in order: ``folder``, ``load_s``, ``analysis_s`` and ``spheres``
        (``[{"diameter_mm", "rc_mean", "rc_max"}]``, the peer's A50 mean and max over the true
        concentration, in the peer's own order: the spheres it finds, largest first).
    """
    python = python or ensure_peer()
    args = [str(repeats)] + [v for folder, bq_ml in series for v in (str(folder), repr(float(bq_ml)))]
    proc = subprocess.run([str(python), "-c", _PEER_SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    if proc.returncode != 0:
        raise RuntimeError(f"pynemaiqpet failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
