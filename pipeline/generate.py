"""Synthetic request logs: the embedded default for the demo and the benchmarks.

The population comes from :mod:`pipeline.archetypes`; this module draws its arrivals.

Arrival process: for every user and every minute, a non-homogeneous Poisson count with rate ::

    rate[u, minute] = peak_rate(archetype) · rate_scale[u] · day_factor[u, local day]
                      · intensity(archetype, local minute of week) + burst[u, minute]

(requests/minute). ``day_factor`` is a mean-one lognormal (sigma 0.25) per user and local day,
so no two Mondays are identical; ``burst`` is the extra rate of a bursty user while one of its
bursts runs (bursts start as a Bernoulli per minute, proportional to the intensity, and last a
geometric number of minutes, at most 60). Arrivals are uniform inside their minute. Each request
runs one of its user's programs (low-numbered programs are used most); the program fixes the
image, cores, GPUs and typical memory, and its duration is lognormal around the program's median.

Work is vectorised per hour block: one ``[users, 60]`` rate matrix, one ``rng.poisson`` draw,
then per-row arrays; peak memory is about one hour of rows. Every random draw comes from a
``SeedSequence(seed, spawn_key=(stream, block))`` stream, so the same arguments give the same
rows, and landing files byte for byte (``write_landing`` is deterministic).

Timestamps: ``start`` must be timezone-aware (naive datetimes are rejected rather than guessed);
rows are in UTC. The span is ``days`` rounded to whole minutes (at least one minute).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.archetypes import (
    ARCHETYPES,
    MINUTES_PER_DAY,
    MINUTES_PER_WEEK,
    SOFTWARE_CONFIGS,
    TIER_MAX_CORES,
    TIER_WEIGHT,
    TIERS,
    UserTraits,
    normalise_mix,
    shape_table,
    user_traits,
)
from pipeline.landing import LANDING_FORMATS, write_landing
from pipeline.schemas import REQUEST_LOG, TS, USER_PROFILE
from pipeline.storage import Location

BLOCK_MINUTES = 60  # one chunk = one hour of minutes from ``start``
DAY_FACTOR_SIGMA = 0.25
MEMORY_JITTER_SIGMA = 0.1  # per-request spread of memory around the program's typical MB
DURATION_BOUNDS_S = (0.05, 86_400.0)
USERS_FILE = "_users.csv"  # '_' prefix: ingest does not read it as request data

_US_PER_MIN = 60_000_000
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
_STREAM_BURST, _STREAM_DAY, _STREAM_ARRIVALS = 1, 2, 3  # stream 0 draws the traits


@dataclass(frozen=True)
class GenerateSummary:
    """What :func:`generate_landing` wrote. ``rate_scale`` multiplies the natural rates
    (1.0 unless ``target_rows`` was given)."""

    rows: int
    users: int
    chunks: int
    start: datetime
    end: datetime  # exclusive
    files: tuple[str, ...]
    users_file: str
    rate_scale: float
    seconds: float  # wall time of generation plus writing

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601, ``files`` as a count (a long run writes thousands)."""
        out = asdict(self)
        out["start"], out["end"] = self.start.isoformat(), self.end.isoformat()
        out["files"] = len(self.files)
        return out


@dataclass(frozen=True)
class _Plan:
    traits: UserTraits
    seed: int
    start_us: int  # µs since the epoch
    n_minutes: int
    m0: int  # absolute UTC minute (since the epoch) holding the midpoint of minute 0
    base: np.ndarray  # per user: peak_rate · rate_scale, requests/minute
    shape_index: np.ndarray  # per user: archetype · MINUTES_PER_WEEK, into the flat shape table
    bursty: np.ndarray  # indices of users with bursts

    @property
    def n_blocks(self) -> int:
        return -(-self.n_minutes // BLOCK_MINUTES)


def _rng(seed: int, stream: int, key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream, key % (1 << 32)))))


