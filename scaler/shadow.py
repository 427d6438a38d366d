"""Shadow-mode report: warmcast's recorded proposals against what the groups had, both scored on
the demand that then came.

Operators adopt warmcast in ``forecast_only`` mode first (DESIGN.md "Scaling": decisions are
recorded, nothing is applied, and the evaluation compares them with what happened). Every cycle
records, per pool, ``current`` (the group's desired capacity then, set by whatever scales it
today) and ``target`` (what warmcast proposes). This module turns the decisions of a period and the
system's demand in it (the lake's demand series summed over users, per 5-minute bucket) into, for
both the recorded capacity and warmcast's proposal:

* **ready capacity** per bucket and resource (vCPU, memory, GPUs of every pool's instances):
  an instance counts as ready in a bucket only if the pool's desired count was at least that high
  for the whole boot time before the bucket starts (a scale-out takes ``boot_s`` to come into
  service, a scale-in is immediate), the same rule for both;
* **short buckets** (demand above the ready capacity), **shortfall** (resource-hours of demand
  above it), **instance-hours** and **cost** (the fleet file's prices), and **utilisation**.

The comparison is at the fleet level per resource (the shapes of all pools summed): it does not
re-run the placement of demand onto pools, counts no warm pool (warmcast's faster resumes from
its warm pools are not credited), and takes desired capacity, not the instances the platform
actually had in service. User sub-pool decisions count with the sub-pool shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.demand import SystemDemand, system_demand_from_lake
from pipeline.schemas import BUCKET_SECONDS, DEMAND_RESOURCES
from scaler.fleet import FleetConfig
from scaler.policy import InstanceShape
from scaler.subpools import SUBPOOL_PREFIX

#: The resources capacity is compared on, and the demand series' column of each.
RESOURCES = ("cpu_cores", "memory_gb", "gpus")
_COLUMN = {r: DEMAND_RESOURCES.index(r) for r in RESOURCES}
STEP = timedelta(seconds=BUCKET_SECONDS)
#: A bucket with no scaling cycle this long before it is not scored (the groups' counts are unknown).
MAX_GAP = timedelta(minutes=15)


def _shape_vector(shape: InstanceShape) -> np.ndarray:
    return np.array([shape.vcpu, shape.memory_gb, shape.gpus])


@dataclass
class Side:
    """One side of the comparison (``recorded`` or ``proposed``) over the scored buckets."""

    ready: np.ndarray  # [B, 3] ready capacity per bucket and resource
    instance_hours: dict[str, float]
    cost_usd: float

    def scores(self, demand: np.ndarray) -> dict[str, Any]:
        short = demand > self.ready + 1e-9
        gap = np.clip(demand - self.ready, 0, None) * BUCKET_SECONDS / 3600
        capacity = self.ready.sum(0)
        return {
            "short_bucket_share": {r: float(short[:, k].mean()) if len(short) else 0.0 for k, r in enumerate(RESOURCES)},
            "shortfall_hours": {r: float(gap[:, k].sum()) for k, r in enumerate(RESOURCES)},
            "utilisation": {r: float(demand[:, k].sum() / capacity[k]) if capacity[k] > 0 else None for k, r in enumerate(RESOURCES)},
            "instance_hours": {p: float(h) for p, h in sorted(self.instance_hours.items())},
            "instance_hours_total": float(sum(self.instance_hours.values())),
            "cost_usd": float(self.cost_usd),
        }


@dataclass
class ShadowReport:
    start: datetime
    end: datetime
    buckets: int
    cycles: int
    pools: list[str]
    modes: dict[str, int]  # decisions per rollout mode found in the reasons
    recorded: dict[str, Any]
    proposed: dict[str, Any]
    skipped_pools: list[str] = field(default_factory=list)
    gap_buckets: int = 0  # buckets left out: no cycle in the MAX_GAP before them

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "buckets": self.buckets, "cycles": self.cycles,
                "pools": self.pools, "modes": self.modes, "skipped_pools": self.skipped_pools, "gap_buckets": self.gap_buckets,
                "recorded": self.recorded, "proposed": self.proposed}

    def render(self) -> str:
        shared = [p for p in self.pools if not p.startswith(SUBPOOL_PREFIX)]
        subs = len(self.pools) - len(shared)
        rows = [f"shadow report {self.start:%Y-%m-%d %H:%M} – {self.end:%Y-%m-%d %H:%M} UTC: {self.cycles} cycles, "
                f"{self.buckets} buckets scored, pools {', '.join(shared) or '-'}" + (f" + {subs} user sub-pools" if subs else "")
                + (f" (modes: {', '.join(f'{m} {n}' for m, n in sorted(self.modes.items()))})" if self.modes else ""),
                f"{'':<34} {'recorded (what the groups had)':>32} {'warmcast proposed':>20}"]

        def line(label: str, a: str, b: str) -> None:
            rows.append(f"{label:<34} {a:>32} {b:>20}")

        for r in RESOURCES:
            line(f"buckets short of {r}", f"{self.recorded['short_bucket_share'][r]:.1%}", f"{self.proposed['short_bucket_share'][r]:.1%}")
        for r in RESOURCES:
            line(f"shortfall, {r}-hours", f"{self.recorded['shortfall_hours'][r]:.2f}", f"{self.proposed['shortfall_hours'][r]:.2f}")
        line("instance-hours", f"{self.recorded['instance_hours_total']:.1f}", f"{self.proposed['instance_hours_total']:.1f}")
        line("cost (USD, fleet prices)", f"{self.recorded['cost_usd']:.2f}", f"{self.proposed['cost_usd']:.2f}")
        for r in RESOURCES:
            u, v = self.recorded["utilisation"][r], self.proposed["utilisation"][r]
            line(f"utilisation, {r}", "-" if u is None else f"{u:.1%}", "-" if v is None else f"{v:.1%}")
        if self.gap_buckets:
            rows.append(f"left out: {self.gap_buckets} buckets with no cycle in the {MAX_GAP.total_seconds() / 60:g} minutes before")
        if self.skipped_pools:
            rows.append(f"not in the fleet file (left out): {', '.join(self.skipped_pools)}")
        return "\n".join(rows)


def _mode(reason: str) -> str | None:
    for part in reason.split(";"):
        part = part.strip()
        if part.startswith("mode="):
            return part[len("mode="):]
    return None


def shadow_report(decisions: pa.Table, demand: np.ndarray, start: datetime, end: datetime, fleet: FleetConfig) -> ShadowReport:
    """Score the ``active`` and ``subpool`` decisions of ``decisions`` (a ``SCALING_DECISION``
    table) on ``demand`` ``[B, 4]`` (the system's demand per bucket of ``[start, end)``, in
    :data:`~pipeline.schemas.DEMAND_RESOURCES` order). Not scored: the buckets within the longest
    boot time after the first cycle, and those with no cycle in the :data:`MAX_GAP` before them."""
    n = round((end - start) / STEP)
    if demand.shape[0] != n:
        raise ValueError(f"demand has {demand.shape[0]} buckets, [{start}, {end}) has {n}")
    shapes: dict[str, InstanceShape] = {p.pool.name: p.pool.shape for p in fleet.pools}
    rows = [r for r in decisions.to_pylist() if r["pool_kind"] in ("active", "subpool")]
    modes: dict[str, int] = {}
    by_pool: dict[str, list[tuple[datetime, int, int]]] = {}
    skipped = set()
    for r in rows:
        name = r["pool"]
        if name not in shapes and r["pool_kind"] == "subpool" and fleet.subpools is not None:
            shapes[name] = fleet.subpools.policy.shape
        if name not in shapes:
            skipped.add(name)
            continue
        mode = _mode(r["reason"])
        if mode:
            modes[mode] = modes.get(mode, 0) + 1
        by_pool.setdefault(name, []).append((r["decided_at"], int(r["current"]), int(r["target"])))
    cycles = sorted({r["decided_at"] for r in rows if r["pool"] in by_pool})
    if not cycles:
        raise ValueError(f"no active or sub-pool decision of a fleet pool in [{start}, {end})")
    times = np.array([t.timestamp() for t in cycles])
    index = {t: i for i, t in enumerate(cycles)}
    bucket_starts = [start + k * STEP for k in range(n)]
    # scored once the first cycle is a boot time old (before it, nothing is known of the groups), and
    # not where no cycle ran for MAX_GAP before the bucket (the pipeline was down: its counts are unknown)
    first = cycles[0] + timedelta(seconds=max(shapes[p].boot_s for p in by_pool))
    latest = np.searchsorted(times, [s.timestamp() for s in bucket_starts], side="right") - 1
    fresh = np.array([i >= 0 and s.timestamp() - times[i] <= MAX_GAP.total_seconds() for i, s in zip(latest, bucket_starts)])
    scored = np.array([s >= first for s in bucket_starts]) & fresh
    gaps = int((np.array([s >= first for s in bucket_starts]) & ~fresh).sum())
    ready = {"recorded": np.zeros((n, 3)), "proposed": np.zeros((n, 3))}
    hours: dict[str, dict[str, float]] = {"recorded": {}, "proposed": {}}
    cost = {"recorded": 0.0, "proposed": 0.0}
    for p, v in by_pool.items():
        # desired counts per cycle; a cycle without a row for the pool (a user sub-pool not planned then) counts 0
        counts = {"recorded": np.zeros(len(cycles)), "proposed": np.zeros(len(cycles))}
        for t, current, target in v:
            counts["recorded"][index[t]], counts["proposed"][index[t]] = current, target
        vec, boot, price = _shape_vector(shapes[p]), shapes[p].boot_s, shapes[p].hourly_price_usd
        for side, c in counts.items():
            def at(ts: float) -> float:  # the count in effect at ts: the latest cycle at or before it
                i = np.searchsorted(times, ts, side="right") - 1
                return float(c[i]) if i >= 0 else 0.0

            for k, s in enumerate(bucket_starts):
                if not scored[k]:
                    continue
                lo, hi = s.timestamp() - boot, s.timestamp()
                # ready: the lowest count in effect over (lo, hi]: a scale-out takes the boot time, a scale-in is at once
                n_ready = min([at(lo), *c[(times > lo) & (times <= hi)]]) if boot > 0 else at(hi)
                ready[side][k] += n_ready * vec
                hours[side][p] = hours[side].get(p, 0.0) + at(hi) * BUCKET_SECONDS / 3600
            cost[side] += hours[side].get(p, 0.0) * price
    d = demand[scored][:, [_COLUMN[r] for r in RESOURCES]]
    out = {side: Side(ready[side][scored], hours[side], cost[side]).scores(d) for side in ready}
    return ShadowReport(start, end, int(scored.sum()), len(cycles), sorted(by_pool), modes, out["recorded"], out["proposed"],
                        sorted(skipped), gaps)


def shadow_from_store(store: Any, lake: Any, start: datetime, end: datetime, fleet: FleetConfig) -> ShadowReport | None:
    """:func:`shadow_report` of ``[start, end)`` from a forecast store's recorded decisions (and those a
    boot time and a cycle before ``start``, which set the ready capacity of its first buckets) and the
    lake's demand; None when no decision was recorded in ``[start, end)``."""
    boot = max([p.pool.shape.boot_s for p in fleet.pools]
               + ([fleet.subpools.policy.shape.boot_s] if fleet.subpools is not None else []))
    decisions = store.read_decisions(start - timedelta(seconds=boot + BUCKET_SECONDS), end)
    if not any(start <= t < end for t in decisions["decided_at"].to_pylist()):
        return None
    return shadow_report(decisions, demand_array(system_demand_from_lake(lake, start, end)), start, end, fleet)


def demand_array(demand: SystemDemand) -> np.ndarray:
    """A :class:`~pipeline.demand.SystemDemand` as the ``[B, 4]`` array :func:`shadow_report` takes."""
    return np.stack([getattr(demand, r) for r in DEMAND_RESOURCES], axis=1)
