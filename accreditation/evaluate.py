"""Evaluate a phantom series: volume + fill sheet -> analysis -> verdict against a standard.

The result records everything a number in a report must be traced to: the corelab version, the
standard and its version, the input checksum, the fill-sheet values used and where each came
from, and the analysis choices (e.g. RCpeak placement).

Verdicts: ``pass``, ``fail``, or ``withheld`` when the NEMA IEC analysis says its sphere names
are not borne out by the image (``localisation_uncertain``): then the RC values may belong to
other spheres, so the result neither passes nor fails, the register ignores it (see
:mod:`accreditation.register`) and the result asks for the sphere centres by hand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import yaml
from sqlmodel import Session, select

from accreditation.register import update_accreditation
from accreditation.standards import load_standard, verdict
from corelab import __version__
from corelab.dicomio import Volume, load_volume, newest_instances
from corelab.lifecycle import move
from corelab.models import PhantomResult, Series
from phantoms.cylinder import analyze_uniform_cylinder
from phantoms.fill import FillSheet, true_concentrations
from phantoms.nema_iec import analyze_nema_iec


WITHHELD = "withheld"
"""The verdict of a result that can neither pass nor fail (its sphere names are in doubt)."""

CENTRES_FILE = "centres.yaml"
"""Sphere centres by hand for a received series: this file beside the series' ``fill.yaml``."""

CENTRES_HINT = ("give the sphere centres by hand: `corelab phantom analyze FOLDER --fill FILL --centres FILE`, or for "
                f"a received series a {CENTRES_FILE} beside its fill.yaml, then run accredit-scanners again "
                "(YAML or JSON {diameter_mm: [x, y, z]}, patient mm, at least three spheres)")


def localisation_doubts(metrics: Mapping) -> tuple[str, ...]:
    """Why the sphere names of a NEMA IEC result are not trusted; empty when they are.

    Reads the analysis result's ``localisation_uncertain`` and the reasons, with their numbers,
    from its ``identity_check`` (absent keys: trusted).
    """
    if not metrics.get("localisation_uncertain"):
        return ()
    reasons = tuple(str(r) for r in ((metrics.get("identity_check") or {}).get("reasons") or ()))
    return reasons or ("the sphere sizes measured in the image disagree with the sphere names",)


def overall_verdict(metrics: Mapping, passed: bool) -> tuple[str, dict | None]:
    """The verdict of an analysis result (``metrics``, its ``to_dict()``) whose checks ``passed``.

    Returns
    -------
    verdict : str
        ``"pass"``, ``"fail"``, or ``"withheld"`` when the localisation is uncertain, whatever
        the checks say.
    withheld : dict or None
        For a withheld verdict: ``reason`` ("localisation uncertain"), ``details`` (the
        identity check's reasons, with the numbers), ``action`` (centres by hand) and
        ``message``, one line saying all of it.
    """
    doubts = localisation_doubts(metrics)
    if not doubts:
        return ("pass" if passed else "fail"), None
    message = f"withheld: localisation uncertain ({'; '.join(doubts)}); {CENTRES_HINT}"
    return WITHHELD, {"reason": "localisation uncertain", "details": list(doubts), "action": CENTRES_HINT,
                      "message": message}


@dataclass(frozen=True)
class AxialPlane:
    """One axial image plane of a phantom, for the figure of the sphere assignment.

    Attributes
    ----------
    image_kbq_ml : ndarray of shape (rows, cols)
    z_mm : float
        Patient z of the plane.
    index : int
        The plane's index in the volume.
    origin_mm : (x, y)
        Patient position of the centre of pixel ``[0, 0]``; rows run along +y, columns along +x.
    pixel_mm : (row spacing, column spacing)
    """

    image_kbq_ml: np.ndarray
    z_mm: float
    index: int
    origin_mm: tuple[float, float]
    pixel_mm: tuple[float, float]


def sphere_plane(volume: Volume, metrics: Mapping) -> AxialPlane | None:
    """The axial plane through the sphere centres of a NEMA IEC result, in kBq/mL.

    The analysis' central sphere plane (``sphere_plane_index``), else the plane nearest the mean
    z of the fitted centres; None without sphere centres.
    """
    spheres = [s for s in metrics.get("spheres") or [] if s.get("centre_mm")]
    if not spheres:
        return None
    dz, dy, dx = (float(v) for v in volume.voxel_mm)
    ox, oy, oz = ((float(v) for v in volume.origin_mm) if metrics.get("coordinates", "patient") == "patient"
                  else (0.0, 0.0, 0.0))
    nz = volume.array.shape[0]
    k = metrics.get("sphere_plane_index")
    if not isinstance(k, int) or not 0 <= k < nz:
        z = float(np.mean([float(s["centre_mm"][2]) for s in spheres]))
        k = int(np.clip(round((z - oz) / dz), 0, nz - 1)) if dz else 0
    return AxialPlane(image_kbq_ml=np.asarray(volume.array[k], dtype=np.float32) / 1000.0, z_mm=oz + k * dz,
                      index=k, origin_mm=(ox, oy), pixel_mm=(dy, dx))


