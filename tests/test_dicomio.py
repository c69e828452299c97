"""synth.dicom_writer writing PET/CT series, corelab.dicomio reading them back, sorting and gap detection."""

from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from corelab.dicomio import DicomVolumeError, load_volume, read_header
from corelab.grid import Grid
from synth import dicom_header
from synth.dicom_header import CtSeriesHeader, PetSeriesHeader
from synth.dicom_writer import write_ct_series, write_pet_series
from tests.synth_fixtures import DCENTVFY, DCIODVFY, dcentvfy_errors, dciodvfy_errors

SERIES_START = dt.datetime(2023, 5, 9, 10, 31, 12)
INJECTION = SERIES_START - dt.timedelta(minutes=62, seconds=5)


@pytest.fixture
def grid() -> Grid:
    return Grid.centred((7, 12, 10), (3.27, 4.0, 4.5), (5.0, -3.0, 12.0))


@pytest.fixture
def activity(grid: Grid) -> np.ndarray:
    rng = np.random.default_rng(11)
    values = rng.uniform(0.0, 30000.0, grid.shape)
    values *= np.linspace(0.2, 1.0, grid.shape[0])[:, None, None]  # slices differ in their max
    values[3] = 0.0  # an empty slice must still be written (slope 1)
    return values


def _pet_header(**overrides) -> PetSeriesHeader:
    kwargs = dict(
        study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid(),
        patient_name="TRIAL-X01-001", patient_id="TRIAL-X01-001", patient_sex="F",
        patient_weight_kg=71.4, patient_size_m=1.68, study_datetime=SERIES_START,
        series_datetime=SERIES_START, injection_datetime=INJECTION, dose_bq=251_300_000.0,
        manufacturer="SIEMENS", model="Biograph mCT", device_serial_number="30001",
        software_versions="VG60C", tm_fraction_digits=6,
        clinical_trial_protocol_id="TRIAL", clinical_trial_site_id="X01",
        clinical_trial_time_point_id="baseline", convolution_kernel="XYZGAUSS5.00",
    )
    kwargs.update(overrides)
    return PetSeriesHeader(**kwargs)


def _ct_header(pet: PetSeriesHeader) -> CtSeriesHeader:
    return CtSeriesHeader(
        study_uid=pet.study_uid, series_uid=generate_uid(),
        frame_of_reference_uid=pet.frame_of_reference_uid, patient_name=pet.patient_name,
        patient_id=pet.patient_id, patient_sex=pet.patient_sex,
        patient_weight_kg=pet.patient_weight_kg, patient_size_m=pet.patient_size_m,
        study_datetime=pet.study_datetime, series_datetime=SERIES_START - dt.timedelta(minutes=3),
        manufacturer=pet.manufacturer, model=pet.model,
        device_serial_number=pet.device_serial_number, software_versions=pet.software_versions,
        tm_fraction_digits=6, clinical_trial_protocol_id="TRIAL", clinical_trial_site_id="X01",
        clinical_trial_time_point_id="baseline",
    )


# ------------------------------------------------------------------------------------------
# Writing PET
# ------------------------------------------------------------------------------------------


def test_pet_header_content(tmp_path, grid, activity):
    header = _pet_header()
    paths = write_pet_series(tmp_path, activity, grid, header)
    assert [p.name for p in paths] == [f"{i:04d}.dcm" for i in range(1, 8)]
    ds = pydicom.dcmread(paths[2])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == dicom_header.PET_IMAGE_STORAGE == "1.2.840.10008.5.1.4.1.1.128"
    assert ds.SOPInstanceUID == dicom_header.sop_instance_uid(header.series_uid, 3)
    assert ds.Modality == "PT" and ds.Units == "BQML" and ds.DecayCorrection == "START"
    assert {"ATTN", "DECY"} <= set(ds.CorrectedImage)
    assert ds.NumberOfSlices == 7 and ds.ImageIndex == 3 and ds.InstanceNumber == 3
    assert float(ds.PatientWeight) == 71.4 and float(ds.PatientSize) == 1.68
    assert ds.PatientSex == "F"
    assert ds.SeriesDate == "20230509" and ds.SeriesTime == "103112.000000"
    assert ds.AcquisitionTime == ds.SeriesTime
    assert ds.ActualFrameDuration == 180000
    # Decay over a 180 s frame corrected to its start: factor lambda T / (1 - exp(-lambda T)).
    lam = np.log(2) / dicom_header.F18_HALF_LIFE_S
    assert float(ds.DecayFactor) == pytest.approx(lam * 180 / -np.expm1(-lam * 180), rel=1e-6)
    assert 89.0 < float(ds.FrameReferenceTime) / 1000 < 91.0
    item = ds.RadiopharmaceuticalInformationSequence[0]
    assert float(item.RadionuclideTotalDose) == 251_300_000.0
    assert float(item.RadionuclideHalfLife) == 6586.2
    assert float(item.RadionuclidePositronFraction) == 0.9673
    assert item.RadiopharmaceuticalStartDateTime == "20230509092907.000000"
    assert item.RadiopharmaceuticalStartTime == "092907.000000"
    assert item.RadionuclideCodeSequence[0].CodeValue == "77004003"
    assert item.RadiopharmaceuticalCodeSequence[0].CodeMeaning == "Fluorodeoxyglucose F^18^"
    # De-identified the way a site sends it.
    assert ds.PatientName == "TRIAL-X01-001" and ds.PatientID == "TRIAL-X01-001"
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    codes = {c.CodeValue for c in ds.DeidentificationMethodCodeSequence}
    assert {"113100", "113107", "113108"} <= codes
    assert not ds.get("PatientBirthDate")
    assert ds.BurnedInAnnotation == "NO"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert ds.ClinicalTrialProtocolID == "TRIAL" and ds.ClinicalTrialSubjectID == "TRIAL-X01-001"
    # Geometry
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == [4.0, 4.5]
    assert float(ds.SliceThickness) == 3.27
    x0, y0, z0 = grid.origin_mm
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([x0, y0, z0 + 2 * 3.27])
    assert float(ds.SliceLocation) == pytest.approx(z0 + 2 * 3.27)
    assert (ds.Rows, ds.Columns) == (12, 10)
    assert "PatientPosition" not in ds  # PET carries the orientation code sequences instead
    assert ds.PatientOrientationCodeSequence[0].CodeMeaning == "recumbent"


