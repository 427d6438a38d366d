"""Evaluation: does predictive scaling beat reactive, and by how much? (issue 6)

Pure computation on a :class:`~scaler.simulate.SystemTrace`; rendering lives in
:mod:`scaler.report`, reading the lake in ``warmcast evaluate`` (``pipeline/cli.py``).

1. **Curves.** Each policy's main knob is swept (:data:`POLICY_GRIDS`); every setting is one
   replay over the whole trace, scored on steps ``[eval_start, T)`` (the steps before warm up the
   forecasts: by default the first week, or the first half of a shorter trace). A point is
   ``(equivalent instance-hours, cold core-seconds, cold requests, p99 wait)``.
2. **Reference cost.** Reactive target tracking at 70 % utilisation (``reference_utilisation``):
   its equivalent instance-hours ``H`` (cost / hourly price; a stopped warm instance counts at
   its stopped price share) are the budget at which every policy is compared.
3. **Equal-cost interpolation** (:func:`value_at_cost`). A policy's cold demand at ``H`` is read
   off its curve: points sorted by equivalent instance-hours (points of equal cost averaged),
   linear interpolation between the two points around ``H``. Cold demand falls convexly with
   cost, so the chord lies *above* the true curve: the interpolated value is a slight
   overestimate for the compared policy (never flattering it). ``H`` outside a curve's range
   gives no value (None, no extrapolation); the report then names the curve's nearest point.
   ``ratio_to_reactive_at_equal_cost`` = interpolated cold core-seconds / reactive's at ``H``
   (``_requests``: the same for cold requests); ``ratio_to_naive_at_equal_cost`` divides by the
   naive heuristic's interpolated value instead.
4. **At the reference cost** each policy is replayed once more at the knob interpolated (linearly
   in cost) to ``H``, for the pool-size plots.

Forecasts are issued with past data only: every simulated policy reads at step ``t`` only demand
before ``t`` (the oracle excepted, by design).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from scaler.policy import InstanceShape
from scaler.sim_policies import (AwsPredictive, KnativeAutoscaler, NaivePredictive, Oracle, ReactiveTargetTracking,
                                 Warmcast)
from scaler.simulate import FleetModel, ScalingPolicy, SimMetrics, SimResult, SystemTrace, simulate

UTILS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
COVERAGE = (0.8, 0.9, 0.95, 1.0, 1.1, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class PolicySpec:
    """A policy under evaluation: a label for people, its knob, a factory and the sweep grid."""

    name: str
    label: str
    knob: str
    make: Callable[[float], ScalingPolicy]
    grid: tuple[float, ...]


POLICY_SPECS: dict[str, PolicySpec] = {s.name: s for s in (
    PolicySpec("reactive", "reactive target tracking", "target_utilisation",
               lambda v: ReactiveTargetTracking(target_utilisation=v), UTILS),
    PolicySpec("knative", "Knative KPA", "target_utilisation", lambda v: KnativeAutoscaler(target_utilisation=v), UTILS),
    PolicySpec("aws_predictive", "AWS predictive + tracking", "target_utilisation",
               lambda v: AwsPredictive(target_utilisation=v), UTILS),
    PolicySpec("naive_predictive", "naive heuristic (last + increment quantile)", "level",
               lambda v: NaivePredictive(level=v), LEVELS),
    PolicySpec("warmcast", "warmcast", "level", lambda v: Warmcast(level=v), LEVELS),
    PolicySpec("warmcast_1min", "warmcast, planning every minute", "level",
               lambda v: Warmcast(level=v, decide_every_s=60), LEVELS),
    PolicySpec("oracle", "oracle (perfect foresight)", "coverage", lambda v: Oracle(coverage=v), COVERAGE),
)}
POLICY_NAMES = tuple(POLICY_SPECS)
REFERENCE_POLICY, NAIVE_POLICY = "reactive", "naive_predictive"


def choose_shape(trace: SystemTrace, *, vcpu: float | None = None, boot_s: float = 300.0,
                 resume_s: float = 60.0) -> InstanceShape:
    """The simulated instance: ``vcpu`` cores (default: 16, halved down to 1 until the mean demand
    needs at least 8 instances, so a small trace is not one instance), 4 GB per vCPU, $0.048 per
    vCPU-hour (an m-class on-demand price), boot and resume in seconds."""
    if vcpu is None:
        vcpu, mean = 16.0, float(trace.cores[trace.cores > 0].mean()) if (trace.cores > 0).any() else 0.0
        while vcpu > 1 and mean / vcpu < 8:
            vcpu /= 2
    return InstanceShape(vcpu=vcpu, memory_gb=4.0 * vcpu, hourly_price_usd=round(0.048 * vcpu, 4),
                         boot_s=boot_s, resume_s=resume_s)


def default_eval_start(trace: SystemTrace) -> int:
    """First scored step: one week, or half of a trace shorter than two weeks."""
    return min(round(7 * 86_400 / trace.step_s), trace.steps // 2)


def value_at_cost(curve: Sequence[SimMetrics], hours: float, metric: str) -> float | None:
    """``metric`` of ``curve`` linearly interpolated at ``hours`` equivalent instance-hours (points
    of equal cost averaged); None when ``hours`` lies outside the curve's range or the metric is
    missing (e.g. cold requests of a trace without request counts)."""
    pts: dict[float, list[float]] = {}
    for m in curve:
        v = getattr(m, metric)
        if v is None:
            return None
        pts.setdefault(round(m.equivalent_instance_hours, 9), []).append(float(v))
    if not pts:
        return None
    xs = np.array(sorted(pts))
    ys = np.array([np.mean(pts[x]) for x in xs])
    tol = 1e-9 * max(1.0, abs(hours))
    if hours < xs[0] - tol or hours > xs[-1] + tol:
        return None
    return float(np.interp(hours, xs, ys))


def knob_at_cost(curve: Sequence[SimMetrics], hours: float) -> float:
    """The knob value whose cost is ``hours``, linear in cost between the points around it
    (clamped to the swept range)."""
    pts = sorted((m.equivalent_instance_hours, m.knob_value) for m in curve)
    xs, ks = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if hours <= xs[0]:
        return float(ks[0])
    if hours >= xs[-1]:
        return float(ks[-1])
    i = int(np.searchsorted(xs, hours))
    x0, x1 = xs[i - 1], xs[i]
    w = 0.0 if x1 == x0 else (hours - x0) / (x1 - x0)
    return float(ks[i - 1] + w * (ks[i] - ks[i - 1]))


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None:
        return None
    if den == 0:
        return None  # the reference has no cold demand at this cost: no ratio (the report shows both values)
    return num / den


@dataclass
class PolicyEvaluation:
    """One policy's curve and where it stands at the reference cost."""

    spec: PolicySpec
    curve: list[SimMetrics]
    cold_core_seconds_at_cost: float | None = None
    cold_requests_at_cost: float | None = None
    ratio_to_reactive: float | None = None
    ratio_to_reactive_requests: float | None = None
    ratio_to_naive: float | None = None
    ratio_to_naive_requests: float | None = None
    knob_at_cost: float = math.nan
    at_cost: SimResult | None = field(default=None, repr=False)  # replay at knob_at_cost

    def nearest(self, hours: float) -> SimMetrics:
        return min(self.curve, key=lambda m: abs(m.equivalent_instance_hours - hours))


