"""Is a received object one the store already holds? The same dataset, whatever its file meta.

The file meta (group 0002) is written by whoever wrote the file, not by the scanner: the node
writes pynetdicom's ImplementationClassUID and the sender's AE title, a site's export tool its
own. So a series received over DICOM and the same series sent again by file drop differ in
their bytes, and a sha256 over the whole file would keep every object twice, as a "new
version" (issue 16: 48 instances counted 96, and the phantom analysis failed). Two objects are
the same when their datasets are, file meta aside:

* **Same transfer syntax**: the encoded dataset after the file meta group, byte for byte. Cheap
  (no decoding) and exact.
* **Different transfer syntax, or the same bytes encoded otherwise** (a writer that sets
  sequence lengths, adds group lengths or trailing padding): when both syntaxes are
  little-endian and not encapsulated (implicit VR, explicit VR, deflated explicit VR), both
  objects are read and compared element by element on their encoded values, which these
  syntaxes encode alike; sequences item by item. Group lengths (gggg,0000) and
  DataSetTrailingPadding are the writer's, not the data's, and are not compared.
* Anything else (a compressed syntax on either side, big endian) is never called the same: a
  recompressed image may differ in its pixels, and decoding both to compare costs codecs and
  memory for a case no site has shown. Such an object is kept as a new version, flagged for
  review, which loses nothing.

Only called when the SOP Instance UID is already held with other bytes (see
:func:`corelab.ingest.accept_object`), so the cost of reading the held file is paid only then.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["COMPARABLE_SYNTAXES", "dataset_part", "held_copy", "same_dataset"]

COMPARABLE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
"""Syntaxes whose element values are encoded alike, so objects in two of them can be compared."""

_UNDEFINED = 0xFFFFFFFF
_TRAILING_PADDING = Tag(0xFFFC, 0xFFFC)


def dataset_part(data: bytes) -> tuple[str, bytes] | None:
    """``(transfer syntax UID, encoded dataset after the file meta group)`` of a Part 10 object,
    or None when its preamble or file meta cannot be read."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - unreadable meta: not comparable, the caller keeps the object
        return None
    return str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 "), data[fp.tell():]


def same_dataset(a: bytes, b: bytes) -> bool:
    """Whether two Part 10 objects hold the same dataset, file meta aside (see the module's notes)."""
    part_a, part_b = dataset_part(a), dataset_part(b)
    if part_a is None or part_b is None:
        return False
    if part_a == part_b:
        return True
    if part_a[0] not in COMPARABLE_SYNTAXES or part_b[0] not in COMPARABLE_SYNTAXES:
        return False
    try:
        ds_a, ds_b = pydicom.dcmread(io.BytesIO(a)), pydicom.dcmread(io.BytesIO(b))
        return _same_elements(ds_a, ds_b)
    except Exception:  # noqa: BLE001 - what cannot be compared is not the same: kept as a new version
        return False


def held_copy(data: bytes, held: Iterable[Path]) -> Path | None:
    """The first of the ``held`` files (newest version first) whose dataset is that of ``data``.

    A held file that is missing or unreadable is not a match: the object is then kept (as a new
    version), never dropped on the word of a file that is not there.
    """
    for path in held:
        try:
            stored = Path(path).read_bytes()
        except OSError:
            continue
        if same_dataset(data, stored):
            return Path(path)
    return None


def _compared_tags(ds: Dataset) -> list:
    return sorted(t for t in ds.keys() if t.element != 0x0000 and t != _TRAILING_PADDING)


def _sequence(ds: Dataset, tag) -> list[Dataset] | None:
    """The items of element ``tag`` when it is a sequence, else None (its value stays encoded)."""
    elem = ds.get_item(tag)
    if isinstance(elem, DataElement):  # read as a sequence already (undefined length)
        return list(elem.value) if elem.VR == "SQ" else None
    is_sq = elem.VR == "SQ" or (elem.VR is None and (elem.length == _UNDEFINED or (
        not tag.is_private and _dictionary_vr(tag) == "SQ")))
    return list(ds[tag].value) if is_sq else None


def _dictionary_vr(tag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _same_elements(a: Dataset, b: Dataset) -> bool:
    tags = _compared_tags(a)
    if tags != _compared_tags(b):
        return False
    for tag in tags:
        seq_a, seq_b = _sequence(a, tag), _sequence(b, tag)
        if seq_a is not None or seq_b is not None:
            if seq_a is None or seq_b is None or len(seq_a) != len(seq_b):
                return False
            if not all(_same_elements(x, y) for x, y in zip(seq_a, seq_b)):
                return False
            continue
        if not _same_value(a, b, tag):
            return False
    return True


def _same_value(a: Dataset, b: Dataset, tag) -> bool:
    raw_a, raw_b = a.get_item(tag), b.get_item(tag)
    if not isinstance(raw_a, DataElement) and not isinstance(raw_b, DataElement):
        # encoded bytes, alike in the comparable syntaxes (all little endian)
        return raw_a.value == raw_b.value
    # pydicom converted one already (it does so for empty values read with implicit VR): compare
    # both as values
    return a[tag].value == b[tag].value
