"""The ``warmcast`` command: the one place that reaches across packages.

Heavy packages are imported inside the subcommands that need them, so ``warmcast ingest``
never loads torch. Exit codes: 0 success, 1 a run failed its validation gate, 2 bad input or
configuration (the message names the problem; nothing was written), 3 ``warmcast scale`` found
another scaler run holding the lease (nothing was applied).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pipeline.config import ConfigError, Settings, load_settings
from pipeline.intervals import IntervalError, floor_to_slot, parse_time

log = logging.getLogger("warmcast")

#: Embedded defaults of ``warmcast demo``: a small synthetic platform.
DEMO_USERS = 60
DEMO_DAYS = 4.0  # two days of history before the one-day held-out tail, plus a day to spare
DEMO_START = "2026-11-02T00:00:00Z"  # a Monday
TRAIN_EPOCHS = 8
TRAIN_HIDDEN = 64  # models.train.TrainConfig.hidden (not imported here: it pulls in torch)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"lake": getattr(args, "lake", None), "landing": getattr(args, "landing", None)}
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _time(text: str) -> datetime:
    try:
        return parse_time(text)
    except IntervalError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _ingest_range(settings: Settings, start: datetime, end: datetime, run_hours: int, as_json: bool) -> int:
    """Ingest ``[start, end)`` as runs of at most ``run_hours``; each run is gated on its own."""
    from pipeline.ingest import ValidationGateError, ingest_interval

    failed = 0
    t = start
    while t < end:
        stop = min(end, t + timedelta(hours=run_hours))
        try:
            report = ingest_interval(settings, t, stop)
        except ValidationGateError as exc:
            report, failed = exc.report, failed + 1
            print(f"error: {exc}", file=sys.stderr)
        print(json.dumps(report.to_dict()) if as_json else report.summary())
        t = stop
    return 1 if failed else 0


def cmd_ingest(args: argparse.Namespace) -> int:
    settings = _settings(args)
    return _ingest_range(settings, args.start, args.end, args.run_hours, args.json)


def cmd_demand(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from pipeline.demand import demand_from_lake, summarize
    from pipeline.storage import location_from_settings

    settings = _settings(args)
    lake = location_from_settings(settings.lake, settings)
    demand = demand_from_lake(lake, args.since, args.until)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(demand, args.out, compression="zstd")
        print(f"wrote {demand.num_rows} rows to {args.out}")
    print(summarize(demand).render())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.generate import generate_landing
    from pipeline.storage import location_from_settings

    settings = load_settings(args.config)
    landing = location_from_settings(args.out, settings)
    summary = generate_landing(
        landing, users=args.users, days=args.days, start=args.start, seed=args.seed,
        fmt=args.format, gzip_files=args.gzip, target_rows=args.rows,
    )
    print(json.dumps(summary.to_dict(), default=str))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pipeline.storage import location_from_settings

    settings = load_settings(args.config)
    landing = location_from_settings(args.out, settings)
    if args.source == "azure-functions":
        from pipeline.importers.azure_functions import import_azure_functions

        summary = import_azure_functions(args.trace_dir, landing, seed=args.seed, start=args.start, fmt=args.format)
    else:
        from pipeline.importers.servegen import import_servegen

        summary = import_servegen(
            args.trace_dir, landing, seed=args.seed, start=args.start, fmt=args.format,
            max_rows_per_client=args.max_rows_per_client,
        )
    print(json.dumps(summary.to_dict(), default=str))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.persist import train_from_lake, user_metrics_summary
    from models.train import TrainConfig
    from pipeline.storage import location_from_settings

    settings = _settings(args)
    lake = location_from_settings(settings.lake, settings)
    config = TrainConfig(epochs=args.epochs, global_epochs=args.global_epochs, progress_bar=args.progress)
    version, trained = train_from_lake(lake, args.until, args.days, config)
    losses = user_metrics_summary(trained.metrics)
    print(f"model version {version}: {len(trained.user_ids)} users ({int(trained.uses_global.sum())} on the global model), "
          f"epochs (global, per-user) {trained.epochs_run}")
    print("held-out pinball loss (real units, mean over users/resources): "
          + ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if v is not None))
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from models.persist import forecast_from_lake
    from pipeline.storage import location_from_settings

    settings = _settings(args)
    lake = location_from_settings(settings.lake, settings)
    table = forecast_from_lake(lake, args.at)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out, compression="zstd")
    n_users = len(set(table.column("user_id").to_pylist()))
    print(f"wrote {table.num_rows} forecast rows for {n_users} users issued at {args.at.isoformat()} to {args.out}")
    return 0


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def cmd_status(args: argparse.Namespace) -> int:
    """Each stage's health as of ``--at`` (default now): exit 1 when a check fails (a monitoring probe)."""
    from pipeline.status import FAIL, pipeline_status

    status = pipeline_status(_settings(args), args.at)
    print(json.dumps(status.to_dict(), indent=1) if args.json else status.render())
    if args.prometheus:
        from pipeline.storage import open_location

        folder, name = os.path.split(os.path.abspath(args.prometheus))
        open_location(folder).write_bytes(os.path.join(folder, name), status.prometheus().encode())  # atomic: tmp + rename
    return 1 if status.state == FAIL else 0


