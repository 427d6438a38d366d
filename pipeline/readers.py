"""Read one landing file (JSON Lines, CSV or Parquet; gzip allowed) into request-log columns.

Reading never drops a row. A file becomes a :class:`FileRows`: the rows that parsed, converted
to the request-log types (a value that does not convert becomes null and the row gets a parse
``reason``), the rows as read where a conversion was needed, and the *broken* lines that did
not parse at all (malformed JSON, wrong CSV column count), each with its line number.

Fast path first: Arrow's typed readers parse clean files in C++. Only when a file holds a value
of the wrong type is that column re-read as text and converted with vectorised checks.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.checks import add_reason
from pipeline.schemas import REQUEST_LOG, TS
from pipeline.storage import Location

# A decimal or scientific number; 'nan'/'inf' are refused here (they are not demand).
_FLOAT_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
# ISO-8601 date-time with a mandatory zone ('Z' or an offset).
_TS_RE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})$"
_TEXT_SCHEMA = pa.schema([pa.field(f.name, pa.string()) for f in REQUEST_LOG])


class LandingFileError(OSError):
    """A landing file cannot be read at all (permissions, corrupt Parquet, bad gzip)."""


@dataclass
class BrokenRow:
    line: int | None  # 1-based line in the file (None when the reader could not tell)
    raw: str
    reason: str


@dataclass
class FileRows:
    path: str
    table: pa.Table  # REQUEST_LOG schema; nulls where a value did not convert
    reason: pa.Array  # string per row: why the row did not convert, null when it did
    source_row: pa.Array  # int64 per row: 1-based line (CSV/JSON) or row (Parquet)
    original: pa.Table | None = None  # the rows as read, when a conversion was needed
    broken: list[BrokenRow] = field(default_factory=list)


def _no_reason(reason: pa.Array | None, n: int) -> pa.Array:
    return pa.nulls(n, pa.string()) if reason is None else reason


def _convert_column(name: str, arr: pa.Array, target: pa.DataType) -> tuple[pa.Array, pa.Array | None, str]:
    """Convert one column to ``target``; returns (typed, bad-mask or None, reason-for-bad)."""
    n = len(arr)
    if pa.types.is_null(arr.type):
        return pa.nulls(n, target), None, ""
    if arr.type == target:
        return arr, None, ""
    if pa.types.is_large_string(arr.type) or pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string())
    if pa.types.is_string(target):
        if pa.types.is_string(arr.type):
            return arr, None, ""
        return pa.nulls(n, target), pc.is_valid(arr), f"{name} must be text, got {arr.type}"
    if pa.types.is_floating(target):
        if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_decimal(arr.type):
            return arr.cast(target), None, ""
        if pa.types.is_string(arr.type):
            ok = pc.match_substring_regex(arr, _FLOAT_RE)
            bad = pc.and_(pc.is_valid(arr), pc.invert(pc.fill_null(ok, False)))
            typed = pc.if_else(ok, arr, pa.scalar(None, pa.string())).cast(target)
            return typed, bad, f"{name} is not a number"
        return pa.nulls(n, target), pc.is_valid(arr), f"{name} must be a number, got {arr.type}"
    if pa.types.is_timestamp(target):
        if pa.types.is_timestamp(arr.type):
            if arr.type.tz is None:
                return pa.nulls(n, target), pc.is_valid(arr), f"{name} has no time zone (store UTC timestamps)"
            return arr.cast(target), None, ""
        if pa.types.is_string(arr.type):
            ok = pc.fill_null(pc.match_substring_regex(arr, _TS_RE), False)
            bad = pc.and_(pc.is_valid(arr), pc.invert(ok))
            masked = pc.if_else(ok, arr, pa.scalar(None, pa.string()))
            try:
                typed = masked.cast(target)
            except pa.ArrowInvalid:  # well-shaped but impossible dates: fall back to one by one
                typed = pa.array([_parse_ts(v) for v in masked.to_pylist()], target)
                bad = pc.or_(bad, pc.and_(pc.is_valid(masked), pc.is_null(typed)))
            return typed, bad, f"{name} is not an ISO-8601 time with a zone"
        return pa.nulls(n, target), pc.is_valid(arr), f"{name} must be a time, got {arr.type}"
    raise TypeError(f"no conversion to {target}")


def _parse_ts(value: str | None):
    if value is None:
        return None
    try:
        return pa.scalar(value).cast(TS).as_py()
    except (pa.ArrowInvalid, ValueError):
        return None


def conform(table: pa.Table) -> tuple[pa.Table, pa.Array | None, pa.Table | None]:
    """Bring any table to REQUEST_LOG: (typed table, parse reasons or None, the table as read
    when some column needed a conversion that refused a value, else None)."""
    n = table.num_rows
    columns, reason, needs_text = [], None, False
    for fld in REQUEST_LOG:
        if fld.name not in table.column_names:
            columns.append(pa.nulls(n, fld.type))
            reason = add_reason(_no_reason(reason, n), pa.array(np.ones(n, bool)), f"missing column {fld.name}")
            continue
        arr = table[fld.name].combine_chunks() if n else pa.array([], table.schema.field(fld.name).type)
        typed, bad, why = _convert_column(fld.name, arr, fld.type)
        if arr.type != fld.type:
            needs_text = True
        if bad is not None:
            reason = add_reason(_no_reason(reason, n), bad, why)
        columns.append(typed)
    typed_table = pa.Table.from_arrays(columns, schema=REQUEST_LOG)
    # Keep the rows as they came when a conversion was needed; only refused rows get rendered.
    original = table if needs_text and reason is not None else None
    return typed_table, reason, original


def as_text(col) -> pa.Array:
    """A column rendered as text (for quarantine rows, which keep values as they came)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    try:
        return col.cast(pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())


