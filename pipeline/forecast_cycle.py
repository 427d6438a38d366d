"""One forecast-and-scale cycle, step by step: what the ``forecast_and_scale`` DAG's tasks call.

Every function takes the settings and the issue time ``at`` (the end of the run's data
interval, :func:`issue_time`) and reads only lake data from before ``at``, so a back-filled run
for an old logical date produces the forecast it would have produced then, and re-running a
step for the same ``at`` gives the same rows (the store upserts; files are replaced):

1. :func:`plan_issue` — the model version trained before ``at`` and the users to forecast, sharded;
2. :func:`forecast_shard` — one shard's per-user quantile forecasts, written to the lake as
   ``<lake>/forecasts/users/date=YYYY-MM-DD/<at>-shard-NNNNN.parquet`` (the forecast store's copy
   layout: the copy *is* the hand-off to the next step, so a database outage never loses it);
3. :func:`aggregate_issue` — the system forecast (:mod:`pipeline.aggregate`) of all shards, written
   to ``<lake>/forecasts/system/date=YYYY-MM-DD/<at>.parquet``;
4. :func:`store_issue` — both into the forecast store's database (SQLite by default, PostgreSQL in
   production); an unreachable database raises :class:`~pipeline.forecast_store.StoreUnavailableError`
   (the task retries; the Parquet copies are already written);
5. :func:`scale_issue` — :func:`scaler.aws.scale_cycle` on this issue's system forecast. A run whose
   ``at`` lies more than ``scaler.max_forecast_age_s`` before the wall clock (a back-fill, or a run
   that started too late), a run without a forecast of its own, and ``scaler.dry_run`` record their
   decisions as dry-run only and never call a mutating AWS API.

Like :mod:`pipeline.cli`, this module reaches across packages (``models`` for forecasting,
``scaler`` for scaling), importing them inside the functions that need them: ``pipeline`` itself
never depends on torch or boto3, and a DAG file that imports nothing heavy at parse time can
call these.
"""

from __future__ import annotations

import io
import logging
import posixpath
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import Settings
from pipeline.intervals import run_interval
from pipeline.schemas import BUCKET_SECONDS, HORIZONS_MIN, SYSTEM_FORECAST, USER_FORECAST, add_missing_nullable
from pipeline.storage import Location, location_from_settings, parquet_bytes

if TYPE_CHECKING:
    from pipeline.aggregate import AggregateConfig

log = logging.getLogger(__name__)

#: Written by :mod:`pipeline.generate` beside the landing data; the default profile source.
PROFILES_FILE = "_users.csv"


class ScaleError(RuntimeError):
    """A live scaling cycle failed for some pools (their decisions are recorded; the task retries)."""


def issue_time(logical_date: datetime | None, triggered_at: datetime | None, slot_minutes: int = 5) -> datetime:
    """The issue time of a run: the end of its data interval (:func:`pipeline.intervals.run_interval`)."""
    return run_interval(logical_date, triggered_at, slot_minutes)[1]


def _stamp(t: datetime) -> str:
    return f"{t.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


def user_forecast_path(lake: Location, at: datetime, shard: int) -> str:
    """Where shard ``shard`` of the user forecast issued at ``at`` is written."""
    return lake.path("forecasts", "users", f"date={at:%Y-%m-%d}", f"{_stamp(at)}-shard-{int(shard):05d}.parquet")


def system_forecast_path(lake: Location, at: datetime) -> str:
    """Where the system forecast issued at ``at`` is written."""
    return lake.path("forecasts", "system", f"date={at:%Y-%m-%d}", f"{_stamp(at)}.parquet")


def _lake(settings: Settings) -> Location:
    return location_from_settings(settings.lake, settings)


def _write_parquet(lake: Location, path: str, table: pa.Table) -> None:
    lake.write_bytes(path, parquet_bytes(table))


def _read_parquet(lake: Location, path: str, schema: pa.Schema) -> pa.Table:
    try:
        data = lake.read_bytes(path)
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"{lake.display(path)} is missing ({exc}); re-run the step that writes it") from exc
    return add_missing_nullable(pq.read_table(io.BytesIO(data)), schema).select(schema.names).cast(schema)


