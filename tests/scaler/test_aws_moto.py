"""The AWS applier and bootstrap against moto (mock_aws): everything moto implements."""

from __future__ import annotations

from datetime import timedelta

import boto3
import pytest
from moto import mock_aws

from pipeline.config import AwsSettings
from pipeline.schemas import SCALING_DECISION
from scaler.aws import AwsClients, apply_plan, describe_groups, is_backfill, make_clients, scale_cycle
from scaler.aws_bootstrap import DRAIN_HOOK, PRELOAD_HOOK, bootstrap, iam_policy, protect_busy_instances
from scaler.fleet import fleet_from_dict
from scaler.policy import plan_pools
from tests.scaler.conftest import NOW, forecast_rows

MUTATING = {"UpdateAutoScalingGroup", "SetDesiredCapacity", "PutWarmPool", "CreateOrUpdateTags", "DeleteWarmPool",
            "CreateAutoScalingGroup", "PutLifecycleHook", "SetInstanceProtection"}

FLEET = {
    "defaults": {"mode": "scale", "target_utilisation": 0.5, "hysteresis": 0.0, "scale_in_grace_s": 900,
                 "max_step": 50, "boot_s": 240, "availability_zones": ["us-east-1a"], "instance_type": "t3.micro"},
    "pools": [
        {"name": "general", "vcpu": 4, "memory_gb": 16, "hourly_price_usd": 0.2, "min_size": 1, "max_size": 30,
         "warm_max_size": 10, "software_configs": ["python-3.12", "node-22"], "tags": {"team": "runtime"}},
        {"name": "memory", "vcpu": 4, "memory_gb": 32, "hourly_price_usd": 0.26, "min_size": 0, "max_size": 10,
         "warm_max_size": 4},
    ],
}


@pytest.fixture
def clients(aws_credentials):
    with mock_aws():
        yield AwsClients(boto3.client("autoscaling", region_name="us-east-1"), boto3.client("ec2", region_name="us-east-1"))


@pytest.fixture
def fleet():
    return fleet_from_dict(FLEET)


@pytest.fixture
def calls(clients):
    """``(operation, group name)`` of every API call the autoscaling client makes from here on."""
    seen: list[tuple[str, str | None]] = []
    clients.autoscaling.meta.events.register(
        "provide-client-params.autoscaling", lambda model, params, **kw: seen.append((model.name, params.get("AutoScalingGroupName"))))
    return seen


def mutating(calls) -> list[tuple[str, str | None]]:
    return [c for c in calls if c[0] in MUTATING]