@dataclass
class Evaluation:
    """Everything the report shows. ``reference``: reactive at the reference utilisation;
    ``also``: reactive at other utilisations (label → its metrics) with each policy's ratios."""

    trace: SystemTrace
    fleet: FleetModel
    eval_start: int
    reference_utilisation: float
    reference: SimMetrics
    policies: dict[str, PolicyEvaluation]
    also: dict[str, dict] = field(default_factory=dict)
    forecast_note: str = ""

    def summary(self) -> dict:
        """The ``summary.json`` content (plain JSON types; None for undefined ratios)."""
        def r(x: float | None, nd: int = 4) -> float | None:
            return None if x is None or not math.isfinite(x) else round(x, nd)

        out = {
            "reference": {"policy": REFERENCE_POLICY, "target_utilisation": self.reference_utilisation,
                          "equivalent_instance_hours": r(self.reference.equivalent_instance_hours, 3),
                          "cold_core_seconds": r(self.reference.cold_core_seconds, 3),
                          "cold_requests": r(self.reference.cold_requests, 3)},
            "interpolation": ("each policy's cold demand is interpolated linearly in equivalent instance-hours "
                              "between the two swept settings around the reference cost (no extrapolation: null "
                              "outside the curve); ratio = that value / the reference's (or the naive heuristic's "
                              "interpolated value)"),
            "forecast": self.forecast_note,
            "policies": {},
            "also_at": self.also,
        }
        for name, pe in self.policies.items():
            near = pe.nearest(self.reference.equivalent_instance_hours)
            out["policies"][name] = {
                "label": pe.spec.label,
                "knob": pe.spec.knob,
                "curve": [{"knob": m.knob_value, "instance_hours": r(m.instance_hours, 3),
                           "equivalent_instance_hours": r(m.equivalent_instance_hours, 3),
                           "cold_requests": r(m.cold_requests, 3), "cold_core_seconds": r(m.cold_core_seconds, 3),
                           "wait_p99_s": r(m.wait_p99_s, 1), "utilisation": r(m.utilisation, 4),
                           "cost_usd": r(m.cost_usd, 2)} for m in pe.curve],
                "ratio_to_reactive_at_equal_cost": r(pe.ratio_to_reactive),
                "ratio_to_reactive_at_equal_cost_requests": r(pe.ratio_to_reactive_requests),
                "ratio_to_naive_at_equal_cost": r(pe.ratio_to_naive),
                "ratio_to_naive_at_equal_cost_requests": r(pe.ratio_to_naive_requests),
                "cold_core_seconds_at_equal_cost": r(pe.cold_core_seconds_at_cost, 3),
                "cold_requests_at_equal_cost": r(pe.cold_requests_at_cost, 3),
                "knob_at_equal_cost": r(pe.knob_at_cost),
                "nearest_point": {"knob": near.knob_value, "equivalent_instance_hours": r(near.equivalent_instance_hours, 3),
                                  "cold_core_seconds": r(near.cold_core_seconds, 3)},
            }
        return out


