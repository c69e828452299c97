"""Body-size formulas: lean body mass, ideal body weight, body surface area.

Pure functions of weight ``W`` (kg), height ``H`` (cm) and sex (``"M"`` or ``"F"``), as in
``pet-qc-facts.md`` section 4 (QIBA FDG-PET/CT Profile Appendix G). :mod:`corelab.body_size`
maps an SUV Type to one of them and reads the header values they need.

References
----------
.. [1] James WPT. Research on Obesity. London: HMSO; 1976 (LBMJAMES128).
.. [2] Janmahasatian S, Duffull SB, Ash S, Ward LC, Byrne NM, Green B. Quantification of lean
   bodyweight. Clin Pharmacokinet 2005;44(10):1051-1065 (LBMJANMA).
.. [3] Du Bois D, Du Bois EF. A formula to estimate the approximate surface area if height and
   weight be known. Arch Intern Med 1916;17:863-871 (BSA).
.. [4] Sugawara Y, Zasadny KR, Neuhoff AW, Wahl RL. Reevaluation of the standardized uptake value
   for FDG: variations with body weight and methods for correction. Radiology 1999;213:521-525
   (IBW, as attributed by the MITK SUV strategies; not checked in the paper).
.. [5] LBM "Morgan" (SUV Type LBM): coefficients as given in ``pet-qc-facts.md`` section 4; the
   primary publication was not checked.
"""

from __future__ import annotations

__all__ = ["bsa_dubois_m2", "ibw_kg", "lbm_james128_kg", "lbm_janma_kg", "lbm_morgan_kg"]


def _check_sex(sex: str) -> str:
    if sex not in ("M", "F"):
        raise ValueError(f"sex must be 'M' or 'F', not {sex!r}")
    return sex


def _lbm_kg(weight_kg: float, height_cm: float, sex: str, *, male_coefficient: float) -> float:
    """Male ``1.10 W - c (W/H)**2``, female ``1.07 W - 148 (W/H)**2``: LBM and LBMJAMES128 differ
    only in the male ``c`` (120 and 128)."""
    ratio_sq = (weight_kg / height_cm) ** 2
    if _check_sex(sex) == "M":
        return 1.10 * weight_kg - male_coefficient * ratio_sq
    return 1.07 * weight_kg - 148.0 * ratio_sq


def lbm_morgan_kg(weight_kg: float, height_cm: float, sex: str) -> float:
    """Lean body mass, SUV Type ``LBM`` (Morgan) [5]_.

    Parameters
    ----------
    weight_kg : float
        Body weight, kg.
    height_cm : float
        Height, cm.
    sex : {"M", "F"}

    Returns
    -------
    lbm_kg : float
        Male ``1.10 W - 120 (W/H)**2``, female ``1.07 W - 148 (W/H)**2``, kg. Not clamped: it
        falls, and can reach zero, at high BMI.

    Examples
    --------
    >>> round(lbm_morgan_kg(80.0, 180.0, "M"), 4)
    64.2963
    """
    return _lbm_kg(weight_kg, height_cm, sex, male_coefficient=120.0)


def lbm_james128_kg(weight_kg: float, height_cm: float, sex: str) -> float:
    """Lean body mass, SUV Type ``LBMJAMES128`` (James 1976) [1]_.

    Male ``1.10 W - 128 (W/H)**2``, female ``1.07 W - 148 (W/H)**2`` (W kg, H cm), in kg. Not
    clamped. Parameters as :func:`lbm_morgan_kg`.

    Examples
    --------
    >>> round(lbm_james128_kg(80.0, 180.0, "M"), 4)
    62.716
    """
    return _lbm_kg(weight_kg, height_cm, sex, male_coefficient=128.0)


def lbm_janma_kg(weight_kg: float, height_cm: float, sex: str) -> float:
    """Lean body mass, SUV Type ``LBMJANMA`` (Janmahasatian 2005) [2]_.

    Male ``9270 W / (6680 + 216 BMI)``, female ``9270 W / (8780 + 244 BMI)``, with
    ``BMI = W / (H/100)**2`` in kg/m2 (W kg, H cm); in kg. Parameters as :func:`lbm_morgan_kg`.

    Examples
    --------
    >>> round(lbm_janma_kg(80.0, 180.0, "M"), 4)
    61.7314
    """
    bmi = weight_kg / (height_cm / 100.0) ** 2
    if _check_sex(sex) == "M":
        return 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
    return 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)


def ibw_kg(height_cm: float, sex: str) -> float:
    """Ideal body weight, SUV Type ``IBW`` [4]_.

    Parameters
    ----------
    height_cm : float
        Height, cm.
    sex : {"M", "F"}

    Returns
    -------
    ibw_kg : float
        Male ``48.0 + 1.06 (H - 152)``, female ``45.5 + 0.91 (H - 152)``, kg.

    Examples
    --------
    >>> round(ibw_kg(180.0, "F"), 2)
    70.98
    """
    if _check_sex(sex) == "M":
        return 48.0 + 1.06 * (height_cm - 152.0)
    return 45.5 + 0.91 * (height_cm - 152.0)


def bsa_dubois_m2(weight_kg: float, height_cm: float) -> float:
    """Body surface area, SUV Type ``BSA`` (Du Bois 1916) [3]_.

    Parameters
    ----------
    weight_kg : float
        Body weight, kg.
    height_cm : float
        Height, cm.

    Returns
    -------
    bsa_m2 : float
        ``0.007184 * H**0.725 * W**0.425``, m2 (x 1e4 for cm2).

    Examples
    --------
    >>> round(bsa_dubois_m2(80.0, 180.0), 4)
    1.9964
    """
    return 0.007184 * height_cm ** 0.725 * weight_kg ** 0.425
