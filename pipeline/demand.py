"""Demand series: requests and average concurrent resources per bucket (5 minutes, or 1 minute).

For user *u* and bucket ``[b, b + step_s)`` (``step_s`` = 300 s by default; 60 s for replays)::

    requests   = number of u's requests that *arrive* in the bucket
    cpu_cores  = Σ cpu_cores  · overlap_s / step_s      (average concurrent cores)
    memory_gb  = Σ memory_mb / 1024 · overlap_s / step_s
    gpus       = Σ gpus       · overlap_s / step_s

where ``overlap_s`` is how long the request runs inside the bucket (a request runs
``[ts, ts + duration_s)``, the duration rounded to the microsecond), so a request that runs across
a bucket boundary counts in each bucket by its overlap. This is the one implementation of that
arithmetic (:func:`_bucket_span`); its outputs:

* :func:`build_demand_series`: per user, long format (schema :data:`pipeline.schemas.DEMAND`),
  sorted by ``(user_id, ts)``, zero-filled between each user's first and last active bucket.
* :func:`demand_from_lake`: the same from the lake, streamed a batch at a time (the columns it
  needs only), so the forecast cycle's day of history never holds a day of raw requests;
* :func:`system_demand` / :func:`system_demand_from_lake`: all users summed on a dense grid over
  ``[since, until)`` (:class:`SystemDemand`), accumulated batch by batch so a lake of hundreds
  of millions of requests is never held in memory (the replay simulator's input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.schemas import BUCKET_SECONDS, DEMAND, REQUEST_LOG
from pipeline.storage import Location

_US = 1_000_000
_BUCKET_US = BUCKET_SECONDS * _US
#: Every request that arrived this long before a window is read (its overlap counts); earlier ones
#: only when they ran longer than this (see :data:`LONG_REQUEST_HORIZON`).
DEFAULT_LOOKBACK = timedelta(hours=6)
#: How long before a window a request may have arrived and still run in it: ingest quarantines
#: longer requests (``ingest.max_duration_s``, 7 days by default). Requests that arrived between
#: this and the look-back before a window are found through the Parquet files' statistics (the
#: largest ``duration_s`` of each file), so nearly every file there is skipped unread: a week of
#: ServeGen's files (128 M requests, none that long) costs ~0.3 s.
LONG_REQUEST_HORIZON = timedelta(days=7)
#: Bucket lengths a demand series may have, seconds.
STEP_SECONDS = (60, BUCKET_SECONDS)
_PARTITIONING = ds.partitioning(pa.schema([("date", pa.string()), ("hour", pa.string())]), flavor="hive")

#: Request-log rows per batch of a streamed lake read: its peak memory is a few such batches (of
#: the columns it reads) plus what it accumulates, however many requests the window holds.
_BATCH_ROWS = 1 << 20
#: The columns the demand arithmetic reads (not the request, program and configuration ids).
DEMAND_INPUT_COLUMNS = ("user_id", "ts", "duration_s", "cpu_cores", "memory_mb", "gpus")
#: Rows of per-batch partial sums a streamed read keeps before folding them into one table.
_FOLD_ROWS = 1 << 22
#: A window read lists the ``date=`` partitions of its days one by one; longer windows list the
#: whole lake at once (one listing beats this many per-day ones).
_LIST_DAYS_MAX = 62


def _bucket_span(start_us: np.ndarray, duration_s: np.ndarray, step_us: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which buckets each request runs in: ``(end_us, first, last)`` bucket numbers (``ts // step``).

    A request runs ``[start, start + round(duration_s µs))``; a zero-length one still "runs" in
    the bucket it arrives in (with zero overlap), so it marks that bucket active.
    """
    end = start_us + np.maximum(np.round(duration_s * _US).astype(np.int64), 0)
    b0 = start_us // step_us
    return end, b0, np.maximum(b0, (end - 1) // step_us)


def _overlap_s(start_us: np.ndarray, end_us: np.ndarray, bucket: np.ndarray, step_us: int) -> np.ndarray:
    """Seconds of ``[start, end)`` inside bucket ``[bucket · step, (bucket + 1) · step)``."""
    b_start = bucket * step_us
    return np.maximum((np.minimum(end_us, b_start + step_us) - np.maximum(start_us, b_start)) / _US, 0.0)


def _spread(table: pa.Table, lo_us: int | None, hi_us: int | None, step_us: int = _BUCKET_US) -> pa.Table:
    """One row per (request, bucket it overlaps): user_id, bucket, arrivals and resource·seconds."""
    start = pc.cast(table["ts"], pa.int64()).to_numpy()
    end, b0, b1 = _bucket_span(start, table["duration_s"].to_numpy(), step_us)
    k = b1 - b0 + 1
    idx = np.repeat(np.arange(len(start)), k)
    step = np.arange(len(idx)) - np.repeat(np.cumsum(k) - k, k)
    bucket = b0[idx] + step
    b_start = bucket * step_us
    overlap_s = _overlap_s(start[idx], end[idx], bucket, step_us)
    arrivals = (step == 0).astype(np.int64)
    keep = np.ones(len(idx), dtype=bool)
    if lo_us is not None:
        keep &= b_start >= lo_us
    if hi_us is not None:
        keep &= b_start < hi_us
    # A zero-duration request still marks its bucket active (it arrived there).
    out = pa.table(
        {
            "user_id": pc.take(table["user_id"], pa.array(idx[keep])),
            "bucket": pa.array(bucket[keep]),
            "requests": pa.array(arrivals[keep]),
            "cpu_cores": pa.array((table["cpu_cores"].to_numpy()[idx] * overlap_s)[keep]),
            "memory_gb": pa.array((table["memory_mb"].to_numpy()[idx] / 1024.0 * overlap_s)[keep]),
            "gpus": pa.array((table["gpus"].to_numpy()[idx] * overlap_s)[keep]),
        }
    )
    return out


_SUMS = [("requests", "sum"), ("cpu_cores", "sum"), ("memory_gb", "sum"), ("gpus", "sum")]


def _aggregate(parts: list[pa.Table]) -> pa.Table:
    table = pa.concat_tables(parts)
    agg = table.group_by(["user_id", "bucket"], use_threads=False).aggregate(_SUMS)
    return agg.rename_columns({f"{c}_sum": c for c, _ in _SUMS} | {"user_id": "user_id", "bucket": "bucket"})


def _zero_fill(agg: pa.Table, step_us: int = _BUCKET_US) -> pa.Table:
    """Every bucket between each user's first and last active bucket, sorted by (user, ts)."""
    if agg.num_rows == 0:
        return DEMAND.empty_table()
    agg = agg.sort_by([("user_id", "ascending"), ("bucket", "ascending")])
    users = agg["user_id"].combine_chunks()
    codes = pc.dictionary_encode(users).indices.to_numpy()
    bucket = agg["bucket"].to_numpy()
    change = np.flatnonzero(np.diff(codes)) + 1
    first_i = np.concatenate([[0], change])
    last_i = np.concatenate([change - 1, [len(codes) - 1]])
    span = bucket[last_i] - bucket[first_i] + 1  # dense grid length per user
    grid_start = np.cumsum(span) - span
    user_of_row = np.repeat(np.arange(len(first_i)), np.diff(np.append(first_i, len(codes))))
    pos = grid_start[user_of_row] + bucket - bucket[first_i][user_of_row]
    user_row = np.repeat(first_i, span)
    full_bucket = np.repeat(bucket[first_i], span) + (np.arange(span.sum()) - np.repeat(grid_start, span))
    cols = {}
    for name in ("requests", "cpu_cores", "memory_gb", "gpus"):
        dense = np.zeros(len(full_bucket), dtype=np.int64 if name == "requests" else np.float64)
        values = agg[name].to_numpy()
        dense[pos] = values if name == "requests" else values / (step_us / _US)
        cols[name] = dense
    return pa.table(
        {
            "user_id": pc.take(users, pa.array(user_row)),
            "ts": pa.array(full_bucket * step_us).cast(pa.timestamp("us")).cast(DEMAND.field("ts").type),
            **cols,
        },
        schema=DEMAND,
    )


def _step_us(step_s: float) -> int:
    if step_s not in STEP_SECONDS:
        raise ValueError(f"demand step must be one of {', '.join(f'{s:g} s' for s in STEP_SECONDS)}, got {step_s!r}")
    return int(step_s) * _US


def build_demand_series(requests: pa.Table, since: datetime | None = None, until: datetime | None = None,
                        step_s: float = BUCKET_SECONDS) -> pa.Table:
    """Demand series (``DEMAND``) of request-log rows, restricted to buckets in ``[since, until)``.

    ``step_s``: bucket length, 300 (the forecast contract's 5-minute bucket) or 60 seconds."""
    step_us = _step_us(step_s)
    requests = requests.select(REQUEST_LOG.names)
    lo = None if since is None else int(since.timestamp()) * _US
    hi = None if until is None else int(until.timestamp()) * _US
    if requests.num_rows == 0:
        return DEMAND.empty_table()
    return _zero_fill(_aggregate([_spread(requests.combine_chunks(), lo, hi, step_us)]), step_us)


@dataclass(frozen=True)
class SystemDemand:
    """All users' demand summed on the grid ``start + k · step_s``, ``k = 0 .. n − 1``.

    ``requests``: arrivals per bucket; ``cpu_cores``, ``memory_gb``, ``gpus``: average concurrent
    use over the bucket (float64 ``[n]`` arrays, demand units)."""

    start: datetime
    step_s: float
    requests: np.ndarray
    cpu_cores: np.ndarray
    memory_gb: np.ndarray
    gpus: np.ndarray


class _SystemAccumulator:
    """Adds request batches into dense per-bucket sums over ``[lo, lo + n · step)``.

    Per request the first and last bucket get their overlap; the whole buckets between them get
    ``step_s`` each through a difference array, so a long request costs O(1), not O(buckets)."""

    _COLUMNS = ("cpu_cores", "memory_mb", "gpus")

    def __init__(self, since: datetime, until: datetime, step_s: float) -> None:
        self.step_us = _step_us(step_s)
        self.lo = int(since.timestamp() * _US)
        span = int(until.timestamp() * _US) - self.lo
        if span <= 0 or span % self.step_us or self.lo % self.step_us:
            raise ValueError(f"[{since.isoformat()}, {until.isoformat()}) must be a non-empty whole number of "
                             f"{step_s:g}-second buckets, on the bucket grid")
        self.n = span // self.step_us
        self.arrivals = np.zeros(self.n)
        self.part = np.zeros((3, self.n + 1))  # overlap · amount in first/last buckets
        self.full = np.zeros((3, self.n + 2))  # difference array of whole buckets

    def add(self, batch: pa.Table | pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        start = pc.cast(batch["ts"], pa.int64()).to_numpy(zero_copy_only=False)
        end, b0, b1 = _bucket_span(start, batch["duration_s"].to_numpy(zero_copy_only=False), self.step_us)
        g0, g1 = self.lo // self.step_us, self.lo // self.step_us + self.n  # grid [g0, g1)
        arr = b0[(b0 >= g0) & (b0 < g1)] - g0
        self.arrivals += np.bincount(arr, minlength=self.n)[: self.n]
        live = (b1 >= g0) & (b0 < g1)
        if not live.all():
            start, end, b0, b1 = start[live], end[live], b0[live], b1[live]
        amounts = [batch[c].to_numpy(zero_copy_only=False)[live].astype(np.float64) for c in self._COLUMNS]
        amounts[1] = amounts[1] / 1024.0  # memory_mb -> GB
        c0, c1 = np.clip(b0, g0, g1) - g0, np.clip(b1, g0 - 1, g1 - 1) - g0  # buckets clipped to the grid
        first = _overlap_s(start, end, c0 + g0, self.step_us)
        last = _overlap_s(start, end, c1 + g0, self.step_us)
        same = c0 == c1
        inner_lo, inner_hi = c0 + 1, np.maximum(c1, c0 + 1)  # whole buckets c0+1 .. c1-1
        for r, a in enumerate(amounts):
            self.part[r] += np.bincount(c0, a * first, minlength=self.n + 1)[: self.n + 1]
            self.part[r] += np.bincount(c1[~same], (a * last)[~same], minlength=self.n + 1)[: self.n + 1]
            sec = a * (self.step_us / _US)
            self.full[r] += np.bincount(inner_lo, sec, minlength=self.n + 2)[: self.n + 2]
            self.full[r] -= np.bincount(inner_hi, sec, minlength=self.n + 2)[: self.n + 2]

    def result(self, since: datetime) -> SystemDemand:
        step_s = self.step_us / _US
        cols = [np.maximum((self.part[r, : self.n] + np.cumsum(self.full[r])[: self.n]) / step_s, 0.0) for r in range(3)]
        return SystemDemand(since, step_s, self.arrivals, *cols)


def system_demand(batches: Iterable[pa.Table | pa.RecordBatch], since: datetime, until: datetime,
                  step_s: float = BUCKET_SECONDS) -> SystemDemand:
    """All users' demand summed per bucket over ``[since, until)`` (bucket-aligned), from request
    rows given in any number of batches (columns ``ts, duration_s, cpu_cores, memory_mb, gpus``).

    The same arithmetic as :func:`build_demand_series` summed over users; requests that started
    before ``since`` count by their overlap, arrivals only inside the window."""
    acc = _SystemAccumulator(since, until, step_s)
    for batch in batches:
        acc.add(batch)
    return acc.result(since)


_SYSTEM_COLUMNS = ["ts", "duration_s", "cpu_cores", "memory_mb", "gpus"]


def system_demand_from_lake(lake: Location, since: datetime, until: datetime, step_s: float = BUCKET_SECONDS,
                            lookback: timedelta = DEFAULT_LOOKBACK) -> SystemDemand:
    """:func:`system_demand` of the lake's request logs, streamed batch by batch (every request
    running in the window counts by its overlap, as in :func:`demand_from_lake`)."""
    dataset = _lake_dataset(lake, since=since - LONG_REQUEST_HORIZON, until=until)
    if dataset is None:
        raise FileNotFoundError(f"no request logs in the lake {lake.uri} (looked for {lake.path('request_logs')}); "
                                "run `warmcast ingest` first")
    return system_demand(_running_batches(dataset, since, until, lookback, _SYSTEM_COLUMNS), since, until, step_s)


def system_demand_from_landing(landing: Location, since: datetime, until: datetime, step_s: float = BUCKET_SECONDS,
                               lookback: timedelta = DEFAULT_LOOKBACK) -> SystemDemand:
    """:func:`system_demand` of the Parquet request-log files in the hour partitions of a landing
    location (e.g. the output of ``warmcast import``), read without ingest: no validation, no
    de-duplication. Other files (CSV, JSON Lines, a users file) are not read."""
    files = [f for f in landing.list_files() if _LANDING_PARQUET.search(f)]
    if not files:
        raise FileNotFoundError(f"no Parquet request-log files in date=/hour= partitions under {landing.uri}")
    return system_demand(_request_batches(files, landing, since, until, lookback), since, until, step_s)


_LANDING_PARQUET = re.compile(r"(?:^|/)date=\d{4}-\d{2}-\d{2}/hour=\d{2}/[^/]+\.parquet$")


def _request_batches(files: list[str], loc: Location, since: datetime, until: datetime,
                     lookback: timedelta) -> Iterable[pa.RecordBatch]:
    dataset = ds.dataset(files, filesystem=loc.fs, format="parquet", partitioning=_PARTITIONING, partition_base_dir=loc.root)
    yield from _running_batches(dataset, since, until, lookback, _SYSTEM_COLUMNS)


def _running_batches(dataset: ds.Dataset, since: datetime | None, until: datetime | None, lookback: timedelta,
                     columns: Sequence[str], users: Sequence[str] | None = None) -> Iterable[pa.RecordBatch]:
    """The rows of every request that may run in ``[since, until)`` (of ``users``): those that
    arrived from ``lookback`` before ``since`` on, then the ones that arrived up to
    :data:`LONG_REQUEST_HORIZON` before it and ran longer than ``lookback`` (a filter on
    ``duration_s`` that the files' statistics answer for nearly every file without reading it).
    Without ``since``, every row before ``until``."""
    cols = list(columns)
    if since is None:
        yield from dataset.to_batches(columns=cols, filter=_window_filter(None, until, users), batch_size=_BATCH_ROWS)
        return
    yield from dataset.to_batches(columns=cols, filter=_window_filter(since - lookback, until, users), batch_size=_BATCH_ROWS)
    if lookback < LONG_REQUEST_HORIZON:
        early = _window_filter(since - LONG_REQUEST_HORIZON, since - lookback, users) & (ds.field("duration_s") > lookback.total_seconds())
        yield from dataset.to_batches(columns=cols, filter=early, batch_size=_BATCH_ROWS)


def _window_filter(since: datetime | None, until: datetime | None, users: Sequence[str] | None = None) -> ds.Expression | None:
    """Rows with ``since <= ts < until`` (either bound optional) of ``users`` (default all), with
    the ``date`` partitions outside the window pruned."""
    ts_type = REQUEST_LOG.field("ts").type
    conds = []
    if since is not None:
        conds.append(ds.field("ts") >= pa.scalar(since, ts_type))
    if until is not None:
        conds.append(ds.field("ts") < pa.scalar(until, ts_type))
    if users is not None:
        conds.append(ds.field("user_id").isin(list(users)))
    if since is not None or until is not None:
        lo = _utc_day(since).isoformat() if since else "1970-01-01"
        hi = _utc_day(until).isoformat() if until else "9999-12-31"
        conds.append((ds.field("date") >= lo) & (ds.field("date") <= hi))
    flt = None
    for cond in conds:
        flt = cond if flt is None else flt & cond
    return flt


def _lake_dataset(lake: Location, dictionary_columns: Sequence[str] = (), since: datetime | None = None,
                  until: datetime | None = None) -> ds.Dataset | None:
    """The lake's request logs as a dataset; None when it has none yet. With both ``since`` and
    ``until``, only the ``date=`` partitions of the days from ``since`` to ``until`` are listed:
    a lake keeps growing, and listing a year of it (over 100,000 files, each 5-minute slot one)
    for every read would cost an S3 lake a hundred LIST calls where a day costs one."""
    path = lake.path("request_logs")
    if not lake.is_dir(path) and not lake.uri.startswith("s3://"):
        return None
    fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=set(dictionary_columns))) if dictionary_columns else "parquet"
    if since is None or until is None or (_utc_day(until) - _utc_day(since)).days > _LIST_DAYS_MAX:
        return ds.dataset(path, filesystem=lake.fs, format=fmt, partitioning=_PARTITIONING)
    files = []
    day, last = _utc_day(since), _utc_day(until)
    while day <= last:
        selector = pafs.FileSelector(lake.path("request_logs", f"date={day.isoformat()}"), recursive=True, allow_not_found=True)
        files += [i.path for i in lake.fs.get_file_info(selector) if i.type == pafs.FileType.File and _is_data_file(i.path)]
        day += timedelta(days=1)
    if not files:  # nothing in those days: no rows (a dataset of no files would not know the columns)
        return ds.dataset(REQUEST_LOG.empty_table().append_column("date", pa.array([], pa.string()))
                          .append_column("hour", pa.array([], pa.string())))
    return ds.dataset(sorted(files), filesystem=lake.fs, format=fmt, partitioning=_PARTITIONING, partition_base_dir=path)


