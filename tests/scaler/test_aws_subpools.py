"""User sub-pools against moto: created from a launch template with tags, resized idempotently,
drained and deleted after the grace period, and their demand taken off the shared pools."""

from __future__ import annotations

from datetime import timedelta

import boto3
import pytest
from moto import mock_aws

from scaler.aws import AwsClients, describe_groups, scale_cycle
from scaler.aws_bootstrap import bootstrap
from scaler.aws_subpools import LAST_QUALIFIED_TAG, SUBPOOL_TAG, USER_TAG, describe_subpools
from scaler.fleet import fleet_from_dict
from scaler.subpools import subpool_group_name
from tests.scaler.conftest import NOW, forecast_rows, user_forecast_table

FLEET = {
    "defaults": {"mode": "scale", "target_utilisation": 0.5, "hysteresis": 0.0, "scale_in_grace_s": 0,
                 "max_step": 50, "boot_s": 240, "instance_type": "t3.micro"},
    "pools": [{"name": "general", "vcpu": 4, "memory_gb": 16, "hourly_price_usd": 0.2, "min_size": 0, "max_size": 40}],
    "subpools": {"vcpu": 8, "memory_gb": 32, "hourly_price_usd": 0.4, "boot_s": 240, "target_utilisation": 0.5,
                 "enter_instances": 2, "exit_instances": 1, "retire_grace_s": 1800, "min_size": 1, "max_size": 10,
                 "hysteresis": 0.0, "scale_in_grace_s": 0, "mode": "scale", "instance_type": "m7i.2xlarge",
                 "tags": {"team": "runtime"}},
}
CONFIGS = {"alice": ("py-3.12", "torch")}
ALICE = subpool_group_name("alice")
MUTATING = {"UpdateAutoScalingGroup", "PutWarmPool", "CreateOrUpdateTags", "CreateAutoScalingGroup",
            "DeleteAutoScalingGroup", "PutLifecycleHook"}


@pytest.fixture
def clients(aws_credentials):
    with mock_aws():
        yield AwsClients(boto3.client("autoscaling", region_name="us-east-1"), boto3.client("ec2", region_name="us-east-1"))


@pytest.fixture
def fleet(clients):
    f = fleet_from_dict(FLEET)
    bootstrap(clients, f)
    return f


@pytest.fixture
def calls(clients):
    seen: list[str] = []
    clients.autoscaling.meta.events.register("provide-client-params.autoscaling",
                                             lambda model, params, **kw: seen.append(model.name))
    return seen


def cycle(clients, fleet, at, alice_cores, system_cores=40.0, **kw):
    users = user_forecast_table({"alice": (alice_cores, 4.0), "bob": (1.0, 1.0)}, issued_at=at)
    return scale_cycle(clients.autoscaling, fleet.policy_pools(), forecast_rows(system_cores, 10, issued_at=at), at,
                       subpools=fleet.subpools, user_forecast=users, user_configs=CONFIGS, ec2=clients.ec2,
                       max_workers=1, **kw)


def group(clients, name):
    gs = clients.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    return gs[0] if gs else None


def test_a_heavy_user_gets_a_tagged_sub_pool_from_a_launch_template_and_a_repeat_changes_nothing(clients, fleet, calls):
    plan, report = cycle(clients, fleet, NOW, alice_cores=20)
    assert not report.failed, report.outcomes
    g = group(clients, ALICE)
    assert g["DesiredCapacity"] == 5 and g["MinSize"] == 0 and g["MaxSize"] == 10  # 20 cores / 4 usable
    tags = {t["Key"]: t["Value"] for t in g["Tags"]}
    assert tags[USER_TAG] == "alice" and tags[SUBPOOL_TAG] == "true" and tags["warmcast:pool"] == ALICE
    assert tags["warmcast:software-configs"] == "py-3.12,torch" and tags["team"] == "runtime"
    assert tags[LAST_QUALIFIED_TAG] == NOW.isoformat()
    assert g["LaunchTemplate"]["LaunchTemplateName"] == ALICE
    lt = clients.ec2.describe_launch_templates(LaunchTemplateNames=[ALICE])["LaunchTemplates"][0]
    assert {"Key": USER_TAG, "Value": "alice"} in lt["Tags"]
    hooks = clients.autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=ALICE)["LifecycleHooks"]
    assert {h["LifecycleHookName"] for h in hooks} == {"warmcast-preload", "warmcast-drain"}
    row = [d for d in report.decisions if d["pool_kind"] == "subpool"][0]
    assert (row["pool"], row["current"], row["target"], row["applied"]) == (ALICE, 0, 5, True)
    assert "user=alice" in row["reason"] and "action=create" in row["reason"]
    assert "bob" not in {p.user_id for p in plan.subpools.pools}  # 0.25 instances: below the threshold

    # moto puts instances in service at once, so the next cycle counts the sub-pool as serving and
    # shrinks the shared pool; from then on the same inputs call nothing
    _, second = cycle(clients, fleet, NOW, alice_cores=20)
    assert [o.calls for o in second.outcomes.values() if o.calls] == [("update_auto_scaling_group",)]
    calls.clear()
    _, again = cycle(clients, fleet, NOW, alice_cores=20)
    assert not [c for c in calls if c in MUTATING] and again.calls == 0


