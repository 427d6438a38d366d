"""Hypothesis properties of the policy, of placement and of user sub-pools.

Default example counts (``WARMCAST_HYPOTHESIS_SCALE=k`` multiplies every one by ``k`` for a
longer soak run): ``test_plan_invariants`` 2,500 random fleets of 1–5 pools (about 7,500 pool
plans, each checked for every invariant on both the active and the warm pool) with random —
sometimes stale, NaN, negative or incomplete — forecasts, either fallback, and random demand
served by sub-pools; single-pool sizing 1,000; monotonicity 1,000; placement 800 + 800;
sub-pool invariants 2,500; sub-pool hysteresis 1,000; served demand never adds capacity 700.
In all 10,300 generated examples per default run.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.schemas import HORIZONS_MIN
from scaler.placement import PlacementPool, ceil_count, place_demand
from scaler.policy import InstanceShape, PlanOptions, Pool, PoolPolicy, PoolState, plan_pools
from scaler.subpools import (SubpoolPolicy, SubpoolState, UserDemand, UserDemandRead, plan_subpools,
                             subpool_group_name)
from tests.scaler.conftest import NOW, forecast_rows

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALE = float(os.environ.get("WARMCAST_HYPOTHESIS_SCALE", "1"))


def n(examples: int) -> int:
    """``examples`` × ``WARMCAST_HYPOTHESIS_SCALE`` (default 1)."""
    return max(1, round(examples * SCALE))

shapes = st.builds(
    InstanceShape,
    vcpu=st.sampled_from([2.0, 4.0, 8.0, 16.0, 48.0]),
    memory_gb=st.sampled_from([4.0, 8.0, 16.0, 32.0, 64.0, 192.0]),
    gpus=st.sampled_from([0.0, 0.0, 0.0, 1.0, 4.0]),
    hourly_price_usd=st.floats(0.0, 5.0),
    boot_s=st.floats(0.0, 2400.0),
    resume_s=st.floats(0.0, 600.0),
)


# Strategies are built once: building them inside composite draws (st.integers(lo, hi) per draw) costs
# more than the policy itself. Dependent ranges are derived from independent draws instead.
_counts = st.integers(0, 60)
_pools_per_fleet = st.integers(1, 5)
_small = st.integers(0, 20)
_modes = st.sampled_from(["forecast_only", "scale_out_only", "scale"])
_idle = st.sampled_from(["Stopped", "Hibernated"])
_warm_states = st.sampled_from([None, "Running", "Stopped", "Hibernated"])
_unit = st.floats(0.0, 1.0)
_ago_s = st.one_of(st.none(), st.floats(0, 7200))


def _between(draw, lo: int, hi: int) -> int:
    return lo + round(draw(_unit) * (hi - lo))


@st.composite
def policies(draw) -> PoolPolicy:
    lo, wlo = draw(_small), draw(_small) // 4
    return PoolPolicy(
        min_size=lo, max_size=lo + draw(_counts), max_step=1 + draw(_small) % 20,
        target_utilisation=0.3 + 0.7 * draw(_unit), hysteresis=0.5 * draw(_unit),
        scale_in_grace_s=3600 * draw(_unit), mode=draw(_modes),
        warm_min_size=wlo, warm_max_size=wlo + draw(_small), idle_warm_state=draw(_idle),
    )


@st.composite
def states_for(draw, policy: PoolPolicy) -> PoolState:
    desired = _between(draw, policy.min_size, policy.max_size)
    ago = draw(_ago_s)
    return PoolState(
        desired=desired, in_service=desired, in_use=_between(draw, 0, desired),
        warm_size=_between(draw, policy.warm_min_size, policy.warm_max_size),
        warm_state=draw(_warm_states), last_scale_out_at=None if ago is None else NOW - timedelta(seconds=ago),
    )


demand_values = st.lists(st.floats(0.0, 800.0), min_size=len(HORIZONS_MIN), max_size=len(HORIZONS_MIN))


@st.composite
def forecasts(draw) -> list[dict]:
    rows = forecast_rows(draw(demand_values), draw(demand_values), draw(demand_values),
                         issued_at=NOW - timedelta(seconds=draw(st.floats(0, 500))))
    fault = draw(st.sampled_from(["none"] * 6 + ["stale", "nan", "negative", "missing", "empty"]))
    i = draw(st.integers(0, len(rows) - 1))
    if fault == "stale":
        rows = [{**r, "issued_at": NOW - timedelta(hours=2)} for r in rows]
    elif fault == "nan":
        rows[i] = {**rows[i], "upper": math.nan}
    elif fault == "negative":
        rows[i] = {**rows[i], "upper": -1.0}
    elif fault == "missing":
        del rows[i]
    elif fault == "empty":
        rows = []
    return rows


@st.composite
def fleets(draw):
    n = draw(_pools_per_fleet)
    pools = [Pool(f"p{i}", draw(shapes), draw(policies())) for i in range(n)]
    states = {p.name: draw(states_for(p.policy)) for p in pools}
    return pools, states


def grace_over(state: PoolState, policy: PoolPolicy) -> bool:
    return state.last_scale_out_at is None or (NOW - state.last_scale_out_at).total_seconds() >= policy.scale_in_grace_s


_served = st.one_of(st.none(), st.lists(st.floats(0.0, 400.0), min_size=3, max_size=3).map(
    lambda v: {h: (v[0], v[1], v[2] * (h / 30)) for h in HORIZONS_MIN}))


@settings(max_examples=n(2500), **FAST)
@given(fleet=fleets(), rows=forecasts(), fallback=st.sampled_from(["reactive", "hold"]), served=_served)
def test_plan_invariants(fleet, rows, fallback, served):
    pools, states = fleet
    plan = plan_pools(rows, states, pools, NOW, options=PlanOptions(on_bad_forecast=fallback), served=served)
    assert [p.pool for p in plan.pools] == [p.name for p in pools]
    for pool, pp in zip(pools, plan.pools):
        pol, st_ = pool.policy, states[pool.name]
        for size in (pp.active.proposed, pp.active.target):
            assert pol.min_size <= size <= pol.max_size, "outside min/max"
            assert size >= st_.in_use, "below instances in use"
            assert abs(size - st_.desired) <= pol.max_step, "step limit"
            if size < st_.desired:
                assert grace_over(st_, pol), "scale-in before the grace period"
        for size in (pp.warm.proposed, pp.warm.target):
            assert pol.warm_min_size <= size <= pol.warm_max_size, "warm pool outside its bounds"
            assert abs(size - st_.warm_size) <= pol.max_step, "warm step limit"
            if size < st_.warm_size:
                assert grace_over(st_, pol), "warm scale-in before the grace period"
        if pol.mode == "forecast_only":
            assert pp.active.target == st_.desired and pp.warm.target == st_.warm_size
            assert pp.warm_state == (st_.warm_state or pol.idle_warm_state)
        elif pol.mode == "scale_out_only":
            assert pp.active.target >= st_.desired and pp.warm.target >= st_.warm_size
        else:
            assert (pp.active.target, pp.warm.target) == (pp.active.proposed, pp.warm.proposed)
        if plan.held:
            assert plan.basis == fallback and f"basis={fallback}" in pp.active.reason and plan.held in pp.active.reason
            assert pp.warm.proposed == st_.warm_size or not pol.warm_min_size <= st_.warm_size <= pol.warm_max_size
            if fallback == "hold":
                assert pp.active.proposed == min(max(st_.desired, pol.min_size, st_.in_use), pol.max_size)
            else:  # reactive: never removes capacity, adds it only as far as target tracking asks
                assert pp.active.proposed >= min(st_.desired, pol.max_size)
                assert pp.active.proposed <= max(st_.desired, math.ceil(st_.in_use / pol.target_utilisation - 1e-9),
                                                 pol.min_size)
        else:
            assert plan.basis == "forecast" and "basis=forecast" in pp.active.reason


def _free_pool(shape: InstanceShape, utilisation: float) -> list[Pool]:
    return [Pool("p", shape, PoolPolicy(min_size=0, max_size=10_000, max_step=10_000, target_utilisation=utilisation,
                                        hysteresis=0, scale_in_grace_s=0, mode="scale"))]


@settings(max_examples=n(1000), **FAST)
@given(shape=shapes, u=st.floats(0.3, 1.0), cpu=demand_values, mem=demand_values, gpu=demand_values)
def test_unconstrained_single_pool_covers_boot_plus_interval_with_the_fewest_instances(shape, u, cpu, mem, gpu):
    plan = plan_pools(forecast_rows(cpu, mem, gpu), {"p": PoolState(0)}, _free_pool(shape, u), NOW)
    n = plan.pools[0].active.target
    # capacity launched now must last until the next decision's launches boot: boot + 300 s
    h = HORIZONS_MIN.index(next((h for h in HORIZONS_MIN if h * 60 >= shape.boot_s + 300), 30))
    need = [max(cpu[: h + 1]), max(mem[: h + 1]), max(gpu[: h + 1]) if shape.gpus else 0.0]
    cap = [shape.vcpu * u, shape.memory_gb * u, shape.gpus * u]
    expected = max(ceil_count(d / c) for d, c in zip(need, cap) if c > 0)
    assert n == expected


@settings(max_examples=n(1000), **FAST)
@given(shape=shapes, cpu=demand_values, mem=demand_values, more=st.floats(0.0, 300.0))
def test_more_demand_never_means_fewer_instances(shape, cpu, mem, more):
    pools = _free_pool(shape, 0.7)
    a = plan_pools(forecast_rows(cpu, mem), {"p": PoolState(0)}, pools, NOW).pools[0]
    b = plan_pools(forecast_rows([c + more for c in cpu], mem), {"p": PoolState(0)}, pools, NOW).pools[0]
    assert b.active.target >= a.active.target


placement_pools = st.lists(
    st.builds(PlacementPool, name=st.just(""), capacity=st.tuples(st.floats(0.5, 48), st.floats(0.5, 200), st.just(0.0)),
              price=st.floats(0.01, 5.0), floor=st.just(0), ceiling=st.just(100_000)),
    min_size=1, max_size=5,
).map(lambda ps: [PlacementPool(f"p{i}", p.capacity, p.price, p.floor, p.ceiling) for i, p in enumerate(ps)])


@settings(max_examples=n(800), **FAST)
@given(pools=placement_pools, cpu=st.floats(0, 2000), mem=st.floats(0, 8000))
def test_placement_covers_demand_and_never_costs_more_than_the_cheapest_single_pool(pools, cpu, mem):
    placed = place_demand((cpu, mem, 0.0), pools)
    assert not placed.unmet
    for r, d in ((0, cpu), (1, mem)):
        assert sum(placed.counts[p.name] * p.capacity[r] for p in pools) >= d - 1e-6
    single = min(max(ceil_count(cpu / p.capacity[0]), ceil_count(mem / p.capacity[1])) * p.price for p in pools)
    assert placed.cost_usd_per_h <= single + 1e-9


@settings(max_examples=n(800), **FAST)
@given(pools=placement_pools, floors=st.lists(st.integers(0, 30), min_size=5, max_size=5),
       ceilings=st.lists(st.integers(0, 40), min_size=5, max_size=5), cpu=st.floats(0, 2000), mem=st.floats(0, 8000))
def test_placement_stays_within_floors_and_ceilings(pools, floors, ceilings, cpu, mem):
    pools = [PlacementPool(p.name, p.capacity, p.price, min(f, c), c) for p, f, c in zip(pools, floors, ceilings)]
    placed = place_demand((cpu, mem, 0.0), pools)
    for p in pools:
        assert p.floor <= placed.counts[p.name] <= p.ceiling
    if placed.unmet:  # only when every pool that could help is full
        assert all(placed.counts[p.name] == p.ceiling for p in pools)


# -- user sub-pools -------------------------------------------------------------------------------

_SUB_SHAPE = InstanceShape(vcpu=8, memory_gb=32, hourly_price_usd=0.4, boot_s=240)
_users = [f"u{i}" for i in range(6)]
_demand_pair = st.tuples(st.floats(0.0, 120.0), st.floats(0.0, 300.0))


@st.composite
def sub_policies(draw) -> SubpoolPolicy:
    exit_ = 0.25 + 4 * draw(_unit)
    lo = draw(_small) % 4
    return SubpoolPolicy(shape=_SUB_SHAPE, enter_instances=exit_ * (1 + 2 * draw(_unit)), exit_instances=exit_,
                         retire_grace_s=3600 * draw(_unit), max_subpools=draw(_small) % 6, min_size=lo,
                         max_size=lo + 1 + draw(_small), max_step=1 + draw(_small) % 10,
                         target_utilisation=0.3 + 0.7 * draw(_unit), hysteresis=0.5 * draw(_unit),
                         scale_in_grace_s=1800 * draw(_unit), mode=draw(_modes))


@st.composite
def user_demands(draw) -> UserDemandRead | str:
    if draw(st.integers(0, 9)) == 0:
        return "user forecast missing: no rows"
    users = {}
    for u in _users:
        if draw(st.booleans()):
            sized = {h: (c, g, 0.0) for h, (c, g) in zip(HORIZONS_MIN, sorted(draw(st.lists(_demand_pair, min_size=6, max_size=6))))}
            share = draw(_unit)
            users[u] = UserDemand(sized, {h: (c * share, g * share, 0.0) for h, (c, g, _) in sized.items()})
    return UserDemandRead(NOW, users)


@st.composite
def sub_states(draw) -> dict[str, SubpoolState]:
    out = {}
    for u in _users:
        if draw(st.integers(0, 2)) == 0:
            desired = draw(_small)
            ago, out_ago = draw(_ago_s), draw(_ago_s)
            out[u] = SubpoolState(u, subpool_group_name(u), desired=desired, in_service=_between(draw, 0, desired),
                                  in_use=_between(draw, 0, desired),
                                  last_qualified_at=None if ago is None else NOW - timedelta(seconds=ago),
                                  last_scale_out_at=None if out_ago is None else NOW - timedelta(seconds=out_ago))
    return out


_configs = {u: ("py-3.12",) for u in _users[:5]}  # u5 has no known software: never gets a new sub-pool


@settings(max_examples=n(2500), **FAST)
@given(policy=sub_policies(), demand=user_demands(), states=sub_states())
def test_subpool_invariants(policy, demand, states):
    plan = plan_subpools(demand, states, _configs, policy, NOW)
    h = 10  # boot 240 s + the 300 s decision interval
    seen = set()
    for p in plan.pools:
        assert p.user_id not in seen and p.user_id not in p.group and p.group == subpool_group_name(p.user_id)
        seen.add(p.user_id)
        st_ = states.get(p.user_id)
        need = policy.need(demand.users[p.user_id].sized[h]) if isinstance(demand, UserDemandRead) and p.user_id in demand.users else 0.0
        assert 0 <= p.target <= max(policy.max_size, p.current)
        if policy.mode == "forecast_only":
            assert p.target == p.current and not p.changes
        if policy.mode == "scale_out_only":
            assert p.target >= p.current
        if p.action == "create":
            assert st_ is None and need >= policy.enter_instances and _configs.get(p.user_id)
            assert p.qualified_at == NOW and policy.min_size <= p.proposed <= policy.max_size
        else:
            assert st_ is not None and p.current == st_.desired
        if p.action in ("drain", "delete"):  # retire only after the grace with no qualifying demand
            assert need < policy.exit_instances
            # an unknown last-qualified time starts the grace now
            assert (NOW - (st_.last_qualified_at or NOW)).total_seconds() >= policy.retire_grace_s
            assert p.proposed == (st_.in_use if p.action == "drain" else 0)
            if p.action == "delete":
                assert st_.desired == 0 and st_.in_service == 0
        if p.action in ("keep", "resize"):
            assert p.proposed >= min(max(policy.min_size, st_.in_use), policy.max_size)  # never below what is busy
            assert abs(p.proposed - p.current) <= policy.max_step or p.proposed in (policy.max_size, policy.min_size, st_.in_use)
        if p.action == "hold":
            assert not isinstance(demand, UserDemandRead) and p.target == p.current
    if isinstance(demand, UserDemandRead):
        assert set(states) <= seen  # every existing sub-pool gets a decision
        live = [p for p in plan.pools if p.action not in ("drain", "delete")]
        assert len(live) <= max(policy.max_subpools, len(states))
    else:
        assert not any(p.action == "create" for p in plan.pools) and plan.served == {}
    # what sub-pools serve is bounded by their users' mean and their kept, in-service capacity
    for j, hm in enumerate(HORIZONS_MIN):
        served = plan.served.get(hm, (0.0, 0.0, 0.0))
        if not isinstance(demand, UserDemandRead):
            continue
        cap = [0.0, 0.0, 0.0]
        mean = [0.0, 0.0, 0.0]
        for p in plan.pools:
            st_ = states.get(p.user_id)
            if st_ is not None and p.user_id in demand.users and p.action in ("keep", "resize"):
                for r in range(3):
                    cap[r] += min(st_.in_service, p.target) * policy.usable()[r]
                    mean[r] += demand.users[p.user_id].mean[hm][r]
        for r in range(3):
            assert served[r] <= min(cap[r], mean[r]) + 1e-6


@settings(max_examples=n(1000), **FAST)
@given(policy=sub_policies(), share=_unit, exists=st.booleans())
def test_subpool_hysteresis_a_user_between_the_thresholds_neither_enters_nor_leaves(policy, share, exists):
    need = policy.exit_instances + share * (policy.enter_instances - policy.exit_instances) * 0.999
    cores = need * policy.usable()[0]
    demand = UserDemandRead(NOW, {"u0": UserDemand({h: (cores, 0.0, 0.0) for h in HORIZONS_MIN},
                                                   {h: (cores, 0.0, 0.0) for h in HORIZONS_MIN})})
    states = {"u0": SubpoolState("u0", subpool_group_name("u0"), desired=2, in_service=2,
                                 last_qualified_at=NOW - timedelta(days=1))} if exists else {}
    actions = [p.action for p in plan_subpools(demand, states, _configs, policy, NOW).pools]
    if exists:
        assert actions and actions[0] in ("keep", "resize")  # it qualifies to stay: never drained
    elif need < policy.enter_instances - 1e-9:  # within float noise of the threshold counts as on it
        assert actions == []  # below the entry threshold: never created


@settings(max_examples=n(700), **FAST)
@given(shape=shapes, cpu=demand_values, mem=demand_values, served=_served)
def test_demand_served_by_sub_pools_never_adds_shared_capacity(shape, cpu, mem, served):
    pools = _free_pool(shape, 0.7)
    base = plan_pools(forecast_rows(cpu, mem), {"p": PoolState(0)}, pools, NOW).pools[0]
    less = plan_pools(forecast_rows(cpu, mem), {"p": PoolState(0)}, pools, NOW, served=served).pools[0]
    assert less.active.target <= base.active.target and less.warm.target + less.active.target <= base.warm.target + base.active.target
