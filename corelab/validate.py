"""Checks on one received object before anything is stored: UIDs, file meta, pixel data, values.

Everything here works on the bytes of one object and raises :class:`Rejected` with a reason code
and a message that names the object (by ordinal and sha256 prefix, never by its file name), the
rule and the fix. :func:`step` turns anything unexpected inside a named step into an
``unreadable`` rejection naming that step, so no input can raise out of the checks.
:func:`safe_join` is the one way to build a path under the data directory from received parts.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.valuerep import VR

# pydicom's reading validation warns (and logs) with the offending *value*: a patient name put in
# a numeric element would reach the logs. corelab validates what it uses itself, so reading stays
# silent. (Process-wide: every reader in corelab gets the same, value-free behaviour.)
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.128": "PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
# The transfer syntaxes corelab stores (the DICOM node negotiates the same list).
NATIVE_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                            "1.2.840.10008.1.2.2")
ENCAPSULATED_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.5",
                                  "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50",
                                  "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.91")
DEFLATED = "1.2.840.10008.1.2.1.99"
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
# PS3.5 9.1: digits and dots, no empty component, no leading zero (except "0"), at most 64.
UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
UID_MAX = 64
PIXEL_DATA = 0x7FE00010
MAX_DEPTH = 16          # sequence nesting corelab decodes
MAX_ELEMENTS = 200_000  # elements in one object, all depths
HELD_PREFIX_BYTES = 64 * 1024  # what quarantine keeps of an over-limit object
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KNOWN_VRS = frozenset(VR._value2member_map_)
_FIX_RESEND = "export the series again from the scanner or PACS and send it again"


class Rejected(Exception):
    """An object that must go to quarantine; ``code`` is machine-readable, the message says the fix.

    ``held``: the bytes to keep in quarantine instead of the whole object (a bounded prefix of an
    over-limit object; ``b""``: nothing could be read); None keeps the object as received.
    """

    def __init__(self, code: str, message: str, *, held: bytes | None = None):
        super().__init__(message)
        self.code, self.held = code, held
        self.series_uid: str | None = None  # set once the object's (valid) SeriesInstanceUID is known


class UnsafePath(ValueError):
    """A path part that is not one plain name, or a path that would leave its root."""


def safe_join(root: Path, *parts: str) -> Path:
    """``root / part / ...`` after checking each part is one plain name and the result stays in ``root``.

    Raises :class:`UnsafePath` for an empty part, ``.``/``..``, a separator, a NUL, or a path that
    resolves (symbolic links followed) outside ``root``. Use it for every path built from
    something a site sent or chose: UIDs, site codes, report names.
    """
    path = Path(root)
    for part in parts:
        text = str(part)
        if (not text or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text
                or len(text.encode()) > 255):
            raise UnsafePath(f"path part {text[:80]!r} is not one plain file name; refusing to build a path "
                             f"under {root} from it")
        path = path / text
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise UnsafePath(f"path {path} resolves outside {base}; refusing it")
    return path


def object_label(ordinal: int | None, digest: str | None) -> str:
    """How an object is named in reasons, output and reports: ordinal in its drop and sha256 prefix."""
    where = f"object #{ordinal}" if ordinal is not None else "object"
    return f"{where} (sha256 {digest[:12]})" if digest else f"{where} (no bytes kept)"


def is_valid_uid(value: str) -> bool:
    return isinstance(value, str) and 0 < len(value) <= UID_MAX and UID_RE.fullmatch(value) is not None


@contextlib.contextmanager
def step(name: str, label: str) -> Iterator[None]:
    """Run one check; anything unexpected in it becomes ``unreadable`` naming the step.

    The message carries the exception's type only: pydicom's messages can quote element values.
    MemoryError propagates (a resource failure, not a property of the object).
    """
    try:
        yield
    except (Rejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the one guard per object
        raise Rejected("unreadable", f"{label}: unreadable at step '{name}' ({type(exc).__name__}); the object "
                                     f"is not valid DICOM there: {_FIX_RESEND}") from None


def text(value, max_len: int = 64) -> str:
    """A header value as stored text: multi-values joined by ``\\``, control characters dropped, clamped."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return _CONTROL.sub("", str(value)).strip()[:max_len]


