"""From the long demand table to the LSTM's dense per-step inputs, targets and batches.

The demand series (:data:`pipeline.schemas.DEMAND`) is long format and sparse in users; the
per-user LSTMs want a dense grid: ``values[u, t, r]`` = user ``u``'s demand for resource ``r``
(``DEMAND_RESOURCES`` order: requests, cpu_cores, memory_gb, gpus) in the 5-minute bucket
``t0 + t·5 min``, zero where the table has no row. Everything here is numpy or torch on that grid.

Per-step inputs at origin ``t`` (the bucket whose demand was seen last; the forecast is for
buckets ``t+1 … t+6``), :data:`N_INPUTS` = 22 columns:

====== =====================================================================================
0-3    ``z`` = (log1p(demand) − log_mean) / log_std at ``t``, per user (stats from the training
       part only), clipped to ±:data:`Z_CLIP`
4-7    ``z`` at ``t+1 − 1 day`` (same bucket yesterday as the first target)
8-11   ``z`` at ``t+1 − 7 days`` (same bucket last week)
12, 13 1 where the yesterday / last-week lag lies inside the user's history, else 0
14, 15 sin, cos of the time of day of bucket ``t+1`` (UTC)
16, 17 sin, cos of the position in the week of bucket ``t+1``
18-21  ``z`` at ``t+6 − 1 day`` (same bucket yesterday as the last target: with 4-7, how demand
       moved over the forecast's 30 minutes yesterday; 30-min pinball on ServeGen, two seeds:
       14.7-14.9 % -> 16.8-17.7 % below the best baseline)
====== =====================================================================================

Models trained before columns 18-21 existed (18 inputs) forecast from the first 18 columns.

Before a user's first active bucket every per-user column is 0. Targets are the demand of the
next 6 buckets divided by the user's ``scale`` (per resource): real units up to a constant, so
the loss the model trains on is the pinball loss the operators read, rescaled per user.

Bad input: NaN, ±inf or negative demand raises ``ValueError`` naming the users and the first
offending bucket; nothing is silently cleaned (a NaN here means an upstream bug worth seeing).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.schemas import BUCKET_SECONDS, DEMAND_RESOURCES, HORIZONS_MIN, QUANTILES

BUCKET = timedelta(seconds=BUCKET_SECONDS)
BUCKETS_PER_DAY = 86_400 // BUCKET_SECONDS
BUCKETS_PER_WEEK = 7 * BUCKETS_PER_DAY
N_HORIZONS = len(HORIZONS_MIN)
N_RESOURCES = len(DEMAND_RESOURCES)
N_INPUTS = 22
#: The lag inputs: (first column, lag, ahead, flag column or None): ``z`` at ``t + ahead − lag``
#: (buckets), and where the flag column says whether that bucket lies inside the user's history.
LAG_INPUTS = ((4, BUCKETS_PER_DAY, 1, 12), (8, BUCKETS_PER_WEEK, 1, 13), (18, BUCKETS_PER_DAY, N_HORIZONS, None))
Z_CLIP = 10.0
MIN_LOG_STD = 0.1
#: A user's scale is at least this share of the median scale over users (per resource), so a
#: resource a user never touched does not blow its scaled errors up.
SCALE_FLOOR_SHARE = 1e-3
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


class _Grid:
    """What :class:`DenseDemand` and :class:`WindowedDemand` share: users and the grid's span."""

    user_ids: list[str]
    t0: datetime
    n_steps: int

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def end(self) -> datetime:
        """End of the grid (exclusive): ``t0 + T · 5 min``."""
        return self.t0 + self.n_steps * BUCKET


