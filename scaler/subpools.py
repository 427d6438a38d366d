"""User sub-pools: a dedicated Auto Scaling group per heavy user, preloaded with their software. Pure.

(per-user forecast, per-user software configurations, existing sub-pools, policy) → :class:`SubpoolsPlan`.

* **Demand.** A user's demand per horizon is their ``USER_FORECAST`` quantile
  (``SubpoolPolicy.quantile``, default ``q90``) maximised over the buckets up to that horizon, like
  the system forecast (:func:`read_user_demand`). A user whose rows are incomplete, NaN or
  negative is skipped (and says so); a forecast that is missing or stale holds every sub-pool.
* **Who gets one.** Demand is measured in sub-pool instances: ``need = max over resources of
  demand / (shape × target_utilisation)`` at the horizon covering ``boot_s + decision interval``.
  A user *enters* at ``need >= enter_instances`` and *stays* while ``need >= exit_instances``
  (hysteresis: ``exit <= enter``, so a user near the threshold does not flap). At most
  ``max_subpools`` exist; new ones go to the largest need first. A user id must be a well-formed
  id (:func:`pipeline.schemas.check_id`); the group is named after a hash of it
  (:func:`subpool_group_name`), so a user id never becomes a resource name, and the id itself
  travels only in a tag.
* **Size.** The same packing as the shared pools (:func:`scaler.placement.place_demand` on the
  sub-pool's shape) and the same guards (:func:`scaler.policy.guard_size`: step, hysteresis,
  scale-in grace, ``[max(min_size, in_use), max_size]``).
* **Retire.** A sub-pool whose user stopped qualifying keeps serving (sized on demand) until
  ``retire_grace_s`` has passed since it last qualified; then it drains (desired → the instances
  in use, normally 0; the terminating lifecycle hook gives running work its grace), and once it
  holds no instance it is deleted.
* **No double provisioning.** What existing, in-service sub-pool capacity will serve is returned
  per horizon (:attr:`SubpoolsPlan.served`) and subtracted from the system demand before the
  shared pools are placed. It is ``min(usable capacity in service and kept, the user's mean
  demand)`` per resource: the shared pools still cover the user's demand beyond their mean and
  beyond the sub-pool's capacity, so moving a user never leaves them short; capacity that is
  still booting or is being retired is not counted.
* **Rollout mode** as for shared pools: ``forecast_only`` records only; ``scale_out_only``
  creates and grows but never shrinks, drains or deletes; ``scale`` does everything.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schemas import HORIZONS_MIN, QUANTILE_COLUMNS, is_valid_id
from scaler.forecast_view import FUTURE_SKEW_S, NEGATIVE_TOLERANCE, horizon_covering
from scaler.placement import RESOURCES, PlacementPool, place_demand
from scaler.policy import ROLLOUT_MODES, InstanceShape, RolloutMode, apply_mode, guard_size

#: Needs (instances) this close to a threshold count as on it: float noise must not flip a decision.
_TOL = 1e-9
SubpoolAction = Literal["create", "resize", "keep", "drain", "delete", "hold"]
#: Prefix of every sub-pool's Auto Scaling group and launch template name.
SUBPOOL_PREFIX = "warmcast-sub-"


def subpool_group_name(user_id: str) -> str:
    """``warmcast-sub-<16 hex of sha256(user id)>``: stable, safe, and never the raw user id."""
    return SUBPOOL_PREFIX + hashlib.sha256(user_id.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SubpoolPolicy:
    """How user sub-pools are chosen and sized. Counts are instances, times seconds.

    ``enter_instances`` / ``exit_instances``: a user's need (in instances of ``shape`` at
    ``target_utilisation``) to get / keep a sub-pool. ``quantile``: the ``USER_FORECAST`` column
    sized for. ``top_k``: software configurations preloaded per sub-pool.
    """

    shape: InstanceShape
    enter_instances: float = 2.0
    exit_instances: float = 1.0
    retire_grace_s: float = 1800.0
    max_subpools: int = 10
    min_size: int = 1
    max_size: int = 10
    max_step: int = 10
    target_utilisation: float = 0.7
    hysteresis: float = 0.1
    scale_in_grace_s: float = 900.0
    quantile: str = "q90"
    top_k: int = 3
    mode: RolloutMode = "forecast_only"

    def __post_init__(self) -> None:
        if not 0 < self.exit_instances <= self.enter_instances:
            raise ValueError(f"sub-pools need 0 < exit_instances <= enter_instances, got "
                             f"{self.exit_instances}, {self.enter_instances}")
        if not 0 <= self.min_size <= self.max_size or self.max_size < 1:
            raise ValueError(f"sub-pools need 0 <= min_size <= max_size and max_size >= 1, got {self.min_size}, {self.max_size}")
        if self.max_subpools < 0 or self.max_step < 1 or self.top_k < 1:
            raise ValueError("sub-pools need max_subpools >= 0, max_step >= 1 and top_k >= 1")
        if not 0 < self.target_utilisation <= 1 or not 0 <= self.hysteresis < 1:
            raise ValueError("sub-pools need target_utilisation in (0, 1] and hysteresis in [0, 1)")
        for name in ("retire_grace_s", "scale_in_grace_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"sub-pool {name}={v} must be finite and >= 0")
        if self.quantile not in QUANTILE_COLUMNS + ("mean",):
            raise ValueError(f"sub-pool quantile {self.quantile!r} must be one of {', '.join(QUANTILE_COLUMNS)}, mean")
        if self.mode not in ROLLOUT_MODES:
            raise ValueError(f"sub-pool mode={self.mode!r} must be one of {', '.join(ROLLOUT_MODES)}")

    def usable(self) -> tuple[float, float, float]:
        """Usable capacity of one instance, ``(cores, GB, GPUs)``."""
        u, s = self.target_utilisation, self.shape
        return (s.vcpu * u, s.memory_gb * u, s.gpus * u)

    def need(self, demand: Sequence[float]) -> float:
        """Fractional instances ``demand`` fills (max over resources; a resource the shape lacks: inf)."""
        need = 0.0
        for d, c in zip(demand, self.usable()):
            if d > NEGATIVE_TOLERANCE:
                need = max(need, d / c if c > 0 else math.inf)
        return need


@dataclass(frozen=True)
class UserDemand:
    """One user's demand per horizon, ``(cores, GB, GPUs)``: at the sizing quantile and the mean."""

    sized: dict[int, tuple[float, float, float]]
    mean: dict[int, tuple[float, float, float]]


