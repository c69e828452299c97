"""Reading a file drop within limits: no symbolic link followed, no size unchecked, no bomb inflated.

:func:`iter_drop` walks a file, folder or zip archive and yields one :class:`DropObject` per
object, numbered in drop order (the ordinal that names it in reasons and output; a file name is
never carried on). Sizes are checked while reading, in bounded chunks, before the object is in
memory: a plain file against ``max_object_bytes`` (its size from ``fstat``, then the bytes read),
a zip member against ``max_inflated_bytes`` (its declared size, then the bytes it inflates to),
an archive against ``max_zip_members``. An over-limit object arrives as a rejection that holds a
bounded prefix of it (``HELD_PREFIX_BYTES``), never its whole bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from corelab.validate import HELD_PREFIX_BYTES, Rejected, object_label

FILL_SHEET_SUFFIX = ".fill.yaml"
MAX_FILL_SHEET_BYTES = 1 << 20    # a fill sheet is a few hundred bytes of YAML
_CHUNK = 1 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class Limits:
    """Size limits for one received object (see :class:`corelab.settings.Settings`)."""

    max_object_bytes: int = 512 * 2**20
    max_inflated_bytes: int = 512 * 2**20
    max_zip_members: int = 100_000

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(max_object_bytes=settings.max_object_bytes, max_inflated_bytes=settings.max_inflated_bytes,
                   max_zip_members=settings.max_zip_members)


@dataclass(frozen=True)
class DropObject:
    """One object of a drop: its bytes (within the limits), or why it cannot be taken."""

    ordinal: int
    data: bytes | None = None
    fill: bytes | None = None
    rejected: Rejected | None = None

    @property
    def label(self) -> str:
        held = self.rejected.held if self.rejected is not None else self.data
        return _label(self.ordinal, held or b"")


def _label(ordinal: int, held: bytes) -> str:
    return object_label(ordinal, hashlib.sha256(held).hexdigest() if held else None)


def _open_regular(path: Path):
    """Open ``path`` for reading without following a symbolic link; None when it is not a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        return None
    return fh


def _too_large(ordinal: int, prefix: bytes, size: int, limit: int) -> Rejected:
    return Rejected("too_large", f"{_label(ordinal, prefix)}: {size} bytes or more, over the limit of {limit} bytes "
                                 "per object (CORELAB_MAX_OBJECT_BYTES); only its first "
                                 f"{len(prefix)} bytes are kept. Split it (one image per file) or ask the core lab "
                                 "to raise the limit", held=prefix)


def _unreadable(ordinal: int, what: str, exc: BaseException, held: bytes = b"") -> Rejected:
    return Rejected("unreadable", f"{_label(ordinal, held)}: unreadable at step '{what}' ({type(exc).__name__}); "
                                  "send the file again as a plain DICOM file or an intact zip archive", held=held)


def _not_regular(ordinal: int) -> Rejected:
    return Rejected("unreadable", f"{_label(ordinal, b'')}: unreadable at step 'open': not a regular file "
                                  "(a device, socket or pipe); put the file itself in the drop", held=b"")


