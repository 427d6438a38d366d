"""Faults moto cannot produce: botocore Stubber for retries, per-pool failure and lifecycle actions,
and botocore's own retry loop driven by injected Throttling responses."""

from __future__ import annotations

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.retries.standard import ExponentialBackoff
from botocore.stub import Stubber
from moto import mock_aws

from pipeline.config import AwsSettings
from scaler.aws import GroupSnapshot, RetryPolicy, apply_plan, botocore_config, call_with_retry
from scaler.aws_bootstrap import DRAIN_HOOK, complete_lifecycle_action, record_lifecycle_heartbeat
from scaler.policy import InstanceShape, Pool, PoolPolicy, plan_pools
from tests.scaler.conftest import NOW, forecast_rows

TOKEN = "bcd2f1b8-9a74-4a8a-9d8e-0123456789ab"  # a lifecycle action token is a UUID
SETTINGS = AwsSettings(region="us-east-1", retry_mode="standard", max_attempts=4)
POLICY = PoolPolicy(min_size=0, max_size=50, max_step=50, target_utilisation=0.5, hysteresis=0, mode="scale")
POOLS = [Pool("a", InstanceShape(4, 16, hourly_price_usd=0.2), POLICY),
         Pool("b", InstanceShape(4, 16, hourly_price_usd=0.3), POLICY)]


@pytest.fixture
def client(aws_credentials):
    return boto3.client("autoscaling", config=botocore_config(SETTINGS))


def snapshots(desired: int = 0) -> dict[str, GroupSnapshot]:
    return {n: GroupSnapshot(n, 0, 50, desired, desired, 0, None, None) for n in ("a", "b")}


def two_pool_plan():
    """Pool a (cheaper) would take everything: cap it at 10 so both pools change."""
    pools = [Pool("a", POOLS[0].shape, PoolPolicy(**{**POLICY.__dict__, "max_size": 10})), POOLS[1]]
    snaps = snapshots()
    plan = plan_pools(forecast_rows(40, 10), {n: s.pool_state() for n, s in snaps.items()}, pools, NOW)
    assert [p.active.target for p in plan.pools] == [10, 10]
    return plan, snaps


def expect_update(stub: Stubber, group: str, desired: int) -> None:
    stub.add_response("update_auto_scaling_group", {}, {"AutoScalingGroupName": group, "DesiredCapacity": desired})


def expect_tag(stub: Stubber) -> None:
    stub.add_response("create_or_update_tags", {})


def test_resource_contention_is_retried_with_backoff_until_it_succeeds(client):
    plan, snaps = two_pool_plan()
    sleeps: list[float] = []
    with Stubber(client) as stub:
        for _ in range(2):
            stub.add_client_error("update_auto_scaling_group", "ResourceContention", "busy", 500)
        expect_update(stub, "a", 10)
        expect_tag(stub)
        expect_update(stub, "b", 10)
        expect_tag(stub)
        report = apply_plan(client, plan, snaps, max_workers=1, sleep=sleeps.append,
                            retry=RetryPolicy(attempts=5, base_delay_s=0.1, max_delay_s=1.0))
        stub.assert_no_pending_responses()
    assert not report.failed and len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.1 and 0 <= sleeps[1] <= 0.2  # capped exponential, full jitter


def test_a_pool_stuck_in_scaling_activity_fails_alone_and_the_next_pool_is_applied(client):
    plan, snaps = two_pool_plan()
    with Stubber(client) as stub:
        for _ in range(3):
            stub.add_client_error("update_auto_scaling_group", "ScalingActivityInProgress", "activity running", 400)
        expect_update(stub, "b", 10)
        expect_tag(stub)
        report = apply_plan(client, plan, snaps, max_workers=1, sleep=lambda s: None, retry=RetryPolicy(attempts=3))
        stub.assert_no_pending_responses()
    assert report.failed == ["a"]
    assert report.outcomes["a"].error == "update_auto_scaling_group: ScalingActivityInProgress: activity running"
    rows = {(d["pool"], d["pool_kind"]): d for d in report.decisions}
    assert not rows[("a", "active")]["applied"] and rows[("a", "active")]["reason"].startswith("failed: update_auto_scaling_group: ScalingActivity")
    assert rows[("b", "active")]["applied"]


