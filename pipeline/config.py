"""The one settings object of warmcast, and its one loader.

Precedence (later wins): built-in defaults < a TOML or YAML file < ``WARMCAST_*`` environment
variables < explicit overrides (command-line flags).

The file is the path given to :func:`load_settings`, else ``$WARMCAST_CONFIG``, else none.
Top-level keys map to :class:`Settings` fields; the tables ``[ingest]``, ``[aws]``, ``[scaler]``,
``[train]``, ``[forecast]`` and ``[aggregate]`` map to :class:`IngestSettings`, :class:`AwsSettings`,
:class:`ScalerSettings`, :class:`TrainSettings`, :class:`ForecastSettings` and
:class:`AggregateSettings`. Environment variables use the same names, upper-cased, with ``__``
between a table and its key::

    WARMCAST_LAKE=s3://bucket/lake
    WARMCAST_INGEST__MAX_QUARANTINE_SHARE=0.1
    WARMCAST_AWS__ENDPOINT_URL=http://127.0.0.1:5000

Secrets (AWS keys, database passwords) are never settings fields: AWS credentials come from the
standard boto3 chain (or Airflow's ``aws_default`` connection); a password inside ``store_url``
is masked whenever settings are printed (see :meth:`Settings.redacted`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "WARMCAST_"


class ConfigError(ValueError):
    """A settings file or variable is missing, unreadable or has a bad value."""


@dataclass(frozen=True)
class IngestSettings:
    """How ingest checks and gates each data interval."""

    #: Lake slot length; an ingest interval must start and end on this grid.
    slot_minutes: int = 5
    #: Gate: the batch fails when more than this share of its rows is quarantined.
    max_quarantine_share: float = 0.05
    #: ...checked only for runs with at least this many rows (one bad row in a quiet
    #: 5-minute interval should land in quarantine, not page anyone).
    share_gate_min_rows: int = 200
    #: Gate: row-count bounds for one ingest run (0 allows empty intervals).
    min_rows: int = 0
    max_rows: int = 500_000_000
    #: Landing hours processed at once (memory grows with it: one landing hour each).
    threads: int = 2
    #: Rows sampled (seeded) into the Great Expectations batch.
    ge_sample_rows: int = 20_000
    #: Gate: the batch median request duration must lie in this range (seconds).
    median_duration_max_s: float = 6 * 3600.0
    #: Absurd-value bounds; a row above any of them is quarantined.
    max_duration_s: float = 7 * 24 * 3600.0
    max_cpu_cores: float = 1024.0
    max_memory_mb: float = 16.0 * 1024 * 1024
    max_gpus: float = 64.0

    def __post_init__(self) -> None:
        if self.slot_minutes < 1 or 60 % self.slot_minutes:
            raise ConfigError(f"ingest.slot_minutes={self.slot_minutes} must divide an hour (1, 5, 10, 15, 30 or 60)")
        if not 0.0 <= self.max_quarantine_share <= 1.0:
            raise ConfigError(f"ingest.max_quarantine_share={self.max_quarantine_share} must lie in [0, 1]")
        if self.threads < 1:
            raise ConfigError(f"ingest.threads={self.threads} must be at least 1")
        if self.ge_sample_rows < 1:
            raise ConfigError(f"ingest.ge_sample_rows={self.ge_sample_rows} must be at least 1")


@dataclass(frozen=True)
class AwsSettings:
    """Where AWS calls go. Credentials are not settings: boto3's chain provides them."""

    region: str = "us-east-1"
    #: A local endpoint (moto server, LocalStack) for demos; None means real AWS.
    endpoint_url: str | None = None
    #: Endpoint for the lake's S3 filesystem when it differs from ``endpoint_url``.
    s3_endpoint_url: str | None = None
    retry_mode: str = "standard"
    max_attempts: int = 8


@dataclass(frozen=True)
class ScalerSettings:
    """How ``warmcast scale`` sizes and applies (see :mod:`scaler.policy`, :mod:`scaler.aws`)."""

    #: Fleet file (TOML/YAML) describing the pools; None: the example fleet shipped with warmcast.
    fleet: str | None = None
    #: A forecast older than this is not acted on (the pools hold; the reason says why).
    max_forecast_age_s: float = 600.0
    #: 0 sizes for the forecast's upper bound; 1 for its mean (a cost preference).
    upper_shading: float = 0.0
    #: Record decisions without calling any mutating AWS API.
    dry_run: bool = False
    apply_workers: int = 8
    retry_attempts: int = 5
    retry_base_delay_s: float = 0.2
    retry_max_delay_s: float = 5.0
    #: Airflow connection the DAG's clients come from.
    aws_conn_id: str = "aws_default"

    def __post_init__(self) -> None:
        # The forecast_and_scale DAG also reads this as "how late a run may act on AWS": a run whose
        # logical date is further in the past is a back-fill (or stale) and only records decisions.
        if not self.max_forecast_age_s > 0:
            raise ConfigError(f"scaler.max_forecast_age_s={self.max_forecast_age_s} must be > 0 seconds")


