"""The landing zone: where raw request logs arrive before ingest.

Layout contract (producers write this way; :mod:`pipeline.ingest` reads it)::

    <landing>/date=YYYY-MM-DD/hour=HH/<name>.{jsonl,json,csv,parquet}[.gz]

A file sits in the UTC hour its rows' ``ts`` (arrival) fall in. Ingest for ``[start, end)``
reads the hour partitions that overlap the interval and selects rows by ``ts``; a row whose
``ts`` is not in its file's hour (or does not parse) is quarantined, not lost. Files outside an
hour partition are not read (``warmcast ingest`` lists them as ignored).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.schemas import REQUEST_LOG
from pipeline.storage import Location

LANDING_FORMATS = ("parquet", "csv", "jsonl")
_PARTITION_RE = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/[^/]+$")
_DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".parquet")


def hour_partition(hour: datetime) -> str:
    """``date=YYYY-MM-DD/hour=HH`` for the UTC hour containing ``hour``."""
    hour = hour.astimezone(timezone.utc)
    return f"date={hour:%Y-%m-%d}/hour={hour:%H}"


def partition_hour(path: str) -> datetime | None:
    """The UTC hour a landing file belongs to, from its ``date=/hour=`` folders; None if none."""
    m = _PARTITION_RE.search(path)
    if not m:
        return None
    return datetime.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H").replace(tzinfo=timezone.utc)


def is_data_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    if name.startswith((".", "_")):
        return False
    base = name[:-3] if name.endswith(".gz") else name
    return base.endswith(_DATA_SUFFIXES)


def hours_overlapping(start: datetime, end: datetime) -> list[datetime]:
    """The UTC hours (as hour starts) that overlap ``[start, end)``."""
    hour = start.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    out = []
    while hour < end:
        out.append(hour)
        hour += timedelta(hours=1)
    return out


def landing_files(landing: Location, hour: datetime) -> list[str]:
    """Sorted data files of one landing hour partition."""
    return [p for p in landing.list_files(landing.path(hour_partition(hour))) if is_data_file(p)]


def _encode(table: pa.Table, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buf, compression="zstd")
    elif fmt == "csv":
        pacsv.write_csv(table, buf)
    elif fmt == "jsonl":
        cols = {name: table[name].to_pylist() for name in table.column_names}
        ts_text = pc.strftime(table["ts"], format="%Y-%m-%dT%H:%M:%S").to_pylist()
        cols["ts"] = [t + "Z" if t is not None else None for t in ts_text]
        lines = [json.dumps({k: cols[k][i] for k in table.column_names}, separators=(",", ":")) for i in range(len(table))]
        buf.write(("\n".join(lines) + ("\n" if lines else "")).encode())
    else:
        raise ValueError(f"unknown landing format {fmt!r}; choose one of {', '.join(LANDING_FORMATS)}")
    return buf.getvalue()


def write_landing(landing: Location, table: pa.Table, name: str, fmt: str = "parquet", gzip_files: bool = False) -> list[str]:
    """Write request-log rows to their hour partitions as ``<name>.<fmt>[.gz]``; returns the paths.

    Output is deterministic (same rows, same bytes), so seeded generators reproduce exactly.
    """
    table = table.select(REQUEST_LOG.names).cast(REQUEST_LOG)
    if len(table) == 0:
        return []
    hours_us = pc.cast(table["ts"], pa.int64()).to_numpy() // 3_600_000_000
    paths = []
    for hour in np.unique(hours_us):
        part = table.filter(pa.array(hours_us == hour))
        hour_dt = datetime.fromtimestamp(int(hour) * 3600, tz=timezone.utc)
        data = _encode(part, fmt)
        suffix = fmt
        if gzip_files:
            data = gzip.compress(data, mtime=0)
            suffix += ".gz"
        path = landing.path(hour_partition(hour_dt), f"{name}.{suffix}")
        landing.write_bytes(path, data)
        paths.append(path)
    return paths
