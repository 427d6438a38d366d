"""Rolling-origin backtest: train before a holdout, forecast at every 5-minute origin in it.

``backtest(demand, config)`` on the 5-minute grid of a demand table (:data:`pipeline.schemas.DEMAND`):

1. the **holdout** is the last ``holdout_days`` of the data, ``[holdout_start, end)``; ``end``
   is the end of the table's last bucket (or ``until``);
2. the models are trained by :func:`models.train.train` on the rows before ``holdout_start``
   only (its own held-out tail, for early stopping and the per-resource fallback, is the last
   ``TrainConfig.val_days`` of that training period: nothing is tuned on the holdout);
3. every bucket ``o`` of the holdout is a forecast **origin**: issued at the start of bucket
   ``o``, from buckets ``< o`` only, for the 6 buckets ``o … o+5`` (5…30 minutes). Targets past
   ``end`` are not scored, so late origins count for their early horizons only;
4. models, scored on the same points: ``lstm`` (each user's own model, as trained: users with
   too little history on the global model, per-resource fallbacks to the prior, and the
   recalibration fitted on training's held-out tail, :mod:`models.calibration`), ``global`` (the
   global model's weights with each user's own statistics, not recalibrated), and each baseline of
   :mod:`models.baselines` (``last_value``, ``seasonal_daily``, ``seasonal_weekly``,
   ``moving_average``).

The LSTMs forecast every origin in one pass over the sequence, as in training's held-out
evaluation (:func:`models.train.holdout_batches`): the origins are cut into chunks of
``eval_chunk_steps`` that run side by side, each chunk warmed up over the ``eval_burn_in``
buckets before it and carrying its state through. The state at origin ``o`` has seen buckets
``< o`` only, and the normalisation statistics are the training period's, so no forecast peeks
past its origin. :func:`models.train.predict` (one issue time) warms up over ``eval_burn_in``
buckets from a zero state: with ``eval_chunk_steps = 1`` the two are identical, with longer
chunks a forecast's state has seen up to ``eval_chunk_steps - 1`` more buckets of history.

Scored users are those with demand before the holdout (the trained users); users first seen
in the holdout have no model in this backtest and are only counted (``new_users``).

Memory: users are processed ``chunk_users`` at a time and only additive scores are kept
(:class:`models.metrics.ForecastScores`), so the backtest's memory is bounded by one chunk's
forecasts, not by the population. The forecasts written out are a bounded sample, see
:func:`forecast_sample`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from models.baselines import METHODS, BaselineConfig, forecast_baseline
from models.contract import enforce_non_crossing, quantile_mean, validate_forecast_table
from models.features import BUCKET, BUCKETS_PER_DAY, ChunkBatches, dense_demand
from models.metrics import (ForecastScores, backtest_table, calibration_bracket, common_mask, compare_to_best, forecast_targets,
                            metrics_json, score_forecast)
from models.calibration import CALIBRATION_BUFFERS, calibrated, head_quantiles, zero_mass
from models.module import N_HORIZONS, N_QUANTILES, N_RESOURCES, StackedLSTM
from models.train import TrainConfig, TrainedModels, holdout_batches, train
from pipeline.demand import demand_from_lake
from pipeline.schemas import DEMAND_RESOURCES, HORIZONS_MIN, QUANTILE_COLUMNS, USER_FORECAST, zero_bounds
from pipeline.storage import Location

LSTM, GLOBAL = "lstm", "global"
MODELS = (LSTM, GLOBAL, *METHODS)
REPORT_HORIZONS = (5, 15, 30)
#: Forecast rows written to ``forecasts.parquet`` at most (about 100 bytes each once compressed).
MAX_FORECAST_ROWS = 1_000_000


@dataclass(frozen=True)
class BacktestConfig:
    """What :func:`backtest` does. ``holdout_days`` is rounded to whole 5-minute buckets."""

    holdout_days: float
    train_days: float | None = None  # training window before the holdout; None: all history
    train: TrainConfig = TrainConfig()
    baselines: BaselineConfig = BaselineConfig()
    chunk_users: int = 256  # users forecast and scored at once (bounds memory)
    max_forecast_rows: int = MAX_FORECAST_ROWS  # 0: keep no forecasts

    def __post_init__(self) -> None:
        if not (isinstance(self.holdout_days, (int, float)) and math.isfinite(self.holdout_days) and self.holdout_days > 0):
            raise ValueError(f"holdout_days must be a positive number of days, got {self.holdout_days!r}")
        if round(self.holdout_days * BUCKETS_PER_DAY) < 1:
            raise ValueError(f"holdout_days={self.holdout_days!r} is shorter than one 5-minute bucket")
        if self.train_days is not None and not self.train_days > 0:
            raise ValueError(f"train_days must be positive, got {self.train_days!r}")
        if self.chunk_users < 1 or self.max_forecast_rows < 0:
            raise ValueError("chunk_users must be >= 1 and max_forecast_rows >= 0")


@dataclass
class BacktestResult:
    """What :func:`backtest` returns.

    ``table``: :func:`models.metrics.backtest_table` rows for horizons 5/15/30 min;
    ``forecasts``: the sampled forecasts (``USER_FORECAST`` columns plus ``model`` and ``actual``).
    """

    table: pd.DataFrame
    forecasts: pa.Table
    trained: TrainedModels
    train_start: datetime
    holdout_start: datetime
    holdout_end: datetime
    n_origins: int
    users: list[str]  # scored users (trained)
    new_users: list[str]  # first seen in the holdout: not scored
    forecast_users: list[str] = field(default_factory=list)  # whose forecasts were kept
    forecast_origin_stride: int = 1

    def comparison(self) -> pd.DataFrame:
        """The LSTM's pinball loss against the best baseline per (horizon, resource)."""
        return compare_to_best(self.table, LSTM, list(METHODS))

    def metrics(self) -> dict:
        """Everything ``metrics.json`` holds, JSON-ready."""
        cmp = self.comparison()
        t = self.trained
        return {
            "holdout": {"start": self.holdout_start.isoformat(), "end": self.holdout_end.isoformat(),
                        "days": (self.holdout_end - self.holdout_start) / timedelta(days=1), "origins": self.n_origins},
            "train": {"start": self.train_start.isoformat(), "end": self.holdout_start.isoformat(),
                      "epochs_run": {"global": t.epochs_run[0], "per_user": t.epochs_run[1]},
                      "config": dataclasses.asdict(t.config)},
            "users": {"scored": len(self.users), "on_global_model": int(t.uses_global.sum()),
                      "new_in_holdout_not_scored": len(self.new_users)},
            "definitions": {"pinball": "mean over the 7 levels of the pinball loss, demand units (requests per bucket; "
                                       "mean concurrent cores, GB, GPUs), mean over users x origins",
                            "coverage80": "share of actuals in [q10, q90]", "coverage90": "share of actuals in [q05, q95]",
                            "coverage80_pit": "tie-aware coverage of [q10, q90]: mean of P(0.10 <= PIT <= 0.90), the PIT uniform on "
                                              "[F(y-), F(y)] of the forecast's quantile function (knots linearly interpolated, "
                                              "constant beyond q05 and q95; F(0) = the forecast's p_zero where it gives one: "
                                              "lstm and global); equals coverage80 where no actual ties a quantile",
                            "coverage90_pit": "as coverage80_pit, for [q05, q95]",
                            "calibration": "per quantile level: below = share of y < q, at_or_below = share of y <= q, "
                                           "pit = mean P(PIT <= level); calibrated: below <= level <= at_or_below, pit ~ level",
                            "calibration_bracket": "per model: of the (horizon, resource, level) cells, how many have "
                                                   "below <= level <= at_or_below (calibrated whatever the ties), and the "
                                                   "largest distance of a level outside its bracket",
                            "n": "points scored (user x origin), the same for every model"},
            "metrics": metrics_json(self.table),
            "calibration_bracket": {r.model: {"cells": int(r.cells), "inside": int(r.inside), "worst_miss": float(r.worst_miss),
                                              "worst_cell": r.worst_cell or None}
                                    for r in calibration_bracket(self.table).itertuples(index=False)},
            "lstm_vs_best_baseline": [
                {"horizon_min": int(r.horizon_min), "resource": r.resource, "lstm_pinball": _num(r.pinball),
                 "best_baseline": r.best_reference, "best_baseline_pinball": _num(r.best_pinball), "improvement": _num(r.improvement)}
                for r in cmp.itertuples(index=False)],
            "forecasts": {"rows": self.forecasts.num_rows, "users": len(self.forecast_users),
                          "origin_stride": self.forecast_origin_stride, "models": list(MODELS)},
        }


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _table_end(demand: pa.Table) -> datetime:
    return pc.max(demand["ts"]).as_py() + BUCKET