@dataclass(frozen=True)
class UserDemandRead:
    """The users' demand from one ``USER_FORECAST`` issue, and the users skipped (and why)."""

    issued_at: datetime
    users: dict[str, UserDemand]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SubpoolState:
    """An existing sub-pool as described from AWS (instance counts; UTC times, None if unknown)."""

    user_id: str
    group: str
    desired: int
    in_service: int = 0
    in_use: int = 0
    last_qualified_at: datetime | None = None
    last_scale_out_at: datetime | None = None
    software_configs: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubpoolPlan:
    """One sub-pool's decision. ``action``: create | resize | keep | drain | delete | hold.
    ``proposed`` is recorded in every mode; ``target`` is what may be applied (0 for a delete).
    ``qualified_at``: the time to record as the last qualifying demand (None: unchanged)."""

    user_id: str
    group: str
    action: SubpoolAction
    current: int
    proposed: int
    target: int
    mode: RolloutMode
    software_configs: tuple[str, ...]
    qualified_at: datetime | None
    reason: str
    applies: bool = True  # False when the rollout mode only records this decision

    @property
    def changes(self) -> bool:
        """True when AWS must be called: a create, a delete or a new desired capacity the mode lets through."""
        return self.applies and (self.target != self.current or self.action in ("create", "delete"))


@dataclass(frozen=True)
class SubpoolsPlan:
    """Every sub-pool decision, the demand they serve per horizon, and why users were passed over."""

    decided_at: datetime
    pools: tuple[SubpoolPlan, ...]
    served: dict[int, tuple[float, float, float]]
    held: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def software_config_usage(requests: pa.Table, *, start: datetime | None = None, end: datetime | None = None) -> pa.Table:
    """Requests and core-seconds per user and software configuration of ``REQUEST_LOG`` rows with
    ``ts`` in ``[start, end)`` (either bound optional): ``user_id``, ``software_config`` (strings),
    ``requests`` (int64), ``core_seconds`` (float64; 0 without ``cpu_cores`` and ``duration_s``).
    Usages of parts of a log (e.g. one batch at a time) add up: :func:`rank_software_configs`
    takes them concatenated."""
    missing = [c for c in ("user_id", "software_config") if c not in requests.column_names]
    if missing:
        raise ValueError(f"request table lacks {missing} (REQUEST_LOG contract)")
    t = requests
    if start is not None or end is not None:
        if "ts" not in t.column_names:
            raise ValueError("request table lacks ts, needed for a time window")
        mask = None
        for bound, op in ((start, pc.greater_equal), (end, pc.less)):
            if bound is not None:
                m = op(t["ts"], pa.scalar(bound, t.schema.field("ts").type))
                mask = m if mask is None else pc.and_(mask, m)
        t = t.filter(mask)
    has_work = {"cpu_cores", "duration_s"} <= set(t.column_names)
    work = pc.multiply(t["cpu_cores"], t["duration_s"]) if has_work else pa.array(np.zeros(t.num_rows))
    g = (pa.table({"user_id": t["user_id"], "software_config": t["software_config"], "work": work})
         .group_by(["user_id", "software_config"]).aggregate([([], "count_all"), ("work", "sum")]))
    return pa.table({"user_id": g["user_id"].cast(pa.string()), "software_config": g["software_config"].cast(pa.string()),
                     "requests": g["count_all"].cast(pa.int64()), "core_seconds": g["work_sum"].cast(pa.float64())})


