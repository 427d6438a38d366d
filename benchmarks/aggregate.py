"""Benchmark: one forecast-and-aggregate cycle for N users (default 10,000): forecast, aggregate, store.

Setup (not timed): synthetic demand ``[N, 2 days of 5-minute buckets, 4]`` with diurnal cycles
in 8 time zones, a platform-wide AR(1) shock (the cross-user dependence), per-user AR(1) noise
and idle buckets; tiers and weights from :func:`pipeline.generate.user_profiles`; an empty
SQLite file and lake folder.

Timed, once each, in order:

* ``forecast``  — the last-value baseline's quantiles (:func:`models.baselines.forecast_baseline`,
  empirical error quantiles over the history) and the USER_FORECAST table, with a ``p_zero`` (P(demand
  = 0)) in the middle of each row's bracket as the LSTM's forecasts carry one (the sample paths then
  place that mass at 0: more work than a table without it; ``--no-p-zero``: without);
* ``aggregate`` — residual ranks of the last day (one-step demand changes) and
  :func:`pipeline.aggregate.aggregate` with ``--paths`` joint sample paths (empirical copula, per
  resource), the naive sum and the tiered provisioning target;
* ``store``     — :class:`pipeline.forecast_store.ForecastStore` on SQLite: every user forecast row
  and the system forecast, each with its Parquet copy in the lake;
* ``baseline``  — the naive quantile sum (Σ q05, Σ q95 per horizon and resource) on the same table.

Prints one JSON line. Target: ``value`` (forecast + aggregate + store) <= 10 s on 2 cores.

    python benchmarks/aggregate.py               # 10,000 users, 1000 paths
    python benchmarks/aggregate.py --size 2000 --paths 500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.baselines import DAY, forecast_baseline  # noqa: E402
from models.contract import to_forecast_table  # noqa: E402
from pipeline.aggregate import AggregateConfig, ResidualHistory, aggregate  # noqa: E402
from pipeline.forecast_store import ForecastStore  # noqa: E402
from pipeline.schemas import zero_bounds  # noqa: E402
from pipeline.generate import user_profiles  # noqa: E402

ISSUED_AT = datetime(2026, 11, 2, 14, 0, tzinfo=timezone.utc)
TARGET_S = 10.0


def synthetic_demand(users: int, buckets: int, seed: int) -> np.ndarray:
    """``[users, buckets, 4]`` float32 demand: requests, cpu_cores, memory_gb, gpus per 5-minute bucket."""
    rng = np.random.default_rng(seed)
    t = np.arange(buckets)
    phase = rng.choice(8, users) / 8.0  # time zones
    diurnal = 1.0 + 0.7 * np.sin(2 * np.pi * (t[None, :] / DAY - phase[:, None]))
    shock = np.zeros(buckets)  # platform-wide: a release, an outage, a deadline
    idio = np.zeros((users, buckets), dtype=np.float32)
    eps, noise = rng.normal(0, 0.12, buckets), rng.normal(0, 0.35, (users, buckets)).astype(np.float32)
    for k in range(1, buckets):
        shock[k] = 0.9 * shock[k - 1] + eps[k]
        idio[:, k] = 0.7 * idio[:, k - 1] + noise[:, k]
    level = rng.lognormal(-0.5, 1.0, users)
    active = rng.random((users, buckets)) < rng.uniform(0.2, 1.0, users)[:, None]
    cpu = (level[:, None] * diurnal * np.exp(shock[None, :] + idio) * active).astype(np.float32)
    out = np.empty((users, buckets, 4), dtype=np.float32)
    out[..., 0] = rng.poisson(3.0 * cpu)
    out[..., 1] = cpu
    out[..., 2] = cpu * rng.choice([2.0, 4.0, 8.0], users)[:, None]
    out[..., 3] = np.where(rng.random(users)[:, None] < 0.05, np.round(cpu / 4.0), 0.0)
    return out


def naive_sum(table):
    """The baseline: Σ users' q05 / mean / q95 per horizon and resource (adding quantiles)."""
    return table.group_by(["horizon_min", "resource"]).aggregate([("q05", "sum"), ("mean", "sum"), ("q95", "sum")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=10_000, help="users")
    ap.add_argument("--paths", type=int, default=1000, help="joint sample paths")
    ap.add_argument("--days", type=float, default=2.0, help="history, days of 5-minute buckets")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-p-zero", action="store_true", help="a forecast table without p_zero (as the baselines write)")
    args = ap.parse_args()

    buckets = int(args.days * DAY)
    profiles = user_profiles(args.size, args.seed)
    ids = profiles["user_id"].to_pylist()
    values = synthetic_demand(args.size, buckets, args.seed)
    with tempfile.TemporaryDirectory(prefix="warmcast-bench-") as tmp:
        store = ForecastStore(f"sqlite:///{tmp}/warmcast.db", lake=f"{tmp}/lake")
        store.create_schema()

        t0 = time.perf_counter()
        fc = forecast_baseline(values, "last_value", origins=np.array([buckets]))
        p_zero = None if args.no_p_zero else np.mean(zero_bounds(fc.quantiles[:, 0]), axis=0)
        table = to_forecast_table(ids, ISSUED_AT, fc.quantiles[:, 0], fc.point[:, 0], fc.model_version, p_zero)
        t1 = time.perf_counter()
        history = ResidualHistory(ids, np.diff(values[:, buckets - DAY - 1 :], axis=1))
        agg = aggregate(table, profiles=profiles, history=history, config=AggregateConfig(n_paths=args.paths, seed=args.seed))
        system = agg.table()
        t2 = time.perf_counter()
        store.write_user_forecasts(table)
        store.write_system_forecast(system)
        t3 = time.perf_counter()
        naive = naive_sum(table)
        t4 = time.perf_counter()
        assert store.count("user_forecasts") == table.num_rows and store.count("system_forecasts") == system.num_rows
        assert np.allclose(np.sort(naive["q95_sum"].to_numpy()), np.sort(agg.naive_upper.ravel()), rtol=1e-6)

    forecast_s, aggregate_s, store_s, naive_s = t1 - t0, t2 - t1, t3 - t2, t4 - t3
    total = forecast_s + aggregate_s + store_s
    cpu = [1, 2]  # cpu_cores, memory_gb: the resources the pools are sized from
    width = (agg.naive_upper - agg.naive_lower)[:, cpu] / np.maximum(agg.upper - agg.lower, 1e-12)[:, cpu]
    print(json.dumps({
        "benchmark": "aggregate",
        "figure": "forecast_aggregate_store_s",
        "value": round(total, 3),
        "unit": "s",
        "users": args.size,
        "paths": args.paths,
        "p_zero": not args.no_p_zero,
        "history_buckets": buckets,
        "user_forecast_rows": table.num_rows,
        "system_rows": system.num_rows,
        "forecast_s": round(forecast_s, 3),
        "aggregate_s": round(aggregate_s, 3),
        "store_s": round(store_s, 3),
        "method": agg.method,
        "baseline": "naive quantile sum (Σ q05, Σ q95 per horizon and resource), same table",
        "baseline_s": round(naive_s, 4),
        "ratio_aggregate_over_baseline": round(aggregate_s / naive_s, 1),
        "naive_over_sampled_band_width_median": round(float(np.median(width)), 2),
        "diversification_median": round(float(np.median(agg.diversification[:, cpu])), 3),
        "target_s": TARGET_S,
        "meets_target": total <= TARGET_S,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }))


if __name__ == "__main__":
    main()
