"""The vocabulary of one SUV calculation: its error, its warnings and its result.

:class:`SuvError` (SUV cannot be computed, with a machine-readable code), :class:`SuvWarning` (a
finding that did not stop the calculation) and :class:`SuvResult` (the factor per slice with the
values it rests on). The calculation itself is :func:`corelab.suv.suvbw_factors`; the rules are in
the docstring of :mod:`corelab.suv`.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, fields
from typing import Any

from corelab.body_size import Normalisation, normalisation

__all__ = ["SuvError", "SuvResult", "SuvWarning"]


class SuvError(ValueError):
    """SUV cannot be computed for this series.

    Parameters
    ----------
    code : str
        Machine-readable reason, e.g. ``missing_weight``, ``missing_dose``,
        ``missing_half_life``, ``missing_injection_time``, ``missing_scan_time``,
        ``missing_units``, ``missing_decay_correction``, ``missing_frame_duration``,
        ``unsupported_units``, ``unsupported_decay_correction``,
        ``missing_philips_scale_factor``, ``philips_not_convertible`` (factor 0),
        ``philips_private_creator_mismatch``, ``dose_looks_like_bq``, ``dose_implausible``,
        ``injection_after_scan``, ``not_attenuation_corrected``, ``inconsistent_series``,
        ``unparseable_value``, ``no_slices``; GML/CM2ML: the codes of
        :class:`corelab.body_size.BodySizeError`.
    message : str
        What is wrong (attribute keyword, value found, unit assumed) and what the site should fix.
    attribute : str, optional
        DICOM keyword of the offending attribute, if there is one.
    """

    def __init__(self, code: str, message: str, *, attribute: str | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.attribute = attribute


@dataclass(frozen=True)
class SuvWarning:
    """A condition that did not stop the calculation but that a physicist should see.

    Codes: ``series_after_acquisition``, ``missing_series_time``, ``midnight_crossing``,
    ``uptake_long``, ``uptake_unknown`` (ADMIN), ``weight_implausible``,
    ``corrected_image_missing``, ``decay_flags_contradict``, ``gml_assumed_suvbw``,
    ``philips_factors_disagree``, ``philips_private_creator_missing``, ``dose_looks_like_mbq``,
    ``weight_looks_like_grams``, ``sex_not_specified`` (mean of the male and female values).
    """

    code: str
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


@dataclass(frozen=True)
class SuvResult:
    """SUVbw scale factors of one series, with the intermediate values that produced them.

    Attributes
    ----------
    factors_g_per_bq : tuple of float
        One factor per slice, in the order of the input headers, in g/Bq (g/mL per Bq/mL).
        Multiplies the real-world value (stored * RescaleSlope + RescaleIntercept). For GML and
        CM2ML it is ``weight_g / N_x`` (dimensionless for GML, g/cm2 for CM2ML).
    units_path : str
        ``"BQML"``, ``"GML"``, ``"CM2ML"``, ``"CNTS-philips-suv"`` or ``"CNTS-philips-activity"``.
    suv_type : str
        SUV Type (0054,1006) converted from: GML/CM2ML as read (absent: ``BW``/``BSA``); ``BW``
        for BQML and CNTS.
    normalisation : corelab.body_size.Normalisation
        The body size divided out (name, value with unit, sex used); ``bw`` for SUVbw.
    decay_correction : str or None
        DecayCorrection (0054,1102): ``START``, ``ADMIN`` or ``NONE``.
    weight_kg : float or None
        PatientWeight (0010,1030), kg (divided by 1000 when it was entered in g).
    dose_bq : float or None
        Injected activity in Bq (converted from MBq for Enhanced PET).
    dose_unit_assumed : str or None
        ``"Bq"`` or ``"MBq"``: how RadionuclideTotalDose was read.
    half_life_s : float or None
        RadionuclideHalfLife (0018,1075), s.
    decayed_dose_bq : float or None
        Dose decayed to ``scan_datetime`` (equal to ``dose_bq`` for ADMIN).
    slice_decayed_dose_bq : tuple of float
        Decayed dose per slice actually used in the factor (empty when no dose is used).
    scan_datetime : datetime or None
        Scan reference time of the series (earliest of the per-slice reference times).
    slice_scan_datetimes : tuple of datetime or None
        Decay reference time per slice.
    scan_time_source : str or None
        ``"series"``, ``"ge_private"``, ``"acquisition_frame_reference"``,
        ``"earliest_acquisition"`` or ``"slice_mid_frame"`` (DecayCorrection NONE).
    injection_datetime : datetime or None
        Radiopharmaceutical start (injection) datetime used.
    injection_time_source : str or None
        ``"RadiopharmaceuticalStartDateTime"`` or ``"RadiopharmaceuticalStartTime"``.
    uptake_min : float or None
        ``scan_datetime - injection_datetime`` in minutes.
    warnings : tuple of SuvWarning
        Non-fatal findings (codes listed in :class:`SuvWarning`).
    """

    factors_g_per_bq: tuple[float, ...]
    units_path: str
    decay_correction: str | None = None
    weight_kg: float | None = None
    dose_bq: float | None = None
    dose_unit_assumed: str | None = None
    half_life_s: float | None = None
    decayed_dose_bq: float | None = None
    slice_decayed_dose_bq: tuple[float, ...] = ()
    scan_datetime: dt.datetime | None = None
    slice_scan_datetimes: tuple[dt.datetime | None, ...] = ()
    scan_time_source: str | None = None
    injection_datetime: dt.datetime | None = None
    injection_time_source: str | None = None
    uptake_min: float | None = None
    warnings: tuple[SuvWarning, ...] = field(default_factory=tuple)
    suv_type: str = "BW"
    normalisation: Normalisation | None = None

    def __post_init__(self) -> None:  # BQML, CNTS: SUVbw, normalised by the body weight
        if self.normalisation is None:
            object.__setattr__(self, "normalisation", normalisation("BW", weight_kg=self.weight_kg))

    @property
    def factor_g_per_bq(self) -> float | None:
        """The series factor if every slice has the same one (within 1e-9 relative), else None."""
        first = self.factors_g_per_bq[0]
        if all(math.isclose(f, first, rel_tol=1e-9, abs_tol=0.0) for f in self.factors_g_per_bq):
            return first
        return None

    @property
    def warning_codes(self) -> tuple[str, ...]:
        return tuple(w.code for w in self.warnings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every attribute plus ``factor_g_per_bq`` (datetimes as ISO 8601
        strings, warnings as code/message dicts, ``normalisation`` as a dict)."""

        def plain(value: Any) -> Any:
            if isinstance(value, dt.datetime):
                return value.isoformat()
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, SuvWarning):
                return {"code": value.code, "message": value.message}
            return value.to_dict() if isinstance(value, Normalisation) else value

        out = {f.name: plain(getattr(self, f.name)) for f in fields(self)}
        return {"factors_g_per_bq": out.pop("factors_g_per_bq"), "factor_g_per_bq": self.factor_g_per_bq,
                **out}