def test_pet_pixels_round_trip_with_per_slice_slope(tmp_path, grid, activity):
    paths = write_pet_series(tmp_path, activity, grid, _pet_header())
    slopes = []
    for plane, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        slope = float(ds.RescaleSlope)
        assert float(ds.RescaleIntercept) == 0.0
        assert ds.pixel_array.dtype == np.int16
        values = ds.pixel_array * slope
        assert np.max(np.abs(values - activity[plane])) <= slope / 2 * (1 + 1e-9)
        slopes.append(slope)
    assert len(set(slopes)) == len(slopes)  # every slice its own slope (the empty one: 1)
    assert slopes[3] == 1.0


def test_none_omits_attributes_and_extra_overrides(tmp_path, grid, activity):
    header = _pet_header(patient_weight_kg=None, dose_bq=None, software_versions=None,
                         manufacturer=None, extra={"Units": "CNTS", "StationName": None},
                         radiopharm_extra={"RadionuclideHalfLife": None})
    ds = pydicom.dcmread(write_pet_series(tmp_path, activity, grid, header)[0])
    assert "PatientWeight" not in ds
    assert "SoftwareVersions" not in ds
    assert "Manufacturer" in ds and not ds.Manufacturer  # Type 2: present, empty
    item = ds.RadiopharmaceuticalInformationSequence[0]
    assert "RadionuclideTotalDose" not in item and "RadionuclideHalfLife" not in item
    assert ds.Units == "CNTS"
    with pytest.raises(ValueError, match="NotAKeyword"):
        write_pet_series(tmp_path / "bad", activity, grid, _pet_header(extra={"NotAKeyword": 1}))


def test_shape_mismatch_and_nan_rejected(tmp_path, grid, activity):
    with pytest.raises(ValueError, match="shape"):
        write_pet_series(tmp_path, activity[:-1], grid, _pet_header())
    bad = activity.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_pet_series(tmp_path, bad, grid, _pet_header())


def test_ct_round_trip(tmp_path, grid):
    rng = np.random.default_rng(3)
    hu = np.rint(rng.uniform(-1000, 1500, grid.shape))
    pet = _pet_header()
    paths = write_ct_series(tmp_path, hu, grid, _ct_header(pet))
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == dicom_header.CT_IMAGE_STORAGE
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert ds.StudyInstanceUID == pet.study_uid
    assert ds.FrameOfReferenceUID == pet.frame_of_reference_uid
    assert float(ds.KVP) == 120 and ds.PatientPosition == "HFS"
    vol = load_volume(paths)
    assert vol.units == "HU"
    np.testing.assert_array_equal(vol.array, hu.astype(np.float32))


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def test_read_header_skips_pixels(tmp_path, grid, activity):
    path = write_pet_series(tmp_path, activity, grid, _pet_header())[0]
    assert "PixelData" not in read_header(path)
    assert "PixelData" in read_header(path, stop_before_pixels=False)