@dataclass
class DenseDemand(_Grid):
    """Demand of ``len(user_ids)`` users on one 5-minute grid starting at ``t0`` (UTC).

    ``values``: float32 ``[n_users, T, 4]`` in ``DEMAND_RESOURCES`` order, real units (requests
    per bucket; mean concurrent cores, GB, GPUs), 0 where there was no row.
    ``first_active``: int64 ``[n_users]``, the first bucket with a row (``T`` for none).
    """

    user_ids: list[str]
    t0: datetime
    values: np.ndarray
    first_active: np.ndarray

    @property
    def n_steps(self) -> int:  # type: ignore[override]
        return self.values.shape[1]

    def history_mask(self) -> np.ndarray:
        """bool ``[n_users, T]``: true from each user's first active bucket on."""
        return np.arange(self.n_steps)[None, :] >= self.first_active[:, None]

    def values_at(self, steps: np.ndarray) -> np.ndarray:
        """``values[:, steps]``: ``[n_users, len(steps), 4]``."""
        return self.values[:, steps]

    def select(self, users: Sequence[str]) -> "DenseDemand":
        """The grid of ``users`` in that order; a user not in this grid gets zeros and no history
        (what :func:`dense_demand` with ``users=`` gives, without reading the table again)."""
        pos = {u: i for i, u in enumerate(self.user_ids)}
        idx = np.array([pos.get(str(u), -1) for u in users], dtype=np.int64)
        have = idx >= 0
        values = np.zeros((len(idx), *self.values.shape[1:]), dtype=self.values.dtype)
        values[have] = self.values[idx[have]]
        first_active = np.full(len(idx), self.n_steps, dtype=np.int64)
        first_active[have] = self.first_active[idx[have]]
        return DenseDemand([str(u) for u in users], self.t0, values, first_active)


@dataclass
class WindowedDemand(_Grid):
    """Part of a dense grid: the demand of ``user_ids`` in the grid steps ``held`` only (sorted,
    in ``[0, n_steps)``), ``values`` float32 ``[n_users, len(held), 4]``; ``first_active`` as in
    :class:`DenseDemand` (over the whole grid: rows outside the held steps count for it). What
    :func:`dense_demand` gives with ``hold=``: a forecast's inputs read a few windows of the week
    before it (:func:`models.train.forecast_windows`), not the whole week."""

    user_ids: list[str]
    t0: datetime
    n_steps: int
    held: np.ndarray
    values: np.ndarray
    first_active: np.ndarray

    def values_at(self, steps: np.ndarray) -> np.ndarray:
        """Demand ``[n_users, len(steps), 4]`` at grid ``steps``; ``ValueError`` for a step not held."""
        steps = np.asarray(steps, dtype=np.int64)
        pos = np.searchsorted(self.held, steps).clip(max=max(len(self.held) - 1, 0))
        if not len(self.held) or not np.array_equal(self.held[pos], steps):
            missing = steps[self.held[pos] != steps] if len(self.held) else steps
            raise ValueError(f"grid step(s) {missing[:5].tolist()} are not held (held: {len(self.held)} of {self.n_steps})")
        return self.values[:, pos]


def _check_grid(moment: datetime, what: str) -> int:
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {moment!r}")
    us = (moment - _EPOCH) // timedelta(microseconds=1)
    if us % (BUCKET_SECONDS * 1_000_000):
        raise ValueError(f"{what}={moment.isoformat()} is not on the 5-minute grid")
    return us


