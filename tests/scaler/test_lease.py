"""Two scaler runs at once: only one applies. The lease in the forecast store on SQLite and on the
real PostgreSQL at ``WARMCAST_TEST_PG_URL``, and two concurrent scale cycles against moto."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import boto3
import pytest
from moto import mock_aws

from scaler.aws import AwsClients, describe_groups, scale_cycle
from scaler.aws_bootstrap import bootstrap
from scaler.fleet import fleet_from_dict
from scaler.lease import LeaseHeldError, LeaseLostError, ScalerLease
from tests.scaler.conftest import NOW, forecast_rows
from tests.scaler.test_aws_moto import FLEET, MUTATING


@pytest.fixture
def store(db_store):
    """A fresh store on each backend (tests/conftest.py)."""
    return db_store


def test_one_owner_at_a_time_until_release_or_expiry(store):
    a, b = ScalerLease(store, owner="host-a:1:aa", ttl_s=60), ScalerLease(store, owner="host-b:2:bb", ttl_s=60)
    until = a.acquire()
    with pytest.raises(LeaseHeldError, match="held by host-a:1:aa") as held:
        b.acquire()
    assert held.value.holder == "host-a:1:aa" and held.value.expires_at == until
    assert a.acquire() >= until  # the holder may extend its own lease
    assert store.count("scaler_leases") == 1 and b.holder()["owner"] == "host-a:1:aa"
    assert not b.release()  # only the holder releases
    assert a.release() and b.holder() is None
    b.acquire()
    with pytest.raises(LeaseLostError):
        a.ensure_held()
    b.ensure_held()


def test_an_expired_lease_is_taken_over_and_its_old_holder_finds_out_before_applying(store):
    crashed = ScalerLease(store, owner="crashed:1:cc", ttl_s=0.5)
    crashed.acquire()
    with pytest.raises(LeaseHeldError):
        ScalerLease(store, owner="next:2:dd").acquire()
    time.sleep(1.1)
    nxt = ScalerLease(store, owner="next:2:dd")
    nxt.acquire()
    with pytest.raises(LeaseLostError, match="no longer held by crashed"):
        crashed.ensure_held()
    assert nxt.holder()["owner"] == "next:2:dd"


def test_two_concurrent_scale_cycles_only_one_applies(store, aws_credentials):
    fleet = fleet_from_dict(FLEET)
    with mock_aws():
        bootstrap(AwsClients(boto3.client("autoscaling", region_name="us-east-1"),
                             boto3.client("ec2", region_name="us-east-1")), fleet)
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}
        mutating: dict[str, list[str]] = {"run-0": [], "run-1": []}

        def run(name: str) -> None:
            client = boto3.client("autoscaling", region_name="us-east-1")

            def seen(model, params, **kw):
                if model.name in MUTATING:
                    mutating[name].append(model.name)
                if model.name == "DescribeAutoScalingGroups":
                    time.sleep(0.5)  # hold the lease long enough for the other run to meet it
            client.meta.events.register("provide-client-params.autoscaling", seen)
            lease = ScalerLease(store, owner=f"{name}:{uuid.uuid4().hex[:6]}")
            barrier.wait()
            try:
                results[name] = scale_cycle(client, fleet.policy_pools(), forecast_rows(40, 10), NOW, lease=lease,
                                            max_workers=1)[1]
            except LeaseHeldError as exc:
                results[name] = exc

        threads = [threading.Thread(target=run, args=(f"run-{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        losers = [n for n, r in results.items() if isinstance(r, LeaseHeldError)]
        winners = [n for n, r in results.items() if not isinstance(r, LeaseHeldError)]
        assert len(losers) == 1 and len(winners) == 1, results
        assert mutating[losers[0]] == []  # the loser called nothing that mutates
        assert mutating[winners[0]] and results[winners[0]].calls > 0
        assert results[losers[0]].holder.startswith(winners[0])
        client = boto3.client("autoscaling", region_name="us-east-1")
        assert describe_groups(client, ["general"])["general"].desired == 20
        assert ScalerLease(store).holder() is None  # released when the winner finished


def test_a_dry_run_needs_no_lease(store, aws_credentials):
    holder = ScalerLease(store, owner="other:1:ee")
    holder.acquire()
    fleet = fleet_from_dict(FLEET)
    with mock_aws():
        client = boto3.client("autoscaling", region_name="us-east-1")
        bootstrap(AwsClients(client, boto3.client("ec2", region_name="us-east-1")), fleet)
        _, report = scale_cycle(client, fleet.policy_pools(), forecast_rows(40, 10), NOW, dry_run=True,
                                lease=ScalerLease(store))
        assert report.decisions and not any(d["applied"] for d in report.decisions)
        with pytest.raises(LeaseHeldError):
            scale_cycle(client, fleet.policy_pools(), forecast_rows(40, 10), NOW + timedelta(minutes=5),
                        lease=ScalerLease(store))
        assert describe_groups(client, ["general"])["general"].desired == 1
