"""Reading DICOM PET and CT image series.

:func:`read_header` reads one file; :func:`load_volume` sorts the slices of one series by their
position along the slice normal (ImagePositionPatient projected onto the normal of
ImageOrientationPatient, never InstanceNumber or a single z tag: hazen#404), applies each slice's
RescaleSlope/RescaleIntercept, and records gaps in the slice positions instead of hiding them.
:func:`newest_instances` picks the newest version of each instance of a spool folder.

The grid convention is :class:`corelab.grid.Grid`'s (``Volume.grid``): arrays are indexed (plane,
row, col); ``voxel_mm`` is (slice spacing, row spacing, column spacing); ``origin_mm`` is the DICOM
patient (LPS) position of the centre of voxel [0, 0, 0]. The synthetic series the tests and the
demo read are written by :mod:`synth.dicom_writer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from corelab.grid import Grid

__all__ = [
    "Volume",
    "DicomVolumeError",
    "read_header",
    "load_volume",
    "newest_instances",
]


class DicomVolumeError(ValueError):
    """Slices cannot form one volume; the message names the file and the mismatch."""


def read_header(path: Path | str, *, stop_before_pixels: bool = True) -> Dataset:
    """Read one DICOM file (header only by default).

    Parameters
    ----------
    path : path
    stop_before_pixels : bool
        Skip the pixel data (about 0.4 ms per small PET file instead of 0.9 ms).

    Returns
    -------
    pydicom.Dataset
    """
    return pydicom.dcmread(Path(path), stop_before_pixels=stop_before_pixels)


@dataclass
class Volume:
    """A series' slices stacked in geometric order.

    Attributes
    ----------
    array : ndarray of shape (planes, rows, cols), float32
        Real-world values (stored * RescaleSlope + RescaleIntercept, per slice), in ``units``.
        Only slices that exist: a gap is recorded, not filled.
    voxel_mm : tuple of float
        (slice spacing, row spacing, column spacing) in mm; the slice spacing is the median
        distance between consecutive slice positions.
    origin_mm : tuple of float
        ImagePositionPatient (LPS, mm) of the first slice after sorting.
    orientation : tuple of float
        ImageOrientationPatient (row direction cosines, column direction cosines).
    positions_mm : ndarray of shape (planes,)
        Position of each slice along the slice normal, ascending, in mm.
    paths : list of Path
        The files in sorted order.
    units : str or None
        Units (0054,1001) for PET, "HU" for CT, else None.
    missing_positions_mm : list of float
        Positions along the normal where a slice is missing between present slices.
    expected_planes : int or None
        NumberOfSlices (0054,0081) when the header gives it.
    """

    array: np.ndarray
    voxel_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    orientation: tuple[float, ...]
    positions_mm: np.ndarray
    paths: list[Path]
    units: str | None = None
    missing_positions_mm: list[float] = field(default_factory=list)
    expected_planes: int | None = None

    @property
    def grid(self) -> Grid:
        """The voxel grid of :attr:`array` (shape, ``voxel_mm``, ``origin_mm``)."""
        return Grid(shape=self.array.shape, voxel_mm=self.voxel_mm, origin_mm=self.origin_mm)

    @property
    def has_gaps(self) -> bool:
        """True when slices are missing between the first and last slice."""
        return bool(self.missing_positions_mm)

    @property
    def is_complete(self) -> bool:
        """No gap, and as many planes as NumberOfSlices says (when it says)."""
        if self.has_gaps:
            return False
        return self.expected_planes is None or self.expected_planes == self.array.shape[0]


def _float_tuple(values: Any, n: int, keyword: str, path: Path) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise DicomVolumeError(f"{path}: {keyword} is not numeric ({values!r})") from exc
    if len(out) != n:
        raise DicomVolumeError(f"{path}: {keyword} has {len(out)} values, expected {n}")
    return out


def _require(ds: Dataset, keyword: str, path: Path) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DicomVolumeError(f"{path}: {keyword} is missing; cannot place the slice in a volume")
    return value


def load_volume(
    paths: Sequence[Path | str],
    *,
    orientation_tol: float = 1e-4,
    spacing_tol_mm: float = 1e-3,
) -> Volume:
    """Stack the slices of one series into a volume, sorted along the slice normal.

    Parameters
    ----------
    paths : sequence of path
        Files of one series, in any order.
    orientation_tol : float
        Largest allowed difference of ImageOrientationPatient cosines between slices.
    spacing_tol_mm : float
        Largest allowed difference of PixelSpacing between slices, and tolerance for slice
        positions on the regular grid (as a fraction of 100 of the slice spacing, at least 0.01 mm).

    Returns
    -------
    Volume

    Raises
    ------
    DicomVolumeError
        Naming the file: differing series, orientation, pixel spacing or matrix size; a
        missing geometry attribute; two slices at one position; slice positions that are not
        on a regular grid (a missing slice is not an error: it is recorded in
        ``Volume.missing_positions_mm``).
    """
    if not paths:
        raise DicomVolumeError("no files given")
    records = []
    first: dict[str, Any] = {}
    for raw in paths:
        path = Path(raw)
        ds = pydicom.dcmread(path)
        iop = _float_tuple(_require(ds, "ImageOrientationPatient", path), 6,
                           "ImageOrientationPatient", path)
        ipp = _float_tuple(_require(ds, "ImagePositionPatient", path), 3,
                           "ImagePositionPatient", path)
        spacing = _float_tuple(_require(ds, "PixelSpacing", path), 2, "PixelSpacing", path)
        size = (int(_require(ds, "Rows", path)), int(_require(ds, "Columns", path)))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        if not first:
            first = {"iop": iop, "spacing": spacing, "size": size, "series": series_uid,
                     "path": path}
        else:
            if series_uid != first["series"]:
                raise DicomVolumeError(
                    f"{path}: SeriesInstanceUID differs from {first['path'].name}; "
                    "load one series at a time")
            if max(abs(a - b) for a, b in zip(iop, first["iop"])) > orientation_tol:
                raise DicomVolumeError(
                    f"{path}: ImageOrientationPatient {list(iop)} differs from "
                    f"{list(first['iop'])} in {first['path'].name}")
            if max(abs(a - b) for a, b in zip(spacing, first["spacing"])) > spacing_tol_mm:
                raise DicomVolumeError(
                    f"{path}: PixelSpacing {list(spacing)} mm differs from "
                    f"{list(first['spacing'])} mm in {first['path'].name}")
            if size != first["size"]:
                raise DicomVolumeError(
                    f"{path}: matrix {size[0]}x{size[1]} (rows x cols) differs from "
                    f"{first['size'][0]}x{first['size'][1]} in {first['path'].name}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        plane = ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        records.append((ipp, path, plane, ds))

    row_dir = np.array(first["iop"][:3])
    col_dir = np.array(first["iop"][3:])
    normal = np.cross(row_dir, col_dir)
    positions = np.array([float(np.dot(normal, r[0])) for r in records])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    records = [records[i] for i in order]

    duplicates = np.nonzero(np.diff(positions) < spacing_tol_mm)[0]
    if duplicates.size:
        i = int(duplicates[0])
        raise DicomVolumeError(
            f"{records[i + 1][1]}: same slice position {positions[i + 1]:.3f} mm as "
            f"{records[i][1].name}")

    slice_mm, missing = _slice_spacing_and_gaps(positions, records, spacing_tol_mm)
    first_ds = records[0][3]
    modality = str(first_ds.get("Modality", ""))
    units = str(first_ds.get("Units")) if "Units" in first_ds else ("HU" if modality == "CT" else None)
    expected = first_ds.get("NumberOfSlices")
    return Volume(
        array=np.stack([r[2] for r in records]).astype(np.float32),
        voxel_mm=(slice_mm, first["spacing"][0], first["spacing"][1]),
        origin_mm=tuple(records[0][0]),
        orientation=tuple(first["iop"]),
        positions_mm=positions,
        paths=[r[1] for r in records],
        units=units,
        missing_positions_mm=missing,
        expected_planes=None if expected is None else int(expected),
    )


def _slice_spacing_and_gaps(
    positions: np.ndarray, records: list, spacing_tol_mm: float
) -> tuple[float, list[float]]:
    """Median slice spacing, and positions missing from the regular grid it implies.

    Slices missing by the one rule, :func:`corelab.completeness.slice_steps`; a step off the grid
    (not a whole number of spacings) is refused.
    """
    if positions.size < 2:
        thickness = records[0][3].get("SliceThickness")
        return (float(thickness) if thickness else 0.0), []
    from corelab.completeness import slice_steps

    judged = slice_steps(positions)  # sorted and without repeats already: its steps are ``np.diff(positions)``
    steps = np.diff(positions)
    spacing = float(judged.spacing_mm)
    tol = max(spacing_tol_mm, 0.01 * spacing)
    missing: list[float] = []
    for i, step in enumerate(steps):
        n_steps = judged.missing[i] + 1
        if abs(step - n_steps * spacing) > tol * max(n_steps, 1):
            raise DicomVolumeError(
                f"{records[i + 1][1]}: slice position {positions[i + 1]:.3f} mm is "
                f"{step:.3f} mm from the previous slice ({records[i][1].name}); the series "
                f"spacing is {spacing:.3f} mm, so the slices are not on one regular grid")
        missing.extend(float(positions[i] + k * spacing) for k in range(1, n_steps))
    return spacing, missing


def newest_instances(paths: Iterable[Path | str]) -> list[Path]:
    """The newest version of each instance among ``paths``: one file per SOP Instance UID.

    A site may send a slice again with other bytes (a corrected re-send). The spool keeps every
    version beside the first: ``<SOP UID>.dcm`` is version 1, ``<SOP UID>.v<N>.dcm`` version N
    (``corelab.ingest``, numbered in the order received). Every reader of a series (header QC,
    phantom analysis, the reports' image panels) reads through this function, so all of them see
    the newest version of every instance and never two slices at one position.

    The instance is identified by the SOPInstanceUID in the file (not by its name), the version
    by the name. A file without a SOPInstanceUID is its own instance.

    Parameters
    ----------
    paths : iterable of path
        DICOM files of one series, e.g. every ``*.dcm`` of a spool folder.

    Returns
    -------
    list of Path
        The files to read, in the order given.

    Raises
    ------
    DicomVolumeError
        A file whose SOPInstanceUID cannot be read; or two files of one instance with the same
        version (names without ``.v<N>``, so not from the spool) and different bytes, naming both:
        which one is meant cannot be known.
    """
    chosen: dict[str, tuple[int, Path]] = {}
    given = [Path(raw) for raw in paths]
    for path in given:
        stem = path.name[: -len(path.suffix)] if path.suffix else path.name
        head, _, tail = stem.rpartition(".v")
        version = int(tail) if head and tail.isdigit() else 1
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(ds.get("SOPInstanceUID", "") or "") or f"file:{path}"
        except Exception as exc:  # noqa: BLE001 - any unreadable file is named, never skipped silently
            raise DicomVolumeError(f"{path}: cannot read its SOPInstanceUID ({type(exc).__name__}: {exc})") from None
        held = chosen.get(uid)
        if held is None or version > held[0]:
            chosen[uid] = (version, path)
        elif version == held[0] and path.read_bytes() != held[1].read_bytes():
            first, second = sorted((held[1], path))
            raise DicomVolumeError(
                f"{second}: same SOPInstanceUID {uid} as {first.name}, other content, and neither name carries a "
                "version (.v<N>.dcm, as the spool writes re-sent instances); keep the one to read and move the "
                "other out of the folder")
    keep = {p for _, p in chosen.values()}
    return [p for p in given if p in keep]
