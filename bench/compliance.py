"""Compliance benchmarks (issue: SUV and protocol compliance).

1. Header extraction over 5,000 PET slice files (100 series x 50 slices): corelab's header table
   (read headers + one row per series: SUV factors, geometry, completeness) versus, in the same
   run, a bare pydicom ``dcmread`` loop over the same files (both with and without
   ``stop_before_pixels``). Throughput ratio = bare loop time / corelab time (target >= 0.8).
2. Validation of 10,000 series rows against the example manual, deviations extracted and stored
   in SQLite (target >= 5,000 series/s), next to Great Expectations alone on the same rows.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.uid import generate_uid

N_SERIES, N_SLICES, N_ROWS = 100, 50, 10_000


def _make_files(work: Path) -> list[list[Path]]:
    from synth.spec import small_spec
    from synth.trial import generate_trial

    spec = small_spec()
    spec.pet_shape = (N_SLICES, 48, 48)
    truth = generate_trial(work / "trial", spec, seed=5)
    entry = next(s for s in truth.series if s["kind"] == "trial" and s["modality"] == "PT" and not s["problems"])
    template = [pydicom.dcmread(f) for f in sorted((work / "trial" / entry["path"]).glob("*.dcm"))]
    series = []
    for i in range(N_SERIES):
        folder = work / "files" / f"s{i:03d}"
        folder.mkdir(parents=True)
        uid = generate_uid()
        paths = []
        for j, ds in enumerate(template):
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"{j:04d}.dcm"
            ds.save_as(path)
            paths.append(path)
        series.append(paths)
    return series


def _best(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_header_extraction(work: Path) -> None:
    from expectations.header_table import header_row

    series = _make_files(work)
    files = [p for s in series for p in s]
    t_corelab = _best(lambda: [header_row([pydicom.dcmread(p, stop_before_pixels=True) for p in s]) for s in series])
    t_bare_header = _best(lambda: [pydicom.dcmread(p, stop_before_pixels=True) for p in files])
    t_bare_full = _best(lambda: [pydicom.dcmread(p) for p in files])
    print(f"header extraction, {len(files)} files ({N_SERIES} series), best of 3:")
    print(f"  corelab header table            {t_corelab:6.2f} s  {len(files) / t_corelab:7.0f} files/s")
    print(f"  bare dcmread(stop_before_pixels) {t_bare_header:6.2f} s  ratio {t_bare_header / t_corelab:.2f}x")
    print(f"  bare dcmread (full)             {t_bare_full:6.2f} s  ratio {t_bare_full / t_corelab:.2f}x")


def _rows(n: int) -> list[dict]:
    rng = random.Random(7)
    rows = []
    for i in range(n):
        row = {"series_uid": f"1.2.3.{i}", "site": f"S{i % 10:02d}", "subject": f"P{i // 2:05d}",
               "visit": "baseline" if i % 2 == 0 else "followup", "units": "BQML", "decay_correction": "START",
               "corrected_attn_decy": True, "weight_kg": rng.uniform(50, 110), "suv_factor_g_per_bq": 2.5e-4,
               "activity_mbq": rng.uniform(180, 420), "activity_mbq_per_kg": rng.uniform(2.8, 4.2),
               "uptake_min": rng.gauss(62, 5), "scanner_accredited": True, "software_matches_register": True,
               "slices_missing": 0, "header_problems": "", "same_scanner_as_baseline": None,
               "same_reconstruction_as_baseline": None, "uptake_diff_vs_baseline_min": None,
               "days_since_baseline": None}
        if i % 2:
            row.update(same_scanner_as_baseline=rng.random() > 0.02, same_reconstruction_as_baseline=True,
                       uptake_diff_vs_baseline_min=rng.gauss(0, 5), days_since_baseline=rng.randint(38, 60))
        rows.append(row)
    return rows


def bench_validation(work: Path) -> None:
    os.environ["CORELAB_DATA_DIR"] = str(work / "data")
    from sqlmodel import Session

    from corelab.db import open_store
    from corelab.models import Series
    from corelab.settings import load_settings
    from expectations.manual import load_manual, validate
    from expectations.qc import record_findings

    manual = load_manual("FDG-RESP-01")
    table = pd.DataFrame(_rows(N_ROWS))
    engine = open_store(load_settings())
    with Session(engine) as session:
        session.add_all(Series(series_uid=uid, modality="PT", kind="trial", state="complete")
                        for uid in table["series_uid"])
        session.commit()
    validate(manual, table.head(10))  # warm: GX import and first-context cost are not per batch
    start = time.perf_counter()
    validation = validate(manual, table)
    t_gx_and_extract = time.perf_counter() - start
    with Session(engine) as session:
        start = time.perf_counter()
        outcome = record_findings(session, manual, table, validation.findings)
        session.commit()
        t_store = time.perf_counter() - start
    total = t_gx_and_extract + t_store
    print(f"validation of {N_ROWS} series rows against {manual.trial} v{manual.version} "
          f"({len(manual.rules)} rules):")
    print(f"  GX run + findings extracted     {t_gx_and_extract:6.2f} s")
    print(f"  deviations stored ({outcome.deviations_new:5d} new)  {t_store:6.2f} s")
    print(f"  total                           {total:6.2f} s  {N_ROWS / total:7.0f} series/s (target >= 5000)")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="corelab-bench-compliance-"))
    bench_header_extraction(work)
    bench_validation(work)


if __name__ == "__main__":
    main()