def test_load_volume_sorts_shuffled_files_by_geometry(tmp_path, grid, activity):
    paths = write_pet_series(tmp_path, activity, grid, _pet_header())
    # Scramble the tags a naive reader would trust: InstanceNumber and SliceLocation.
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = random.Random(path.name).randint(1, 999)
        ds.SliceLocation = "0"
        ds.save_as(path)
    shuffled = list(paths)
    random.Random(5).shuffle(shuffled)
    vol = load_volume(shuffled)
    assert vol.paths == paths
    assert vol.array.shape == grid.shape and vol.array.dtype == np.float32
    assert vol.voxel_mm == pytest.approx(grid.voxel_mm)
    assert vol.origin_mm == pytest.approx(grid.origin_mm)
    assert vol.positions_mm == pytest.approx(grid.origin_mm[2] + 3.27 * np.arange(7))
    assert np.max(np.abs(vol.array - activity)) < 30000 / 32767
    assert vol.units == "BQML" and vol.is_complete and not vol.has_gaps


def test_load_volume_sorts_along_the_normal_of_an_oblique_orientation(tmp_path, grid, activity):
    """Sagittal slices: the slice normal is -x, z is the same in every file (hazen#404)."""
    paths = write_pet_series(tmp_path, activity, grid, _pet_header())
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = [f"{-10.0 - 3.27 * k:.2f}", "0", "50"]  # along normal (-x): +
        ds.save_as(path)
    vol = load_volume(list(reversed(paths)))
    assert vol.paths == paths
    assert vol.voxel_mm[0] == pytest.approx(3.27)


def test_load_volume_flags_missing_slice(tmp_path, grid, activity):
    paths = write_pet_series(tmp_path, activity, grid, _pet_header(), omit_planes=[4])
    assert len(paths) == 6
    vol = load_volume(paths)
    assert vol.array.shape[0] == 6 and vol.expected_planes == 7
    assert vol.has_gaps and not vol.is_complete
    assert vol.missing_positions_mm == pytest.approx([grid.origin_mm[2] + 4 * 3.27])
    assert vol.voxel_mm[0] == pytest.approx(3.27)


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("ImageOrientationPatient", ["1", "0", "0", "0", "0.9", "0.1"], "ImageOrientationPatient"),
        ("PixelSpacing", ["4.0", "4.4"], "PixelSpacing"),
        ("ImagePositionPatient", None, "same slice position"),
        ("ImagePositionPatient", "offgrid", "regular grid"),
    ],
)
def test_load_volume_names_the_inconsistent_file(tmp_path, grid, activity, keyword, value, message):
    paths = write_pet_series(tmp_path, activity, grid, _pet_header())
    ds = pydicom.dcmread(paths[5])
    if value is None:  # duplicate position of slice 4
        ds.ImagePositionPatient = pydicom.dcmread(paths[4]).ImagePositionPatient
    elif value == "offgrid":
        ds.ImagePositionPatient[2] = str(float(ds.ImagePositionPatient[2]) + 1.1)
    else:
        setattr(ds, keyword, value)
    ds.save_as(paths[5])
    with pytest.raises(DicomVolumeError, match=message) as err:
        load_volume(paths)
    assert "0006.dcm" in str(err.value) or "0005.dcm" in str(err.value)


def test_load_volume_rejects_matrix_size_mismatch(tmp_path, grid, activity):
    paths = write_pet_series(tmp_path, activity, grid, _pet_header())
    other = Grid(grid.shape[:1] + (12, 12), grid.voxel_mm, grid.origin_mm)
    extra = write_pet_series(tmp_path / "other", np.ones(other.shape), other,
                             _pet_header(series_uid=pydicom.dcmread(paths[0]).SeriesInstanceUID))
    with pytest.raises(DicomVolumeError, match=r"other/0001\.dcm.*matrix"):
        load_volume(paths[:3] + [extra[0]])


def test_load_volume_rejects_two_series(tmp_path, grid, activity):
    a = write_pet_series(tmp_path / "a", activity, grid, _pet_header())
    b = write_pet_series(tmp_path / "b", activity, grid, _pet_header())
    with pytest.raises(DicomVolumeError, match="SeriesInstanceUID"):
        load_volume([a[0], b[1]])


# ------------------------------------------------------------------------------------------
# dicom3tools
# ------------------------------------------------------------------------------------------


@pytest.mark.dcmtk
@pytest.mark.skipif(DCIODVFY is None or DCENTVFY is None, reason="dicom3tools not installed")
def test_written_files_pass_dciodvfy_and_dcentvfy(tmp_path, grid, activity):
    pet = _pet_header()
    pet_paths = write_pet_series(tmp_path / "PT", activity, grid, pet)
    ct_paths = write_ct_series(tmp_path / "CT", np.zeros(grid.shape), grid, _ct_header(pet))
    missing_weight = write_pet_series(tmp_path / "PT2", activity, grid,
                                      _pet_header(patient_weight_kg=None, dose_bq=None,
                                                  manufacturer=None, software_versions=None))
    for path in (pet_paths[0], pet_paths[3], ct_paths[0], missing_weight[0]):
        assert dciodvfy_errors(path) == [], path
    assert dcentvfy_errors(pet_paths + ct_paths) == []
