"""Import the Azure Functions 2019 trace ("Serverless in the Wild", Shahrad et al., ATC 2020).

Input (a directory, e.g. ``azure_functions_2019_sample500/``):

- ``invocations.csv``: ``HashOwner, HashApp, HashFunction, Trigger``, then one column per
  minute of the day named by its minute-of-day (``"480"`` .. ``"959"`` in the 500-function
  sample; any non-negative integer names are accepted) holding that minute's invocation count.
- ``durations.csv``: per function, ``percentile_Average_{0,1,25,50,75,99,100}`` in milliseconds.
- ``memory.csv``: per function (or per app, when it has no ``HashFunction`` column), allocated
  memory percentiles ``AverageAllocatedMb_pct{1,5,25,50,75,95,99,100}`` in MB.

Mapping to the request log (one row per invocation):

- ``user_id = "az-" + HashOwner[:16]``, ``program_id = "az-fn-" + HashFunction[:16]``,
  ``software_config = "az-app-" + HashApp[:16]``. 16 hex characters are kept; if two distinct
  hashes of a kind shared that prefix, the prefix is lengthened for that kind until the mapping
  is one-to-one again, so distinct owners/apps/functions never merge.
- ``ts``: a minute with count ``n`` gets ``n`` arrivals drawn uniformly (microsecond resolution)
  in ``[start + m min, start + (m+1) min)``, where ``m`` is the minute-of-day; ``start`` is the
  instant of minute 0 (normally a UTC midnight, which keeps the trace's clock hours).
- ``request_id = f"{program_id}-{m}-{k}"``: ``k`` is the arrival's rank (0-based, in time
  order) within its function's minute; unique because ``HashFunction`` is unique per row.
- ``duration_s``: inverse-CDF sampling of the function's duration percentile row, piecewise
  linear between the percentile points (so every draw lies in ``[p0, p100]``), ms -> s.
- ``memory_mb``: the same from the memory percentiles; below the 1st percentile (the file has no
  0th) draws are held at ``pct1``.
- ``cpu_cores = 1.0``: an Azure Functions consumption-plan instance executes an invocation on
  one core; the trace records no CPU use, so every invocation is taken to occupy one core while
  it runs. ``gpus = 0``.
- A function with no durations row gets :data:`DEFAULT_DURATION_MS` (1 s: half the functions in
  the paper run under 1 s on average) and one with no memory row :data:`DEFAULT_MEMORY_MB`
  (170 MB); both are counted in :attr:`ImportSummary.defaulted`.

Randomness: one generator per function, seeded from ``(seed, owner/app/function hashes)``.
Memory: the invocations file is streamed row by row; rows are written in chunks of about
:data:`~pipeline.importers.CHUNK_ROWS` as ``azure-{i:05d}`` files in each hour partition.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.importers import CHUNK_ROWS, ChunkWriter, ImportSummary, TraceFormatError, check_format, count, join_ids, request_table, rng_for, start_us
from pipeline.schemas import is_valid_id
from pipeline.storage import Location

INVOCATIONS = "invocations.csv"
DURATIONS = "durations.csv"
MEMORY = "memory.csv"
KEYS = ("HashOwner", "HashApp", "HashFunction")

#: Cumulative probabilities of the duration percentile columns.
DURATION_Q = np.array([0.0, 0.01, 0.25, 0.50, 0.75, 0.99, 1.0])
DURATION_COLUMNS = tuple(f"percentile_Average_{p}" for p in (0, 1, 25, 50, 75, 99, 100))
#: Cumulative probabilities of the memory percentile columns.
MEMORY_Q = np.array([0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99, 1.0])
MEMORY_COLUMNS = tuple(f"AverageAllocatedMb_pct{p}" for p in (1, 5, 25, 50, 75, 95, 99, 100))

DEFAULT_DURATION_MS = 1000.0
DEFAULT_MEMORY_MB = 170.0
CPU_CORES_PER_INVOCATION = 1.0
ID_PREFIX_HEX = 16
_MINUTE_US = 60_000_000


@dataclass(frozen=True)
class _Function:
    row: int  # 1-based data row in invocations.csv
    owner: str
    app: str
    function: str


def import_azure_functions(
    trace_dir: str | os.PathLike[str],
    landing: Location,
    seed: int,
    start: datetime,
    fmt: str = "parquet",
) -> ImportSummary:
    """Write one request-log row per invocation of the Azure Functions trace in ``trace_dir``.

    ``start``: the instant of minute-of-day 0 (naive = UTC); ``seed``: non-negative integer.
    ``fmt``: landing file format (parquet, csv, jsonl). Raises :class:`TraceFormatError` for a
    missing directory or file, missing columns, or counts/percentiles that are not numbers or
    are negative. Same inputs and seed give byte-identical files.
    """
    check_format(fmt)
    base_us = start_us(start)
    root = Path(trace_dir)
    if not root.is_dir():
        raise TraceFormatError(f"Azure Functions trace directory {root} does not exist (or is not a directory)")
    paths = {name: root / name for name in (INVOCATIONS, DURATIONS, MEMORY)}
    for path in paths.values():
        if not path.is_file():
            raise TraceFormatError(f"{path}: file missing from the Azure Functions trace directory")

    functions, minutes = _read_function_keys(paths[INVOCATIONS])
    for _ in _read_counts(paths[INVOCATIONS], len(minutes)):
        pass  # validate every count before anything is written
    owner_ids = _short_ids([f.owner for f in functions], "az-", paths[INVOCATIONS], "HashOwner")
    app_ids = _short_ids([f.app for f in functions], "az-app-", paths[INVOCATIONS], "HashApp")
    fn_ids = _short_ids([f.function for f in functions], "az-fn-", paths[INVOCATIONS], "HashFunction")
    durations = _read_percentiles(paths[DURATIONS], DURATION_COLUMNS, require_function=True)
    memory = _read_percentiles(paths[MEMORY], MEMORY_COLUMNS, require_function=False)

    summary = ImportSummary(source=f"azure_functions:{root}")
    writer = ChunkWriter(landing, fmt, summary, "azure")
    minute_us = base_us + minutes * _MINUTE_US
    for fn, counts in zip(functions, _read_counts(paths[INVOCATIONS], len(minutes))):
        total = int(counts.sum())
        if total == 0:
            count(summary.skipped, "functions_without_invocations")
            continue
        dur_ms = durations.get((fn.owner, fn.app, fn.function))
        if dur_ms is None:
            dur_ms = np.full(len(DURATION_Q), DEFAULT_DURATION_MS)
            count(summary.defaulted, "functions_without_durations")
            count(summary.defaulted, "rows_with_default_duration", total)
        mem_mb = memory.get((fn.owner, fn.app, fn.function), memory.get((fn.owner, fn.app)))
        if mem_mb is None:
            mem_mb = np.full(len(MEMORY_Q), DEFAULT_MEMORY_MB)
            count(summary.defaulted, "functions_without_memory")
            count(summary.defaulted, "rows_with_default_memory", total)
        program_id = fn_ids[fn.function]
        rng = rng_for(seed, f"azure-functions/{fn.owner}/{fn.app}/{fn.function}")
        for block in _minute_blocks(counts, CHUNK_ROWS):
            block_counts = counts[block]
            n = int(block_counts.sum())
            minute_of_row = np.repeat(minutes[block], block_counts)
            ts = np.repeat(minute_us[block], block_counts) + rng.integers(0, _MINUTE_US, n)
            ts.sort()  # rows stay grouped by minute (offsets < 1 min), in time order within it
            first_row = np.repeat(np.cumsum(block_counts) - block_counts, block_counts)
            rank = np.arange(n) - first_row
            duration_s = np.interp(rng.random(n), DURATION_Q, dur_ms) / 1000.0
            memory_mb = np.interp(rng.random(n), MEMORY_Q, mem_mb)
            table = request_table(
                join_ids(program_id, minute_of_row, rank),
                owner_ids[fn.owner], program_id, app_ids[fn.app],
                ts, duration_s, CPU_CORES_PER_INVOCATION, memory_mb, 0.0,
            )  # fmt: skip
            writer.add(table, ts)
    writer.flush()
    return summary


def _reader(path: Path) -> Iterator[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        yield from csv.reader(f)


def _header(path: Path, rows: Iterator[list[str]], required: tuple[str, ...]) -> dict[str, int]:
    header = next(rows, None)
    if not header:
        raise TraceFormatError(f"{path}: empty file, expected a header row with {', '.join(required)}")
    index = {name.strip(): i for i, name in enumerate(header)}
    if len(index) != len(header):
        dups = sorted({n.strip() for n in header if [h.strip() for h in header].count(n.strip()) > 1})
        raise TraceFormatError(f"{path}: duplicate column(s) {', '.join(dups)}")
    missing = [c for c in required if c not in index]
    if missing:
        raise TraceFormatError(f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(header[:12])}{' ...' if len(header) > 12 else ''})")
    return index


def _read_function_keys(path: Path) -> tuple[list[_Function], np.ndarray]:
    """Pass 1 over invocations.csv: the function keys and the minute-of-day of each count column."""
    rows = _reader(path)
    index = _header(path, rows, KEYS + ("Trigger",))
    minute_cols = [(name, i) for name, i in index.items() if name not in KEYS + ("Trigger",)]
    for name, _ in minute_cols:
        if not name.isdigit():
            raise TraceFormatError(f"{path}: unexpected column {name!r}; after {', '.join(KEYS)}, Trigger every column must be a minute-of-day number")
    if not minute_cols:
        raise TraceFormatError(f"{path}: no per-minute count columns (named by minute-of-day, e.g. '480')")
    positions = [i for _, i in minute_cols]
    if positions != list(range(len(index) - len(minute_cols), len(index))):
        raise TraceFormatError(f"{path}: the per-minute count columns must come after {', '.join(KEYS)}, Trigger")
    minutes = np.array([int(name) for name, _ in minute_cols], dtype=np.int64)
    functions: list[_Function] = []
    seen: dict[str, int] = {}
    for row_no, row in enumerate(rows, start=1):
        if len(row) != len(index):
            raise TraceFormatError(f"{path}: data row {row_no} has {len(row)} fields, the header has {len(index)}")
        fn = _Function(row_no, *(row[index[k]].strip() for k in KEYS))
        for key, value in zip(KEYS, (fn.owner, fn.app, fn.function)):
            if not value:
                raise TraceFormatError(f"{path}: data row {row_no}: empty {key}")
        if fn.function in seen:
            raise TraceFormatError(f"{path}: data rows {seen[fn.function]} and {row_no} have the same HashFunction {fn.function[:16]}...")
        seen[fn.function] = row_no
        functions.append(fn)
    return functions, minutes


def _read_counts(path: Path, n_minutes: int) -> Iterator[np.ndarray]:
    """Pass 2 over invocations.csv: each row's per-minute counts (int64, validated)."""
    rows = _reader(path)
    header = next(rows)
    first = len(header) - n_minutes
    for row_no, row in enumerate(rows, start=1):
        cells = row[first:]
        try:
            counts = np.array(cells, dtype=np.int64)
        except ValueError:
            counts = np.array([_parse_count(path, row_no, header[first + j], c) for j, c in enumerate(cells)], dtype=np.int64)
        if (counts < 0).any():
            j = int(np.flatnonzero(counts < 0)[0])
            raise TraceFormatError(f"{path}: data row {row_no}, column {header[first + j]!r}: negative invocation count {counts[j]}")
        yield counts


