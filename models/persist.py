"""Trained models to and from the model store, and the training / forecasting entry points the
``warmcast train`` / ``warmcast forecast`` commands and the Airflow DAGs call.

A version is two store entries with the same version id: ``users`` (the stacked per-user
weights, one row per user, with the training window, config and per-user summary in its
metadata) and ``global`` (the one-row global model that forecasts users without a model of
their own). ``global`` is published first, ``users`` last: the ``users`` manifest and its
``latest`` pointer are the commit point, so a reader never sees half a version.

Sharded training (the ``train_user_models`` DAG), three steps in separate processes:

1. :func:`plan_training` lists the users with demand in the window, shards them, trains the
   global model once (fine-tuned from the previous version's) and writes it, unpublished;
2. :func:`train_shard`, once per shard, trains that shard's users warm-started from their
   previous version (or the new global model) and writes one unpublished shard file;
3. :func:`publish_training` publishes the version (index, metadata, manifests, ``latest``).

Sharded forecasting (the ``forecast_and_scale`` DAG): :func:`plan_forecast` picks the version
trained before the issue time and the users to forecast; :func:`forecast_users` forecasts one
shard of them, with a baseline (``fallback:baseline:…``) when no version qualifies.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.contract import to_forecast_table
from models.features import BUCKET
from models.module import StackedLSTM
from models.store import CorruptModelError, ModelStore, ModelStoreError
from models.train import TrainConfig, TrainedModels, UserMetrics, context_buckets, forecast_windows, predict, train
from pipeline.demand import active_users, demand_from_lake
from pipeline.schemas import DEMAND, USER_FORECAST
from pipeline.storage import Location

log = logging.getLogger(__name__)

USERS, GLOBAL = "users", "global"
#: The context before a forecast's issue time: a week for the lag, plus the warm-up. A forecast
#: by the LSTMs reads only its windows in it (:func:`forecast_demand`); the baseline fallback and
#: the forecast plan (which users) read all of it.
FORECAST_CONTEXT = timedelta(days=7, hours=9)


_METRICS = {"pinball_real": "pinball", "last_value_pinball_real": "last_value_pinball", "global_pinball_real": "global_pinball"}


def _nanmean(a: np.ndarray) -> float | None:
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


def _metric_sums(m: UserMetrics, rows: slice | None = None) -> dict[str, list[float]]:
    """``{summary name: [sum, count]}`` of the finite per-user losses (of ``rows``): shards add up."""
    out = {}
    for name, attr in _METRICS.items():
        a = np.asarray(getattr(m, attr))[rows if rows is not None else slice(None)]
        finite = np.isfinite(a)
        out[name] = [float(a[finite].sum()), int(finite.sum())]
    return out


def _summary(sums: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, float | None]:
    """Mean over every shard's finite losses (the same as ``_nanmean`` over all users at once)."""
    out: dict[str, float | None] = {}
    for name in _METRICS:
        total, count = sum(s[name][0] for s in sums), sum(s[name][1] for s in sums)
        out[name] = total / count if count else None
    return out


def write_global(lake: Location, version: str, trained: TrainedModels) -> dict[str, Any]:
    """Write ``trained``'s global model as the (unpublished) ``global`` entry of ``version``; its ShardInfo."""
    weights = {k: v.detach() for k, v in trained.global_model.get_all().items()}
    return dataclasses.asdict(ModelStore(lake, GLOBAL).write_shard(version, 0, ["global"], weights))


def write_user_shard(lake: Location, version: str, shard: int, trained: TrainedModels, rows: slice | None = None) -> dict[str, Any]:
    """Write the per-user weights of ``trained`` (its ``rows``, default all) as shard ``shard`` of the
    unpublished ``users`` entry of ``version``. Returns what :func:`publish_version` needs (JSON-able)."""
    rows = rows or slice(None)
    users = trained.user_ids[rows]
    weights = {k: v.detach()[rows] for k, v in trained.model.get_all().items()}
    info = ModelStore(lake, USERS).write_shard(version, shard, users, weights)
    uses = [u for u, g in zip(users, trained.uses_global[rows]) if g]
    return {"info": dataclasses.asdict(info), "uses_global": uses, "epochs_run": list(trained.epochs_run),
            "metrics": _metric_sums(trained.metrics, rows) if trained.metrics is not None else {}}