def check_deflate(data: bytes, label: str, max_inflated: int) -> None:
    """A deflated-syntax object must inflate to at most ``max_inflated`` bytes (checked in bounded steps)."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        deflated = str(meta.get("TransferSyntaxUID", "")).strip("\x00 ") == DEFLATED
    except Exception:  # noqa: BLE001 - not DICOM or no readable meta: parse_object says which
        return
    if not deflated:
        return
    inflater, total, chunk = zlib.decompressobj(-zlib.MAX_WBITS), 0, 1 << 20
    pending = fp.read()
    with step("inflate", label):
        while pending and not inflater.eof:
            out = inflater.decompress(pending, chunk)
            total += len(out)
            if total > max_inflated:
                raise Rejected("zip_bomb", f"{label}: the deflated object inflates to more than {max_inflated} "
                                           "bytes (CORELAB_MAX_INFLATED_BYTES); only its first "
                                           f"{min(len(data), HELD_PREFIX_BYTES)} bytes are kept. Send it "
                                           "uncompressed or ask the core lab to raise the limit",
                               held=data[:HELD_PREFIX_BYTES])
            pending = inflater.unconsumed_tail


def parse_object(data: bytes, label: str):
    """Parse one object and check what must hold before anything is stored; raise :class:`Rejected`."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise Rejected("not_dicom", f"{label}: not a DICOM file (no DICM preamble or readable header); "
                                    "send DICOM Part 10 files only") from None
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many types on cut-off data
        raise Rejected("truncated", f"{label}: the DICOM data ends early or is corrupt ({type(exc).__name__}); "
                                    "send the file again") from None
    with step("end of data", label):
        _check_not_cut(ds, label)
    with step("UIDs", label):
        _check_uids(ds, label)
    if str(ds.SOPClassUID) not in SOP_CLASSES:
        raise Rejected("unknown_sop_class", f"{label}: SOP class {ds.SOPClassUID} is not accepted; send the "
                                            "images as one of: " + ", ".join(sorted(set(SOP_CLASSES.values()))))
    with step("file meta", label):
        syntax = _check_file_meta(ds, label)
    with step("value representations", label):
        wrong = _wrong_vr_keywords(ds, label)
    if wrong:
        raise Rejected("wrong_vr", f"{label}: {', '.join(wrong)} encoded with the wrong value representation; "
                                   f"{_FIX_RESEND}")
    with step("pixel data", label):
        _check_pixel_data(ds, label, syntax)
    with step("decode", label):
        _decode_all(ds, label)
    return ds


def _check_not_cut(ds, label: str) -> None:
    """The last element must hold the bytes it declares (else the object was cut off in transfer)."""
    tags = list(ds.keys())
    if not tags or tags[-1] == PIXEL_DATA:  # pixel data: the pixel check tells a cut from a lie
        return
    raw = ds.get_item(tags[-1])
    declared = getattr(raw, "length", None)
    if declared is not None and declared != 0xFFFFFFFF and raw.value is not None and declared > len(raw.value):
        raise Rejected("truncated", f"{label}: the DICOM data ends inside an element (cut off in transfer); "
                                    "send the file again")


