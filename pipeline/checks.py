"""Row-level checks of request-log rows, vectorised with Arrow compute.

Each check marks the rows it refuses with a reason; a row keeps the *first* reason it gets
(parse problems first, then these in order). Nothing here drops a row: the caller routes
refused rows to quarantine.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import IngestSettings
from pipeline.schemas import ID_COLUMNS, ID_PATTERN, REQUEST_LOG, RESOURCE_COLUMNS

_NULL_REASON = pa.scalar(None, pa.string())


def add_reason(reason: pa.Array, bad: pa.Array, message: str) -> pa.Array:
    """Set ``message`` on rows that are ``bad`` and have no reason yet."""
    bad = pc.fill_null(bad, False)
    return pc.if_else(pc.and_(bad, pc.is_null(reason)), pa.scalar(message, pa.string()), reason)


def _limits(settings: IngestSettings) -> dict[str, float]:
    return {
        "duration_s": settings.max_duration_s,
        "cpu_cores": settings.max_cpu_cores,
        "memory_mb": settings.max_memory_mb,
        "gpus": settings.max_gpus,
    }


def check_rows(table: pa.Table, reason: pa.Array, hour_start: datetime, settings: IngestSettings) -> pa.Array:
    """Reasons per row after the content checks (null = the row is valid so far).

    ``hour_start`` is the landing partition's hour: a row's ``ts`` must fall inside it.
    """
    for name in REQUEST_LOG.names:
        reason = add_reason(reason, pc.is_null(table[name]), f"missing {name}")
    for name in ID_COLUMNS:
        col = table[name]
        ok = pc.and_(pc.match_substring_regex(col, ID_PATTERN), pc.invert(pc.match_substring(col, "..")))
        reason = add_reason(reason, pc.invert(ok), f"{name} is not a well-formed id (pattern {ID_PATTERN}, no '..')")
    for name, limit in _limits(settings).items():
        col = table[name]
        reason = add_reason(reason, pc.is_nan(col), f"{name} is NaN")
        reason = add_reason(reason, pc.less(col, 0.0), f"negative {name}")
        reason = add_reason(reason, pc.greater(col, limit), f"{name} above the limit of {limit:g}")
    hour = pa.scalar(hour_start, table["ts"].type)
    hour_end = pa.scalar(hour_start.timestamp() * 1e6 + 3_600_000_000, pa.int64()).cast(table["ts"].type)
    outside = pc.or_(pc.less(table["ts"], hour), pc.greater_equal(table["ts"], hour_end))
    reason = add_reason(reason, outside, f"ts outside its landing partition hour {hour_start:%Y-%m-%dT%H}:00Z")
    return reason


def first_occurrences(request_id: pa.Array, eligible: np.ndarray) -> np.ndarray:
    """Boolean mask: the row is the first *eligible* row with its ``request_id``."""
    n = len(request_id)
    idx = np.flatnonzero(eligible)
    first = np.zeros(n, dtype=bool)
    if len(idx) == 0:
        return first
    ids = pc.take(request_id, pa.array(idx))
    grouped = pa.table({"id": ids, "i": pa.array(idx, pa.int64())}).group_by("id", use_threads=False).aggregate([("i", "min")])
    first[grouped["i_min"].to_numpy()] = True
    return first


def duplicate_reason(reason: pa.Array, request_id: pa.Array) -> pa.Array:
    """Mark later copies of a ``request_id`` among the still-valid rows as duplicates."""
    eligible = pc.is_null(reason).to_numpy(zero_copy_only=False)
    first = first_occurrences(request_id, eligible)
    return add_reason(reason, pa.array(eligible & ~first), "duplicate request_id (an earlier row in this landing hour has it)")
