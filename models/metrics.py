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
  covered (demand is often exactly zero).

Shapes follow ``models/baselines.py``: actuals ``[n_users, n_origins, 6, 4]`` and quantiles
``[n_users, n_origins, 6, 4, 7]``; :func:`forecast_targets` builds the actuals from a dense
demand array. For many users, score user chunks with :func:`score_forecast` and add the
:class:`ForecastScores` up; :func:`backtest_table` turns them (or whole arrays) into the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.schemas import DEMAND_RESOURCES, HORIZONS_MIN, QUANTILES

TABLE_COLUMNS = ("model", "horizon_min", "resource", "pinball", "coverage80", "coverage90", "n")
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


@dataclass
class ForecastScores:
    """Additive accuracy sums of one model, per (horizon, resource): arrays ``[6, R]``.

    Sums over users x origins, so scores of user chunks add up (``a + b``) to the scores of the
    whole population: a 10k-user backtest never needs every model's quantiles in memory at once.
    """

    pinball_sum: np.ndarray  #: Σ mean-over-levels pinball loss, demand units
    hits80: np.ndarray  #: actuals inside [q10, q90]
    hits90: np.ndarray  #: actuals inside [q05, q95]
    n: np.ndarray  #: points scored

    def __add__(self, other: "ForecastScores") -> "ForecastScores":
        return ForecastScores(*(getattr(self, f) + getattr(other, f) for f in ("pinball_sum", "hits80", "hits90", "n")))


def common_mask(targets: np.ndarray, forecasts: Iterable[np.ndarray]) -> np.ndarray:
    """``[n_users, n_origins, 6, R]`` bool: finite actual and every model's quantiles finite."""
    mask = np.isfinite(targets)
    for q in forecasts:
        if q.shape != (*targets.shape, len(QUANTILES)):
            raise ValueError(f"quantiles {q.shape} do not match targets {targets.shape} x {len(QUANTILES)} levels")
        mask &= np.isfinite(q).all(axis=-1)
    return mask


def score_forecast(quantiles: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None, chunk_users: int = 256) -> ForecastScores:
    """Score ``quantiles [n_users, n_origins, 6, R, 7]`` against ``targets [n_users, n_origins, 6, R]``.

    Only points where ``mask`` (default :func:`common_mask` of this model alone) is true count.
    Works on ``chunk_users`` users at a time in float32 (sums in float64).
    """
    y = np.asarray(targets)
    n_u, _, n_h, n_r = y.shape
    cells = n_h * n_r
    if quantiles.shape != (*y.shape, len(QUANTILES)):
        raise ValueError(f"quantiles {quantiles.shape} do not match targets {y.shape} x {len(QUANTILES)} levels")
    pin, c80, c90, n = (np.zeros(cells) for _ in range(4))
    tau = _LEVELS.astype(np.float32)
    for u0 in range(0, n_u, chunk_users):
        sl = slice(u0, u0 + chunk_users)
        yc = y[sl].reshape(-1, cells).astype(np.float32)
        qc = quantiles[sl].reshape(-1, cells, len(QUANTILES))
        mc = (common_mask(y[sl], [quantiles[sl]]) if mask is None else mask[sl]).reshape(-1, cells)
        yc = np.where(mc, yc, np.float32(0.0))
        loss = np.zeros_like(yc)
        for k in range(len(QUANTILES)):  # a loop over levels: long inner loops, no [.., 7] temporaries
            d = yc - qc[..., k]
            loss += np.maximum(tau[k] * d, (tau[k] - 1) * d)
        pin += np.where(mc, loss, 0.0).sum(axis=0, dtype=np.float64) / len(QUANTILES)
        c80 += (mc & (qc[..., _I10] <= yc) & (yc <= qc[..., _I90])).sum(axis=0)
        c90 += (mc & (qc[..., _I05] <= yc) & (yc <= qc[..., _I95])).sum(axis=0)
        n += mc.sum(axis=0)
    return ForecastScores(*(a.reshape(n_h, n_r) for a in (pin, c80, c90, n)))


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
    interval coverages, ``n`` the number of points scored. Rows only for ``horizons_min``
    (e.g. ``(5, 15, 30)``).
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
            pin, c80, c90 = sc.pinball_sum / sc.n, sc.hits80 / sc.n, sc.hits90 / sc.n
        for minutes in horizons_min:
            h = HORIZONS_MIN.index(minutes)
            for r, resource in enumerate(resources):
                rows.append((name, int(minutes), resource, pin[h, r], c80[h, r], c90[h, r], int(sc.n[h, r])))
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


def metrics_json(table: pd.DataFrame) -> dict:
    """The table as nested JSON-ready dicts: ``{model: {horizon_min: {resource: {metric: value}}}}``."""
    out: dict = {}
    for row in table.itertuples(index=False):
        cell = out.setdefault(row.model, {}).setdefault(str(row.horizon_min), {})
        cell[row.resource] = {
            "pinball": None if np.isnan(row.pinball) else float(row.pinball),
            "coverage80": None if np.isnan(row.coverage80) else float(row.coverage80),
            "coverage90": None if np.isnan(row.coverage90) else float(row.coverage90),
            "n": int(row.n),
        }
    return out


def format_backtest_table(table: pd.DataFrame) -> str:
    """A readable rendering: per resource and horizon, models by pinball loss, best marked ``*``.

    ``vs best`` is each model's pinball relative to the best in its group (1.00 = the best).
    """
    lines = [f"{'resource':<10} {'horizon':>7}  {'model':<28} {'pinball':>11} {'vs best':>7} {'cov80':>6} {'cov90':>6} {'n':>9}"]
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
                f"{row.pinball:>11.4g} {rel:>7.2f} {row.coverage80:>6.3f} {row.coverage90:>6.3f} {row.n:>9,}"
            )
    return "\n".join(lines)