def plan_issue(settings: Settings, at: datetime) -> list[dict[str, Any]]:
    """Step 1: the shards to forecast, ``[{"shard": i, "users": [...], "version": model version or None}]``
    (at least one, possibly empty; at most ``forecast.max_shards``)."""
    from models.persist import plan_forecast

    fs = settings.forecast
    shards = plan_forecast(_lake(settings), at, fs.shard_size, fs.max_shards)
    n, version = sum(len(s["users"]) for s in shards), shards[0]["version"]
    if n == 0:
        log.warning("forecast at %s: no users (no model and no requests in the week before); nothing to forecast", at.isoformat())
    elif version is None:
        log.warning("forecast at %s: no model version trained before it; %d users get the %s fallback", at.isoformat(), n, fs.fallback)
    else:
        log.info("forecast at %s: model version %s, %d users in %d shards", at.isoformat(), version, n, len(shards))
    return shards


def forecast_shard(settings: Settings, at: datetime, shard: Mapping[str, Any]) -> dict[str, Any]:
    """Step 2: forecast one shard's users with the shard's model version and write the rows to the
    lake. Returns ``shard``, ``path`` (None for an empty shard), ``n_users``, ``rows`` and
    ``model_versions`` (``model_version`` → users; ``fallback:…`` flags users without a model)."""
    from models.persist import forecast_users

    lake = _lake(settings)
    table = forecast_users(lake, at, list(shard["users"]), shard["version"], settings.forecast.fallback)
    out: dict[str, Any] = {"shard": int(shard["shard"]), "path": None, "n_users": 0, "rows": table.num_rows, "model_versions": {}}
    if table.num_rows == 0:
        return out
    path = user_forecast_path(lake, at, int(shard["shard"]))
    _write_parquet(lake, path, table)
    per_user = dict(zip(table["user_id"].to_pylist(), table["model_version"].to_pylist()))
    versions: dict[str, int] = {}
    for v in per_user.values():
        versions[v] = versions.get(v, 0) + 1
    out.update(path=path, n_users=len(per_user), model_versions=versions)
    return out


def _read_user_forecasts(lake: Location, shards: Sequence[Mapping[str, Any]]) -> pa.Table:
    parts = [_read_parquet(lake, s["path"], USER_FORECAST) for s in shards if s and s.get("path")]
    return pa.concat_tables(parts) if parts else USER_FORECAST.empty_table()


def read_profiles(settings: Settings) -> pa.Table | None:
    """User profiles for the tier-weighted target: ``aggregate.profiles``, else ``<landing>/_users.csv``
    when it exists, else None (every user at the default tier level, weight 1)."""
    where = settings.aggregate.profiles
    if where:
        folder, name = posixpath.split(where.rstrip("/"))
        loc = location_from_settings(folder or ".", settings)
        return pacsv.read_csv(pa.BufferReader(loc.read_bytes(loc.path(name))))
    landing = location_from_settings(settings.landing, settings)
    path = landing.path(PROFILES_FILE)
    if not landing.exists(path):
        log.info("no user profiles (%s missing, aggregate.profiles unset): every user at the default tier", landing.display(path))
        return None
    return pacsv.read_csv(pa.BufferReader(landing.read_bytes(path)))


