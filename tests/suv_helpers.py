"""Helpers shared by the SUV tests (imported, not a conftest).

* ``test_suv.py`` and ``test_suv_rules.py``: the QIBA Appendix G factor written out by hand,
  ``weight_kg * 1000 / (dose_bq * 2 ** (-decay_s / half_life_s))``, and the average count-rate time.
* ``test_suv_types.py`` and ``test_suv_units.py``: the running example of a GML slice
  (W = 80 kg, H = 180 cm, image value SUVx = 3.0).
"""

from __future__ import annotations

import math
from pathlib import Path

from corelab.suv_headers import PET_IMAGE_STORAGE

VENDOR = Path(__file__).with_name("data") / "suv-vendor-headers"

F18_HALF_LIFE_S = 6586.2
WEIGHT_KG = 70.0
DOSE_BQ = 3.7e8


def expected_factor(decay_s: float, *, weight_kg: float = WEIGHT_KG, dose_bq: float = DOSE_BQ,
                    half_life_s: float = F18_HALF_LIFE_S) -> float:
    return weight_kg * 1000.0 / (dose_bq * 2.0 ** (-decay_s / half_life_s))


def acr_time_s(duration_s: float, half_life_s: float = F18_HALF_LIFE_S) -> float:
    """Average count-rate time in a frame, written out independently of corelab.suv."""
    lam = math.log(2) / half_life_s
    return (1 / lam) * math.log(lam * duration_s / (1 - math.exp(-lam * duration_s)))


W_KG, H_CM, SUV_X = 80.0, 180.0, 3.0


def gml(**overrides):
    """One slice of a GML image (already an SUV): male, 80 kg, 1.80 m."""
    h = {"SOPClassUID": PET_IMAGE_STORAGE, "Units": "GML", "DecayCorrection": "START",
         "CorrectedImage": ["ATTN", "DECY"], "PatientWeight": W_KG, "PatientSize": 1.80,
         "PatientSex": "M"}
    h.update(overrides)
    return {k: v for k, v in h.items() if v is not None}