def cmd_shadow(args: argparse.Namespace) -> int:
    """warmcast's recorded proposals against what the groups had, on the demand that came (scaler/shadow.py)."""
    from pipeline.forecast_store import ForecastStore
    from pipeline.storage import location_from_settings
    from scaler.fleet import load_fleet
    from scaler.shadow import shadow_from_store

    settings = _settings(args)
    if args.until <= args.since:
        raise ValueError(f"--until {args.until.isoformat()} is not after --since {args.since.isoformat()}")
    for name, t in (("--since", args.since), ("--until", args.until)):
        if t.timestamp() % 300:
            raise ValueError(f"{name} {t.isoformat()} is not on the 5-minute grid")
    fleet = load_fleet(args.fleet or settings.scaler.fleet)
    store = ForecastStore(settings.store_url)  # read only: no table is created
    report = shadow_from_store(store, location_from_settings(settings.lake, settings), args.since, args.until, fleet)
    if report is None:
        print(f"error: no scaling decisions recorded in [{args.since.isoformat()}, {args.until.isoformat()}) "
              f"in {store.display_url}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.render())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The model store: list, show, verify and promote (roll back) versions; export / import one user."""
    from models import persist
    from models.store import CorruptModelError, ModelStore, ModelStoreError
    from pipeline.storage import location_from_settings

    settings = _settings(args)
    lake = location_from_settings(settings.lake, settings)
    users = ModelStore(lake, persist.USERS)
    cmd, target = args.models_command, args.target
    needs = {"promote": "a version", "export-user": "a user id", "import-user": "an exported file"}
    if cmd in needs and not target:
        print(f"error: warmcast models {cmd} needs {needs[cmd]}", file=sys.stderr)
        return 2
    if cmd == "export-user" and not args.out:
        print("error: warmcast models export-user needs --out FILE", file=sys.stderr)
        return 2
    try:
        if cmd == "list":
            rows = persist.describe_versions(lake)
            if args.json:
                for row in rows:
                    print(json.dumps(row))
                return 0
            if not rows:
                print(f"no model version in {lake.uri}/models: run `warmcast train` or the train_user_models DAG")
                return 0
            print(f"  {'version':<30} {'trained on':<33} {'users':>6} {'on global':>9} {'pinball':>8} {'last val':>8}  from")
            for r in rows:
                if "error" in r:
                    print(f"{'*' if r['latest'] else ' '} {r['version']:<30} error: {r['error']}")
                    continue
                span = f"{(r['trained_from'] or '-')[:16]} – {(r['trained_until'] or '-')[:16]}"
                lineage = (f"import of {r['imported_user']!r} into {r['base_version']}" if r["imported_user"] is not None
                           else f"fine-tuned {r['fine_tuned_from']}" if r["fine_tuned_from"] else "")
                note = "" if r["global"] else "  (no global entry: cannot forecast)"
                print(f"{'*' if r['latest'] else ' '} {r['version']:<30} {span:<33} {_fmt(r['users']):>6} {r['users_on_global']:>9} "
                      f"{_fmt(r['pinball'], '.4f'):>8} {_fmt(r['last_value_pinball'], '.4f'):>8}  {lineage}{note}")
            print("* latest; on global: users forecast by the global model (too little history); pinball: mean held-out "
                  "pinball loss in real units (last val: the last-value baseline's on the same points)")
            return 0
        if cmd == "show":
            version = target or users.latest_version()
            if version is None:
                raise ModelStoreError(f"no model version in {lake.uri}/models")
            print(json.dumps(users.metadata(version), indent=2, default=str))
            return 0
        if cmd == "verify":
            versions = users.versions() if args.all else [target or users.latest_version()]
            if versions == [None]:
                raise ModelStoreError(f"no model version in {lake.uri}/models")
            bad = 0
            for v in versions:
                try:
                    info = persist.verify_version(lake, v)
                except CorruptModelError as exc:
                    bad += 1
                    print(f"CORRUPT {v}: {exc}")
                    continue
                print(f"ok      {v}: {info['users']} users in {info['shards']} shards, {info['bytes']} bytes of weights, "
                      "every checksum matches")
            return 1 if bad else 0
        if cmd == "promote":
            target = persist.resolve_version(lake, target)
            previous = persist.promote_version(lake, target)
            print(f"latest: {previous} -> {target} (forecasts use it from the next cycle; the next training "
                  "fine-tunes from it)")
            return 0
        if cmd == "prune":
            if args.keep is None:
                print("error: warmcast models prune needs --keep N (the newest versions to keep)", file=sys.stderr)
                return 2
            gone = persist.prune_versions(lake, args.keep, dry_run=args.dry_run)
            verb = "would delete" if args.dry_run else "deleted"
            print(f"{verb} {len(gone)} version(s)" + "".join(f"\n  {v}" for v in gone))
            return 0
        if cmd == "export-user":
            blob = users.export_user(target, args.from_version)
            Path(args.out).write_bytes(blob)
            print(f"wrote user {target!r}'s parameters ({len(blob)} bytes) to {args.out}")
            return 0
        if cmd == "import-user":
            version = persist.import_user_params(lake, Path(target).read_bytes(), user_id=args.as_user,
                                                 base_version=args.base, set_latest=not args.no_latest)
            print(f"published model version {version}" + ("" if args.no_latest else " (now latest)"))
            return 0
    except CorruptModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ModelStoreError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    raise AssertionError(cmd)


def _aws_settings(settings: Settings, endpoint_url: str | None):
    from dataclasses import replace

    return replace(settings.aws, endpoint_url=endpoint_url) if endpoint_url else settings.aws


def cmd_scale(args: argparse.Namespace) -> int:
    """One scaling cycle: read a system forecast, plan every pool of the fleet, apply or dry-run.

    Unless it is a dry run, the cycle holds the scaler lease in the forecast store: a second run at
    the same time applies nothing and exits 3, naming the holder.
    """
    import pyarrow.parquet as pq

    from scaler.aws import RetryPolicy, is_backfill, make_clients, scale_cycle
    from scaler.fleet import load_fleet
    from scaler.policy import PlanOptions

    settings = load_settings(args.config)
    sc = settings.scaler
    fleet = load_fleet(args.fleet or sc.fleet)
    forecast = pq.read_table(args.forecast)
    now = args.now or datetime.now(timezone.utc)
    backfill = is_backfill(now, max_lag_s=sc.max_forecast_age_s)
    dry_run = args.dry_run or sc.dry_run or backfill
    clients = make_clients(_aws_settings(settings, args.endpoint_url))
    sub: dict = {}
    if fleet.subpools is not None and args.user_forecast:
        from scaler.subpools import top_software_configs

        requests = pq.read_table(args.requests) if args.requests else None
        sub = dict(subpools=fleet.subpools, user_forecast=pq.read_table(args.user_forecast), ec2=clients.ec2,
                   user_configs=top_software_configs(requests, fleet.subpools.policy.top_k,
                                                     start=now - timedelta(days=args.requests_days), end=now)
                   if requests is not None else {})
    lease = None
    if not dry_run:
        from pipeline.forecast_store import ForecastStore
        from scaler.lease import ScalerLease

        store = ForecastStore(args.store_url or settings.store_url)
        store.create_schema()
        lease = ScalerLease(store)
    from scaler.lease import LeaseHeldError, LeaseLostError

    try:
        plan, report = scale_cycle(
            clients.autoscaling, fleet.policy_pools(), forecast, now, dry_run=dry_run,
            options=PlanOptions(sc.max_forecast_age_s, sc.upper_shading, on_bad_forecast=args.on_bad_forecast),
            max_workers=sc.apply_workers, lease=lease,
            retry=RetryPolicy(sc.retry_attempts, sc.retry_base_delay_s, sc.retry_max_delay_s), **sub,
        )
    except (LeaseHeldError, LeaseLostError) as exc:
        print(f"not applied: {exc}", file=sys.stderr)
        return 3
    if backfill and not args.dry_run:
        print(f"note: {now.isoformat()} is in the past: a historical run records decisions and never touches AWS")
    print(report.render())
    if args.decisions_out:
        Path(args.decisions_out).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(report.table(), args.decisions_out)
    return 1 if report.failed else 0


def cmd_aws(args: argparse.Namespace) -> int:
    from scaler.aws_bootstrap import iam_policy

    if args.aws_command == "iam-policy":
        print(json.dumps(iam_policy(), indent=2))
        return 0
    if args.aws_command == "local-endpoint":
        import time

        from scaler.local_endpoint import local_aws_endpoint

        with local_aws_endpoint(args.port) as url:
            print(f"local AWS endpoint on {url} (Ctrl-C stops it); use it with WARMCAST_AWS__ENDPOINT_URL={url}", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
    from scaler.aws import make_clients
    from scaler.aws_bootstrap import bootstrap
    from scaler.fleet import load_fleet

    settings = load_settings(args.config)
    fleet = load_fleet(args.fleet or settings.scaler.fleet)
    print(bootstrap(make_clients(_aws_settings(settings, args.endpoint_url)), fleet).render())
    return 0


def _forecast_store(settings: Settings, lake):
    """The forecast store of ``settings`` (schema created if missing); a SQLite file's folder is made."""
    from pipeline.forecast_store import ForecastStore

    if settings.store_url.startswith("sqlite:///"):
        Path(settings.store_url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    store = ForecastStore(settings.store_url, lake=lake)
    store.create_schema()
    return store


def cmd_backtest(args: argparse.Namespace) -> int:
    """Rolling-origin backtest: train before the lake's last ``--holdout-days``, forecast every origin in them."""
    from models.backtest import BacktestConfig, backtest_lake, render, write_backtest
    from models.train import TrainConfig
    from pipeline.storage import location_from_settings

    settings = _settings(args)
    lake = location_from_settings(settings.lake, settings)
    train = TrainConfig(epochs=args.epochs, global_epochs=args.global_epochs, hidden=args.hidden, val_days=args.val_days,
                        min_history_days=args.min_history_days, seed=args.seed, progress_bar=args.progress,
                        calibration_floor=args.calibration_floor)
    config = BacktestConfig(holdout_days=args.holdout_days, train_days=args.train_days, train=train,
                            max_forecast_rows=args.max_forecast_rows)
    result = backtest_lake(lake, config, until=args.until)
    paths = write_backtest(result, args.out)
    print(render(result))
    print(f"wrote {paths['metrics']}, {paths['table']} and {paths['forecasts']} ({result.forecasts.num_rows:,} forecast rows "
          f"of {len(result.forecast_users)} users)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Replay the demand through every scaling policy and write the evaluation report."""
    from pipeline.storage import location_from_settings
    from scaler.evaluate import LstmForecastConfig, run_evaluation

    settings = _settings(args)
    if args.source == "trace" and not args.trace:
        raise ValueError("--source trace needs --trace FOLDER (the landing folder `warmcast import` wrote)")
    if args.forecaster == "lstm" and args.source != "lake":
        raise ValueError("--forecaster lstm needs --source lake: the per-user LSTMs train on the lake's per-user demand")
    loc = location_from_settings(args.trace if args.source == "trace" else settings.lake, settings)
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip()) if args.policies else None
    lstm = LstmForecastConfig(epochs=args.epochs, global_epochs=args.global_epochs, val_days=args.val_days,
                              min_history_days=args.min_history_days, n_paths=args.n_paths, seed=args.lstm_seed)
    paths = run_evaluation(loc, args.source, args.out, since=args.since, until=args.until,
                           step_s=60.0 if args.step == "1min" else 300.0, policies=policies, vcpu=args.vcpu,
                           boot_s=args.boot_s, warmup_s=None if args.warmup_hours is None else args.warmup_hours * 3600,
                           forecaster=args.forecaster, lstm=lstm, warm_headroom=args.warm_headroom,
                           progress=lambda msg: print(msg, flush=True))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults: generate → ingest → demand → train → forecast → aggregate →
    scale (on a local AWS endpoint)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from pipeline.demand import demand_from_lake, summarize
    from pipeline.generate import USERS_FILE, generate_landing
    from pipeline.storage import location_from_settings

    settings = _settings(args)
    start = parse_time(DEMO_START)
    end = floor_to_slot(start + timedelta(days=args.days), settings.ingest.slot_minutes)
    landing = location_from_settings(settings.landing, settings)
    lake = location_from_settings(settings.lake, settings)
    print(f"[1/6] generating {args.users} synthetic users x {args.days:g} days into {settings.landing}")
    generated = generate_landing(landing, users=args.users, days=args.days, start=start, seed=args.seed)
    print(f"      {generated.rows:,} requests")
    print(f"[2/6] ingesting {start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC into {settings.lake}")
    rc = _ingest_range(settings, start, end, 24, False)
    print("[3/6] demand series")
    demand = demand_from_lake(lake, start, end)
    print(summarize(demand).render())
    if args.skip_models:
        return rc

    from models.persist import forecast_from_lake, train_from_lake, user_metrics_summary
    from models.train import TrainConfig
    from pipeline.aggregate import METHOD_RECONCILED, METHOD_TIERED, aggregate, residual_history, system_history

    # Hold out the last hour: train on data before it, forecast from its start.
    issued_at = end - timedelta(hours=1)
    print(f"[4/6] training one LSTM per user on {start:%Y-%m-%d} – {issued_at:%Y-%m-%d %H:%M} (global model warm start)")
    version, trained = train_from_lake(lake, issued_at, (issued_at - start).total_seconds() / 86400, TrainConfig(epochs=TRAIN_EPOCHS))
    losses = user_metrics_summary(trained.metrics)
    print(f"      version {version}; held-out pinball loss (real units): "
          + ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if v is not None))
    print(f"[5/6] forecasting from {issued_at:%Y-%m-%d %H:%M} and aggregating to a system forecast (90% band)")
    user_fc = forecast_from_lake(lake, issued_at)
    profiles = pacsv.read_csv(pa.BufferReader(landing.read_bytes(landing.path(USERS_FILE))))
    result = aggregate(user_fc, profiles=profiles, history=residual_history(demand, issued_at),
                       system=system_history(demand, issued_at))
    system = result.table()
    store = _forecast_store(settings, lake)
    store.write_user_forecasts(user_fc)
    store.write_system_forecast(system)
    print(f"      stored {user_fc.num_rows} user and {system.num_rows} system forecast rows in {store.display_url}")
    later = pc.greater_equal(demand["ts"], pa.scalar(issued_at, demand.schema.field("ts").type))
    actual = demand.filter(later).group_by("ts").aggregate([("cpu_cores", "sum")])
    actual_by_ts = {r["ts"]: r["cpu_cores_sum"] for r in actual.to_pylist()}
    rows = [r for r in system.to_pylist() if r["resource"] == "cpu_cores"]
    print(f"      {'horizon':>8} {'method':<20} {'lower':>9} {'mean':>9} {'upper':>9} {'actual':>9}   (system cpu cores)")
    for r in sorted(rows, key=lambda r: (r["horizon_min"], r["method"])):
        if r["horizon_min"] in (5, 15, 30):
            ts = issued_at + timedelta(minutes=r["horizon_min"] - 5)
            actual_v = actual_by_ts.get(ts)
            shown = f"{actual_v:9.1f}" if actual_v is not None else f"{'-':>9}"
            print(f"      {r['horizon_min']:>6}m  {r['method']:<20} {r['lower']:9.1f} {r['mean']:9.1f} {r['upper']:9.1f} {shown}")
    sized = METHOD_RECONCILED if result.reconciled is not None else METHOD_TIERED
    print(f"      the scaler sizes pools for the {sized!r} upper bound")
    if args.skip_scale:
        return rc
    return max(rc, _demo_scale(settings, issued_at))


def _demo_scale(settings: Settings, issued_at: datetime) -> int:
    """The demo's last step: the scaler's cycle for the forecast just stored, applied with real boto3
    calls to a local AWS endpoint (moto) where the fleet was bootstrapped first. The demo's data is
    from the past, so the cycle runs as at ``issued_at`` (on real AWS a forecast that old is never
    acted on); the decisions go to the forecast store like the pipeline's."""
    from dataclasses import replace

    try:
        from scaler.local_endpoint import LOCAL_CREDENTIALS, local_aws_endpoint

        import moto  # noqa: F401
    except ImportError:
        print("[6/6] scaling skipped: the local AWS endpoint needs moto (pip install -e '.[dev]')")
        return 0
    from pipeline.forecast_cycle import ScaleError, open_store, scale_issue
    from scaler.aws import describe_groups, make_clients
    from scaler.aws_bootstrap import bootstrap
    from scaler.aws_subpools import USER_TAG, describe_subpools
    from scaler.fleet import load_fleet

    fleet = load_fleet(settings.scaler.fleet)
    with local_aws_endpoint() as url:
        print(f"[6/6] scaling the fleet ({settings.scaler.fleet or 'scaler/fleet.example.toml'}) on a local AWS endpoint "
              f"(moto, {url}) as at {issued_at:%Y-%m-%d %H:%M} UTC")
        settings = replace(settings, aws=replace(settings.aws, endpoint_url=url))
        clients = make_clients(settings.aws, **LOCAL_CREDENTIALS)
        made = bootstrap(clients, fleet)
        created = sum(1 for kind, _, action in made.actions if kind == "group" and action == "created")
        print(f"      bootstrap: {created} Auto Scaling groups created with their warm pools and lifecycle hooks")
        try:
            summary = scale_issue(settings, issued_at, lambda: clients, wall_clock=issued_at)
        except ScaleError as exc:
            summary = {"error": str(exc)}
        groups = describe_groups(clients.autoscaling, [p.name for p in fleet.pools])
        subpools = describe_subpools(clients.autoscaling).snapshots
    store = open_store(settings)
    decisions = store.read_decisions(issued_at, issued_at + timedelta(seconds=1)).to_pylist()
    print(f"      {'pool':<29} {'kind':<7} {'current':>7} {'target':>6} {'applied':<7} reason")
    for d in decisions:
        print(f"      {d['pool']:<29} {d['pool_kind']:<7} {d['current']:>7} {d['target']:>6} "
              f"{'yes' if d['applied'] else 'no':<7} {d['reason']}")
    shared = "; ".join(f"{name} {g.desired}" + (f" (warm pool {g.warm.size(g.max_size, g.desired)})" if g.warm else "")
                       for name, g in sorted(groups.items()))
    users = ", ".join(sorted(g.tags.get(USER_TAG, "?") for g in subpools.values()))
    print(f"      desired capacity on the endpoint now: {shared}; user sub-pools: {len(subpools)}"
          + (f" ({users})" if users else ""))
    if "error" in summary:
        print(f"error: {summary['error']}", file=sys.stderr)
        return 1
    print(f"      {summary['applied']} of {summary['decisions']} decisions applied with {summary['calls']} mutating calls, "
          f"recorded in scaling_decisions ({store.display_url})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warmcast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", help="settings file (TOML or YAML); default $WARMCAST_CONFIG")
        p.set_defaults(func=func)
        return p

    p = add("ingest", cmd_ingest, "ingest [start, end) of raw request logs from the landing zone into the lake")
    p.add_argument("--landing", help="landing location (folder or s3://bucket/prefix)")
    p.add_argument("--lake", help="lake location (folder or s3://bucket/prefix)")
    p.add_argument("--start", type=_time, required=True, help="interval start, UTC ISO-8601 on the slot grid")
    p.add_argument("--end", type=_time, required=True, help="interval end (exclusive)")
    p.add_argument("--run-hours", type=int, default=24, help="split long ranges into runs of this many hours (default 24)")
    p.add_argument("--json", action="store_true", help="print each run's report as JSON")

    p = add("demand", cmd_demand, "build per-user 5-minute demand series from the lake and summarise them")
    p.add_argument("--lake", help="lake location")
    p.add_argument("--since", type=_time, help="first bucket (UTC ISO-8601)")
    p.add_argument("--until", type=_time, help="end of the last bucket (exclusive)")
    p.add_argument("--out", help="also write the series to this Parquet file")

    p = add("generate", cmd_generate, "write synthetic request logs (several user archetypes) to a landing location")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--days", type=float, default=1.0)
    p.add_argument("--start", type=_time, default=parse_time(DEMO_START))
    p.add_argument("--out", required=True, help="landing location to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("parquet", "csv", "jsonl"), default="parquet")
    p.add_argument("--gzip", action="store_true", help="gzip the files")
    p.add_argument("--rows", type=int, help="scale arrival rates to about this many rows")

    p = add("import", cmd_import, "turn a published production trace into request-log landing files")
    p.add_argument("source", choices=("azure-functions", "servegen"))
    p.add_argument("trace_dir", help="folder holding the trace files")
    p.add_argument("--out", required=True, help="landing location to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=_time, default=parse_time(DEMO_START), help="UTC time the trace's first minute maps to")
    p.add_argument("--format", choices=("parquet", "csv", "jsonl"), default="parquet")
    p.add_argument("--max-rows-per-client", type=int, help="servegen: cap rows per client")

    p = add("train", cmd_train, "train the per-user LSTMs (and the global model) on the lake's demand and publish a version")
    p.add_argument("--lake", help="lake location")
    p.add_argument("--until", type=_time, required=True, help="end of the training window (UTC, exclusive)")
    p.add_argument("--days", type=float, default=14.0, help="length of the training window (default 14)")
    p.add_argument("--epochs", type=int, default=TRAIN_EPOCHS, help="per-user epochs (an upper bound: users stop early)")
    p.add_argument("--global-epochs", type=int, default=5)
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")

    p = add("status", cmd_status, "is the pipeline keeping up? ingest lag and failed gates, quarantine share, the model "
                                  "served, the newest forecast, the last day's bands against actual demand, the newest "
                                  "scaling cycle (exit 1 when a check fails)")
    p.add_argument("--lake", help="lake location (default from settings)")
    p.add_argument("--at", type=_time, help="as of this UTC time (default now), e.g. to look at a back-filled day")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    p.add_argument("--prometheus", metavar="FILE", help="also write the checks as Prometheus gauges to FILE (replaced "
                                                        "atomically: for node_exporter's textfile collector, e.g. "
                                                        "/var/lib/node_exporter/textfile/warmcast.prom)")

    p = add("shadow", cmd_shadow, "shadow-mode report: warmcast's recorded proposals against the capacity the groups "
                                  "had, both scored on the demand that came (short buckets, shortfall, instance-hours, cost)")
    p.add_argument("--lake", help="lake location (default from settings)")
    p.add_argument("--since", type=_time, required=True, help="first bucket scored (UTC, on the 5-minute grid)")
    p.add_argument("--until", type=_time, required=True, help="end of the last bucket scored")
    p.add_argument("--fleet", help="fleet file with the pools' shapes and prices (default: [scaler] fleet)")
    p.add_argument("--json", action="store_true")

    p = add("models", cmd_models, "the model store: list, show, verify, promote (roll back), prune versions; export or import one user")
    p.add_argument("models_command", choices=("list", "show", "verify", "promote", "prune", "export-user", "import-user"))
    p.add_argument("target", nargs="?", help="show / verify / promote: a version (default latest; promote also takes "
                                             "'previous': the one published before latest); "
                                             "export-user: the user id; import-user: the exported file")
    p.add_argument("--lake", help="lake location")
    p.add_argument("--all", action="store_true", help="verify: every version")
    p.add_argument("--json", action="store_true", help="list: one JSON object per version")
    p.add_argument("--version", dest="from_version", metavar="VERSION", help="export-user: the version to export from (default latest)")
    p.add_argument("--out", help="export-user: file to write")
    p.add_argument("--as", dest="as_user", metavar="USER", help="import-user: the user id to import the parameters as")
    p.add_argument("--base", help="import-user: the version to import into (default latest)")
    p.add_argument("--no-latest", action="store_true", help="import-user: publish without moving latest")
    p.add_argument("--keep", type=int, metavar="N", help="prune: how many of the newest versions to keep (latest is always kept)")
    p.add_argument("--dry-run", action="store_true", help="prune: list what would be deleted, delete nothing")

    p = add("forecast", cmd_forecast, "per-user quantile forecasts issued at a time, from data before it")
    p.add_argument("--lake", help="lake location")
    p.add_argument("--at", type=_time, required=True, help="issue time (UTC, on the 5-minute grid)")
    p.add_argument("--out", required=True, help="Parquet file for the USER_FORECAST table")

    p = add("scale", cmd_scale, "one scaling cycle: size every pool of the fleet from a system forecast and apply it")
    p.add_argument("--forecast", required=True, help="system forecast Parquet file (SYSTEM_FORECAST contract)")
    p.add_argument("--fleet", help="fleet file (TOML/YAML); default: settings' scaler.fleet, else the example fleet")
    p.add_argument("--now", type=_time, help="decision time (default: now); a past time never touches AWS")
    p.add_argument("--dry-run", action="store_true", help="record decisions, call no mutating AWS API")
    p.add_argument("--endpoint-url", help="AWS endpoint (e.g. a local one from `warmcast aws local-endpoint`)")
    p.add_argument("--decisions-out", help="also write the decisions (SCALING_DECISION) to this Parquet file")
    p.add_argument("--user-forecast", help="per-user forecast Parquet (USER_FORECAST) for the fleet's [subpools]")
    p.add_argument("--requests", help="request log Parquet file or lake folder: each user's most-requested software")
    p.add_argument("--requests-days", type=float, default=7.0, help="days of requests before --now to count (default 7)")
    p.add_argument("--on-bad-forecast", choices=("reactive", "hold"), default="reactive",
                   help="when the forecast is missing or stale: reactive sizing, scale-out only (default), or hold")
    p.add_argument("--store-url", help="forecast store holding the scaler lease (default: settings' store_url)")

    p = add("aws", cmd_aws, "AWS set-up: bootstrap the fleet's groups, print the IAM policy, run a local endpoint")
    p.add_argument("aws_command", choices=("bootstrap", "iam-policy", "local-endpoint"))
    p.add_argument("--fleet", help="fleet file for bootstrap")
    p.add_argument("--endpoint-url", help="AWS endpoint for bootstrap")
    p.add_argument("--port", type=int, default=5000, help="local-endpoint: port on 127.0.0.1 (default 5000)")

    p = add("backtest", cmd_backtest, "rolling-origin backtest of the per-user LSTMs, the global model and the baselines on the lake")
    p.add_argument("--lake", help="lake location")
    p.add_argument("--holdout-days", type=float, required=True, help="test window: the last K days of the lake's demand")
    p.add_argument("--out", required=True, help="folder for metrics.json, table.txt and forecasts.parquet")
    p.add_argument("--until", type=_time, help="end of the test window (default: end of the lake's data)")
    p.add_argument("--train-days", type=float, help="training window before the test window (default: all history)")
    p.add_argument("--epochs", type=int, default=TRAIN_EPOCHS, help="per-user epochs (an upper bound: users stop early)")
    p.add_argument("--global-epochs", type=int, default=5)
    p.add_argument("--hidden", type=int, default=TRAIN_HIDDEN, help=f"LSTM hidden units (default {TRAIN_HIDDEN})")
    p.add_argument("--val-days", type=float, default=1.0, help="validation tail inside the training window (early stopping)")
    p.add_argument("--min-history-days", type=float, default=2.0, help="users with less history before the validation tail use the global model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-forecast-rows", type=int, default=1_000_000, help="bound on the forecast rows written (a sample of users)")
    p.add_argument("--calibration-floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit the recalibration's zero floor (idle users' low quantiles to 0; on by default)")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")

    p = add("evaluate", cmd_evaluate, "replay demand through reactive, predictive and warmcast scaling; write a report")
    p.add_argument("--lake", help="lake location (with --source lake)")
    p.add_argument("--source", choices=("lake", "trace"), default="lake",
                   help="lake: the lake's request logs; trace: Parquet landing files of `warmcast import` (no ingest)")
    p.add_argument("--trace", help="with --source trace: the landing folder `warmcast import` wrote")
    p.add_argument("--out", required=True, help="folder for report.md, report.html, summary.json and the PNGs")
    p.add_argument("--since", type=_time, help="start (UTC; default: the first hour with data)")
    p.add_argument("--until", type=_time, help="end, exclusive (default: the end of the last hour with data)")
    p.add_argument("--step", choices=("1min", "5min"), default="1min", help="replay step (default 1min)")
    p.add_argument("--policies", default=None, help="comma-separated subset (default all; reactive is always needed)")
    p.add_argument("--vcpu", type=float, help="vCPUs per instance (default: 16, smaller for small demand)")
    p.add_argument("--boot-s", type=float, default=300.0, help="instance boot time, seconds (default 300)")
    p.add_argument("--warmup-hours", type=float, help="unscored warm-up (default: 7 days, or half a shorter window)")
    p.add_argument("--forecaster", choices=("baseline", "lstm"), default="baseline",
                   help="baseline: warmcast from the last value of the system sum (default); lstm: also 'warmcast_lstm', "
                        "per-user LSTMs trained on the lake before the scored period, forecasting every 5-minute origin "
                        "of it from past data, aggregated (--source lake only)")
    p.add_argument("--epochs", type=int, default=TRAIN_EPOCHS, help="with --forecaster lstm: per-user epochs (an upper bound)")
    p.add_argument("--global-epochs", type=int, default=5, help="with --forecaster lstm: global-model epochs")
    p.add_argument("--val-days", type=float, help="with --forecaster lstm: validation tail of the training window "
                                                  "(default 1, or half a shorter window)")
    p.add_argument("--min-history-days", type=float, help="with --forecaster lstm: history a user needs for its own "
                                                          "model (default 2, or half of what the window leaves before the tail)")
    p.add_argument("--n-paths", type=int, default=1000, help="with --forecaster lstm: sample paths per origin (default 1000)")
    p.add_argument("--lstm-seed", type=int, default=0, help="with --forecaster lstm: seed of the training and the "
                                                            "aggregation's sample paths (default 0)")
    p.add_argument("--warm-headroom", type=float, default=0.0,
                   help="warmcast keeps a stopped warm pool of at least this share of its active target (default 0: "
                        "the forecast alone); adds 'reactive_warm', reactive tracking with the same warm pool")

    p = add("demo", cmd_demo, "the main job on embedded defaults: generate, ingest, demand, train, forecast, aggregate, "
                             "scale on a local AWS endpoint")
    p.add_argument("--landing", help="landing location (default var/landing)")
    p.add_argument("--lake", help="lake location (default var/lake)")
    p.add_argument("--users", type=int, default=DEMO_USERS)
    p.add_argument("--days", type=float, default=DEMO_DAYS)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--skip-models", action="store_true", help="stop after the demand summary (no training)")
    p.add_argument("--skip-scale", action="store_true", help="stop after the system forecast (no local AWS endpoint)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # Lightning logs its device banner at INFO through its own handlers
        # (its package logger is reset to INFO when Lightning is first imported, later, so the
        # module loggers that print the banner get their own level too)
        for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "pytorch_lightning.utilities.rank_zero",
                     "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # a third-party deprecation inside Lightning, printed once per fit: nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    try:
        return args.func(args)
    except (ConfigError, IntervalError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