def publish_version(lake: Location, version: str, global_info: Mapping[str, Any], shards: Sequence[Mapping[str, Any]],
                    window: tuple[datetime, datetime], config: TrainConfig, global_epochs: int | None = None,
                    fine_tuned_from: str | None = None) -> str:
    """Publish ``version``: the global entry first, then the users entry (the commit point), then ``latest``.

    ``shards``: :func:`write_user_shard` results; ``global_epochs``: epochs the global model ran
    (default: the shards' own count); ``fine_tuned_from``: the version training started from,
    recorded in the metadata. Returns the version.
    """
    summary = _summary([s["metrics"] for s in shards if s["metrics"]])
    epochs = [s["epochs_run"] for s in shards]
    epochs_run = [global_epochs if global_epochs is not None else max(e[0] for e in epochs), max(e[1] for e in epochs)]
    ModelStore(lake, GLOBAL).publish(version, [global_info], training_window=window, metrics=summary)
    ModelStore(lake, USERS).publish(version, [s["info"] for s in shards], training_window=window, metrics=summary,
                                    extra={"config": dataclasses.asdict(config), "epochs_run": epochs_run,
                                           "uses_global": sorted(u for s in shards for u in s["uses_global"]),
                                           "fine_tuned_from": fine_tuned_from})
    return version


def save_trained(lake: Location, trained: TrainedModels, shard_size: int = 1024, fine_tuned_from: str | None = None) -> str:
    """Publish ``trained`` (per-user and global weights, one version id); returns the version."""
    version = ModelStore.new_version()
    n = len(trained.user_ids)
    shards = [write_user_shard(lake, version, i, trained, slice(lo, lo + shard_size)) for i, lo in enumerate(range(0, n, shard_size))]
    return publish_version(lake, version, write_global(lake, version, trained), shards, (trained.since, trained.until), trained.config,
                           fine_tuned_from=fine_tuned_from)


def load_trained(lake: Location, version: str | None = None, user_ids: Sequence[str] | None = None) -> tuple[str, TrainedModels] | None:
    """The latest (or given) version as :class:`TrainedModels`; None when nothing is published.

    ``user_ids``: load only these users' rows (those the version has; only their shards are read).
    Per-user metrics are not stored (only their summary), so ``metrics`` is None on a loaded model.
    """
    users, glob = ModelStore(lake, USERS), ModelStore(lake, GLOBAL)
    version = version or users.latest_version()
    if version is None:
        return None
    stored = users.load_version(version, user_ids)
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
    return save_trained(lake, trained, fine_tuned_from=previous[0] if previous else None), trained


def _with_older(lake: Location, version: str, at: datetime) -> list[str]:
    """``version``, then every other version trained before ``at``, newest first: what a forecast at
    ``at`` falls back through when a file of one is corrupt."""
    return [version] + [v for v in ModelStore(lake, USERS).versions_trained_before(at) if v != version]


def load_for_forecast(lake: Location, version: str, at: datetime, user_ids: Sequence[str] | None = None) -> tuple[str, TrainedModels]:
    """``version`` loaded for a forecast issued at ``at`` (only ``user_ids``' rows, if given). When a
    file of it is corrupt or missing, the error is logged and the newest older version trained
    before ``at`` that loads is served instead (its id is in the forecasts' ``model_version``);
    :class:`~models.store.CorruptModelError` when none does."""
    try:
        loaded = load_trained(lake, version, user_ids)
        assert loaded is not None
        return loaded
    except CorruptModelError as exc:
        log.error("%s; serving the newest older model version trained before %s instead", exc, at.isoformat())
        error = exc
    for older in _with_older(lake, version, at)[1:]:
        try:
            loaded = load_trained(lake, older, user_ids)
        except ModelStoreError as exc:
            log.error("%s", exc)
            continue
        assert loaded is not None
        log.warning("forecast at %s served by model version %s (%s is corrupt)", at.isoformat(), older, version)
        return loaded
    raise error


