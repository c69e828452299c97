"""De-identification verification: a check, never a rewrite.

Checks a received object against the attributes that DICOM PS3.15 Annex E's Basic Application
Level Confidentiality Profile (Table E.1-1) removes or empties, with the options a PET trial
uses: "Retain Longitudinal Temporal Information with Modified Dates" (dates arrive shifted),
"Retain Patient Characteristics" (PatientWeight, PatientSex, PatientSize, PatientAge: SUV needs
them), "Retain Device Identity" (scanner serial numbers: accreditation needs them) and "Clean
Descriptors" (study and series descriptions kept, cleaned by the site). The attribute table is
data (:data:`ANNEX_E`), grouped so a trial's :class:`DeidPolicy` can switch an option off.

A failure names the attribute keyword and tag and why; it never carries the attribute's value,
so nothing identifying can reach the store, a log, an artifact or a report.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, fields

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

# PS3.15 Table E.1-1 attributes that the basic profile removes (X), empties (Z) or may replace by
# a dummy (D) and that identify a person, an institution or staff. Grouped by the option that
# would retain them; "always" is never retained. Name and ID are checked against the trial's
# pseudonym pattern instead (they are replaced, not removed); UIDs are replaced, not checkable.
ANNEX_E: dict[str, tuple[str, ...]] = {
    "always": (
        # patient
        "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientAddress",
        "PatientTelephoneNumbers", "PatientTelecomInformation", "PatientMotherBirthName",
        "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "IssuerOfPatientID",
        "MedicalRecordLocator", "PatientComments", "AdditionalPatientHistory", "MilitaryRank",
        "BranchOfService", "EthnicGroup", "Occupation", "PatientReligiousPreference",
        "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence", "CountryOfResidence",
        "RegionOfResidence", "MedicalAlerts", "Allergies", "LastMenstrualDate", "PatientState",
        "ResponsiblePerson", "ResponsibleOrganization", "ReferencedPatientPhotoSequence",
        "PatientTransportArrangements", "ReferencedPatientSequence",
        # visit and request
        "AdmissionID", "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence",
        "CurrentPatientLocation", "PatientInstitutionResidence", "VisitComments", "ServiceEpisodeID",
        "AccessionNumber", "RequestAttributesSequence", "RequestedProcedureID", "ScheduledProcedureStepID",
        "PerformedProcedureStepID", "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest", "ReasonForTheRequestedProcedure",
        # institution
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
        # staff
        "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
        "ReferringPhysicianIdentificationSequence", "PerformingPhysicianName",
        "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
        "PhysiciansReadingStudyIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
        "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "RequestingPhysician",
        "ScheduledPerformingPhysicianName", "ContentCreatorName", "ReviewerName", "VerifyingObserverName",
        "PersonName", "PersonAddress", "PersonTelephoneNumbers",
        # free text
        "ImageComments", "StudyComments", "InterpretationText", "TextComments", "TextString",
        "AcquisitionComments", "PerformedProcedureStepDescription", "CommentsOnThePerformedProcedureStep",
        "RequestedProcedureComments", "ImagingServiceRequestComments",
    ),
    # Retain Device Identity option (113109): the scanner register needs them.
    "device_identity": ("DeviceSerialNumber", "StationName", "DetectorID", "GantryID", "DeviceUID"),
    # Clean Descriptors option (113105): descriptions kept, cleaned by the site's tool.
    "descriptors": ("StudyDescription", "SeriesDescription", "ProtocolName", "DerivationDescription"),
}
# Kept for callers of the first cut: everything that is never retained.
MUST_BE_EMPTY: tuple[str, ...] = ANNEX_E["always"]

# Known vendor private groups that carry what SUV needs, by (group, private creator).
VENDOR_SUV_PRIVATE: dict[str, tuple[int, str]] = {
    "GE": (0x0009, "GEMS_PETD_01"),                     # GE PET: decay/dose, SUV scale factors
    "Philips": (0x7053, "Philips PET Private Group"),   # Philips: SUV factor (7053,1000), activity conc.
    "Siemens": (0x0071, "SIEMENS MED PT"),              # Siemens PET: decay correction date-time
}
# What SUV needs from a PET object; the "Retain Patient Characteristics" and "Retain Longitudinal
# Temporal Information" options exist so that these survive de-identification.
PET_SAFE: tuple[str, ...] = ("PatientWeight", "PatientSex", "injection_to_acquisition")
PET_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130")
# Phantom scans carry no patient, so their name/ID is a phantom label instead of a pseudonym. The
# label is a word: "CYL-A01" and "QC2024" are phantoms, a patient called "Cylinda" is not.
PHANTOM_ID = re.compile(r"(?i)^(phantom|nema|iec|cyl(?:inder)?|qc)(?![a-z])")
# What corelab stores or shows from an object's header (store rows, header table, reports). Each
# is checked for a person name (PN shape) and for the patient's own name and ID.
SHOWN_TEXT: tuple[str, ...] = (
    "StudyDescription", "SeriesDescription", "ProtocolName", "ClinicalTrialTimePointID",
    "ClinicalTrialSubjectID", "ClinicalTrialProtocolID", "Modality", "Manufacturer", "ManufacturerModelName",
    "DeviceSerialNumber", "SoftwareVersions", "ReconstructionMethod", "ConvolutionKernel", "Units",
    "DecayCorrection", "BodyPartExamined",
)
# Where the patient's own name and ID can be read from (their parts must not reappear above).
IDENTITY_SOURCES: tuple[str, ...] = ("PatientName", "PatientID", "OtherPatientNames", "OtherPatientIDs",
                                     "PatientBirthName", "PatientMotherBirthName", "ResponsiblePerson")
_PN_SHAPE = re.compile(r"[^\W\d_]{2,}\^[^\W\d_]{2,}")  # "Surname^Given": a value copied from a PN element
_SPLIT = re.compile(r"[\^=\s,;/\\]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class DeidPolicy:
    """A trial's de-identification policy (stored as a dict on the trial).

    Attributes
    ----------
    pseudonym_pattern : str
        Regular expression PatientName and PatientID must match; empty: not checked.
    private_tags : str
        ``"vendor_suv"``: private elements allowed only in the known vendor SUV groups
        (:data:`VENDOR_SUV_PRIVATE`) and ``keep_private``; ``"remove_all"``: none allowed;
        ``"keep_all"``: not checked.
    keep_private : tuple of str
        Extra allowed private groups as ``"gggg:CREATOR"``.
    retain_device_identity, clean_descriptors : bool
        The Annex E options the trial uses (both on by default: accreditation needs the serial
        number, QC reads series descriptions).
    pet_safe : str
        ``"flag"``: missing weight, sex or injection/acquisition times are left to QC (which
        reports them as deviations); ``"quarantine"``: such a PET object is quarantined.
    require_identity_removed : bool
        PatientIdentityRemoved must be YES and DeidentificationMethod (or its code sequence) set.
    visit_labels : tuple of str
        The imaging manual's visit list: ClinicalTrialTimePointID must be one of them (or empty).
        Empty tuple: the label is checked only for a person name and the patient's name and ID.
    """

    pseudonym_pattern: str = ""
    private_tags: str = "vendor_suv"
    keep_private: tuple[str, ...] = ()
    retain_device_identity: bool = True
    clean_descriptors: bool = True
    pet_safe: str = "flag"
    require_identity_removed: bool = True
    visit_labels: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict | None, *, pseudonym_pattern: str = "") -> DeidPolicy:
        """Build from a trial's stored dict; unknown keys are an error naming them."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"de-identification policy has unknown keys {unknown}; known: {sorted(known)}")
        for key in ("keep_private", "visit_labels"):
            if key in data:
                data[key] = tuple(str(v) for v in data[key])
        data.setdefault("pseudonym_pattern", pseudonym_pattern)
        policy = cls(**data)
        if policy.private_tags not in ("vendor_suv", "remove_all", "keep_all"):
            raise ValueError(f"private_tags is {policy.private_tags!r}; use vendor_suv, remove_all or keep_all")
        if policy.pet_safe not in ("flag", "quarantine"):
            raise ValueError(f"pet_safe is {policy.pet_safe!r}; use flag or quarantine")
        return policy

    def checked_keywords(self) -> tuple[str, ...]:
        out = list(ANNEX_E["always"])
        if not self.retain_device_identity:
            out += ANNEX_E["device_identity"]
        if not self.clean_descriptors:
            out += ANNEX_E["descriptors"]
        return tuple(out)

    def allowed_private(self) -> set[tuple[int, str]]:
        if self.private_tags != "vendor_suv":
            return set()
        allowed = {(g, c.upper()) for g, c in VENDOR_SUV_PRIVATE.values()}
        for item in self.keep_private:
            group, _, creator = item.partition(":")
            allowed.add((int(group, 16), creator.strip().upper()))
        return allowed


