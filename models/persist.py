"""Trained models to and from the model store, and the training / forecasting entry points the
``warmcast train`` and ``warmcast forecast`` commands call.

A version is two store entries with the same version id: ``users`` (the stacked per-user
weights, one row per user, with the training window, config and per-user summary in its
metadata) and ``global`` (the one-row global model that forecasts users without a model of
their own).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa

from models.contract import to_forecast_table
from models.module import StackedLSTM
from models.store import ModelStore
from models.train import TrainConfig, TrainedModels, UserMetrics, predict, train
from pipeline.demand import demand_from_lake
from pipeline.storage import Location

USERS, GLOBAL = "users", "global"
#: Context a forecast reads before its issue time: a week for the lag, plus the warm-up.
FORECAST_CONTEXT = timedelta(days=7, hours=9)


def _nanmean(a: np.ndarray) -> float | None:
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


def save_trained(lake: Location, trained: TrainedModels) -> str:
    """Publish ``trained`` (per-user and global weights, one version id); returns the version."""
    users, glob = ModelStore(lake, USERS), ModelStore(lake, GLOBAL)
    version = users.new_version()
    m = trained.metrics
    summary = {
        "pinball_real": _nanmean(m.pinball),
        "last_value_pinball_real": _nanmean(m.last_value_pinball),
        "global_pinball_real": _nanmean(m.global_pinball),
    }
    window = (trained.since, trained.until)
    glob.save(["global"], {k: v.detach() for k, v in trained.global_model.get_all().items()}, version=version,
              training_window=window, metrics=summary)
    users.save(trained.user_ids, {k: v.detach() for k, v in trained.model.get_all().items()}, version=version,
               training_window=window, metrics=summary,
               extra={"config": dataclasses.asdict(trained.config), "epochs_run": list(trained.epochs_run),
                      "uses_global": [u for u, g in zip(trained.user_ids, trained.uses_global) if g]})
    return version


def load_trained(lake: Location, version: str | None = None) -> tuple[str, TrainedModels] | None:
    """The latest (or given) version as :class:`TrainedModels`; None when nothing is published.

    Per-user metrics are not stored (only their summary), so ``metrics`` is None on a loaded model.
    """
    users, glob = ModelStore(lake, USERS), ModelStore(lake, GLOBAL)
    version = version or users.latest_version()
    if version is None:
        return None
    stored = users.load_version(version)
    stored_global = glob.load_version(version)
    meta = stored.metadata  # the store merges ``extra`` into the top level
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in meta.get("config", {}).items() if k in known})
    uses = set(meta.get("uses_global", []))
    window = meta["training_window"]
    since, until = datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"])
    trained = TrainedModels(
        user_ids=stored.user_ids, model=StackedLSTM.from_weights(stored.weights),
        global_model=StackedLSTM.from_weights(stored_global.weights),
        uses_global=np.array([u in uses for u in stored.user_ids]), since=since, until=until,
        metrics=None,  # type: ignore[arg-type]  # only the summary is stored
        config=config, epochs_run=tuple(meta.get("epochs_run", (0, 0))),
    )
    return version, trained


def train_from_lake(lake: Location, until: datetime, days: float, config: TrainConfig) -> tuple[str, TrainedModels]:
    """Train on ``[until - days, until)`` of the lake's demand, fine-tuning the latest version when
    there is one (daily retraining), and publish; returns (version, models)."""
    demand = demand_from_lake(lake, until - timedelta(days=days), until)
    if demand.num_rows == 0:
        raise ValueError(f"no demand in the lake before {until.isoformat()} (last {days:g} days): ingest first")
    previous = load_trained(lake)
    trained = train(demand, since=until - timedelta(days=days), until=until, config=config,
                    previous=previous[1] if previous else None)
    return save_trained(lake, trained), trained


def forecast_from_lake(lake: Location, at: datetime, version: str | None = None) -> pa.Table:
    """The per-user forecast table (``USER_FORECAST``) issued at ``at``, from lake data before ``at``.

    Users forecast by the global model (too little history, or no model of their own) carry
    ``model_version = "<version>+global"``.
    """
    loaded = load_trained(lake, version)
    if loaded is None:
        raise ValueError(f"no trained model in {lake.uri}/models: run `warmcast train` first")
    version, trained = loaded
    demand = demand_from_lake(lake, at - FORECAST_CONTEXT, at)
    fc = predict(trained, demand, at)
    versions = [f"lstm:{version}+global" if g else f"lstm:{version}" for g in fc.uses_global]
    return to_forecast_table(fc.user_ids, fc.issued_at, fc.quantiles, None, versions)


def user_metrics_summary(m: UserMetrics) -> dict[str, float | None]:
    """Mean held-out pinball loss (real units) of the trained models, the global model and last value."""
    return {"lstm": _nanmean(m.pinball), "global": _nanmean(m.global_pinball), "last_value": _nanmean(m.last_value_pinball)}