def test_bootstrap_creates_templates_groups_hooks_and_warm_pools_once(clients, fleet):
    first = bootstrap(clients, fleet)
    assert {a for _, _, a in first.actions} == {"created"}
    groups = describe_groups(clients.autoscaling, ["general", "memory"])
    assert (groups["general"].min_size, groups["general"].max_size, groups["general"].desired) == (1, 30, 1)
    assert groups["general"].warm is not None and groups["general"].warm.pool_state == "Stopped"
    hooks = {h["LifecycleHookName"]: h for h in
             clients.autoscaling.describe_lifecycle_hooks(AutoScalingGroupName="general")["LifecycleHooks"]}
    assert hooks[DRAIN_HOOK]["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hooks[DRAIN_HOOK]["HeartbeatTimeout"] == 600 and hooks[DRAIN_HOOK]["DefaultResult"] == "CONTINUE"
    assert hooks[PRELOAD_HOOK]["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING"
    tags = {t["Key"]: t["Value"] for t in clients.autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=["general"])["AutoScalingGroups"][0]["Tags"]}
    assert tags["warmcast:pool"] == "general" and tags["warmcast:software-configs"] == "python-3.12,node-22"
    assert tags["team"] == "runtime"
    lt = clients.ec2.describe_launch_templates(LaunchTemplateNames=["warmcast-general"])["LaunchTemplates"][0]
    assert {"Key": "warmcast:pool", "Value": "general"} in lt["Tags"]
    again = bootstrap(clients, fleet)
    assert {a for _, _, a in again.actions} == {"exists"}


def test_apply_resizes_groups_and_warm_pools_then_a_second_apply_changes_nothing(clients, fleet, calls):
    bootstrap(clients, fleet)
    calls.clear()
    # 40 cores / 2 usable per general instance = 20 now; 60 cores at 30 min → warm 10 (its max)
    rows = forecast_rows(cpu=[40, 40, 40, 40, 40, 60], memory=10)
    plan, report = scale_cycle(clients.autoscaling, fleet.policy_pools(), rows, NOW, max_workers=1)
    assert not report.failed
    g = describe_groups(clients.autoscaling, ["general", "memory"])
    assert g["general"].desired == 20 and g["general"].warm.min_size == 10 and g["general"].warm.max_prepared == 10
    assert g["general"].last_scale_out_at == NOW
    # memory stays at 0: the general instances' memory covers the 10 GB
    assert mutating(calls) == [("UpdateAutoScalingGroup", "general"), ("CreateOrUpdateTags", None),
                               ("PutWarmPool", "general")]
    table = report.table()
    assert table.schema == SCALING_DECISION and table.num_rows == 4
    general = [d for d in report.decisions if d["pool"] == "general" and d["pool_kind"] == "active"][0]
    assert (general["current"], general["target"], general["applied"]) == (1, 20, True)
    assert "mode=scale" in general["reason"]

    calls.clear()
    _, second = scale_cycle(clients.autoscaling, fleet.policy_pools(), rows, NOW + timedelta(minutes=5))
    assert second.calls == 0 and not mutating(calls)
    assert not any(d["applied"] for d in second.decisions)


def test_dry_run_records_decisions_and_calls_no_mutating_api(clients, fleet, calls):
    bootstrap(clients, fleet)
    calls.clear()
    _, report = scale_cycle(clients.autoscaling, fleet.policy_pools(), forecast_rows(40, 10), NOW, dry_run=True)
    assert {op for op, _ in calls} == {"DescribeAutoScalingGroups"}
    assert describe_groups(clients.autoscaling, ["general"])["general"].desired == 1
    active = [d for d in report.decisions if d["pool"] == "general" and d["pool_kind"] == "active"][0]
    assert active["dry_run"] and not active["applied"] and active["target"] == 20
    assert active["reason"].startswith("dry-run: would apply")


def test_forecast_only_records_the_recommendation_and_changes_nothing(clients, fleet, calls):
    fleet = fleet_from_dict({**FLEET, "defaults": {**FLEET["defaults"], "mode": "forecast_only"}})
    bootstrap(clients, fleet)
    calls.clear()
    _, report = scale_cycle(clients.autoscaling, fleet.policy_pools(), forecast_rows(40, 10), NOW)
    assert not mutating(calls)
    active = [d for d in report.decisions if d["pool"] == "general" and d["pool_kind"] == "active"][0]
    assert (active["current"], active["target"], active["applied"], active["dry_run"]) == (1, 20, False, False)
    assert "shadow" in active["reason"] and "mode=forecast_only" in active["reason"]


def test_a_missing_pool_is_reported_and_the_others_proceed(clients, fleet, calls):
    bootstrap(clients, fleet)
    clients.autoscaling.delete_auto_scaling_group(AutoScalingGroupName="memory", ForceDelete=True)
    calls.clear()
    _, report = scale_cycle(clients.autoscaling, fleet.policy_pools(), forecast_rows(40, 10), NOW)
    assert report.failed == ["memory"]
    missing = [d for d in report.decisions if d["pool"] == "memory"]
    assert len(missing) == 1 and "no Auto Scaling group named 'memory'" in missing[0]["reason"]
    assert describe_groups(clients.autoscaling, ["general"])["general"].desired == 20
    assert {g for _, g in mutating(calls)} <= {"general", None}  # nothing was called for the missing group


def test_a_target_outside_the_group_bounds_is_refused_without_calling_aws(clients, fleet, calls):
    bootstrap(clients, fleet)
    clients.autoscaling.update_auto_scaling_group(AutoScalingGroupName="general", MaxSize=5)  # drifted group
    snaps = describe_groups(clients.autoscaling, ["general", "memory"])
    states = {n: s.pool_state() for n, s in snaps.items()}
    plan = plan_pools(forecast_rows(40, 10), states, fleet.policy_pools(), NOW)  # policy max 30 → wants 20
    calls.clear()
    report = apply_plan(clients.autoscaling, plan, snaps)
    assert "general" in report.failed and "outside the group's MinSize..MaxSize 1..5" in report.outcomes["general"].error
    assert not [c for c in mutating(calls) if c[1] == "general"]
    assert describe_groups(clients.autoscaling, ["general"])["general"].desired == 1  # moto would have taken 20


def test_a_group_changed_since_planning_is_not_touched(clients, fleet):
    bootstrap(clients, fleet)
    snaps = describe_groups(clients.autoscaling, ["general", "memory"])
    plan = plan_pools(forecast_rows(40, 10), {n: s.pool_state() for n, s in snaps.items()}, fleet.policy_pools(), NOW)
    clients.autoscaling.update_auto_scaling_group(AutoScalingGroupName="general", DesiredCapacity=3)  # someone else
    report = apply_plan(clients.autoscaling, plan, describe_groups(clients.autoscaling, ["general", "memory"]))
    assert "changed since planning" in report.outcomes["general"].error
    assert describe_groups(clients.autoscaling, ["general"])["general"].desired == 3


def test_scale_in_waits_for_the_grace_period_recorded_on_the_group(clients, fleet):
    bootstrap(clients, fleet)
    pools = fleet.policy_pools()
    scale_cycle(clients.autoscaling, pools, forecast_rows(40, 10), NOW)  # scale out to 20, tags the time
    quiet = forecast_rows(2, 1, issued_at=NOW + timedelta(minutes=10))
    _, early = scale_cycle(clients.autoscaling, pools, quiet, NOW + timedelta(minutes=10))
    assert describe_groups(clients.autoscaling, ["general"])["general"].desired == 20
    assert "grace left" in [d for d in early.decisions if d["pool"] == "general"][0]["reason"]
    late = forecast_rows(2, 1, issued_at=NOW + timedelta(minutes=16))
    scale_cycle(clients.autoscaling, pools, late, NOW + timedelta(minutes=16))
    assert describe_groups(clients.autoscaling, ["general"])["general"].desired == 1


def test_busy_instances_are_protected_and_never_scaled_in(clients, fleet):
    bootstrap(clients, fleet)
    clients.autoscaling.update_auto_scaling_group(AutoScalingGroupName="general", DesiredCapacity=6)
    ids = [i["InstanceId"] for i in clients.autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=["general"])["AutoScalingGroups"][0]["Instances"]]
    assert protect_busy_instances(clients.autoscaling, "general", busy=ids[:4], idle=ids[4:]) == 2
    snap = describe_groups(clients.autoscaling, ["general"])["general"]
    assert snap.protected == 4 and snap.pool_state().in_use == 4
    scale_cycle(clients.autoscaling, fleet.policy_pools(), forecast_rows(0, 0), NOW)  # no demand at all
    assert describe_groups(clients.autoscaling, ["general"])["general"].desired == 4