def forecast_from_lake(lake: Location, at: datetime, version: str | None = None) -> pa.Table:
    """The per-user forecast table (``USER_FORECAST``) issued at ``at``, from lake data before ``at``,
    by ``version`` (default: the one trained before ``at`` that the pipeline would use,
    :meth:`ModelStore.version_trained_before`; an older one when a file of it is corrupt).

    Users forecast by the global model (too little history, or no model of their own) carry
    ``model_version = "<version>+global"``.
    """
    version = version or ModelStore(lake, USERS).version_trained_before(at)
    if version is None:
        raise ValueError(f"no model version in {lake.uri}/models was trained on data before {at.isoformat()}: "
                         "run `warmcast train` first (with --until at or before it)")
    version, trained = load_for_forecast(lake, version, at)
    fc = predict(trained, forecast_demand(lake, at, trained.config), at)
    versions = [f"lstm:{version}+global" if g else f"lstm:{version}" for g in fc.uses_global]
    return to_forecast_table(fc.user_ids, fc.issued_at, fc.quantiles, None, versions, fc.p_zero)


def user_metrics_summary(m: UserMetrics) -> dict[str, float | None]:
    """Mean held-out pinball loss (real units) of the trained models, the global model and last value."""
    return {"lstm": _nanmean(m.pinball), "global": _nanmean(m.global_pinball), "last_value": _nanmean(m.last_value_pinball)}


# ---- sharded training (the train_user_models DAG) ---------------------------------------------


class NoDemandError(ValueError):
    """The lake has no demand in the window a run needs."""


def shard_users(user_ids: Sequence[str], shard_size: int, max_shards: int) -> list[list[str]]:
    """``user_ids`` sorted and cut into shards of ``shard_size`` users, or into ``max_shards`` equal
    shards when that would take more tasks (the mapped-task bound); [] for no users."""
    users = sorted(set(user_ids))
    if not users:
        return []
    size = max(int(shard_size), math.ceil(len(users) / int(max_shards)))
    return [users[i : i + size] for i in range(0, len(users), size)]


def _demand(lake: Location, since: datetime, until: datetime, user_ids: Sequence[str] | None = None) -> pa.Table:
    """Demand buckets in ``[since, until)`` of ``user_ids`` (default everyone), from requests before ``until``."""
    return demand_from_lake(lake, since, until, users=None if user_ids is None else list(user_ids))


def forecast_demand(lake: Location, at: datetime, config: TrainConfig, user_ids: Sequence[str] | None = None) -> pa.Table:
    """The demand a forecast issued at ``at`` reads: the buckets of
    :func:`models.train.forecast_windows` (the warm-up and its day and week lags, ~7 % of the
    week before ``at``), of ``user_ids`` (default everyone), each window from the requests
    before its end (and the lookback before its start, for long requests).

    :func:`models.train.predict` starts a user's history at its first row, and a demand
    series has a row for every bucket from a user's first request to its last. So that the
    forecast is the one the whole context's demand gives, users with requests between the
    windows get one zero row where their history starts: at the context's start for users
    active before it and again after, else at the start of the gap of their first request
    (only the ``user_id`` column of the gaps is read; requests in the context's first
    5 minutes are not told apart from earlier ones).
    """
    windows = forecast_windows(at, config)
    users = None if user_ids is None else list(user_ids)
    parts = [_demand(lake, lo, hi, user_ids) for lo, hi in windows]
    context_start = at - context_buckets(config) * BUCKET

    def active(lo: datetime, hi: datetime) -> set[str]:
        return active_users(lake, lo, hi, users)

    in_windows = [set(pc.unique(p["user_id"]).to_pylist()) for p in parts]
    gaps = [active(windows[k - 1][1], windows[k][0]) for k in range(1, len(windows))]
    before = active(min(at - FORECAST_CONTEXT, context_start), windows[0][0])
    markers = [(u, context_start) for u in sorted(before & set().union(*in_windows, *gaps))]
    seen = set(u for u, _ in markers) | in_windows[0]
    for k, gap in enumerate(gaps, start=1):
        fresh = sorted(gap - seen)
        markers += [(u, windows[k - 1][1]) for u in fresh]
        seen |= set(fresh) | in_windows[k]
    if markers:
        zeros = {c: pa.array([0] * len(markers), DEMAND.field(c).type) for c in DEMAND.names if c not in ("user_id", "ts")}
        parts.append(pa.table({"user_id": [u for u, _ in markers], "ts": pa.array([t for _, t in markers], DEMAND.field("ts").type),
                               **zeros}, schema=DEMAND))
    return pa.concat_tables(parts)