def _check_uids(ds, label: str) -> None:
    missing, invalid = [], []
    for keyword in REQUIRED_UIDS:
        value = ds.get(keyword)
        if value is None or (not isinstance(value, (list, MultiValue)) and not str(value).strip()):
            missing.append(keyword)
        elif isinstance(value, (list, MultiValue)) or not is_valid_uid(str(value)):
            invalid.append(keyword)
    if len(missing) == len(REQUIRED_UIDS):  # bytes behind a preamble that decode to no DICOM at all
        raise Rejected("not_dicom", f"{label}: not a DICOM object (none of {', '.join(REQUIRED_UIDS)} is "
                                    "readable); send DICOM Part 10 files only")
    if missing:
        raise Rejected("missing_uid", f"{label}: missing {', '.join(missing)}; {_FIX_RESEND}")
    if invalid:
        raise Rejected("invalid_uid", f"{label}: {', '.join(invalid)} is not a DICOM UID (one value of digits "
                                      "and dots, no empty component, no leading zero, at most 64 characters: "
                                      f"PS3.5 9.1); {_FIX_RESEND}")


def _check_file_meta(ds, label: str) -> str:
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "").strip("\x00 ")
    if syntax not in NATIVE_TRANSFER_SYNTAXES + ENCAPSULATED_TRANSFER_SYNTAXES:
        what = "has no TransferSyntaxUID" if not syntax else "names a transfer syntax corelab does not accept"
        raise Rejected("unreadable", f"{label}: unreadable at step 'file meta': the file meta information {what}; "
                                     f"{_FIX_RESEND} as a DICOM Part 10 file")
    return syntax


def _wrong_vr_keywords(ds, label: str) -> list[str]:
    """Standard top-level elements whose explicit VR contradicts the data dictionary (keywords only).

    Reads the raw elements' VRs without decoding their values; implicit-VR objects carry none.
    """
    wrong = []
    for tag in ds.keys():
        if tag.is_private or tag.group in (0x0002, 0xFFFE):
            continue
        vr = getattr(ds.get_item(tag), "VR", None)
        if vr in (None, "UN"):
            continue
        if vr not in _KNOWN_VRS:
            raise Rejected("unreadable", f"{label}: unreadable at step 'value representations': an element "
                                         "has a value representation DICOM does not define; " + _FIX_RESEND)
        try:
            allowed = dictionary_VR(tag)
        except KeyError:
            continue
        if vr not in allowed.split(" or "):
            wrong.append(keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})")
    return wrong


def _bad_pixels(label: str, what: str) -> Rejected:
    return Rejected("bad_pixel_data", f"{label}: pixel data {what}; {_FIX_RESEND}")


def _check_pixel_data(ds, label: str, syntax: str) -> None:
    """PixelData present and exactly Rows x Columns x frames x samples x BitsAllocated/8 bytes (native)."""
    if not any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Rejected("truncated", f"{label}: no pixel data (the file ends before the image); send it again")
    if "PixelData" not in ds:
        return
    raw = ds.get_item(PIXEL_DATA)
    declared = getattr(raw, "length", None)  # the length the element declares (raw elements only)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    bits, samples = int(ds.get("BitsAllocated") or 0), int(ds.get("SamplesPerPixel") or 1)
    frames = int(ds.get("NumberOfFrames") or 1)
    if rows <= 0 or cols <= 0:
        raise _bad_pixels(label, f"has Rows {rows} x Columns {cols}: an image needs both above 0")
    if bits not in (1, 8, 16, 32, 64) or not 1 <= samples <= 4 or frames < 1:
        raise _bad_pixels(label, "description is impossible (BitsAllocated, SamplesPerPixel or NumberOfFrames)")
    value = ds.PixelData
    if syntax in ENCAPSULATED_TRANSFER_SYNTAXES:
        if declared not in (None, 0xFFFFFFFF) or not bytes(value[:4]) == b"\xfe\xff\x00\xe0":
            raise _bad_pixels(label, "is not encapsulated although the transfer syntax is compressed")
        return
    expected = math.ceil(rows * cols * frames * samples * bits / 8)
    present = len(value)
    if declared == 0xFFFFFFFF:
        raise _bad_pixels(label, "has an undefined length in a native (uncompressed) transfer syntax")
    if declared is not None and declared > present:  # the element runs past the end of the object
        if declared in (expected, expected + 1):
            raise Rejected("truncated", f"{label}: pixel data has {present} of {expected} bytes; the file was "
                                        "cut off in transfer, send it again")
        raise _bad_pixels(label, f"declares {declared} bytes, more than the object holds and not the "
                                 f"{expected} bytes its Rows, Columns, frames and BitsAllocated need")
    if present not in (expected, expected + expected % 2):
        raise _bad_pixels(label, f"is {present} bytes; Rows x Columns x frames x samples x BitsAllocated/8 "
                                 f"is {expected}")


