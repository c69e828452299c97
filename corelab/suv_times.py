"""The times of an SUV calculation: scan reference, injection and the decay of the dose between them.

DICOM DA/TM/DT parsing (messages carry times of day, never calendar dates), the QIBA Appendix G
scan reference time per slice (DecayCorrection START), the decay-weighted mid-frame time of each
slice (NONE), the injection time (with the midnight crossing) and the dose decayed to each
slice's reference time. Rules and references: :mod:`corelab.suv`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from corelab.suv_headers import _get, _number, _series_value
from corelab.suv_result import SuvError, SuvWarning

__all__ = ["LONG_UPTAKE_HALF_LIVES", "average_count_rate_time_s"]

#: Uptake longer than this many half-lives gives the warning ``uptake_long`` (wrong date?).
LONG_UPTAKE_HALF_LIVES = 10.0


def _parse_tm(value: str, keyword: str) -> dt.timedelta:
    text = str(value).strip().replace(":", "")
    whole, _, frac = text.partition(".")
    try:
        if len(whole) not in (2, 4, 6) or not whole.isdigit():
            raise ValueError
        hours = int(whole[0:2])
        minutes = int(whole[2:4]) if len(whole) >= 4 else 0
        seconds = int(whole[4:6]) if len(whole) >= 6 else 0
        micro = int((frac + "000000")[:6]) if frac else 0
        if hours > 23 or minutes > 59 or seconds > 60:
            raise ValueError
    except ValueError:
        raise SuvError("unparseable_value",
                       f"{keyword} is {text!r}, not a DICOM time (HHMMSS.FFFFFF); the site should "
                       f"correct it.", attribute=keyword) from None
    return dt.timedelta(hours=hours, minutes=minutes, seconds=seconds, microseconds=micro)


def _parse_da(value: str, keyword: str) -> dt.datetime:
    text = str(value).strip().replace(".", "").replace("-", "")
    try:
        return dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        # The value is a date: do not echo it (dates can identify a patient).
        raise SuvError("unparseable_value",
                       f"{keyword} is not a DICOM date (YYYYMMDD); the site should correct it.",
                       attribute=keyword) from None


def _parse_dt(value: str, keyword: str) -> dt.datetime:
    """DICOM DT ``YYYYMMDDHHMMSS.FFFFFF&ZZXX``; a UTC offset is ignored (scanner local time)."""
    text = str(value).strip()
    for sign in ("+", "-"):
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    if len(text) < 8:
        raise SuvError("unparseable_value",
                       f"{keyword} is not a DICOM datetime (YYYYMMDDHHMMSS.FFFFFF); the site "
                       f"should correct it.", attribute=keyword)
    day = _parse_da(text[:8], keyword)
    rest = text[8:]
    if not rest:
        return day
    if "." not in rest and len(rest) % 2:
        raise SuvError("unparseable_value", f"{keyword} has an incomplete time part; the site "
                       f"should correct it.", attribute=keyword)
    return day + _parse_tm(rest, keyword)


def _clock(when: dt.datetime) -> str:
    """Time of day only: messages must not carry calendar dates."""
    return when.strftime("%H:%M:%S.%f").rstrip("0").rstrip(".")


def average_count_rate_time_s(frame_duration_s: float, half_life_s: float) -> float:
    """Time after frame start at which activity equals its frame average (decay-weighted mid-frame).

    Parameters
    ----------
    frame_duration_s : float
        Frame duration, s (ActualFrameDuration / 1000).
    half_life_s : float
        Radionuclide half-life, s.

    Returns
    -------
    t_s : float
        ``(1/lambda) * ln(lambda*D / (1 - exp(-lambda*D)))`` with ``lambda = ln 2 / half_life_s``
        and ``D = frame_duration_s`` (QIBA Profile Appendix G); tends to ``D/2`` as
        ``lambda*D -> 0`` and is ``D/2 - lambda*D**2/24`` to second order.

    Examples
    --------
    >>> round(average_count_rate_time_s(120.0, 6586.2), 4)
    59.9369
    """
    if frame_duration_s <= 0:
        return 0.0
    decay_constant = math.log(2.0) / half_life_s
    decay_during_frame = decay_constant * frame_duration_s
    return math.log(decay_during_frame / -math.expm1(-decay_during_frame)) / decay_constant


def _acquisition_datetimes(headers: Sequence[Mapping[str, Any]]) -> list[dt.datetime | None]:
    out: list[dt.datetime | None] = []
    for h in headers:
        adt = _get(h, "AcquisitionDateTime")
        ad, at = _get(h, "AcquisitionDate"), _get(h, "AcquisitionTime")
        if ad is not None and at is not None:
            out.append(_parse_da(ad, "AcquisitionDate") + _parse_tm(at, "AcquisitionTime"))
        elif adt is not None:
            out.append(_parse_dt(adt, "AcquisitionDateTime"))
        else:
            out.append(None)
    return out


def _frame_durations_s(headers: Sequence[Mapping[str, Any]]) -> list[float | None]:
    values = [_number(_get(h, "ActualFrameDuration"), "ActualFrameDuration") for h in headers]
    return [v / 1000.0 if v is not None else None for v in values]


def _scan_reference(headers, series_dt, half_life_s, warnings):
    """QIBA Appendix G scan reference time per slice (DecayCorrection START)."""
    acquisitions = _acquisition_datetimes(headers)
    known = [a for a in acquisitions if a is not None]
    earliest = min(known) if known else None
    n = len(headers)
    if series_dt is None and earliest is None:
        raise SuvError("missing_scan_time",
                       "SeriesDate/SeriesTime and AcquisitionDate/AcquisitionTime (or "
                       "AcquisitionDateTime) are all missing or empty, so the scan time is "
                       "unknown. The site should resend the series with the scanner's dates and "
                       "times.", attribute="SeriesTime")
    if series_dt is not None and (earliest is None or series_dt <= earliest):
        return [series_dt] * n, "series"
    if series_dt is None:
        warnings.append(SuvWarning("missing_series_time",
                                   "SeriesDate/SeriesTime missing: the acquisition times were used "
                                   "as the scan reference."))
    else:
        warnings.append(SuvWarning(
            "series_after_acquisition",
            f"SeriesTime {_clock(series_dt)} is after the earliest AcquisitionTime "
            f"{_clock(earliest)} (post-processed series); the scan reference was taken from the "
            f"acquisition times (QIBA Appendix G)."))
    ge = {_get(h, "GEPrivatePostInjectionDateTime") for h in headers} - {None}
    if ge:
        ge_dt = _parse_dt(sorted(ge)[0], "GEPrivatePostInjectionDateTime (0009,100D)")
        return [ge_dt] * n, "ge_private"
    frame_refs = [_number(_get(h, "FrameReferenceTime"), "FrameReferenceTime") for h in headers]
    durations = _frame_durations_s(headers)
    if half_life_s is not None and all(a is not None for a in acquisitions) and all(
            (r or 0) > 0 for r in frame_refs) and all((d or 0) > 0 for d in durations):
        # Siemens PETsyngo multi-bed logic: AcquisitionTime is the start of the bed position;
        # FrameReferenceTime (ms) is the offset of the average-count-rate time from the scan start.
        refs = [a - dt.timedelta(seconds=r / 1000.0)
                + dt.timedelta(seconds=average_count_rate_time_s(d, half_life_s))
                for a, r, d in zip(acquisitions, frame_refs, durations)]
        return refs, "acquisition_frame_reference"
    return [earliest] * n, "earliest_acquisition"


def _injection(headers, scan_ref: dt.datetime, warnings) -> tuple[dt.datetime, str]:
    start_dt = _series_value(headers, "RadiopharmaceuticalStartDateTime")
    if start_dt is not None:
        return _parse_dt(start_dt, "RadiopharmaceuticalStartDateTime"), \
            "RadiopharmaceuticalStartDateTime"
    start_tm = _series_value(headers, "RadiopharmaceuticalStartTime")
    if start_tm is None:
        raise SuvError("missing_injection_time",
                       "RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime are "
                       "both missing or empty, so the uptake time and the decay of the dose are "
                       "unknown. The site should record the injection time in "
                       "RadiopharmaceuticalInformationSequence and resend.",
                       attribute="RadiopharmaceuticalStartTime")
    day = dt.datetime(scan_ref.year, scan_ref.month, scan_ref.day)
    injection = day + _parse_tm(start_tm, "RadiopharmaceuticalStartTime")
    if injection > scan_ref:
        injection -= dt.timedelta(days=1)
        warnings.append(SuvWarning(
            "midnight_crossing",
            f"RadiopharmaceuticalStartTime {_clock(injection)} is after the scan reference time "
            f"{_clock(scan_ref)}; the injection was taken to be on the previous day "
            f"(uptake {(scan_ref - injection).total_seconds() / 60:.1f} min). Sites should send "
            f"RadiopharmaceuticalStartDateTime."))
    return injection, "RadiopharmaceuticalStartTime"


def _series_datetime(headers: Sequence[Mapping[str, Any]]) -> dt.datetime | None:
    """SeriesDate + SeriesTime of the series, or None when either is missing."""
    series_date = _series_value(headers, "SeriesDate")
    series_time = _series_value(headers, "SeriesTime")
    return (_parse_da(series_date, "SeriesDate") + _parse_tm(series_time, "SeriesTime")
            if series_date is not None and series_time is not None else None)


def _informative_times(headers, series_dt, half_life_s, warnings) -> dict[str, Any]:
    """DecayCorrection ADMIN: the scan, injection and uptake times, which the factor does not need.

    When they cannot be derived the warning ``uptake_unknown`` is added and nothing is returned.
    """
    try:  # times are informative only here
        refs, source = _scan_reference(headers, series_dt, half_life_s, [])
        injection, injection_source = _injection(headers, min(refs), [])
    except SuvError:
        warnings.append(SuvWarning("uptake_unknown", "DecayCorrection ADMIN: the factor needs "
                                   "no times, but the uptake time could not be derived."))
        return {}
    return dict(scan_datetime=min(refs), slice_scan_datetimes=tuple(refs), scan_time_source=source,
                injection_datetime=injection, injection_time_source=injection_source,
                uptake_min=(min(refs) - injection).total_seconds() / 60.0)


def _slice_mid_frame(headers, half_life_s: float) -> tuple[list[dt.datetime], str]:
    """DecayCorrection NONE: each slice decayed to its own frame (decay-weighted mid-frame time)."""
    acquisitions = _acquisition_datetimes(headers)
    durations = _frame_durations_s(headers)
    for i, (a, d) in enumerate(zip(acquisitions, durations)):
        if a is None:
            raise SuvError("missing_scan_time",
                           f"DecayCorrection is NONE, so each slice is decayed to its own "
                           f"acquisition time, but slice {i} has no AcquisitionDate/"
                           f"AcquisitionTime (or AcquisitionDateTime). The site should resend "
                           f"the series with acquisition times.", attribute="AcquisitionTime")
        if d is None or d <= 0:
            raise SuvError("missing_frame_duration",
                           f"DecayCorrection is NONE, so each slice is decayed to the middle "
                           f"of its frame, but slice {i} has ActualFrameDuration "
                           f"{'missing' if d is None else f'{d * 1000:g} ms'}. The site should "
                           f"resend the series with ActualFrameDuration (ms).",
                           attribute="ActualFrameDuration")
    refs = [a + dt.timedelta(seconds=average_count_rate_time_s(d, half_life_s))
            for a, d in zip(acquisitions, durations)]
    return refs, "slice_mid_frame"


def _decay(dose_bq: float, half_life_s: float, refs, source: str, injection: dt.datetime,
           injection_source: str, warnings) -> tuple[list[float], float]:
    """Dose decayed from the injection to each slice's reference time, and the uptake in s.

    The uptake runs from the injection to the earliest reference time; longer than
    ``LONG_UPTAKE_HALF_LIVES`` half-lives gives the warning ``uptake_long``.
    """
    scan_dt = min(refs)
    decayed = []
    for ref in refs:
        decay_s = (ref - injection).total_seconds()
        if decay_s < 0:
            raise SuvError("injection_after_scan",
                           f"The injection time {_clock(injection)} ({injection_source}) is "
                           f"{-decay_s / 60:.1f} min after the scan reference time {_clock(ref)} "
                           f"({source}). The site should correct the injection or scan time "
                           f"(scanner and dose-calibrator clocks) and resend.",
                           attribute=injection_source)
        decayed.append(dose_bq * 2.0 ** (-decay_s / half_life_s))
    uptake_s = (scan_dt - injection).total_seconds()
    if uptake_s > LONG_UPTAKE_HALF_LIVES * half_life_s:
        warnings.append(SuvWarning(
            "uptake_long",
            f"Uptake time {uptake_s / 60:.1f} min exceeds {LONG_UPTAKE_HALF_LIVES:g} half-lives "
            f"({half_life_s:g} s): check the injection date and time."))
    return decayed, uptake_s
