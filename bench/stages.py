"""Throughput of the demo's pipeline stages, each against a reference measured in the same run.

Stages and their references (what the stage cannot be faster than):
  synth   generate the demo trial            vs  pydicom writing the same number of files
  ingest  file drop into spool + store       vs  read, sha256, write+fsync+rename of the same files
  qc      header table + GX for trial PET    vs  pydicom reading the same headers
  phantom analyse the 8 phantom series       vs  loading the same volumes (load_volume)
A ratio is stage time / reference time on this machine, now; it is what to compare across
commits, not the seconds. No Prefect here: the flows' own overhead is measured separately.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from pathlib import Path

import pydicom


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="corelab-bench-"))
    os.environ["CORELAB_DATA_DIR"] = str(work / "data")
    from corelab.db import session_scope
    from corelab.ingest import ingest_path
    from corelab.register import load_register
    from corelab.settings import load_settings
    from expectations.manual import trial_fields
    from synth.spec import TrialSpec
    from synth.trial import generate_trial

    rows = []
    t_gen, truth = _timed(lambda: generate_trial(work / "trial", TrialSpec.demo(), seed=0))
    files = sorted((work / "trial" / "sites").rglob("*.dcm"))
    template = pydicom.dcmread(files[0])

    def write_reference():
        out = work / "ref-write"
        out.mkdir()
        for i in range(len(files)):
            template.save_as(out / f"{i}.dcm")
    rows.append(("synth", t_gen, _timed(write_reference)[0], f"{len(files)} files"))

    settings = load_settings()

    def ingest():
        with session_scope(settings) as session:
            load_register(session, work / "trial" / "register.yaml", trial_fields=trial_fields)
            for site in ("A01", "B02", "C03"):
                ingest_path(session, settings, work / "trial" / "sites" / site, site_code=site)
    t_ingest, _ = _timed(ingest)

    def copy_reference():
        out = work / "ref-copy"
        out.mkdir()
        for i, f in enumerate(files):
            data = f.read_bytes()
            pydicom.dcmread(io.BytesIO(data))
            hashlib.sha256(data).hexdigest()
            tmp = out / f".{i}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.rename(out / f"{i}.dcm")
    rows.append(("ingest", t_ingest, _timed(copy_reference)[0], f"{len(files)} files"))

    from expectations.manual import load_manual
    from expectations.qc import qc_series_batch, trial_pet_series

    manual = load_manual("FDG-RESP-01")
    import great_expectations  # noqa: F401  (import once, outside the timed stage)

    def qc():
        with session_scope(settings) as session:
            return qc_series_batch(session, settings, manual, trial_pet_series(session, manual.trial))
    t_qc, outcome = _timed(qc)
    pet_files = [f for s in truth.series if s["kind"] == "trial" and s["modality"] == "PT"
                 for f in (work / "trial" / s["path"]).glob("*.dcm")]
    rows.append(("qc", t_qc, _timed(lambda: [pydicom.dcmread(f, stop_before_pixels=True) for f in pet_files])[0],
                 f"{outcome.series} series"))

    from accreditation.evaluate import evaluate_series_folder
    from corelab.dicomio import load_volume
    from phantoms.fill import load_fill_sheet

    phantoms = [s for s in truth.series if s["kind"] == "phantom"]
    t_ph, _ = _timed(lambda: [evaluate_series_folder(work / "trial" / s["path"],
                                                     load_fill_sheet(work / "trial" / s["phantom"]["fill_sheet"]))
                              for s in phantoms])
    t_ph_ref, _ = _timed(lambda: [load_volume(sorted((work / "trial" / s["path"]).glob("*.dcm"))) for s in phantoms])
    rows.append(("phantom", t_ph, t_ph_ref, f"{len(phantoms)} series"))

    print(f"{'stage':8} {'seconds':>8} {'reference s':>12} {'ratio':>7}  size")
    for name, t, ref, size in rows:
        print(f"{name:8} {t:8.2f} {ref:12.2f} {t / ref:7.1f}  {size}")


if __name__ == "__main__":
    main()