@dataclass(frozen=True)
class DeidFailure:
    keyword: str
    tag: str
    why: str

    def __str__(self) -> str:
        return f"{self.keyword} {self.tag}: {self.why}"


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else "(?)"


def _has_value(value) -> bool:
    return value not in (None, "", b"") and not (hasattr(value, "__len__") and len(value) == 0)


def _present(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and _has_value(ds[keyword].value)


def is_phantom(ds: Dataset) -> bool:
    return bool(PHANTOM_ID.match(str(ds.get("PatientID", "")))) or bool(
        PHANTOM_ID.match(str(ds.get("PatientName", ""))))


def _values(ds: Dataset, keyword: str) -> list[str]:
    """The element's values as text, control characters dropped, empty values left out."""
    value = ds.get(keyword)
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    cleaned = (_CONTROL.sub("", str(v)).strip() for v in items)
    return [v for v in cleaned if v]


def _identity_tokens(ds: Dataset, pattern: re.Pattern | None) -> set[str]:
    """Parts of the patient's name and IDs (3+ characters with a letter, else 5+) that are not a trial
    pseudonym or a phantom label."""
    tokens: set[str] = set()
    for keyword in IDENTITY_SOURCES:
        for value in _values(ds, keyword):
            if pattern is not None and pattern.fullmatch(value):
                continue
            tokens.update(t.lower() for t in _SPLIT.split(value) if not PHANTOM_ID.match(t) and (
                len(t) >= 5 or (len(t) >= 3 and any(c.isalpha() for c in t))))  # "001" is in version strings
    return tokens


def shown_text_failures(ds: Dataset, policy: DeidPolicy, *, phantom: bool = False) -> list[DeidFailure]:
    """What corelab would store or show: trial IDs against the trial's rules, free text against names.

    ClinicalTrialSubjectID must match the pseudonym pattern; ClinicalTrialTimePointID must be one
    of the manual's visit labels; every :data:`SHOWN_TEXT` value must not look like a person name
    (``Surname^Given``) nor contain a part of the patient's name or ID. Never returns a value.
    """
    pattern = re.compile(policy.pseudonym_pattern) if policy.pseudonym_pattern else None
    failures: list[DeidFailure] = []
    subject = " ".join(_values(ds, "ClinicalTrialSubjectID"))
    if subject and pattern is not None and not phantom and not pattern.fullmatch(subject):
        failures.append(DeidFailure("ClinicalTrialSubjectID", _tag("ClinicalTrialSubjectID"),
                                    "is not a trial pseudonym (does not match the trial's pattern)"))
    visit = " ".join(_values(ds, "ClinicalTrialTimePointID"))
    if visit and policy.visit_labels and not phantom and visit not in policy.visit_labels:
        failures.append(DeidFailure("ClinicalTrialTimePointID", _tag("ClinicalTrialTimePointID"),
                                    "is not one of the imaging manual's visit labels "
                                    f"({', '.join(policy.visit_labels)})"))
    tokens = _identity_tokens(ds, pattern)
    for keyword in SHOWN_TEXT:
        joined = "\\".join(_values(ds, keyword))
        if not joined:
            continue
        if _PN_SHAPE.search(joined):
            why = "holds a person name (Surname^Given); clean the descriptors"
        elif keyword != "ClinicalTrialSubjectID" and any(
                re.search(rf"(?<![0-9a-z]){re.escape(t)}(?![0-9a-z])", joined.lower()) for t in tokens):
            why = "contains the patient's name or ID; clean the descriptors"
        else:
            continue
        failures.append(DeidFailure(keyword, _tag(keyword), why))
    return failures


@functools.lru_cache(maxsize=16)
def _tags_of(keywords: tuple[str, ...]) -> dict[int, str]:
    return {tag_for_keyword(k): k for k in keywords if tag_for_keyword(k) is not None}


def _identifying_elements(ds: Dataset, keywords: tuple[str, ...]) -> list[DeidFailure]:
    """Annex E attributes with a value, at any depth (an item of a sequence can carry them too).

    Looks up the wanted tags and descends only into sequences, so the other elements of the
    object stay unparsed (``iterall`` would decode every element: 1 ms per object).
    """
    wanted = _tags_of(keywords)
    found: set[str] = set()

    def visit(item: Dataset, depth: int) -> None:
        for tag in item.keys():
            keyword = wanted.get(tag)
            if keyword is not None:
                if keyword not in found and _has_value(item[tag].value):
                    found.add(keyword)
            elif dictionary_VR_or_none(tag) == "SQ" and depth < 8:
                for child in item[tag].value or []:
                    visit(child, depth + 1)
            elif tag.is_private and depth < 8:
                raw = item.get_item(tag)
                if getattr(raw, "VR", None) == "SQ":
                    for child in item[tag].value or []:
                        visit(child, depth + 1)

    visit(ds, 0)
    return [DeidFailure(k, _tag(k), "must be removed or empty (PS3.15 basic profile)") for k in keywords if k in found]


def dictionary_VR_or_none(tag) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _private_failures(ds: Dataset, policy: DeidPolicy) -> list[DeidFailure]:
    if policy.private_tags == "keep_all":
        return []
    allowed = policy.allowed_private()
    creators: dict[tuple[int, int], str] = {}
    failures: list[DeidFailure] = []
    # Top level only (private elements inside an allowed private sequence come with it); keys,
    # not elements, so that public elements are not decoded.
    for tag in (Tag(t) for t in ds.keys()):
        if not tag.is_private:
            continue
        if 0x0010 <= tag.element <= 0x00FF:  # a private creator reserves block (group, element)
            creators[(tag.group, tag.element)] = str(ds[tag].value or "").strip().upper()
            if (tag.group, creators[(tag.group, tag.element)]) in allowed:
                continue
        else:
            creator = creators.get((tag.group, tag.element >> 8), "")
            if (tag.group, creator) in allowed:
                continue
        why = ("private element: the trial's policy removes all private tags" if policy.private_tags == "remove_all"
               else "private element outside the known vendor SUV groups: remove it or add the group to the "
                    "trial's keep_private")
        failures.append(DeidFailure("private", f"({tag.group:04X},{tag.element:04X})", why))
    # One line per group is enough to act on; a vendor dump can hold hundreds.
    by_group: dict[str, DeidFailure] = {}
    for f in failures:
        by_group.setdefault(f.tag[:5], f)
    return list(by_group.values())


def pet_safe_failures(ds: Dataset) -> list[DeidFailure]:
    """What SUV needs and de-identification must keep (PET objects only; empty list: all there)."""
    if str(ds.get("SOPClassUID", "")) not in PET_SOP_CLASSES:
        return []
    out = []
    try:
        weight = float(ds.get("PatientWeight") or 0)
    except (TypeError, ValueError):
        weight = 0.0
    if weight <= 0:
        out.append(DeidFailure("PatientWeight", "(0010,1030)", "missing or zero: SUV needs it (Retain Patient "
                                                               "Characteristics option)"))
    if not _present(ds, "PatientSex"):
        out.append(DeidFailure("PatientSex", "(0010,0040)", "missing: SUV (lean body mass) needs it"))
    items = ds.get("RadiopharmaceuticalInformationSequence") or []
    item = items[0] if len(items) else Dataset()
    injected = _present(item, "RadiopharmaceuticalStartDateTime") or _present(item, "RadiopharmaceuticalStartTime")
    acquired = any(_present(ds, k) for k in ("SeriesTime", "AcquisitionTime", "AcquisitionDateTime"))
    if not (injected and acquired):
        out.append(DeidFailure("injection_to_acquisition", "(0018,1078)/(0008,0031)",
                               "injection or acquisition time removed: the uptake interval is needed for SUV "
                               "(Retain Longitudinal Temporal Information option)"))
    return out


def check_deidentified(ds: Dataset, *, pseudonym_pattern: str = "",
                       policy: DeidPolicy | None = None) -> list[DeidFailure]:
    """Return every de-identification failure of ``ds`` (empty list: passes).

    Parameters
    ----------
    ds : Dataset
        The received object (header only is enough).
    pseudonym_pattern : str, keyword-only
        Regular expression the trial's pseudonyms match; PatientName and PatientID must both
        match it (phantom scans must instead carry a phantom label). Empty: not checked.
        Overrides the policy's own pattern when given.
    policy : DeidPolicy, keyword-only
        The trial's policy (default: :class:`DeidPolicy` defaults).

    Returns
    -------
    list of DeidFailure
        Keyword, tag and why for each failure; never the value.
    """
    policy = policy or DeidPolicy()
    pattern_text = pseudonym_pattern or policy.pseudonym_pattern
    failures: list[DeidFailure] = []
    phantom = is_phantom(ds)
    # A phantom scan has no patient to de-identify; the institution and staff checks still apply.
    if policy.require_identity_removed and not phantom:
        if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
            failures.append(DeidFailure("PatientIdentityRemoved", "(0012,0062)",
                                        "must be YES on a de-identified object"))
        if not (_present(ds, "DeidentificationMethod") or _present(ds, "DeidentificationMethodCodeSequence")):
            failures.append(DeidFailure("DeidentificationMethod", "(0012,0063)",
                                        "missing: say which profile and options were applied"))
    failures += _identifying_elements(ds, policy.checked_keywords())
    if str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
        failures.append(DeidFailure("BurnedInAnnotation", "(0028,0301)", "YES: pixel data may show identifying text"))
    if pattern_text and not phantom:
        pattern = re.compile(pattern_text)
        for keyword in ("PatientName", "PatientID"):
            if not pattern.fullmatch(str(ds.get(keyword, ""))):
                failures.append(DeidFailure(keyword, _tag(keyword),
                                            "is not a trial pseudonym (does not match the trial's pattern)"))
    failures += _private_failures(ds, policy)
    failures += shown_text_failures(ds, dataclasses.replace(policy, pseudonym_pattern=pattern_text), phantom=phantom)
    if policy.pet_safe == "quarantine" and not phantom:
        failures += pet_safe_failures(ds)
    return failures


__all__ = ["ANNEX_E", "DeidFailure", "DeidPolicy", "PET_SAFE", "VENDOR_SUV_PRIVATE", "check_deidentified",
           "is_phantom", "pet_safe_failures", "shown_text_failures", "SHOWN_TEXT"]
