"""Forecast arrays <-> the per-user forecast contract (:data:`pipeline.schemas.USER_FORECAST`).

A forecast issued at ``issued_at`` (a 5-minute bucket boundary, UTC) for ``n_users`` users is
the array ``quantiles [n_users, 6, 4, 7]``: horizons :data:`HORIZONS_MIN` (5..30 min), resources
:data:`DEMAND_RESOURCES`, levels :data:`QUANTILES`, in the demand's own units. Horizon ``h``
minutes targets the bucket ``[target_start, target_start + 5 min)`` with
``target_start = issued_at + h - 5 min``.

The table has one row per (user, horizon, resource), in that order. Writing enforces the
contract: quantiles must be finite and non-crossing (a crossing larger than a rounding
tolerance is an error, not something to hide; within tolerance the levels are made exactly
monotone), and negative values are clipped to 0 because demand is never negative.

``p_zero [n_users, 6, 4]`` (optional; the column is null without it) is P(demand = 0): it must lie
in the bracket the zero quantiles give (:data:`pipeline.schemas.P_ZERO_LOW` … ``P_ZERO_HIGH``;
:func:`pipeline.schemas.zero_bounds`). With it the quantile function is 0 up to level ``p_zero``, then rises
linearly to the first positive quantile (when ``q05 > 0``: jumps to ``q05``, flat below it as
without).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schemas import (BUCKET_SECONDS, DEMAND_RESOURCES, HORIZONS_MIN, QUANTILE_COLUMNS, QUANTILES, USER_FORECAST,
                              add_missing_nullable, zero_bounds)

_US = 1_000_000
_H = len(HORIZONS_MIN)
_R = len(DEMAND_RESOURCES)
_Q = len(QUANTILES)
#: Relative tolerance for crossing quantiles (float32 rounding of a model's output).
CROSSING_TOLERANCE = 1e-5


def _mean_weights() -> np.ndarray:
    """Weights ``w`` with ``mean ≈ w @ q``: the integral of the piecewise-linear quantile function.

    The quantile function is linear between the 7 levels and flat beyond q05 / q95.
    """
    tau = np.concatenate([[0.0], np.asarray(QUANTILES), [1.0]])
    w = np.zeros(len(tau))
    for i in range(len(tau) - 1):  # trapezoid on each segment
        w[i] += (tau[i + 1] - tau[i]) / 2
        w[i + 1] += (tau[i + 1] - tau[i]) / 2
    w[1] += w[0]  # q(0) := q05
    w[-2] += w[-1]  # q(1) := q95
    return w[1:-1]


MEAN_WEIGHTS = _mean_weights()


def quantile_mean(quantiles: np.ndarray, p_zero: np.ndarray | None = None) -> np.ndarray:
    """Approximate mean ``[...]`` of quantile forecasts ``[..., 7]`` (see :func:`_mean_weights`).

    With ``p_zero [...]`` (P(demand = 0), inside :func:`pipeline.schemas.zero_bounds`), the area its zero segment
    takes from the quantile function: ``(p_zero − P_ZERO_LOW[m]) · q_m / 2`` for the first positive
    quantile ``q_m`` (``p_zero · q05`` when ``q05 > 0``)."""
    q = np.asarray(quantiles, dtype=np.float64)
    mean = q @ MEAN_WEIGHTS
    if p_zero is None:
        return mean
    m = (q <= 0).sum(axis=-1)
    first = np.take_along_axis(q, np.minimum(m, _Q - 1)[..., None], -1)[..., 0]
    extra = np.clip(np.asarray(p_zero, dtype=np.float64) - zero_bounds(q)[0], 0.0, None)
    cut = np.where(m == 0, extra * first, np.where(m < _Q, extra * first / 2, 0.0))
    return np.maximum(mean - np.nan_to_num(cut), 0.0)


#: How far ``p_zero`` may stray outside its bracket (float32 rounding).
P_ZERO_TOLERANCE = 1e-6


def _issued_us(issued_at: datetime) -> int:
    """``issued_at`` as UTC microseconds; naive datetimes are taken as UTC; must be on the 5-min grid."""
    if isinstance(issued_at, np.datetime64):
        us = int(issued_at.astype("datetime64[us]").astype(np.int64))
    else:
        ts = issued_at if issued_at.tzinfo is not None else issued_at.replace(tzinfo=timezone.utc)
        delta = ts - datetime(1970, 1, 1, tzinfo=timezone.utc)
        us = (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds
    if us % (BUCKET_SECONDS * _US):
        raise ValueError(f"issued_at {issued_at} is not on the {BUCKET_SECONDS // 60}-minute bucket grid")
    return us


def enforce_non_crossing(quantiles: np.ndarray, user_ids: Sequence[str] | None = None, tolerance: float = CROSSING_TOLERANCE) -> np.ndarray:
    """``quantiles [..., 7]`` made exactly monotone and non-negative; raises on a real crossing.

    A decrease between consecutive levels larger than ``tolerance * (1 + |q|)`` raises
    ``ValueError`` naming the first offending user (when ``user_ids`` index the first axis).
    Non-finite values raise too.
    """
    q = np.asarray(quantiles, dtype=np.float64)
    if not np.isfinite(q).all():
        bad = np.argwhere(~np.isfinite(q))[0]
        who = f"user {user_ids[bad[0]]!r}" if user_ids is not None else f"index {tuple(bad)}"
        raise ValueError(f"non-finite quantile for {who}")
    drop = q[..., :-1] - q[..., 1:]
    limit = tolerance * (1.0 + np.abs(q[..., :-1]))
    if (drop > limit).any():
        bad = np.argwhere(drop > limit)[0]
        who = f"user {user_ids[bad[0]]!r}" if user_ids is not None else f"index {tuple(bad[:-1])}"
        raise ValueError(f"crossing quantiles for {who}: {QUANTILE_COLUMNS[bad[-1]]} > {QUANTILE_COLUMNS[bad[-1] + 1]} by {drop[tuple(bad)]:.6g}")
    return np.maximum.accumulate(np.maximum(q, 0.0), axis=-1)


def to_forecast_table(
    user_ids: Sequence[str],
    issued_at: datetime,
    quantiles: np.ndarray,
    mean: np.ndarray | None,
    model_version: str | Sequence[str],
    p_zero: np.ndarray | None = None,
) -> pa.Table:
    """Build the per-user forecast table (schema :data:`USER_FORECAST`).

    ``quantiles``: ``[n_users, 6, 4, 7]`` in demand units; ``mean``: ``[n_users, 6, 4]`` or ``None``
    (then :func:`quantile_mean` of the quantiles); ``model_version``: one string, or one per user
    (e.g. ``"fallback:seasonal_daily"`` for a user without a model); ``p_zero``: ``[n_users, 6, 4]``
    P(demand = 0) or ``None`` (a null column). Rows are ordered by user, horizon, resource. Raises
    ``ValueError`` on a shape mismatch, a duplicate user, a non-finite value, crossing quantiles or
    a ``p_zero`` outside the bracket of its zero quantiles (clipped into it within
    :data:`P_ZERO_TOLERANCE`).
    """
    users = list(user_ids)
    n = len(users)
    q = np.asarray(quantiles)
    if q.shape != (n, _H, _R, _Q):
        raise ValueError(f"quantiles must be [n_users={n}, {_H}, {_R}, {_Q}], got {q.shape}")
    if len(set(users)) != n:
        raise ValueError("duplicate user ids in a forecast")
    q = enforce_non_crossing(q, users)
    p0 = None if p_zero is None else _checked_p_zero(q, p_zero, users)
    if mean is None:
        m = quantile_mean(q, p0)
    else:
        m = np.asarray(mean, dtype=np.float64)
        if m.shape != (n, _H, _R):
            raise ValueError(f"mean must be [n_users={n}, {_H}, {_R}], got {m.shape}")
        if not np.isfinite(m).all():
            raise ValueError(f"non-finite mean for user {users[int(np.argwhere(~np.isfinite(m))[0][0])]!r}")
        m = np.maximum(m, 0.0)
    versions = [model_version] * n if isinstance(model_version, str) else list(model_version)
    if len(versions) != n:
        raise ValueError(f"model_version: expected one string or {n}, got {len(versions)}")

    rows = n * _H * _R
    t0 = _issued_us(issued_at)
    user_idx = pa.array(np.repeat(np.arange(n), _H * _R))
    h_min = np.tile(np.repeat(np.asarray(HORIZONS_MIN, dtype=np.int16), _R), n)
    columns = {
        "user_id": pa.array(users, pa.string()).take(user_idx),
        "issued_at": pa.array(np.full(rows, t0, dtype=np.int64)).cast(USER_FORECAST.field("issued_at").type),
        "horizon_min": pa.array(h_min, pa.int16()),
        "target_start": pa.array(t0 + (h_min.astype(np.int64) - 5) * 60 * _US).cast(USER_FORECAST.field("target_start").type),
        "resource": pa.array(list(DEMAND_RESOURCES), pa.string()).take(pa.array(np.tile(np.arange(_R), n * _H))),
    }
    flat = q.reshape(rows, _Q)
    for k, col in enumerate(QUANTILE_COLUMNS):
        columns[col] = pa.array(flat[:, k])
    columns["mean"] = pa.array(m.reshape(rows))
    columns["model_version"] = pa.array(versions, pa.string()).take(user_idx)
    columns["p_zero"] = pa.nulls(rows, pa.float64()) if p0 is None else pa.array(p0.reshape(rows))
    return pa.table(columns, schema=USER_FORECAST)


def _outside_bracket(q: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, outside)``: the bracket of each row's zero quantiles and where ``p`` lies outside
    it by more than :data:`P_ZERO_TOLERANCE` (NaN: not outside)."""
    low, high = zero_bounds(q)
    return low, high, (p < low - P_ZERO_TOLERANCE) | (p > high + P_ZERO_TOLERANCE)


