"""Benchmark: one scale cycle for N pools (default 50) against a local AWS endpoint (moto server).

Setup (not timed): a moto ``ThreadedMotoServer`` on 127.0.0.1, N pools bootstrapped from
launch templates (varied shapes and prices), every group at desired 3 with a warm pool of 2.
The forecast then moves *every* pool (the worst case): the cheapest shapes scale out, the rest
scale in to 0, every warm pool is resized.

Timed, each from the same starting state (median of ``--repeats``):

* ``cycle``    — ``scaler.aws.scale_cycle``: one batched describe, the plan (placement across
  all N shapes), only the calls that change something, on 8 threads;
* ``noop``     — the same cycle again once applied (idempotent: describe + plan, no call);
* ``baseline`` — the naive applier: per pool, sequentially, describe the group, describe its
  warm pool, update the desired capacity and put the warm pool, unconditionally, with the same
  targets.

Prints one JSON line. Target: ``cycle_s`` <= 1 s for 50 pools. The server runs in this process
(it shares the GIL with the client), so the figures are conservative for a real endpoint's
latency-bound calls.

    python benchmarks/scaler.py              # 50 pools
    python benchmarks/scaler.py --size 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import AwsSettings  # noqa: E402
from pipeline.schemas import HORIZONS_MIN  # noqa: E402
from scaler.aws import describe_groups, make_clients, scale_cycle  # noqa: E402
from scaler.aws_bootstrap import bootstrap  # noqa: E402
from scaler.fleet import fleet_from_dict  # noqa: E402
from scaler.local_endpoint import LOCAL_CREDENTIALS, local_aws_endpoint  # noqa: E402

NOW = datetime(2026, 11, 2, 12, tzinfo=timezone.utc)
START_DESIRED, START_WARM = 3, 2


def fleet_config(n: int):
    pools = []
    for i in range(n):
        vcpu = (2, 4, 8, 16)[i % 4]
        mem_per_core = (2, 4, 8)[i % 3]
        pools.append({"name": f"pool-{i:03d}", "vcpu": vcpu, "memory_gb": vcpu * mem_per_core,
                      "hourly_price_usd": round(vcpu * (0.04 + 0.004 * mem_per_core) * (1 + 0.01 * i), 4)})
    return fleet_from_dict({
        "defaults": {"mode": "scale", "min_size": 0, "max_size": 40, "max_step": 40, "hysteresis": 0.0,
                     "scale_in_grace_s": 0, "warm_max_size": 10, "boot_s": 240, "target_utilisation": 0.7},
        "pools": pools,
    })


def forecast(n: int) -> list[dict]:
    rows = []
    for i, h in enumerate(HORIZONS_MIN):
        for resource, base in (("cpu_cores", 6.0 * n), ("memory_gb", 24.0 * n), ("gpus", 0.0)):
            upper = base * (1 + 0.05 * i)
            rows.append({"issued_at": NOW, "horizon_min": h, "resource": resource, "mean": upper * 0.8,
                         "lower": upper * 0.5, "upper": upper, "level": 0.9, "n_users": 1000, "method": "bench"})
    return rows


def reset(client, names: list[str]) -> None:
    """Every group back to desired 3 with a warm pool of 2 and no scale-out time."""
    for name in names:
        client.update_auto_scaling_group(AutoScalingGroupName=name, DesiredCapacity=START_DESIRED)
        client.put_warm_pool(AutoScalingGroupName=name, MinSize=START_WARM, MaxGroupPreparedCapacity=START_WARM,
                             PoolState="Stopped", InstanceReusePolicy={"ReuseOnScaleIn": True})
        client.delete_tags(Tags=[{"ResourceId": name, "ResourceType": "auto-scaling-group",
                                  "Key": "warmcast:last-scale-out"}])


def naive_apply(client, targets: dict[str, tuple[int, int, str]]) -> int:
    """The baseline: per pool, describe + describe warm pool + update + put warm pool, sequentially."""
    calls = 0
    for name, (desired, warm, state) in targets.items():
        client.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
        client.describe_warm_pool(AutoScalingGroupName=name)
        client.update_auto_scaling_group(AutoScalingGroupName=name, DesiredCapacity=desired)
        client.put_warm_pool(AutoScalingGroupName=name, MinSize=warm, MaxGroupPreparedCapacity=warm, PoolState=state,
                             InstanceReusePolicy={"ReuseOnScaleIn": True})
        calls += 4
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50, help="number of pools (default 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="apply threads (default 8)")
    args = parser.parse_args()

    fleet = fleet_config(args.size)
    pools = fleet.policy_pools()
    names = [p.name for p in pools]
    rows = forecast(args.size)
    with local_aws_endpoint() as url:
        aws = AwsSettings(endpoint_url=url, retry_mode="standard", max_attempts=3)
        client = make_clients(aws, **LOCAL_CREDENTIALS).autoscaling
        bootstrap(make_clients(aws, **LOCAL_CREDENTIALS), fleet)
        cycles, noops, baselines, plans = [], [], [], []
        for _ in range(args.repeats):
            reset(client, names)
            t0 = time.perf_counter()
            plan, report = scale_cycle(client, pools, rows, NOW, max_workers=args.workers)
            cycles.append(time.perf_counter() - t0)
            assert not report.failed, report.failed
            t0 = time.perf_counter()
            _, again = scale_cycle(client, pools, rows, NOW, max_workers=args.workers)
            noops.append(time.perf_counter() - t0)
            assert again.calls == 0, "second cycle was not a no-op"

            reset(client, names)
            snaps = describe_groups(client, names)
            from scaler.policy import plan_pools

            t0 = time.perf_counter()
            plan_pools(rows, {n: s.pool_state() for n, s in snaps.items()}, pools, NOW)
            plans.append(time.perf_counter() - t0)
            targets = {p.pool: (p.active.target, p.warm.target, p.warm_state) for p in plan.pools}
            t0 = time.perf_counter()
            naive_calls = naive_apply(client, targets)
            baselines.append(time.perf_counter() - t0)

    changed = sum(1 for p in plan.pools if p.active.changes or p.warm.changes)
    cycle, base = statistics.median(cycles), statistics.median(baselines)
    print(json.dumps({
        "benchmark": "scaler",
        "figure": "scale_cycle_s",
        "value": round(cycle, 4),
        "unit": "s",
        "pools": args.size,
        "pools_changed": changed,
        "mutating_calls": report.calls,
        "plan_s": round(statistics.median(plans), 4),
        "noop_cycle_s": round(statistics.median(noops), 4),
        "baseline": "naive sequential per pool: describe group + describe warm pool + update + put warm pool",
        "baseline_s": round(base, 4),
        "baseline_calls": naive_calls,
        "ratio_baseline_over_cycle": round(base / cycle, 2),
        "target_s": 1.0,
        "meets_target": cycle <= 1.0,
        "repeats": args.repeats,
        "workers": args.workers,
        "endpoint": "moto ThreadedMotoServer on 127.0.0.1 (same process)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }))


if __name__ == "__main__":
    main()