def _ratios(policies: dict[str, PolicyEvaluation], ref: SimMetrics) -> dict[str, dict]:
    """Per policy, cold demand interpolated at ``ref``'s cost and its ratios to reactive and naive."""
    hours = ref.equivalent_instance_hours
    naive = policies.get(NAIVE_POLICY)
    naive_cs = value_at_cost(naive.curve, hours, "cold_core_seconds") if naive else None
    naive_rq = value_at_cost(naive.curve, hours, "cold_requests") if naive else None
    out = {}
    for name, pe in policies.items():
        cs = value_at_cost(pe.curve, hours, "cold_core_seconds")
        rq = value_at_cost(pe.curve, hours, "cold_requests")
        out[name] = {"cold_core_seconds": cs, "cold_requests": rq,
                     "ratio_to_reactive": _ratio(cs, ref.cold_core_seconds),
                     "ratio_to_reactive_requests": _ratio(rq, ref.cold_requests),
                     "ratio_to_naive": _ratio(cs, naive_cs), "ratio_to_naive_requests": _ratio(rq, naive_rq)}
    return out


def evaluate(trace: SystemTrace, fleet: FleetModel, *, policies: Sequence[str] = POLICY_NAMES,
             specs: dict[str, PolicySpec] | None = None, reference_utilisation: float = 0.7,
             also_utilisations: Sequence[float] = (0.8, 0.9), eval_start: int | None = None,
             forecast_note: str = "", progress: Callable[[str], None] | None = None) -> Evaluation:
    """Sweep every policy, compare at the reference cost, replay each at that cost (module doc)."""
    specs = specs or POLICY_SPECS
    unknown = [p for p in policies if p not in specs]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(specs)}")
    if REFERENCE_POLICY not in policies:
        raise ValueError(f"the evaluation needs the {REFERENCE_POLICY!r} policy: it sets the reference cost")
    if eval_start is None:
        eval_start = default_eval_start(trace)
    if not 0 <= eval_start < trace.steps:
        raise ValueError(f"the trace has {trace.steps} steps; nothing is left to score after a warm-up of {eval_start}")
    evals: dict[str, PolicyEvaluation] = {}
    for name in policies:
        spec = specs[name]
        grid = sorted(set(spec.grid) | ({reference_utilisation, *also_utilisations} if name == REFERENCE_POLICY else set()))
        if progress:
            progress(f"{name}: {len(grid)} settings")
        evals[name] = PolicyEvaluation(spec, [simulate(trace, spec.make(v), fleet, eval_start=eval_start).metrics
                                              for v in grid])
    by_u = {m.knob_value: m for m in evals[REFERENCE_POLICY].curve}
    ref = by_u[reference_utilisation]
    for name, r in _ratios(evals, ref).items():
        pe = evals[name]
        pe.cold_core_seconds_at_cost, pe.cold_requests_at_cost = r["cold_core_seconds"], r["cold_requests"]
        pe.ratio_to_reactive, pe.ratio_to_reactive_requests = r["ratio_to_reactive"], r["ratio_to_reactive_requests"]
        pe.ratio_to_naive, pe.ratio_to_naive_requests = r["ratio_to_naive"], r["ratio_to_naive_requests"]
        pe.knob_at_cost = knob_at_cost(pe.curve, ref.equivalent_instance_hours)
        pe.at_cost = simulate(trace, pe.spec.make(pe.knob_at_cost), fleet, eval_start=eval_start)
    also = {}
    for u in also_utilisations:
        m = by_u[u]
        also[f"reactive_{u:g}"] = {
            "equivalent_instance_hours": round(m.equivalent_instance_hours, 3),
            "cold_core_seconds": round(m.cold_core_seconds, 3),
            "policies": {k: {kk: (None if vv is None else round(vv, 4)) for kk, vv in v.items()}
                         for k, v in _ratios(evals, m).items()}}
    return Evaluation(trace, fleet, eval_start, reference_utilisation, ref, evals, also, forecast_note)