def dense_demand(demand: pa.Table, start: datetime, end: datetime, users: Sequence[str] | None = None,
                 others: bool = False, hold: Sequence[tuple[datetime, datetime]] | None = None) -> DenseDemand | WindowedDemand:
    """The demand rows with ``start <= ts < end`` as a dense grid (see :class:`DenseDemand`).

    ``users`` fixes the users and their order (a user without rows gets zeros and no history);
    by default, the sorted users that have rows in the window. With ``others``, the users with
    rows in the window that ``users`` lacks follow them, sorted. Rows of the same user and
    bucket add up. Raises ``ValueError`` for NaN, ±inf or negative demand, naming the users.

    ``hold``: ranges ``[lo, hi)`` on the grid; then only their buckets' demand is kept, as a
    :class:`WindowedDemand` (every row in ``[start, end)`` still counts for ``first_active``
    and is checked). Its values equal the dense grid's at the held steps.
    """
    lo, hi = _check_grid(start, "start"), _check_grid(end, "end")
    steps = (hi - lo) // (BUCKET_SECONDS * 1_000_000)
    if steps < 1:
        raise ValueError(f"end {end.isoformat()} must be after start {start.isoformat()}")
    ts_us = pc.cast(demand["ts"], pa.int64()) if demand.num_rows else pa.array([], pa.int64())
    keep = pc.and_(pc.greater_equal(ts_us, lo), pc.less(ts_us, hi)) if demand.num_rows else None
    rows = demand.filter(keep) if keep is not None and not pc.all(keep).as_py() else demand  # no copy when all are in
    if users is None:
        ids = sorted(pc.unique(rows["user_id"]).to_pylist())
    else:
        ids = [str(u) for u in users]
        if others:
            given = set(ids)
            ids += sorted(u for u in pc.unique(rows["user_id"]).to_pylist() if u not in given)
    if len(set(ids)) != len(ids):
        raise ValueError("users must not repeat")
    index = pc.index_in(rows["user_id"], value_set=pa.array(ids, pa.string()))
    known = pc.is_valid(index).to_numpy(zero_copy_only=False)
    everyone = bool(known.all())

    def column(arr: np.ndarray) -> np.ndarray:  # the known users' rows (no copy when all are known)
        return arr if everyone else arr[known]

    u_idx = column(index.to_numpy(zero_copy_only=False)).astype(np.int64) if rows.num_rows else np.zeros(0, np.int64)
    t_idx = ((column(pc.cast(rows["ts"], pa.int64()).to_numpy()) - lo) // (BUCKET_SECONDS * 1_000_000)).astype(np.int64)
    cols = [column(np.asarray(rows[c].to_numpy(zero_copy_only=False), dtype=np.float64)) if len(u_idx) else np.zeros(0)
            for c in DEMAND_RESOURCES]
    # NaN fails `min >= 0`, +inf makes the sum infinite: two reductions per column, and the
    # row-by-row check below only when one of them fails
    clean = all(not len(col) or (col.min() >= 0 and np.isfinite(col.sum())) for col in cols)
    bad_any = np.zeros(len(u_idx), dtype=bool)
    for col in ([] if clean else cols):
        bad_any |= ~np.isfinite(col) | (col < 0)
    if bad_any.any():
        cols_2d = np.stack(cols, axis=1)
        bad = ~np.isfinite(cols_2d) | (cols_2d < 0)
        bad_rows = np.flatnonzero(bad_any)
        names = sorted({ids[u] for u in u_idx[bad_rows]})
        first = bad_rows[0]
        what = DEMAND_RESOURCES[int(np.flatnonzero(bad[first])[0])]
        when = (start + int(t_idx[first]) * BUCKET).isoformat()
        raise ValueError(
            f"demand of user(s) {', '.join(repr(n) for n in names[:10])}{' …' if len(names) > 10 else ''} "
            f"has NaN, infinite or negative values (first: user {ids[u_idx[first]]!r}, {what}={cols_2d[first][DEMAND_RESOURCES.index(what)]} "
            f"at {when}); fix the demand series upstream")
    t0 = start.astimezone(timezone.utc)
    if hold is None:
        values, count = _scatter(u_idx, t_idx, cols, len(ids), steps)
        seen = (count > 0).reshape(len(ids), steps)
        first_active = np.where(seen.any(axis=1), seen.argmax(axis=1), steps).astype(np.int64)
        return DenseDemand(ids, t0, values, first_active)
    first_active = np.full(len(ids), steps, dtype=np.int64)
    np.minimum.at(first_active, u_idx, t_idx)
    column_of = np.full(steps, -1, dtype=np.int64)  # grid step -> column of the held grid
    for a, b in hold:
        column_of[max(_steps_from(lo, a), 0) : max(_steps_from(lo, b), 0)] = 0
    held = np.flatnonzero(column_of == 0)
    column_of[held] = np.arange(len(held))
    c_idx = column_of[t_idx]
    inside = c_idx >= 0
    values, _ = _scatter(u_idx[inside], c_idx[inside], [col[inside] for col in cols], len(ids), len(held))
    return WindowedDemand(ids, t0, steps, held, values, first_active)


def _steps_from(lo_us: int, moment: datetime) -> int:
    return (_check_grid(moment, "a held window's bound") - lo_us) // (BUCKET_SECONDS * 1_000_000)


def _scatter(u_idx: np.ndarray, t_idx: np.ndarray, cols: list[np.ndarray], n_users: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[n_users, steps, 4]`` with each row's demand added at ``(u_idx, t_idx)``, and the
    rows per cell (flat)."""
    flat = u_idx * steps + t_idx
    count = np.bincount(flat, minlength=n_users * steps)
    if len(flat) and count.max() == 1:  # one row per user and bucket (a demand series): a scatter
        grid = torch.zeros(n_users * steps, N_RESOURCES)  # (torch's: 3x numpy's fancy assignment here)
        at = torch.from_numpy(flat)
        for r, col in enumerate(cols):
            grid[:, r].index_copy_(0, at, torch.from_numpy(col.astype(np.float32)))
        return grid.numpy().reshape(n_users, steps, N_RESOURCES), count
    values = np.empty((n_users, steps, N_RESOURCES), dtype=np.float32)  # rows of the same user and bucket add up
    for r, col in enumerate(cols):
        values[..., r] = np.bincount(flat, weights=col, minlength=n_users * steps).reshape(n_users, steps)
    return values, count


@dataclass
class Normaliser:
    """Per-user, per-resource statistics, each ``[n_users, 4]`` float32.

    ``log_mean``/``log_std``: mean and std of ``log1p(demand)`` (std at least
    :data:`MIN_LOG_STD`); ``scale``: root mean square of demand in real units (at least
    :data:`SCALE_FLOOR_SHARE` of the median user's, and > 0): targets are demand / scale.
    """

    log_mean: np.ndarray
    log_std: np.ndarray
    scale: np.ndarray


def fit_normaliser(dense: DenseDemand, train_end: int, rows: np.ndarray | None = None, chunk_users: int = 1024,
                   typical: np.ndarray | None = None) -> Normaliser:
    """Statistics from each user's history before bucket ``train_end`` only (no peeking at the
    held-out tail). A user without history there gets mean 0, std 1, the floor scale.

    ``rows``: the users (indices) to return statistics for (default all); the scale floor is
    :data:`SCALE_FLOOR_SHARE` of ``typical`` ``[4]`` (per resource), by default the median
    scale over every user of the grid. Works ``chunk_users`` users at a time.
    """
    rows = np.arange(dense.n_users) if rows is None else np.asarray(rows, dtype=np.int64)

    def stats(sel: np.ndarray, rms_only: bool) -> tuple[np.ndarray, ...]:
        part = dense.values[sel, :train_end].astype(np.float64)
        mask = (np.arange(part.shape[1])[None, :] >= dense.first_active[sel, None])[..., None]
        n = mask.sum(axis=1)  # [U, 1]
        safe_n = np.maximum(n, 1)
        rms = np.sqrt((np.square(part) * mask).sum(axis=1) / safe_n)
        if rms_only:
            return (rms,)
        logs = np.log1p(part)
        mean = (logs * mask).sum(axis=1) / safe_n
        var = (np.square(logs - mean[:, None]) * mask).sum(axis=1) / safe_n
        return n, mean, var, rms

    def chunked(sel: np.ndarray, rms_only: bool) -> list[np.ndarray]:
        parts = [stats(sel[a : a + chunk_users], rms_only) for a in range(0, len(sel), chunk_users)]
        width = 1 if rms_only else 4
        return [np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, N_RESOURCES)) for k in range(width)]

    everyone = np.arange(dense.n_users)
    n, mean, var, rms = chunked(rows, rms_only=False)
    if typical is None:
        all_rms = rms if np.array_equal(rows, everyone) else chunked(everyone, rms_only=True)[0]
        typical = typical_scale(all_rms)
    floor = np.maximum(SCALE_FLOOR_SHARE * typical, 1e-6)
    return Normaliser(
        log_mean=np.where(n > 0, mean, 0.0).astype(np.float32),
        log_std=np.where(n > 0, np.maximum(np.sqrt(var), MIN_LOG_STD), 1.0).astype(np.float32),
        scale=np.maximum(rms, floor[None, :]).astype(np.float32),
    )


def typical_scale(scales: np.ndarray) -> np.ndarray:
    """Per resource, the median of the positive values of ``scales`` ``[n_users, 4]`` (1 where
    none is positive): the typical user's scale that :func:`fit_normaliser` floors at."""
    return np.array([np.median(col[col > 0]) if (col > 0).any() else 1.0 for col in np.asarray(scales).T])


def calendar_features(t0: datetime, steps: int) -> np.ndarray:
    """float32 ``[steps, 4]``: sin/cos of time of day and of week position of bucket ``t+1``."""
    start_bucket = (t0 - _EPOCH) // BUCKET + 1
    b = start_bucket + np.arange(steps, dtype=np.int64)
    day = 2 * np.pi * (b % BUCKETS_PER_DAY) / BUCKETS_PER_DAY
    week = 2 * np.pi * ((b + _EPOCH_WEEKDAY * BUCKETS_PER_DAY) % BUCKETS_PER_WEEK) / BUCKETS_PER_WEEK
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], axis=1).astype(np.float32)