def _previous_global(lake: Location, version: str | None) -> TrainedModels | None:
    """A :class:`TrainedModels` carrying only ``version``'s global model (None without a version):
    what :func:`models.train.train` needs to fine-tune the global model, without every user's weights."""
    if version is None:
        return None
    stored = ModelStore(lake, GLOBAL).load_version(version)
    return TrainedModels([], None, StackedLSTM.from_weights(stored.weights), np.zeros(0, bool),  # type: ignore[arg-type]
                         datetime.min, datetime.min, None, TrainConfig())  # type: ignore[arg-type]


def plan_training(lake: Location, until: datetime, days: float, config: TrainConfig, shard_size: int,
                  max_shards: int) -> list[dict[str, Any]]:
    """Step 1 of sharded training: users, shards, and the global model (trained here, once).

    The window is ``[until - days, until)``; the version fine-tuned from is the newest one trained
    on data strictly before ``until`` (so a re-run for the same date starts from the same point).
    Writes the global model as an unpublished entry of a fresh version. Returns one JSON-able dict
    per shard (what a mapped task receives): ``shard``, ``users``, and the run's ``version``,
    ``previous``, ``since``, ``until`` (ISO), ``global`` (its ShardInfo) and ``global_epochs``.
    """
    since = until - timedelta(days=days)
    demand = _demand(lake, since, until)
    if demand.num_rows == 0:
        raise NoDemandError(f"no demand in {lake.uri} in [{since.isoformat()}, {until.isoformat()}): ingest first")
    shards = shard_users(pc.unique(demand["user_id"]).to_pylist(), shard_size, max_shards)
    previous = ModelStore(lake, USERS).version_trained_before(until, strict=True)
    # The per-user stage is the shards' job: 0 epochs here (train() still sets up every user).
    trained = train(demand, since=since, until=until, config=dataclasses.replace(config, epochs=0),
                    previous=_previous_global(lake, previous))
    version = ModelStore.new_version()
    log.info("training version %s on [%s, %s): %d users in %d shards, fine-tuning %s", version, since.isoformat(),
             until.isoformat(), sum(map(len, shards)), len(shards), previous or "nothing (first version)")
    common = {"version": version, "previous": previous, "since": since.isoformat(), "until": until.isoformat(),
              "global": write_global(lake, version, trained), "global_epochs": trained.epochs_run[0]}
    return [{"shard": i, "users": users, **common} for i, users in enumerate(shards)]


def train_shard(lake: Location, shard: Mapping[str, Any], config: TrainConfig) -> dict[str, Any]:
    """Step 2: train one shard's users (warm-started from their previous version, else from the run's
    global model, which is not trained again) and write their weights as an unpublished shard."""
    version, users = shard["version"], list(shard["users"])
    since, until = datetime.fromisoformat(shard["since"]), datetime.fromisoformat(shard["until"])
    _, global_weights = ModelStore(lake, GLOBAL).read_shard(version, shard["global"])
    previous = load_trained(lake, shard["previous"], users) if shard["previous"] else None
    prev = previous[1] if previous else None
    start = TrainedModels(prev.user_ids if prev else [], prev.model if prev else None,  # type: ignore[arg-type]
                          StackedLSTM.from_weights(global_weights), np.zeros(0, bool), since, until, None, config)  # type: ignore[arg-type]
    demand = _demand(lake, since, until, users)
    trained = train(demand, since=since, until=until, config=dataclasses.replace(config, global_epochs=0), previous=start) \
        if demand.num_rows else None
    missing = sorted(set(users) - set(trained.user_ids if trained else []))
    if missing:  # the lake changed since planning: publishing without these users would drop them silently
        raise NoDemandError(f"version {version} shard {shard['shard']}: users without demand in the window: {missing[:10]}")
    return write_user_shard(lake, version, int(shard["shard"]), trained)