FORECAST_NOTE = ("baseline, not the LSTM: the last value of the system demand (all users summed) plus the chosen "
                 "quantile of that forecast's own past errors per horizon (trailing 7 days, refit hourly, an error "
                 "used only once its target is past) - the last-value baseline of models/baselines.py applied to "
                 "the sum, so the bound is a bound of the sum (DESIGN.md 'Aggregation'); errors are scaled by the "
                 "square root of the level. Sized by scaler.policy.plan_pools every 5 minutes (the forecast-and-"
                 "scale cadence; 'warmcast_1min': every minute) for boot time + the decision interval, warm pool for "
                 "30 min, no hysteresis or scale-in grace, and a reactive safety net that pulls warm instances.")


def data_hours(loc, prefix: str = "") -> tuple["datetime", "datetime"]:
    """``[first hour, last hour + 1 h)`` of the ``date=/hour=`` partitions under ``loc``/``prefix``."""
    from datetime import timedelta

    from pipeline.landing import partition_hour

    hours = {h for f in loc.list_files(loc.path(prefix) if prefix else None) if (h := partition_hour(f)) is not None}
    if not hours:
        raise FileNotFoundError(f"no date=YYYY-MM-DD/hour=HH partitions under {loc.uri}/{prefix}".rstrip("/"))
    return min(hours), max(hours) + timedelta(hours=1)


def run_evaluation(loc, source: str, out, *, since=None, until=None, step_s: float = 60.0,
                   policies: Sequence[str] = POLICY_NAMES, vcpu: float | None = None, boot_s: float = 300.0,
                   warmup_s: float | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """``warmcast evaluate``: system demand of a lake (``source="lake"``) or of the Parquet files
    of a landing folder written by ``warmcast import`` (``"trace"``, no ingest) over
    ``[since, until)`` (default: every partition hour present) on ``step_s`` steps; evaluate; write
    the report into ``out``. Returns the paths written (name → path)."""
    from pathlib import Path

    from pipeline.demand import system_demand_from_landing, system_demand_from_lake
    from scaler.report import write_report
    from scaler.simulate import trace_from_system_demand

    if source not in ("lake", "trace"):
        raise ValueError(f"source must be 'lake' or 'trace', got {source!r}")
    if since is None or until is None:
        first, last = data_hours(loc, "request_logs" if source == "lake" else "")
        since, until = since or first, until or last
    if until <= since:
        raise ValueError(f"--until {until.isoformat()} must be after --since {since.isoformat()}")
    if progress:
        progress(f"reading {source} {loc.uri}: {since.isoformat()} – {until.isoformat()} on {step_s:g}-s steps")
    read = system_demand_from_lake if source == "lake" else system_demand_from_landing
    trace = trace_from_system_demand(read(loc, since, until, step_s))
    if not trace.cores.any():
        raise ValueError(f"no demand in {loc.uri} between {since.isoformat()} and {until.isoformat()}")
    fleet = FleetModel(choose_shape(trace, vcpu=vcpu, boot_s=boot_s))
    eval_start = None if warmup_s is None else round(warmup_s / trace.step_s)
    note = FORECAST_NOTE
    if source == "lake" and loc.is_dir(loc.path("models")):
        note += " (The lake has a model store; replaying the per-user LSTM at every 5-minute origin is not done here.)"
    ev = evaluate(trace, fleet, policies=policies, eval_start=eval_start, forecast_note=note, progress=progress)
    meta = {"source": f"{source} {loc.uri}", "since": since.isoformat(), "until": until.isoformat(), "step_s": step_s}
    return write_report(ev, Path(out), meta)
