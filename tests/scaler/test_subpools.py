"""User sub-pools, pure: top software configurations, per-user demand, who gets a sub-pool, its size,
retirement after the grace period, and the demand subtracted from the shared pools."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.schemas import REQUEST_LOG
from scaler.policy import InstanceShape, Pool, PoolPolicy, PoolState, plan_pools
from scaler.subpools import (SUBPOOL_PREFIX, SubpoolPolicy, SubpoolState, plan_subpools, read_user_demand,
                             subpool_group_name, rank_software_configs, software_config_usage,
                             top_software_configs)
from tests.scaler.conftest import NOW, forecast_rows, user_forecast_table

SHAPE = InstanceShape(vcpu=8, memory_gb=32, hourly_price_usd=0.4, boot_s=240)
# usable per instance at 50 %: 4 cores, 16 GB; enter at 2 instances (8 cores), stay above 1 (4 cores)
POLICY = SubpoolPolicy(shape=SHAPE, target_utilisation=0.5, enter_instances=2, exit_instances=1, retire_grace_s=1800,
                       max_subpools=10, min_size=1, max_size=10, max_step=10, hysteresis=0.0, scale_in_grace_s=0,
                       mode="scale")
CONFIGS = {"alice": ("py-3.12", "torch"), "bob": ("node-22",), "carol": ("r-4",)}


def demand(users: dict, **kw):
    return read_user_demand(user_forecast_table(users, **kw), NOW, max_age_s=600)


def by_user(plan):
    return {p.user_id: p for p in plan.pools}


def requests(rows: list[tuple[str, str, float]], ts: datetime = NOW) -> pa.Table:
    return pa.Table.from_pylist([
        {"request_id": f"r{i}", "user_id": u, "program_id": "p", "software_config": c, "ts": ts + timedelta(seconds=i),
         "duration_s": 10.0, "cpu_cores": cores, "memory_mb": 100.0, "gpus": 0.0}
        for i, (u, c, cores) in enumerate(rows)], schema=REQUEST_LOG)


def test_top_software_configs_counts_requests_breaks_ties_by_work_and_respects_the_window():
    t = requests([("alice", "py", 1)] * 3 + [("alice", "torch", 1)] * 2 + [("alice", "node", 8)] * 2
                 + [("alice", "r", 1)] + [("bob", "node", 1)] + [("../etc", "py", 1)] + [("bob", "bad/cfg", 1)] * 5)
    top = top_software_configs(t, k=3)
    assert top["alice"] == ("py", "node", "torch")  # node and torch tie on count; node has more core-seconds
    assert top["bob"] == ("node",)  # a config that is not a well-formed id is never preloaded
    assert "../etc" not in top  # nor is a user id that is not one
    assert top_software_configs(t, k=1)["alice"] == ("py",)
    late = requests([("alice", "late", 1)] * 9, ts=NOW + timedelta(hours=1))
    both = pa.concat_tables([t, late])
    assert top_software_configs(both, k=1, end=NOW + timedelta(minutes=30))["alice"] == ("py",)
    assert top_software_configs(both, k=1, start=NOW + timedelta(minutes=30)) == {"alice": ("late",)}
    with pytest.raises(ValueError, match="software_config"):
        top_software_configs(t.drop_columns(["software_config"]))


def test_usages_of_parts_of_a_log_add_up_to_the_whole_logs_ranking():
    """The scaler cycle ranks a day of requests batch by batch: per-part usages concatenated give
    the ranking of the whole log, ties (on count, broken by core-seconds across parts) included;
    dictionary-encoded ids (as the lake's Parquet dictionaries are read) come out as strings."""
    t = requests([("alice", "py", 1)] * 3 + [("alice", "torch", 1)] * 2 + [("alice", "node", 8)] * 2
                 + [("alice", "r", 1)] + [("bob", "node", 1)] + [("bob", "py", 1)] * 2 + [("../etc", "py", 1)])
    parts = [t.slice(i, 2) for i in range(0, t.num_rows, 2)]  # node's two requests land in different parts
    parts[1] = parts[1].set_column(1, "user_id", pc.dictionary_encode(parts[1]["user_id"]))
    usage = pa.concat_tables([software_config_usage(p) for p in parts])
    assert usage.schema.field("user_id").type == pa.string()
    for k in (1, 2, 3):
        assert rank_software_configs(usage, k) == top_software_configs(t, k=k)
    assert rank_software_configs(usage, 3) == {"alice": ("py", "node", "torch"), "bob": ("py", "node")}
    whole = software_config_usage(t).sort_by([("user_id", "ascending"), ("software_config", "ascending")])
    assert whole.to_pylist()[0] == {"user_id": "../etc", "software_config": "py", "requests": 1, "core_seconds": 10.0}
    with pytest.raises(ValueError, match="k=0"):
        rank_software_configs(usage, 0)


def test_user_demand_is_the_running_max_of_the_quantile_and_bad_users_are_skipped():
    read = demand({"alice": [(1, 1), (9, 2), (3, 3), (3, 3), (3, 3), (3, 3)]})
    a = read.users["alice"]
    assert a.sized[5] == (1, 1, 0) and a.sized[10] == (9, 2, 0) and a.sized[30] == (9, 3, 0)
    assert a.mean[10][0] == pytest.approx(9 * 0.8)
    table = user_forecast_table({"alice": (5, 5), "bob": (5, 5)})
    bad = table.set_column(table.schema.get_field_index("q90"), "q90", pa.array(
        [math.nan if u == "bob" else v for u, v in zip(table["user_id"].to_pylist(), table["q90"].to_pylist())]))
    read = read_user_demand(bad, NOW, max_age_s=600)
    assert set(read.users) == {"alice"} and "non-finite" in read.skipped["bob"]
    stale = read_user_demand(user_forecast_table({"alice": (5, 5)}, issued_at=NOW - timedelta(hours=1)), NOW,
                             max_age_s=600)
    assert isinstance(stale, str) and stale.startswith("user forecast stale")
    assert read_user_demand(None, NOW, max_age_s=600).startswith("user forecast missing")


def test_a_user_above_the_enter_threshold_gets_a_sub_pool_sized_like_any_pool():
    plan = plan_subpools(demand({"alice": (20, 10), "bob": (6, 1)}), {}, CONFIGS, POLICY, NOW)
    p = by_user(plan)
    assert set(p) == {"alice"}  # bob needs 1.5 instances, below the 2 to enter
    a = p["alice"]
    assert (a.action, a.current, a.target) == ("create", 0, 5)  # 20 cores / 4 usable
    assert a.group == subpool_group_name("alice") and a.group.startswith(SUBPOOL_PREFIX) and "alice" not in a.group
    assert a.software_configs == ("py-3.12", "torch") and a.qualified_at == NOW
    assert plan.served == {}  # nothing is in service yet: the shared pools still cover alice this cycle


def test_hysteresis_keeps_a_sub_pool_between_the_exit_and_enter_thresholds():
    st = SubpoolState("bob", subpool_group_name("bob"), desired=2, in_service=2, last_qualified_at=NOW - timedelta(hours=5))
    p = by_user(plan_subpools(demand({"bob": (6, 1)}), {"bob": st}, CONFIGS, POLICY, NOW))["bob"]
    assert p.action == "keep" and p.target == 2 and p.qualified_at == NOW  # 1.5 ≥ exit 1: still qualifies
    assert "exit 1" in p.reason


def test_retire_only_after_the_grace_period_then_drain_then_delete():
    group = subpool_group_name("bob")
    quiet = demand({"bob": (1, 1)})  # need 0.25 < exit 1
    recent = SubpoolState("bob", group, desired=3, in_service=3, last_qualified_at=NOW - timedelta(minutes=20))
    p = by_user(plan_subpools(quiet, {"bob": recent}, CONFIGS, POLICY, NOW))["bob"]
    assert p.action in ("resize", "keep") and p.target >= 1 and "retires in 600 s" in p.reason
    assert p.qualified_at is None  # the grace keeps counting from the last qualifying demand
    old = SubpoolState("bob", group, desired=3, in_service=3, in_use=1, last_qualified_at=NOW - timedelta(minutes=31))
    p = by_user(plan_subpools(quiet, {"bob": old}, CONFIGS, POLICY, NOW))["bob"]
    assert (p.action, p.target) == ("drain", 1)  # never below the instance still busy
    empty = SubpoolState("bob", group, desired=0, in_service=0, last_qualified_at=NOW - timedelta(hours=2))
    p = by_user(plan_subpools(quiet, {"bob": empty}, CONFIGS, POLICY, NOW))["bob"]
    assert p.action == "delete" and p.changes
    # demand that qualifies again during the grace revives it
    p = by_user(plan_subpools(demand({"bob": (30, 1)}), {"bob": recent}, CONFIGS, POLICY, NOW))["bob"]
    assert p.action == "resize" and p.target == 8 and p.qualified_at == NOW


def test_a_missing_user_forecast_holds_every_sub_pool_and_creates_none():
    st = SubpoolState("bob", subpool_group_name("bob"), desired=3, in_service=3, last_qualified_at=NOW - timedelta(days=1))
    plan = plan_subpools("user forecast missing: no rows", {"bob": st}, CONFIGS, POLICY, NOW)
    (p,) = plan.pools
    assert (p.action, p.target) == ("hold", 3) and "user forecast missing" in p.reason and plan.held
    assert not p.changes and plan.served == {}


def test_max_subpools_goes_to_the_largest_need_and_users_without_configs_are_passed_over():
    policy = SubpoolPolicy(**{**POLICY.__dict__, "max_subpools": 1})
    plan = plan_subpools(demand({"alice": (20, 1), "bob": (40, 1), "dave": (90, 1)}), {}, CONFIGS, policy, NOW)
    assert [p.user_id for p in plan.pools] == ["bob"]
    assert "max_subpools" in plan.skipped["alice"] and "no software configurations" in plan.skipped["dave"]


def test_rollout_modes_record_but_do_not_apply():
    empty = SubpoolState("bob", subpool_group_name("bob"), desired=2, in_service=2, last_qualified_at=NOW - timedelta(hours=2))
    d = demand({"alice": (20, 1), "bob": (0, 0)})
    shadow = by_user(plan_subpools(d, {"bob": empty}, CONFIGS, SubpoolPolicy(**{**POLICY.__dict__, "mode": "forecast_only"}), NOW))
    assert shadow["alice"].proposed == 5 and shadow["alice"].target == 0 and not shadow["alice"].changes
    assert shadow["bob"].action == "drain" and shadow["bob"].target == 2 and not shadow["bob"].changes
    out_only = by_user(plan_subpools(d, {"bob": empty}, CONFIGS, SubpoolPolicy(**{**POLICY.__dict__, "mode": "scale_out_only"}), NOW))
    assert out_only["alice"].changes and out_only["alice"].target == 5
    assert not out_only["bob"].changes and "not applied by mode" in out_only["bob"].reason


def test_served_demand_is_subtracted_from_the_shared_pools_and_never_beyond_the_users_mean():
    st = SubpoolState("alice", subpool_group_name("alice"), desired=5, in_service=5, last_qualified_at=NOW)
    # alice: q90 20 cores → 5 sub-pool instances (20 usable cores); her mean is 16 cores
    sub = plan_subpools(demand({"alice": (20, 10)}), {"alice": st}, CONFIGS, POLICY, NOW)
    assert sub.served[5] == pytest.approx((16.0, 8.0, 0.0))
    shared = [Pool("general", InstanceShape(4, 16, boot_s=240),
                   PoolPolicy(max_size=100, max_step=100, target_utilisation=0.5, hysteresis=0, scale_in_grace_s=0, mode="scale"))]
    system = forecast_rows(cpu=40, memory=10)  # the system bound includes alice
    alone = plan_pools(system, {"general": PoolState(0)}, shared, NOW).pools[0].active.target
    with_sub = plan_pools(system, {"general": PoolState(0)}, shared, NOW, served=sub.served)
    assert alone == 20 and with_sub.pools[0].active.target == 12  # (40 − 16) / 2 usable cores
    # capacity still booting is not counted: a sub-pool with 1 of 5 instances in service serves 4 cores
    booting = SubpoolState("alice", st.group, desired=5, in_service=1, last_qualified_at=NOW)
    assert plan_subpools(demand({"alice": (20, 10)}), {"alice": booting}, CONFIGS, POLICY, NOW).served[5][0] == 4.0
    with pytest.raises(ValueError, match="served"):
        plan_pools(system, {"general": PoolState(0)}, shared, NOW, served={5: (-1.0, 0.0, 0.0)})


def test_sub_pool_policy_rejects_inconsistent_thresholds():
    with pytest.raises(ValueError, match="exit_instances <= enter_instances"):
        SubpoolPolicy(shape=SHAPE, enter_instances=1, exit_instances=2)
    with pytest.raises(ValueError, match="quantile"):
        SubpoolPolicy(shape=SHAPE, quantile="q99")
