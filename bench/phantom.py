"""NEMA IEC analysis of a 2 mm-voxel phantom series: corelab against its peer pynemaiqpet.

Both tools analyse the same DICOM series (a noiseless synthetic IEC phantom, 2 mm voxels,
165 x 165 x 110, 7.5 mm FWHM Gaussian PSF) in the same run. pynemaiqpet needs pydicom < 3
(corelab pins 3.0), so it lives in a virtual environment of its own that only this benchmark
uses, created on first use under ``~/.cache/corelab-bench/pynemaiqpet-venv`` (override with
``CORELAB_BENCH_PEER_VENV``). The peer runs as its command-line tool ``wb_nema_iq`` does:
``fit_WB_NEMA_sphere_profiles(vol, voxsize, sameSignal=True, Rfix=[18.5 ... 5.0], dfix=1.5)``,
RC = its A50 mean (resp. max) / the true sphere concentration.

Printed: seconds per analysis (median of repeats) for the analysis alone (volume in memory)
and end to end (DICOM files to result), the ratio peer / corelab, and both RC tables.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

from synth.peer import ensure_peer, run_peer

REPEATS = 7


def write_series(outdir: Path) -> tuple[Path, Path, dict]:
    """A noiseless 2 mm-voxel NEMA IEC series with its fill sheet (the trial generator's writer)."""
    from synth.spec import PhantomSpec, TrialSpec
    from synth.trial import _write_phantom

    spec = TrialSpec.demo()
    spec.phantom = PhantomSpec(nema_shape=(110, 165, 165), voxel_mm=(2.0, 2.0, 2.0), shift_mm=(6.0, -4.0, 3.0),
                               rotation_deg=7.0, noise_cov=0.0, supersample=2)
    scanner = dataclasses.replace(next(s for s in spec.scanners if s.id == "A01-2"), nema_fwhm_mm=7.5)
    spec.scanners = [scanner if s.id == scanner.id else s for s in spec.scanners]
    entry = _write_phantom(outdir, spec, scanner, "nema_iec", 0, dt.date(2031, 3, 4))
    return outdir / entry["path"], outdir / entry["phantom"]["fill_sheet"], entry


def _median_time(fn, repeats: int = REPEATS):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    import pydicom

    from accreditation.evaluate import evaluate_series_folder, scan_reference_time
    from corelab.dicomio import load_volume
    from phantoms.nema_iec import analyze_nema_iec
    from phantoms.fill import load_fill_sheet, true_concentrations

    python = ensure_peer()
    work = Path(tempfile.mkdtemp(prefix="corelab-bench-phantom-"))
    folder, fill_path, entry = write_series(work)
    fill = load_fill_sheet(fill_path)
    paths = sorted(folder.glob("*.dcm"))
    volume = load_volume(paths)
    truth = true_concentrations(fill, scan_reference_time(pydicom.dcmread(paths[0], stop_before_pixels=True)))
    sphere, background = truth.values_kbq_ml["sphere_kbq_ml"], truth.values_kbq_ml["background_kbq_ml"]
    grid = volume.grid
    kbq_ml = volume.array / 1000.0

    t_ours, ours = _median_time(lambda: analyze_nema_iec(kbq_ml, volume.voxel_mm, sphere_kbq_ml=sphere,
                                                         background_kbq_ml=background, grid=grid))
    t_ours_e2e, _ = _median_time(lambda: evaluate_series_folder(folder, fill))

    peer = run_peer([(folder, sphere * 1000.0)], repeats=REPEATS, python=python)[0]
    t_peer, t_peer_e2e = peer["analysis_s"], peer["analysis_s"] + peer["load_s"]

    shape = "x".join(str(n) for n in volume.array.shape)
    print(f"series: NEMA IEC, {len(paths)} slices, {shape} voxels of {volume.voxel_mm} mm, noiseless, "
          f"{entry['phantom']['fwhm_mm']} mm FWHM; true sphere {sphere:.3f} kBq/mL, background {background:.3f}")
    print(f"{'what':32} {'corelab s':>10} {'pynemaiqpet s':>14} {'peer/corelab':>13}")
    print(f"{'analysis (volume in memory)':32} {t_ours:10.3f} {t_peer:14.3f} {t_peer / t_ours:13.1f}")
    print(f"{'end to end (DICOM files)':32} {t_ours_e2e:10.3f} {t_peer_e2e:14.3f} {t_peer_e2e / t_ours_e2e:13.1f}")
    print()
    print(f"{'sphere mm':>9} {'RCmean corelab':>15} {'RCmean peer':>12} {'diff':>7} "
          f"{'RCmax corelab':>14} {'RCmax peer':>11} {'diff':>7}")
    peer_rc = {round(r["diameter_mm"]): r for r in peer["spheres"]}
    worst = 0.0
    for s in ours.spheres:
        p = peer_rc.get(round(s.diameter_mm))
        if p is None:
            print(f"{s.diameter_mm:9g} {s.rc_mean:15.3f} {'(not found)':>12}")
            continue
        d_mean, d_max = s.rc_mean - p["rc_mean"], s.rc_max - p["rc_max"]
        worst = max(worst, abs(d_mean))
        print(f"{s.diameter_mm:9g} {s.rc_mean:15.3f} {p['rc_mean']:12.3f} {d_mean:+7.3f} "
              f"{s.rc_max:14.3f} {p['rc_max']:11.3f} {d_max:+7.3f}")
    print(f"\nlargest |RCmean(A50) corelab - pynemaiqpet| = {worst:.3f} (target <= 0.03); "
          f"speed-up {t_peer / t_ours:.1f}x analysis, {t_peer_e2e / t_ours_e2e:.1f}x end to end (target >= 5x)")


if __name__ == "__main__":
    main()