def _sub_model(model: StackedLSTM, rows: np.ndarray) -> StackedLSTM:
    """A new model holding users ``rows`` of ``model`` (copies)."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    return StackedLSTM.from_weights({k: v.detach()[idx].clone() for k, v in model.get_all().items()})


@torch.no_grad()
def batch_quantiles(model: StackedLSTM, batches: ChunkBatches) -> np.ndarray:
    """Quantile forecasts at every origin ``batches.origin_lo … origin_hi - 1`` in one pass.

    Returns float32 ``[U, n_origins, 6, 4, 7]``, real units (``model.scale``), recalibrated and
    clipped at 0 like :func:`models.train.predict`. Origin ``t`` here is the last bucket seen (the
    forecast is for ``t+1 … t+6``); the state carries through each chunk as in :func:`models.train.evaluate`.
    """
    n = batches.origin_hi - batches.origin_lo
    out = np.full((model.n_users, n, N_HORIZONS, N_RESOURCES, N_QUANTILES), np.nan, dtype=np.float32)
    scale = model.scale[:, None, None, None, :, None]
    for j, (b, q) in enumerate(head_quantiles(model, batches)):
        steps = q.shape[1]
        q = (calibrated(model, q, b["last"]) * scale).clamp_min(0)
        a = j * batches.segment_steps
        origins = batches.starts[None, :] + torch.arange(a, a + steps)[:, None]  # [K, C]
        ok = (origins >= batches.origin_lo) & (origins < batches.origin_hi)
        out[:, (origins[ok] - batches.origin_lo).numpy()] = q[:, ok].numpy()
    return out


def lstm_forecasts(trained: TrainedModels, demand: pa.Table, start: datetime, end: datetime,
                   rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The ``lstm`` and ``global`` forecasts issued at every bucket of ``[start, end)``.

    ``rows``: which of ``trained.user_ids`` (default all). Returns name -> quantiles
    ``[len(rows), n_origins, 6, 4, 7]`` in real units; origin ``k`` is issued at
    ``start + k·5 min`` from ``demand`` before it (and the training statistics).
    """
    rows = np.arange(len(trained.user_ids)) if rows is None else np.asarray(rows)
    own = _sub_model(trained.model, rows)
    glob = _sub_model(trained.model, rows)
    glob.copy_users_from(trained.global_model, torch.ones(len(rows), dtype=torch.bool))  # user buffers kept
    with torch.no_grad():  # ... but not the users' recalibration, fitted to their own models: the global model's
        for name in CALIBRATION_BUFFERS:
            getattr(glob, name).copy_(getattr(trained.global_model, name)[0])
    sub = dataclasses.replace(trained, user_ids=[trained.user_ids[i] for i in rows], model=own)
    batches = holdout_batches(sub, demand, start, end)  # origins: the bucket before start … end - 2
    return {LSTM: batch_quantiles(own, batches), GLOBAL: batch_quantiles(glob, batches)}