def aggregate_issue(settings: Settings, at: datetime, shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Step 3: the system forecast of every shard's users, written to the lake. Returns ``path``
    (None when there were no users: nothing is written), ``n_users``, ``rows`` and ``method``."""
    from pipeline.aggregate import AggregateConfig, aggregate, residual_history, system_history
    from pipeline.demand import demand_from_lake

    lake = _lake(settings)
    users = _read_user_forecasts(lake, shards)
    if users.num_rows == 0:
        log.warning("aggregate at %s: no user forecasts, so no system forecast (the scaler will hold)", at.isoformat())
        return {"path": None, "n_users": 0, "rows": 0, "method": None}
    agg = settings.aggregate
    history = totals = None
    if agg.method == "copula_sample" or agg.topdown:
        step = timedelta(seconds=BUCKET_SECONDS)
        demand = demand_from_lake(lake, at - (agg.history_buckets + 1) * step, at)  # read once for both
        if agg.method == "copula_sample":
            history = residual_history(demand, at, window=agg.history_buckets)
        if agg.topdown:
            totals = system_history(demand, at, window=agg.history_buckets)
    config = AggregateConfig(n_paths=agg.n_paths, level=agg.level, seed=agg.seed, reconcile=agg.reconcile,
                             reconcile_window=agg.history_buckets)
    past = _past_bounds(settings, at, config) if agg.topdown and agg.reconcile == "score" else None
    result = aggregate(users, profiles=read_profiles(settings), history=history, config=config, issued_at=at,
                       system=totals, past=past)
    system = result.table()
    path = system_forecast_path(lake, at)
    _write_parquet(lake, path, system)
    out = {"path": path, "n_users": result.n_users, "rows": system.num_rows, "method": result.method}
    if result.reconciled_from is not None:
        names, counts = np.unique(result.reconciled_from, return_counts=True)
        out["reconciled_from"] = {str(k): int(v) for k, v in zip(names, counts)}  # (horizon, resource) cells per candidate
        log.info("aggregate at %s: reconciled target from %s", at.isoformat(), out["reconciled_from"])
    return out


def _past_bounds(settings: Settings, at: datetime, config: "AggregateConfig") -> pa.Table | None:
    """The earlier issues' ``tiered_target`` and ``topdown_empirical`` rows the reconciled target's
    choice scores (the window and the six horizons before ``at``), from the forecast store; None
    (logged: the maximum of the two is used) when the store cannot be read."""
    from pipeline.aggregate import METHOD_TIERED, METHOD_TOPDOWN
    from pipeline.forecast_store import StoreUnavailableError

    since = at - (config.reconcile_window + len(HORIZONS_MIN)) * timedelta(seconds=BUCKET_SECONDS)
    try:
        store = open_store(settings)
        rows = store.read_system_forecasts(since, at)
    except StoreUnavailableError as exc:
        log.warning("aggregate at %s: the forecast store is unavailable (%s); the reconciled target is the maximum "
                    "of the bottom-up and top-down bounds this time", at.isoformat(), exc)
        return None
    return rows.filter(pc.is_in(rows["method"], pa.array([METHOD_TIERED, METHOD_TOPDOWN])))


def open_store(settings: Settings, lake: Location | None = None):
    """The forecast store of ``settings.store_url`` with its tables created (idempotent);
    ``lake``: where its Parquet copies go (None: none)."""
    from pipeline.forecast_store import ForecastStore

    store = ForecastStore(settings.store_url, lake=lake)
    store.create_schema()
    return store


def store_issue(settings: Settings, at: datetime, shards: Sequence[Mapping[str, Any]], system: Mapping[str, Any]) -> dict[str, Any]:
    """Step 4: upsert the issue's user and system forecasts into the store's database (their Parquet
    copies were written by steps 2 and 3). Raises ``StoreUnavailableError`` when it cannot connect."""
    lake = _lake(settings)
    users = _read_user_forecasts(lake, shards)
    store = open_store(settings)  # no lake: the copies exist already
    n_users = store.write_user_forecasts(users)
    n_system = store.write_system_forecast(_read_parquet(lake, system["path"], SYSTEM_FORECAST)) if system.get("path") else 0
    log.info("stored %d user and %d system forecast rows issued at %s in %s", n_users, n_system, at.isoformat(), store.display_url)
    return {"user_rows": n_users, "system_rows": n_system, "store": store.display_url}


#: Days of request logs before the issue time that rank each user's software configurations.
SUBPOOL_CONFIG_DAYS = 1.0
#: What :func:`scaler.subpools.software_config_usage` reads (not the request and program ids: on
#: a busy platform they are most of a day's bytes).
SUBPOOL_CONFIG_COLUMNS = ("user_id", "software_config", "ts", "cpu_cores", "duration_s")


def _subpool_inputs(settings: Settings, fleet: Any, store: Any, at: datetime, clients: Any) -> dict[str, Any]:
    """``scale_cycle``'s sub-pool arguments: this issue's user forecasts (from the store) and the
    most-requested software configurations of the users that have one (from the lake's logs,
    streamed: a day of a busy platform's requests is never in memory at once)."""
    users = store.read_user_forecasts(at)
    configs = software_configs_from_lake(_lake(settings), at - timedelta(days=SUBPOOL_CONFIG_DAYS), at, fleet.subpools.policy.top_k)
    return {"subpools": fleet.subpools, "user_forecast": users, "user_configs": configs, "ec2": clients.ec2}


def software_configs_from_lake(lake: Location, since: datetime, until: datetime, k: int) -> dict[str, tuple[str, ...]]:
    """:func:`scaler.subpools.top_software_configs` of the lake's requests in ``[since, until)``,
    streamed: each batch's usage per user and configuration (the ids read as their Parquet
    dictionaries), then the ranking of their sum."""
    from pipeline.demand import lake_batches
    from scaler.subpools import rank_software_configs, software_config_usage

    usage = [software_config_usage(pa.Table.from_batches([b]))
             for b in lake_batches(lake, since, until, SUBPOOL_CONFIG_COLUMNS, dictionary_columns=("user_id", "software_config"))
             if b.num_rows]
    return rank_software_configs(pa.concat_tables(usage), k) if usage else {}


def scale_issue(settings: Settings, at: datetime, make_clients: Callable[[], Any], *,
                wall_clock: datetime | None = None) -> dict[str, Any]:
    """Step 5: size the fleet's pools from the system forecast issued at ``at``; apply, or dry-run.

    ``make_clients``: returns :class:`scaler.aws.AwsClients` (inside Airflow,
    :func:`scaler.aws.clients_from_airflow`); called only here. Dry run (decisions recorded, no
    mutating call) when ``at`` is more than ``scaler.max_forecast_age_s`` before ``wall_clock``
    (default now), when no system forecast was issued at ``at``, or with ``scaler.dry_run``. A
    historical run that cannot even describe the groups records nothing and succeeds; a live
    run whose pools fail raises :class:`ScaleError` after recording every decision.

    A live run holds the scaler lease (:class:`scaler.lease.ScalerLease`) in the store: when another
    run (an overlapping DAG run, or a ``warmcast scale`` by hand) holds it, this one applies and
    records nothing and returns ``skipped`` naming the holder. When the fleet file has a
    ``[subpools]`` table, user sub-pools are sized from this issue's user forecasts and each user's
    most-requested software configurations over the last ``subpools_config_days`` (1 day) of logs.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from scaler.aws import RetryPolicy, is_backfill, scale_cycle
    from scaler.fleet import load_fleet
    from scaler.lease import LeaseHeldError, LeaseLostError, ScalerLease
    from scaler.policy import PlanOptions

    sc = settings.scaler
    wall_clock = wall_clock or datetime.now(timezone.utc)
    store = open_store(settings, _lake(settings))
    forecast = store.latest_system_forecast(at)
    own = forecast.num_rows > 0 and forecast["issued_at"][0].as_py() == at
    historical = is_backfill(at, max_lag_s=sc.max_forecast_age_s, wall_clock=wall_clock)
    why = []
    if historical:
        why.append(f"historical run: issue time {at.isoformat()} is {(wall_clock - at).total_seconds():.0f} s before now "
                   f"(more than scaler.max_forecast_age_s={sc.max_forecast_age_s:g}): a back-fill or a late run never touches AWS")
    if not own:
        why.append(f"no system forecast issued at {at.isoformat()} (no users, or nothing aggregated): nothing current to act on")
    if sc.dry_run:
        why.append("scaler.dry_run is set")
    dry_run = bool(why)
    if dry_run:
        log.warning("scale at %s: DRY RUN, decisions are recorded and no mutating AWS call is made: %s", at.isoformat(), "; ".join(why))
    fleet = load_fleet(sc.fleet)
    lease = None if dry_run else ScalerLease(store)
    try:
        clients = make_clients()
        sub = _subpool_inputs(settings, fleet, store, at, clients) if own and fleet.subpools is not None else {}
        plan, report = scale_cycle(
            clients.autoscaling, fleet.policy_pools(), forecast if own else None, at, dry_run=dry_run,
            options=PlanOptions(max_forecast_age_s=sc.max_forecast_age_s, upper_shading=sc.upper_shading),
            max_workers=sc.apply_workers, retry=RetryPolicy(sc.retry_attempts, sc.retry_base_delay_s, sc.retry_max_delay_s),
            lease=lease, **sub)
    except (LeaseHeldError, LeaseLostError) as exc:
        log.warning("scale at %s: SKIPPED, nothing applied or recorded: %s", at.isoformat(), exc)
        return {"dry_run": dry_run, "reasons": why, "decisions": 0, "applied": 0, "calls": 0, "failed": [],
                "skipped": str(exc)}
    except (BotoCoreError, ClientError) as exc:
        if not historical:
            raise
        log.warning("scale at %s: historical run could not describe the pools (%s); no decisions recorded", at.isoformat(), exc)
        return {"dry_run": True, "reasons": why, "decisions": 0, "applied": 0, "calls": 0, "failed": [], "error": str(exc)}
    decisions = report.table()
    store.write_decisions(decisions)
    applied = sum(1 for d in report.decisions if d["applied"])
    log.info("scale at %s (%s):\n%s", at.isoformat(), "dry run" if dry_run else "live", report.render())
    summary = {"dry_run": dry_run, "reasons": why, "decisions": decisions.num_rows, "applied": applied,
               "calls": report.calls, "failed": report.failed, "basis": getattr(plan, "basis", None)}
    if report.failed and not dry_run:
        raise ScaleError(f"scale at {at.isoformat()}: pools failed: {'; '.join(f'{p}: {report.outcomes[p].error}' for p in report.failed)}"
                         " (every decision is recorded; the task retries)")
    return summary
