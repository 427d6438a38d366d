"""Replay a system demand trace through a scaling policy: cold starts, waits, instance-hours, cost.

Pure numpy on values (no I/O, no clock, no AWS). The policies live in :mod:`scaler.sim_policies`.

The model (DESIGN.md "Scaling"; issue 6), on a grid of steps of ``step_s`` seconds (60 or 300):

* **Demand.** A :class:`SystemTrace`: per step, the *average concurrent* cores and memory (GB) of
  all users together (users are summed first: capacity is shared, and a system bound must come from
  the sum, not from summed user bounds) and, optionally, the requests that arrived in the step.
* **Capacity.** One pool of identical instances (:class:`FleetModel`, an
  :class:`~scaler.policy.InstanceShape`). An in-service instance serves
  ``vcpu × capacity_utilisation`` cores and ``memory_gb × capacity_utilisation`` GB (1.0: fluid
  packing). Policies size with their *own* target utilisation; the serving capacity is the same
  yardstick for all of them.
* **Timing.** A policy decides at the start of step ``t`` and sees demand of steps ``< t`` only
  (the oracle excepted). An instance launched at ``t`` serves from step ``t + ceil(boot_s/step_s)``;
  one resumed from a *stopped* warm pool from ``t + ceil(resume_s/step_s)``; one from a *running*
  warm pool at once. Warm-pool instances are launched (and boot, at full price) before they are
  stopped into the pool. Scale-in cancels the booting instances nearest to their start first, then
  removes in-service ones, which go back to the warm pool while it is below its target.
* **Cold starts.** In step ``t`` the share of demand that does not fit the in-service capacity is
  ``f = max(0, 1 − cap_cores/cores, 1 − cap_gb/memory)``; it counts ``f × requests`` cold requests
  and ``f × cores × step_s`` cold core-seconds. Cold demand is not replayed later (the trace is what
  users asked for; feeding waits back would make each policy see a different trace).
* **Waiting.** Cold demand of step ``t`` waits for the next instance to become ready: the first
  boundary ``t' > t`` at which any instance enters service; arrivals are taken at mid-step, so the
  wait is ``(t' − t − ½) × step_s``. With no later instance the wait runs to the trace's end
  (censored). p50/p99 are weighted by cold requests (by cold core-seconds without requests).
* **Billing.** Instance-hours count running instances: in service, booting or resuming, warm
  instances booting into the pool, and a *running* warm pool. A *stopped* warm pool is billed at
  ``stopped_cost_fraction`` of the hourly price (its volumes). ``equivalent_instance_hours`` =
  ``cost / price`` is the yardstick for comparing policies at equal cost.

Speed: policies precompute their per-step targets with numpy; the fleet itself (boot queues,
cooldowns, warm pool) is one integer loop over steps with O(1) work per step (plus a scan of the
boot queue on scale-in), about 0.1 s for 14 days at 1-minute steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.demand import SystemDemand, system_demand
from scaler.policy import InstanceShape

DEFAULT_START = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday, 00:00 UTC
_NEVER = -(10**9)


@dataclass(frozen=True)
class SystemTrace:
    """System demand per step. ``cores``, ``memory_gb``: ``[T]`` average concurrent use (cores,
    GB); ``requests``: ``[T]`` arrivals per step, or None; ``step_s``: seconds per step;
    ``start``: timezone-aware time of step 0 (used for calendars and plan timestamps)."""

    cores: np.ndarray
    memory_gb: np.ndarray
    step_s: float = 60.0
    requests: np.ndarray | None = None
    start: datetime = DEFAULT_START

    def __post_init__(self) -> None:
        arrays = {"cores": self.cores, "memory_gb": self.memory_gb}
        if self.requests is not None:
            arrays["requests"] = self.requests
        n = None
        for name, a in arrays.items():
            a = np.asarray(a, dtype=np.float64)
            if a.ndim != 1 or (n is not None and len(a) != n):
                raise ValueError(f"trace {name} must be 1-D and as long as cores, got shape {a.shape}")
            if not (np.isfinite(a).all() and (a >= 0).all()):
                raise ValueError(f"trace {name} must be finite and >= 0")
            n = len(a)
            object.__setattr__(self, name, a)
        if not (self.step_s > 0 and math.isfinite(self.step_s)):
            raise ValueError(f"step_s={self.step_s} must be > 0")
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")

    @property
    def steps(self) -> int:
        return len(self.cores)

    def slice(self, lo: int, hi: int) -> "SystemTrace":
        """Steps ``[lo, hi)`` as a trace of their own (``start`` moves with ``lo``)."""
        req = None if self.requests is None else self.requests[lo:hi]
        return replace(self, cores=self.cores[lo:hi], memory_gb=self.memory_gb[lo:hi], requests=req,
                       start=self.start + timedelta(seconds=lo * self.step_s))


@dataclass(frozen=True)
class FleetModel:
    """The simulated pool: its instance shape (vCPU, GB, price, boot and resume seconds), the share
    of an instance demand may fill (``capacity_utilisation``), bounds (instance counts), the price
    share of a stopped warm instance, and the in-service count at step 0 (None: enough for the
    peak of the first boot window, so no policy pays for the replay's start)."""

    shape: InstanceShape
    capacity_utilisation: float = 1.0
    min_size: int = 0
    max_size: int = 100_000
    stopped_cost_fraction: float = 0.05
    initial_size: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.capacity_utilisation <= 1:
            raise ValueError(f"capacity_utilisation={self.capacity_utilisation} must lie in (0, 1]")
        if not 0 <= self.min_size <= self.max_size:
            raise ValueError(f"fleet needs 0 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if not 0 <= self.stopped_cost_fraction <= 1:
            raise ValueError(f"stopped_cost_fraction={self.stopped_cost_fraction} must lie in [0, 1]")

    def need(self, cores: np.ndarray, memory_gb: np.ndarray, utilisation: float | None = None) -> np.ndarray:
        """Instances (int64) whose cores and memory at ``utilisation`` (default: the serving
        capacity) cover the demand; tolerant of float noise."""
        u = self.capacity_utilisation if utilisation is None else utilisation
        x = np.maximum(np.asarray(cores, dtype=np.float64) / (self.shape.vcpu * u),
                       np.asarray(memory_gb, dtype=np.float64) / (self.shape.memory_gb * u))
        return np.maximum(np.ceil(x - 1e-9), 0).astype(np.int64)

    def delay_steps(self, step_s: float) -> tuple[int, int]:
        """``(boot, resume)`` delays in whole steps, rounded up."""
        return (math.ceil(self.shape.boot_s / step_s - 1e-9), math.ceil(self.shape.resume_s / step_s - 1e-9))


class Decision(NamedTuple):
    """A policy's targets for this step: active instances (in service + booting), warm-pool size,
    and whether the warm pool runs (resume at once, full price) or is stopped."""

    active: int
    warm: int = 0
    warm_running: bool = False


@dataclass
class FleetState:
    """What a policy sees when it decides at the start of step ``t`` (instance counts, step indices)."""

    t: int = 0
    ready: int = 0  # in service, serving step t
    pending: int = 0  # booting or resuming into service
    warm: int = 0  # initialised warm-pool instances
    warm_pending: int = 0  # booting into the warm pool
    desired: int = 0  # last active target (= ready + pending)
    warm_desired: int = 0
    warm_running: bool = False
    last_scale_out: int = _NEVER
    last_scale_in: int = _NEVER


class ScalingPolicy:
    """Base of the simulated policies. ``prepare`` precomputes per-step arrays (vectorised, reading
    at step ``t`` only demand before ``t`` unless the policy is the oracle); ``decide`` is called
    once per step. ``knob`` names the attribute a sweep varies. A policy object keeps the arrays
    of its last ``prepare``: one object per replay at a time."""

    name: str = "policy"
    knob: str = ""

    def prepare(self, trace: SystemTrace, fleet: FleetModel) -> None:
        """Precompute whatever ``decide`` needs; called once before the loop."""

    def decide(self, t: int, state: FleetState) -> Decision:
        raise NotImplementedError

    @property
    def knob_value(self) -> float:
        return float(getattr(self, self.knob)) if self.knob else float("nan")


@dataclass(frozen=True)
class SimMetrics:
    """Summary of one replay over steps ``[eval_start, T)``. Units in the field names; cold
    requests are None when the trace has no request counts."""

    policy: str
    knob: str
    knob_value: float
    steps: int
    step_s: float
    demand_core_seconds: float
    cold_core_seconds: float
    cold_requests: float | None
    cold_share: float  # cold core-seconds / demand core-seconds
    wait_p50_s: float
    wait_p99_s: float
    instance_hours: float  # running instances (in service, booting, running warm)
    warm_stopped_hours: float
    equivalent_instance_hours: float  # cost / price: instance-hours + stopped fraction × stopped hours
    cost_usd: float
    utilisation: float  # served core-seconds / vCPU-seconds of running instances
    memory_utilisation: float
    launches: int  # instances launched (boots, into service or into the warm pool)

    def to_dict(self) -> dict[str, float | int | str | None]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SimResult:
    """A replay: its metrics and per-step arrays ``[T]`` (instance counts; ``cold_share`` in [0, 1])
    for plots: in service, pending, warm pool (initialised), active target, cold share."""

    metrics: SimMetrics
    ready: np.ndarray
    pending: np.ndarray
    warm: np.ndarray
    warm_pending: np.ndarray
    warm_running: np.ndarray
    desired: np.ndarray
    arrivals: np.ndarray  # instances entering service at each step boundary
    cold_share: np.ndarray
    wait_s: np.ndarray = field(repr=False)  # wait of cold demand arriving in each step (0 where none)


def _initial_size(trace: SystemTrace, fleet: FleetModel) -> int:
    if fleet.initial_size is not None:
        return fleet.initial_size
    boot, _ = fleet.delay_steps(trace.step_s)
    w = min(trace.steps, boot + 1)
    if w == 0:
        return fleet.min_size
    return int(fleet.need(trace.cores[:w].max(), trace.memory_gb[:w].max()))


def _drain(queue: list[int], k: int, steps: range, into: list[int] | None = None) -> int:
    """Take up to ``k`` instances from ``queue`` (counts by step), visiting ``steps`` in order;
    add them to ``into`` at the same step when given. Returns how many were taken."""
    taken = 0
    for j in steps:
        m = min(k - taken, queue[j])
        if m:
            queue[j] -= m
            if into is not None:
                into[j] += m
            taken += m
            if taken == k:
                break
    return taken


def simulate(trace: SystemTrace, policy: ScalingPolicy, fleet: FleetModel, *, eval_start: int = 0) -> SimResult:
    """Replay ``trace`` through ``policy`` on ``fleet``; metrics cover steps ``[eval_start, T)``
    (earlier steps warm the policy up). See the module doc for the model."""
    n = trace.steps
    if not 0 <= eval_start <= n:
        raise ValueError(f"eval_start={eval_start} must lie in [0, {n}]")
    boot, resume = fleet.delay_steps(trace.step_s)
    far = max(boot, resume)
    policy.prepare(trace, fleet)
    lo, hi = fleet.min_size, fleet.max_size
    pend = [0] * (n + far + 2)  # instances entering service, by step
    wpend = [0] * (n + boot + 2)  # instances entering the warm pool, by step
    out = np.zeros((7, n), dtype=np.int64)
    ready_a, pend_a, warm_a, wpend_a, run_a, des_a, arr_a = out
    st = FleetState()
    st.ready = st.desired = min(max(_initial_size(trace, fleet), lo), hi)
    launches = 0
    for t in range(n):
        st.t = t
        if pend[t]:
            st.ready += pend[t]
            st.pending -= pend[t]
            arr_a[t] = pend[t]
        st.warm += wpend[t]
        st.warm_pending -= wpend[t]
        d = policy.decide(t, st)
        act = min(max(int(d.active), lo), hi)
        wt = max(int(d.warm), 0)
        total = st.ready + st.pending
        if act > total:
            take = min(act - total, st.warm)  # warm instances first
            st.warm -= take
            moved = _drain(wpend, act - total - take, range(t + 1, t + boot + 1), into=pend) if st.warm_pending else 0
            st.warm_pending -= moved  # then those still booting into the pool, soonest first
            st.pending += moved
            new = act - total - take - moved  # then new launches
            launches += new
            for count, delay in ((take, 0 if st.warm_running else resume), (new, boot)):
                if count and delay == 0:
                    st.ready += count
                    arr_a[t] += count
                elif count:
                    pend[t + delay] += count
                    st.pending += count
            st.last_scale_out = t
        elif act < total:
            # cancel the launches furthest from service first, then take instances out of service
            cancelled = _drain(pend, total - act, range(t + far, t, -1)) if st.pending else 0
            st.pending -= cancelled
            k = total - act - cancelled
            st.ready -= k
            st.warm += max(0, min(k, wt - st.warm - st.warm_pending))  # reuse on scale-in
            st.last_scale_in = t
        st.desired, st.warm_running, st.warm_desired = act, bool(d.warm_running), wt
        wtotal = st.warm + st.warm_pending
        if wt > wtotal:
            launches += wt - wtotal
            if boot == 0:
                st.warm += wt - wtotal
            else:
                wpend[t + boot] += wt - wtotal
                st.warm_pending += wt - wtotal
        elif wt < wtotal:
            cancelled = _drain(wpend, wtotal - wt, range(t + boot, t, -1)) if st.warm_pending else 0
            st.warm_pending -= cancelled  # booting ones first, the furthest from ready first
            st.warm -= wtotal - wt - cancelled
        ready_a[t], pend_a[t], warm_a[t], wpend_a[t], run_a[t], des_a[t] = (
            st.ready, st.pending, st.warm, st.warm_pending, st.warm_running, act)
    return _result(trace, policy, fleet, out, launches, eval_start)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Smallest value whose cumulative weight reaches ``q`` of the total (0 when there is none)."""
    keep = weights > 0
    if not keep.any():
        return 0.0
    v, w = values[keep], weights[keep]
    order = np.argsort(v, kind="stable")
    cw = np.cumsum(w[order])
    i = int(np.searchsorted(cw, q * cw[-1] * (1 - 1e-12), side="left"))
    return float(v[order][min(i, len(v) - 1)])


def _result(trace: SystemTrace, policy: ScalingPolicy, fleet: FleetModel, out: np.ndarray, launches: int,
            eval_start: int) -> SimResult:
    ready, pending, warm, wpend, running, desired, arrivals = out
    n, dt, shape, u = trace.steps, trace.step_s, fleet.shape, fleet.capacity_utilisation
    cores, mem = trace.cores, trace.memory_gb
    f = np.zeros(n)
    for demand, per in ((cores, shape.vcpu * u), (mem, shape.memory_gb * u)):
        gap = demand - ready * per
        gap[gap <= 1e-9 * per] = 0.0  # float noise, as in FleetModel.need
        short = np.divide(gap, demand, out=np.zeros(n), where=demand > 0)
        np.maximum(f, short, out=f)
    np.minimum(f, 1.0, out=f)
    # wait: next boundary after t at which an instance enters service (the trace's end if none)
    steps_in = np.append(np.flatnonzero(arrivals > 0), n)
    t = np.arange(n)
    nxt = steps_in[np.searchsorted(steps_in, t, side="right")]
    wait = np.where(f > 0, (nxt - t - 0.5) * dt, 0.0)

    s = slice(eval_start, n)
    cold_cs = f[s] * cores[s] * dt
    cold_req = None if trace.requests is None else float((f[s] * trace.requests[s]).sum())
    weights = cold_cs if trace.requests is None else f[s] * trace.requests[s]
    run_inst = ready[s] + pending[s] + wpend[s] + np.where(running[s] > 0, warm[s], 0)
    stopped = np.where(running[s] > 0, 0, warm[s])
    hours = float(run_inst.sum() * dt / 3600)
    stopped_h = float(stopped.sum() * dt / 3600)
    equiv = hours + fleet.stopped_cost_fraction * stopped_h
    served_c = float(((1 - f[s]) * cores[s]).sum() * dt)
    served_m = float(((1 - f[s]) * mem[s]).sum() * dt)
    run_s = float(run_inst.sum() * dt)
    demand_cs = float(cores[s].sum() * dt)
    metrics = SimMetrics(
        policy=policy.name, knob=policy.knob, knob_value=policy.knob_value, steps=n - eval_start, step_s=dt,
        demand_core_seconds=demand_cs, cold_core_seconds=float(cold_cs.sum()), cold_requests=cold_req,
        cold_share=float(cold_cs.sum() / demand_cs) if demand_cs > 0 else 0.0,
        wait_p50_s=_weighted_quantile(wait[s], weights, 0.5), wait_p99_s=_weighted_quantile(wait[s], weights, 0.99),
        instance_hours=hours, warm_stopped_hours=stopped_h, equivalent_instance_hours=equiv,
        cost_usd=equiv * shape.hourly_price_usd,
        utilisation=served_c / (run_s * shape.vcpu) if run_s > 0 else 0.0,
        memory_utilisation=served_m / (run_s * shape.memory_gb) if run_s > 0 else 0.0,
        launches=launches,
    )
    return SimResult(metrics, ready, pending, warm, wpend, running.astype(bool), desired, arrivals, f, wait)


def shortfall_share(trace: SystemTrace, fleet: FleetModel, instances: np.ndarray) -> np.ndarray:
    """Per step, the share of demand that ``instances`` (``[T]``, e.g. in-service counts) cannot
    hold: ``max(0, 1 − cap_cores/cores, 1 − cap_gb/memory)`` clipped to 1, with the float-noise
    tolerance of :func:`simulate` (given ``SimResult.ready`` it equals ``SimResult.cold_share``).
    Used to split cold demand by what capacity would have served it (e.g. ready + booting)."""
    n, shape, u = trace.steps, fleet.shape, fleet.capacity_utilisation
    inst = np.asarray(instances, dtype=np.float64)
    f = np.zeros(n)
    for demand, per in ((trace.cores, shape.vcpu * u), (trace.memory_gb, shape.memory_gb * u)):
        gap = demand - inst * per
        gap[gap <= 1e-9 * per] = 0.0
        short = np.divide(gap, demand, out=np.zeros(n), where=demand > 0)
        np.maximum(f, short, out=f)
    return np.minimum(f, 1.0)


def sweep(make_policy: Callable[[float], ScalingPolicy], knob_values: Sequence[float], trace: SystemTrace,
          fleet: FleetModel, *, eval_start: int = 0) -> list[SimMetrics]:
    """Metrics of ``make_policy(v)`` for each knob value: one policy's cost/cold-start curve."""
    return [simulate(trace, make_policy(v), fleet, eval_start=eval_start).metrics for v in knob_values]


def cold_at_cost(curve: Sequence[SimMetrics], hours: float, metric: str = "cold_core_seconds") -> float:
    """``metric`` of a curve interpolated (linearly) at ``hours`` equivalent instance-hours; NaN
    when ``hours`` lies outside the curve's range (no extrapolation)."""
    pts = sorted((m.equivalent_instance_hours, getattr(m, metric)) for m in curve)
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts], dtype=np.float64)
    if not len(xs) or hours < xs[0] - 1e-9 or hours > xs[-1] + 1e-9:
        return float("nan")
    return float(np.interp(hours, xs, ys))