def test_throttling_left_over_from_botocore_fails_that_pool_without_our_retry(client):
    plan, snaps = two_pool_plan()
    sleeps: list[float] = []
    with Stubber(client) as stub:
        stub.add_client_error("update_auto_scaling_group", "Throttling", "Rate exceeded", 400)
        expect_update(stub, "b", 10)
        expect_tag(stub)
        report = apply_plan(client, plan, snaps, max_workers=1, sleep=sleeps.append)
        stub.assert_no_pending_responses()  # exactly one attempt for a: botocore owns throttling retries
    assert report.failed == ["a"] and "Throttling" in report.outcomes["a"].error and sleeps == []


def test_warm_pool_failure_after_a_successful_resize_is_reported_precisely(client):
    pools = [Pool("a", POOLS[0].shape, PoolPolicy(**{**POLICY.__dict__, "warm_max_size": 10}))]
    snaps = {"a": GroupSnapshot("a", 0, 50, 0, 0, 0, None, None)}
    plan = plan_pools(forecast_rows([10, 10, 10, 10, 10, 20], 1), {"a": snaps["a"].pool_state()}, pools, NOW)
    with Stubber(client) as stub:
        expect_update(stub, "a", 5)
        expect_tag(stub)
        stub.add_client_error("put_warm_pool", "ValidationError", "hibernation not supported", 400)
        report = apply_plan(client, plan, snaps, max_workers=1)
    rows = {d["pool_kind"]: d for d in report.decisions}
    assert rows["active"]["applied"] and not rows["warm"]["applied"]
    assert rows["warm"]["reason"].startswith("failed: put_warm_pool: ValidationError: hibernation not supported")


def test_a_failed_tag_is_noted_but_the_warm_pool_is_still_applied(client):
    pools = [Pool("a", POOLS[0].shape, PoolPolicy(**{**POLICY.__dict__, "warm_max_size": 10}))]
    snaps = {"a": GroupSnapshot("a", 0, 50, 0, 0, 0, None, None)}
    plan = plan_pools(forecast_rows([10, 10, 10, 10, 10, 20], 1), {"a": snaps["a"].pool_state()}, pools, NOW)
    with Stubber(client) as stub:
        expect_update(stub, "a", 5)
        stub.add_client_error("create_or_update_tags", "AccessDenied", "no tagging", 403)
        stub.add_response("put_warm_pool", {}, {"AutoScalingGroupName": "a", "MinSize": 5, "MaxGroupPreparedCapacity": 5,
                                                "PoolState": "Stopped", "InstanceReusePolicy": {"ReuseOnScaleIn": True}})
        report = apply_plan(client, plan, snaps, max_workers=1)
        stub.assert_no_pending_responses()
    rows = {d["pool_kind"]: d for d in report.decisions}
    assert rows["active"]["applied"] and "recording the scale-out time failed" in rows["active"]["reason"]
    assert rows["warm"]["applied"] and report.failed == ["a"]  # reported: the grace period cannot be tracked


def test_the_warm_pool_is_left_alone_when_the_active_resize_failed(client):
    pools = [Pool("a", POOLS[0].shape, PoolPolicy(**{**POLICY.__dict__, "warm_max_size": 10}))]
    snaps = {"a": GroupSnapshot("a", 0, 50, 0, 0, 0, None, None)}
    plan = plan_pools(forecast_rows([10, 10, 10, 10, 10, 20], 1), {"a": snaps["a"].pool_state()}, pools, NOW)
    with Stubber(client) as stub:
        stub.add_client_error("update_auto_scaling_group", "ValidationError", "bad", 400)
        report = apply_plan(client, plan, snaps, max_workers=1)
        stub.assert_no_pending_responses()  # no put_warm_pool
    rows = {d["pool_kind"]: d for d in report.decisions}
    assert not rows["warm"]["applied"] and rows["warm"]["reason"].startswith("skipped: the active resize failed")


