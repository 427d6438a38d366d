"""Predictive placement: split one demand vector across pools of different shapes at least cost.

Pure arithmetic, no I/O. Used by :func:`scaler.policy.plan_pools` once per forecast horizon.

The model (documented choices, DESIGN.md "Scaling"):

* A demand vector is ``(cpu_cores, memory_gb, gpus)`` of average concurrent use. An instance of
  a pool supplies ``shape × target_utilisation`` of each resource (its *usable capacity*).
* Capacity is fungible across pools: the platform's scheduler may place CPU work on any instance
  with free cores and memory, GPU work only on instances with GPUs.
* Instances that must exist anyway (a pool's *floor*: its minimum size, or the instances busy
  right now) are credited first; only the remainder is placed.
* **GPUs first**: GPU pools are filled cheapest-per-usable-GPU first; their cores and memory are
  credited too.
* **Cores and memory**: the least-cost fractional cover of the two-resource remainder is, by
  linear-programming theory, a vertex that uses at most two pools. We enumerate every single pool
  (sized by its binding resource) and every pair (both resources exactly covered), round each
  count up, and take the cheapest in whole instances (so the result never costs more than the
  cheapest single pool that could cover the demand alone). When rounding meets a pool's ceiling, that pool is filled and
  the rest is placed again among the others. No solver is needed and the result is
  deterministic (ties: fewer instances, then pool name).
* Rounding a pair up can overshoot by up to one instance per pool, so a last pass drops, most
  expensive pool first, any instance not needed to cover the demand.

Whatever the ceilings leave uncovered is returned as ``unmet`` so the plan can say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: The resources of a demand vector, in this order everywhere in the scaler.
RESOURCES = ("cpu_cores", "memory_gb", "gpus")

_EPS = 1e-9


def ceil_count(x: float) -> int:
    """Instances needed for ``x`` (fractional) instances: ceil, tolerant of float noise."""
    return max(0, math.ceil(x - 1e-9))


@dataclass(frozen=True)
class PlacementPool:
    """One pool as placement sees it.

    ``capacity`` is the usable capacity of one instance at the pool's target utilisation:
    ``(cores, GB, GPUs)``. ``price`` is USD per instance-hour. ``floor <= ceiling`` are instance
    counts.
    """

    name: str
    capacity: tuple[float, float, float]
    price: float
    floor: int
    ceiling: int


@dataclass(frozen=True)
class Placement:
    """Instances per pool, the demand left uncovered (per resource, demand units) and the cost."""

    counts: dict[str, int]
    unmet: dict[str, float]
    cost_usd_per_h: float


def _supplied(counts: dict[str, int], pools: Sequence[PlacementPool]) -> list[float]:
    return [sum(counts[p.name] * p.capacity[r] for p in pools) for r in range(3)]


def _remaining(demand: Sequence[float], counts: dict[str, int], pools: Sequence[PlacementPool]) -> list[float]:
    return [max(0.0, d - s) for d, s in zip(demand, _supplied(counts, pools))]


def _single_cover(rem: Sequence[float], p: PlacementPool) -> float | None:
    """Fractional instances of ``p`` alone that cover cores and memory; None if it cannot."""
    x = 0.0
    for r in (0, 1):
        if rem[r] > _EPS:
            if p.capacity[r] <= 0:
                return None
            x = max(x, rem[r] / p.capacity[r])
    return x


def _pair_cover(rem: Sequence[float], a: PlacementPool, b: PlacementPool) -> tuple[float, float] | None:
    """Fractional ``(x, y)`` with ``x·a + y·b`` = (cores, memory) exactly, both > 0; else None."""
    (a0, a1), (b0, b1) = a.capacity[:2], b.capacity[:2]
    det = a0 * b1 - b0 * a1
    if abs(det) < 1e-12:
        return None
    x = (rem[0] * b1 - rem[1] * b0) / det
    y = (a0 * rem[1] - a1 * rem[0]) / det
    if x <= _EPS or y <= _EPS:
        return None
    return x, y


def _cheapest_cover(rem: Sequence[float], pools: Sequence[PlacementPool]) -> dict[str, float] | None:
    """The least-cost fractional cover of (cores, memory) using one or two pools."""
    best: tuple[tuple[float, float, float, tuple[str, ...]], dict[str, float]] | None = None

    def consider(choice: dict[str, float]) -> None:
        nonlocal best
        # whole instances are bought: rank by the rounded-up cost, then the fractional one
        whole = sum(ceil_count(x) * by_name[n].price for n, x in choice.items())
        cost = sum(x * by_name[n].price for n, x in choice.items())
        key = (round(whole, 9), round(cost, 9), round(sum(choice.values()), 9), tuple(sorted(choice)))
        if best is None or key < best[0]:
            best = (key, choice)

    by_name = {p.name: p for p in pools}
    for p in pools:
        x = _single_cover(rem, p)
        if x is not None:
            consider({p.name: x})
    if rem[0] > _EPS and rem[1] > _EPS:
        for i, a in enumerate(pools):
            for b in pools[i + 1 :]:
                xy = _pair_cover(rem, a, b)
                if xy is not None:
                    consider({a.name: xy[0], b.name: xy[1]})
    return None if best is None else best[1]


def place_demand(demand: Sequence[float], pools: Sequence[PlacementPool]) -> Placement:
    """Instances per pool that cover ``demand`` ``(cores, GB, GPUs)`` at least cost (see module doc).

    Every count lies in ``[floor, ceiling]`` of its pool. Demand must be finite and >= 0.
    """
    counts = {p.name: min(p.floor, p.ceiling) for p in pools}
    rem = _remaining(demand, counts, pools)

    if rem[2] > _EPS:  # GPUs first: only GPU pools can serve them
        gpu_pools = sorted((p for p in pools if p.capacity[2] > 0), key=lambda p: (p.price / p.capacity[2], p.name))
        for p in gpu_pools:
            counts[p.name] += min(ceil_count(rem[2] / p.capacity[2]), p.ceiling - counts[p.name])
            rem = _remaining(demand, counts, pools)
            if rem[2] <= _EPS:
                break

    open_pools = [p for p in pools if counts[p.name] < p.ceiling and (p.capacity[0] > 0 or p.capacity[1] > 0)]
    while (rem[0] > _EPS or rem[1] > _EPS) and open_pools:
        choice = _cheapest_cover(rem, open_pools)
        if choice is None:
            break
        hit_ceiling = False
        for name, x in choice.items():
            p = next(q for q in open_pools if q.name == name)
            add = ceil_count(x)
            if add >= p.ceiling - counts[name]:
                add, hit_ceiling = p.ceiling - counts[name], True
            counts[name] += add
        rem = _remaining(demand, counts, pools)
        if not hit_ceiling:
            break
        open_pools = [p for p in open_pools if counts[p.name] < p.ceiling]

    _trim(demand, counts, pools)
    rem = _remaining(demand, counts, pools)
    cost = sum(counts[p.name] * p.price for p in pools)
    return Placement(counts=counts, unmet={r: v for r, v in zip(RESOURCES, rem) if v > 1e-6}, cost_usd_per_h=cost)


def _trim(demand: Sequence[float], counts: dict[str, int], pools: Sequence[PlacementPool]) -> None:
    """Drop instances (most expensive pool first) whose removal leaves every resource covered as well."""
    for p in sorted(pools, key=lambda q: (-q.price, q.name)):
        supplied = _supplied(counts, pools)
        spare = counts[p.name] - min(p.floor, p.ceiling)
        for r in range(3):
            if p.capacity[r] > 0 and spare > 0:
                # never remove capacity that covers demand, nor deepen a shortfall
                slack = supplied[r] - demand[r]
                spare = min(spare, max(0, math.floor(slack / p.capacity[r] + 1e-9)))
        counts[p.name] -= max(0, spare)