def publish_training(lake: Location, planned: Sequence[Mapping[str, Any]], shards: Sequence[Mapping[str, Any]],
                     config: TrainConfig, keep_versions: int | None = None) -> dict[str, Any]:
    """Step 3: check that the written shards hold exactly the planned users, then publish the version
    (the commit point). ``planned``: :func:`plan_training`'s shards; ``shards``: :func:`train_shard`'s results.
    ``keep_versions``: then delete all but that many newest versions (:func:`prune_versions`; the
    result's ``pruned``); a failure there is logged, not raised: the version is published, and a retry
    of the task would try to publish it again."""
    plan = planned[0]
    users = ModelStore(lake, USERS)
    want = {u for s in planned for u in s["users"]}
    got = [u for s in shards for u in users.read_shard(plan["version"], s["info"])[0]]
    if len(got) != len(set(got)) or set(got) != want:
        raise ValueError(f"version {plan['version']}: the shards hold {len(set(got))} users, the plan {len(want)}; "
                         "a shard is missing or repeated, nothing was published")
    window = (datetime.fromisoformat(plan["since"]), datetime.fromisoformat(plan["until"]))
    version = publish_version(lake, plan["version"], plan["global"], shards, window, config, plan["global_epochs"],
                              fine_tuned_from=plan["previous"])
    log.info("published model version %s: %d users in %d shards (fine-tuned from %s)", version, len(got), len(shards), plan["previous"])
    result = {"version": version, "n_users": len(got), "n_shards": len(shards), "fine_tuned_from": plan["previous"],
              "training_window": [plan["since"], plan["until"]]}
    if keep_versions:
        try:
            result["pruned"] = prune_versions(lake, keep_versions)
        except Exception as exc:  # noqa: BLE001 - the publish above stands whatever happens here
            log.warning("pruning model versions failed (version %s is published): %s", version, exc)
            result["pruned"] = None
    return result


# ---- operating the store (the `warmcast models` command) ---------------------------------------


def describe_versions(lake: Location) -> list[dict[str, Any]]:
    """One row per published version (``users`` entry), oldest first: its training window, users,
    users on the global model, held-out summary, lineage, whether ``latest`` names it and whether
    its ``global`` entry exists. A version whose manifest or metadata cannot be read has ``error``."""
    users, glob = ModelStore(lake, USERS), ModelStore(lake, GLOBAL)
    latest, with_global = users.latest_version(), set(glob.versions())
    rows = []
    for v in users.versions():
        row: dict[str, Any] = {"version": v, "latest": v == latest, "global": v in with_global}
        try:
            meta = users.metadata(v)
        except ModelStoreError as exc:
            rows.append(row | {"error": str(exc)})
            continue
        window = meta.get("training_window") or {}
        metrics = meta.get("metrics") or {}
        row |= {"created_at": meta.get("created_at"), "trained_from": window.get("start"), "trained_until": window.get("end"),
                "users": meta.get("n_users"), "users_on_global": len(meta.get("uses_global", [])), "shards": meta.get("n_shards"),
                "pinball": metrics.get("pinball_real"), "last_value_pinball": metrics.get("last_value_pinball_real"),
                "fine_tuned_from": meta.get("fine_tuned_from"), "base_version": meta.get("base_version"),
                "imported_user": (meta.get("imported_user") or {}).get("user_id"), "code_version": meta.get("code_version")}
        rows.append(row)
    return rows


def verify_version(lake: Location, version: str) -> dict[str, Any]:
    """Read every file of ``version`` in both entries and check it (:meth:`ModelStore.verify`);
    raises :class:`~models.store.ModelStoreError` (:class:`~models.store.CorruptModelError` for a
    bad file) naming the first problem."""
    out = ModelStore(lake, USERS).verify(version)
    ModelStore(lake, GLOBAL).verify(version)
    return out


#: ``promote_version``'s name for the version published before the current ``latest``.
PREVIOUS = "previous"