def test_complete_lifecycle_action_and_heartbeat_send_what_aws_expects(client):
    sleeps: list[float] = []
    with Stubber(client) as stub:
        stub.add_client_error("complete_lifecycle_action", "ResourceContention", "busy", 500)
        stub.add_response("complete_lifecycle_action", {}, {
            "AutoScalingGroupName": "a", "LifecycleHookName": DRAIN_HOOK, "InstanceId": "i-0abc",
            "LifecycleActionResult": "CONTINUE", "LifecycleActionToken": TOKEN})
        stub.add_response("record_lifecycle_action_heartbeat", {}, {
            "AutoScalingGroupName": "a", "LifecycleHookName": DRAIN_HOOK, "InstanceId": "i-0abc"})
        complete_lifecycle_action(client, "a", "i-0abc", token=TOKEN, sleep=sleeps.append)
        record_lifecycle_heartbeat(client, "a", "i-0abc")
        stub.assert_no_pending_responses()
    assert len(sleeps) == 1
    with pytest.raises(ValueError, match="CONTINUE or ABANDON"):
        complete_lifecycle_action(client, "a", "i-0abc", result="MAYBE")


def _error_response(request, code: str, status: int) -> AWSResponse:
    body = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>injected</Message></Error>"
            f"<RequestId>r</RequestId></ErrorResponse>").encode()

    class Raw:
        def stream(self, **kwargs):
            yield body

    return AWSResponse(request.url, status, {"Content-Type": "text/xml"}, Raw())


def test_botocore_retries_throttling_and_http_500_but_scaling_activity_in_progress_is_ours(aws_credentials, monkeypatch):
    """What botocore's standard mode retries on its own (Throttling; ResourceContention, as AWS sends it
    with HTTP 500) and what only :func:`call_with_retry` retries (ScalingActivityInProgress, HTTP 400)."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)  # no real waiting
    with mock_aws():
        client = boto3.client("autoscaling", config=botocore_config(SETTINGS))
        queue: dict[str, list[tuple[str, int]]] = {}

        def inject(request, event_name, **kwargs):
            pending = queue.get(event_name.rsplit(".", 1)[-1])
            return _error_response(request, *pending.pop(0)) if pending else None

        client.meta.events.register_first("before-send.autoscaling", inject)
        queue["DescribeAutoScalingGroups"] = [("Throttling", 400)] * 2
        assert client.describe_auto_scaling_groups()["ResponseMetadata"]["RetryAttempts"] == 2
        client.create_launch_configuration(LaunchConfigurationName="lc", ImageId="ami-12c6146b", InstanceType="t3.micro")
        client.create_auto_scaling_group(AutoScalingGroupName="g", LaunchConfigurationName="lc", MinSize=0, MaxSize=5,
                                         AvailabilityZones=["us-east-1a"])
        sleeps: list[float] = []
        queue["UpdateAutoScalingGroup"] = [("ResourceContention", 500)]
        out = call_with_retry(client.update_auto_scaling_group, sleep=sleeps.append, AutoScalingGroupName="g",
                              DesiredCapacity=1)
        assert out["ResponseMetadata"]["RetryAttempts"] == 1 and sleeps == []  # botocore's retry sufficed
        queue["UpdateAutoScalingGroup"] = [("ScalingActivityInProgress", 400)]
        out = call_with_retry(client.update_auto_scaling_group, sleep=sleeps.append, AutoScalingGroupName="g",
                              DesiredCapacity=2)
        assert out["ResponseMetadata"]["RetryAttempts"] == 0 and len(sleeps) == 1  # botocore gave up; we retried
        assert client.describe_auto_scaling_groups()["AutoScalingGroups"][0]["DesiredCapacity"] == 2
