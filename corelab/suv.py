"""Vendor-neutral body-weight SUV (SUVbw) scale factors for one PET series.

Pure functions: no Prefect, no database, no logging of header values. Input is one header per
slice, either a pydicom :class:`~pydicom.dataset.Dataset` or a plain mapping of DICOM keywords
(the shape of the calculate-suv JSON fixtures, see :func:`header_from_dataset`). Output is a
per-slice factor in g/Bq that multiplies the *real-world* value of each slice::

    SUVbw = (stored * RescaleSlope + RescaleIntercept) * factor_g_per_bq[slice]

RescaleSlope may differ per slice (GE), so it must be applied per slice before the factor.

The rules follow the QIBA FDG-PET/CT Profile, Appendix G (vendor-neutral SUV pseudo-code) [1]_
and the PET Image and Enhanced PET modules of DICOM PS3.3 (C.8.9.1, C.8.9.2, C.8.22) [2]_:

* Units ``BQML``: ``factor = weight_kg * 1000 / decayed_dose_bq``.
* DecayCorrection ``START``: the dose is decayed from injection to the scan reference time.
  ``ADMIN``: images are already corrected to the injection time; the dose is not decayed.
  ``NONE``: each slice is decayed to its own frame, at the decay-weighted mid-frame time
  (see Notes).
* Scan reference time: SeriesDate/SeriesTime when not after the earliest AcquisitionDate/Time of
  the series; otherwise (post-processed series) the GE private post-injection datetime
  (0009,100D) if present, else per slice ``AcquisitionDateTime - FrameReferenceTime/1000 +
  average-count-rate time within the frame`` when every slice has FrameReferenceTime > 0 and
  ActualFrameDuration > 0 (both in ms), else the earliest AcquisitionDateTime.
* Injection time: RadiopharmaceuticalStartDateTime, else RadiopharmaceuticalStartTime on the date
  of the scan reference time (the series date in the ordinary case), moved to the previous day
  when that time of day falls after the scan (midnight crossing).
* Units ``GML``/``CM2ML``: an SUV of the SUV Type (0054,1006), converted by ``weight_g / N_x``
  (:mod:`corelab.body_size`). Units ``CNTS`` (Philips): private SUV factor (7053,1000) if positive,
  else activity-concentration factor (7053,1009) times the BQML factor; read without their
  creator (7053,0010) with a warning, refused when (7053,0010) names another block. Others: refused.
* RadionuclideTotalDose is in Bq in PET Image Storage and in MBq in Enhanced PET Image Storage. A
  classic dose below ``MIN_PLAUSIBLE_DOSE_BQ`` is taken as MBq and PatientWeight above
  ``GRAMS_WEIGHT_ABOVE`` as g, with a warning (the entry stays a deviation for QC to report).

When SUV cannot be computed :class:`SuvError` is raised. Its ``code`` is machine-readable and its
message names the attribute, the (non-identifying) value found and what the site should fix.
Messages never contain patient names, IDs or calendar dates (times of day and durations only).

References
----------
.. [1] QIBA FDG-PET/CT Technical Committee, "FDG-PET/CT as an Imaging Biomarker Measuring
   Response to Cancer Therapy", QIBA Profile v1.13 (2016), Appendix G "Vendor-neutral
   pseudo-code for SUV calculation".
.. [2] NEMA, DICOM PS3.3 Information Object Definitions: C.8.9.1 PET Series Module (Units,
   Decay Correction, Corrected Image, Series Date/Time), C.8.9.2 PET Isotope Module
   (Radiopharmaceutical Information Sequence), C.8.9.4 PET Image Module (Frame Reference
   Time, Actual Frame Duration), C.8.22 Enhanced PET modules.

The calculation is split by job: :mod:`corelab.suv_headers` reads the attributes (vendor private
elements included, the dose in Bq) and the flags that choose the path, :mod:`corelab.suv_times` derives the scan
reference and injection times and decays the dose, :mod:`corelab.suv_result` holds
:class:`SuvError`, :class:`SuvWarning` and :class:`SuvResult`; this module does the factor
arithmetic and holds the entry points (:func:`suvbw_factors`, :func:`suv_stats`,
:func:`suv_of_files`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from corelab.body_size import BodySizeError, patient_weight_kg, to_suvbw
from corelab.suv_headers import (_as_header, _check_corrected_image, _check_philips_creator, _decay_correction,
                                 _dose_bq, _get, _number, _philips, _require_positive, _series_value,
                                 header_from_dataset)
from corelab.suv_result import SuvError, SuvResult, SuvWarning
from corelab.suv_times import (_decay, _informative_times, _injection, _scan_reference, _series_datetime,
                               _slice_mid_frame)

__all__ = ["SuvError", "SuvResult", "SuvWarning", "header_from_dataset", "suv_of_files", "suv_stats",
           "suvbw_factors"]

#: Relative disagreement between the two Philips private factors that gives a warning.
PHILIPS_FACTOR_RTOL = 0.01


def _body_size(call, warnings: list, *args: Any, **kwargs: Any) -> Any:
    """Call a :mod:`corelab.body_size` reader: its errors become SuvError, its notes warnings."""
    try:
        value, notes = call(*args, **kwargs)
    except BodySizeError as exc:
        raise SuvError(exc.code, exc.message, attribute=exc.attribute) from None
    warnings.extend(SuvWarning(code, message) for code, message in notes)
    return value


def _bqml_factors(headers, sop_class_uid, decay_correction, warnings) -> dict[str, Any]:
    """Factor per slice for activity-concentration images (Bq/mL), with the intermediate values."""
    weight_kg = _body_size(patient_weight_kg, warnings, _number(_series_value(
        headers, "PatientWeight"), "PatientWeight"), needed_for="body weight in kg",
        patient_size=_get(headers[0], "PatientSize"))  # named in the error if it holds a weight
    dose_bq, dose_unit = _dose_bq(_series_value(headers, "RadionuclideTotalDose"), sop_class_uid,
                                  warnings)
    n = len(headers)
    series_dt = _series_datetime(headers)
    values: dict[str, Any] = {"weight_kg": weight_kg, "dose_bq": dose_bq,
                              "dose_unit_assumed": dose_unit}

    raw_half_life = _series_value(headers, "RadionuclideHalfLife")
    if decay_correction == "ADMIN":
        # Images are decay corrected to the administration time: no decay of the dose.
        half_life_s = _number(raw_half_life, "RadionuclideHalfLife")
        values.update(half_life_s=half_life_s, decayed_dose_bq=dose_bq,
                      slice_decayed_dose_bq=(dose_bq,) * n, factors=[weight_kg * 1000.0 / dose_bq] * n)
        values.update(_informative_times(headers, series_dt, half_life_s, warnings))
        return values

    half_life_s = _require_positive(
        raw_half_life, "RadionuclideHalfLife", "missing_half_life", "half-life in s for the "
        "decay of the dose", "The site should send RadionuclideHalfLife (s) in "
        "RadiopharmaceuticalInformationSequence (6586.2 s for F-18).")
    values["half_life_s"] = half_life_s

    if decay_correction == "START":
        refs, source = _scan_reference(headers, series_dt, half_life_s, warnings)
    else:  # NONE: each slice decayed to its own frame (decay-weighted mid-frame time)
        refs, source = _slice_mid_frame(headers, half_life_s)

    scan_dt = min(refs)
    injection, injection_source = _injection(headers, scan_dt, warnings)
    decayed, uptake_s = _decay(dose_bq, half_life_s, refs, source, injection, injection_source, warnings)
    values.update(
        decayed_dose_bq=dose_bq * 2.0 ** (-uptake_s / half_life_s),
        slice_decayed_dose_bq=tuple(decayed),
        factors=[weight_kg * 1000.0 / d for d in decayed],
        scan_datetime=scan_dt, slice_scan_datetimes=tuple(refs), scan_time_source=source,
        injection_datetime=injection, injection_time_source=injection_source,
        uptake_min=uptake_s / 60.0)
    return values


def suvbw_factors(headers: Sequence[Mapping[str, Any] | Any]) -> SuvResult:
    """Compute the SUVbw scale factor of every slice of one PET series.

    Parameters
    ----------
    headers : sequence of Mapping or pydicom.dataset.Dataset
        One header per slice of one series, in the order of the volume's slice axis. A mapping
        holds DICOM keywords (see :func:`header_from_dataset` for the keys; the radiopharmaceutical
        keys may be flat or inside ``RadiopharmaceuticalInformationSequence``; Philips private
        values under ``PhilipsPETPrivateGroup``); a Dataset is read with
        :func:`header_from_dataset`.

    Returns
    -------
    result : SuvResult
        ``factors_g_per_bq[i]`` multiplies the real-world value (stored * RescaleSlope +
        RescaleIntercept, Bq/mL for BQML) of slice ``i`` to give SUVbw (g/mL), plus the decayed
        dose (Bq), scan reference and injection datetimes, uptake (min), the units path taken and
        warnings.

    Raises
    ------
    SuvError
        When SUV cannot be computed; ``.code`` says why (see :class:`SuvError`) and the message
        names the attribute (and its tag), the value found and the fix. A classic header whose
        RadionuclideTotalDose is below ``MIN_PLAUSIBLE_DOSE_BQ`` (e.g. 370.0, really MBq) is not
        refused: it is converted with the warning ``dose_looks_like_mbq``.

    Notes
    -----
    QIBA FDG-PET/CT Profile Appendix G; DICOM PS3.3 C.8.9. For Units BQML,
    ``factor = weight_kg * 1000 / (dose_bq * 2 ** (-decay_s / half_life_s))``. The scan
    reference for ``START`` follows Appendix G (module docstring). The FrameReferenceTime branch
    uses the exact average-count-rate time ``(1/lambda) ln(lambda D / (1 - exp(-lambda D)))``, not
    ``D/2``: with ``D/2`` the calculate-suv fixture ``BQML_AC_DT_lessThan_S_DT_SIEMENS`` is
    missed by 6.6e-6 relative; with the exact time it agrees to 1e-12. For ``NONE`` the same
    decay-weighted mid-frame time places each slice (it is the time at which the activity equals
    its frame average, so it is exact for uncorrected images; ``D/2`` differs by
    ``lambda D**2 / 24``, 0.06 s for a 120 s F-18 frame).
    RadiopharmaceuticalStartTime alone is placed on the date of the scan reference time (the
    series date when the series time is the reference).

    Examples
    --------
    >>> h = {"Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
    ...      "SeriesDate": "20240101", "SeriesTime": "110000", "AcquisitionDate": "20240101",
    ...      "AcquisitionTime": "110000", "PatientWeight": 70.0,
    ...      "RadionuclideTotalDose": 3.7e8, "RadionuclideHalfLife": 6586.2,
    ...      "RadiopharmaceuticalStartTime": "100000"}
    >>> r = suvbw_factors([h])
    >>> r.units_path, round(r.uptake_min, 1), f"{r.factor_g_per_bq:.6e}"
    ('BQML', 60.0, '2.763367e-04')
    """
    if isinstance(headers, (Mapping, str, bytes)) or hasattr(headers, "get_private_item"):
        raise TypeError("headers must be a sequence of per-slice headers (one per slice), "
                        "not a single header")
    slices = [_as_header(h) for h in headers]
    if not slices:
        raise SuvError("no_slices", "No slice headers were given; pass one header per slice.")

    warnings: list[SuvWarning] = []
    sop_class_uid = _series_value(slices, "SOPClassUID")
    units = _series_value(slices, "Units")
    if units is None:
        raise SuvError("missing_units",
                       "Units (0054,1001) is missing or empty, so the pixel values cannot be "
                       "interpreted. The site should resend the series as exported by the scanner "
                       "(Units BQML for activity concentration).", attribute="Units")
    units = str(units).upper()

    if units in ("GML", "CM2ML"):
        return _suv_type_result(slices, units, warnings)
    if units == "CNTS":
        _check_philips_creator(slices, warnings)
        suv = [_number(_philips(h, "SUVScaleFactor"), "SUVScaleFactor (7053,1000)")
               for h in slices]
        activity = [_number(_philips(h, "ActivityConcentrationScaleFactor"),
                            "ActivityConcentrationScaleFactor (7053,1009)") for h in slices]
        has_suv = all(v is not None and v > 0 for v in suv)
        has_activity = all(v is not None and v > 0 for v in activity)
        if not (has_suv or has_activity):
            zero = " (a factor 0 means not convertible)" if 0 in suv + activity else ""
            raise SuvError("philips_not_convertible" if zero else "missing_philips_scale_factor",
                           f"Units is CNTS (scanner counts) and neither Philips private SUV scale "
                           f"factor (7053,1000) nor activity-concentration scale factor "
                           f"(7053,1009) is present and positive{zero} in every slice, so counts "
                           f"cannot be converted. The site should resend with the Philips private "
                           f"group kept (not stripped by de-identification) or reconstruct in "
                           f"BQML.", attribute="PhilipsPETPrivateGroup")
        if has_suv:
            if has_activity:
                _cross_check_philips(slices, sop_class_uid, suv, activity, warnings)
            return SuvResult(factors_g_per_bq=tuple(float(v) for v in suv),
                             units_path="CNTS-philips-suv",
                             decay_correction=_series_value(slices, "DecayCorrection"),
                             weight_kg=_number(_series_value(slices, "PatientWeight"),
                                               "PatientWeight"), warnings=tuple(warnings))
    elif units != "BQML":
        raise SuvError("unsupported_units",
                       f"Units is {units}; SUVbw is computed from BQML (Bq/mL), GML, CM2ML or "
                       f"Philips CNTS with private scale factors only. The site should send the "
                       f"attenuation- and decay-corrected series reconstructed in BQML.",
                       attribute="Units")

    decay_correction = _decay_correction(slices)
    _check_corrected_image(slices, decay_correction, warnings)
    values = _bqml_factors(slices, sop_class_uid, decay_correction, warnings)
    factors, path = values.pop("factors"), "BQML"
    if units == "CNTS":  # Philips activity-concentration factor: counts -> Bq/mL
        factors, path = [a * f for a, f in zip(activity, factors)], "CNTS-philips-activity"
    return SuvResult(factors_g_per_bq=tuple(factors), units_path=path,
                     decay_correction=decay_correction, warnings=tuple(warnings), **values)


def _suv_type_result(slices, units: str, warnings: list) -> SuvResult:
    """Units GML/CM2ML: SUVx of the SUV Type, times ``weight_g / N_x`` (:func:`to_suvbw`)."""
    suv_type = _series_value(slices, "SUVType")
    bw = units == "GML" and str(suv_type or "BW").upper() == "BW"  # height and sex not needed
    norm, factor, weight_kg = _body_size(
        to_suvbw, warnings, units, suv_type,
        weight=_number(_series_value(slices, "PatientWeight"), "PatientWeight"),
        patient_size=None if bw else _number(_series_value(slices, "PatientSize"), "PatientSize"),
        patient_sex=None if bw else _series_value(slices, "PatientSex"))
    return SuvResult((factor,) * len(slices), units_path=units, weight_kg=weight_kg,
                     decay_correction=_series_value(slices, "DecayCorrection"),
                     warnings=tuple(warnings), suv_type=norm.suv_type, normalisation=norm)

def _cross_check_philips(slices, sop_class_uid, suv, activity, warnings) -> None:
    """Both Philips factors present: the SUV factor is used; warn if the other one disagrees."""
    try:
        values = _bqml_factors(slices, sop_class_uid, _decay_correction(slices), [])
    except SuvError:
        return
    for i, (s, a, f) in enumerate(zip(suv, activity, values["factors"])):
        derived = a * f
        if abs(derived - s) > PHILIPS_FACTOR_RTOL * s:
            warnings.append(SuvWarning(
                "philips_factors_disagree",
                f"Slice {i}: Philips SUV factor (7053,1000) {s:.6g} g/Bq differs by "
                f"{100 * (derived - s) / s:+.1f}% from (7053,1009) x weight/decayed dose "
                f"{derived:.6g} g/Bq; (7053,1000) was used."))
            return

# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def suv_stats(volume_real: Any, factors_per_slice: Any) -> tuple[float, float, float]:
    """Minimum, mean and maximum SUVbw over the non-zero voxels of a volume.

    Parameters
    ----------
    volume_real : array_like of shape (P, M, N)
        Real-world values (stored * RescaleSlope + RescaleIntercept, e.g. Bq/mL), axis 0 =
        slices (planes) in the order of ``factors_per_slice``. Any numeric dtype.
    factors_per_slice : array_like of shape (P,)
        SUVbw factor per slice, g/Bq (``SuvResult.factors_g_per_bq``).

    Returns
    -------
    suv_min, suv_mean, suv_max : float
        Over voxels whose real-world value is non-zero, in g/mL. NaN for all three when no voxel
        is non-zero.

    Raises
    ------
    ValueError
        If the number of factors differs from the number of slices, or a factor is not finite.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.array([[[0.0, 1000.0]], [[2000.0, 4000.0]]])
    >>> suv_stats(vol, [1e-3, 5e-4])
    (1.0, 1.3333333333333333, 2.0)
    """
    volume = np.asarray(volume_real, dtype=np.float64)
    factors = np.asarray(factors_per_slice, dtype=np.float64).reshape(-1)
    if volume.ndim < 1 or volume.shape[0] != factors.size:
        raise ValueError(f"volume_real has {volume.shape[0] if volume.ndim else 0} slices on axis "
                         f"0 but {factors.size} factors were given; pass one factor per slice")
    if not np.all(np.isfinite(factors)):
        raise ValueError("factors_per_slice contains a non-finite value")
    mask = volume != 0
    if not mask.any():
        return (math.nan, math.nan, math.nan)
    suv = volume * factors.reshape((-1,) + (1,) * (volume.ndim - 1))
    values = suv[mask]
    return float(values.min()), float(values.mean()), float(values.max())


# --------------------------------------------------------------------------------------------
# Series on disk
# --------------------------------------------------------------------------------------------


def suv_of_files(paths: Sequence[Any]) -> list[dict[str, Any]]:
    """SUVbw of every PET series among DICOM files, one JSON-ready entry per series.

    Each entry has the series UID, Units, DecayCorrection, the factor per slice (g/Bq, slices in
    geometric order), ``suv_min``/``suv_mean``/``suv_max`` over the non-zero voxels, and the
    values the factor rests on; or, when SUV cannot be computed, ``error`` with the code, the
    attribute and what to fix. Files that are not DICOM are listed under ``unreadable``; no file
    makes it raise.
    """
    from pydicom.errors import InvalidDicomError

    from corelab.dicomio import DicomVolumeError, load_volume, read_header

    groups: dict[str, list[Any]] = {}
    entries: list[dict[str, Any]] = []
    for path in paths:
        try:
            uid = str(read_header(path).get("SeriesInstanceUID", "") or "")
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            entries.append({"file": str(path), "unreadable": f"{type(exc).__name__}: not a readable DICOM file"})
            continue
        groups.setdefault(uid, []).append(path)
    for uid, files in groups.items():
        entry: dict[str, Any] = {"series_uid": uid, "n_files": len(files)}
        try:
            volume = load_volume(files)
            headers = [read_header(p) for p in volume.paths]
            entry.update(units=str(headers[0].get("Units", "")) or None,
                         decay_correction=str(headers[0].get("DecayCorrection", "")) or None)
            result = suvbw_factors([header_from_dataset(h) for h in headers])
            suv_min, suv_mean, suv_max = suv_stats(volume.array, result.factors_g_per_bq)
            entry.update(suv_min=suv_min, suv_mean=suv_mean, suv_max=suv_max, error=None, **result.to_dict())
        except SuvError as exc:
            entry["error"] = {"code": exc.code, "attribute": exc.attribute, "message": exc.message}
        except DicomVolumeError as exc:
            entry["error"] = {"code": "bad_geometry", "attribute": None, "message": str(exc)}
        entries.append(entry)
    return entries