def _open(landing: Location, path: str) -> pa.NativeFile:
    try:
        return landing.fs.open_input_stream(path, compression="detect")
    except OSError as exc:
        raise LandingFileError(f"landing file {landing.display(path)} is unreadable: {exc}") from exc


def _read_all(landing: Location, path: str) -> pa.Buffer:
    """The whole (decompressed) file; landing files are bounded by one hour of requests."""
    try:
        with _open(landing, path) as f:
            return f.read_buffer()
    except LandingFileError:
        raise
    except (OSError, EOFError) as exc:  # e.g. a truncated or corrupt gzip stream
        raise LandingFileError(f"landing file {landing.display(path)} is unreadable: {exc}") from exc


_CSV_COLUMN_RE = re.compile(r"In CSV column #(\d+)")


def _csv_header(data: pa.Buffer) -> list[str]:
    first = data.slice(0, min(data.size, 1 << 16)).to_pybytes().split(b"\n", 1)[0]
    return next(csv.reader([first.decode("utf-8", errors="replace").rstrip("\r")]), [])


def _read_csv(landing: Location, path: str) -> FileRows:
    data = _read_all(landing, path)
    broken: list[BrokenRow] = []

    def on_invalid(row) -> str:
        broken.append(BrokenRow(row.number, row.text, f"CSV row has {row.actual_columns} columns, expected {row.expected_columns}"))
        return "skip"

    def attempt(column_types: dict[str, pa.DataType], threads: bool) -> pa.Table:
        broken.clear()
        return pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(use_threads=threads, block_size=1 << 22),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
        )

    header = _csv_header(data)
    types = {f.name: f.type for f in REQUEST_LOG}
    while True:
        try:
            table = attempt(types, True)
            break
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return _empty(path)
            # A value of the wrong type: read that column as text and convert it with checks.
            m = _CSV_COLUMN_RE.search(str(exc))
            name = header[int(m.group(1))] if m and int(m.group(1)) < len(header) else None
            if name not in types or types[name] == pa.string():
                raise LandingFileError(f"landing file {landing.display(path)} is not readable CSV: {exc}") from exc
            types[name] = pa.string()
    lines = np.arange(2, table.num_rows + 2, dtype=np.int64)  # line 1 is the header
    if broken:  # line numbers of refused rows are only reported by a single-threaded read
        table = attempt(types, False)
        bad_lines = np.array([b.line for b in broken if b.line is not None], dtype=np.int64)
        lines = np.arange(2, table.num_rows + len(broken) + 2, dtype=np.int64)
        lines = lines[~np.isin(lines, bad_lines)][: table.num_rows]
    typed_table, reason, original = conform(table)
    return FileRows(path, typed_table, _reasons(reason, typed_table.num_rows), pa.array(lines), original, list(broken))