def resolve_version(lake: Location, wanted: str) -> str:
    """``wanted``, or for :data:`PREVIOUS` the newest version published before the current ``latest``."""
    if wanted != PREVIOUS:
        return wanted
    store = ModelStore(lake, USERS)
    versions, latest = store.versions(), store.latest_version()
    if latest not in versions or versions.index(latest) == 0:
        raise ModelStoreError(f"no version was published before latest ({latest}) in {lake.uri}/models: nothing to roll back to")
    return versions[versions.index(latest) - 1]


def promote_version(lake: Location, version: str) -> str | None:
    """Point ``latest`` at ``version`` (roll back or forward; :func:`resolve_version` names the one
    before latest) once every file of it checks out; the ``global`` pointer first, ``users`` (the
    commit point) last. Returns the previous latest.

    Forecasts then use it (:meth:`ModelStore.version_trained_before` prefers ``latest`` whenever
    its training window ends before the issue time), and the next daily training fine-tunes from
    it."""
    users, glob = ModelStore(lake, USERS), ModelStore(lake, GLOBAL)
    previous = users.latest_version()
    verify_version(lake, version)
    glob.set_latest(version)
    users.set_latest(version)
    log.warning("model version %s promoted to latest (was %s)", version, previous)
    return previous


def prune_versions(lake: Location, keep: int, dry_run: bool = False) -> list[str]:
    """Delete every published version but the ``keep`` newest (by publish time) and the one
    ``latest`` names, in both entries (``users`` first, so a reader never finds a users version
    without its global model). Unpublished folders (a training run in progress, or one that
    failed) are left alone. A back-fill issued before the oldest version kept was trained then
    falls back to the ``forecast.fallback`` baseline. Returns the versions deleted (or, with
    ``dry_run``, that would be)."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the newest version must be kept")
    users, glob = ModelStore(lake, USERS), ModelStore(lake, GLOBAL)
    versions = users.versions()
    kept = set(versions[-keep:]) | {users.latest_version(), glob.latest_version()}
    doomed = [v for v in versions if v not in kept]
    # global entries whose users entry was never published go too, if older than every version kept
    # (a newer one may belong to a publish in progress: global is published first)
    def created(store: ModelStore, v: str) -> str:
        try:
            return store.manifest(v)["created_at"]
        except ModelStoreError:  # unreadable: as old as can be (versions() lists it oldest too)
            return ""

    oldest_kept = min((created(users, v) for v in kept if v in versions), default="")
    doomed_global = [v for v in glob.versions() if v not in kept and (
        v in doomed or (v not in versions and created(glob, v) < oldest_kept))]
    if not dry_run:
        for v in doomed:
            users.delete_version(v)
        for v in doomed_global:  # with them, global entries whose users entry was never published
            glob.delete_version(v)
        if doomed or doomed_global:
            log.warning("pruned model versions %s (kept the %d newest and latest %s)", sorted(set(doomed) | set(doomed_global)),
                        keep, users.latest_version())
    return sorted(set(doomed) | set(doomed_global))


def import_user_params(lake: Location, blob: bytes, *, user_id: str | None = None, base_version: str | None = None,
                       set_latest: bool = True) -> str:
    """Publish a new version: ``base_version`` (default latest) with one user's parameters replaced
    or added from ``blob`` (:meth:`ModelStore.export_user` of this lake or another with the same
    hidden size); ``user_id`` renames the user. The new version carries the base's global model and
    training window, and the user is no longer flagged as forecast by the global model. Returns it."""
    users, glob = ModelStore(lake, USERS), ModelStore(lake, GLOBAL)
    base = base_version or users.latest_version()
    if base is None:
        raise ModelStoreError(f"no model version in {lake.uri}/models to import into: train one first")
    verify_version(lake, base)
    users.read_user_export(blob, base)  # refused before anything is written
    version = ModelStore.new_version()
    info = glob.manifest(base)["shards"][0]
    names, weights = glob.read_shard(base, info)
    glob_meta = glob.metadata(base)
    glob.publish(version, [glob.write_shard(version, 0, names, weights)], training_window=glob.training_window(base),
                 metrics=glob_meta.get("metrics"), extra={"base_version": base}, set_latest=False)

    def update(meta: dict, uid: str) -> dict[str, Any]:
        return {"uses_global": sorted(set(meta.get("uses_global", [])) - {uid})}

    users.import_user(blob, user_id=user_id, base_version=base, set_latest=False, version=version, update=update)
    if set_latest:
        glob.set_latest(version)
        users.set_latest(version)
    return version


# ---- sharded forecasting (the forecast_and_scale DAG) -----------------------------------------


class NoModelError(ValueError):
    """No model version was trained before the issue time and the fallback is ``fail``."""


def plan_forecast(lake: Location, at: datetime, shard_size: int, max_shards: int) -> list[dict[str, Any]]:
    """The shards of the forecast issued at ``at``: the users of the version trained on data before
    ``at`` plus every user with requests in the context window before ``at``, sharded, each shard
    naming that version (None: none is; the newest older one when its index is corrupt). Returns
    ``[{"shard": i, "users": [...], "version": ...}]``; always at least one shard (an empty one when
    there are no users)."""
    store = ModelStore(lake, USERS)
    version, users = store.version_trained_before(at), set()
    if version is not None:
        for candidate in _with_older(lake, version, at):
            try:
                users = set(store.read_index(candidate)["user_id"].to_pylist())
            except CorruptModelError as exc:  # the shard tasks fall back the same way for their files
                log.error("%s; planning with the newest older version trained before %s", exc, at.isoformat())
                continue
            version = candidate
            break
        else:
            version = None  # none intact: the shards forecast with the fallback baseline
    users |= active_users(lake, at - FORECAST_CONTEXT, at)
    shards = shard_users(users, shard_size, max_shards) or [[]]
    return [{"shard": i, "users": u, "version": version} for i, u in enumerate(shards)]


def baseline_forecast(demand: pa.Table, at: datetime, user_ids: Sequence[str], method: str) -> pa.Table:
    """``USER_FORECAST`` rows issued at ``at`` by baseline ``method`` from ``demand`` before ``at``,
    flagged ``model_version = "fallback:baseline:<method>"``."""
    from models.baselines import forecast_baseline
    from models.features import dense_demand

    dense = dense_demand(demand, at - FORECAST_CONTEXT, at, users=list(user_ids))
    fc = forecast_baseline(dense.values, method, origins=np.array([dense.values.shape[1]]))
    return to_forecast_table(dense.user_ids, at, fc.quantiles[:, 0], fc.point[:, 0], f"fallback:{fc.model_version}")


def forecast_users(lake: Location, at: datetime, user_ids: Sequence[str], version: str | None, fallback: str = "last_value") -> pa.Table:
    """``USER_FORECAST`` rows issued at ``at`` for ``user_ids``, from lake data before ``at`` only.

    ``version``: the model version (from :func:`plan_forecast`; users it lacks get the global model,
    ``lstm:<version>+global``). None: the ``fallback`` baseline for everyone, or :class:`NoModelError`
    when ``fallback == "fail"``. A corrupt version: the newest older one that loads
    (:func:`load_for_forecast`), else the ``fallback`` baseline (``fail``: the corruption error).
    """
    users = list(user_ids)
    if not users:
        return USER_FORECAST.empty_table()
    if version is None and fallback == "fail":
        raise NoModelError(f"no model version in {lake.uri}/models was trained before {at.isoformat()}: run the "
                           "train_user_models DAG (or `warmcast train`) first, or set forecast.fallback to a baseline")
    if version is None:  # the baseline's error quantiles need the whole context
        log.warning("no model version trained before %s: %d users forecast by the %s baseline", at.isoformat(), len(users), fallback)
        return baseline_forecast(_demand(lake, at - FORECAST_CONTEXT, at, users), at, users, fallback)
    try:
        version, trained = load_for_forecast(lake, version, at, users)
    except CorruptModelError:
        if fallback == "fail":
            raise
        log.error("no intact model version trained before %s: %d users forecast by the %s baseline", at.isoformat(), len(users), fallback)
        return baseline_forecast(_demand(lake, at - FORECAST_CONTEXT, at, users), at, users, fallback)
    fc = predict(trained, forecast_demand(lake, at, trained.config, users), at, users=users)
    versions = [f"lstm:{version}+global" if g else f"lstm:{version}" for g in fc.uses_global]
    return to_forecast_table(fc.user_ids, fc.issued_at, fc.quantiles, None, versions, fc.p_zero)
