"""De-identification verification: Annex E attributes, policy for private tags, PET-safe checks."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from corelab.deid import ANNEX_E, SHOWN_TEXT, DeidPolicy, check_deidentified, is_phantom, pet_safe_failures
from tests.receiver_helpers import small_series

SECRET = "Vexholm"


@pytest.fixture
def clean(tmp_path) -> Dataset:
    return pydicom.dcmread(small_series(tmp_path, 1)[0])


def _keywords(failures) -> set[str]:
    return {f.keyword for f in failures}


def test_clean_object_passes_with_the_trial_pattern(clean):
    assert check_deidentified(clean, policy=DeidPolicy(pseudonym_pattern=r"BENCH-\d{3}")) == []


@pytest.mark.parametrize("keyword", [k for k in ANNEX_E["always"] if not k.endswith("Sequence")])
def test_every_annex_e_attribute_with_a_value_fails_by_keyword_never_by_value(clean, keyword):
    from pydicom.datadict import dictionary_VR

    vr = dictionary_VR(keyword)
    value = {"DA": "19600101", "TM": "101010", "DT": "19600101101010", "US": 1, "SS": 1, "UL": 1,
             "FD": 1.0, "FL": 1.0, "DS": "1", "IS": "1", "AS": "050Y", "CS": "X", "UI": "1.2.3"}.get(vr, SECRET)
    setattr(clean, keyword, value)
    failures = check_deidentified(clean)
    assert keyword in _keywords(failures)
    assert all(SECRET not in str(f) for f in failures)


def test_nested_identifying_attribute_is_found(clean):
    clean.RadiopharmaceuticalInformationSequence[0].PersonName = f"{SECRET}^Tech"
    item = Dataset()
    item.ReferringPhysicianName = f"Dr^{SECRET}"
    clean.ReferencedStudySequence = Sequence([item])
    assert {"PersonName", "ReferringPhysicianName"} <= _keywords(check_deidentified(clean))


def test_identity_removed_and_method_are_required_burned_in_annotation_fails(clean):
    del clean.PatientIdentityRemoved
    del clean.DeidentificationMethod
    clean.BurnedInAnnotation = "YES"
    assert {"PatientIdentityRemoved", "DeidentificationMethod", "BurnedInAnnotation"} <= \
        _keywords(check_deidentified(clean))


def test_pseudonym_pattern_applies_to_name_and_id(clean):
    clean.PatientName = f"{SECRET}^Anna"
    failures = check_deidentified(clean, pseudonym_pattern=r"BENCH-\d{3}")
    assert _keywords(failures) == {"PatientName"} and SECRET not in " ".join(map(str, failures))


def test_private_tags_vendor_suv_groups_kept_others_flagged_remove_all_flags_all(clean):
    clean.private_block(0x7053, "Philips PET Private Group", create=True).add_new(0x00, "DS", "0.000123")
    clean.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x01, "LO", "x")
    assert check_deidentified(clean) == []  # default policy: vendor SUV groups allowed
    clean.private_block(0x0011, "ACME", create=True).add_new(0x01, "LO", SECRET)
    failures = check_deidentified(clean)
    assert [f.tag[:5] for f in failures] == ["(0011"] and SECRET not in str(failures[0])
    assert check_deidentified(clean, policy=DeidPolicy(keep_private=("0011:ACME",))) == []
    removed = check_deidentified(clean, policy=DeidPolicy(private_tags="remove_all"))
    assert sorted(f.tag[:5] for f in removed) == ["(0009", "(0011", "(7053"]
    assert check_deidentified(clean, policy=DeidPolicy(private_tags="keep_all")) == []


def test_device_identity_and_descriptors_follow_the_trial_options(clean):
    clean.DeviceSerialNumber, clean.SeriesDescription = "SN123", "WB FDG"
    assert check_deidentified(clean) == []
    strict = DeidPolicy(retain_device_identity=False, clean_descriptors=False)
    assert {"DeviceSerialNumber", "SeriesDescription"} <= _keywords(check_deidentified(clean, policy=strict))


def test_pet_safe_attributes_must_survive(clean):
    assert pet_safe_failures(clean) == []
    del clean.PatientWeight
    del clean.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime
    assert _keywords(pet_safe_failures(clean)) == {"PatientWeight", "injection_to_acquisition"}
    assert check_deidentified(clean) == []  # default: QC reports them as deviations
    assert _keywords(check_deidentified(clean, policy=DeidPolicy(pet_safe="quarantine"))) == \
        {"PatientWeight", "injection_to_acquisition"}


def test_policy_from_dict_validates():
    assert DeidPolicy.from_dict({"private_tags": "remove_all"}, pseudonym_pattern="X").pseudonym_pattern == "X"
    with pytest.raises(ValueError, match="unknown keys"):
        DeidPolicy.from_dict({"private": "all"})
    with pytest.raises(ValueError, match="private_tags"):
        DeidPolicy.from_dict({"private_tags": "some"})


def test_trial_ids_are_checked_subject_against_the_pattern_visit_against_the_manual(clean):
    policy = DeidPolicy(pseudonym_pattern=r"BENCH-\d{3}", visit_labels=("baseline", "followup"))
    clean.ClinicalTrialSubjectID, clean.ClinicalTrialTimePointID = "BENCH-002", "followup"
    assert check_deidentified(clean, policy=policy) == []
    clean.ClinicalTrialSubjectID, clean.ClinicalTrialTimePointID = SECRET, f"{SECRET} week 6"
    failures = check_deidentified(clean, policy=policy)
    assert _keywords(failures) == {"ClinicalTrialSubjectID", "ClinicalTrialTimePointID"}
    assert SECRET not in " ".join(map(str, failures)) and "baseline, followup" in str(failures[1])
    assert DeidPolicy.from_dict({"visit_labels": ["baseline"]}).visit_labels == ("baseline",)


@pytest.mark.parametrize("keyword", SHOWN_TEXT)
def test_a_person_name_in_any_field_corelab_stores_or_shows_fails_by_keyword(clean, keyword):
    setattr(clean, keyword, f"{SECRET}^Anna")
    failures = check_deidentified(clean, policy=DeidPolicy(pseudonym_pattern=r"BENCH-\d{3}"))
    assert keyword in _keywords(failures) and SECRET not in " ".join(map(str, failures))


def test_descriptions_must_not_repeat_the_patients_name_or_id(clean):
    clean.PatientName, clean.PatientID = f"{SECRET}^Anna", "MRN77123"
    clean.SeriesDescription, clean.StudyDescription = f"WB {SECRET.lower()}", "PET mrn77123"
    clean.ProtocolName = "Annals protocol"  # "Anna" only as part of a word: not a match
    assert _keywords(check_deidentified(clean)) == {"SeriesDescription", "StudyDescription"}
    clean.PatientName = clean.PatientID = "BENCH-001"  # a pseudonym may appear: it identifies nobody
    clean.SeriesDescription = "BENCH-001 baseline"
    clean.StudyDescription = "PET"
    assert check_deidentified(clean, policy=DeidPolicy(pseudonym_pattern=r"BENCH-\d{3}")) == []


def test_phantom_labels_are_words_and_their_words_may_appear_in_descriptions(clean):
    for label in ("PHANTOM^NEMA", "CYL-A01", "CYLINDER", "QC2024", "NEMA_IEC"):
        clean.PatientName = clean.PatientID = label
        assert is_phantom(clean), label
    clean.PatientName, clean.SeriesDescription = "PHANTOM^NEMA", "NEMA IEC body phantom"
    assert check_deidentified(clean, policy=DeidPolicy(pseudonym_pattern=r"BENCH-\d{3}")) == []
    for name in ("Cylinda^Smith", "Qcarter^Jo", "Iecha^Li"):
        clean.PatientName = clean.PatientID = name
        assert not is_phantom(clean), name