def _decode_all(ds, label: str) -> None:
    """Decode every element at every depth once, so that no later reader meets an undecodable one."""
    count = 0

    def walk(item, depth: int) -> None:
        nonlocal count
        if depth > MAX_DEPTH:
            raise Rejected("unreadable", f"{label}: unreadable at step 'decode': sequences nested deeper than "
                                         f"{MAX_DEPTH}; {_FIX_RESEND}")
        for tag in list(item.keys()):
            count += 1
            if count > MAX_ELEMENTS:
                raise Rejected("unreadable", f"{label}: unreadable at step 'decode': more than {MAX_ELEMENTS} "
                                             f"elements; {_FIX_RESEND}")
            elem = item[tag]
            if elem.VR == "SQ":
                for child in elem.value or []:
                    walk(child, depth + 1)

    walk(ds, 0)


def dicom_date(value, keyword: str, label: str) -> date | None:
    """A DA value as a date; empty is None; anything else that is not YYYYMMDD is rejected."""
    raw = text(value, 32)
    if not raw:
        return None
    try:
        if len(raw) != 8 or not raw.isdigit():
            raise ValueError
        return date(int(raw[:4]), int(raw[4:6]), int(raw[6:]))
    except ValueError:
        raise Rejected("unreadable", f"{label}: unreadable at step 'header values': {keyword} is not a date "
                                     f"(YYYYMMDD); {_FIX_RESEND}") from None


def bounded_int(value, low: int = 1, high: int = 100_000) -> int | None:
    """An IS count within [low, high], else None (an absurd count is not worth a database error)."""
    try:
        number = int(float(str(value).strip()))
    except (TypeError, ValueError, OverflowError):
        return None
    return number if low <= number <= high else None


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class ObjectFacts:
    """What corelab stores about an object, read once, validated and cleaned."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    modality: str
    study_date: date | None
    study_description: str
    series_description: str
    protocol_id: str
    subject: str
    visit_label: str
    manufacturer: str
    model: str
    serial_number: str
    software_versions: str
    expected_count: int | None


def extract_facts(ds, label: str) -> ObjectFacts:
    with step("header values", label):
        expected = None
        for keyword in ("NumberOfSlices", "ImagesInAcquisition"):
            if ds.get(keyword):
                expected = bounded_int(ds.get(keyword))
                break
        return ObjectFacts(
            sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
            series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
            modality=text(ds.get("Modality"), 16), study_date=dicom_date(ds.get("StudyDate"), "StudyDate", label),
            study_description=text(ds.get("StudyDescription")), series_description=text(ds.get("SeriesDescription")),
            protocol_id=text(ds.get("ClinicalTrialProtocolID")),
            subject=text(ds.get("ClinicalTrialSubjectID")) or text(ds.get("PatientID")),
            visit_label=text(ds.get("ClinicalTrialTimePointID")) or "unspecified",
            manufacturer=text(ds.get("Manufacturer")), model=text(ds.get("ManufacturerModelName")),
            serial_number=text(ds.get("DeviceSerialNumber")), software_versions=text(ds.get("SoftwareVersions"), 256),
            expected_count=expected)


__all__ = ["DEFLATED", "ObjectFacts", "REQUIRED_UIDS", "Rejected", "SOP_CLASSES", "UnsafePath", "UID_RE",
           "bounded_int", "check_deflate", "dicom_date", "extract_facts", "finite", "is_valid_uid",
           "object_label", "parse_object", "safe_join", "step", "text"]