#: Airflow's default ``[core] max_map_length``: no DAG maps more tasks than this.
MAX_MAPPED_TASKS = 1024
#: Fallbacks for users without a model version trained before the issue time: the baselines of
#: :mod:`models.baselines` (kept equal to ``models.baselines.METHODS`` by a test), or ``fail``.
FORECAST_FALLBACKS = ("last_value", "seasonal_daily", "seasonal_weekly", "moving_average", "fail")
#: Sampling methods of :mod:`pipeline.aggregate`: dependence from residual history, or none.
AGGREGATE_METHODS = ("copula_sample", "independent_sample")
#: How the reconciled target is chosen (:mod:`pipeline.aggregate`): by recent score, or always the maximum.
RECONCILE_MODES = ("score", "max")


def _check_shards(where: str, shard_size: int, max_shards: int) -> None:
    if shard_size < 1:
        raise ConfigError(f"{where}.shard_size={shard_size} must be at least 1")
    if not 1 <= max_shards <= MAX_MAPPED_TASKS:
        raise ConfigError(f"{where}.max_shards={max_shards} must lie in [1, {MAX_MAPPED_TASKS}] (Airflow's max_map_length)")


@dataclass(frozen=True)
class TrainSettings:
    """How the ``train_user_models`` DAG trains (see :mod:`models.train`)."""

    #: Training window: the days of demand before the run's logical date (held-out tail included).
    days: float = 14.0
    #: Per-user epochs (an upper bound: users stop early) and global-model epochs.
    epochs: int = 8
    global_epochs: int = 5
    #: Users per training task; raised when more than ``max_shards`` tasks would be needed.
    shard_size: int = 1024
    max_shards: int = MAX_MAPPED_TASKS
    #: CPU threads per training task (None: torch's default); 1 when many shards share a machine.
    threads: int | None = None
    #: The global model trains on a seeded sample of this many users (None: all of them).
    global_max_users: int | None = 1024
    #: LSTM units per user (models.train.TrainConfig.hidden): 64 forecasts better than 32 on
    #: ServeGen; 32 trains and forecasts ~1.5-2x faster.
    hidden: int = 64
    #: After each publish, delete all but this many newest model versions (None: keep every one).
    #: At hidden 64 a version takes ~140 kB per user (10k users: ~1.4 GB a day).
    keep_versions: int | None = None

    def __post_init__(self) -> None:
        if self.keep_versions is not None and self.keep_versions < 1:
            raise ConfigError(f"train.keep_versions={self.keep_versions} must be at least 1 (or unset: keep every version)")
        if not 1 <= self.hidden <= 1024:
            raise ConfigError(f"train.hidden={self.hidden} must lie in [1, 1024]")
        if self.global_max_users is not None and self.global_max_users < 1:
            raise ConfigError(f"train.global_max_users={self.global_max_users} must be at least 1 (or unset: all users)")
        if not 1.5 <= self.days <= 366:
            raise ConfigError(f"train.days={self.days} must lie in [1.5, 366] (a held-out day plus history)")
        if self.epochs < 0 or self.global_epochs < 0:
            raise ConfigError(f"train.epochs={self.epochs} and train.global_epochs={self.global_epochs} must be >= 0")
        _check_shards("train", self.shard_size, self.max_shards)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads={self.threads} must be at least 1 (or unset)")


@dataclass(frozen=True)
class ForecastSettings:
    """How the ``forecast_and_scale`` DAG forecasts users (see :mod:`models.persist`)."""

    #: Users per forecast task; raised when more than ``max_shards`` tasks would be needed.
    shard_size: int = 2048
    max_shards: int = 64
    #: Users get this baseline when no model version was trained before the issue time (the first
    #: days, or a back-fill older than every version); ``fail`` fails the run instead.
    fallback: str = "last_value"

    def __post_init__(self) -> None:
        _check_shards("forecast", self.shard_size, self.max_shards)
        if self.fallback not in FORECAST_FALLBACKS:
            raise ConfigError(f"forecast.fallback={self.fallback!r} must be one of {', '.join(FORECAST_FALLBACKS)}")