def _read_jsonl(landing: Location, path: str) -> FileRows:
    data = _read_all(landing, path)
    if not data.to_pybytes().strip():
        return _empty(path)
    try:
        table = pajson.read_json(
            pa.BufferReader(data),
            parse_options=pajson.ParseOptions(explicit_schema=REQUEST_LOG, unexpected_field_behavior="ignore"),
        )
        typed, reason, original = conform(table)
        return FileRows(path, typed, _reasons(reason, typed.num_rows), pa.array(np.arange(1, typed.num_rows + 1, dtype=np.int64)), original)
    except pa.ArrowInvalid:
        pass  # a malformed line or a value of the wrong type: parse line by line
    records, lines, broken = [], [], []
    for number, line in enumerate(data.to_pybytes().decode("utf-8", errors="replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            broken.append(BrokenRow(number, line, f"malformed JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            broken.append(BrokenRow(number, line, f"JSON line is a {type(obj).__name__}, not an object"))
            continue
        records.append({k: None if obj.get(k) is None else (obj[k] if isinstance(obj[k], str) else json.dumps(obj[k])) for k in REQUEST_LOG.names})
        lines.append(number)
    table = pa.Table.from_pylist(records, schema=_TEXT_SCHEMA)
    typed, reason, original = conform(table)
    return FileRows(path, typed, _reasons(reason, typed.num_rows), pa.array(lines, pa.int64()), original, broken)


def _read_parquet(landing: Location, path: str) -> FileRows:
    try:
        if path.endswith(".gz"):
            pf = pq.ParquetFile(pa.BufferReader(_read_all(landing, path)))
        else:
            pf = pq.ParquetFile(landing.fs.open_input_file(path))
        cols = [c for c in pf.schema_arrow.names if c in REQUEST_LOG.names]
        table = pf.read(columns=cols)
    except (OSError, pa.ArrowInvalid) as exc:
        raise LandingFileError(f"landing file {landing.display(path)} is not readable Parquet: {exc}") from exc
    typed, reason, original = conform(table)
    return FileRows(path, typed, _reasons(reason, typed.num_rows), pa.array(np.arange(1, typed.num_rows + 1, dtype=np.int64)), original)


def _reasons(reason: pa.Array | None, n: int) -> pa.Array:
    return pa.nulls(n, pa.string()) if reason is None else reason


def _empty(path: str) -> FileRows:
    return FileRows(path, REQUEST_LOG.empty_table(), pa.nulls(0, pa.string()), pa.array([], pa.int64()))


def read_landing_file(landing: Location, path: str) -> FileRows:
    """Read one landing file; raises :class:`LandingFileError` if it cannot be read at all."""
    name = path.rsplit("/", 1)[-1]
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".parquet"):
        return _read_parquet(landing, path)
    if base.endswith(".csv"):
        return _read_csv(landing, path)
    if base.endswith((".jsonl", ".json", ".ndjson")):
        return _read_jsonl(landing, path)
    raise LandingFileError(f"landing file {landing.display(path)} has an unknown format (use .jsonl, .csv or .parquet, optionally .gz)")
