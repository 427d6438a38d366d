"""Pool sizing policy: (system forecast, pool states, pools) -> :class:`Plan`. Pure: no I/O, no clock.

For every pool (DESIGN.md "Scaling"):

1. **Forecast.** The newest system forecast issued at or before ``now`` is read
   (:mod:`scaler.forecast_view`). Missing, stale, incomplete, NaN, infinite or negative: the plan's
   ``basis`` says what was done instead (``PlanOptions.on_bad_forecast``), and so does every reason:

   * ``reactive`` (default): AWS-target-tracking style sizing from what runs now,
     ``ceil(in_use / target_utilisation)``, *scale-out only* — without a forecast we know a lower
     bound of the need (the busy instances) but nothing about what comes, so capacity is added
     when utilisation passes the target and never removed on missing information;
   * ``hold``: every pool keeps its current size.

   Either way the warm pool holds, and the guards below still apply.
2. **Demand.** Per horizon h: ``upper − shading × (upper − mean)``, maximised over buckets up to h,
   minus what user sub-pools serve (``served``, :mod:`scaler.subpools`), never below 0.
3. **Active pool.** Capacity launched now is the pool's only capacity until the *next* decision's
   launches are in service, so the active pool is sized for the horizon whose bucket covers
   ``boot_s + decision_interval_s``. That demand is placed across all pools at least cost
   (:mod:`scaler.placement`), crediting the instances each pool keeps anyway (its minimum, and
   the instances busy now); the pool's share is what it *wants*.
4. **Warm pool.** Placement of the 30-minute demand, minus the active proposal, clamped to the
   warm pool's ``[warm_min_size, warm_max_size]``. Its state is ``Running`` only when the extra
   instances are predicted to be needed within the shape's resume time, else
   ``policy.idle_warm_state`` (Stopped, or Hibernated where the instance type supports it).
5. **Guards** (in this order; a later one wins): scale-out limited to ``max_step``; scale-in
   only past the hysteresis band, only after ``scale_in_grace_s`` since the last scale-out, and
   limited to ``max_step``; then clamped to ``[max(min_size, in_use), max_size]`` — bounds beat
   the step limit (an operator who moves the bounds wants them honoured now), and ``max_size``
   beats the instances-in-use floor (AWS cannot exceed it). Scale-out ignores hysteresis: a
   missing instance costs a cold start, an extra one only money.
6. **Rollout mode.** ``proposed`` is what the policy recommends and is recorded in every mode;
   ``target`` is what may be applied: ``forecast_only`` → current (shadow), ``scale_out_only``
   → ``max(current, proposed)``, ``scale`` → proposed.

User sub-pools (a dedicated pool per heavy user) are planned by :mod:`scaler.subpools`; the demand
they serve reaches :func:`plan_pools` as ``served`` so it is not provisioned twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Literal, Mapping, Sequence, get_args

import pyarrow as pa

from pipeline.schemas import HORIZONS_MIN, check_id
from scaler.forecast_view import ForecastDemand, demand_by_horizon, horizon_covering
from scaler.placement import RESOURCES, Placement, PlacementPool, ceil_count, place_demand

RolloutMode = Literal["forecast_only", "scale_out_only", "scale"]
#: What a plan was sized from: the forecast, reactive sizing (forecast unusable), or a hold.
PlanBasis = Literal["forecast", "reactive", "hold"]
BAD_FORECAST_FALLBACKS = ("reactive", "hold")
WarmPoolState = Literal["Running", "Stopped", "Hibernated"]
ROLLOUT_MODES: tuple[str, ...] = get_args(RolloutMode)
WARM_POOL_STATES: tuple[str, ...] = get_args(WarmPoolState)


@dataclass(frozen=True)
class InstanceShape:
    """One instance of a pool: ``vcpu`` cores, ``memory_gb`` GB, ``gpus``, ``hourly_price_usd``
    per instance-hour, ``boot_s`` seconds from launch to in service, ``resume_s`` seconds from a
    stopped warm-pool instance to in service."""

    vcpu: float
    memory_gb: float
    gpus: float = 0.0
    hourly_price_usd: float = 0.0
    boot_s: float = 300.0
    resume_s: float = 60.0

    def __post_init__(self) -> None:
        if not (self.vcpu > 0 and self.memory_gb > 0):
            raise ValueError(f"instance shape needs vcpu > 0 and memory_gb > 0, got {self.vcpu}, {self.memory_gb}")
        for name in ("gpus", "hourly_price_usd", "boot_s", "resume_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"instance shape {name}={v} must be finite and >= 0")


@dataclass(frozen=True)
class PoolPolicy:
    """How one pool may move. Sizes are instance counts; times are seconds.

    ``target_utilisation`` in (0, 1]: the share of each instance's resources demand may fill.
    ``hysteresis`` in [0, 1): scale-in happens only when it removes at least
    ``max(1, ceil(hysteresis × current))`` instances. ``upper_shading`` in [0, 1]: 0 sizes for the
    forecast's upper bound, 1 for its mean (a cost preference). ``warm_headroom`` >= 0: the warm
    pool holds at least this share of the active proposal (``ceil(warm_headroom × active)``, within
    ``warm_max_size``) beyond what the 30-minute forecast asks for: insurance against bursts no
    forecast saw coming, resumed in ``resume_s`` instead of booting in ``boot_s``, at the price of
    stopped instances (their volumes). 0 (default): the forecast alone sizes the warm pool.
    """

    min_size: int = 0
    max_size: int = 10
    max_step: int = 10
    target_utilisation: float = 0.7
    hysteresis: float = 0.1
    scale_in_grace_s: float = 900.0
    mode: RolloutMode = "forecast_only"
    warm_min_size: int = 0
    warm_max_size: int = 0
    idle_warm_state: WarmPoolState = "Stopped"
    warm_reuse_on_scale_in: bool = True
    warm_headroom: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.warm_headroom) and self.warm_headroom >= 0):
            raise ValueError(f"policy warm_headroom={self.warm_headroom} must be finite and >= 0")
        if not 0 <= self.min_size <= self.max_size:
            raise ValueError(f"policy needs 0 <= min_size <= max_size, got min {self.min_size} > max {self.max_size}"
                             if self.min_size > self.max_size else f"policy min_size={self.min_size} must be >= 0")
        if not 0 <= self.warm_min_size <= self.warm_max_size:
            raise ValueError(f"policy needs 0 <= warm_min_size <= warm_max_size, got {self.warm_min_size}, {self.warm_max_size}")
        if self.max_step < 1:
            raise ValueError(f"policy max_step={self.max_step} must be >= 1")
        if not 0 < self.target_utilisation <= 1:
            raise ValueError(f"policy target_utilisation={self.target_utilisation} must lie in (0, 1]")
        if not 0 <= self.hysteresis < 1:
            raise ValueError(f"policy hysteresis={self.hysteresis} must lie in [0, 1)")
        if not (math.isfinite(self.scale_in_grace_s) and self.scale_in_grace_s >= 0):
            raise ValueError(f"policy scale_in_grace_s={self.scale_in_grace_s} must be finite and >= 0")
        if self.mode not in ROLLOUT_MODES:
            raise ValueError(f"policy mode={self.mode!r} must be one of {', '.join(ROLLOUT_MODES)}")
        if self.idle_warm_state not in ("Stopped", "Hibernated"):
            raise ValueError(f"policy idle_warm_state={self.idle_warm_state!r} must be Stopped or Hibernated")


@dataclass(frozen=True)
class Pool:
    """A named pool (one Auto Scaling group): its instance shape and its policy."""

    name: str
    shape: InstanceShape
    policy: PoolPolicy = field(default_factory=PoolPolicy)

    def __post_init__(self) -> None:
        check_id(self.name, "pool name")


@dataclass(frozen=True)
class PoolState:
    """What a pool holds now (instance counts), as described from AWS.

    ``in_use``: instances busy running user work (never scaled in). ``warm_state``: None when the
    group has no warm pool. ``last_scale_out_at``: UTC time of the last scale-out, None if unknown.
    """

    desired: int
    in_service: int = 0
    in_use: int = 0
    warm_size: int = 0
    warm_state: WarmPoolState | None = None
    last_scale_out_at: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("desired", "in_service", "in_use", "warm_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"pool state {name}={getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class SizeChange:
    """One size decision: ``proposed`` is recorded in every mode; ``target`` may be applied."""

    current: int
    proposed: int
    target: int
    reason: str

    @property
    def changes(self) -> bool:
        return self.target != self.current


@dataclass(frozen=True)
class PoolPlan:
    """The plan for one pool: active and warm sizes, the warm pool's state, and why."""

    pool: str
    mode: RolloutMode
    active: SizeChange
    warm: SizeChange
    warm_state: WarmPoolState
    warm_state_current: WarmPoolState | None
    warm_reuse_on_scale_in: bool
    hourly_cost_usd: float  # active.target × the shape's hourly price


