"""Row-level checks of request-log rows, vectorised with Arrow compute.

Each check marks the rows it refuses with a reason; a row keeps the *first* reason it gets
(parse problems first, then these in order). Nothing here drops a row: the caller routes
refused rows to quarantine.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import IngestSettings
from pipeline.schemas import ID_COLUMNS, ID_PATTERN, REQUEST_LOG

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


def _is_malformed(values) -> pa.Array:
    return pc.invert(pc.and_(pc.match_substring_regex(values, ID_PATTERN), pc.invert(pc.match_substring(values, ".."))))


def _malformed_ids(col, few_distinct: bool):
    """Rows whose id is not well-formed. Users, programs and configurations repeat a lot, so
    their distinct values are checked once each; request ids are all distinct."""
    if not few_distinct:
        return _is_malformed(col)
    distinct = pc.unique(col)
    bad_values = pc.filter(distinct, pc.fill_null(_is_malformed(distinct), False))
    return pc.is_in(col, value_set=bad_values)


def check_rows(table: pa.Table, reason: pa.Array, hour_start: datetime, settings: IngestSettings) -> pa.Array:
    """Reasons per row after the content checks (null = the row is valid so far).

    ``hour_start`` is the landing partition's hour: a row's ``ts`` must fall inside it.
    """
    checks: list[tuple[pa.Array, str]] = []
    for name in REQUEST_LOG.names:
        checks.append((pc.is_null(table[name]), f"missing {name}"))
    for name in ID_COLUMNS:
        checks.append((_malformed_ids(table[name], name != "request_id"), f"{name} is not a well-formed id (pattern {ID_PATTERN}, no '..')"))
    for name, limit in _limits(settings).items():
        col = table[name]
        checks.append((pc.is_nan(col), f"{name} is NaN"))
        checks.append((pc.less(col, 0.0), f"negative {name}"))
        checks.append((pc.greater(col, limit), f"{name} above the limit of {limit:g}"))
    hour = pa.scalar(hour_start, table["ts"].type)
    hour_end = pa.scalar(hour_start + timedelta(hours=1), table["ts"].type)
    outside = pc.or_(pc.less(table["ts"], hour), pc.greater_equal(table["ts"], hour_end))
    checks.append((outside, f"ts outside its landing partition hour {hour_start:%Y-%m-%dT%H}:00Z"))
    for bad, message in checks:
        if pc.any(bad).as_py():  # most checks refuse nothing: skip the per-row reason update
            reason = add_reason(reason, bad, message)
    return reason


def first_occurrences(request_id: pa.Array, eligible: np.ndarray) -> np.ndarray:
    """Boolean mask: the row is the first *eligible* row with its ``request_id``."""
    idx = np.flatnonzero(eligible)
    first = np.zeros(len(request_id), dtype=bool)
    if len(idx) == 0:
        return first
    ids = request_id if len(idx) == len(request_id) else pc.take(request_id, pa.array(idx))
    if len(pc.unique(ids)) == len(idx):  # all distinct: the common case
        first[idx] = True
        return first
    encoded = pc.dictionary_encode(ids)
    encoded = encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded
    _, first_pos = np.unique(encoded.indices.to_numpy(), return_index=True)
    first[idx[first_pos]] = True
    return first


def duplicate_reason(reason: pa.Array, request_id: pa.Array) -> pa.Array:
    """Mark later copies of a ``request_id`` among the still-valid rows as duplicates."""
    eligible = pc.is_null(reason).to_numpy(zero_copy_only=False)
    first = first_occurrences(request_id, eligible)
    return add_reason(reason, pa.array(eligible & ~first), "duplicate request_id (an earlier row in this landing hour has it)")