def _read_bounded(fh, limit: int) -> bytes:
    chunks, total = [], 0
    while total <= limit:
        chunk = fh.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """``(kind, path)`` below ``root``: ``file``, ``link`` or ``special``; dot names skipped.

    An explicit stack, so a deep tree cannot exhaust the recursion limit; links are never entered.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        for entry in entries:
            if entry.is_symlink():
                yield "link", Path(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield "file", Path(entry.path)
            else:
                yield "special", Path(entry.path)


def _ordered(root: Path) -> list[tuple[str, Path]]:
    if root.is_symlink():
        return [("link", root)]
    if not root.is_dir():
        return [("file", root) if root.is_file() else ("special", root)]
    return sorted(_walk(root), key=lambda kp: kp[1].relative_to(root).parts)


def _fill_sheets(items: list[tuple[str, Path]]) -> dict[Path, bytes]:
    """``X.fill.yaml`` applies to folder ``X`` beside it, else to the folder that holds it."""
    fills: dict[Path, bytes] = {}
    sheets = [p for kind, p in items if kind == "file" and p.name.endswith(FILL_SHEET_SUFFIX)]
    for sheet in sheets:
        try:
            fh = _open_regular(sheet)
            if fh is None:
                continue
            with fh:
                data = fh.read(MAX_FILL_SHEET_BYTES + 1)
        except OSError:
            continue
        if len(data) <= MAX_FILL_SHEET_BYTES:
            fills[sheet.with_name(sheet.name[: -len(FILL_SHEET_SUFFIX)])] = data
    for sheet in sheets:
        key = sheet.with_name(sheet.name[: -len(FILL_SHEET_SUFFIX)])
        if key in fills:
            fills.setdefault(sheet.parent, fills[key])
    return fills


def iter_drop(path: Path, limits: Limits | None = None) -> Iterator[DropObject]:
    """Every object below ``path`` (a file, a folder or a zip archive), numbered from 1."""
    limits = limits or Limits()
    items = _ordered(Path(path))
    fills = _fill_sheets(items)
    ordinal = 0
    for kind, file in items:
        if file.name.endswith(FILL_SHEET_SUFFIX) and kind == "file":
            continue
        ordinal += 1
        if kind == "link":
            yield DropObject(ordinal, rejected=Rejected(
                "symlink", f"{_label(ordinal, b'')}: a symbolic link in the drop; links are not followed. "
                           "Put the file itself in the drop", held=b""))
            continue
        if kind == "special":
            yield DropObject(ordinal, rejected=_not_regular(ordinal))
            continue
        fill = next((fills[d] for d in (file.parent, *file.parents) if d in fills), None)
        try:
            fh = _open_regular(file)
        except OSError as exc:  # a link swapped in since the walk (ELOOP), no permission, vanished
            yield DropObject(ordinal, rejected=_unreadable(ordinal, "open", exc))
            continue
        if fh is None:  # swapped for a device, socket or pipe since the walk
            yield DropObject(ordinal, rejected=_not_regular(ordinal))
            continue
        with fh:
            try:
                head = fh.read(4)
                fh.seek(0)
                if head in _ZIP_MAGIC:
                    for obj in _iter_zip(fh, ordinal, limits, fill):
                        ordinal = obj.ordinal
                        yield obj
                    continue
                size = os.fstat(fh.fileno()).st_size
                if size > limits.max_object_bytes:
                    yield DropObject(ordinal, rejected=_too_large(ordinal, fh.read(HELD_PREFIX_BYTES), size,
                                                                  limits.max_object_bytes))
                    continue
                data = _read_bounded(fh, limits.max_object_bytes)
            except OSError as exc:
                yield DropObject(ordinal, rejected=_unreadable(ordinal, "read", exc))
                continue
        if len(data) > limits.max_object_bytes:  # it grew while we read it
            yield DropObject(ordinal, rejected=_too_large(ordinal, data[:HELD_PREFIX_BYTES], len(data),
                                                          limits.max_object_bytes))
            continue
        yield DropObject(ordinal, data=data, fill=fill)


def _iter_zip(fh, ordinal: int, limits: Limits, fill: bytes | None) -> Iterator[DropObject]:
    """The members of one archive (the first takes ``ordinal``), each inflated within the limits."""
    def whole(code_or_exc, message: str | None = None) -> DropObject:
        fh.seek(0)
        prefix = fh.read(HELD_PREFIX_BYTES)
        if message is None:
            return DropObject(ordinal, rejected=_unreadable(ordinal, "zip archive", code_or_exc, prefix))
        return DropObject(ordinal, rejected=Rejected(code_or_exc, f"{_label(ordinal, prefix)}: {message}",
                                                     held=prefix))

    try:
        archive = zipfile.ZipFile(fh)
        members = archive.infolist()
    except Exception as exc:  # noqa: BLE001 - BadZipFile, but also ValueError/struct.error on forged headers
        yield whole(exc)
        return
    if len(members) > limits.max_zip_members:
        yield whole("zip_bomb", f"a zip archive of {len(members)} members, over the limit of "
                                f"{limits.max_zip_members} (CORELAB_MAX_ZIP_MEMBERS); only its first "
                                f"{HELD_PREFIX_BYTES} bytes are kept. Send smaller archives")
        return
    limit = min(limits.max_inflated_bytes, limits.max_object_bytes)
    first = True
    with archive:
        for info in members:
            name = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or not name or name.startswith(".") or name.endswith(FILL_SHEET_SUFFIX):
                continue
            ordinal = ordinal if first else ordinal + 1
            first = False
            if stat.S_ISLNK(info.external_attr >> 16):
                yield DropObject(ordinal, rejected=Rejected(
                    "symlink", f"{_label(ordinal, b'')}: a symbolic link stored in a zip archive; links are not "
                               "followed. Put the file itself in the archive", held=b""))
                continue
            yield _read_member(archive, info, ordinal, limit, fill)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, ordinal: int, limit: int,
                 fill: bytes | None) -> DropObject:
    def bomb(prefix: bytes, size: int) -> DropObject:
        return DropObject(ordinal, rejected=Rejected(
            "zip_bomb", f"{_label(ordinal, prefix)}: a zip member that inflates to {size} bytes or more, over "
                        f"the limit of {limit} bytes (CORELAB_MAX_INFLATED_BYTES, CORELAB_MAX_OBJECT_BYTES); "
                        f"only its first {len(prefix)} bytes are kept. Send the files uncompressed or in "
                        "smaller archives", held=prefix))

    chunks, total = [], 0
    try:
        with archive.open(info) as member:
            if info.file_size > limit:
                return bomb(member.read(HELD_PREFIX_BYTES), info.file_size)
            while True:
                chunk = member.read(min(_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    return bomb(b"".join(chunks)[:HELD_PREFIX_BYTES], total)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad CRC, encrypted, unsupported method, forged header
        return DropObject(ordinal, rejected=_unreadable(ordinal, "zip member", exc))
    return DropObject(ordinal, data=b"".join(chunks), fill=fill)


__all__ = ["DropObject", "FILL_SHEET_SUFFIX", "HELD_PREFIX_BYTES", "Limits", "iter_drop"]


# --- small YAML from outside (fill sheets) ------------------------------------------------------

MAX_YAML_DEPTH = 8  # a fill sheet is one mapping of scalars; a little room for lists


def bounded_yaml(text: str):
    """``yaml.safe_load(text)`` for a small document from outside, without its two bombs.

    Aliases are refused (``*x`` shares one node, but anything that prints or walks the value
    expands it: a 900-byte sheet of nested aliases is gigabytes), and so is nesting deeper than
    :data:`MAX_YAML_DEPTH` (the composer recurses). Values YAML cannot turn into Python (a date
    like 2031-13-45, an integer of thousands of digits) are a ValueError too.

    Raises
    ------
    ValueError
        What is wrong and where (line, column); ``yaml.YAMLError`` for text that is not YAML.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        mark = event.start_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ValueError(f"an anchor or alias (&name, *name) at {where}; write each value out")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ValueError(f"nested deeper than {MAX_YAML_DEPTH} levels at {where}; write one 'key: value' "
                                 "per line")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise
    except (ValueError, OverflowError, RecursionError, TypeError) as exc:
        raise ValueError(f"a value YAML cannot read ({type(exc).__name__}); check the dates (YYYY-MM-DD HH:MM) "
                         "and the numbers") from None