def input_features(dense: DenseDemand | WindowedDemand, norm: Normaliser, last: int | None = None) -> np.ndarray:
    """float32 ``[n_users, T, N_INPUTS]``, the columns of the module docstring; with ``last``,
    only the last ``last`` steps ``[n_users, last, N_INPUTS]`` (the same values, computed
    from the buckets they read only: a forecast needs its warm-up, not the whole week, and
    ``dense`` may be a :class:`WindowedDemand` holding those buckets)."""
    n_users, steps = dense.n_users, dense.n_steps
    if last is None and isinstance(dense, WindowedDemand):
        raise ValueError("every step's inputs need the whole grid: give a DenseDemand, or last=")
    lo = 0 if last is None else max(steps - last, 0)
    t = np.arange(lo, steps)

    def z_at(idx: np.ndarray) -> np.ndarray:  # [U, len(idx), 4], 0 before the user's history
        z = (np.log1p(dense.values_at(idx)) - norm.log_mean[:, None]) / norm.log_std[:, None]
        return np.clip(z, -Z_CLIP, Z_CLIP) * (idx[None, :] >= dense.first_active[:, None])[..., None]

    hist = t[None, :] >= dense.first_active[:, None]
    out = np.zeros((n_users, len(t), N_INPUTS), dtype=np.float32)
    out[..., 0:4] = z_at(t)
    every = out[..., 0:4] if lo == 0 else None  # the whole grid's z: the lags are its columns, computed once
    for col, lag, ahead, flag in LAG_INPUTS:
        src = np.clip(t + ahead - lag, 0, None)  # the lagged bucket of target t + ahead
        ok = (t + ahead - lag >= 0)[None, :] & (src[None, :] >= dense.first_active[:, None]) & hist
        out[..., col : col + 4] = (z_at(src) if every is None else every[:, src]) * ok[..., None]
        if flag is not None:
            out[..., flag] = ok
    out[..., 14:18] = calendar_features(dense.t0 + lo * BUCKET, len(t))[None] * hist[..., None]
    return out


