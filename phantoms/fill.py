"""Phantom fill sheets: the true activity concentrations, and their decay to the scan.

A fill sheet is a YAML file the site sends with its phantom scan::

    kind: nema_iec                 # or uniform_cylinder; optional, see below
    scanner: A01-1                 # optional: the core lab's scanner code
    sphere_kbq_ml: 20.0            # NEMA IEC: sphere fill at reference_time
    background_kbq_ml: 2.0         # NEMA IEC: background fill at reference_time
    lung_kbq_ml: 0.0               # NEMA IEC, optional: lung insert fill (normally cold)
    concentration_kbq_ml: 5.0      # uniform cylinder: fill at reference_time
    reference_time: 2031-03-04T09:15:00   # ISO 8601, when the concentrations above held
    radionuclide: F-18
    half_life_s: 6586.2            # optional; known radionuclides have a default

Without ``kind``, the concentrations say which phantom it is: sphere and background
concentrations (and no cylinder concentration) make a NEMA IEC fill sheet, a cylinder
concentration alone a uniform-cylinder one. Anything else (both, neither, a sphere
concentration without a background one) is refused, asking for ``kind``. The fill sheet records
how its kind was known (:attr:`FillSheet.kind_source`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HALF_LIFE_S = {"F-18": 6586.2, "C-11": 1221.8, "Ga-68": 4062.6, "Zr-89": 282276.0, "Cu-64": 45721.0}
_CONCENTRATIONS = ("sphere_kbq_ml", "background_kbq_ml", "concentration_kbq_ml", "lung_kbq_ml")


class FillSheetError(ValueError):
    """A fill sheet is incomplete or malformed; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class FillSheet:
    kind: str
    reference_time: dt.datetime
    radionuclide: str
    half_life_s: float
    concentrations_kbq_ml: dict[str, float]
    scanner: str | None = None
    source: str = ""
    half_life_given: bool = False
    kind_source: str = "given"  # or what it was inferred from, see infer_kind

    def decay_factor(self, scan_time: dt.datetime | None) -> float:
        """Fraction of the reference-time activity left at ``scan_time`` (1.0 when unknown)."""
        if scan_time is None:
            return 1.0
        elapsed_s = (scan_time - self.reference_time).total_seconds()
        return 2.0 ** (-elapsed_s / self.half_life_s)


@dataclass(frozen=True)
class TrueConcentrations:
    """The concentrations an analysis compares against, and where each came from."""

    values_kbq_ml: dict[str, float]
    decay_factor: float
    scan_time: dt.datetime | None
    provenance: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"values_kbq_ml": self.values_kbq_ml, "decay_factor": self.decay_factor,
                "scan_time": self.scan_time.isoformat() if self.scan_time else None,
                "provenance": self.provenance}


def _present(doc: dict, key: str) -> bool:
    return doc.get(key) not in (None, "")


def infer_kind(doc: dict) -> tuple[str, str] | None:
    """The phantom kind of a fill sheet without ``kind``, from its concentrations.

    Returns ``(kind, why)``: ``nema_iec`` when it has ``sphere_kbq_ml`` and ``background_kbq_ml``
    and no ``concentration_kbq_ml``; ``uniform_cylinder`` when it has ``concentration_kbq_ml``
    and neither sphere nor background concentration. None when they do not say (both kinds'
    keys, neither, or a sphere concentration without a background one).
    """
    sphere, background = _present(doc, "sphere_kbq_ml"), _present(doc, "background_kbq_ml")
    cylinder = _present(doc, "concentration_kbq_ml")
    if sphere and background and not cylinder:
        return "nema_iec", "inferred: sphere_kbq_ml and background_kbq_ml, no kind given"
    if cylinder and not (sphere or background):
        return "uniform_cylinder", "inferred: concentration_kbq_ml alone, no kind given"
    return None


def parse_fill_sheet(doc: dict, *, source: str = "fill sheet") -> FillSheet:
    kind, kind_source = doc.get("kind"), "given"
    if kind in (None, ""):
        kind, kind_source = infer_kind(doc) or (kind, kind_source)
    if kind not in ("nema_iec", "uniform_cylinder"):
        hint = ("" if kind not in (None, "") else
                "; without it the concentrations must say: sphere_kbq_ml and background_kbq_ml (NEMA IEC) "
                "or concentration_kbq_ml alone (uniform cylinder)")
        raise FillSheetError(f"{source}: 'kind' is {kind!r}; use nema_iec or uniform_cylinder{hint}")
    needed = ("sphere_kbq_ml", "background_kbq_ml") if kind == "nema_iec" else ("concentration_kbq_ml",)
    for key in needed + ("reference_time", "radionuclide"):
        if doc.get(key) in (None, ""):
            raise FillSheetError(f"{source}: '{key}' is missing; a {kind} fill sheet needs "
                                 f"{', '.join(needed)}, reference_time (ISO 8601) and radionuclide")
    ref = doc["reference_time"]
    try:
        reference_time = ref if isinstance(ref, dt.datetime) else dt.datetime.fromisoformat(str(ref))
    except ValueError:
        raise FillSheetError(f"{source}: reference_time {ref!r} is not ISO 8601 (e.g. 2031-03-04T09:15:00)") from None
    if reference_time.tzinfo is not None:  # DICOM times are local wall-clock times without zone
        reference_time = reference_time.replace(tzinfo=None)
    half_life = doc.get("half_life_s") or HALF_LIFE_S.get(str(doc["radionuclide"]))
    if not half_life:
        raise FillSheetError(f"{source}: no half_life_s and radionuclide {doc['radionuclide']!r} is not one of "
                             f"{sorted(HALF_LIFE_S)}; add half_life_s")
    concentrations = {}
    for key in _CONCENTRATIONS:
        if doc.get(key) is not None:
            value = float(doc[key])
            if value < 0:
                raise FillSheetError(f"{source}: '{key}' is {value} kBq/mL; concentrations cannot be negative")
            concentrations[key] = value
    return FillSheet(kind=kind, reference_time=reference_time, radionuclide=str(doc["radionuclide"]),
                     half_life_s=float(half_life), concentrations_kbq_ml=concentrations,
                     scanner=doc.get("scanner"), source=source, half_life_given=bool(doc.get("half_life_s")),
                     kind_source=kind_source)


def load_fill_sheet(path: Path) -> FillSheet:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise FillSheetError(f"{path}: not valid YAML ({exc})") from None
    return parse_fill_sheet(doc or {}, source=str(path))


def true_concentrations(fill: FillSheet, scan_time: dt.datetime | None) -> TrueConcentrations:
    """Fill concentrations decay-corrected to the scan reference time.

    Without a scan time in the images (no series/acquisition times), the fill values are taken as
    at scan time, and the provenance says so.
    """
    factor = fill.decay_factor(scan_time)
    values = {k: v * factor for k, v in fill.concentrations_kbq_ml.items()}
    if scan_time is None:
        why = f"{fill.source} as filled; the images carry no scan time, so no decay correction"
    else:
        why = (f"{fill.source} at {fill.reference_time.isoformat()}, decayed to the scan reference time "
               f"{scan_time.isoformat()} (factor {factor:.5f}, half-life {fill.half_life_s} s)")
    return TrueConcentrations(values, factor, scan_time, {k: why for k in values})
