"""Exports for trial managers: the header table and the deviations, as Parquet or CSV (pyarrow).

The schemas are fixed here (column name, type, unit) and documented in the README; every Parquet
file carries the corelab version, the export time and the trial in its schema metadata.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlmodel import Session

from corelab import __version__
from corelab.models import utcnow
from corelab.queries import deviation_rows
from expectations.header_table import COLUMNS
from expectations.qc import trial_pet_series
from reports.render import safe_report_path

_ARROW = {"string": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}

# name -> (type, meaning)
DEVIATION_COLUMNS: dict[str, tuple[str, str]] = {
    "id": ("int", "deviation id in the store"),
    "trial": ("string", "trial code"),
    "site": ("string", "site code"),
    "subject": ("string", "trial pseudonym"),
    "visit": ("string", "timepoint"),
    "series_uid": ("string", "SeriesInstanceUID"),
    "rule_id": ("string", "imaging-manual rule"),
    "manual_section": ("string", "section of the manual the rule comes from"),
    "manual_version": ("string", "manual version that judged it"),
    "severity": ("string", "major (not evaluable) or minor"),
    "expected": ("string", "what the manual asks for"),
    "observed": ("string", "what the series has, with its unit"),
    "status": ("string", "open, queried, resolved or waived"),
    "message": ("string", "what the site should do"),
}
FORMATS = ("parquet", "csv")


def header_table_schema() -> pa.Schema:
    return pa.schema([pa.field(name, _ARROW[kind]) for name, (kind, _unit, _doc) in COLUMNS.items()])


def deviation_schema() -> pa.Schema:
    return pa.schema([pa.field(name, _ARROW[kind]) for name, (kind, _doc) in DEVIATION_COLUMNS.items()])


def _table(rows: list[dict], schema: pa.Schema, metadata: dict) -> pa.Table:
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema).replace_schema_metadata(metadata)


def export_trial(session: Session, trial_code: str, out_dir: Path, *, fmt: str = "parquet",
                 manual_version: str | None = None) -> dict[str, str]:
    """Write ``<trial>_header_table`` and ``<trial>_deviations`` in ``fmt`` to ``out_dir``."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: use one of {FORMATS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"corelab_version": __version__, "exported_at": utcnow().isoformat(), "trial": trial_code,
                "manual_version": manual_version or ""}
    header_rows = [s.header_row for s in trial_pet_series(session, trial_code) if s.header_row]
    deviations = deviation_rows(session, trial_code=trial_code)
    tables = {"header_table": _table(header_rows, header_table_schema(), metadata),
              "deviations": _table(deviations, deviation_schema(), metadata)}
    paths = {}
    for name, table in tables.items():
        path = safe_report_path(out_dir, f"{trial_code}_{name}.{fmt}")  # a trial code is never a path
        if not _same_content(path, table, fmt):  # unchanged data keeps its file (and timestamp)
            if fmt == "parquet":
                pq.write_table(table, path)
            else:
                pacsv.write_csv(table, path)
        paths[name] = str(path)
    return paths


def _same_content(path: Path, table: pa.Table, fmt: str) -> bool:
    """Whether ``path`` already holds ``table`` (Parquet: same rows and manual version; CSV: same bytes)."""
    if not path.is_file():
        return False
    if fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        return path.read_bytes() == buf.getvalue()
    try:
        old = pq.read_table(path)
    except (pa.ArrowInvalid, OSError):
        return False
    version = (table.schema.metadata or {}).get(b"manual_version")
    return old.equals(table, check_metadata=False) and (old.schema.metadata or {}).get(b"manual_version") == version