def last_value_error_quantiles(dense: DenseDemand, norm: Normaliser, train_end: int) -> np.ndarray:
    """Empirical quantiles of the last-value forecast's errors ``(x[t+1+h] − x[t]) / scale``
    over each user's training origins: float32 ``[n_users, 6, 4, 7]`` (0 where a user has none).

    This is the prior of the quantile head: an untrained model forecasts the last value with
    these error quantiles around it, as the last-value baseline does.
    """
    x = dense.values[:, :train_end] / norm.scale[:, None]
    n_users = dense.n_users
    out = np.zeros((n_users, N_HORIZONS, N_RESOURCES, len(QUANTILES)), dtype=np.float32)
    for h in range(N_HORIZONS):
        err = x[:, 1 + h :] - x[:, : x.shape[1] - 1 - h]  # origins 0 … train_end-2-h
        if err.shape[1] == 0:
            continue
        valid = np.arange(err.shape[1])[None, :] >= dense.first_active[:, None]
        count = valid.sum(axis=1)
        srt = np.sort(np.where(valid[..., None], err, np.inf), axis=1)  # valid values first
        srt[np.isinf(srt)] = 0.0  # only read where count == 0, then discarded
        for k, q in enumerate(QUANTILES):
            pos = np.clip(q * (count - 1), 0, None)
            lo = np.floor(pos).astype(np.int64)
            hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
            frac = (pos - lo)[:, None]
            a = np.take_along_axis(srt, lo[:, None, None], axis=1)[:, 0]
            b = np.take_along_axis(srt, hi[:, None, None], axis=1)[:, 0]
            out[:, h, :, k] = np.where(count[:, None] > 0, a + (b - a) * frac, 0.0)
    return np.maximum.accumulate(out, axis=-1)  # guard against rounding: non-decreasing in q