def _check_count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _plan(users: int, days: float, start: datetime, seed: int, mix: Mapping[str, float] | None) -> _Plan:
    users = _check_count(users, "users", 1)
    seed = _check_count(seed, "seed", 0)
    if isinstance(days, bool) or not isinstance(days, (int, float, np.integer, np.floating)) or not np.isfinite(days) or days <= 0:
        raise ValueError(f"days must be a finite number > 0, got {days!r}")
    if not isinstance(start, datetime):
        raise ValueError(f"start must be a datetime, got {start!r}")
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError(f"start must be timezone-aware (e.g. tzinfo=timezone.utc), got naive {start.isoformat()}")
    normalise_mix(mix)  # validates before any work
    traits = user_traits(users, seed, mix)
    start_us = (start - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    peak = np.array([a.peak_rate_per_min for a in ARCHETYPES])
    return _Plan(
        traits=traits,
        seed=seed,
        start_us=start_us,
        n_minutes=max(1, round(days * MINUTES_PER_DAY)),
        m0=(start_us + _US_PER_MIN // 2) // _US_PER_MIN,
        base=peak[traits.archetype] * traits.rate_scale,
        shape_index=traits.archetype * MINUTES_PER_WEEK,
        bursty=np.flatnonzero(traits.burst_rate_per_min > 0),
    )


def _local_minutes(plan: _Plan, k0: int, k1: int, users: np.ndarray | slice) -> np.ndarray:
    """Absolute local minute (since the epoch, in each user's clock) of minutes k0..k1; ``[u, m]``."""
    return (plan.m0 + np.arange(k0, k1))[None, :] + plan.traits.shift_min[users, None]


def _intensity(plan: _Plan, local: np.ndarray, users: np.ndarray | slice) -> np.ndarray:
    mow = (local + _EPOCH_WEEKDAY * MINUTES_PER_DAY) % MINUTES_PER_WEEK
    return np.take(shape_table().ravel(), plan.shape_index[users, None] + mow)


def _burst_rates(plan: _Plan, block: int) -> np.ndarray:
    """Extra requests/minute of the bursty users in ``block``; ``[len(plan.bursty), 60]``.

    A burst may start in the previous block and run into this one, so both blocks' starts are
    redrawn from their own streams (which keeps every block reproducible on its own).
    """
    users = plan.bursty
    arch = [ARCHETYPES[a] for a in plan.traits.archetype[users]]
    per_min = np.array([a.burst_starts_per_hour / 60.0 for a in arch])[:, None]
    mean_len = np.array([a.burst_mean_min for a in arch])[:, None]
    diff = np.zeros((len(users), 3 * BLOCK_MINUTES + 1))
    for j, bb in enumerate((block - 1, block)):
        if bb < 0:
            continue
        rng = _rng(plan.seed, _STREAM_BURST, bb)
        k0 = bb * BLOCK_MINUTES
        p = per_min * _intensity(plan, _local_minutes(plan, k0, k0 + BLOCK_MINUTES, users), users)
        starts = rng.random(p.shape) < p
        length = np.minimum(rng.geometric(np.broadcast_to(1.0 / mean_len, p.shape)), BLOCK_MINUTES)
        u, c = np.nonzero(starts)
        pos = j * BLOCK_MINUTES + c
        np.add.at(diff, (u, pos), 1.0)
        np.add.at(diff, (u, np.minimum(pos + length[u, c], 3 * BLOCK_MINUTES)), -1.0)
    active = np.cumsum(diff, axis=1)[:, BLOCK_MINUTES : 2 * BLOCK_MINUTES] > 0.5
    return active * plan.traits.burst_rate_per_min[users, None]


def _block_rates(plan: _Plan, block: int) -> np.ndarray:
    """Poisson rate (requests/minute) per user and minute of ``block``; ``[users, minutes]``."""
    k0 = block * BLOCK_MINUTES
    k1 = min(k0 + BLOCK_MINUTES, plan.n_minutes)
    every = slice(None)
    local = _local_minutes(plan, k0, k1, every)
    rate = _intensity(plan, local, every)
    day = local // MINUTES_PER_DAY
    first = int(day.min())
    factors = np.stack(
        [np.exp(DAY_FACTOR_SIGMA * _rng(plan.seed, _STREAM_DAY, d).standard_normal(plan.traits.n) - DAY_FACTOR_SIGMA**2 / 2)
         for d in range(first, int(day.max()) + 1)],
        axis=1,
    )
    rate *= np.take_along_axis(factors, day - first, axis=1)
    rate *= plan.base[:, None]
    if len(plan.bursty):
        rate[plan.bursty] += _burst_rates(plan, block)[:, : k1 - k0]
    return rate


def _expected_rows(plan: _Plan) -> float:
    return float(sum(_block_rates(plan, b).sum() for b in range(plan.n_blocks)))


def expected_rows(users: int, days: float, start: datetime, seed: int, mix: Mapping[str, float] | None = None) -> float:
    """Expected row count of :func:`generate_requests` at natural rates (the sum of all rates)."""
    return _expected_rows(_plan(users, days, start, seed, mix))


def _block_table(plan: _Plan, block: int, scale: float, first_id: int) -> pa.Table:
    """The rows arriving in ``block``, sorted by ``ts``; request ids count up from ``first_id``."""
    t = plan.traits
    rate = _block_rates(plan, block)
    if scale != 1.0:
        rate *= scale
    minutes = rate.shape[1]
    rng = _rng(plan.seed, _STREAM_ARRIVALS, block)
    counts = rng.poisson(rate)
    cell = np.repeat(np.arange(counts.size), counts.ravel())
    n = len(cell)
    minute = block * BLOCK_MINUTES + cell % minutes
    ts = plan.start_us + minute * _US_PER_MIN + (rng.random(n) * _US_PER_MIN).astype(np.int64)
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    user = (cell // minutes)[order]

    # Skewed program choice: program j of k is used with probability ~ sqrt((j+1)/k) - sqrt(j/k).
    prog = t.prog_offset[user] + (rng.random(n) ** 2 * t.n_programs[user]).astype(np.int64)
    sigma = np.array([a.duration_sigma for a in ARCHETYPES])[t.archetype[user]]
    duration = np.exp(t.prog_log_median_s[prog] + sigma * rng.standard_normal(n))
    duration = np.round(np.clip(duration, *DURATION_BOUNDS_S), 3)
    jitter = np.exp(MEMORY_JITTER_SIGMA * rng.standard_normal(n) - MEMORY_JITTER_SIGMA**2 / 2)
    memory = np.maximum(np.round(t.prog_memory_mb[prog] * jitter), 1.0)

    counter = pc.cast(pa.array(np.arange(first_id, first_id + n, dtype=np.int64)), pa.string())
    request_id = pc.binary_join_element_wise(f"syn-{plan.seed}-", pc.utf8_lpad(counter, width=10, padding="0"), "")
    return pa.Table.from_arrays(
        [
            request_id,
            t.user_ids.take(pa.array(user)),
            t.prog_ids.take(pa.array(prog)),
            pa.array(SOFTWARE_CONFIGS, pa.string()).take(pa.array(t.prog_config[prog])),
            pa.array(ts, type=TS),
            pa.array(duration),
            pa.array(t.prog_cores[prog]),
            pa.array(memory),
            pa.array(t.prog_gpus[prog]),
        ],
        schema=REQUEST_LOG,
    )


def _generate(plan: _Plan, target_rows: int | None) -> tuple[float, Iterator[pa.Table]]:
    scale = 1.0
    if target_rows is not None:
        target_rows = _check_count(target_rows, "target_rows", 1)
        expected = _expected_rows(plan)
        if expected <= 0:
            raise ValueError("target_rows cannot be met: the chosen population has no demand in this span")
        scale = target_rows / expected

    def chunks() -> Iterator[pa.Table]:
        first_id = 0
        for block in range(plan.n_blocks):
            table = _block_table(plan, block, scale, first_id)
            first_id += len(table)
            yield table

    return scale, chunks()


def generate_requests(
    users: int,
    days: float,
    start: datetime,
    seed: int,
    *,
    target_rows: int | None = None,
    mix: Mapping[str, float] | None = None,
) -> Iterator[pa.Table]:
    """Yield REQUEST_LOG tables in time order, one per hour from ``start`` (a table may be empty).

    ``users``: population size (>= 1); ``days``: span in days (> 0, whole minutes);
    ``start``: timezone-aware first instant; ``seed``: >= 0. ``target_rows`` scales every
    rate so the expected total is that many rows (the realised count is Poisson around it).
    ``mix`` overrides the archetype shares, e.g. ``{"office_hours": 1}``.
    Arguments are checked before the first chunk is asked for.
    """
    _, chunks = _generate(_plan(users, days, start, seed, mix), target_rows)
    return chunks


def user_profiles(users: int, seed: int, mix: Mapping[str, float] | None = None) -> pa.Table:
    """USER_PROFILE rows of the population :func:`generate_requests` draws for ``(users, seed)``."""
    t = user_traits(_check_count(users, "users", 1), _check_count(seed, "seed", 0), mix)
    tiers = [TIERS[i] for i in t.tier]
    return pa.Table.from_arrays(
        [
            t.user_ids,
            pa.array(tiers, pa.string()),
            pa.array([TIER_WEIGHT[x] for x in tiers], pa.float64()),
            pa.array([[SOFTWARE_CONFIGS[c] for c in cfg] for cfg in t.configs], pa.list_(pa.string())),
            pa.array([TIER_MAX_CORES[x] for x in tiers], pa.float64()),
        ],
        schema=USER_PROFILE,
    )


def profiles_csv(profiles: pa.Table) -> bytes:
    """USER_PROFILE rows as CSV; ``software_configs`` joined with ``'|'``."""
    flat = profiles.set_column(
        profiles.schema.get_field_index("software_configs"),
        "software_configs",
        pc.binary_join(profiles["software_configs"], "|"),
    )
    sink = pa.BufferOutputStream()
    pacsv.write_csv(flat, sink)
    return sink.getvalue().to_pybytes()


def generate_landing(
    landing: Location,
    users: int,
    days: float,
    start: datetime,
    seed: int,
    fmt: str = "parquet",
    gzip_files: bool = False,
    target_rows: int | None = None,
    mix: Mapping[str, float] | None = None,
) -> GenerateSummary:
    """Write a synthetic landing zone: hour chunk ``i`` as ``date=…/hour=…/synthetic-{i:05d}.<fmt>``
    (via :func:`~pipeline.landing.write_landing`) and the profiles as ``<landing>/_users.csv``.

    Files of the same name are replaced; other files in ``landing`` are left alone.
    """
    if fmt not in LANDING_FORMATS:
        raise ValueError(f"unknown landing format {fmt!r}; choose one of {', '.join(LANDING_FORMATS)}")
    began = time.perf_counter()
    plan = _plan(users, days, start, seed, mix)
    scale, chunks = _generate(plan, target_rows)
    users_file = landing.path(USERS_FILE)
    landing.write_bytes(users_file, profiles_csv(user_profiles(users, seed, mix)))
    files: list[str] = []
    rows = 0
    for i, table in enumerate(chunks):
        files += write_landing(landing, table, f"synthetic-{i:05d}", fmt, gzip_files)
        rows += len(table)
    start_utc = start.astimezone(timezone.utc)
    return GenerateSummary(
        rows=rows,
        users=plan.traits.n,
        chunks=plan.n_blocks,
        start=start_utc,
        end=start_utc + timedelta(minutes=plan.n_minutes),
        files=tuple(files),
        users_file=users_file,
        rate_scale=scale,
        seconds=time.perf_counter() - began,
    )


_REQUEST_DEFAULTS: dict[str, Any] = {
    "program_id": "prog-1",
    "software_config": "python-3.11-slim",
    "duration_s": 1.0,
    "cpu_cores": 1.0,
    "memory_mb": 512.0,
    "gpus": 0.0,
}


def make_request_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A REQUEST_LOG table from dicts, for tests: each needs ``user_id`` and an aware ``ts``.

    Missing fields default to: ``request_id`` ``f"req-{i:06d}"`` (``i`` = position in ``rows``),
    ``program_id`` "prog-1", ``software_config`` "python-3.11-slim", ``duration_s`` 1.0,
    ``cpu_cores`` 1.0, ``memory_mb`` 512.0, ``gpus`` 0.0. Unknown keys raise ``ValueError``.
    """
    full = []
    for i, row in enumerate(rows):
        unknown = set(row) - set(REQUEST_LOG.names)
        if unknown:
            raise ValueError(f"row {i}: unknown field(s) {sorted(unknown)}")
        for key in ("user_id", "ts"):
            if key not in row:
                raise ValueError(f"row {i}: {key!r} is required")
        ts = row["ts"]
        if not isinstance(ts, datetime) or ts.tzinfo is None or ts.utcoffset() is None:
            raise ValueError(f"row {i}: ts must be a timezone-aware datetime, got {ts!r}")
        full.append({"request_id": f"req-{i:06d}", **_REQUEST_DEFAULTS, **row, "ts": ts.astimezone(timezone.utc)})
    return pa.Table.from_pylist(full, schema=REQUEST_LOG)