@dataclass(frozen=True)
class PlanOptions:
    """Plan-wide knobs. ``max_forecast_age_s``: older forecasts are stale (seconds).
    ``upper_shading`` in [0, 1]: 0 sizes for the upper bound, 1 for the mean.
    ``decision_interval_s``: seconds until the next scaling decision (the DAG runs every 5 min);
    the active pool covers ``boot_s + decision_interval_s``. ``on_bad_forecast``: ``reactive``
    or ``hold`` when the forecast cannot be used (module doc)."""

    max_forecast_age_s: float = 600.0
    upper_shading: float = 0.0
    decision_interval_s: float = 300.0
    on_bad_forecast: str = "reactive"

    def __post_init__(self) -> None:
        if not 0 <= self.upper_shading <= 1:
            raise ValueError(f"upper_shading={self.upper_shading} must lie in [0, 1]")
        if not (math.isfinite(self.decision_interval_s) and self.decision_interval_s >= 0):
            raise ValueError(f"decision_interval_s={self.decision_interval_s} must be finite and >= 0")
        if self.on_bad_forecast not in BAD_FORECAST_FALLBACKS:
            raise ValueError(f"on_bad_forecast={self.on_bad_forecast!r} must be one of {', '.join(BAD_FORECAST_FALLBACKS)}")


