"""Evaluate a phantom series: volume + fill sheet -> analysis -> verdict against a standard.

The result records everything a number in a report must be traced to: the corelab version, the
standard and its version, the input checksum, the fill-sheet values used and where each came
from, and the analysis choices (e.g. RCpeak placement).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import yaml
from sqlmodel import Session, select

from accreditation.register import update_accreditation
from accreditation.standards import load_standard, verdict
from corelab import __version__
from corelab.dicomio import Volume, load_volume
from corelab.models import PhantomResult, Series
from phantoms.analysis import analyze_nema_iec, analyze_uniform_cylinder
from phantoms.digital import Grid
from phantoms.fill import FillSheet, true_concentrations


@dataclass(frozen=True)
class PhantomEvaluation:
    kind: str
    standard: str
    standard_version: str
    verdict: str  # pass | fail
    metrics: dict
    checks: dict
    fill: dict
    scan_date: dt.date | None
    input_sha256: str
    corelab_version: str = __version__
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "standard": self.standard, "standard_version": self.standard_version,
                "verdict": self.verdict, **self.metrics, "checks": self.checks, "fill": self.fill,
                "scan_date": self.scan_date.isoformat() if self.scan_date else None,
                "input_sha256": self.input_sha256, "corelab_version": self.corelab_version, "notes": self.notes}


def scan_reference_time(ds) -> dt.datetime | None:
    """Series date/time, else acquisition date/time, of a phantom scan (None when absent)."""
    return scan_reference_time_and_source(ds)[0]


def scan_reference_time_and_source(ds) -> tuple[dt.datetime | None, str]:
    """The scan reference time of a phantom scan and the attributes it came from.

    Series date/time, else acquisition date/time; ``(None, "...")`` saying what is missing
    when the images carry neither.
    """
    for date_kw, time_kw in (("SeriesDate", "SeriesTime"), ("AcquisitionDate", "AcquisitionTime")):
        date_s, time_s = str(ds.get(date_kw, "") or ""), str(ds.get(time_kw, "") or "")
        if len(date_s) == 8 and len(time_s) >= 6:
            return dt.datetime.strptime(date_s + time_s[:6], "%Y%m%d%H%M%S"), f"{date_kw}/{time_kw} of the images"
    return None, "none: the images carry no SeriesDate/SeriesTime or AcquisitionDate/AcquisitionTime"


class CentresFileError(ValueError):
    """A file of hand-placed sphere centres is malformed; the message names the file and the fix."""


def load_centres(path: Path | str) -> dict[float, tuple[float, float, float]]:
    """Sphere centres placed by hand: YAML or JSON ``{diameter_mm: [x, y, z]}``, patient mm.

    At least three spheres are needed (the analysis fits the sphere ring to them).
    """
    path = Path(path)
    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CentresFileError(f"{path}: cannot read sphere centres ({exc})") from None
    if not isinstance(doc, Mapping):
        raise CentresFileError(f"{path}: expected a mapping {{diameter_mm: [x, y, z]}} in patient mm")
    out = {}
    for key, value in doc.items():
        try:
            d = float(key)
            xyz = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise CentresFileError(f"{path}: entry {key!r}: {value!r} is not diameter_mm: [x, y, z]") from None
        if len(xyz) != 3:
            raise CentresFileError(f"{path}: entry {key!r} has {len(xyz)} coordinates; give [x, y, z] in mm")
        out[d] = xyz
    return out


def _grid(volume: Volume) -> Grid:
    return Grid(shape=volume.array.shape, voxel_mm=volume.voxel_mm, origin_mm=volume.origin_mm)


def _sha256_files(paths: list[Path]) -> str:
    digests = sorted(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def evaluate_volume(volume: Volume, fill: FillSheet, *, scan_time: dt.datetime | None, standard: str = "EARL1",
                    input_sha256: str = "", scan_time_source: str = "",
                    centres_mm: Mapping[float, Sequence[float]] | None = None,
                    rc_peak_placement: str = "max_voxel") -> PhantomEvaluation:
    """Analyse a phantom volume (Bq/mL) against ``standard`` with the fill sheet's true values.

    Parameters
    ----------
    volume : Volume
    fill : FillSheet
    scan_time : datetime or None
        Scan reference time; None takes the fill concentrations as at scan time.
    standard : str
        Bundled standard name or YAML path.
    input_sha256 : str
    scan_time_source : str
        Where ``scan_time`` came from (recorded in the result's ``fill.provenance``).
    centres_mm : dict, optional
        Sphere centres placed by hand, ``{diameter_mm: (x, y, z)}`` patient mm (NEMA IEC only).
    rc_peak_placement : str
        See :func:`phantoms.analysis.analyze_nema_iec`.
    """
    std = load_standard(standard)
    truth = true_concentrations(fill, scan_time)
    kbq_ml = volume.array / 1000.0
    notes = []
    if volume.units and volume.units != "BQML":
        notes.append(f"image Units are {volume.units}, not BQML: the recovery values assume Bq/mL")
    if fill.kind == "nema_iec":
        result = analyze_nema_iec(kbq_ml, volume.voxel_mm, sphere_kbq_ml=truth.values_kbq_ml["sphere_kbq_ml"],
                                  background_kbq_ml=truth.values_kbq_ml["background_kbq_ml"], grid=_grid(volume),
                                  centres_mm=centres_mm, rc_peak_placement=rc_peak_placement)
    else:
        result = analyze_uniform_cylinder(kbq_ml, volume.voxel_mm,
                                          concentration_kbq_ml=truth.values_kbq_ml["concentration_kbq_ml"],
                                          grid=_grid(volume))
        if centres_mm:
            notes.append("sphere centres given by hand are ignored for a uniform cylinder")
    v = verdict(result, std)
    fill_doc = truth.to_dict()
    fill_doc["provenance"] = {**fill_doc["provenance"],
                              "scan_time": scan_time_source or ("given" if scan_time else "none"),
                              "half_life_s": (f"{fill.source}" if fill.half_life_given else
                                              f"default for {fill.radionuclide}")}
    return PhantomEvaluation(kind=fill.kind, standard=std.name, standard_version=std.version,
                             verdict="pass" if v.passed else "fail", metrics=result.to_dict(), checks=v.to_dict(),
                             fill={**fill_doc, "reference_time": fill.reference_time.isoformat(),
                                   "fill_kbq_ml": fill.concentrations_kbq_ml, "radionuclide": fill.radionuclide,
                                   "half_life_s": fill.half_life_s},
                             scan_date=scan_time.date() if scan_time else None, input_sha256=input_sha256,
                             notes=notes)


def evaluate_series_folder(folder: Path, fill: FillSheet, *, standard: str = "EARL1",
                           centres_mm: Mapping[float, Sequence[float]] | None = None,
                           rc_peak_placement: str = "max_voxel") -> PhantomEvaluation:
    """Evaluate the phantom series whose DICOM files are in ``folder``."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix == ".dcm")
    volume = load_volume(paths)
    scan_time, source = scan_reference_time_and_source(pydicom.dcmread(volume.paths[0], stop_before_pixels=True))
    return evaluate_volume(volume, fill, scan_time=scan_time, standard=standard, input_sha256=_sha256_files(paths),
                           scan_time_source=source, centres_mm=centres_mm, rc_peak_placement=rc_peak_placement)


def record_evaluation(session: Session, series: Series, evaluation: PhantomEvaluation, *, scope: str):
    """Store a phantom result and update the scanner's accreditation for the standard and scope.

    Idempotent: the same series, input checksum, standard version and corelab version is stored
    once; recording it again returns the stored result.
    """
    input_sha256 = series.checksum or evaluation.input_sha256
    stored = session.exec(select(PhantomResult).where(
        PhantomResult.series_id == series.id, PhantomResult.input_sha256 == input_sha256,
        PhantomResult.standard == evaluation.standard, PhantomResult.standard_version == evaluation.standard_version,
        PhantomResult.corelab_version == evaluation.corelab_version)).first()
    if stored is not None:
        series.qc_state = "done"
        acc = None
        if series.scanner_id is not None:
            acc = update_accreditation(session, series.scanner_id, standard=evaluation.standard, scope=scope)
        return stored, acc
    result = PhantomResult(series_id=series.id, scanner_id=series.scanner_id, kind=evaluation.kind,
                           standard=evaluation.standard, standard_version=evaluation.standard_version,
                           verdict=evaluation.verdict, metrics={**evaluation.metrics, "checks": evaluation.checks,
                                                                "notes": evaluation.notes},
                           fill=evaluation.fill, corelab_version=evaluation.corelab_version,
                           input_sha256=input_sha256, scan_date=evaluation.scan_date)
    session.add(result)
    series.qc_state = "done"
    session.flush()
    acc = None
    if series.scanner_id is not None:
        acc = update_accreditation(session, series.scanner_id, standard=evaluation.standard, scope=scope)
    return result, acc
