"""Body-size normalisations of SUV: lean body mass, ideal body weight, body surface area.

The formulas themselves are in :mod:`corelab.body_formulas`. :func:`normalisation` maps a DICOM SUV Type
(0054,1006) to the size that SUV was divided by, so that an SUV of that type converts to SUVbw
(see :mod:`corelab.suv`)::

    SUVbw = SUVx * weight_g / N_x

with ``N_x`` the lean body mass or ideal body weight in g, or the body surface area in cm2 (for
Units CM2ML). The formulas are those of ``pet-qc-facts.md`` section 4 (QIBA FDG-PET/CT Profile
Appendix G; DICOM PS3.3 C.8.9.1), with ``W`` the weight in kg and ``H`` the height in cm:

* ``BW`` (``bw``): W.
* ``LBM`` (``lbm``, Morgan): male 1.10 W - 120 (W/H)^2, female 1.07 W - 148 (W/H)^2.
* ``LBMJAMES128`` (``lbm_james128``): male 1.10 W - 128 (W/H)^2, female 1.07 W - 148 (W/H)^2.
* ``LBMJANMA`` (``lbm_janma``): male 9270 W / (6680 + 216 BMI), female 9270 W / (8780 + 244 BMI).
* ``IBW`` (``ibw``): male 48.0 + 1.06 (H - 152), female 45.5 + 0.91 (H - 152).
* ``BSA`` (``bsa_dubois``, Du Bois): 0.007184 H^0.725 W^0.425 in m2, for either sex.

``BMI = W / (H/100)^2`` (kg/m2). Sex ``"O"`` (other) or unknown (``None``): there is no consensus;
the mean of the male and female values is used, as in the SUV computation manual [1]_, and the
result says so (``sex_used="mean_M_F"``).

:func:`to_suvbw`, :func:`patient_weight_kg` and :func:`from_header` read header values
(PatientWeight (0010,1030) kg, PatientSize (0010,1020) m, PatientSex (0010,0040)): a weight above
``GRAMS_WEIGHT_ABOVE`` was entered in g and is converted, with a warning, and a weight outside
``PLAUSIBLE_WEIGHT_KG`` gives a warning; a weight or height that a conversion needs and that is
missing or not positive, or a height outside ``PLAUSIBLE_HEIGHT_M``, raises :class:`BodySizeError`
naming the attribute, its tag and the fix; a missing sex is not an error (mean of male and female).

References
----------
The formulas' sources are listed in :mod:`corelab.body_formulas`.

.. [1] Vacha et al., SUV computation manual, 2026, CC BY 4.0 (sex O or missing: mean of the male
   and female values).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from corelab.body_formulas import (bsa_dubois_m2, ibw_kg, lbm_james128_kg, lbm_janma_kg,
                                   lbm_morgan_kg)

__all__ = [
    "BodySizeError",
    "GRAMS_WEIGHT_ABOVE",
    "Normalisation",
    "PLAUSIBLE_HEIGHT_M",
    "PLAUSIBLE_WEIGHT_KG",
    "SEX_MEAN",
    "SUV_TYPES",
    "bsa_dubois_m2",
    "from_header",
    "ibw_kg",
    "lbm_james128_kg",
    "lbm_janma_kg",
    "lbm_morgan_kg",
    "normalisation",
    "patient_weight_kg",
    "to_suvbw",
]

#: DICOM SUV Type (0054,1006) values converted to SUVbw.
SUV_TYPES = ("BW", "BSA", "LBM", "LBMJAMES128", "LBMJANMA", "IBW")
#: ``sex_used`` when PatientSex is O or missing: the mean of the male and female values.
SEX_MEAN = "mean_M_F"
#: Patient weights outside this range (kg) give the warning ``weight_implausible``.
PLAUSIBLE_WEIGHT_KG = (2.0, 350.0)
#: A PatientWeight above this was entered in g: divided by 1000, warning ``weight_looks_like_grams``.
GRAMS_WEIGHT_ABOVE = 1000.0
#: PatientSize (m) outside this range is refused (``height_implausible``) where the height is needed.
PLAUSIBLE_HEIGHT_M = (0.3, 2.5)

Warnings = list[tuple[str, str]]  # (code, message)


class BodySizeError(ValueError):
    """A body-size attribute needed for SUV is missing or wrong.

    Parameters
    ----------
    code : str
        ``missing_weight``, ``missing_height``, ``height_implausible``, ``unparseable_value``
        (PatientSex), ``normalisation_not_positive``, ``unsupported_suv_type`` or
        ``suv_type_contradicts_units``.
    message : str
        The attribute with its tag, the value found and what the site should fix.
    attribute : str
        DICOM keyword: ``PatientWeight``, ``PatientSize``, ``PatientSex`` or ``SUVType``.
    """

    def __init__(self, code: str, message: str, *, attribute: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code, self.message, self.attribute = code, message, attribute


@dataclass(frozen=True)
class Normalisation:
    """The body size an SUV is normalised by.

    Attributes
    ----------
    suv_type : str
        DICOM SUV Type (0054,1006), one of :data:`SUV_TYPES`.
    name : str
        ``"bw"``, ``"bsa_dubois"``, ``"lbm"``, ``"lbm_james128"``, ``"lbm_janma"`` or ``"ibw"``.
    value : float or None
        The size in ``unit`` (None for ``bw`` when the weight is unknown).
    unit : str
        ``"kg"`` (weights and lean body masses) or ``"m2"`` (BSA).
    sex_used : str or None
        ``"M"``, ``"F"``, :data:`SEX_MEAN` (mean of the male and female values), or None when the
        formula does not depend on sex.
    male_female : tuple of float, optional
        The male and female values when their mean was used.
    """

    suv_type: str
    name: str
    value: float | None
    unit: str
    sex_used: str | None = None
    male_female: tuple[float, float] | None = None

    @property
    def grams_or_cm2(self) -> float | None:
        """``N_x`` of ``SUVbw = SUVx * weight_g / N_x``: the value in g (kg x 1000) or cm2 (m2 x 1e4)."""
        if self.value is None:
            return None
        return self.value * (1.0e4 if self.unit == "m2" else 1.0e3)

    def to_dict(self) -> dict:
        return {"suv_type": self.suv_type, "name": self.name, "value": self.value, "unit": self.unit,
                "sex_used": self.sex_used,
                "male_female": list(self.male_female) if self.male_female else None}


_BY_SEX: dict[str, tuple[str, Callable[[float, float, str], float]]] = {
    "LBM": ("lbm", lbm_morgan_kg),
    "LBMJAMES128": ("lbm_james128", lbm_james128_kg),
    "LBMJANMA": ("lbm_janma", lbm_janma_kg),
    "IBW": ("ibw", lambda weight_kg, height_cm, sex: ibw_kg(height_cm, sex)),
}


def normalisation(suv_type: str, *, weight_kg: float | None, height_cm: float | None = None,
                  sex: str | None = None) -> Normalisation:
    """The body size that SUV Type ``suv_type`` divides by.

    Parameters
    ----------
    suv_type : str
        One of :data:`SUV_TYPES`.
    weight_kg : float or None
        Body weight, kg (needed by every type but ``BW``, where it is only reported).
    height_cm : float, optional
        Height, cm (needed by every type but ``BW``).
    sex : {"M", "F", "O", None}, optional
        ``"O"`` or None: mean of the male and female values.

    Returns
    -------
    Normalisation

    Raises
    ------
    ValueError
        Unknown SUV Type or sex, or a weight or height the type needs is None.

    Examples
    --------
    >>> n = normalisation("LBMJAMES128", weight_kg=80.0, height_cm=180.0, sex=None)
    >>> n.name, n.sex_used, round(n.value, 4)
    ('lbm_james128', 'mean_M_F', 59.5407)
    """
    if suv_type not in SUV_TYPES:
        raise ValueError(f"SUV Type {suv_type!r} is not one of {', '.join(SUV_TYPES)}")
    if suv_type == "BW":
        return Normalisation("BW", "bw", weight_kg, "kg")
    if weight_kg is None or height_cm is None:
        raise ValueError(f"SUV Type {suv_type} needs the weight (kg) and the height (cm)")
    if suv_type == "BSA":
        return Normalisation("BSA", "bsa_dubois", bsa_dubois_m2(weight_kg, height_cm), "m2")
    name, formula = _BY_SEX[suv_type]
    if sex in ("M", "F"):
        return Normalisation(suv_type, name, formula(weight_kg, height_cm, sex), "kg", sex)
    if sex not in ("O", None):
        raise ValueError(f"sex must be 'M', 'F', 'O' or None, not {sex!r}")
    male, female = formula(weight_kg, height_cm, "M"), formula(weight_kg, height_cm, "F")
    return Normalisation(suv_type, name, (male + female) / 2.0, "kg", SEX_MEAN, (male, female))


# --------------------------------------------------------------------------------------------
# From header values
# --------------------------------------------------------------------------------------------


def patient_weight_kg(weight: float | None, *, needed_for: str,
                      patient_size: object = None) -> tuple[float, Warnings]:
    """PatientWeight (0010,1030) in kg, its unit recognised by its value.

    Parameters
    ----------
    weight : float or None
        PatientWeight as sent (kg by DICOM).
    needed_for : str
        What the weight is needed for, quoted in the error.
    patient_size : float, optional
        PatientSize as sent (m; anything but a number is ignored); a value above 3 is named in the
        error as a weight entered in the height field (a known site error).

    Returns
    -------
    weight_kg : float
        ``weight / 1000`` when above :data:`GRAMS_WEIGHT_ABOVE` (entered in g), else ``weight``.
    warnings : list of (code, message)
        ``weight_looks_like_grams``, ``weight_implausible``.

    Raises
    ------
    BodySizeError
        ``missing_weight`` when the weight is None, zero, negative or not finite.
    """
    if weight is None or not math.isfinite(weight) or weight <= 0:
        hint = (f" PatientSize (0010,1020) holds {patient_size:g}, which is no height in metres: a "
                f"weight entered in the height field is a known site error."
                if isinstance(patient_size, (int, float)) and patient_size > 3 else "")
        found = "missing or empty" if weight is None else f"{weight!r}; it must be positive"
        raise BodySizeError("missing_weight", f"PatientWeight (0010,1030) is {found}, so SUV cannot "
                            f"be computed ({needed_for}). The site should record the patient weight "
                            f"(kg) measured at the scan and resend.{hint}", attribute="PatientWeight")
    warnings: Warnings = []
    if weight > GRAMS_WEIGHT_ABOVE:
        warnings.append(("weight_looks_like_grams",
                         f"PatientWeight (0010,1030) is {weight:g}, above {GRAMS_WEIGHT_ABOVE:g} kg: "
                         f"assumed to be g and converted to {weight / 1000:g} kg for SUV. It stays a "
                         f"deviation: the site should correct PatientWeight to kg and resend."))
        weight /= 1000.0
    lo, hi = PLAUSIBLE_WEIGHT_KG
    if not lo <= weight <= hi:
        warnings.append(("weight_implausible", f"PatientWeight is {weight:g} kg, outside "
                         f"{lo:g}-{hi:g} kg: check that it was entered in kg."))
    return weight, warnings


def from_header(suv_type: str, *, weight_kg: float, patient_size: float | None,
                patient_sex: str | None) -> tuple[Normalisation, Warnings]:
    """The normalisation of SUV Type ``suv_type`` (not BW) from the header's body size.

    Parameters
    ----------
    suv_type : str
        One of :data:`SUV_TYPES` other than ``BW``.
    weight_kg : float
        Body weight, kg (from :func:`patient_weight_kg`).
    patient_size : float or None
        PatientSize (0010,1020) as sent, m.
    patient_sex : str or None
        PatientSex (0010,0040) as sent: M, F, O or None (O or None: mean of male and female).

    Returns
    -------
    normalisation : Normalisation
        Its value is positive.
    warnings : list of (code, message)
        ``sex_not_specified`` when the mean of the male and female values was used.

    Raises
    ------
    BodySizeError
        Height missing, zero or outside :data:`PLAUSIBLE_HEIGHT_M`; sex not M, F or O; a formula
        giving a non-positive size (the LBM formulas fall at high BMI).

    Notes
    -----
    The facts file says both "sex O or missing: the mean of the male and female values" and
    "height, weight or sex needed by the conversion and missing: refuse and name the attribute".
    They are reconciled thus: a missing or O sex is never refused (the mean is used, and said);
    a missing height or weight is refused (``missing_height``, ``missing_weight``); a PatientSex
    that is present but not M, F or O is refused (``unparseable_value``).
    """
    why = f"SUV Type {suv_type} needs the height to convert to SUVbw"
    if patient_size is None or not math.isfinite(patient_size) or patient_size <= 0:
        found = "missing or empty" if patient_size is None else repr(patient_size)
        raise BodySizeError("missing_height", f"PatientSize (0010,1020) is {found}; {why}. The site "
                            f"should enter the patient height in metres and resend, or send the "
                            f"series in BQML.", attribute="PatientSize")
    lo, hi = PLAUSIBLE_HEIGHT_M
    if not lo <= patient_size <= hi:
        raise BodySizeError("height_implausible", f"PatientSize (0010,1020) is {patient_size:g}, "
                            f"read as metres as DICOM specifies, outside {lo:g}-{hi:g} m (a height "
                            f"in cm, or a weight in the height field, are known site errors); {why}. "
                            f"The site should correct PatientSize to metres and resend.",
                            attribute="PatientSize")
    sex = str(patient_sex).strip().upper() if patient_sex is not None else None
    if sex not in (None, "M", "F", "O"):
        raise BodySizeError("unparseable_value", f"PatientSex (0010,0040) is {patient_sex!r}; DICOM "
                            f"allows M, F or O. The site should correct it and resend.",
                            attribute="PatientSex")
    norm = normalisation(suv_type, weight_kg=weight_kg, height_cm=patient_size * 100.0, sex=sex)
    warnings: Warnings = []
    if norm.sex_used == SEX_MEAN:
        male, female = norm.male_female
        warnings.append(("sex_not_specified",
                         f"PatientSex (0010,0040) is {sex or 'missing'}: {norm.name} was taken as the "
                         f"mean of the male and female values ({male:.4g} and {female:.4g} "
                         f"{norm.unit}), as the SUV computation manual does (no consensus)."))
    if not norm.value > 0:
        raise BodySizeError("normalisation_not_positive",
                            f"{norm.name} is {norm.value:.4g} {norm.unit} for PatientWeight "
                            f"{weight_kg:g} kg and PatientSize {patient_size:g} m: the formula does "
                            f"not hold for this body size, so SUV Type {suv_type} cannot be converted "
                            f"to SUVbw. The site should check PatientWeight and PatientSize, or send "
                            f"the series in BQML.", attribute="PatientWeight")
    return norm, warnings


def to_suvbw(units: str, suv_type: str | None, *, weight: float | None, patient_size: float | None,
             patient_sex: str | None) -> tuple[tuple[Normalisation, float, float | None], Warnings]:
    """How to convert an image in Units GML or CM2ML, of SUV Type ``suv_type``, to SUVbw.

    Parameters
    ----------
    units : {"GML", "CM2ML"}
        Units (0054,1001).
    suv_type : str or None
        SUV Type (0054,1006) as sent. None: ``BW`` for GML (with the warning
        ``gml_assumed_suvbw``), ``BSA`` for CM2ML.
    weight, patient_size, patient_sex
        PatientWeight (kg), PatientSize (m) and PatientSex as sent (see :func:`from_header`).

    Returns
    -------
    (normalisation, factor, weight_kg) : (Normalisation, float, float or None)
        ``factor = weight_g / N_x`` so that ``SUVbw = SUVx * factor`` (1 for BW, for which the
        weight is reported but not needed); the weight in kg (converted from g if need be).
    warnings : list of (code, message)

    Raises
    ------
    BodySizeError
        ``unsupported_suv_type``; ``suv_type_contradicts_units`` (BSA is CM2ML, every other type
        GML); a weight or height the type needs missing or implausible (see :func:`from_header`).

    Examples
    --------
    >>> (norm, factor, _), notes = to_suvbw("GML", "IBW", weight=80.0, patient_size=1.8,
    ...                                  patient_sex="F")
    >>> norm.name, round(norm.value, 2), round(factor, 6), notes
    ('ibw', 70.98, 1.127078, [])
    """
    warnings: Warnings = []
    header_type = str(suv_type).strip().upper() if suv_type is not None else None
    if header_type is None and units == "GML":
        warnings.append(("gml_assumed_suvbw", "Units GML without SUVType (0054,1006): the pixel "
                         "values were taken as SUVbw (type BW, factor 1)."))
    kind = header_type or ("BSA" if units == "CM2ML" else "BW")
    if kind not in SUV_TYPES:
        raise BodySizeError("unsupported_suv_type", f"SUVType (0054,1006) is {kind}; SUVbw is "
                            f"converted from {', '.join(SUV_TYPES)} only. The site should correct "
                            f"SUVType or send the series reconstructed in BQML.", attribute="SUVType")
    if (kind == "BSA") != (units == "CM2ML"):
        raise BodySizeError("suv_type_contradicts_units", f"Units is {units} but SUVType (0054,1006) "
                            f"is {kind}: a BSA SUV is in cm2/mL (CM2ML), every other type in g/mL "
                            f"(GML). The site should correct Units or SUVType, or send the series "
                            f"in BQML.", attribute="SUVType")
    if kind == "BW":  # already SUVbw: the weight is reported, not needed
        weight_kg = None
        if weight is not None and math.isfinite(weight) and weight > 0:
            weight_kg, notes = patient_weight_kg(weight, needed_for="reported only")
            warnings += notes
        return (normalisation("BW", weight_kg=weight_kg), 1.0, weight_kg), warnings
    weight_kg, notes = patient_weight_kg(weight, patient_size=patient_size, needed_for=f"body "
                                         f"weight in kg, needed to convert SUV Type {kind} to SUVbw")
    norm, more = from_header(kind, weight_kg=weight_kg, patient_size=patient_size,
                             patient_sex=patient_sex)
    return (norm, weight_kg * 1000.0 / norm.grams_or_cm2, weight_kg), warnings + notes + more