def rank_software_configs(usage: pa.Table, k: int = 3) -> dict[str, tuple[str, ...]]:
    """Each user's ``k`` most-requested software configurations from :func:`software_config_usage`
    rows (parts concatenated are summed first). Ties go to the configuration with more
    core-seconds, then by name. Users and configurations that are not well-formed ids are left out
    (they would end up in tags and launch user data)."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    g = (usage.group_by(["user_id", "software_config"]).aggregate([("requests", "sum"), ("core_seconds", "sum")])
         .sort_by([("user_id", "ascending"), ("requests_sum", "descending"), ("core_seconds_sum", "descending"),
                   ("software_config", "ascending")]))
    out: dict[str, list[str]] = {}
    for user, cfg in zip(g["user_id"].to_pylist(), g["software_config"].to_pylist()):
        if not (is_valid_id(user) and is_valid_id(cfg)):
            continue
        got = out.setdefault(user, [])
        if len(got) < k:
            got.append(cfg)
    return {u: tuple(c) for u, c in out.items()}


def top_software_configs(requests: pa.Table, k: int = 3, *, start: datetime | None = None,
                         end: datetime | None = None) -> dict[str, tuple[str, ...]]:
    """Each user's ``k`` most-requested software configurations from ``REQUEST_LOG`` rows.

    Counts requests with ``ts`` in ``[start, end)`` (either bound optional); ties go to the
    configuration with more core-seconds, then by name. Users and configurations that are not
    well-formed ids are left out (they would end up in tags and launch user data).
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    return rank_software_configs(software_config_usage(requests, start=start, end=end), k)