def _utc_day(t: datetime) -> date:
    """The UTC day of ``t`` (the lake's ``date=`` partitions are UTC days; naive times are UTC)."""
    return (t.astimezone(timezone.utc) if t.tzinfo else t).date()


def _is_data_file(path: str) -> bool:
    """A lake data file, as a directory scan finds them: Parquet, not hidden or ``_``-prefixed (the
    validation results and staged files beside the partitions)."""
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def lake_batches(lake: Location, since: datetime | None, until: datetime | None, columns: Sequence[str],
                 users: Sequence[str] | None = None, dictionary_columns: Sequence[str] = ()) -> Iterable[pa.RecordBatch]:
    """The lake's request-log rows with ``since <= ts < until`` (either bound optional) of ``users``
    (default all), ``columns`` only, a batch of at most :data:`_BATCH_ROWS` rows at a time (none
    when the lake has no request logs yet). ``dictionary_columns`` come as the Parquet
    dictionaries they are stored as (ids: a few distinct values over millions of rows)."""
    dataset = _lake_dataset(lake, dictionary_columns, since, until)
    if dataset is None:
        return
    yield from dataset.to_batches(columns=list(columns), filter=_window_filter(since, until, users), batch_size=_BATCH_ROWS)


def read_requests(lake: Location, since: datetime | None = None, until: datetime | None = None, users: list[str] | None = None,
                  columns: Sequence[str] | None = None) -> pa.Table:
    """Valid request-log rows from the lake with ``since <= ts < until`` (either bound optional);
    ``columns``: only these (default all of ``REQUEST_LOG``). The whole result is in memory: for
    demand or the users active in a window, :func:`demand_from_lake` and :func:`active_users`
    stream instead."""
    schema = REQUEST_LOG if columns is None else pa.schema([REQUEST_LOG.field(c) for c in columns])
    dataset = _lake_dataset(lake, since=since, until=until)
    if dataset is None:
        return schema.empty_table()
    table = dataset.to_table(columns=schema.names, filter=_window_filter(since, until, users))
    return table.cast(schema)