@dataclass(frozen=True)
class AggregateSettings:
    """How per-user forecasts become the system forecast (see :mod:`pipeline.aggregate`)."""

    #: Central band of the system forecast: lower/upper at (1 -/+ level)/2.
    level: float = 0.9
    #: Joint sample paths drawn per issue.
    n_paths: int = 1000
    #: ``copula_sample``: users' dependence from their recent residuals; ``independent_sample``: none.
    method: str = "copula_sample"
    #: 5-minute buckets of residual history the copula reads (288: one day); the top-down band reads
    #: the system's demand over the same buckets.
    history_buckets: int = 288
    #: add the top-down band of the system's own recent errors and size from the reconciled target
    #: (see ``reconcile`` and :mod:`pipeline.aggregate`); false: the tiered
    #: target alone (the per-user forecasts, summed).
    topdown: bool = True
    #: what the reconciled target sizes from, per horizon and resource: ``"score"`` — whichever of
    #: max(tiered, top-down), the top-down upper alone, the tiered target alone or their average had the lowest
    #: pinball loss over the ``history_buckets`` latest scored issues (read from the forecast
    #: store; the maximum until 24 are scored or when the store cannot be read); ``"max"`` —
    #: always the maximum.
    reconcile: str = "score"
    seed: int = 0
    #: User profiles (USER_PROFILE CSV: user_id, tier, weight, ...) for the tier-weighted target;
    #: None: ``<landing>/_users.csv`` when it exists (the generator writes it), else every user at
    #: the default tier level and weight 1.
    profiles: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"aggregate.level={self.level} must lie in (0, 1)")
        if not 2 <= self.n_paths <= 1_000_000:
            raise ConfigError(f"aggregate.n_paths={self.n_paths} must lie in [2, 1000000]")
        if self.method not in AGGREGATE_METHODS:
            raise ConfigError(f"aggregate.method={self.method!r} must be one of {', '.join(AGGREGATE_METHODS)}")
        if self.history_buckets < 2:
            raise ConfigError(f"aggregate.history_buckets={self.history_buckets} must be at least 2")
        if self.reconcile not in RECONCILE_MODES:
            raise ConfigError(f"aggregate.reconcile={self.reconcile!r} must be one of {', '.join(RECONCILE_MODES)}")


@dataclass(frozen=True)
class Settings:
    lake: str = "var/lake"
    landing: str = "var/landing"
    store_url: str = "sqlite:///var/warmcast.db"
    ingest: IngestSettings = field(default_factory=IngestSettings)
    aws: AwsSettings = field(default_factory=AwsSettings)
    scaler: ScalerSettings = field(default_factory=ScalerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    forecast: ForecastSettings = field(default_factory=ForecastSettings)
    aggregate: AggregateSettings = field(default_factory=AggregateSettings)

    def redacted(self) -> dict[str, Any]:
        """A printable dict with any password in ``store_url`` masked."""
        out = dataclasses.asdict(self)
        out["store_url"] = mask_url_password(self.store_url)
        return out


def mask_url_password(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # both parsers raise their own error types
        raise ConfigError(f"config file {path} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings, not {type(data).__name__}")
    return data


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a file or environment value to the field's declared type."""
    origin_args = typing.get_args(typ)
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        if type(None) in origin_args:
            return None
        raise ConfigError(f"{where} must not be empty")
    base = next((a for a in origin_args if a is not type(None)), typ) if origin_args else typ
    try:
        if base is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}={value!r} is not a valid {base.__name__}") from exc


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{name} must be a table")
            kwargs[name] = _build(typ, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, typ, f"{where}.{name}")
    return cls(**kwargs)


#: ``WARMCAST_*`` variables that are not settings: the config file's path, the folder of the
#: real traces, the native kernel's switch and build cache (models/native.py), and anything a
#: test run sets for itself (``WARMCAST_TEST_*``).
NOT_SETTINGS = ("CONFIG", "TRACE_DIR", "NATIVE", "NATIVE_CACHE")
NOT_SETTINGS_PREFIX = "TEST_"


def _env_tree(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :]
        if name in NOT_SETTINGS or name.startswith(NOT_SETTINGS_PREFIX):
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load settings: defaults < file < ``WARMCAST_*`` environment < ``overrides``.

    ``overrides`` uses the same nesting as the file (``{"ingest": {"slot_minutes": 5}}``);
    ``None`` values in it are ignored so unset CLI flags do not clobber the file.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        data = _read_file(Path(path))
    data = _merge(data, _env_tree(environ))
    data = _merge(data, overrides or {})
    return _build(Settings, data, "settings")
