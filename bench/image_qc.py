"""Image QC benchmarks (issue: look at every trial scan).

1. Image QC of one whole-body PET series (300 slices of 200 x 200, 3.3 x 3.5 x 3.5 mm; a synthetic
   patient with clinical noise, and a CT of the same size) against loading the same series with
   ``corelab.dicomio.load_volume`` in the same run. Printed: the analysis alone and load +
   analysis, each as a ratio to the load (target: image QC at most 1.5 x the load time).
2. ``--turnaround``: see :mod:`bench.turnaround` (a served deployment, 20 series).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE, VOXEL_MM, REPEATS = (300, 200, 200), (3.3, 3.5, 3.5), 3


def _write(img: np.ndarray, grid, folder: Path) -> list[Path]:
    """The volume as PET slices in Bq/mL-like units (only what ``load_volume`` needs)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    series, paths = generate_uid(), []
    for k in range(img.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.128"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality, ds.Rows, ds.Columns = series, "PT", img.shape[1], img.shape[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = list(grid.index_to_mm((k, 0, 0)))
        ds.PixelSpacing, ds.SliceThickness = [VOXEL_MM[1], VOXEL_MM[2]], VOXEL_MM[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 0.001, 0
        ds.PixelData = np.clip(img[k] * 1000, 0, 65535).astype(np.uint16).tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def bench_image_qc() -> None:
    from corelab.dicomio import load_volume
    from corelab.grid import Grid
    from expectations.image import analyse_pet
    from synth.imaging import blur_fwhm, reconstruction_noise
    from synth.patient import patient_maps

    grid = Grid.centred(SHAPE, VOXEL_MM)
    rng = np.random.default_rng(0)
    maps = patient_maps(grid, rng=rng, supersample=1)
    img = reconstruction_noise(blur_fwhm(maps.suv, grid.voxel_mm, 7.0), grid.voxel_mm, rng=rng, cov=0.1,
                               level_kbq_ml=2.2)
    ct_grid = Grid(grid.shape, grid.voxel_mm, tuple(np.add(grid.origin_mm, (10.0, 0.0, 0.0))))
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write(img.astype(np.float32), grid, Path(tmp))
        loads, analyses, plain = [], [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            volume = load_volume(paths)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            qc = analyse_pet(volume.array, volume.grid, ct_hu=maps.hu, ct_grid=ct_grid, sul_per_suv=0.8)
            analyses.append(time.perf_counter() - start)
            start = time.perf_counter()
            analyse_pet(volume.array, volume.grid)
            plain.append(time.perf_counter() - start)
    load, analysis, no_ct = min(loads), min(analyses), min(plain)
    print(f"image QC of one series, {SHAPE[0]} slices of {SHAPE[1]} x {SHAPE[2]} (best of {REPEATS}):")
    print(f"  load_volume (reference)          {load:6.2f} s")
    print(f"  analyse_pet with CT              {analysis:6.2f} s  {analysis / load:5.2f} x the load")
    print(f"  analyse_pet without CT           {no_ct:6.2f} s  {no_ct / load:5.2f} x the load")
    print(f"  load + analysis with CT          {load + analysis:6.2f} s  {(load + analysis) / load:5.2f} x the load "
          f"(target: image QC <= 1.5 x the load)")
    print(f"  liver SUVmean {qc.liver.suv_mean:.3f} (true 2.2), CoV {qc.liver.cov_pct:.1f} %, "
          f"PET-CT shift {tuple(round(v, 1) for v in qc.petct_shift_mm)} mm (true (-10, 0, 0))")


def main() -> None:
    bench_image_qc()


if __name__ == "__main__":
    main()