def test_in_service_sub_pool_capacity_is_not_provisioned_twice_in_the_shared_pools(clients, fleet):
    cycle(clients, fleet, NOW, alice_cores=20)
    first = describe_groups(clients.autoscaling, ["general"])["general"].desired
    assert first == 20  # the sub-pool was still booting: the shared pool covered all 40 cores
    plan, _ = cycle(clients, fleet, NOW + timedelta(minutes=5), alice_cores=20)
    assert plan.served[5][0] == pytest.approx(16.0)  # alice's mean, within the 20 usable cores in service
    assert describe_groups(clients.autoscaling, ["general"])["general"].desired == 12  # (40 − 16) / 2


def test_resize_then_retire_after_the_grace_period_drain_and_delete(clients, fleet):
    cycle(clients, fleet, NOW, alice_cores=20)
    cycle(clients, fleet, NOW + timedelta(minutes=5), alice_cores=36)
    assert group(clients, ALICE)["DesiredCapacity"] == 9
    quiet_from = NOW + timedelta(minutes=5)  # last qualifying demand
    _, r = cycle(clients, fleet, quiet_from + timedelta(minutes=20), alice_cores=1)  # inside the 30-min grace
    g = group(clients, ALICE)
    assert g is not None and g["DesiredCapacity"] == 1  # sized on demand, kept at its minimum
    assert "retires in 600 s" in [d for d in r.decisions if d["pool"] == ALICE][0]["reason"]
    cycle(clients, fleet, quiet_from + timedelta(minutes=31), alice_cores=1)  # grace over: drain
    g = group(clients, ALICE)
    assert g is not None and g["DesiredCapacity"] == 0 and g["MinSize"] == 0
    _, r = cycle(clients, fleet, quiet_from + timedelta(minutes=36), alice_cores=1)  # empty: delete
    assert group(clients, ALICE) is None, r.decisions
    assert not clients.ec2.describe_launch_templates(Filters=[{"Name": "launch-template-name", "Values": [ALICE]}])["LaunchTemplates"]
    assert describe_subpools(clients.autoscaling).states == {}


def test_dry_run_creates_nothing_and_a_foreign_group_with_a_user_tag_is_left_alone(clients, fleet, calls):
    clients.autoscaling.create_launch_configuration(LaunchConfigurationName="lc", ImageId="ami-12c6146b",
                                                     InstanceType="t3.micro")
    clients.autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="handmade", LaunchConfigurationName="lc", MinSize=0, MaxSize=3, DesiredCapacity=2,
        AvailabilityZones=["us-east-1a"],
        Tags=[{"ResourceId": "handmade", "ResourceType": "auto-scaling-group", "Key": USER_TAG, "Value": "alice",
               "PropagateAtLaunch": False}])
    calls.clear()
    _, report = cycle(clients, fleet, NOW, alice_cores=20, dry_run=True)
    assert not [c for c in calls if c in MUTATING] and group(clients, ALICE) is None
    rows = {d["pool"]: d for d in report.decisions if d["pool_kind"] == "subpool"}
    assert rows[ALICE]["reason"].startswith("dry-run: would create") and not rows[ALICE]["applied"]
    assert "not a warmcast sub-pool" in rows["handmade"]["reason"]
    _, report = cycle(clients, fleet, NOW, alice_cores=20)
    assert group(clients, "handmade")["DesiredCapacity"] == 2  # never touched