def read_user_demand(forecast: pa.Table | None, now: datetime, *, max_age_s: float,
                     quantile: str = "q90") -> UserDemandRead | str:
    """Per-user demand from the newest ``USER_FORECAST`` issue at or before ``now``, or why not.

    Returns a reason string when the forecast is missing or older than ``max_age_s`` seconds.
    Units are those of the demand series (cores, GB, GPUs); ``requests`` rows are ignored.
    """
    if forecast is None or forecast.num_rows == 0:
        return "user forecast missing: no rows"
    cols = {"user_id", "issued_at", "horizon_min", "resource", quantile, "mean"}
    lacking = sorted(cols - set(forecast.column_names))
    if lacking:
        return f"user forecast invalid: lacks columns {lacking}"
    ts_type = forecast.schema.field("issued_at").type
    t = forecast.filter(pc.less_equal(forecast["issued_at"], pa.scalar(now + timedelta(seconds=FUTURE_SKEW_S), ts_type)))
    if t.num_rows == 0:
        return f"user forecast missing: none issued at or before {now.isoformat()}"
    newest = pc.max(t["issued_at"])
    issued_at = newest.as_py()
    age = (now - issued_at).total_seconds()
    if age > max_age_s:
        return f"user forecast stale: newest issued {issued_at.isoformat()} is {age:.0f} s old (max {max_age_s:.0f} s)"
    t = t.filter(pc.equal(t["issued_at"], newest))
    t = t.filter(pc.is_in(t["resource"], value_set=pa.array(RESOURCES)))
    users = pc.unique(t["user_id"])
    n_u, n_h, n_r = len(users), len(HORIZONS_MIN), len(RESOURCES)
    u = pc.index_in(t["user_id"], value_set=users).to_numpy()
    h = np.searchsorted(HORIZONS_MIN, t["horizon_min"].to_numpy())
    known = np.isin(t["horizon_min"].to_numpy(), HORIZONS_MIN)
    r = pc.index_in(t["resource"], value_set=pa.array(RESOURCES)).to_numpy()
    vals = {}
    count = np.zeros((n_u, n_h, n_r), dtype=np.int64)
    np.add.at(count, (u[known], h[known], r[known]), 1)
    for col in dict.fromkeys((quantile, "mean")):
        v = np.full((n_u, n_h, n_r), np.nan)
        v[u[known], h[known], r[known]] = t[col].to_numpy(zero_copy_only=False)[known].astype(float)
        vals[col] = v
    skipped: dict[str, str] = {}
    ids = users.to_pylist()
    bad_dup = (count > 1).any(axis=(1, 2))
    # cores and memory are required for every horizon; a missing gpus row means no GPU demand
    lacks = (count[:, :, :2] == 0).any(axis=(1, 2))
    out: dict[str, UserDemand] = {}
    for i, user in enumerate(ids):
        if not is_valid_id(user):
            skipped[str(user)] = "user id is not a well-formed identifier"
            continue
        if bad_dup[i] or lacks[i]:
            skipped[user] = "duplicate rows" if bad_dup[i] else "incomplete rows (cores and memory for every horizon)"
            continue
        per: dict[str, dict[int, tuple[float, float, float]]] = {}
        for col, v in vals.items():
            x = np.where(count[i] == 0, 0.0, v[i])
            if not np.isfinite(x).all() or (x < -NEGATIVE_TOLERANCE).any():
                skipped[user] = f"non-finite or negative {col}"
                break
            run = np.maximum.accumulate(np.maximum(x, 0.0), axis=0)
            per[col] = {hm: (float(run[j, 0]), float(run[j, 1]), float(run[j, 2])) for j, hm in enumerate(HORIZONS_MIN)}
        else:
            out[user] = UserDemand(sized=per[quantile], mean=per["mean"])
    return UserDemandRead(issued_at=issued_at, users=out, skipped=skipped)


def _fmt(need: float) -> str:
    return "∞" if math.isinf(need) else f"{need:.2f}"