@dataclass(frozen=True)
class Plan:
    """Every pool's plan. ``held``: why the forecast was not used (None when it was).
    ``basis``: what the plan was sized from instead (forecast | reactive | hold).
    ``skipped``: pools with no state (their group is missing) and why. ``unmet``: demand
    (resource → amount at the 30-min horizon) that the pools' maximum sizes cannot cover.
    ``served``: demand per horizon subtracted because user sub-pools serve it. ``subpools``: the
    sub-pool plan (a :class:`scaler.subpools.SubpoolsPlan`) when one was made."""

    decided_at: datetime
    forecast_issued_at: datetime | None
    pools: tuple[PoolPlan, ...]
    held: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    unmet: dict[str, float] = field(default_factory=dict)
    basis: PlanBasis = "forecast"
    served: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    subpools: Any = None

    def by_pool(self) -> dict[str, PoolPlan]:
        return {p.pool: p for p in self.pools}


def guard_size(current: int, wanted: int, *, floor: int, ceiling: int, max_step: int, hysteresis: float,
               grace_left_s: float) -> tuple[int, list[str]]:
    """Apply step limit, hysteresis, scale-in grace and bounds to ``wanted``; returns (size, notes).

    Precedence: ``ceiling`` > ``floor`` > step/hysteresis/grace (see module doc).
    """
    notes: list[str] = []
    size = wanted
    if wanted > current and wanted - current > max_step:
        size = current + max_step
        notes.append(f"step-limited to +{max_step}")
    elif wanted < current:
        band = max(1, math.ceil(hysteresis * current - 1e-9))
        if current - wanted < band:
            size = current
            notes.append(f"scale-in of {current - wanted} within hysteresis band {band}")
        elif grace_left_s > 0:
            size = current
            notes.append(f"scale-in held: {grace_left_s:.0f} s of grace left since the last scale-out")
        elif current - wanted > max_step:
            size = current - max_step
            notes.append(f"step-limited to -{max_step}")
    bounded = min(max(size, floor), ceiling)
    if bounded > size:
        notes.append(f"raised to floor {floor} (min size / instances in use)")
    elif bounded < size:
        notes.append(f"capped at max {ceiling}")
    if floor > ceiling:
        notes.append(f"instances in use/min {floor} exceed max {ceiling}")
    return bounded, notes


