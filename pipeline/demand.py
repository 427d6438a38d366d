"""Per-user demand series: requests and average concurrent resources per 5-minute bucket.

For user *u* and bucket ``[b, b + 300 s)``::

    requests   = number of u's requests that *arrive* in the bucket
    cpu_cores  = Σ cpu_cores  · overlap_s / 300      (average concurrent cores)
    memory_gb  = Σ memory_mb / 1024 · overlap_s / 300
    gpus       = Σ gpus       · overlap_s / 300

where ``overlap_s`` is how long the request runs inside the bucket, so a request that runs
across a bucket boundary counts in each bucket by its overlap. Long format (schema
:data:`pipeline.schemas.DEMAND`), sorted by ``(user_id, ts)``, zero-filled between each user's
first and last active bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.schemas import BUCKET_SECONDS, DEMAND, REQUEST_LOG
from pipeline.storage import Location

_US = 1_000_000
_BUCKET_US = BUCKET_SECONDS * _US
#: Requests that started this long before ``since`` are read so their overlap counts.
DEFAULT_LOOKBACK = timedelta(hours=6)
_PARTITIONING = ds.partitioning(pa.schema([("date", pa.string()), ("hour", pa.string())]), flavor="hive")


def _spread(table: pa.Table, lo_us: int | None, hi_us: int | None) -> pa.Table:
    """One row per (request, bucket it overlaps): user_id, bucket, arrivals and resource·seconds."""
    start = pc.cast(table["ts"], pa.int64()).to_numpy()
    dur_us = np.round(table["duration_s"].to_numpy() * _US).astype(np.int64)
    end = start + np.maximum(dur_us, 0)
    b0 = start // _BUCKET_US
    b1 = np.maximum(b0, (end - 1) // _BUCKET_US)  # last bucket the request runs in
    k = b1 - b0 + 1
    idx = np.repeat(np.arange(len(start)), k)
    step = np.arange(len(idx)) - np.repeat(np.cumsum(k) - k, k)
    bucket = b0[idx] + step
    b_start = bucket * _BUCKET_US
    overlap_s = (np.minimum(end[idx], b_start + _BUCKET_US) - np.maximum(start[idx], b_start)) / _US
    overlap_s = np.maximum(overlap_s, 0.0)
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


def _zero_fill(agg: pa.Table) -> pa.Table:
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
        dense[pos] = values if name == "requests" else values / BUCKET_SECONDS
        cols[name] = dense
    return pa.table(
        {
            "user_id": pc.take(users, pa.array(user_row)),
            "ts": pa.array(full_bucket * _BUCKET_US).cast(pa.timestamp("us")).cast(DEMAND.field("ts").type),
            **cols,
        },
        schema=DEMAND,
    )


def build_demand_series(requests: pa.Table, since: datetime | None = None, until: datetime | None = None) -> pa.Table:
    """Demand series (``DEMAND``) of request-log rows, restricted to buckets in ``[since, until)``."""
    requests = requests.select(REQUEST_LOG.names)
    lo = None if since is None else int(since.timestamp()) * _US
    hi = None if until is None else int(until.timestamp()) * _US
    if requests.num_rows == 0:
        return DEMAND.empty_table()
    return _zero_fill(_aggregate([_spread(requests.combine_chunks(), lo, hi)]))


def read_requests(lake: Location, since: datetime | None = None, until: datetime | None = None, users: list[str] | None = None) -> pa.Table:
    """Valid request-log rows from the lake with ``since <= ts < until`` (either bound optional)."""
    path = lake.path("request_logs")
    if not lake.is_dir(path) and not lake.uri.startswith("s3://"):
        return REQUEST_LOG.empty_table()
    dataset = ds.dataset(path, filesystem=lake.fs, format="parquet", partitioning=_PARTITIONING)
    flt = None
    ts = ds.field("ts")
    if since is not None:
        flt = ts >= pa.scalar(since, REQUEST_LOG.field("ts").type)
    if until is not None:
        cond = ts < pa.scalar(until, REQUEST_LOG.field("ts").type)
        flt = cond if flt is None else flt & cond
    if users is not None:
        cond = ds.field("user_id").isin(users)
        flt = cond if flt is None else flt & cond
    if since is not None or until is not None:
        lo = (since or datetime(1970, 1, 1, tzinfo=until.tzinfo)).date().isoformat()
        hi = (until.date().isoformat() if until else "9999-12-31")
        part = (ds.field("date") >= lo) & (ds.field("date") <= hi)
        flt = part if flt is None else flt & part
    table = dataset.to_table(columns=REQUEST_LOG.names, filter=flt)
    return table.cast(REQUEST_LOG)


def demand_from_lake(lake: Location, since: datetime | None = None, until: datetime | None = None, lookback: timedelta = DEFAULT_LOOKBACK) -> pa.Table:
    """Demand series for buckets in ``[since, until)`` from the lake.

    Requests that arrived up to ``lookback`` before ``since`` are read too, so a long request
    that started earlier still counts in the first buckets.
    """
    read_since = None if since is None else since - lookback
    return build_demand_series(read_requests(lake, read_since, until), since, until)


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