def _checked_p_zero(q: np.ndarray, p_zero: np.ndarray, users: Sequence[str]) -> np.ndarray:
    """``p_zero`` as float64, clipped into its bracket within :data:`P_ZERO_TOLERANCE`; raises
    ``ValueError`` naming the first user whose value is not finite or lies outside it."""
    p = np.asarray(p_zero, dtype=np.float64)
    if p.shape != q.shape[:-1]:
        raise ValueError(f"p_zero must be {list(q.shape[:-1])}, got {list(p.shape)}")
    low, high, outside = _outside_bracket(q, p)
    bad = ~np.isfinite(p) | outside
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise ValueError(f"p_zero {p[i]:.6g} for user {users[i[0]]!r} ({HORIZONS_MIN[i[1]]} min, {DEMAND_RESOURCES[i[2]]}) lies "
                         f"outside [{low[i]:g}, {high[i]:g}], the bracket of its {int((q[i] <= 0).sum())} zero quantiles")
    return np.clip(p, low, high)


@dataclass
class ForecastArrays:
    """A forecast table read back: ``quantiles [n_users, 6, 4, 7]``, ``mean [n_users, 6, 4]``,
    ``p_zero [n_users, 6, 4]`` (NaN where the table has none)."""

    user_ids: list[str]
    issued_at: datetime
    quantiles: np.ndarray
    mean: np.ndarray
    model_version: list[str]
    p_zero: np.ndarray | None = None