@dataclass(frozen=True)
class PhantomEvaluation:
    """One phantom series judged against a standard.

    ``verdict`` is ``pass``, ``fail`` or ``withheld`` (see :func:`overall_verdict`; ``withheld``
    then says why and what to do). ``evidence`` holds what the figures are drawn from and is not
    part of the stored result: ``sphere_plane`` (:class:`AxialPlane`) for a NEMA IEC phantom.
    """

    kind: str
    standard: str
    standard_version: str
    verdict: str  # pass | fail | withheld
    metrics: dict
    checks: dict
    fill: dict
    scan_date: dt.date | None
    input_sha256: str
    corelab_version: str = __version__
    notes: list[str] = field(default_factory=list)
    withheld: dict | None = None
    evidence: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def message(self) -> str:
        """One line for a person: the verdict, and for a withheld one why and what to do."""
        return self.withheld["message"] if self.withheld else f"{self.verdict} against {self.standard}"

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "standard": self.standard, "standard_version": self.standard_version,
               "verdict": self.verdict, **self.metrics, "checks": self.checks, "fill": self.fill,
               "scan_date": self.scan_date.isoformat() if self.scan_date else None,
               "input_sha256": self.input_sha256, "corelab_version": self.corelab_version, "notes": self.notes}
        if self.withheld:
            out["withheld"] = self.withheld
            out["message"] = self.withheld["message"]
        return out


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
    except OSError as exc:
        raise CentresFileError(f"{path}: cannot read sphere centres ({exc})") from None
    return parse_centres(text, source=path)


