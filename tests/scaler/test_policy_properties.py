"""Hypothesis properties of the policy and of placement.

Example counts are sized so the whole scaler suite stays near 40 s on 2 cores:
``test_plan_invariants`` checks 2,500 random fleets of 1–5 pools (about 7,500 pool plans, each
checked for every invariant on both the active and the warm pool) with random — sometimes stale,
NaN, negative or incomplete — forecasts; the other properties run 1,000 + 1,000 + 800 + 800
examples. In all about 6,100 generated examples and 11,100 pool- or placement-level cases per run.
"""

from __future__ import annotations

import math
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.schemas import HORIZONS_MIN
from scaler.placement import PlacementPool, ceil_count, place_demand
from scaler.policy import InstanceShape, Pool, PoolPolicy, PoolState, plan_pools
from tests.scaler.conftest import NOW, forecast_rows

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

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


@settings(max_examples=2500, **FAST)
@given(fleet=fleets(), rows=forecasts())
def test_plan_invariants(fleet, rows):
    pools, states = fleet
    plan = plan_pools(rows, states, pools, NOW)
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
            assert pp.active.proposed == st_.desired and pp.warm.proposed == st_.warm_size
            assert plan.held in pp.active.reason


def _free_pool(shape: InstanceShape, utilisation: float) -> list[Pool]:
    return [Pool("p", shape, PoolPolicy(min_size=0, max_size=10_000, max_step=10_000, target_utilisation=utilisation,
                                        hysteresis=0, scale_in_grace_s=0, mode="scale"))]


@settings(max_examples=1000, **FAST)
@given(shape=shapes, u=st.floats(0.3, 1.0), cpu=demand_values, mem=demand_values, gpu=demand_values)
def test_unconstrained_single_pool_covers_the_boot_horizon_with_the_fewest_instances(shape, u, cpu, mem, gpu):
    plan = plan_pools(forecast_rows(cpu, mem, gpu), {"p": PoolState(0)}, _free_pool(shape, u), NOW)
    n = plan.pools[0].active.target
    h = HORIZONS_MIN.index(next((h for h in HORIZONS_MIN if h * 60 >= shape.boot_s), 30))
    need = [max(cpu[: h + 1]), max(mem[: h + 1]), max(gpu[: h + 1]) if shape.gpus else 0.0]
    cap = [shape.vcpu * u, shape.memory_gb * u, shape.gpus * u]
    expected = max(ceil_count(d / c) for d, c in zip(need, cap) if c > 0)
    assert n == expected


@settings(max_examples=1000, **FAST)
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


@settings(max_examples=800, **FAST)
@given(pools=placement_pools, cpu=st.floats(0, 2000), mem=st.floats(0, 8000))
def test_placement_covers_demand_and_never_costs_more_than_the_cheapest_single_pool(pools, cpu, mem):
    placed = place_demand((cpu, mem, 0.0), pools)
    assert not placed.unmet
    for r, d in ((0, cpu), (1, mem)):
        assert sum(placed.counts[p.name] * p.capacity[r] for p in pools) >= d - 1e-6
    single = min(max(ceil_count(cpu / p.capacity[0]), ceil_count(mem / p.capacity[1])) * p.price for p in pools)
    assert placed.cost_usd_per_h <= single + 1e-9


@settings(max_examples=800, **FAST)
@given(pools=placement_pools, floors=st.lists(st.integers(0, 30), min_size=5, max_size=5),
       ceilings=st.lists(st.integers(0, 40), min_size=5, max_size=5), cpu=st.floats(0, 2000), mem=st.floats(0, 8000))
def test_placement_stays_within_floors_and_ceilings(pools, floors, ceilings, cpu, mem):
    pools = [PlacementPool(p.name, p.capacity, p.price, min(f, c), c) for p, f, c in zip(pools, floors, ceilings)]
    placed = place_demand((cpu, mem, 0.0), pools)
    for p in pools:
        assert p.floor <= placed.counts[p.name] <= p.ceiling
    if placed.unmet:  # only when every pool that could help is full
        assert all(placed.counts[p.name] == p.ceiling for p in pools)