def _parse_count(path: Path, row_no: int, column: str, cell: str) -> int:
    try:
        value = float(cell)
    except ValueError:
        raise TraceFormatError(f"{path}: data row {row_no}, column {column!r}: count {cell!r} is not a number") from None
    if not np.isfinite(value) or value != int(value):
        raise TraceFormatError(f"{path}: data row {row_no}, column {column!r}: count {cell!r} is not a whole number")
    return int(value)


def _read_percentiles(path: Path, columns: tuple[str, ...], require_function: bool) -> dict[tuple[str, ...], np.ndarray]:
    """Percentile rows keyed by (owner, app, function), or (owner, app) when the file has no
    HashFunction column; values validated as finite, non-negative and non-decreasing."""
    rows = _reader(path)
    keys = KEYS if require_function else KEYS[:2]
    index = _header(path, rows, keys + columns)
    if "HashFunction" in index:
        keys = KEYS
    out: dict[tuple[str, ...], np.ndarray] = {}
    for row_no, row in enumerate(rows, start=1):
        if len(row) != len(index):
            raise TraceFormatError(f"{path}: data row {row_no} has {len(row)} fields, the header has {len(index)}")
        values = np.empty(len(columns))
        for j, col in enumerate(columns):
            cell = row[index[col]].strip()
            try:
                values[j] = float(cell)
            except ValueError:
                raise TraceFormatError(f"{path}: data row {row_no}, column {col!r}: {cell!r} is not a number") from None
            if not np.isfinite(values[j]) or values[j] < 0:
                raise TraceFormatError(f"{path}: data row {row_no}, column {col!r}: {cell!r} is not a finite non-negative number")
        if (np.diff(values) < 0).any():
            raise TraceFormatError(f"{path}: data row {row_no}: percentiles {', '.join(columns)} decrease ({values.tolist()})")
        key = tuple(row[index[k]].strip() for k in keys)
        if key in out:
            raise TraceFormatError(f"{path}: data row {row_no} repeats the key of an earlier row ({', '.join(keys)})")
        out[key] = values
    return out


def _short_ids(hashes: list[str], prefix: str, path: Path, column: str) -> dict[str, str]:
    """``prefix + hash[:L]`` per distinct hash, with the smallest ``L >= 16`` that keeps them distinct."""
    distinct = sorted(set(hashes))
    length = ID_PREFIX_HEX
    while len({h[:length] for h in distinct}) < len(distinct):
        length += 1
    ids = {h: prefix + h[:length] for h in distinct}
    for h, value in ids.items():
        if not is_valid_id(value):
            raise TraceFormatError(f"{path}: {column} {h!r} (row {hashes.index(h) + 1}) does not give a well-formed id ({value!r})")
    return ids


def _minute_blocks(counts: np.ndarray, max_rows: int) -> Iterator[slice]:
    """Consecutive minute ranges holding at most ``max_rows`` invocations (a busier minute alone)."""
    start, acc = 0, 0
    for i, c in enumerate(counts.tolist()):
        if acc and acc + c > max_rows:
            yield slice(start, i)
            start, acc = i, 0
        acc += c
    if acc:
        yield slice(start, len(counts))