def demand_from_lake(lake: Location, since: datetime | None = None, until: datetime | None = None, lookback: timedelta = DEFAULT_LOOKBACK,
                     users: Sequence[str] | None = None) -> pa.Table:
    """Demand series for buckets in ``[since, until)`` from the lake, of ``users`` (default everyone).

    Every request that runs in a bucket counts there by its overlap, however long before
    ``since`` it arrived (up to :data:`LONG_REQUEST_HORIZON`): those from ``lookback`` before on
    are read, earlier ones only if they ran longer than it. Streamed: the lake is read a batch
    at a time (only :data:`DEMAND_INPUT_COLUMNS`), each batch summed per user and bucket at
    once, so memory follows the demand series, not the request count (a day of ServeGen, 15 M
    requests: 1.1 GB peak and 3.3 s, against 7.8 GB and 17 s for every row at once;
    ``benchmarks/lake_reads.py``). The same values as
    :func:`build_demand_series` of every row before ``until``, up to the order of the
    floating-point sums.
    """
    lo = None if since is None else int(since.timestamp()) * _US
    hi = None if until is None else int(until.timestamp()) * _US
    dataset = _lake_dataset(lake, since=None if since is None else since - LONG_REQUEST_HORIZON, until=until)
    if dataset is None:
        return DEMAND.empty_table()
    partials: list[pa.Table] = []
    rows = 0
    for batch in _running_batches(dataset, since, until, lookback, DEMAND_INPUT_COLUMNS, users):
        if batch.num_rows == 0:
            continue
        part = _aggregate([_spread(pa.Table.from_batches([batch]), lo, hi)])
        partials.append(part)
        rows += part.num_rows
        if rows > _FOLD_ROWS and len(partials) > 1:
            partials = [_aggregate(partials)]
            rows = partials[0].num_rows
    if not partials:
        return DEMAND.empty_table()
    return _zero_fill(_aggregate(partials) if len(partials) > 1 else partials[0])