class ChunkBatches(torch.utils.data.Dataset):
    """Consecutive segments of parallel history chunks, every user in every item.

    The origins ``origin_lo … origin_hi − 1`` are cut into contiguous chunks of ``chunk_steps``
    origins that run side by side; item ``j`` is segment ``j`` (origins ``j·K … (j+1)·K − 1`` of
    every chunk, ``K = segment_steps``). Item 0 also carries the ``burn_in`` input steps before
    each chunk and ``reset=True``: iterate in order and carry the LSTM state from one item to
    the next (truncated back-propagation over K steps). An origin ``t`` of user ``u`` is scored
    when it lies in the range and ``t >= first_active[u]``, for horizon ``h`` only when the
    target bucket ``t+1+h < target_end``. Item ``j`` is a dict:

    * ``x`` ``[U, S, C, F]`` inputs (``S = K`` plus ``burn_in`` for item 0; 0 before bucket 0)
    * ``last`` ``[U, K, C, 4]``, ``target`` ``[U, K, C, 6, 4]`` (scaled units), ``weight``
      ``[U, K, C, 6]`` (1 where the target counts, else 0)
    * ``burn_in`` (int) and ``reset`` (bool)

    ``pooled=True`` folds users into chunks (``U = 1``, ``C = users · chunks``): the batches of
    a global model trained on everyone.
    """

    def __init__(self, features: torch.Tensor, scaled: torch.Tensor, first_active: torch.Tensor, origin_lo: int, origin_hi: int,
                 target_end: int, chunk_steps: int, segment_steps: int, burn_in: int, pooled: bool = False) -> None:
        self.features, self.scaled, self.first_active = features, scaled, first_active
        self.origin_lo, self.origin_hi, self.target_end = origin_lo, origin_hi, target_end
        n_origins = max(origin_hi - origin_lo, 1)
        n_chunks = -(-n_origins // max(chunk_steps, 1))
        self.chunk_steps = -(-n_origins // n_chunks)  # balanced: every chunk about as long
        self.starts = origin_lo + self.chunk_steps * torch.arange(n_chunks)
        self.segment_steps = max(1, min(segment_steps, self.chunk_steps))
        self.burn_in, self.pooled = burn_in, pooled

    def __len__(self) -> int:
        return -(-self.chunk_steps // self.segment_steps)

    def __getitem__(self, j: int) -> dict:
        if not 0 <= j < len(self):
            raise IndexError(j)
        a = j * self.segment_steps
        b = min(a + self.segment_steps, self.chunk_steps)
        pre = self.burn_in if j == 0 else 0
        n_steps, dev = self.features.shape[1], self.features.device  # items are made where the data is
        steps = self.starts.to(dev)[None, :] + torch.arange(a - pre, b, device=dev)[:, None]  # [S, C]
        x = self.features[:, steps.clamp(0, n_steps - 1)] * ((steps >= 0) & (steps < n_steps))[None, :, :, None]
        origins = steps[pre:]  # [K, C]
        last = self.scaled[:, origins.clamp(max=n_steps - 1)]
        tgt = origins[..., None] + 1 + torch.arange(N_HORIZONS, device=dev)  # [K, C, 6]
        target = self.scaled[:, tgt.clamp(max=n_steps - 1)]
        ok = (origins >= self.origin_lo) & (origins < self.origin_hi)
        weight = (ok[..., None] & (tgt < self.target_end))[None] & (origins[None, ..., None] >= self.first_active.to(dev)[:, None, None, None])
        batch = {"x": x, "last": last, "target": target, "weight": weight.to(x.dtype)}
        if self.pooled:  # [U, S, C, ...] -> [1, S, U·C, ...]
            batch = {k: v.transpose(0, 1).reshape(1, v.shape[1], -1, *v.shape[3:]) for k, v in batch.items()}
        return batch | {"burn_in": pre, "reset": j == 0}