def apply_mode(mode: RolloutMode, current: int, proposed: int) -> int:
    """What a rollout mode lets through: forecast_only → current, scale_out_only → no decrease."""
    if mode == "forecast_only":
        return current
    if mode == "scale_out_only":
        return max(current, proposed)
    return proposed


def _grace_left(pool: Pool, state: PoolState, now: datetime) -> float:
    if state.last_scale_out_at is None:
        return 0.0
    return pool.policy.scale_in_grace_s - (now - state.last_scale_out_at).total_seconds()


def _placement_pools(pools: Sequence[Pool], states: Mapping[str, PoolState]) -> list[PlacementPool]:
    out = []
    for p in pools:
        u, s = p.policy.target_utilisation, p.shape
        floor = min(max(p.policy.min_size, states[p.name].in_use), p.policy.max_size)
        out.append(PlacementPool(p.name, (s.vcpu * u, s.memory_gb * u, s.gpus * u), s.hourly_price_usd,
                                 floor, p.policy.max_size))
    return out


def _fmt_demand(d: Sequence[float]) -> str:
    return ", ".join(f"{r} {v:.3g}" for r, v in zip(RESOURCES, d) if v > 0 or r != "gpus")


def reactive_size(state: PoolState, target_utilisation: float) -> int:
    """Target tracking on instances in use, scale-out only: ``max(desired, ceil(in_use / u))``."""
    return max(state.desired, ceil_count(state.in_use / target_utilisation))


def _plan_one(pool: Pool, state: PoolState, now: datetime, demand: ForecastDemand | None,
              placements: dict[int, Placement], held: str | None, options: PlanOptions = PlanOptions()) -> PoolPlan:
    pol, shape, name = pool.policy, pool.shape, pool.name
    grace = _grace_left(pool, state, now)
    guard = dict(max_step=pol.max_step, hysteresis=pol.hysteresis, grace_left_s=grace)

    # active pool: its share of the demand at the horizon covering boot time + the decision interval
    if demand is None and options.on_bad_forecast == "reactive":
        wanted = reactive_size(state, pol.target_utilisation)
        why = (f"reactive: {wanted} for {state.in_use} in use at {pol.target_utilisation:.0%} target utilisation,"
               f" scale-out only ({held})")
    elif demand is None:
        wanted, why = state.desired, f"hold: {held}"
    else:
        cover_s = shape.boot_s + options.decision_interval_s
        h = horizon_covering(cover_s)
        wanted = placements[h].counts[name]
        beyond = " (boot time + decision interval exceed the longest horizon)" if cover_s > HORIZONS_MIN[-1] * 60 else ""
        why = f"{wanted} for {h}-min demand ({_fmt_demand(demand.by_horizon[h])}){beyond}"
    proposed, notes = guard_size(state.desired, wanted, floor=max(pol.min_size, state.in_use),
                                 ceiling=pol.max_size, **guard)
    target = apply_mode(pol.mode, state.desired, proposed)
    basis = "forecast" if demand is not None else options.on_bad_forecast
    active = SizeChange(state.desired, proposed, target,
                        _reason(pol.mode, state.desired, proposed, target, why, notes, basis))

    # warm pool: the 30-minute share minus the active proposal; Running only if needed within resume time
    warm_state: WarmPoolState = state.warm_state or pol.idle_warm_state
    if demand is None:
        warm_wanted, why = state.warm_size, f"hold: {held}"  # no forecast: nothing says how much to prepare
    else:
        total = placements[HORIZONS_MIN[-1]].counts[name]
        warm_wanted = max(0, total - proposed)
        why = f"{HORIZONS_MIN[-1]}-min placement {total} − active {proposed} = {warm_wanted}"
        headroom = math.ceil(pol.warm_headroom * proposed - 1e-9)
        if headroom > warm_wanted:
            warm_wanted = headroom
            why += f"; headroom {pol.warm_headroom:g} × active {proposed} = {headroom}"
        need_soon = any(placements[h].counts[name] > proposed for h in HORIZONS_MIN if (h - 5) * 60 <= shape.resume_s)
        if pol.mode != "forecast_only":
            warm_state = "Running" if need_soon else pol.idle_warm_state
    warm_proposed, notes = guard_size(state.warm_size, warm_wanted, floor=pol.warm_min_size,
                                      ceiling=pol.warm_max_size, **guard)
    if state.warm_state and warm_state != state.warm_state:
        notes.append(f"pool state {state.warm_state} → {warm_state}")
    warm_target = apply_mode(pol.mode, state.warm_size, warm_proposed)
    warm = SizeChange(state.warm_size, warm_proposed, warm_target,
                      _reason(pol.mode, state.warm_size, warm_proposed, warm_target, why, notes,
                              "forecast" if demand is not None else "hold"))
    return PoolPlan(name, pol.mode, active, warm, warm_state, state.warm_state, pol.warm_reuse_on_scale_in,
                    hourly_cost_usd=target * shape.hourly_price_usd)