def active_users(lake: Location, since: datetime, until: datetime, users: Sequence[str] | None = None) -> set[str]:
    """The users (of ``users``, default any) with a request arriving in ``[since, until)``.

    Streamed over the ``user_id`` column alone, read as the Parquet dictionary it is stored as,
    so a week of a busy platform's requests costs its dictionary indices, not a string per
    request."""
    if since >= until:
        return set()
    found: set[str] = set()
    for batch in lake_batches(lake, since, until, ["user_id"], dictionary_columns=["user_id"]):
        col = batch.column(0)
        if isinstance(col, pa.DictionaryArray):
            col = col.dictionary.take(pc.unique(col.indices).drop_null())
        found.update(v for v in pc.unique(col).to_pylist() if v is not None)
    return found if users is None else found & set(users)


@dataclass
class DemandSummary:
    users: int
    buckets: int
    first: str
    last: str
    requests: int
    peak_cpu_cores: float
    mean_cpu_cores: float
    peak_memory_gb: float
    peak_gpus: float
    top_users: list[tuple[str, float, int]]  # (user, mean cpu cores, requests)
    hourly_cpu: list[tuple[str, float]]  # (UTC hour of day, mean system cpu cores)

    def render(self) -> str:
        lines = [
            f"demand series: {self.users} users, {self.buckets} user-buckets of 5 min, {self.first} – {self.last}",
            f"  requests       {self.requests:>12,}",
            f"  cpu cores      peak {self.peak_cpu_cores:>10.1f}   mean {self.mean_cpu_cores:>10.1f}  (system, concurrent)",
            f"  memory GB      peak {self.peak_memory_gb:>10.1f}",
            f"  GPUs           peak {self.peak_gpus:>10.2f}",
            "  top users by mean cpu cores:",
        ]
        lines += [f"    {u:<24} {c:>8.2f} cores  {r:>9,} requests" for u, c, r in self.top_users]
        if self.hourly_cpu:
            peak = max(c for _, c in self.hourly_cpu) or 1.0
            lines.append("  system cpu cores by hour of day (UTC, mean):")
            lines += [f"    {h}  {'#' * round(40 * c / peak):<40} {c:>8.1f}" for h, c in self.hourly_cpu]
        return "\n".join(lines)


