"""Accreditation standards as data, and verdicts against them.

A standard is one YAML file in ``accreditation/standards/`` (``EARL1.yaml``, ``EARL2.yaml``): a
new or revised standard is a new file, not a code change. Each band is ``[low, high]``
inclusive; the *margin* of a value is its distance to the nearer band edge, positive inside
the band and negative outside.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from phantoms.results import CylinderResult, NemaIecResult

__all__ = [
    "Band",
    "Standard",
    "Check",
    "Verdict",
    "StandardError",
    "load_standard",
    "verdict",
    "STANDARDS_DIR",
]

STANDARDS_DIR = Path(__file__).with_name("standards")
"""Folder of the bundled standard files."""


def _json_safe(value):
    """Plain JSON types: NaN -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class StandardError(ValueError):
    """A standard file is missing or malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Band:
    """An inclusive acceptance band ``[low, high]``."""

    low: float
    high: float
    verified: bool = True

    def margin(self, value: float) -> float:
        """Distance to the nearer edge: positive inside, negative outside, NaN for NaN."""
        return min(value - self.low, self.high - value)


@dataclass(frozen=True)
class Standard:
    """An accreditation standard.

    Attributes
    ----------
    name, version, source : str
        Identity and citation.
    metrics : mapping
        ``{metric: {sphere diameter mm: Band}}`` for the IEC phantom (``rc_mean``, ``rc_max``,
        ``rc_peak``), matching attribute names of :class:`phantoms.results.SphereResult`.
    calibration : mapping
        ``{metric: Band}`` for the uniform cylinder (``calibration_bias_pct``), matching
        :class:`phantoms.results.CylinderResult`.
    """

    name: str
    version: str
    source: str
    metrics: Mapping[str, Mapping[float, Band]]
    calibration: Mapping[str, Band]


@dataclass(frozen=True)
class Check:
    """One value checked against one band (``diameter_mm`` is None for calibration)."""

    metric: str
    diameter_mm: float | None
    value: float
    low: float
    high: float
    margin: float
    passed: bool
    verified: bool


@dataclass(frozen=True)
class Verdict:
    """Checks of one result against one standard.

    ``passed`` is True only if every check that counts passed; checks on unverified bands count
    only when requested (see :func:`verdict`). ``not_evaluated`` names the metrics of the
    standard the result does not provide.
    """

    standard: str
    version: str
    passed: bool
    checks: tuple[Check, ...]
    not_evaluated: tuple[str, ...] = ()
    include_unverified: bool = False

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict:
        """JSON-ready dict (a NaN value or margin becomes None)."""
        return _json_safe(asdict(self))


def _band(raw, where: str, verified: bool) -> Band:
    if not (isinstance(raw, (list, tuple)) and len(raw) == 2):
        raise StandardError(f"{where}: expected [low, high], got {raw!r}")
    low, high = (float(v) for v in raw)
    if low > high:
        raise StandardError(f"{where}: low {low} > high {high}")
    return Band(low, high, verified)


def load_standard(name: str | Path) -> Standard:
    """Read a standard from its YAML file.

    Parameters
    ----------
    name : str or Path
        A bundled standard (``"EARL1"``, ``"EARL2"``) or the path of a YAML file.

    Returns
    -------
    Standard
    """
    path = Path(name)
    if path.suffix.lower() not in (".yaml", ".yml"):
        path = STANDARDS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in STANDARDS_DIR.glob("*.yaml"))
        raise StandardError(f"standard {str(name)!r} not found at {path}; bundled: {known}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("name", "version", "source"):
        if key not in raw:
            raise StandardError(f"{path}: missing {key!r}")
    metrics = {}
    for metric, spec in (raw.get("metrics") or {}).items():
        verified = bool(spec.get("verified", False))
        metrics[metric] = {
            float(d): _band(b, f"{path}: metrics.{metric}.{d}", verified) for d, b in spec["bands"].items()
        }
    calibration = {
        metric: _band(spec["band"], f"{path}: calibration.{metric}", bool(spec.get("verified", False)))
        for metric, spec in (raw.get("calibration") or {}).items()
    }
    source = " ".join(str(raw["source"]).split())
    return Standard(str(raw["name"]), str(raw["version"]), source, metrics, calibration)


def _check(metric: str, diameter: float | None, value: float, band: Band) -> Check:
    value = float(value)
    margin = band.margin(value)
    passed = not math.isnan(margin) and margin >= 0.0
    return Check(metric, diameter, value, band.low, band.high, margin, passed, band.verified)


def verdict(
    result: NemaIecResult | CylinderResult, standard: Standard, *, include_unverified: bool = False
) -> Verdict:
    """Check a phantom result against a standard.

    Parameters
    ----------
    result : NemaIecResult or CylinderResult
        IEC results are checked per sphere and per metric of ``standard.metrics``; cylinder
        results against ``standard.calibration``.
    standard : Standard
    include_unverified : bool
        Let checks on bands marked ``verified: false`` (EARL2 RCpeak) decide the overall
        verdict. They are always reported.

    Returns
    -------
    Verdict
    """
    checks: list[Check] = []
    missing: list[str] = []
    if isinstance(result, NemaIecResult):
        for metric, bands in standard.metrics.items():
            for diameter, band in sorted(bands.items()):
                try:
                    value = getattr(result.sphere(diameter), metric)
                except (KeyError, AttributeError):
                    missing.append(f"{metric} {diameter:g} mm")
                    continue
                checks.append(_check(metric, diameter, value, band))
    elif isinstance(result, CylinderResult):
        for metric, band in standard.calibration.items():
            if not hasattr(result, metric):
                missing.append(metric)
                continue
            checks.append(_check(metric, None, getattr(result, metric), band))
    else:
        raise TypeError(f"no verdict for a {type(result).__name__}")
    counted = [c for c in checks if c.verified or include_unverified]
    passed = bool(counted) and all(c.passed for c in counted) and not missing
    return Verdict(standard.name, standard.version, passed, tuple(checks), tuple(missing), include_unverified)