def trace_from_requests(requests: pa.Table, since: datetime, until: datetime, step_s: float = 60.0) -> SystemTrace:
    """System trace of REQUEST_LOG rows on a grid of ``step_s`` seconds (60 or 300) over ``[since, until)``.

    The overlap-weighted arithmetic of :func:`pipeline.demand.system_demand` (one implementation
    for the pipeline and the replay): each request adds ``cpu_cores × overlap_s / step_s`` (and
    ``memory_mb / 1024`` likewise) to every step it runs in, and one arrival to the step it starts
    in. Requests that started before ``since`` count by their overlap. GPUs are not simulated (a CPU pool).
    """
    return trace_from_system_demand(system_demand([requests], since, until, step_s))


def trace_from_system_demand(demand: "SystemDemand") -> SystemTrace:
    """The :class:`SystemTrace` of a :class:`pipeline.demand.SystemDemand`."""
    return SystemTrace(demand.cpu_cores, demand.memory_gb, demand.step_s, demand.requests, demand.start)


def trace_from_demand(demand: pa.Table) -> SystemTrace:
    """System trace (5-minute steps) of a DEMAND table: users summed per bucket, missing buckets 0."""
    from pipeline.schemas import BUCKET_SECONDS
    if demand.num_rows == 0:
        raise ValueError("demand table is empty")
    agg = demand.group_by("ts").aggregate([("requests", "sum"), ("cpu_cores", "sum"), ("memory_gb", "sum")])
    ts = pc.cast(agg["ts"], pa.int64()).to_numpy()
    idx = (ts - ts.min()) // (BUCKET_SECONDS * 1_000_000)
    n = int(idx.max()) + 1
    cols = []
    for c in ("cpu_cores_sum", "memory_gb_sum", "requests_sum"):
        a = np.zeros(n)
        a[idx] = agg[c].to_numpy().astype(np.float64)
        cols.append(a)
    start = datetime.fromtimestamp(ts.min() / 1e6, tz=timezone.utc)
    return SystemTrace(cols[0], cols[1], float(BUCKET_SECONDS), cols[2], start)
