"""Forecast accuracy: pinball loss, interval coverage, and the backtest table.

All losses are in the demand's own units (requests per bucket, cores, GB, GPUs), never in a
transformed space (DESIGN.md, "Forecasting": select and report on the real scale).

Definitions, for an actual ``y`` and a quantile forecast ``q_τ`` at levels ``τ`` in
:data:`pipeline.schemas.QUANTILES`:

* pinball loss ``L_τ(y, q) = max(τ (y - q), (τ - 1)(y - q))``; the *mean pinball loss* of a
  forecast is the mean of ``L_τ`` over the 7 levels (no factor 2: at ``τ = 0.5`` alone it is half
  the absolute error);
* coverage of the central 80 % interval: share of actuals with ``q10 <= y <= q90``; the 90 %
  interval uses ``q05`` and ``q95``. Bounds are inclusive, so an actual of 0 with ``q05 = 0`` is
  covered (demand is often exactly zero);
* *tie-aware* coverage (``coverage80_pit``, ``coverage90_pit``): the expected coverage under the
  randomised PIT, see :func:`pit_interval`. It equals the inclusive coverage when no actual ties
  a quantile, and stops counting every 0 under ``q05 = 0`` as covered: on data that is mostly
  exactly 0 the inclusive coverage of any forecast with ``q05 = 0`` is at least the share of zeros,
  whatever the forecast's calibration. The 7 levels only bracket P(demand = 0); a forecast that
  also gives it (``p_zero``, the LSTMs do) has its mass at 0 placed there, else at the level of the
  highest zero quantile;
* per-level calibration: for each level ``τ`` the shares of actuals with ``y < q_τ``
  (``below``), ``y <= q_τ`` (``at_or_below``) and the randomised-PIT share ``P(PIT <= τ)``
  (``pit``). For a calibrated forecast ``below <= τ <= at_or_below`` and ``pit ≈ τ``.

Shapes follow ``models/baselines.py``: actuals ``[n_users, n_origins, 6, 4]`` and quantiles
``[n_users, n_origins, 6, 4, 7]``; :func:`forecast_targets` builds the actuals from a dense
demand array. For many users, score user chunks with :func:`score_forecast` and add the
:class:`ForecastScores` up; :func:`backtest_table` turns them (or whole arrays) into the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.schemas import DEMAND_RESOURCES, HORIZONS_MIN, QUANTILE_COLUMNS, QUANTILES

#: Per-level calibration columns of the backtest table, for each quantile column ``qNN``:
#: ``below_qNN`` (share of ``y < qNN``), ``at_or_below_qNN`` (``y <= qNN``), ``pit_qNN`` (``P(PIT <= τ)``).
CALIBRATION_STATS = ("below", "at_or_below", "pit")
CALIBRATION_COLUMNS = tuple(f"{stat}_{col}" for col in QUANTILE_COLUMNS for stat in CALIBRATION_STATS)
TABLE_COLUMNS = ("model", "horizon_min", "resource", "pinball", "coverage80", "coverage90", "coverage80_pit", "coverage90_pit", "n",
                 *CALIBRATION_COLUMNS)
_LEVELS = np.asarray(QUANTILES, dtype=np.float64)
_I05, _I10, _I90, _I95 = (QUANTILES.index(q) for q in (0.05, 0.10, 0.90, 0.95))


def forecast_targets(values: np.ndarray, origins: np.ndarray, n_horizons: int = len(HORIZONS_MIN)) -> np.ndarray:
    """Actuals ``[n_users, n_origins, n_horizons, R]`` for forecasts issued at ``origins``.

    ``values``: ``[n_users, T, R]``; horizon ``h`` (1-based) of origin ``o`` is bucket
    ``o + h - 1``. NaN where that bucket is past ``T`` or not finite.
    """
    values = np.asarray(values, dtype=np.float32)
    n_users, t_len, r = values.shape
    origins = np.asarray(origins, dtype=np.int64).reshape(-1)
    idx = origins[:, None] + np.arange(n_horizons)[None, :]  # [O, H]
    inside = (idx >= 0) & (idx < t_len)
    out = values[:, np.clip(idx, 0, max(t_len - 1, 0))] if t_len else np.full((n_users, *idx.shape, r), np.nan, np.float32)
    out = np.where(inside[None, :, :, None] & np.isfinite(out), out, np.float32(np.nan))
    return out.astype(np.float32, copy=False)


def pinball_loss(y: np.ndarray, quantiles: np.ndarray, levels: Sequence[float] = QUANTILES) -> np.ndarray:
    """Mean pinball loss over ``levels`` for each actual: ``y [...]``, ``quantiles [..., L]`` -> ``[...]``.

    NaN where ``y`` or a quantile is NaN. Units: those of ``y``.
    """
    y = np.asarray(y, dtype=np.float64)
    q = np.asarray(quantiles, dtype=np.float64)
    tau = np.asarray(levels, dtype=np.float64)
    if q.shape[-1] != len(tau) or q.shape[:-1] != y.shape:
        raise ValueError(f"quantiles {q.shape} do not match actuals {y.shape} and {len(tau)} levels")
    diff = y[..., None] - q
    return np.maximum(tau * diff, (tau - 1.0) * diff).mean(axis=-1)


def interval_coverage(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Share of finite actuals with ``lower <= y <= upper`` (NaN when there are none)."""
    y, lower, upper = (np.asarray(a, dtype=np.float64) for a in (y, lower, upper))
    ok = np.isfinite(y) & np.isfinite(lower) & np.isfinite(upper)
    if not ok.any():
        return float("nan")
    return float(((lower[ok] <= y[ok]) & (y[ok] <= upper[ok])).mean())