def _reason(mode: str, current: int, proposed: int, target: int, why: str, notes: list[str],
            basis: str = "forecast") -> str:
    """``mode=<rollout>; basis=<forecast|reactive|hold>; current → proposed; why; guard notes``."""
    parts = [f"mode={mode}", f"basis={basis}", f"{current} → {proposed}", why] + notes
    if target != proposed:
        parts.append(f"not applied by mode: target stays {target}")
    return "; ".join(parts)


def plan_pools(
    system_forecast: pa.Table | Iterable[Mapping[str, Any]] | None,
    states: Mapping[str, PoolState],
    pools: Sequence[Pool],
    now: datetime,
    *,
    options: PlanOptions = PlanOptions(),
    served: Mapping[int, Sequence[float]] | None = None,
) -> Plan:
    """Plan every pool from the system forecast (see the module doc for the rules).

    ``system_forecast``: a ``SYSTEM_FORECAST`` table or its rows; ``states``: pool name →
    :class:`PoolState` (a pool without a state is reported in ``Plan.skipped``); ``now``: the
    decision time, timezone-aware UTC. ``served``: horizon (min) → ``(cores, GB, GPUs)`` that user
    sub-pools serve, subtracted from the demand before placement.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"pool names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    skipped = {p.name: "no state (its Auto Scaling group was not described)"
               for p in pools if p.name not in states}
    live = [p for p in pools if p.name in states]
    required = ("cpu_cores", "memory_gb") + (("gpus",) if any(p.shape.gpus > 0 for p in live) else ())
    read = demand_by_horizon(system_forecast, now, max_age_s=options.max_forecast_age_s,
                             shading=options.upper_shading, required=required)
    demand = read if isinstance(read, ForecastDemand) else None
    held = read if isinstance(read, str) else None
    served_h = {int(h): (float(v[0]), float(v[1]), float(v[2])) for h, v in (served or {}).items()}
    for h, v in served_h.items():
        if h not in HORIZONS_MIN or not all(math.isfinite(x) and x >= 0 for x in v):
            raise ValueError(f"served demand at {h} min must be finite and >= 0 at a forecast horizon, got {v}")
    if demand is not None and served_h:
        demand = ForecastDemand(demand.issued_at, {
            h: tuple(max(0.0, d - s) for d, s in zip(v, served_h.get(h, (0.0, 0.0, 0.0))))  # type: ignore[misc]
            for h, v in demand.by_horizon.items()})
    basis: PlanBasis = "forecast" if demand is not None else options.on_bad_forecast  # type: ignore[assignment]
    placements: dict[int, Placement] = {}
    if demand is not None and live:
        place_pools = _placement_pools(live, states)
        placements = {h: place_demand(demand.by_horizon[h], place_pools) for h in HORIZONS_MIN}
    plans = tuple(_plan_one(p, states[p.name], now, demand, placements, held, options) for p in live)
    unmet = placements[HORIZONS_MIN[-1]].unmet if placements else {}
    return Plan(decided_at=now, forecast_issued_at=demand.issued_at if demand else None, pools=plans,
                held=held, skipped=skipped, unmet=dict(unmet), basis=basis, served=served_h)