def lstm_zero_masses(trained: TrainedModels, rows: np.ndarray, quantiles: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """P(demand = 0) ``[len(rows), O, 6, 4]`` of :func:`lstm_forecasts`'s ``quantiles`` (same ``rows``),
    by each model's ``cal_zero`` (:func:`models.calibration.zero_mass`; the global model's for ``global``)."""
    rows = np.asarray(rows)
    own = trained.model.cal_zero[torch.from_numpy(rows)]
    glob = trained.global_model.cal_zero[:1].expand(len(rows), *own.shape[1:])
    return {name: zero_mass(torch.from_numpy(quantiles[name]), frac).numpy()
            for name, frac in ((LSTM, own), (GLOBAL, glob)) if name in quantiles}


def forecast_sample(n_users: int, n_origins: int, n_models: int, max_rows: int) -> tuple[np.ndarray, int]:
    """Which users' forecasts to keep, and an origin stride, so at most ``max_rows`` rows are kept.

    Each (user, origin) gives ``6 x 4`` rows per model. Users are spread evenly over the sorted
    users; when one user's forecasts alone exceed the budget, origins are thinned (every
    ``stride``-th origin of that one user).
    """
    if max_rows <= 0 or n_users == 0 or n_origins == 0:
        return np.zeros(0, dtype=np.int64), 1
    per_user = n_origins * N_HORIZONS * N_RESOURCES * n_models
    keep = min(n_users, max_rows // per_user)
    if keep >= 1:
        return np.unique(np.linspace(0, n_users - 1, keep).round().astype(np.int64)), 1
    return np.zeros(1, dtype=np.int64), math.ceil(per_user / max_rows)


def _forecast_rows(model: str, version: str | Sequence[str], user_ids: Sequence[str], issued: np.ndarray,
                   quantiles: np.ndarray, mean: np.ndarray, actual: np.ndarray, p_zero: np.ndarray | None = None) -> pa.Table:
    """Forecast rows of one model: ``quantiles [U, O, 6, 4, 7]``, ``mean``/``actual``/``p_zero [U, O, 6, 4]``
    (``p_zero`` None: a null column), ``issued`` int64 microseconds ``[O]``; ordered by user, origin, horizon, resource."""
    n_u, n_o = quantiles.shape[:2]
    per = N_HORIZONS * N_RESOURCES
    q = enforce_non_crossing(quantiles.reshape(-1, N_QUANTILES))
    user_idx = np.repeat(np.arange(n_u), n_o * per)
    issued_us = np.tile(np.repeat(issued, per), n_u)
    h_min = np.tile(np.repeat(np.asarray(HORIZONS_MIN, dtype=np.int16), N_RESOURCES), n_u * n_o)
    versions = [version] * n_u if isinstance(version, str) else list(version)
    ts_type = USER_FORECAST.field("issued_at").type
    cols = {
        "user_id": pa.array(list(user_ids), pa.string()).take(pa.array(user_idx)),
        "issued_at": pa.array(issued_us).cast(ts_type),
        "horizon_min": pa.array(h_min, pa.int16()),
        "target_start": pa.array(issued_us + (h_min.astype(np.int64) - 5) * 60_000_000).cast(ts_type),
        "resource": pa.array(list(DEMAND_RESOURCES), pa.string()).take(pa.array(np.tile(np.arange(N_RESOURCES), n_u * n_o * N_HORIZONS))),
    }
    for k, col in enumerate(QUANTILE_COLUMNS):
        cols[col] = pa.array(q[:, k])
    cols["mean"] = pa.array(np.maximum(mean.reshape(-1).astype(np.float64), 0.0))
    cols["model_version"] = pa.array(versions, pa.string()).take(pa.array(user_idx))
    cols["p_zero"] = (pa.nulls(len(user_idx), pa.float64()) if p_zero is None
                      else pa.array(np.clip(p_zero.reshape(-1).astype(np.float64), *zero_bounds(q))))
    table = pa.table(cols, schema=USER_FORECAST)
    validate_forecast_table(table)
    return table.append_column("model", pa.array([model] * table.num_rows, pa.string())).append_column(
        "actual", pa.array(actual.reshape(-1).astype(np.float64), from_pandas=True))


def _check_window(demand: pa.Table, config: BacktestConfig, until: datetime | None) -> tuple[datetime, datetime, datetime]:
    """(train start, holdout start, holdout end) for ``demand``; ``ValueError`` when the data cannot hold them."""
    if demand.num_rows == 0:
        raise ValueError("the demand table is empty: nothing to backtest")
    first = pc.min(demand["ts"]).as_py()
    end = until or _table_end(demand)
    n_hold = round(config.holdout_days * BUCKETS_PER_DAY)
    holdout_start = end - n_hold * BUCKET
    history_days = (holdout_start - first) / timedelta(days=1)
    tc = config.train
    need = tc.val_days + tc.min_history_days
    if history_days < need:
        have = (end - first) / timedelta(days=1)
        raise ValueError(
            f"a holdout of {config.holdout_days:g} day(s) leaves {max(history_days, 0):.2f} day(s) of the demand's {have:.2f} "
            f"before it ({first.isoformat()} – {end.isoformat()}); training needs at least {need:g} "
            f"(val_days {tc.val_days:g} + min_history_days {tc.min_history_days:g}): shorten --holdout-days or ingest more history")
    start = first if config.train_days is None else max(first, holdout_start - timedelta(days=config.train_days))
    if (holdout_start - start) / timedelta(days=1) < need:
        raise ValueError(f"train_days={config.train_days:g} is shorter than the {need:g} day(s) training needs")
    return start, holdout_start, end


def backtest(demand: pa.Table, config: BacktestConfig, until: datetime | None = None) -> BacktestResult:
    """Train on the demand before the holdout, forecast every origin in it with every model, score.

    ``demand``: the demand series (long format); ``until``: end of the holdout (default the end
    of the table's last bucket; on the 5-minute grid). Raises ``ValueError`` when the table is
    empty or too short for the holdout plus training.
    """
    train_start, holdout_start, end = _check_window(demand, config, until)
    ts_type = demand.schema.field("ts").type
    before = demand.filter(pc.less(demand["ts"], pa.scalar(holdout_start, ts_type)))
    if before.num_rows == 0:
        raise ValueError(f"no demand before the holdout start {holdout_start.isoformat()}")
    trained = train(before, since=train_start, until=holdout_start, config=config.train)
    return evaluate_backtest(trained, demand, holdout_start, end, config, train_start)


def evaluate_backtest(trained: TrainedModels, demand: pa.Table, holdout_start: datetime, end: datetime,
                      config: BacktestConfig, train_start: datetime | None = None) -> BacktestResult:
    """Score ``trained`` and the baselines at every origin of ``[holdout_start, end)`` (see the module docstring)."""
    if trained.until > holdout_start:
        raise ValueError(f"the models were trained on data until {trained.until.isoformat()}, after the holdout start "
                         f"{holdout_start.isoformat()}: they have seen the test window")
    users = list(trained.user_ids)
    grid_start = min(pc.min(demand["ts"]).as_py(), trained.since)
    dense = dense_demand(demand, grid_start, end, users=users)  # the baselines' view: all history
    o0 = (holdout_start - grid_start) // BUCKET
    origins = np.arange(o0, dense.n_steps)
    in_holdout = demand.filter(pc.greater_equal(demand["ts"], pa.scalar(holdout_start, demand.schema.field("ts").type)))
    new_users = sorted(set(pc.unique(in_holdout["user_id"]).to_pylist()) - set(users))
    keep, stride = forecast_sample(len(users), len(origins), len(MODELS), config.max_forecast_rows)
    kept_origins = np.arange(0, len(origins), stride)
    issued_us = ((holdout_start - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
                 + kept_origins.astype(np.int64) * int(BUCKET / timedelta(microseconds=1)))
    versions = {LSTM: [f"{LSTM}:backtest+global" if g else f"{LSTM}:backtest" for g in trained.uses_global],
                GLOBAL: f"{GLOBAL}:backtest"}
    scores: dict[str, ForecastScores] = {}
    parts: list[pa.Table] = []
    for u0 in range(0, len(users), config.chunk_users):
        rows = np.arange(u0, min(len(users), u0 + config.chunk_users))
        quantiles = lstm_forecasts(trained, demand, holdout_start, end, rows)
        zeros = lstm_zero_masses(trained, rows, quantiles)
        means = {name: quantile_mean(q, zeros[name]).astype(np.float32) for name, q in quantiles.items()}
        for method in METHODS:
            fc = forecast_baseline(dense.values[rows], method, origins, config.baselines)
            quantiles[method], means[method] = fc.quantiles, fc.point
            versions[method] = fc.model_version
        targets = forecast_targets(dense.values[rows], origins)
        mask = common_mask(targets, quantiles.values())
        for name in MODELS:
            s = score_forecast(quantiles[name], targets, mask, p_zero=zeros.get(name))
            scores[name] = scores[name] + s if name in scores else s
        sel = keep[(keep >= rows[0]) & (keep <= rows[-1])] - rows[0]
        if len(sel):
            ids = [users[rows[0] + i] for i in sel]
            for name in MODELS:
                v = versions[name]
                v = v if isinstance(v, str) else [v[rows[0] + i] for i in sel]
                p0 = zeros[name][sel][:, kept_origins] if name in zeros else None
                parts.append(_forecast_rows(name, v, ids, issued_us, quantiles[name][sel][:, kept_origins],
                                            means[name][sel][:, kept_origins], targets[sel][:, kept_origins], p0))
    table = backtest_table(scores, horizons_min=REPORT_HORIZONS)
    forecasts = pa.concat_tables(parts) if parts else _empty_forecasts()
    return BacktestResult(table, forecasts, trained, train_start or trained.since, holdout_start, end, len(origins), users,
                          new_users, [users[i] for i in keep], stride)


def _empty_forecasts() -> pa.Table:
    return USER_FORECAST.empty_table().append_column("model", pa.array([], pa.string())).append_column("actual", pa.array([], pa.float64()))


def lake_hours(lake: Location) -> tuple[datetime, datetime] | None:
    """Start of the first and end of the last ``date=…/hour=…`` partition of the lake's request
    logs (UTC); None when there are none."""
    root = lake.path("request_logs")
    dates = sorted(d for d in (posixpath.basename(p) for p in lake.list_dirs(root)) if d.startswith("date="))
    if not dates:
        return None

    def hours(date: str) -> list[int]:
        names = (posixpath.basename(p) for p in lake.list_dirs(posixpath.join(root, date)))
        return sorted(int(n[5:]) for n in names if n.startswith("hour=") and n[5:].isdigit())

    first_hours, last_hours = hours(dates[0]), hours(dates[-1])
    if not first_hours or not last_hours:
        return None
    day = lambda d: datetime.fromisoformat(d[5:]).replace(tzinfo=timezone.utc)  # noqa: E731
    return day(dates[0]) + timedelta(hours=first_hours[0]), day(dates[-1]) + timedelta(hours=last_hours[-1] + 1)


def backtest_lake(lake: Location, config: BacktestConfig, until: datetime | None = None) -> BacktestResult:
    """:func:`backtest` on the lake's demand series (all of it, or up to ``until``)."""
    span = lake_hours(lake)
    if span is None:
        raise ValueError(f"no request logs in {lake.uri}/request_logs: ingest first (warmcast ingest)")
    first, last = span
    stop = until or last
    since = first if config.train_days is None else max(first, stop - timedelta(days=config.train_days + config.holdout_days))
    demand = demand_from_lake(lake, since, stop)  # streamed: a batch of raw requests in memory at a time
    if demand.num_rows == 0:
        raise ValueError(f"no demand in {lake.uri} between {since.isoformat()} and {stop.isoformat()}: ingest first")
    return backtest(demand, config, until=until)


def write_backtest(result: BacktestResult, out: str) -> dict[str, str]:
    """Write ``metrics.json``, ``forecasts.parquet`` and ``table.txt`` into the local folder ``out``;
    returns their paths by name."""
    from pathlib import Path

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": str(folder / "metrics.json"), "forecasts": str(folder / "forecasts.parquet"), "table": str(folder / "table.txt")}
    Path(paths["metrics"]).write_text(json.dumps(result.metrics(), indent=1) + "\n")
    pq.write_table(result.forecasts, paths["forecasts"], compression="zstd")
    Path(paths["table"]).write_text(render(result) + "\n")
    return paths


def render(result: BacktestResult) -> str:
    """The printed report: the window, the backtest table and the LSTM against the best baseline."""
    from models.metrics import format_backtest_table

    cmp = result.comparison()
    lines = [
        f"backtest: trained on {result.train_start:%Y-%m-%d %H:%M} – {result.holdout_start:%Y-%m-%d %H:%M} UTC "
        f"(epochs global/per-user {result.trained.epochs_run[0]}/{result.trained.epochs_run[1]}); "
        f"holdout {result.holdout_start:%Y-%m-%d %H:%M} – {result.holdout_end:%Y-%m-%d %H:%M} UTC, "
        f"{result.n_origins} origins x {len(result.users)} users"
        + (f" ({len(result.new_users)} users first seen in the holdout not scored)" if result.new_users else ""),
        "",
        format_backtest_table(result.table),
        "",
        "lstm vs the best baseline (improvement = 1 - lstm / best pinball):",
        f"{'horizon':>7} {'resource':<10} {'lstm':>11} {'best baseline':<16} {'pinball':>11} {'improvement':>11}",
    ]
    for r in cmp.itertuples(index=False):
        lines.append(f"{r.horizon_min:>4} min {r.resource:<10} {r.pinball:>11.4g} {r.best_reference:<16} "
                     f"{r.best_pinball:>11.4g} {r.improvement:>+11.1%}")
    lines += ["", "calibration per level (cells with share(y < q) <= level <= share(y <= q)); cov counts every 0 under "
                  "q05 = 0 as covered, pit spreads it over [0, P(0)] (lstm, global: their p_zero; baselines: the highest "
                  "zero quantile's level):"]
    for r in calibration_bracket(result.table).itertuples(index=False):
        worst = f"worst miss {r.worst_miss:.3f} ({r.worst_cell})" if r.worst_cell else "every level inside"
        lines.append(f"  {r.model:<20} {r.inside:>3}/{r.cells:<3} {worst}")
    return "\n".join(lines)
