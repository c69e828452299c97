"""Hostile objects, as bytes, for any test that needs one (imported, not a conftest).

Every builder starts from one valid, de-identified PET slice (``synth.small_series.pet_slice``, the
slice ``tests.receiver_helpers.small_series`` writes: PatientName/ID ``BENCH-001``, explicit VR
little endian; here with descriptions and a scanner) and damages exactly one thing, so a test
knows which reason code to expect: :data:`CASES` maps a case name to ``(reason code, builder)``.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid

from synth.small_series import pet_slice

PET = "1.2.840.10008.5.1.4.1.1.128"
DEFLATED = "1.2.840.10008.1.2.1.99"
PIXEL_TAG = b"\xe0\x7f\x10\x00"
NAME = "Qzvorak"  # a made-up surname: unique, so any leak is found by grep


def dataset(*, matrix: int = 8, study: str | None = None, series: str | None = None, **attrs) -> Dataset:
    """A valid de-identified PET slice as a Dataset; ``attrs`` set (or, with None, delete) keywords."""
    pixels = np.random.default_rng(matrix).integers(0, 30000, (matrix, matrix), dtype=np.uint16).tobytes()
    ds = pet_slice(study=study or generate_uid(), series=series or generate_uid(), frame=generate_uid(),
                   pixels=pixels, matrix=matrix)
    ds.SeriesDescription, ds.StudyDescription = "WB FDG", "PET/CT"
    ds.Manufacturer, ds.ManufacturerModelName, ds.DeviceSerialNumber = "ACME", "PET 1", "SN-1"
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset) -> bytes:
    """Part 10 bytes: preamble, ``DICM``, the dataset's file meta, then the dataset as it is."""
    return with_meta(ds, ds.file_meta)


def valid(**attrs) -> bytes:
    """A valid object's bytes (see :func:`dataset`)."""
    return encode(dataset(**attrs))


