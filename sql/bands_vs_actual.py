"""Forecast bands next to actual demand: the store's system forecasts joined with the lake's demand.

Usage (settings as everywhere: ``WARMCAST_*``, ``--config``-less): ``python sql/bands_vs_actual.py``
with ``DAY=2026-11-05T00:00:00+00:00`` (the day's issues), ``HORIZON=15`` (minutes) and
``METHOD=reconciled_target`` (the row the scaler sizes from; ``tiered_target`` the per-user forecasts'
target alone, ``copula_sample`` their 90 % band, ``topdown_empirical`` the system's own).
Prints the issues on the half hour and, for every issue of the day, how often the actual system
CPU demand of the target bucket fell inside ``[lower, upper]``.
"""

import os
from datetime import datetime, timedelta

from pipeline.config import load_settings
from pipeline.demand import demand_from_lake
from pipeline.forecast_store import ForecastStore
from pipeline.storage import location_from_settings

settings = load_settings()
day = datetime.fromisoformat(os.environ.get("DAY", "2026-11-05T00:00:00+00:00"))
horizon, method = int(os.environ.get("HORIZON", "15")), os.environ.get("METHOD", "reconciled_target")
forecasts = ForecastStore(settings.store_url).read_system_forecasts(day, day + timedelta(days=1), method=method)
demand = demand_from_lake(location_from_settings(settings.lake, settings), day, day + timedelta(days=1, minutes=30))
actual = {r["ts"]: r["cpu_cores_sum"] for r in demand.group_by("ts").aggregate([("cpu_cores", "sum")]).to_pylist()}
rows = [r for r in forecasts.to_pylist() if r["resource"] == "cpu_cores" and r["horizon_min"] == horizon]
inside = 0
print(f"system cpu_cores, {method}, {horizon}-minute horizon")
print(f"{'issued_at':<12} {'target bucket':<13} {'lower':>7} {'mean':>7} {'upper':>7} {'actual':>7}  users")
for r in rows:
    target = r["issued_at"] + timedelta(minutes=horizon - 5)
    value = actual.get(target, 0.0)
    inside += r["lower"] <= value <= r["upper"]
    if r["issued_at"].minute % 30 == 0:
        print(f"{r['issued_at']:%m-%d %H:%M}  {target:%H:%M}-{target + timedelta(minutes=5):%H:%M}   "
              f"{r['lower']:7.1f} {r['mean']:7.1f} {r['upper']:7.1f} {value:7.1f}  {r['n_users']}")
print(f"{len(rows)} issues on {day:%Y-%m-%d}; actual inside [lower, upper] in {inside} ({inside / max(len(rows), 1):.0%})")
