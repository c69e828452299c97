"""Image QC of trial PET scans: liver reference VOI, axial coverage, bed dip, PET/CT alignment.

``analyse_pet(suv, grid, *, sul_per_suv=None, ct_hu=None, ct_grid=None, params=None) -> ImageQc``.
Sources: ``../shared/reference/pet-qc-facts.md`` section 7 (PERCIST 1.0; EANM 2.0; Bauer et al.
Med Phys 2012; QIICR PETLiverUptakeMeasurement). Every threshold is in :data:`DEFAULTS`.
"""

from expectations.image.analyse import analyse_pet
from expectations.image.result import DEFAULTS, ImageQc, LiverVoi

__all__ = ["analyse_pet", "ImageQc", "LiverVoi", "DEFAULTS"]