def _tie_ends(y: np.ndarray, qs: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, hi, mass)`` for actuals ``y [...]`` and *sorted* quantiles ``qs [..., K]``.

    ``mass`` is true where ``y`` equals a quantile knot and the forecast puts probability on it
    (``hi > lo``): then ``[lo, hi]`` are the levels where the quantile function equals ``y``
    (knot levels, or 0 / 1 when the tie includes the lowest / highest knot). Elsewhere the
    randomised PIT is a single level and ``lo``, ``hi`` are not meaningful.
    """
    k = len(levels)
    n_lt = (qs < y[..., None]).sum(axis=-1)
    n_le = (qs <= y[..., None]).sum(axis=-1)
    first = np.concatenate([[0.0], levels[1:], [1.0]])  # level of the first tied knot (0 when it is the lowest)
    last = np.concatenate([[0.0], levels[:-1], [1.0]])  # level of the last tied knot (1 when it is the highest)
    lo, hi = first[np.minimum(n_lt, k)], last[n_le]
    return lo, hi, (n_le > n_lt) & (hi > lo)


def _zero_tie_end(y: np.ndarray, hi: np.ndarray, mass: np.ndarray, p_zero: np.ndarray) -> np.ndarray:
    """``hi`` of :func:`_tie_ends` with ``F(0) = p_zero`` where an actual 0 ties the zero quantiles
    (``[F(0-), F(0)] = [0, p_zero]`` instead of ``[0, level of the highest zero quantile]``) and
    ``p_zero`` is given (finite). ``p_zero`` must lie in the bracket of its zero quantiles
    (:func:`pipeline.schemas.zero_bounds`), so nothing else about the forecast changes: an actual
    between 0 and the first positive quantile keeps the interval it had, and with ``q05 > 0`` an
    actual 0 stays below every level as before."""
    return np.where(mass & (y <= 0) & np.isfinite(p_zero), p_zero, hi)


def pit_interval(y: np.ndarray, quantiles: np.ndarray, levels: Sequence[float] = QUANTILES,
                 p_zero: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The randomised PIT of each actual: uniform on ``[F(y-), F(y)]``; returns ``(F(y-), F(y))``.

    ``y [...]``, ``quantiles [..., K]`` at ``levels`` (sorted first, so slightly crossing
    quantiles are rearranged). The forecast's quantile function ``Q(τ)`` is the linear
    interpolation of the knots ``(τ_k, q_k)``, constant ``q_1`` below the lowest level and ``q_K``
    above the highest (the tails beyond the knots collapse onto them; for demand, which is never
    negative, ``q05 = 0`` then means ``P(Y = 0) >= 0.05`` exactly as it should). Its CDF is
    ``F(y) = sup{τ : Q(τ) <= y}`` and ``F(y-) = inf{τ : Q(τ) >= y}``:

    * ``y`` equal to knots ``k1 … k2`` (a *tie*): ``[τ_k1, τ_k2]``, with ``τ_k1`` replaced by 0 when
      ``k1`` is the lowest knot and ``τ_k2`` by 1 when ``k2`` is the highest (all knots 0 and
      ``y = 0``: ``[0, 1]``; only ``q05 = 0``: ``[0, 0.05]``);
    * ``y`` strictly between knots: the single level ``F(y)`` interpolated linearly between them;
      below the lowest knot 0, above the highest 1.

    ``p_zero [...]`` (the forecast's P(demand = 0), NaN where not given): an actual 0 tied with the
    zero quantiles gets ``[0, p_zero]`` (:func:`_zero_tie_end`).

    NaN where ``y`` or a quantile is not finite.
    """
    y = np.asarray(y, dtype=np.float64)
    qs = np.sort(np.asarray(quantiles, dtype=np.float64), axis=-1)
    tau = np.asarray(levels, dtype=np.float64)
    if qs.shape[-1] != len(tau) or qs.shape[:-1] != y.shape:
        raise ValueError(f"quantiles {qs.shape} do not match actuals {y.shape} and {len(tau)} levels")
    lo, hi, mass = _tie_ends(y, qs, tau)
    if p_zero is not None:
        hi = _zero_tie_end(y, hi, mass, np.asarray(p_zero, dtype=np.float64))
    m = (qs < y[..., None]).sum(axis=-1)  # no tie: y lies between knots m-1 and m
    j = np.clip(m, 1, len(tau) - 1)
    q0, q1 = np.take_along_axis(qs, (j - 1)[..., None], -1)[..., 0], np.take_along_axis(qs, j[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        inner = tau[j - 1] + (tau[j] - tau[j - 1]) * (y - q0) / (q1 - q0)
    point = np.where(m == 0, 0.0, np.where(m == len(tau), 1.0, inner))
    tie = (qs == y[..., None]).any(axis=-1)
    single = np.where(tie, lo, point)  # a tie on one interior knot: lo == hi == its level
    lo, hi = np.where(mass, lo, single), np.where(mass, hi, single)
    bad = ~(np.isfinite(y) & np.isfinite(qs).all(axis=-1))
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


def _pit_coverage(y: np.ndarray, qs: np.ndarray, lo: np.ndarray, hi: np.ndarray, mass: np.ndarray, i: int, j: int,
                  levels: np.ndarray) -> np.ndarray:
    """``P(τ_i <= PIT <= τ_j)`` per point (see :func:`interval_coverage_pit`); ``qs`` sorted."""
    inclusive = (qs[..., i] <= y) & (y <= qs[..., j])
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.clip(np.minimum(hi, levels[j]) - np.maximum(lo, levels[i]), 0.0, None) / (hi - lo)
    return np.where(mass, share, inclusive)


def _pit_below(y: np.ndarray, qs: np.ndarray, lo: np.ndarray, hi: np.ndarray, mass: np.ndarray, k: int, levels: np.ndarray) -> np.ndarray:
    """``P(PIT <= τ_k)`` per point; ``qs`` sorted."""
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.clip((levels[k] - lo) / (hi - lo), 0.0, 1.0)
    return np.where(mass, share, qs[..., k] >= y)


def interval_coverage_pit(y: np.ndarray, quantiles: np.ndarray, lower: float, upper: float,
                          levels: Sequence[float] = QUANTILES, p_zero: np.ndarray | None = None) -> float:
    """Tie-aware coverage of the central interval ``[q_lower, q_upper]`` (levels, e.g. 0.05 and 0.95).

    The mean over finite points of ``P(lower <= PIT <= upper)``, ``PIT`` uniform on
    :func:`pit_interval`'s ``[F(y-), F(y)]``: where the forecast puts mass on the actual (a tie),
    the share of ``[F(y-), F(y)]`` inside ``[lower, upper]``; elsewhere 1 when
    ``q_lower <= y <= q_upper``, else 0 — so without ties it *is* the inclusive
    :func:`interval_coverage`. All knots 0 and ``y = 0``: the PIT is uniform on ``[0, 1]``, the
    90 % interval covers 0.9 of it (inclusive coverage: 1). Only ``q05 = q10 = q25 = 0``: PIT
    on ``[0, 0.25]``, covered ``(0.25 - 0.05) / 0.25 = 0.8`` by the 90 % interval and
    ``(0.25 - 0.10) / 0.25 = 0.6`` by the 80 %. For a forecast that is the true distribution, with
    its point masses on knot levels, the PIT is uniform on ``[0, 1]`` and the tie-aware coverage is
    the nominal 0.8 / 0.9, whatever the share of zeros.

    Limitation: a mass is only resolved on the knots. A true ``P(Y = 0) = 0.7`` is best told by
    ``q05 … q50 = 0 < q75``, which the linear interpolation reads as ``P(Y = 0) = 0.5``: the
    exact quantiles of such data then score 0.88 / 0.76 tie-aware (a little under nominal), where
    the inclusive coverage gives 0.95 / 0.90. A forecast that also gives ``p_zero`` (P(Y = 0)) resolves
    the mass at 0: ``[0, p_zero]`` (:func:`pit_interval`).
    """
    y = np.asarray(y, dtype=np.float64)
    qs = np.sort(np.asarray(quantiles, dtype=np.float64), axis=-1)
    tau = np.asarray(levels, dtype=np.float64)
    if qs.shape[-1] != len(tau) or qs.shape[:-1] != y.shape:
        raise ValueError(f"quantiles {qs.shape} do not match actuals {y.shape} and {len(tau)} levels")
    i, j = (int(np.flatnonzero(np.isclose(tau, v))[0]) for v in (lower, upper))
    ok = np.isfinite(y) & np.isfinite(qs).all(axis=-1)
    if not ok.any():
        return float("nan")
    y, qs = y[ok], qs[ok]
    lo, hi, mass = _tie_ends(y, qs, tau)
    if p_zero is not None:
        hi = _zero_tie_end(y, hi, mass, np.broadcast_to(np.asarray(p_zero, dtype=np.float64), ok.shape)[ok])
    return float(_pit_coverage(y, qs, lo, hi, mass, i, j, tau).mean())


@dataclass
class ForecastScores:
    """Additive accuracy sums of one model, per (horizon, resource): arrays ``[6, R]`` (``[6, R, 7]``
    per level).

    Sums over users x origins, so scores of user chunks add up (``a + b``) to the scores of the
    whole population: a 10k-user backtest never needs every model's quantiles in memory at once.
    """

    pinball_sum: np.ndarray  #: Σ mean-over-levels pinball loss, demand units
    hits80: np.ndarray  #: actuals inside [q10, q90]
    hits90: np.ndarray  #: actuals inside [q05, q95]
    n: np.ndarray  #: points scored
    hits80_pit: np.ndarray  #: Σ P(0.10 <= PIT <= 0.90), :func:`interval_coverage_pit`
    hits90_pit: np.ndarray  #: Σ P(0.05 <= PIT <= 0.95)
    below: np.ndarray  #: ``[6, R, 7]`` actuals with y < q_τ
    at_or_below: np.ndarray  #: ``[6, R, 7]`` actuals with y <= q_τ
    pit_below: np.ndarray  #: ``[6, R, 7]`` Σ P(PIT <= τ)

    def __add__(self, other: "ForecastScores") -> "ForecastScores":
        return ForecastScores(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})


def common_mask(targets: np.ndarray, forecasts: Iterable[np.ndarray]) -> np.ndarray:
    """``[n_users, n_origins, 6, R]`` bool: finite actual and every model's quantiles finite."""
    mask = np.isfinite(targets)
    for q in forecasts:
        if q.shape != (*targets.shape, len(QUANTILES)):
            raise ValueError(f"quantiles {q.shape} do not match targets {targets.shape} x {len(QUANTILES)} levels")
        mask &= np.isfinite(q).all(axis=-1)
    return mask


def score_forecast(quantiles: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None, chunk_users: int = 256,
                   p_zero: np.ndarray | None = None) -> ForecastScores:
    """Score ``quantiles [n_users, n_origins, 6, R, 7]`` against ``targets [n_users, n_origins, 6, R]``.

    Only points where ``mask`` (default :func:`common_mask` of this model alone) is true count.
    Works on ``chunk_users`` users at a time in float32 (sums in float64). The inclusive
    coverages use the quantiles as given; the tie-aware ones and the per-level shares use them
    sorted along the levels (:func:`pit_interval`), and ``p_zero`` (P(demand = 0), shaped like
    ``targets``; NaN or None: the quantiles alone) where the forecast gives it.
    """
    y = np.asarray(targets)
    n_u, _, n_h, n_r = y.shape
    cells = n_h * n_r
    n_q = len(QUANTILES)
    if quantiles.shape != (*y.shape, n_q):
        raise ValueError(f"quantiles {quantiles.shape} do not match targets {y.shape} x {n_q} levels")
    pin, c80, c90, n, p80, p90 = (np.zeros(cells) for _ in range(6))
    below, at_or_below, pit_below = (np.zeros((cells, n_q)) for _ in range(3))
    tau = _LEVELS.astype(np.float32)
    for u0 in range(0, n_u, chunk_users):
        sl = slice(u0, u0 + chunk_users)
        yc = y[sl].reshape(-1, cells).astype(np.float32)
        qc = quantiles[sl].reshape(-1, cells, n_q)
        mc = (common_mask(y[sl], [quantiles[sl]]) if mask is None else mask[sl]).reshape(-1, cells)
        yc = np.where(mc, yc, np.float32(0.0))
        loss = np.zeros_like(yc)
        for k in range(n_q):  # a loop over levels: long inner loops, no [.., 7] temporaries
            d = yc - qc[..., k]
            loss += np.maximum(tau[k] * d, (tau[k] - 1) * d)
        pin += np.where(mc, loss, 0.0).sum(axis=0, dtype=np.float64) / n_q
        c80 += (mc & (qc[..., _I10] <= yc) & (yc <= qc[..., _I90])).sum(axis=0)
        c90 += (mc & (qc[..., _I05] <= yc) & (yc <= qc[..., _I95])).sum(axis=0)
        n += mc.sum(axis=0)
        qs = np.sort(np.where(mc[..., None], qc, np.float32(0.0)), axis=-1)
        lo, hi, mass = _tie_ends(yc, qs, _LEVELS)
        if p_zero is not None:
            hi = _zero_tie_end(yc, hi, mass, p_zero[sl].reshape(-1, cells))
        p80 += np.where(mc, _pit_coverage(yc, qs, lo, hi, mass, _I10, _I90, _LEVELS), 0.0).sum(axis=0)
        p90 += np.where(mc, _pit_coverage(yc, qs, lo, hi, mass, _I05, _I95, _LEVELS), 0.0).sum(axis=0)
        for k in range(n_q):
            below[:, k] += (mc & (yc < qs[..., k])).sum(axis=0)
            at_or_below[:, k] += (mc & (yc <= qs[..., k])).sum(axis=0)
            pit_below[:, k] += np.where(mc, _pit_below(yc, qs, lo, hi, mass, k, _LEVELS), 0.0).sum(axis=0)
    flat = lambda a: a.reshape(n_h, n_r, *a.shape[1:])  # noqa: E731
    return ForecastScores(pinball_sum=flat(pin), hits80=flat(c80), hits90=flat(c90), n=flat(n), hits80_pit=flat(p80),
                          hits90_pit=flat(p90), below=flat(below), at_or_below=flat(at_or_below), pit_below=flat(pit_below))


def backtest_table(
    forecasts: Mapping[str, np.ndarray | ForecastScores],
    targets: np.ndarray | None = None,
    horizons_min: Sequence[int] = HORIZONS_MIN,
    resources: Sequence[str] = DEMAND_RESOURCES,
) -> pd.DataFrame:
    """The backtest table: one row per (model, horizon, resource).

    ``forecasts``: model name -> quantiles ``[n_users, n_origins, 6, R, 7]`` (then ``targets``,
    the actuals ``[n_users, n_origins, 6, R]`` of :func:`forecast_targets`, is required) or
    accumulated :class:`ForecastScores`. Arrays are all scored on the *same* points, those of
    :func:`common_mask`, so models are compared like for like. Columns :data:`TABLE_COLUMNS`:
    ``pinball`` is the mean pinball loss (demand units), ``coverage80`` / ``coverage90`` the
    inclusive interval coverages, ``coverage80_pit`` / ``coverage90_pit`` the tie-aware ones
    (:func:`interval_coverage_pit`), ``n`` the number of points scored, then per level the
    :data:`CALIBRATION_COLUMNS` (shares of ``y < q``, ``y <= q`` and ``P(PIT <= τ)``). Rows only
    for ``horizons_min`` (e.g. ``(5, 15, 30)``).
    """
    arrays = {k: v for k, v in forecasts.items() if not isinstance(v, ForecastScores)}
    scores = {k: v for k, v in forecasts.items() if isinstance(v, ForecastScores)}
    if arrays:
        if targets is None:
            raise ValueError("targets are needed to score quantile arrays")
        y = np.asarray(targets, dtype=np.float32)
        mask = common_mask(y, arrays.values())
        scores |= {k: score_forecast(q, y, mask) for k, q in arrays.items()}
    rows = []
    for name in forecasts:
        sc = scores[name]
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = [getattr(sc, f) / sc.n for f in ("pinball_sum", "hits80", "hits90", "hits80_pit", "hits90_pit")]
            per_level = np.stack([sc.below, sc.at_or_below, sc.pit_below], axis=-1) / sc.n[..., None, None]  # [6, R, 7, 3]
        for minutes in horizons_min:
            h = HORIZONS_MIN.index(minutes)
            for r, resource in enumerate(resources):
                rows.append((name, int(minutes), resource, *(a[h, r] for a in shares), int(sc.n[h, r]), *per_level[h, r].reshape(-1)))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def compare_to_best(table: pd.DataFrame, model: str, references: Sequence[str]) -> pd.DataFrame:
    """Per (horizon, resource): ``model``'s pinball against the best of ``references``.

    Columns ``horizon_min, resource, pinball, best_reference, best_pinball, improvement`` where
    ``improvement = 1 - pinball / best_pinball`` (0.15 = 15 % lower loss than the best reference).
    """
    ref = table[table["model"].isin(references)]
    best = ref.loc[ref.groupby(["horizon_min", "resource"], sort=False)["pinball"].idxmin()]
    best = best[["horizon_min", "resource", "model", "pinball"]].rename(columns={"model": "best_reference", "pinball": "best_pinball"})
    mine = table[table["model"] == model][["horizon_min", "resource", "pinball"]]
    out = mine.merge(best, on=["horizon_min", "resource"], how="left")
    out["improvement"] = 1.0 - out["pinball"] / out["best_pinball"]
    return out.reset_index(drop=True)


def calibration_bracket(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, the calibration test every quantile level can be held to whatever the ties:
    a calibrated level ``τ`` has ``P(y < q_τ) <= τ <= P(y <= q_τ)`` (for demand that is often
    exactly 0 the two differ by the share of zeros, and interval coverages are only bounded:
    :func:`interval_coverage` counts every tie as covered, :func:`interval_coverage_pit` places
    a tie's mass by linear interpolation between the knots).

    Columns ``model``, ``cells`` (horizon x resource x level rows checked), ``inside`` (cells
    with ``below <= τ <= at_or_below``), ``worst_miss`` (the largest distance of ``τ`` outside
    its bracket, 0 when every cell is inside) and ``worst_cell`` (``"<h> min <resource> qNN"``
    or ``""``)."""
    rows = []
    for model, group in table.groupby("model", sort=False):
        cells, inside, worst, where = 0, 0, 0.0, ""
        for row in group.to_dict("records"):
            for col, level in zip(QUANTILE_COLUMNS, QUANTILES):
                below, at_or_below = row[f"below_{col}"], row[f"at_or_below_{col}"]
                if not (np.isfinite(below) and np.isfinite(at_or_below)):
                    continue
                miss = max(below - level, level - at_or_below, 0.0)
                cells += 1
                inside += miss == 0.0
                if miss > worst:
                    worst, where = miss, f"{row['horizon_min']} min {row['resource']} {col}"
        rows.append((model, cells, inside, worst, where))
    return pd.DataFrame(rows, columns=["model", "cells", "inside", "worst_miss", "worst_cell"])


def metrics_json(table: pd.DataFrame) -> dict:
    """The table as nested JSON-ready dicts: ``{model: {horizon_min: {resource: {metric: value}}}}``.

    ``calibration`` holds, per quantile column, its ``level`` and the shares ``below`` (``y < q``),
    ``at_or_below`` (``y <= q``) and ``pit`` (``P(PIT <= level)``).
    """
    num = lambda x: None if np.isnan(x) else float(x)  # noqa: E731
    out: dict = {}
    for row in table.to_dict("records"):
        cell = out.setdefault(row["model"], {}).setdefault(str(row["horizon_min"]), {})
        cell[row["resource"]] = {
            **{k: num(row[k]) for k in ("pinball", "coverage80", "coverage90", "coverage80_pit", "coverage90_pit")},
            "n": int(row["n"]),
            "calibration": {col: {"level": level, **{stat: num(row[f"{stat}_{col}"]) for stat in CALIBRATION_STATS}}
                            for col, level in zip(QUANTILE_COLUMNS, QUANTILES)},
        }
    return out


def format_backtest_table(table: pd.DataFrame) -> str:
    """A readable rendering: per resource and horizon, models by pinball loss, best marked ``*``.

    ``vs best`` is each model's pinball relative to the best in its group (1.00 = the best);
    ``cov80`` / ``cov90`` the inclusive coverages, ``pit80`` / ``pit90`` the tie-aware ones.
    """
    lines = [f"{'resource':<10} {'horizon':>7}  {'model':<28} {'pinball':>11} {'vs best':>7} {'cov80':>6} {'cov90':>6} "
             f"{'pit80':>6} {'pit90':>6} {'n':>9}"]
    groups = [(r, m) for r in dict.fromkeys(table["resource"]) for m in sorted(set(table["horizon_min"]))]
    for resource, minutes in groups:
        group = table[(table["resource"] == resource) & (table["horizon_min"] == minutes)]
        if group.empty:
            continue
        group = group.sort_values("pinball", na_position="last")
        best = group["pinball"].min()
        lines.append("")
        for i, row in enumerate(group.itertuples(index=False)):
            rel = row.pinball / best if best and np.isfinite(best) and best > 0 else float("nan")
            mark = "*" if i == 0 and np.isfinite(row.pinball) else " "
            lines.append(
                f"{resource if i == 0 else '':<10} {str(minutes) + ' min' if i == 0 else '':>7} {mark}{row.model:<28} "
                f"{row.pinball:>11.4g} {rel:>7.2f} {row.coverage80:>6.3f} {row.coverage90:>6.3f} "
                f"{row.coverage80_pit:>6.3f} {row.coverage90_pit:>6.3f} {row.n:>9,}"
            )
    return "\n".join(lines)
