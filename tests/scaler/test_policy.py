"""The sizing policy on hand-checked examples: packing, horizons, guards, modes, bad forecasts."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from pipeline.schemas import SYSTEM_FORECAST
from scaler.forecast_view import horizon_covering
from scaler.policy import InstanceShape, PlanOptions, Pool, PoolPolicy, PoolState, guard_size, plan_pools
from tests.scaler.conftest import NOW, forecast_rows

GENERAL = InstanceShape(vcpu=4, memory_gb=16, hourly_price_usd=0.20, boot_s=240, resume_s=60)


def one_pool(**policy) -> list[Pool]:
    base = dict(min_size=0, max_size=100, max_step=100, target_utilisation=0.5, hysteresis=0.0,
                scale_in_grace_s=0, mode="scale", warm_max_size=100)
    return [Pool("general", GENERAL, PoolPolicy(**{**base, **policy}))]


def plan_one(rows, state=PoolState(desired=0), **policy):
    return plan_pools(rows, {"general": state}, one_pool(**policy), NOW).pools[0]


def test_instances_are_the_max_over_resources_at_target_utilisation():
    # 4 cores × 0.5 = 2 usable cores, 8 usable GB per instance
    assert plan_one(forecast_rows(cpu=10, memory=8)).active.target == 5  # cores bind: 10 / 2
    assert plan_one(forecast_rows(cpu=2, memory=60)).active.target == 8  # memory binds: 60 / 8 → 7.5 → 8
    assert plan_one(forecast_rows(cpu=4.0000000001, memory=1)).active.target == 2  # float noise is not an instance


def test_active_pool_covers_boot_time_plus_the_decision_interval_and_warm_the_30_minute_bound():
    cpu = [2, 4, 6, 8, 10, 20]  # upper bound per horizon 5..30 min; 2 usable cores per instance
    # boot 240 s + the next decision 300 s later → the 10-min bucket (max over 5..10 min = 4 cores)
    p = plan_one(forecast_rows(cpu=cpu, memory=1))
    assert p.active.target == 2 and p.warm.target == 10 - 2 and "10-min demand" in p.active.reason
    slow = [Pool("general", InstanceShape(4, 16, boot_s=700), one_pool()[0].policy)]
    p = plan_pools(forecast_rows(cpu=cpu, memory=1), {"general": PoolState(0)}, slow, NOW).pools[0]
    assert p.active.target == 4  # 700 + 300 s → the 20-min bucket (max over 5..20 min = 8 cores)
    assert horizon_covering(0) == 5 and horizon_covering(301) == 10 and horizon_covering(5000) == 30


def test_the_active_pool_is_not_one_decision_interval_short():
    """Demand that arrives after this cycle's launches boot but before the next cycle's launches
    boot can only be served by capacity launched now (the review's finding)."""
    cpu = [2, 40, 40, 40, 40, 40]  # a step at 5..10 min; boot 240 s
    pools = one_pool()
    for interval_s, bucket, want in ((0.0, 5, 1), (300.0, 10, 20), (900.0, 20, 20)):
        p = plan_pools(forecast_rows(cpu=cpu, memory=1), {"general": PoolState(0)}, pools, NOW,
                       options=PlanOptions(decision_interval_s=interval_s)).pools[0]
        assert p.active.target == want and f"{bucket}-min demand" in p.active.reason, (interval_s, p.active.reason)
    with pytest.raises(ValueError, match="decision_interval_s"):
        PlanOptions(decision_interval_s=-1)


def test_demand_peaking_early_is_not_dropped_by_a_later_horizon():
    p = plan_pools(forecast_rows(cpu=[20, 2, 2, 2, 2, 2], memory=1), {"general": PoolState(0)},
                   [Pool("general", InstanceShape(4, 16, boot_s=1000), one_pool()[0].policy)], NOW).pools[0]
    assert p.active.target == 10  # the 20-min horizon is used, but the 5-min peak still counts


def test_never_below_instances_in_use_and_clamped_to_bounds():
    assert plan_one(forecast_rows(0, 0), PoolState(desired=9, in_use=7)).active.target == 7
    assert plan_one(forecast_rows(1000, 1), PoolState(desired=3), max_size=12).active.target == 12
    assert plan_one(forecast_rows(0, 0), PoolState(desired=3), min_size=4).active.target == 4


def test_step_limit_hysteresis_and_grace():
    assert plan_one(forecast_rows(100, 1), PoolState(desired=10), max_step=5).active.target == 15
    assert plan_one(forecast_rows(0, 0), PoolState(desired=10), max_step=3).active.target == 7
    # 20 → 19 wanted: inside a 10 % band (2 instances) → hold
    held = plan_one(forecast_rows(38, 1), PoolState(desired=20), hysteresis=0.1)
    assert held.active.target == 20 and "hysteresis" in held.active.reason
    # scale-out 10 minutes ago, grace 15 minutes → no scale-in yet; 16 minutes ago → scale in
    recent = PoolState(desired=10, last_scale_out_at=NOW - timedelta(minutes=10))
    p = plan_one(forecast_rows(2, 1), recent, scale_in_grace_s=900)
    assert p.active.target == 10 and "300 s of grace left" in p.active.reason
    old = PoolState(desired=10, last_scale_out_at=NOW - timedelta(minutes=16))
    assert plan_one(forecast_rows(2, 1), old, scale_in_grace_s=900).active.target == 1
    # a scale-out is never held by grace or hysteresis
    assert plan_one(forecast_rows(40, 1), recent, scale_in_grace_s=900, hysteresis=0.5).active.target == 20


def test_bounds_win_over_the_step_limit_when_the_operator_moves_them():
    size, notes = guard_size(2, 2, floor=10, ceiling=20, max_step=1, hysteresis=0, grace_left_s=0)
    assert size == 10 and "floor" in notes[0]


@pytest.mark.parametrize("mode, expected", [("forecast_only", 10), ("scale_out_only", 10), ("scale", 1)])
def test_rollout_modes_on_a_scale_in(mode, expected):
    p = plan_one(forecast_rows(2, 1), PoolState(desired=10, warm_size=5, warm_state="Stopped"), mode=mode)
    assert p.active.proposed == 1  # the recommendation is recorded in every mode
    assert p.active.target == expected
    assert f"mode={mode}" in p.active.reason


def test_forecast_only_changes_nothing_even_when_scaling_out():
    p = plan_one(forecast_rows(100, 1), PoolState(desired=2, warm_size=0), mode="forecast_only")
    assert p.active.proposed > 2 and not p.active.changes and not p.warm.changes
    assert "not applied by mode" in p.active.reason


def test_warm_pool_is_running_only_when_needed_within_the_resume_time():
    # the step limit keeps the active pool short of the 5-min demand: warm instances are needed now
    p = plan_one(forecast_rows(100, 1), PoolState(desired=0), max_step=10)
    assert p.active.target == 10 and p.warm_state == "Running"
    # demand rises only at 30 min: keep the warm pool stopped (or hibernated, if preferred)
    later = forecast_rows([2, 2, 2, 2, 2, 40], 1)
    assert plan_one(later).warm_state == "Stopped"
    assert plan_one(later, idle_warm_state="Hibernated").warm_state == "Hibernated"
    assert plan_one(later).warm.target == 20 - 1


@pytest.mark.parametrize(
    "rows, words",
    [
        ([], "forecast missing"),
        (forecast_rows(5, 5, issued_at=NOW - timedelta(minutes=30)), "forecast stale"),
        (forecast_rows(5, 5, issued_at=NOW + timedelta(hours=1)), "forecast missing"),
        ([r for r in forecast_rows(5, 5) if not (r["resource"] == "memory_gb" and r["horizon_min"] == 15)],
         "lacks memory_gb at 15 min"),
        ([{**r, "upper": math.nan} if r["horizon_min"] == 10 else r for r in forecast_rows(5, 5)], "upper=nan"),
        ([{**r, "upper": -3.0} if r["resource"] == "cpu_cores" else r for r in forecast_rows(5, 5)], "negative upper"),
        ([{**r, "upper": math.inf} for r in forecast_rows(5, 5)], "upper=inf"),
        (forecast_rows(5, 5) + forecast_rows(5, 5)[:1], "duplicate rows"),
    ],
    ids=["empty", "stale", "future", "incomplete", "nan", "negative", "inf", "duplicate"],
)
def test_bad_forecast_holds_every_pool_and_says_why(rows, words):
    state = PoolState(desired=6, in_use=2, warm_size=3, warm_state="Stopped")
    plan = plan_pools(rows, {"general": state}, one_pool(), NOW, options=PlanOptions(on_bad_forecast="hold"))
    p = plan.pools[0]
    assert plan.held and words in plan.held and plan.basis == "hold"
    assert (p.active.target, p.warm.target, p.warm_state) == (6, 3, "Stopped")
    assert words in p.active.reason and p.active.reason.startswith("mode=scale; basis=hold; 6 → 6; hold: forecast")


@pytest.mark.parametrize("rows", [[], forecast_rows(500, 500, issued_at=NOW - timedelta(minutes=30))], ids=["missing", "stale"])
def test_bad_forecast_falls_back_to_reactive_scale_out_only_by_default(rows):
    # 5 of 6 instances busy at a 50 % target: target tracking wants ceil(5 / 0.5) = 10
    busy = plan_pools(rows, {"general": PoolState(desired=6, in_use=5, warm_size=3)}, one_pool(), NOW)
    p = busy.pools[0]
    assert busy.basis == "reactive" and busy.held
    assert p.active.target == 10 and p.warm.target == 3  # the warm pool holds: nothing says how much to prepare
    assert p.active.reason.startswith("mode=scale; basis=reactive; 6 → 10; reactive: 10 for 5 in use at 50%")
    assert busy.held in p.active.reason and "basis=hold" in p.warm.reason
    # idle: a missing forecast never removes capacity (the stale forecast's 500 cores are not acted on either)
    idle = plan_pools(rows, {"general": PoolState(desired=6, in_use=1)}, one_pool(), NOW).pools[0]
    assert idle.active.target == 6
    # the guards still apply: step limit, max size
    capped = plan_pools(rows, {"general": PoolState(desired=6, in_use=6)}, one_pool(max_step=2, max_size=7), NOW)
    assert capped.pools[0].active.target == 7
    with pytest.raises(ValueError, match="on_bad_forecast"):
        PlanOptions(on_bad_forecast="guess")


def test_a_good_forecast_is_the_basis():
    plan = plan_pools(forecast_rows(10, 1), {"general": PoolState(0)}, one_pool(), NOW)
    assert plan.basis == "forecast" and plan.held is None and "basis=forecast" in plan.pools[0].active.reason


def test_hold_still_honours_the_bounds():
    p = plan_pools([], {"general": PoolState(desired=1)}, one_pool(min_size=3), NOW,
                   options=PlanOptions(on_bad_forecast="hold")).pools[0]
    assert p.active.target == 3


def test_reads_the_newest_issue_at_or_before_now_from_an_arrow_table():
    old = forecast_rows(2, 1, issued_at=NOW - timedelta(minutes=5))
    new = forecast_rows(20, 1, issued_at=NOW)
    later = forecast_rows(200, 1, issued_at=NOW + timedelta(minutes=10))  # a back-fill must not see it
    table = pa.Table.from_pylist(old + new + later, schema=SYSTEM_FORECAST)
    plan = plan_pools(table, {"general": PoolState(0)}, one_pool(), NOW)
    assert plan.forecast_issued_at == NOW and plan.pools[0].active.target == 10


def test_pools_without_state_are_skipped_not_guessed():
    pools = one_pool() + [Pool("ghost", GENERAL, PoolPolicy(mode="scale"))]
    plan = plan_pools(forecast_rows(10, 1), {"general": PoolState(0)}, pools, NOW)
    assert [p.pool for p in plan.pools] == ["general"] and "ghost" in plan.skipped


def test_gpu_demand_goes_to_the_gpu_pool_and_unmet_demand_is_reported():
    gpu = InstanceShape(vcpu=8, memory_gb=32, gpus=1, hourly_price_usd=1.0, boot_s=240)
    pools = one_pool() + [Pool("gpu", gpu, PoolPolicy(max_size=2, max_step=10, target_utilisation=1.0, mode="scale"))]
    states = {"general": PoolState(0), "gpu": PoolState(0)}
    plan = plan_pools(forecast_rows(cpu=4, memory=4, gpus=3), states, pools, NOW)
    by = plan.by_pool()
    assert by["gpu"].active.target == 2 and plan.unmet == {"gpus": pytest.approx(1.0)}
    assert by["general"].active.target == 0  # the GPU instances' 16 cores cover the CPU demand


def test_placement_prefers_the_cheaper_shape_for_the_demand_mix():
    memory = InstanceShape(vcpu=4, memory_gb=32, hourly_price_usd=0.26, boot_s=240)
    pol = one_pool()[0].policy
    pools = [Pool("general", GENERAL, pol), Pool("memory", memory, pol)]
    states = {"general": PoolState(0), "memory": PoolState(0)}
    cpu_heavy = plan_pools(forecast_rows(cpu=40, memory=40), states, pools, NOW).by_pool()
    mem_heavy = plan_pools(forecast_rows(cpu=8, memory=320), states, pools, NOW).by_pool()
    assert cpu_heavy["general"].active.target == 20 and cpu_heavy["memory"].active.target == 0
    assert mem_heavy["memory"].active.target == 20 and mem_heavy["general"].active.target == 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(min_size=5, max_size=3), "min 5 > max 3"),
        (dict(max_step=0), "max_step"),
        (dict(target_utilisation=0), "target_utilisation"),
        (dict(mode="yolo"), "mode"),
        (dict(warm_min_size=4, warm_max_size=2), "warm_min_size"),
        (dict(hysteresis=1.0), "hysteresis"),
    ],
)
def test_bad_policies_are_rejected_with_the_reason(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PoolPolicy(**kwargs)


def test_naive_now_and_duplicate_pools_are_rejected():
    with pytest.raises(ValueError, match="timezone-aware"):
        plan_pools([], {}, one_pool(), NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="unique"):
        plan_pools([], {}, one_pool() + one_pool(), NOW)


def test_a_multi_method_system_forecast_is_read_at_the_tiered_target():
    """An aggregated issue holds copula, naive-sum and tiered rows; the scaler acts on the tiered one."""
    import pyarrow as pa

    from pipeline.schemas import SYSTEM_FORECAST
    from scaler.forecast_view import demand_by_horizon

    now = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)
    rows = [
        {"issued_at": now, "horizon_min": h, "resource": r, "mean": 10.0, "lower": 5.0, "upper": up,
         "level": 0.9, "n_users": 3, "method": method}
        for method, up in (("copula_sample", 20.0), ("quantile_sum", 40.0), ("tiered_target", 25.0))
        for h in (5, 10, 15, 20, 25, 30)
        for r in ("requests", "cpu_cores", "memory_gb", "gpus")
    ]
    read = demand_by_horizon(pa.Table.from_pylist(rows, schema=SYSTEM_FORECAST), now, max_age_s=600, shading=0.0)
    assert not isinstance(read, str), read
    assert read.by_horizon[5][0] == 25.0  # the tiered target's upper bound, not the naive sum's
    # with the top-down band, the reconciled target (never below it) is the one acted on
    rows += [{**r, "method": m, "upper": up} for r in rows[:24] for m, up in (("topdown_empirical", 30.0),
                                                                              ("reconciled_target", 30.0))]
    read = demand_by_horizon(pa.Table.from_pylist(rows, schema=SYSTEM_FORECAST), now, max_age_s=600, shading=0.0)
    assert read.by_horizon[5][0] == 30.0


def test_warm_headroom_keeps_a_share_of_the_active_pool_stopped_beyond_the_forecast():
    cpu = [2, 4, 6, 8, 10, 12]  # 2 usable cores per instance: active 2 (10-min bucket), 30-min total 6
    assert plan_one(forecast_rows(cpu=cpu, memory=1)).warm.target == 4
    p = plan_one(forecast_rows(cpu=cpu, memory=1), warm_headroom=2.5)  # ceil(2.5 × 2) = 5 > 4
    assert (p.active.target, p.warm.target) == (2, 5) and "headroom 2.5 × active 2 = 5" in p.warm.reason
    assert plan_one(forecast_rows(cpu=cpu, memory=1), warm_headroom=1.0).warm.target == 4  # the forecast asks for more
    assert plan_one(forecast_rows(cpu=cpu, memory=1), warm_headroom=10.0, warm_max_size=7).warm.target == 7  # bounded
    assert p.warm_state == "Stopped"
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="warm_headroom"):
            PoolPolicy(warm_headroom=bad)
