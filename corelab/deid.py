"""De-identification verification: a check, never a rewrite.

Checks a received object against the attributes that DICOM PS3.15 Annex E's Basic Application
Level Confidentiality Profile removes or replaces, keeping what SUV needs (PatientWeight,
PatientSex and the times, under the "Retain Patient Characteristics" and "Retain Longitudinal
Temporal Information" options). A failure names the attribute keyword and tag and why; it never
carries the attribute's value, so nothing identifying can reach the store, a log or a report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

# Attributes that must be absent or empty after the basic profile (subset most often left behind
# by site tools; a later revision extends it to the full Annex E table per trial policy).
MUST_BE_EMPTY: tuple[str, ...] = (
    "PatientBirthDate", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "MedicalRecordLocator", "PatientComments", "AdditionalPatientHistory", "MilitaryRank",
    "EthnicGroup", "Occupation", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician", "AccessionNumber",
    "ImageComments", "StudyComments", "RequestAttributesSequence",
)
# Phantom scans carry no patient, so their name/ID is a phantom label instead of a pseudonym.
PHANTOM_ID = re.compile(r"(?i)^(phantom|nema|iec|cyl|qc)")


@dataclass(frozen=True)
class DeidFailure:
    keyword: str
    tag: str
    why: str

    def __str__(self) -> str:
        return f"{self.keyword} {self.tag}: {self.why}"


def _tag(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else "(?)"


def _present(ds: Dataset, keyword: str) -> bool:
    if keyword not in ds:
        return False
    value = ds[keyword].value
    return value not in (None, "", b"") and not (hasattr(value, "__len__") and len(value) == 0)


def is_phantom(ds: Dataset) -> bool:
    return bool(PHANTOM_ID.match(str(ds.get("PatientID", "")))) or bool(
        PHANTOM_ID.match(str(ds.get("PatientName", ""))))


def check_deidentified(ds: Dataset, *, pseudonym_pattern: str = "") -> list[DeidFailure]:
    """Return every de-identification failure of ``ds`` (empty list: passes).

    Parameters
    ----------
    ds : Dataset
        The received object (header only is enough).
    pseudonym_pattern : str, keyword-only
        Regular expression the trial's pseudonyms match; PatientName and PatientID must both
        match it (phantom scans must instead carry a phantom label). Empty: not checked.
    """
    failures: list[DeidFailure] = []
    phantom = is_phantom(ds)
    # A phantom scan has no patient to de-identify; the institution and staff checks still apply.
    if not phantom and str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        failures.append(DeidFailure("PatientIdentityRemoved", "(0012,0062)", "must be YES on a de-identified object"))
    if not phantom and not (_present(ds, "DeidentificationMethod")
                            or _present(ds, "DeidentificationMethodCodeSequence")):
        failures.append(DeidFailure("DeidentificationMethod", "(0012,0063)",
                                    "missing: say which profile and options were applied"))
    for keyword in MUST_BE_EMPTY:
        if _present(ds, keyword):
            failures.append(DeidFailure(keyword, _tag(keyword), "must be removed or empty (PS3.15 basic profile)"))
    if str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
        failures.append(DeidFailure("BurnedInAnnotation", "(0028,0301)", "YES: pixel data may show identifying text"))
    if pseudonym_pattern and not phantom:
        pattern = re.compile(pseudonym_pattern)
        for keyword in ("PatientName", "PatientID"):
            if not pattern.fullmatch(str(ds.get(keyword, ""))):
                failures.append(DeidFailure(keyword, _tag(keyword),
                                            "is not a trial pseudonym (does not match the trial's pattern)"))
    return failures