def parse_centres(text: str, *, source: Path | str = "centres") -> dict[float, tuple[float, float, float]]:
    """Sphere centres from the text of a centres file (JSON when ``source`` ends in .json, else YAML)."""
    path = Path(source)
    try:
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
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
        See :func:`phantoms.nema_iec.analyze_nema_iec`.
    """
    std = load_standard(standard)
    truth = true_concentrations(fill, scan_time)
    kbq_ml = volume.array / 1000.0
    notes = []
    if getattr(fill, "kind_source", "given") != "given":
        notes.append(f"the fill sheet names no kind: read as {fill.kind} ({fill.kind_source})")
    if volume.units and volume.units != "BQML":
        notes.append(f"image Units are {volume.units}, not BQML: the recovery values assume Bq/mL")
    if fill.kind == "nema_iec":
        result = analyze_nema_iec(kbq_ml, volume.voxel_mm, sphere_kbq_ml=truth.values_kbq_ml["sphere_kbq_ml"],
                                  background_kbq_ml=truth.values_kbq_ml["background_kbq_ml"], grid=volume.grid,
                                  centres_mm=centres_mm, rc_peak_placement=rc_peak_placement)
    else:
        result = analyze_uniform_cylinder(kbq_ml, volume.voxel_mm,
                                          concentration_kbq_ml=truth.values_kbq_ml["concentration_kbq_ml"],
                                          grid=volume.grid)
        if centres_mm:
            notes.append("sphere centres given by hand are ignored for a uniform cylinder")
    v = verdict(result, std)
    metrics = result.to_dict()
    outcome, withheld = overall_verdict(metrics, v.passed)
    evidence = {}
    if fill.kind == "nema_iec":
        evidence["sphere_plane"] = sphere_plane(volume, metrics)
    fill_doc = truth.to_dict()
    fill_doc["provenance"] = {**fill_doc["provenance"],
                              "scan_time": scan_time_source or ("given" if scan_time else "none"),
                              "half_life_s": (f"{fill.source}" if fill.half_life_given else
                                              f"default for {fill.radionuclide}")}
    return PhantomEvaluation(kind=fill.kind, standard=std.name, standard_version=std.version,
                             verdict=outcome, metrics=metrics, checks=v.to_dict(), withheld=withheld, evidence=evidence,
                             fill={**fill_doc, "reference_time": fill.reference_time.isoformat(),
                                   "fill_kbq_ml": fill.concentrations_kbq_ml, "radionuclide": fill.radionuclide,
                                   "half_life_s": fill.half_life_s},
                             scan_date=scan_time.date() if scan_time else None, input_sha256=input_sha256,
                             notes=notes)


def evaluate_series_folder(folder: Path, fill: FillSheet, *, standard: str = "EARL1",
                           centres_mm: Mapping[float, Sequence[float]] | None = None,
                           rc_peak_placement: str = "max_voxel", paths: Sequence[Path] | None = None) -> PhantomEvaluation:
    """Evaluate the phantom series whose DICOM files are in ``folder``.

    Reads the newest version of each instance: ``paths`` when given (a stored series:
    :func:`corelab.series_files.series_files`), else chosen among the folder's files by
    :func:`corelab.dicomio.newest_instances`. A slice the site sent again replaces the earlier
    copy the spool keeps beside it; the result's notes name the files set aside.
    """
    found = sorted(p for p in Path(folder).iterdir() if p.suffix == ".dcm")
    paths = newest_instances(found) if paths is None else list(paths)
    volume = load_volume(paths)
    scan_time, source = scan_reference_time_and_source(pydicom.dcmread(volume.paths[0], stop_before_pixels=True))
    evaluation = evaluate_volume(volume, fill, scan_time=scan_time, standard=standard,
                                 input_sha256=_sha256_files(paths), scan_time_source=source, centres_mm=centres_mm,
                                 rc_peak_placement=rc_peak_placement)
    used = set(paths)
    superseded = [p.name for p in found if p not in used]
    if superseded:
        evaluation = replace(evaluation, notes=[*evaluation.notes, (
            f"{len(superseded)} earlier version(s) of re-sent instances not used (a newer version of each was "
            f"read): {', '.join(superseded)}")])
    return evaluation


def _same_analysis(stored: Mapping, metrics: Mapping) -> bool:
    """Whether a stored result comes from the same localisation (automatic, or the same centres by hand)."""
    def centres(m):
        return [[round(float(v), 6) for v in s.get("centre_mm") or ()] for s in m.get("spheres") or ()]
    return stored.get("localisation") == metrics.get("localisation") and centres(stored) == centres(metrics)


def record_evaluation(session: Session, series: Series, evaluation: PhantomEvaluation, *, scope: str):
    """Store a phantom result and update the scanner's accreditation for the standard and scope.

    Idempotent: the same series, input checksum, standard version, corelab version and
    localisation (automatic, or the same centres by hand) is stored once; recording it again
    returns the stored result. A withheld result is stored like any other (the history shows it)
    but the register ignores it: it grants, fails, suspends or expires nothing.
    """
    input_sha256 = series.checksum or evaluation.input_sha256
    rows = session.exec(select(PhantomResult).where(
        PhantomResult.series_id == series.id, PhantomResult.input_sha256 == input_sha256,
        PhantomResult.standard == evaluation.standard, PhantomResult.standard_version == evaluation.standard_version,
        PhantomResult.corelab_version == evaluation.corelab_version)).all()
    # The same analysis of the same fill sheet: a corrected sheet is a new result even where the
    # numbers happen to agree (the result records the sheet it was judged against).
    stored = next((r for r in rows if _same_analysis(r.metrics or {}, evaluation.metrics)
                   and (r.fill or {}) == (evaluation.fill or {})), None)
    if stored is not None:
        move(session, series, qc_state="done", actor="accreditation", reason="phantom analysed (result already stored)",
             detail={"phantom_result_id": stored.id})
        acc = None
        if series.scanner_id is not None:
            acc = update_accreditation(session, series.scanner_id, standard=evaluation.standard, scope=scope)
        return stored, acc
    result = PhantomResult(series_id=series.id, scanner_id=series.scanner_id, kind=evaluation.kind,
                           standard=evaluation.standard, standard_version=evaluation.standard_version,
                           verdict=evaluation.verdict, metrics={**evaluation.metrics, "checks": evaluation.checks,
                                                                "notes": evaluation.notes,
                                                                **({"withheld": evaluation.withheld}
                                                                   if evaluation.withheld else {})},
                           fill=evaluation.fill, corelab_version=evaluation.corelab_version,
                           input_sha256=input_sha256, scan_date=evaluation.scan_date)
    session.add(result)
    session.flush()
    move(session, series, qc_state="done", actor="accreditation", reason="phantom analysed",
         detail={"phantom_result_id": result.id, "verdict": result.verdict})
    acc = None
    if series.scanner_id is not None:
        acc = update_accreditation(session, series.scanner_id, standard=evaluation.standard, scope=scope)
    return result, acc