def validate_forecast_table(table: pa.Table) -> None:
    """Raise ``ValueError`` listing every way ``table`` breaks the :data:`USER_FORECAST` contract."""
    problems = []
    table = add_missing_nullable(table, USER_FORECAST)
    missing = [f.name for f in USER_FORECAST if f.name not in table.column_names]
    if missing:
        raise ValueError(f"forecast table lacks columns {missing}")
    table = table.select(USER_FORECAST.names).cast(USER_FORECAST)
    if table.num_rows == 0:
        return
    h = table["horizon_min"].to_numpy()
    if not np.isin(h, HORIZONS_MIN).all():
        problems.append(f"horizon_min outside {HORIZONS_MIN}: {sorted(set(h[~np.isin(h, HORIZONS_MIN)].tolist()))}")
    if not pc.all(pc.is_in(table["resource"], value_set=pa.array(DEMAND_RESOURCES))).as_py():
        problems.append(f"resource outside {DEMAND_RESOURCES}")
    issued = pc.cast(table["issued_at"], pa.int64()).to_numpy()
    target = pc.cast(table["target_start"], pa.int64()).to_numpy()
    if (target != issued + (h.astype(np.int64) - 5) * 60 * _US).any():
        problems.append("target_start != issued_at + horizon_min - 5 min")
    q = np.stack([table[c].to_numpy() for c in QUANTILE_COLUMNS], axis=1)
    if not np.isfinite(q).all() or not np.isfinite(table["mean"].to_numpy()).all():
        problems.append("non-finite quantile or mean")
    elif (np.diff(q, axis=1) < 0).any():
        problems.append("crossing quantiles (q05 <= q10 <= ... <= q95 violated)")
    if (q < 0).any():
        problems.append("negative quantiles")
    if "p_zero" in table.column_names and table["p_zero"].null_count < table.num_rows:
        if _outside_bracket(q, table["p_zero"].to_numpy(zero_copy_only=False).astype(np.float64))[2].any():
            problems.append("p_zero outside the bracket of its zero quantiles (pipeline.schemas.P_ZERO_LOW / P_ZERO_HIGH)")
    keys = table.group_by(["user_id", "issued_at", "horizon_min", "resource"]).aggregate([([], "count_all")])
    if keys.num_rows != table.num_rows:
        problems.append("duplicate (user_id, issued_at, horizon_min, resource) rows")
    if problems:
        raise ValueError("forecast table breaks the contract: " + "; ".join(problems))