def _body(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def with_meta(ds: Dataset, meta: FileMetaDataset | None, body: bytes | None = None) -> bytes:
    """Preamble, ``DICM``, the given file meta (None: none at all), then the explicit-VR LE body."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\0" * 128 + b"DICM")
    if meta is not None:
        write_file_meta_info(fp, meta, enforce_standard=False)
    return fp.getvalue() + (body if body is not None else _body(ds))


def uid(keyword: str, value: str) -> bytes:
    """A UID element (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) set to any text."""
    ds = dataset()
    ds[keyword].value = value
    return encode(ds)


def no_file_meta() -> bytes:
    return with_meta(dataset(), None)


def transfer_syntax(value: str | None) -> bytes:
    """File meta whose TransferSyntaxUID is ``value`` (None: absent) over an explicit-VR LE body."""
    ds = dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = PET, ds.SOPInstanceUID
    if value is not None:
        meta.TransferSyntaxUID = value
    return with_meta(ds, meta)


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def unknown_vr() -> bytes:
    """Modality (0008,0060) encoded with the VR ``ZZ``, which DICOM does not define."""
    data = valid()
    at = data.index(b"\x08\x00\x60\x00CS")
    return _patch(data, at + 4, b"ZZ")


def pixel_length(declared: int) -> bytes:
    """PixelData (OW, last element) declaring ``declared`` bytes whatever it holds."""
    data = valid()
    at = data.rindex(PIXEL_TAG)
    return _patch(data, at + 8, struct.pack("<I", declared))


def pixel_bytes(delta: int) -> bytes:
    """PixelData ``delta`` bytes longer (or shorter) than Rows x Columns x 2, declared consistently."""
    ds = dataset()
    size = len(ds.PixelData) + delta
    ds.PixelData = (ds.PixelData * 2)[:size]
    return encode(ds)


def cut(fraction: float = 0.9) -> bytes:
    data = valid()
    return data[: int(len(data) * fraction)]


def deflated(payload_bytes: int) -> bytes:
    """A deflated-syntax object whose body inflates to ``payload_bytes`` (zeros: a bomb)."""
    ds = dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = PET, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DEFLATED
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk, left, parts = b"\0" * (1 << 20), payload_bytes, []
    while left > 0:
        parts.append(packer.compress(chunk[: min(left, len(chunk))]))
        left -= len(chunk)
    parts.append(packer.flush())
    return with_meta(ds, meta, b"".join(parts))


def zip_with(path: Path, members: dict[str, bytes | int]) -> Path:
    """A zip archive; a member given as an int is that many zero bytes, written in chunks (a bomb)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            if isinstance(content, int):
                with archive.open(zipfile.ZipInfo(name), "w", force_zip64=True) as fh:
                    chunk, left = b"\0" * (1 << 20), content
                    while left > 0:
                        fh.write(chunk[: min(left, len(chunk))])
                        left -= len(chunk)
            else:
                archive.writestr(name, content)
    return path


def planted(keyword: str, value: str | None = None) -> bytes:
    """``value`` (default ``Qzvorak^Anna``) planted in ``keyword``."""
    return valid(**{keyword: value if value is not None else f"{NAME}^Anna"})


# case name -> (expected reason code, builder of the bytes)
CASES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "study_uid_dotdot": ("invalid_uid", lambda: uid("StudyInstanceUID", "..")),
    "series_uid_dotdot": ("invalid_uid", lambda: uid("SeriesInstanceUID", "..")),
    "sop_uid_slash": ("invalid_uid", lambda: uid("SOPInstanceUID", "1.2.5/6")),
    "sop_uid_underscore": ("invalid_uid", lambda: uid("SOPInstanceUID", "1.2.5_6")),
    "sop_uid_space": ("invalid_uid", lambda: uid("SOPInstanceUID", "1.2.5 6")),
    "uid_300_chars": ("invalid_uid", lambda: uid("SeriesInstanceUID", "1." + "2" * 298)),
    "uid_multi_valued": ("invalid_uid", lambda: uid("SeriesInstanceUID", "1.2.3\\1.2.4")),
    "uid_leading_zero": ("invalid_uid", lambda: uid("SOPInstanceUID", "1.2.05")),
    "study_date_invalid": ("unreadable", lambda: valid(StudyDate="20241399")),
    "no_file_meta": ("unreadable", no_file_meta),
    "no_transfer_syntax": ("unreadable", lambda: transfer_syntax(None)),
    "unknown_transfer_syntax": ("unreadable", lambda: transfer_syntax("1.2.840.10008.1.2.4.100")),
    "unknown_vr": ("unreadable", unknown_vr),
    "pixel_length_fffffff0": ("bad_pixel_data", lambda: pixel_length(0xFFFFFFF0)),
    "pixel_data_too_long": ("bad_pixel_data", lambda: pixel_bytes(+100)),
    "pixel_data_too_short": ("bad_pixel_data", lambda: pixel_bytes(-100)),
    "rows_zero": ("bad_pixel_data", lambda: valid(Rows=0)),
    "cut_in_pixel_data": ("truncated", lambda: cut(0.95)),
    "subject_id_name": ("deid_failed", lambda: planted("ClinicalTrialSubjectID", NAME)),
    "visit_label_not_in_manual": ("deid_failed", lambda: planted("ClinicalTrialTimePointID", NAME)),
    "series_description_name": ("deid_failed", lambda: planted("SeriesDescription")),
    "study_description_name": ("deid_failed", lambda: planted("StudyDescription")),
    "protocol_name_name": ("deid_failed", lambda: planted("ProtocolName")),
}


def pydicom_reads(data: bytes) -> bool:
    """Whether pydicom parses the bytes at all (for tests that want to say so)."""
    try:
        pydicom.dcmread(io.BytesIO(data))
        return True
    except Exception:  # noqa: BLE001
        return False
