"""The fleet description: which pools exist, their instance shapes, policies and launch settings.

A small TOML or YAML file (``scaler/fleet.example.toml`` is the demo's) read by
:func:`load_fleet`. A ``[defaults]`` table is merged into every ``[[pools]]`` entry, whose keys
are flat::

    [defaults]
    image_id = "ami-12c6146b"
    availability_zones = ["us-east-1a"]
    mode = "forecast_only"

    [[pools]]
    name = "general"            # the Auto Scaling group's name
    instance_type = "m7i.xlarge"
    vcpu = 4                    # cores per instance
    memory_gb = 16              # GB per instance
    hourly_price_usd = 0.2016
    boot_s = 240                # launch to in service, seconds
    min_size = 1
    max_size = 40
    warm_max_size = 10

Keys are those of :class:`~scaler.policy.InstanceShape`, :class:`~scaler.policy.PoolPolicy` and
:class:`PoolConfig`; an unknown key is an error that names it.

An optional ``[subpools]`` table turns on user sub-pools (:mod:`scaler.subpools`); its flat keys
are those of :class:`~scaler.policy.InstanceShape`, :class:`~scaler.subpools.SubpoolPolicy` (but
``shape``) and :class:`SubpoolConfig` (launch settings). ``[defaults]`` does not apply to it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from scaler.policy import InstanceShape, Pool, PoolPolicy
from scaler.subpools import SubpoolPolicy

#: The demo fleet, used by ``warmcast aws bootstrap`` / ``warmcast scale`` when no file is named.
EXAMPLE_FLEET = Path(__file__).with_name("fleet.example.toml")

_SHAPE_KEYS = {f.name for f in dataclasses.fields(InstanceShape)}
_POLICY_KEYS = {f.name for f in dataclasses.fields(PoolPolicy)}
_SUBPOOL_POLICY_KEYS = {f.name for f in dataclasses.fields(SubpoolPolicy)} - {"shape"}


@dataclass(frozen=True)
class PoolConfig:
    """A pool plus what AWS needs to create it (used by :func:`scaler.aws_bootstrap.bootstrap`).

    ``preload_timeout_s``: heartbeat timeout of the launch lifecycle hook the instance's own
    bootstrap completes once its software configurations are loaded, seconds.
    ``drain_timeout_s``: heartbeat timeout of the terminating hook (the termination grace).
    """

    pool: Pool
    instance_type: str = "t3.micro"
    image_id: str = "ami-12c6146b"
    availability_zones: tuple[str, ...] = ("us-east-1a",)
    software_configs: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    preload_timeout_s: int = 900
    drain_timeout_s: int = 600

    @property
    def name(self) -> str:
        return self.pool.name

    @property
    def launch_template_name(self) -> str:
        """``warmcast-<pool>``; a name already in warmcast's namespace (a sub-pool's) is used as is."""
        name = self.pool.name
        return name if name.startswith("warmcast-") else f"warmcast-{name}"


@dataclass(frozen=True)
class SubpoolConfig:
    """User sub-pools: their policy plus what AWS needs to create one (see :class:`PoolConfig`)."""

    policy: SubpoolPolicy
    instance_type: str = "m7i.2xlarge"
    image_id: str = "ami-12c6146b"
    availability_zones: tuple[str, ...] = ("us-east-1a",)
    tags: dict[str, str] = field(default_factory=dict)
    preload_timeout_s: int = 900
    drain_timeout_s: int = 600

    def pool_config(self, group: str, software_configs: tuple[str, ...], tags: dict[str, str]) -> PoolConfig:
        """The sub-pool ``group`` as a :class:`PoolConfig` (launch template, hooks, user data)."""
        pol = self.policy
        pool = Pool(group, pol.shape, PoolPolicy(min_size=0, max_size=pol.max_size, mode=pol.mode))
        return PoolConfig(pool=pool, instance_type=self.instance_type, image_id=self.image_id,
                          availability_zones=self.availability_zones, software_configs=software_configs,
                          tags={**self.tags, **tags}, preload_timeout_s=self.preload_timeout_s,
                          drain_timeout_s=self.drain_timeout_s)


def subpool_config_from_dict(data: Mapping[str, Any]) -> SubpoolConfig:
    """Build the :class:`SubpoolConfig` of a fleet file's ``[subpools]`` table (flat keys)."""
    data = dict(data)
    launch_keys = {f.name for f in dataclasses.fields(SubpoolConfig)} - {"policy"}
    unknown = sorted(set(data) - _SHAPE_KEYS - _SUBPOOL_POLICY_KEYS - launch_keys)
    if unknown:
        raise ValueError(f"subpools: unknown key(s) {', '.join(unknown)}")
    try:
        shape = InstanceShape(**{k: float(v) for k, v in data.items() if k in _SHAPE_KEYS})
        policy = SubpoolPolicy(shape=shape, **{k: v for k, v in data.items() if k in _SUBPOOL_POLICY_KEYS})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"subpools: {exc}") from exc
    kwargs: dict[str, Any] = {k: data[k] for k in launch_keys if k in data}
    if "availability_zones" in kwargs:
        kwargs["availability_zones"] = tuple(kwargs["availability_zones"])
    if "tags" in kwargs:
        kwargs["tags"] = {str(k): str(v) for k, v in dict(kwargs["tags"]).items()}
    return SubpoolConfig(policy=policy, **kwargs)