def summarize(demand: pa.Table, top: int = 5) -> DemandSummary:
    """A readable summary: system peaks (sum over users per bucket) and the heaviest users."""
    if demand.num_rows == 0:
        return DemandSummary(0, 0, "-", "-", 0, 0.0, 0.0, 0.0, 0.0, [], [])
    system = demand.group_by("ts", use_threads=False).aggregate([("cpu_cores", "sum"), ("memory_gb", "sum"), ("gpus", "sum")])
    per_user = demand.group_by("user_id", use_threads=False).aggregate([("cpu_cores", "mean"), ("requests", "sum")])
    per_user = per_user.sort_by([("cpu_cores_mean", "descending")]).slice(0, top)
    ts = demand["ts"]
    by_hour = system.append_column("hour", pc.hour(system["ts"])).group_by("hour").aggregate([("cpu_cores_sum", "mean")])
    by_hour = by_hour.sort_by("hour").to_pylist()
    return DemandSummary(
        users=len(pc.unique(demand["user_id"])),
        buckets=demand.num_rows,
        first=str(pc.min(ts)),
        last=str(pc.max(ts)),
        requests=int(pc.sum(demand["requests"]).as_py()),
        peak_cpu_cores=float(pc.max(system["cpu_cores_sum"]).as_py()),
        mean_cpu_cores=float(pc.mean(system["cpu_cores_sum"]).as_py()),
        peak_memory_gb=float(pc.max(system["memory_gb_sum"]).as_py()),
        peak_gpus=float(pc.max(system["gpus_sum"]).as_py()),
        top_users=[(r["user_id"], r["cpu_cores_mean"], r["requests_sum"]) for r in per_user.to_pylist()],
        hourly_cpu=[(f"{r['hour']:02d}:00", r["cpu_cores_sum_mean"]) for r in by_hour],
    )
