"""Benchmark: replay 14 days x 1,000 synthetic users at 1-minute steps through every policy.

Setup (not timed): ``pipeline.generate`` draws the request log (about 2.8 M requests), and
``scaler.simulate.trace_from_requests`` sums it into one system series of cores and memory per
minute (20,160 steps). The pool: 16 vCPU / 64 GB instances at $0.768 per hour, boot 300 s, resume
60 s from a stopped warm pool (billed at 5 %). Metrics cover the second week; the first warms up
the forecasts (a week of errors, last week's hour for AWS predictive).

Timed:

* ``seconds``: one ``simulate`` call (policy preparation included) per policy at its default
  setting, over all 14 days. Target: <= 10 s each. ``warmcast`` plans every 5 minutes (the
  forecast-and-scale cadence); ``warmcast_1min`` re-issues its forecast and plans every minute.
* ``baseline``: what one would write first for warmcast: one Python loop over steps in which every
  decision recomputes the forecast from the raw trailing week and the fleet is a list of instances.
  It runs all days (``--baseline-days N``: the first N, extrapolated linearly, which flatters it:
  its trailing window is not full in the first week). The same days are replayed by
  ``Warmcast(refit_s=300)`` — the same forecast semantics — and ``baseline_matches`` says whether
  both give identical cold demand and instance-hours (a cross-check of the fast replay).

Curves (not timed): each policy's main knob is swept; ``at_equal_cost`` gives, for reactive target
tracking at 70 %, 80 % and 90 % target utilisation, each policy's cold core-seconds interpolated at
the same equivalent instance-hours and the ratio to reactive's (null where reactive has none, or
where the policy's curve does not reach that cost: then its nearest point is given).

    python benchmarks/simulate.py                    # 1,000 users, 14 days
    python benchmarks/simulate.py --size 3000        # more users
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.generate import generate_requests  # noqa: E402
from pipeline.schemas import HORIZONS_MIN  # noqa: E402
from scaler.policy import InstanceShape, PlanOptions, Pool, PoolPolicy, PoolState, plan_pools  # noqa: E402
from scaler.sim_policies import (  # noqa: E402
    POINT_WINDOWS_S, AwsPredictive, KnativeAutoscaler, NaivePredictive, Oracle, ReactiveTargetTracking, Warmcast)
from scaler.simulate import FleetModel, SystemTrace, cold_at_cost, simulate, sweep, trace_from_requests  # noqa: E402

START = datetime(2026, 3, 2, tzinfo=timezone.utc)  # a Monday
SHAPE = InstanceShape(vcpu=16, memory_gb=64, hourly_price_usd=0.768, boot_s=300, resume_s=60)
UTILS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]
LEVELS = [0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]
POLICIES = {  # name: (factory of the knob, default knob, sweep grid)
    "reactive": (lambda v: ReactiveTargetTracking(target_utilisation=v), 0.7, UTILS),
    "knative": (lambda v: KnativeAutoscaler(target_utilisation=v), 0.7, UTILS),
    "aws_predictive": (lambda v: AwsPredictive(target_utilisation=v), 0.7, UTILS),
    "naive_predictive": (lambda v: NaivePredictive(level=v), 0.95, LEVELS),
    "warmcast": (lambda v: Warmcast(level=v), 0.95, LEVELS),
    "warmcast_1min": (lambda v: Warmcast(level=v, decide_every_s=60), 0.95, LEVELS),
    "oracle": (lambda v: Oracle(coverage=v), 1.0, [0.95, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0]),
}


def straightforward_warmcast(trace: SystemTrace, fleet: FleetModel, level: float, window_s: float) -> dict:
    """Warmcast written plainly: per step, instance lists; per decision, the forecast from scratch
    (each candidate point of ``POINT_WINDOWS_S``, its error quantile and pinball loss; the lowest
    loss per horizon and resource wins)."""
    x = np.stack([trace.cores, trace.memory_gb], axis=1)
    n, dt, s = trace.steps, trace.step_s, fleet.shape
    boot, resume = fleet.delay_steps(dt)
    k, hz = round(300 / dt), len(HORIZONS_MIN)
    window = round(window_s / dt)
    options = PlanOptions(decision_interval_s=k * dt)  # active pool covers boot + the wait for the next plan
    pool = Pool("sim", InstanceShape(s.vcpu, s.memory_gb, s.gpus, s.hourly_price_usd, s.boot_s, s.resume_s),
                PoolPolicy(min_size=fleet.min_size, max_size=fleet.max_size, max_step=fleet.max_size,
                           target_utilisation=fleet.capacity_utilisation, warm_max_size=fleet.max_size, mode="scale"))
    first = max(x[: boot + 1, 0].max() / s.vcpu, x[: boot + 1, 1].max() / s.memory_gb)
    active = [-1] * max(0, math.ceil(first - 1e-9))  # step each instance enters service, ascending
    warm: list[int] = []  # step each warm instance is initialised
    desired, wdesired, running, last_out = len(active), 0, False, None
    cold = run_s = stopped_s = 0.0
    for t in range(n):
        ready = sum(1 for r in active if r <= t)
        act, wt = desired, wdesired
        if t % k == 0 and t > 0:
            os_ = np.arange(k, n, k)  # origins on the plan grid
            os_ = os_[(os_ + hz * k <= t) & (os_ + hz * k > t - window)]
            peaks = np.stack([x[os_[:, None] + h * k + np.arange(k)].max(axis=1) for h in range(hz)], axis=1)
            best = None  # per (horizon, resource): the candidate point with the lowest pinball loss
            for w in sorted({max(1, round(p / dt)) for p in POINT_WINDOWS_S}):
                pt = x[max(0, t - w):t].max(axis=0)  # peak of the last w steps (w = 1: last value)
                if len(os_):
                    err = peaks - np.stack([x[max(0, o - w):o].max(axis=0) for o in os_])[:, None, :]
                    q, m = np.quantile(err, level, axis=0), err.mean(axis=0)
                    r = err - q
                    loss = np.maximum(level * r, (level - 1) * r).mean(axis=0)
                else:
                    q = m = loss = np.zeros((hz, 2))
                up_w, mean_w = pt + q, pt + m
                if best is None:
                    best = [loss, up_w, mean_w]
                else:
                    win = loss < best[0]
                    best = [np.where(win, a, b) for a, b in zip((loss, up_w, mean_w), best)]
            up = np.maximum(best[1], 0)
            mean = np.clip(best[2], 0, up)
            now = trace.start + timedelta(seconds=t * dt)
            rows = [{"issued_at": now, "horizon_min": h, "resource": res, "mean": float(mean[j, r]),
                     "upper": float(up[j, r])} for j, h in enumerate(HORIZONS_MIN)
                    for r, res in enumerate(("cpu_cores", "memory_gb"))]
            in_use = min(ready, math.ceil(x[t - 1, 0] / s.vcpu - 1e-9))
            state = PoolState(desired=desired, in_service=ready, in_use=in_use, warm_size=len(warm),
                              warm_state="Running" if running else "Stopped", last_scale_out_at=last_out)
            plan = plan_pools(rows, {"sim": state}, [pool], now, options=options).pools[0]
            act, wt, new_running = plan.active.target, plan.warm.target, plan.warm_state == "Running"
        else:
            new_running = running
        if t > 0:
            act = max(act, math.ceil(max(x[t - 1, 0] / s.vcpu, x[t - 1, 1] / s.memory_gb) - 1e-9))
        act = min(max(act, fleet.min_size), fleet.max_size)
        if act > len(active):
            last_out = trace.start + timedelta(seconds=t * dt)
            while len(active) < act:
                ready_warm = [w for w in warm if w <= t]
                if ready_warm:
                    warm.remove(ready_warm[0])
                    active.append(t + (0 if running else resume))
                elif warm:
                    soonest = min(warm)
                    warm.remove(soonest)
                    active.append(soonest)
                else:
                    active.append(t + boot)
                active.sort()
        while len(active) > act:
            r = active.pop()
            if r <= t and len(warm) < wt:
                warm.append(t)
        desired, wdesired, running = act, wt, new_running
        while len(warm) < wt:
            warm.append(t + boot)
        while len(warm) > wt:
            booting = [w for w in warm if w > t]
            warm.remove(max(booting) if booting else warm[0])
        ready = sum(1 for r in active if r <= t)
        share = 0.0
        for r, per in ((0, s.vcpu * fleet.capacity_utilisation), (1, s.memory_gb * fleet.capacity_utilisation)):
            gap = x[t, r] - ready * per
            if gap > 1e-9 * per:
                share = max(share, min(gap / x[t, r], 1.0))
        cold += share * x[t, 0] * dt
        n_warm_ready = sum(1 for w in warm if w <= t)
        run_s += (len(active) + len(warm) - (0 if running else n_warm_ready)) * dt
        stopped_s += (0 if running else n_warm_ready) * dt
    return {"cold_core_seconds": cold, "instance_hours": run_s / 3600, "warm_stopped_hours": stopped_s / 3600}


def synthetic_trace(users: int, days: int, seed: int) -> SystemTrace:
    requests = pa.concat_tables(list(generate_requests(users, days, START, seed)))
    return trace_from_requests(requests, START, START + timedelta(days=days), 60.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1000, help="synthetic users")
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline-days", type=int, default=None, help="default: all days")
    args = ap.parse_args()

    began = time.perf_counter()
    trace = synthetic_trace(args.size, args.days, args.seed)
    setup_s = time.perf_counter() - began
    fleet = FleetModel(SHAPE)
    eval_start = min(7 * 1440, trace.steps // 2)

    seconds = {}
    for name, (make, default, _) in POLICIES.items():
        t0 = time.perf_counter()
        simulate(trace, make(default), fleet, eval_start=eval_start)
        seconds[name] = round(time.perf_counter() - t0, 3)

    base_days = args.baseline_days or args.days
    part = trace.slice(0, base_days * 1440)
    t0 = time.perf_counter()
    base = straightforward_warmcast(part, fleet, 0.95, 7 * 86_400.0)
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = simulate(part, Warmcast(level=0.95, refit_s=300, error_scale="none", hysteresis=0.1,
                                   scale_in_grace_s=900.0), fleet).metrics  # the plain loop's settings
    ours_s = time.perf_counter() - t0
    matches = (math.isclose(base["cold_core_seconds"], ours.cold_core_seconds, rel_tol=1e-9, abs_tol=1e-6)
               and math.isclose(base["instance_hours"], ours.instance_hours, rel_tol=1e-12)
               and math.isclose(base["warm_stopped_hours"], ours.warm_stopped_hours, rel_tol=1e-12, abs_tol=1e-12))
    baseline_full_s = base_s * args.days / base_days

    curves = {name: sweep(make, grid, trace, fleet, eval_start=eval_start) for name, (make, _, grid) in POLICIES.items()}
    at_equal_cost = {}
    for u in (0.7, 0.8, 0.9):
        ref = simulate(trace, ReactiveTargetTracking(target_utilisation=u), fleet, eval_start=eval_start).metrics
        row = {"reactive_equivalent_instance_hours": round(ref.equivalent_instance_hours, 1),
               "reactive_cold_core_seconds": round(ref.cold_core_seconds, 1)}
        for name, curve in curves.items():
            cold = cold_at_cost(curve, ref.equivalent_instance_hours)
            row[name] = {"cold_core_seconds": None if math.isnan(cold) else round(cold, 1),
                         "ratio_to_reactive": None if math.isnan(cold) or ref.cold_core_seconds == 0
                         else round(cold / ref.cold_core_seconds, 3)}
            if math.isnan(cold):  # the curve does not reach this cost: say where it ends
                end = min(curve, key=lambda m: abs(m.equivalent_instance_hours - ref.equivalent_instance_hours))
                row[name]["nearest_point"] = {"equivalent_instance_hours": round(end.equivalent_instance_hours, 1),
                                              "cold_core_seconds": round(end.cold_core_seconds, 1)}
        at_equal_cost[f"reactive_{u:g}"] = row

    print(json.dumps({
        "figure": "simulate_seconds_per_policy_setting",
        "unit": "s",
        "seconds": seconds,
        "max_seconds": max(seconds.values()),
        "target_s": 10,
        "baseline": {"what": "straightforward per-step warmcast loop (instance lists, forecast recomputed per decision)",
                     "days_run": base_days, "seconds_run": round(base_s, 2),
                     "seconds_extrapolated": round(baseline_full_s, 1),
                     "ours_same_days_s": round(ours_s, 3), "baseline_matches": matches},
        "ratio_baseline_to_warmcast": round(baseline_full_s / seconds["warmcast"], 1),
        "figure_note": "seconds: one simulate() call per policy at its default knob over all steps",
        "sizes": {"users": args.size, "days": args.days, "step_s": trace.step_s, "steps": trace.steps,
                  "eval_steps": trace.steps - eval_start, "requests": int(trace.requests.sum()),
                  "mean_cores": round(float(trace.cores.mean()), 1), "peak_cores": round(float(trace.cores.max()), 1),
                  "instance": {"vcpu": SHAPE.vcpu, "memory_gb": SHAPE.memory_gb, "usd_per_h": SHAPE.hourly_price_usd,
                               "boot_s": SHAPE.boot_s, "resume_s": SHAPE.resume_s}},
        "curves": {name: [{"knob": m.knob, "value": m.knob_value,
                           "equivalent_instance_hours": round(m.equivalent_instance_hours, 1),
                           "cold_core_seconds": round(m.cold_core_seconds, 1),
                           "cold_requests": round(m.cold_requests or 0.0, 1),
                           "wait_p99_s": m.wait_p99_s, "utilisation": round(m.utilisation, 3)} for m in curve]
                   for name, curve in curves.items()},
        "at_equal_cost": at_equal_cost,
        "setup_s": round(setup_s, 1),
        "total_s": round(time.perf_counter() - began, 1),
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
    }))


if __name__ == "__main__":
    main()