@dataclass(frozen=True)
class FleetConfig:
    """All pools warmcast manages, and the user sub-pools' settings (None: no sub-pools)."""

    pools: tuple[PoolConfig, ...]
    subpools: SubpoolConfig | None = None

    def __post_init__(self) -> None:
        names = [p.name for p in self.pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"fleet: pool names must be unique, repeated: {', '.join(dupes)}")

    def policy_pools(self) -> list[Pool]:
        """The pools as :func:`scaler.policy.plan_pools` takes them."""
        return [p.pool for p in self.pools]


def pool_config_from_dict(data: Mapping[str, Any], where: str = "pool") -> PoolConfig:
    """Build one :class:`PoolConfig` from a flat mapping (the file's keys; see the module doc)."""
    data = dict(data)
    config_keys = {f.name for f in dataclasses.fields(PoolConfig)} - {"pool"}
    unknown = sorted(set(data) - _SHAPE_KEYS - _POLICY_KEYS - config_keys - {"name"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if "name" not in data:
        raise ValueError(f"{where}: 'name' is required")
    try:
        shape = InstanceShape(**{k: float(v) for k, v in data.items() if k in _SHAPE_KEYS})
        policy = PoolPolicy(**{k: v for k, v in data.items() if k in _POLICY_KEYS})
        pool = Pool(str(data["name"]), shape, policy)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} ({data.get('name')}): {exc}") from exc
    kwargs: dict[str, Any] = {k: data[k] for k in config_keys if k in data}
    for k in ("availability_zones", "software_configs"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    if "tags" in kwargs:
        kwargs["tags"] = {str(k): str(v) for k, v in dict(kwargs["tags"]).items()}
    return PoolConfig(pool=pool, **kwargs)


def fleet_from_dict(data: Mapping[str, Any]) -> FleetConfig:
    """Build a :class:`FleetConfig` from ``{"defaults": {...}, "pools": [{...}, ...]}``."""
    unknown = sorted(set(data) - {"defaults", "pools", "subpools"})
    if unknown:
        raise ValueError(f"fleet: unknown top-level key(s) {', '.join(unknown)} (known: defaults, pools, subpools)")
    defaults = dict(data.get("defaults") or {})
    pools = data.get("pools") or []
    if not pools:
        raise ValueError("fleet: no [[pools]] entries")
    sub = subpool_config_from_dict(data["subpools"]) if data.get("subpools") else None
    return FleetConfig(tuple(pool_config_from_dict({**defaults, **p}, f"pools[{i}]") for i, p in enumerate(pools)), sub)


def load_fleet(path: str | Path | None = None) -> FleetConfig:
    """Read a fleet file (TOML, or YAML by its ``.yaml``/``.yml`` suffix); default: the example."""
    path = Path(path) if path else EXAMPLE_FLEET
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = tomllib.loads(text)
    if not isinstance(data, Mapping):
        raise ValueError(f"fleet file {path} must hold a table")
    return fleet_from_dict(data)