def from_forecast_table(table: pa.Table, issued_at: datetime | None = None) -> ForecastArrays:
    """Read a :data:`USER_FORECAST` table back to arrays (the inverse of :func:`to_forecast_table`).

    With several ``issued_at`` values in the table, ``issued_at`` picks one. Users keep their
    order of first appearance. Raises ``ValueError`` if the table breaks the contract, if a user
    lacks a (horizon, resource) row, or if one user's rows carry different model versions.
    """
    validate_forecast_table(table)
    table = add_missing_nullable(table, USER_FORECAST).select(USER_FORECAST.names).cast(USER_FORECAST)
    stamps = pc.unique(table["issued_at"]).to_pylist()
    if issued_at is not None:
        t = pa.scalar(_issued_us(issued_at), pa.int64()).cast(USER_FORECAST.field("issued_at").type)
        table = table.filter(pc.equal(table["issued_at"], t))
        if table.num_rows == 0:
            raise ValueError(f"no forecast issued at {issued_at} (issued: {stamps})")
        stamp = t.as_py()
    elif len(stamps) != 1:
        raise ValueError(f"forecast table holds {len(stamps)} issue times; pass issued_at= to choose one")
    else:
        stamp = stamps[0]
    users = pc.unique(table["user_id"])
    u = pc.index_in(table["user_id"], value_set=users).to_numpy()
    h = table["horizon_min"].to_numpy().astype(np.int64) // 5 - 1
    r = pc.index_in(table["resource"], value_set=pa.array(DEMAND_RESOURCES)).to_numpy()
    n = len(users)
    if table.num_rows != n * _H * _R:
        have = np.bincount(u, minlength=n)
        short = users[int(np.argmin(have))].as_py()
        raise ValueError(f"user {short!r} has {int(have.min())} of {_H * _R} (horizon, resource) rows")
    flat = (u * _H + h) * _R + r
    quantiles = np.full((n * _H * _R, _Q), np.nan)
    quantiles[flat] = np.stack([table[c].to_numpy() for c in QUANTILE_COLUMNS], axis=1)
    mean = np.full(n * _H * _R, np.nan)
    mean[flat] = table["mean"].to_numpy()
    p_zero = np.full(n * _H * _R, np.nan)
    p_zero[flat] = table["p_zero"].to_numpy(zero_copy_only=False).astype(np.float64)
    mv = table["model_version"].to_numpy(zero_copy_only=False)
    _, first = np.unique(u, return_index=True)  # first row of each user (u codes are 0..n-1)
    versions = mv[first]
    if (mv != versions[u]).any():
        raise ValueError(f"user {users[int(u[np.argmax(mv != versions[u])])].as_py()!r} has rows of several model versions")
    return ForecastArrays(
        user_ids=users.to_pylist(),
        issued_at=stamp,
        quantiles=quantiles.reshape(n, _H, _R, _Q),
        mean=mean.reshape(n, _H, _R),
        model_version=[str(v) for v in versions],
        p_zero=p_zero.reshape(n, _H, _R),
    )
