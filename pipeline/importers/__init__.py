"""Importers that turn published production traces into request-log landing files.

Each importer reads one trace format, draws per-request rows from the trace's aggregate
statistics with a seeded generator, and writes them to the landing zone through
:func:`pipeline.landing.write_landing` (which splits rows into their UTC hour partitions):

- :func:`import_azure_functions` — Azure Functions 2019 (per-minute invocation counts,
  per-function duration and memory percentiles).
- :func:`import_servegen` — Alibaba ServeGen language-model traces (per-client 600-s windows
  with a rate and a fitted inter-arrival distribution).

Shared here: the error type, the summary, seeding, and the chunked landing writer.
Reproducibility: every random stream comes from ``numpy.random.SeedSequence([seed, k])`` where
``k`` is derived from a stable text key (SHA-256, never Python's ``hash()``), so the same seed and
trace give byte-identical landing files, whatever the process or platform.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.landing import LANDING_FORMATS, write_landing
from pipeline.schemas import REQUEST_LOG, TS
from pipeline.storage import Location

#: Rows gathered before a landing file set is written; bounds the importer's memory (~150 B/row).
CHUNK_ROWS = 500_000

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class TraceFormatError(ValueError):
    """A trace directory, file, column or value is missing or malformed (the message says where)."""


@dataclass
class ImportSummary:
    """What one import wrote. ``start_ts``/``end_ts``: first and last arrival (UTC), None if no rows."""

    source: str
    rows: int = 0
    users: int = 0
    programs: int = 0
    files: int = 0
    start_ts: datetime | None = None
    end_ts: datetime | None = None
    #: Rows or entities that got a documented default value instead of trace data, by kind.
    defaulted: dict[str, int] = field(default_factory=dict)
    #: Things in the trace that produced no rows, by kind (e.g. empty windows, capped rows).
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("start_ts", "end_ts"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def rng_for(seed: int, key: str) -> np.random.Generator:
    """A generator for one stream (a function, a client), independent of all other keys."""
    key_int = int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big")
    return np.random.default_rng(np.random.SeedSequence([check_seed(seed), key_int]))


def start_us(start: datetime) -> int:
    """``start`` as integer microseconds since the epoch (a naive datetime is taken as UTC)."""
    if not isinstance(start, datetime):
        raise ValueError(f"start must be a datetime, got {start!r}")
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    delta = start.astimezone(timezone.utc) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """Integer microseconds since the epoch as an aware UTC datetime (exact, no float rounding)."""
    return _EPOCH + timedelta(microseconds=us)


def check_format(fmt: str) -> str:
    if fmt not in LANDING_FORMATS:
        raise ValueError(f"unknown landing format {fmt!r}; choose one of {', '.join(LANDING_FORMATS)}")
    return fmt


def request_table(
    request_id: pa.Array,
    user_id: str,
    program_id: str,
    software_config: str,
    ts_us: np.ndarray,
    duration_s: np.ndarray,
    cpu_cores: np.ndarray | float,
    memory_mb: np.ndarray,
    gpus: np.ndarray | float,
) -> pa.Table:
    """A REQUEST_LOG table for one stream; scalar ids and resources are repeated on every row."""
    n = len(ts_us)

    def floats(v: np.ndarray | float) -> pa.Array:
        return pa.array(np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy(), pa.float64())

    columns = [
        request_id,
        pa.repeat(user_id, n),
        pa.repeat(program_id, n),
        pa.repeat(software_config, n),
        pa.array(np.asarray(ts_us, dtype=np.int64), TS),
        floats(duration_s),
        floats(cpu_cores),
        floats(memory_mb),
        floats(gpus),
    ]
    return pa.Table.from_arrays(columns, schema=REQUEST_LOG)


def join_ids(*parts: str | np.ndarray) -> pa.Array:
    """Element-wise ``'-'.join(parts)``: text parts are broadcast, integer arrays are formatted."""
    args = [p if isinstance(p, str) else pc.cast(pa.array(np.asarray(p, dtype=np.int64)), pa.string()) for p in parts]
    return pc.binary_join_element_wise(*args, "-")


class ChunkWriter:
    """Collects per-stream tables and writes them as numbered landing file sets.

    A chunk is flushed once it holds ``chunk_rows`` rows; chunk ``i``'s files (one per UTC hour
    its rows touch) are named ``{prefix}-{i:05d}``. The summary's rows, users, programs, files and
    first/last arrival are kept up to date.
    """

    def __init__(self, landing: Location, fmt: str, summary: ImportSummary, prefix: str, chunk_rows: int = CHUNK_ROWS):
        self.landing = landing
        self.fmt = check_format(fmt)
        self.summary = summary
        self.chunk_rows = chunk_rows
        self.paths: list[str] = []
        self._prefix = prefix
        self._tables: list[pa.Table] = []
        self._pending = 0
        self._chunks = 0
        self._users: set[str] = set()
        self._programs: set[str] = set()
        self._min_us: int | None = None
        self._max_us: int | None = None

    def set_prefix(self, prefix: str) -> None:
        """Write what is pending, then name the next chunks ``{prefix}-00000``, ``{prefix}-00001``, ..."""
        self.flush()
        self._prefix, self._chunks = prefix, 0

    def add(self, table: pa.Table, ts_us: np.ndarray) -> None:
        """Queue one stream's rows (a single user and program); ``ts_us`` is their arrival column."""
        if len(table) == 0:
            return
        self._tables.append(table)
        self._pending += len(table)
        self._users.add(table["user_id"][0].as_py())
        self._programs.add(table["program_id"][0].as_py())
        lo, hi = int(ts_us.min()), int(ts_us.max())
        self._min_us = lo if self._min_us is None else min(self._min_us, lo)
        self._max_us = hi if self._max_us is None else max(self._max_us, hi)
        if self._pending >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self._tables:
            return
        table = pa.concat_tables(self._tables)
        self._tables, self._pending = [], 0
        self.paths += write_landing(self.landing, table, f"{self._prefix}-{self._chunks:05d}", self.fmt)
        self._chunks += 1
        s = self.summary
        s.rows += len(table)
        s.users, s.programs, s.files = len(self._users), len(self._programs), len(self.paths)
        if self._min_us is not None and self._max_us is not None:
            s.start_ts, s.end_ts = from_us(self._min_us), from_us(self._max_us)


def count(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


from pipeline.importers.azure_functions import import_azure_functions  # noqa: E402  (needs the names above)
from pipeline.importers.servegen import import_servegen  # noqa: E402

__all__ = [
    "CHUNK_ROWS",
    "ImportSummary",
    "TraceFormatError",
    "import_azure_functions",
    "import_servegen",
    "rng_for",
]