def plan_subpools(
    demand: UserDemandRead | str | None,
    states: Mapping[str, SubpoolState],
    configs: Mapping[str, Sequence[str]],
    policy: SubpoolPolicy,
    now: datetime,
    *,
    decision_interval_s: float = 300.0,
) -> SubpoolsPlan:
    """Decide every user's sub-pool (see the module doc).

    ``demand``: :func:`read_user_demand`'s result (a string: why there is none, and every
    sub-pool holds). ``states``: user id → existing :class:`SubpoolState`. ``configs``: user id →
    most-requested software configurations (:func:`top_software_configs`); a user without any
    gets no *new* sub-pool (there would be nothing to preload).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    held = demand if isinstance(demand, str) else ("user forecast missing" if demand is None else None)
    read = demand if isinstance(demand, UserDemandRead) else None
    h = horizon_covering(policy.shape.boot_s + decision_interval_s)
    pool_cap = PlacementPool("sub", policy.usable(), policy.shape.hourly_price_usd, 0, policy.max_size)
    skipped: dict[str, str] = dict(read.skipped) if read else {}
    plans: list[SubpoolPlan] = []
    served = np.zeros((len(HORIZONS_MIN), len(RESOURCES)))
    guard = dict(max_step=policy.max_step, hysteresis=policy.hysteresis)
    mode = policy.mode

    def grace_left(st: SubpoolState) -> float:
        if st.last_scale_out_at is None:
            return 0.0
        return policy.scale_in_grace_s - (now - st.last_scale_out_at).total_seconds()

    def sized(user: str, current: int, in_use: int, grace: float) -> tuple[int, int, list[str], str]:
        d = read.users[user].sized[h]  # type: ignore[union-attr]
        wanted = place_demand(d, [pool_cap]).counts["sub"]
        proposed, notes = guard_size(current, wanted, floor=min(max(policy.min_size, in_use), policy.max_size),
                                     ceiling=policy.max_size, grace_left_s=grace, **guard)
        return wanted, proposed, notes, f"{wanted} for the user's {h}-min {policy.quantile} demand"

    def emit(user: str, group: str, action: SubpoolAction, current: int, proposed: int, cfgs: Sequence[str],
             qualified_at: datetime | None, parts: list[str]) -> SubpoolPlan:
        target, applies = apply_mode(mode, current, proposed), True
        if mode == "forecast_only" or (mode == "scale_out_only" and action in ("drain", "delete")):
            target, applies = current, False  # recorded, not applied
            parts.append(f"not applied by mode: {action} stays a recommendation")
        reason = "; ".join([f"mode={mode}", f"user={user}", f"action={action}", f"{current} → {proposed}"] + parts)
        return SubpoolPlan(user, group, action, current, proposed, target, mode, tuple(cfgs), qualified_at, reason,
                           applies)

    # existing sub-pools first: they keep their slot while their user qualifies
    for user, st in sorted(states.items()):
        cfgs = st.software_configs or tuple(configs.get(user, ()))
        if read is None or user in skipped:
            why = held or f"user's forecast unusable: {skipped[user]}"
            plans.append(emit(user, st.group, "hold", st.desired, st.desired, cfgs, None, [f"hold: {why}"]))
            continue
        need = policy.need(read.users[user].sized[h]) if user in read.users else 0.0
        qualifies = need >= policy.exit_instances - _TOL
        since = st.last_qualified_at or now  # unknown: the grace starts now (the applier records it)
        left = policy.retire_grace_s - (now - since).total_seconds()
        if qualifies or left > 0:
            if user in read.users:
                _, proposed, notes, why = sized(user, st.desired, st.in_use, grace_left(st))
            else:  # the issue has no rows for this user: no demand
                proposed, notes = guard_size(st.desired, 0, floor=min(max(policy.min_size, st.in_use), policy.max_size),
                                             ceiling=policy.max_size, grace_left_s=grace_left(st), **guard)
                why = "0: the user has no rows in this forecast issue"
            state_note = (f"need {_fmt(need)} ≥ exit {policy.exit_instances:g} instances" if qualifies else
                          f"need {_fmt(need)} < exit {policy.exit_instances:g}: retires in {left:.0f} s unless it qualifies again")
            action: SubpoolAction = "resize" if proposed != st.desired else "keep"
            p = emit(user, st.group, action, st.desired, proposed, cfgs,
                     now if qualifies or st.last_qualified_at is None else None, [why, state_note] + notes)
            plans.append(p)
            # only capacity in service now and kept counts as served (booting or retiring capacity does not)
            keep = min(st.in_service, p.target)
            if keep > 0 and user in read.users:
                cap = np.array(policy.usable()) * keep
                mean = np.array([read.users[user].mean[hm] for hm in HORIZONS_MIN])
                served += np.minimum(mean, cap)
        elif st.desired > 0 or st.in_service > 0:
            floor = st.in_use
            plans.append(emit(user, st.group, "drain", st.desired, floor, cfgs, None,
                              [f"no qualifying demand for {(now - since).total_seconds():.0f} s "
                               f"(grace {policy.retire_grace_s:.0f} s): drain to {floor} in use, then delete"]))
        else:
            p = emit(user, st.group, "delete", 0, 0, cfgs, None, ["drained and empty: delete the group"])
            plans.append(p)

    # new sub-pools: the largest need first, up to max_subpools
    if read is not None:
        live = sum(1 for p in plans if p.action not in ("drain", "delete"))
        candidates = []
        for user, ud in read.users.items():
            if user in states:
                continue
            need = policy.need(ud.sized[h])
            if need < policy.enter_instances - _TOL:
                continue
            if not configs.get(user):
                skipped[user] = f"need {_fmt(need)} qualifies, but no software configurations are known to preload"
                continue
            if math.isinf(need):
                skipped[user] = "needs a resource the sub-pool shape lacks (e.g. GPUs)"
                continue
            candidates.append((-need, user))
        for neg_need, user in sorted(candidates):
            if live >= policy.max_subpools:
                skipped[user] = f"need {_fmt(-neg_need)} qualifies, but {policy.max_subpools} sub-pools exist (max_subpools)"
                continue
            _, proposed, notes, why = sized(user, 0, 0, 0.0)
            cfgs = tuple(configs[user])[: policy.top_k]
            plans.append(emit(user, subpool_group_name(user), "create", 0, proposed, cfgs, now,
                              [why, f"need {_fmt(-neg_need)} ≥ enter {policy.enter_instances:g} instances",
                               f"preloads {', '.join(cfgs)}"] + notes))
            live += 1
    served_h = {hm: (float(served[j, 0]), float(served[j, 1]), float(served[j, 2])) for j, hm in enumerate(HORIZONS_MIN)}
    return SubpoolsPlan(decided_at=now, pools=tuple(plans), served=served_h if served.any() else {}, held=held,
                        skipped=skipped)
