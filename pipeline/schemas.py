"""The Arrow schemas of warmcast's data contracts (see DESIGN.md, "Data contracts").

One module says each shape once; every reader and writer imports it from here.
Units: seconds, cores, MB (request log) and GB (demand series); timestamps are UTC.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

#: Length of one demand bucket and of one lake slot, in seconds.
BUCKET_SECONDS = 300

#: One row per code-execution request: the raw input.
REQUEST_LOG = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("program_id", pa.string(), nullable=False),
        pa.field("software_config", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=False),  # arrival
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("cpu_cores", pa.float64(), nullable=False),  # cores used while running
        pa.field("memory_mb", pa.float64(), nullable=False),
        pa.field("gpus", pa.float64(), nullable=False),  # 0 for CPU work
    ]
)

ID_COLUMNS = ("request_id", "user_id", "program_id", "software_config")
RESOURCE_COLUMNS = ("duration_s", "cpu_cores", "memory_mb", "gpus")

#: Quarantined rows keep their values as text (a value may not have parsed), plus why and where.
QUARANTINE = pa.schema(
    [pa.field(f.name, pa.string()) for f in REQUEST_LOG]
    + [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64()),  # 1-based data row (JSON: line) in source_file
        pa.field("raw", pa.string()),  # the raw line, when the line itself did not parse
    ]
)

#: Per user, per 5-minute bucket; resources are the average concurrent use over the bucket.
DEMAND = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=False),  # bucket start
        pa.field("requests", pa.int64(), nullable=False),  # arrivals in the bucket
        pa.field("cpu_cores", pa.float64(), nullable=False),
        pa.field("memory_gb", pa.float64(), nullable=False),
        pa.field("gpus", pa.float64(), nullable=False),
    ]
)
DEMAND_RESOURCES = ("requests", "cpu_cores", "memory_gb", "gpus")

#: Subscription tier and provisioning policy per user.
USER_PROFILE = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("tier", pa.string(), nullable=False),  # free | standard | premium | ...
        pa.field("weight", pa.float64(), nullable=False),
        pa.field("software_configs", pa.list_(pa.string()), nullable=False),
        pa.field("max_cores", pa.float64()),
    ]
)

QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
QUANTILE_COLUMNS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)
HORIZONS_MIN = (5, 10, 15, 20, 25, 30)
#: ``p_zero`` (P(demand = 0) in the bucket) lies in ``[P_ZERO_LOW[m], P_ZERO_HIGH[m]]`` where ``m`` of
#: the 7 quantiles are 0: the quantile function is 0 up to level ``p_zero`` and rises from there to
#: the first positive quantile. ``P_ZERO_LOW[m]`` is what the quantiles alone say (their knots
#: linearly interpolated: 0 when ``q05 > 0``; 1 when every quantile is 0, the tail above ``q95``
#: collapsed onto it).
P_ZERO_LOW = (0.0, *QUANTILES[:-1], 1.0)
P_ZERO_HIGH = (*QUANTILES, 1.0)

#: target bucket is [target_start, target_start + 5 min), target_start = issued_at + horizon - 5 min.
USER_FORECAST = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("issued_at", TS, nullable=False),
        pa.field("horizon_min", pa.int16(), nullable=False),
        pa.field("target_start", TS, nullable=False),
        pa.field("resource", pa.string(), nullable=False),
    ]
    + [pa.field(c, pa.float64(), nullable=False) for c in QUANTILE_COLUMNS]
    + [
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        # P(demand = 0), see P_ZERO_LOW; null: not estimated (the quantiles alone: P_ZERO_LOW)
        pa.field("p_zero", pa.float64(), nullable=True),
    ]
)

SYSTEM_FORECAST = pa.schema(
    [
        pa.field("issued_at", TS, nullable=False),
        pa.field("horizon_min", pa.int16(), nullable=False),
        pa.field("resource", pa.string(), nullable=False),
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("lower", pa.float64(), nullable=False),
        pa.field("upper", pa.float64(), nullable=False),
        pa.field("level", pa.float64(), nullable=False),  # e.g. 0.9 for a central 90 % band
        pa.field("n_users", pa.int64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
    ]
)

SCALING_DECISION = pa.schema(
    [
        pa.field("decided_at", TS, nullable=False),
        pa.field("pool", pa.string(), nullable=False),
        pa.field("pool_kind", pa.string(), nullable=False),  # active | warm | subpool
        pa.field("current", pa.int64(), nullable=False),
        pa.field("target", pa.int64(), nullable=False),
        pa.field("applied", pa.bool_(), nullable=False),
        pa.field("dry_run", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

#: Identifiers become partition values, object keys and (via the model store) file names, so
#: they are restricted to a safe alphabet: no '/', no NUL or newline, no leading '.' or '-'.
ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:@=+-]{0,127}$"
_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: str) -> bool:
    """True when ``value`` is a well-formed identifier (safe as a path component)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None and ".." not in value


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` unchanged, or raise ``ValueError`` naming why it is not a safe id."""
    if not is_valid_id(value):
        raise ValueError(f"{what} {value!r} is not a well-formed identifier (pattern {ID_PATTERN}, no '..')")
    return value


def add_missing_nullable(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with a null column for every nullable field of ``schema`` it lacks (a table written
    before that column existed, e.g. ``USER_FORECAST``'s ``p_zero``). Other columns are left as they are."""
    for f in schema:
        if f.nullable and f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def zero_bounds(quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high) [...]``: where P(demand = 0) may lie given quantiles ``[..., 7]`` (by how many
    are 0: :data:`P_ZERO_LOW` / :data:`P_ZERO_HIGH`); ``low`` is what they alone say."""
    m = (np.asarray(quantiles) <= 0).sum(axis=-1)
    return np.asarray(P_ZERO_LOW)[m], np.asarray(P_ZERO_HIGH)[m]