def test_warm_pool_not_sized_by_warmcast_is_read_with_aws_sizing_rule(clients, fleet):
    bootstrap(clients, fleet)
    clients.autoscaling.put_warm_pool(AutoScalingGroupName="general", MinSize=2)  # no MaxGroupPreparedCapacity
    snap = describe_groups(clients.autoscaling, ["general"])["general"]
    assert snap.pool_state().warm_size == 30 - 1  # MaxSize − desired
    scale_cycle(clients.autoscaling, fleet.policy_pools(), forecast_rows([40, 40, 40, 40, 40, 60], 10), NOW)
    warm = describe_groups(clients.autoscaling, ["general"])["general"].warm
    assert (warm.min_size, warm.max_prepared) == (10, 10)  # made absolute: MinSize = MaxGroupPreparedCapacity


def test_clients_carry_the_retry_mode_and_endpoint_from_settings(aws_credentials):
    c = make_clients(AwsSettings(region="eu-west-1", endpoint_url="http://127.0.0.1:9", retry_mode="adaptive",
                                 max_attempts=3))
    cfg = c.autoscaling.meta.config
    assert cfg.retries["mode"] == "adaptive" and cfg.retries["total_max_attempts"] == 4  # botocore: retries + 1
    assert c.autoscaling.meta.endpoint_url == "http://127.0.0.1:9" and c.ec2.meta.region_name == "eu-west-1"


def test_iam_policy_allows_every_mutating_call_the_scaler_makes():
    doc = iam_policy()
    allowed = {a for s in doc["Statement"] for a in s["Action"]}
    for action in ("UpdateAutoScalingGroup", "PutWarmPool", "CreateOrUpdateTags", "SetInstanceProtection",
                   "CompleteLifecycleAction", "RecordLifecycleActionHeartbeat", "DescribeAutoScalingGroups",
                   "CreateAutoScalingGroup", "PutLifecycleHook", "DescribeLifecycleHooks"):
        assert f"autoscaling:{action}" in allowed
    assert {"ec2:CreateLaunchTemplate", "ec2:DescribeLaunchTemplates"} <= allowed
    assert not any(a.endswith("*") for a in allowed)
    # deleting is allowed only for sub-pool groups (by name prefix and tag), never for the shared pools
    deleting = [s for s in doc["Statement"] if "autoscaling:DeleteAutoScalingGroup" in s["Action"]]
    assert len(deleting) == 1 and deleting[0]["Resource"].endswith("autoScalingGroupName/warmcast-sub-*")
    assert deleting[0]["Condition"] == {"StringEquals": {"aws:ResourceTag/warmcast:subpool": "true"}}


def test_a_back_fill_is_recognised_so_the_caller_can_force_a_dry_run():
    assert is_backfill(NOW, wall_clock=NOW + timedelta(hours=1))
    assert not is_backfill(NOW, wall_clock=NOW + timedelta(seconds=30))
