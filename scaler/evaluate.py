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
   Before that, each policy's curve is refined near ``H`` (:func:`refine_at_cost`): up to two more
   settings at the knob interpolated to ``H``, until a point lies within 1 % of ``H``, so the
   interpolation spans a short chord instead of the grid's (on the 7-point grid alone the naive
   heuristic's ratio on the Azure sample read 0.949; refined, 1.347). The same refinement runs
   near reactive's cost at each other utilisation the report reads ratios at (``also_at``): refined
   only near ``H``, a chord from 43.5 to 57.8 instance-hours read the per-user LSTM policy's ratio at
   reactive-80 % on the Azure sample as 0.985, where the curve refined there reads 0.914.
4. **At the reference cost** each policy is replayed once more at the knob interpolated (linearly
   in cost) to ``H``, for the pool-size plots.
5. **Where the cold demand is** (:func:`where_cold`, ``summary.json`` key ``episodes``). Each
   reference-cost replay's cold demand (scored steps) is split into *episodes*: maximal runs of
   steps with cold core-seconds > 0, where runs separated by fewer than :data:`EPISODE_GAP_S`
   seconds of steps without cold demand are merged (one burst whose capacity arrives in pieces is
   one episode). Per policy: the number of episodes, the largest one's share of the policy's cold
   core-seconds, the top episodes (start, duration from the first to the last cold step, cold
   core-hours, demand level before → peak: the mean demand over the :data:`EPISODE_LOOKBACK_S`
   seconds before the first cold step, the peak inside the episode, and their ratio), and, as a
   *robustness figure only*, the cold core-seconds outside reactive's largest episode (the same
   step window removed for every policy) as a ratio to reactive's outside it. It also splits the
   cold demand by the capacity that would have served it: *booting* (the share that instances
   already asked for, booting or resuming into service in that step, would have held) vs *never
   asked for* (the rest: the active target itself was below demand). These replays sit at the
   interpolated knob, so their plain ratio to reactive differs slightly from the interpolated
   ``ratio_to_reactive_at_equal_cost``, which this section does not change.

Forecasts are issued with past data only: every simulated policy reads at step ``t`` only demand
before ``t`` (the oracle excepted, by design). ``warmcast`` plans from a baseline forecast of the
system sum; with ``forecaster="lstm"``, ``warmcast_lstm`` plans from warmcast's own per-user LSTMs
(trained before the scored period, issued at every 5-minute origin, aggregated to sample paths of
the sum: :func:`train_lstm_models`, :func:`lstm_system_forecast`), reconciled with the top-down
forecast of the system's 5-minute demand (:func:`topdown_system_forecast`) by recent score, as the
pipeline's ``reconciled_target`` (:func:`lstm_policy_spec`); ``warmcast_lstm_max`` never below
the top-down forecast (the maximum of the two) and ``warmcast_lstm_bottom_up`` from the sampled
sum alone. torch is imported only there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Callable, Sequence

import numpy as np

from pipeline.config import RECONCILE_MODES
from pipeline.schemas import HORIZONS_MIN
from pipeline.topdown import RECONCILE_MIN_SCORED, topdown_forecast
from scaler.policy import InstanceShape
from scaler.sim_policies import (AwsPredictive, KnativeAutoscaler, NaivePredictive, Oracle, ReactiveTargetTracking,
                                 SampledForecast, Warmcast)
from scaler.simulate import FleetModel, ScalingPolicy, SimMetrics, SimResult, SystemTrace, shortfall_share, simulate

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
    PolicySpec("warmcast", "warmcast, baseline forecast (last value of the sum)", "level", lambda v: Warmcast(level=v), LEVELS),
    PolicySpec("warmcast_1min", "warmcast, planning every minute", "level",
               lambda v: Warmcast(level=v, decide_every_s=60), LEVELS),
    PolicySpec("oracle", "oracle (perfect foresight)", "coverage", lambda v: Oracle(coverage=v), COVERAGE),
)}
POLICY_NAMES = tuple(POLICY_SPECS)
REFERENCE_POLICY, NAIVE_POLICY = "reactive", "naive_predictive"
LSTM_POLICY = "warmcast_lstm"  # only with forecaster="lstm": see lstm_policy_spec
LSTM_MAX_POLICY = "warmcast_lstm_max"  # likewise: always the higher of the bottom-up and top-down bounds
LSTM_BOTTOM_UP_POLICY = "warmcast_lstm_bottom_up"  # likewise: the per-user forecasts' sum alone
LSTM_POLICIES = (LSTM_POLICY, LSTM_MAX_POLICY, LSTM_BOTTOM_UP_POLICY)
EPISODE_GAP_S = 900.0  # cold runs separated by less than this (without cold demand) are one episode
EPISODE_LOOKBACK_S = 900.0  # an episode's "level before": mean demand over this long before its first cold step
EPISODE_TOP = 3  # episodes listed per policy
FORECASTERS = ("baseline", "lstm")


WARM_POLICY = "reactive_warm"  # only with warm_headroom > 0: see with_warm_headroom


def with_warm_headroom(specs: dict[str, PolicySpec], headroom: float) -> dict[str, PolicySpec]:
    """``specs`` with every warmcast policy keeping a stopped warm pool of at least ``headroom`` ×
    its active target (:class:`~scaler.policy.PoolPolicy` ``warm_headroom``), plus
    :data:`WARM_POLICY`: reactive target tracking with the same warm pool, so a report separates
    what the warm pool buys from what the forecast buys. ``headroom = 0``: ``specs`` unchanged."""
    if not (np.isfinite(headroom) and headroom >= 0):
        raise ValueError(f"warm headroom must be finite and >= 0, got {headroom}")
    if headroom == 0:
        return dict(specs)
    out = {}
    for name, spec in specs.items():
        if name.startswith("warmcast"):
            def make(v: float, _make=spec.make) -> ScalingPolicy:
                pol = _make(v)
                pol.warm_headroom = headroom
                return pol
            spec = replace(spec, label=f"{spec.label}, warm pool >= {headroom:g} x active", make=make)
        out[name] = spec
        if name == REFERENCE_POLICY:
            out[WARM_POLICY] = PolicySpec(WARM_POLICY, f"reactive target tracking, warm pool >= {headroom:g} x active",
                                          "target_utilisation",
                                          lambda v: _named(ReactiveTargetTracking(target_utilisation=v, warm_headroom=headroom),
                                                           WARM_POLICY), UTILS)
    return out


def _named(policy: ScalingPolicy, name: str) -> ScalingPolicy:
    policy.name = name
    return policy


def lstm_policy_spec(forecast: SampledForecast, topdown: "TopdownForecast | None" = None, *, reconcile: str = "score",
                     window: int = 288, min_scored: int = RECONCILE_MIN_SCORED) -> PolicySpec:
    """warmcast's plan driven by its own per-user LSTM forecasts, aggregated (``forecast``); the
    knob ``level`` is the quantile of the sampled system sum, rebuilt for every setting. Without
    ``topdown`` (:data:`LSTM_BOTTOM_UP_POLICY`): the sampled sum alone. With it, as the pipeline's
    ``reconciled_target``: ``reconcile="score"`` (:data:`LSTM_POLICY`) takes, per issue, horizon
    and resource, whichever of max(bottom-up, top-down), the top-down bound, the bottom-up bound and
    their average had the lowest pinball loss at ``level`` over the ``window`` latest issues whose
    demand is known (:func:`pipeline.topdown.reconcile_choice`; the maximum until ``min_scored`` are);
    ``"max"`` (:data:`LSTM_MAX_POLICY`): always the higher of the two."""
    from pipeline.topdown import reconcile_candidates, reconcile_choice

    if reconcile not in RECONCILE_MODES:
        raise ValueError(f"reconcile must be one of {', '.join(RECONCILE_MODES)}, got {reconcile!r}")
    name = LSTM_BOTTOM_UP_POLICY if topdown is None else LSTM_POLICY if reconcile == "score" else LSTM_MAX_POLICY

    def make(level: float) -> Warmcast:
        fc = forecast.at(level)
        if topdown is not None:
            cands = reconcile_candidates(fc.upper, topdown.upper(level))
            if reconcile == "score":
                pick = reconcile_choice(cands, topdown.actual(), level, window=window, min_scored=min_scored)
                fc = replace(fc, upper=np.take_along_axis(cands, pick[None], axis=0)[0])
            else:
                fc = replace(fc, upper=cands[0])
        pol = Warmcast(level=level, forecast=fc)
        pol.name = name
        return pol

    label = ("warmcast, per-user LSTMs aggregated (bottom-up only)" if topdown is None
             else "warmcast, per-user LSTMs aggregated, reconciled with the top-down band by recent score" if reconcile == "score"
             else "warmcast, per-user LSTMs aggregated, never below the top-down band")
    return PolicySpec(name, label, "level", make, LEVELS)


@dataclass
class TopdownForecast:
    """The pipeline's top-down forecast (:func:`pipeline.topdown.topdown_forecast`, as
    :func:`pipeline.aggregate.aggregate` computes it) issued at the buckets ``issues`` of
    ``series`` from the ``history_buckets`` before each, one level at a time (cached). An issue
    with too little history has none (0: the bottom-up bound alone)."""

    series: np.ndarray  # [B, 2] system (cpu_cores, memory_gb) per 5-minute bucket from the trace's start
    issues: np.ndarray
    history_buckets: int = 288
    _cache: dict = field(default_factory=dict)

    def upper(self, level: float) -> np.ndarray:
        """``[len(issues), 6, 2]``: the upper bound at ``level`` (1: the largest past error)."""
        if level not in self._cache:
            out = np.zeros((len(self.issues), len(HORIZONS_MIN), self.series.shape[1]))
            for j, i in enumerate(self.issues):
                fc = topdown_forecast(self.series[max(0, i - self.history_buckets):i], level)
                if fc is not None:
                    out[j] = fc[0]
            self._cache[level] = out
        return self._cache[level]

    def actual(self) -> np.ndarray:
        """``[len(issues), 6, R]``: the demand each issue's horizons forecast (bucket ``issue + j``;
        NaN past the end of the series)."""
        idx = self.issues[:, None] + np.arange(len(HORIZONS_MIN))[None, :]
        ok = idx < len(self.series)
        return np.where(ok[..., None], self.series[np.minimum(idx, len(self.series) - 1)], np.nan)


def topdown_system_forecast(trace: SystemTrace, eval_start: int, history_buckets: int = 288) -> TopdownForecast:
    """The top-down forecast at every 5-minute origin of the scored period ``[eval_start, T)``
    (the origins of :func:`lstm_system_forecast`), from ``trace`` averaged over 5-minute buckets
    (the demand series' definition: average concurrent use; every user, models or not)."""
    from pipeline.schemas import BUCKET_SECONDS

    k = round(BUCKET_SECONDS / trace.step_s)
    n = trace.steps // k
    x = np.stack([trace.cores, trace.memory_gb], axis=1)[: n * k].reshape(n, k, 2).mean(axis=1)
    if eval_start % k:
        raise ValueError(f"eval_start={eval_start} is not on the 5-minute grid ({k} steps)")
    return TopdownForecast(x, np.arange(eval_start // k, n), history_buckets)


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


#: Extra replays per policy near the reference cost (:func:`refine_at_cost`), and the share of the
#: reference cost within which a point is close enough to stop.
REFINE_STEPS = 2
REFINE_TOLERANCE = 0.01


def refine_at_cost(curve: list[SimMetrics], hours: float, replay: Callable[[float], SimMetrics],
                   steps: int = REFINE_STEPS, tolerance: float = REFINE_TOLERANCE) -> int:
    """Add up to ``steps`` points to ``curve`` (in place) at the knob :func:`knob_at_cost` reads at
    ``hours`` (a secant step in the knob): each ``replay(knob)`` is one more setting of the policy.
    Stops early when a point already lies within ``tolerance`` × ``hours`` of ``hours``, when
    ``hours`` is outside the curve (no interpolation to refine) or when the knob is one already
    replayed. Returns the number of points added. A coarse grid leaves the chord between two
    settings far apart in cost, and cold demand is not a smooth function of the knob: one more
    setting near the reference cost bounds the interpolation error far better than the grid."""
    added = 0
    for _ in range(max(0, int(steps))):
        costs = [m.equivalent_instance_hours for m in curve]
        if not costs or not min(costs) <= hours <= max(costs):
            break
        if min(abs(c - hours) for c in costs) <= tolerance * hours:
            break
        knob = knob_at_cost(curve, hours)
        if any(math.isclose(m.knob_value, knob, rel_tol=0.0, abs_tol=1e-12) for m in curve):
            break
        curve.append(replay(knob))
        added += 1
    return added


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
    forecasters: dict[str, str] = field(default_factory=dict)  # policy -> which forecast drove it (report text)
    episodes: dict = field(default_factory=dict)  # where_cold() of the reference-cost replays

    def summary(self) -> dict:
        """The ``summary.json`` content (plain JSON types; None for undefined ratios)."""
        def r(x: float | None, nd: int = 4) -> float | None:
            return None if x is None or not math.isfinite(x) else round(x, nd)

        out = {
            "reference": {"policy": REFERENCE_POLICY, "target_utilisation": self.reference_utilisation,
                          "equivalent_instance_hours": r(self.reference.equivalent_instance_hours, 3),
                          "cold_core_seconds": r(self.reference.cold_core_seconds, 3),
                          "cold_requests": r(self.reference.cold_requests, 3)},
            "interpolation": ("each policy's curve is refined with up to two more settings at the knob interpolated "
                              "to the reference cost, and as many at each cost of also_at; its cold demand is then "
                              "interpolated linearly in equivalent "
                              "instance-hours between the two settings around the reference cost (no extrapolation: "
                              "null outside the curve); ratio = that value / the reference's (or the naive "
                              "heuristic's interpolated value)"),
            "forecast": self.forecast_note,
            "forecasters": dict(self.forecasters),
            "policies": {},
            "also_at": self.also,
            "episodes": self.episodes,
        }
        for name, pe in self.policies.items():
            near = pe.nearest(self.reference.equivalent_instance_hours)
            out["policies"][name] = {
                "label": pe.spec.label,
                "knob": pe.spec.knob,
                "forecaster": self.forecasters.get(name),
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
             forecast_note: str = "", forecasters: dict[str, str] | None = None,
             progress: Callable[[str], None] | None = None, refine_steps: int = REFINE_STEPS) -> Evaluation:
    """Sweep every policy, refine each curve near the reference cost and near reactive's cost at each
    of ``also_utilisations`` (:func:`refine_at_cost`, ``refine_steps`` replays at most per cost; 0:
    the grid alone), compare at the reference cost (and at the others: ``also``), replay each
    at that cost (module doc)."""
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
    if refine_steps > 0:  # near every cost a ratio is read at: the reference's and the other utilisations'
        costs = [by_u[u].equivalent_instance_hours for u in (reference_utilisation, *also_utilisations)]
        for name, pe in evals.items():
            if name == REFERENCE_POLICY:
                continue

            def one(knob: float, _spec=pe.spec) -> SimMetrics:
                return simulate(trace, _spec.make(knob), fleet, eval_start=eval_start).metrics

            added = sum(refine_at_cost(pe.curve, hours, one, refine_steps) for hours in costs)
            pe.curve.sort(key=lambda m: m.knob_value)
            if progress and added:
                progress(f"{name}: {added} more setting(s) near the reference costs")
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
    episodes = where_cold(trace, fleet, eval_start, {n: pe.at_cost for n, pe in evals.items()})
    return Evaluation(trace, fleet, eval_start, reference_utilisation, ref, evals, also, forecast_note,
                      {k: v for k, v in (forecasters or {}).items() if k in evals}, episodes)


def cold_runs(cold: np.ndarray, gap_steps: int = 1) -> list[tuple[int, int]]:
    """``[lo, hi)`` step ranges of the episodes of ``cold`` (per-step cold amounts): maximal runs of
    steps with ``cold > 0``, runs separated by fewer than ``gap_steps`` steps without cold demand
    merged (``gap_steps=1``: only consecutive cold steps form one episode)."""
    idx = np.flatnonzero(np.asarray(cold) > 0)
    if not len(idx):
        return []
    cut = np.flatnonzero(np.diff(idx) - 1 >= max(1, gap_steps))  # steps without cold demand between two cold ones
    lo = np.r_[idx[0], idx[cut + 1]]
    hi = np.r_[idx[cut], idx[-1]] + 1
    return list(zip(lo.tolist(), hi.tolist()))


def largest_earlier_rise(cores: np.ndarray, lo: int, width: int, look: int) -> tuple[int | None, float, float]:
    """The largest rise of demand before step ``lo`` by the episodes' measure: over start steps ``t``
    with ``t >= look`` and ``t + width <= lo``, ``max(cores[t : t + width]) − mean(cores[t − look : t])``.
    Returns ``(t, rise, peak / level)`` (jump NaN where the level is 0), or ``(None, nan, nan)`` when
    no such window fits."""
    width = max(1, int(width))
    last = lo - width  # the last start whose window ends at or before lo
    if last < look:
        return None, float("nan"), float("nan")
    x = np.asarray(cores, dtype=np.float64)[:lo]
    starts = np.arange(look, last + 1)
    cs = np.concatenate([[0.0], np.cumsum(x)])
    level = (cs[starts] - cs[starts - look]) / look
    peak = np.lib.stride_tricks.sliding_window_view(x, width).max(axis=1)[starts]
    k = int(np.argmax(peak - level))
    return int(starts[k]), float(peak[k] - level[k]), float(peak[k] / level[k]) if level[k] > 0 else float("nan")


#: An episode of the reference starting within the boot time + this of the scored period's start is
#: flagged (``at_scored_start``): capacity there was decided before any scored forecast could act.
SCORED_START_MARGIN_S = 300.0


def where_cold(trace: SystemTrace, fleet: FleetModel, eval_start: int, results: dict[str, SimResult | None], *,
               reference: str = REFERENCE_POLICY, gap_s: float = EPISODE_GAP_S, lookback_s: float = EPISODE_LOOKBACK_S,
               top: int = EPISODE_TOP) -> dict:
    """Where each replay's cold demand falls (module doc, point 5): its episodes, the largest one's
    share, the top ``top`` episodes, the cold demand outside ``reference``'s largest episode as a
    ratio to ``reference``'s (a robustness figure), and the booting / never-asked-for split; that
    episode is flagged ``at_scored_start`` when it begins within the boot time +
    :data:`SCORED_START_MARGIN_S` of ``eval_start``.
    Plain JSON types; None where a ratio's denominator is 0 or no episode exists."""
    dt = trace.step_s
    gap_steps = max(1, math.ceil(gap_s / dt - 1e-9))
    look = max(1, math.ceil(lookback_s / dt - 1e-9))

    def r(x: float | None, nd: int = 4) -> float | None:
        return None if x is None or not math.isfinite(x) else round(float(x), nd)

    def when(step: int) -> str:
        return (trace.start + timedelta(seconds=step * dt)).isoformat()

    per: dict[str, dict] = {}
    for name, res in results.items():
        if res is None:
            continue
        cold = res.cold_share * trace.cores * dt
        cold[:eval_start] = 0.0
        total = float(cold.sum())
        eps = []
        for lo, hi in cold_runs(cold, gap_steps):
            before = trace.cores[max(0, lo - look):lo]
            level = float(before.mean()) if len(before) else float(trace.cores[lo])
            peak = float(trace.cores[lo:hi].max())
            eps.append({"lo": lo, "hi": hi, "cold": float(cold[lo:hi].sum()), "level": level, "peak": peak})
        eps.sort(key=lambda e: -e["cold"])
        # cold that the instances already booting or resuming into service would have held, and the rest
        unasked = shortfall_share(trace, fleet, res.ready + res.pending) * trace.cores * dt
        unasked[:eval_start] = 0.0
        unasked = np.minimum(unasked, cold)
        per[name] = {"res": res, "cold": cold, "total": total, "eps": eps, "unasked": float(unasked.sum())}
    ref = per.get(reference)
    window = (ref["eps"][0]["lo"], ref["eps"][0]["hi"]) if ref and ref["eps"] else None

    def outside(p: dict) -> float:  # summed, not total − inside: exactly 0 when every cold step is inside
        return p["total"] if window is None else float(p["cold"][:window[0]].sum() + p["cold"][window[1]:].sum())

    ref_out = outside(ref) if ref else None
    earlier = None
    if window is not None:
        e0 = ref["eps"][0]
        t, rise, jump = largest_earlier_rise(trace.cores, e0["lo"], e0["hi"] - e0["lo"], look)
        earlier = {"episode_rise_cores": r(e0["peak"] - e0["level"], 3), "largest_earlier_rise": None if t is None else {
            "start": when(t), "start_step": t, "rise_cores": r(rise, 3), "jump": r(jump, 3)}}
    out: dict = {
        "definition": (f"episodes of each policy's reference-cost replay (scored steps): maximal runs of steps with cold "
                       f"core-seconds > 0, runs less than {gap_steps * dt:g} s apart merged; level before = mean demand "
                       f"over the {look * dt:g} s before an episode's first cold step, peak = the largest step demand "
                       f"in it, jump = peak / level before; duration = first to last cold step"),
        "robustness_note": (f"robustness figure only, not the result: cold core-seconds outside {reference}'s largest "
                            f"episode (the same step window removed for every policy) / {reference}'s outside it, on "
                            f"the same reference-cost replays; ratio_to_reactive_at_equal_cost is unchanged"),
        "booting_note": ("cold_while_booting_share: share of the cold core-seconds that the instances already asked "
                         "for (booting or resuming into service in that step) would have held; "
                         "cold_never_requested_share: the rest (the active target itself was below demand)"),
        "gap_s": gap_steps * dt, "lookback_s": look * dt, "reference": reference,
        "excluded_window": None if window is None else {
            "policy": reference, "start": when(window[0]), "end": when(window[1]), "start_step": window[0],
            "end_step": window[1], "duration_s": (window[1] - window[0]) * dt,
            "after_scored_start_s": (window[0] - eval_start) * dt,
            "at_scored_start": (window[0] - eval_start) * dt < fleet.shape.boot_s + SCORED_START_MARGIN_S, **earlier},
        "scored_start_note": (f"at_scored_start: the episode starts less than the boot time + {SCORED_START_MARGIN_S:g} s "
                              "after the scored period does, so every policy meets it with the capacity its warm-up "
                              "left (the LSTM policies: no forecast before the scored period, only the safety net): "
                              "the ratios there say more about that state than about forecasting"),
        "earlier_rise_note": ("rise = peak − level before, by the episodes' measure (peak over as many steps as the episode "
                              "lasts, level = mean of the lookback before); largest_earlier_rise: the largest one whose "
                              "steps all lie before the excluded episode: whether the trace had shown such a rise before"),
        "policies": {},
    }
    for name, p in per.items():
        m, total, eps = p["res"].metrics, p["total"], p["eps"]
        out["policies"][name] = {
            "knob": m.knob, "knob_value": r(m.knob_value), "equivalent_instance_hours": r(m.equivalent_instance_hours, 3),
            "cold_core_seconds": r(total, 3),
            "episodes": len(eps),
            "largest_episode_share": r(eps[0]["cold"] / total) if eps and total > 0 else None,
            "top_episodes": [{"start": when(e["lo"]), "end": when(e["hi"]), "start_step": e["lo"],
                              "duration_s": (e["hi"] - e["lo"]) * dt, "cold_core_hours": r(e["cold"] / 3600, 4),
                              "share": r(e["cold"] / total) if total > 0 else None,
                              "level_before_cores": r(e["level"], 3), "peak_cores": r(e["peak"], 3),
                              "jump": r(e["peak"] / e["level"], 3) if e["level"] > 0 else None} for e in eps[:top]],
            "ratio_to_reactive_replay": r(_ratio(total, ref["total"] if ref else None)),
            "cold_core_seconds_outside_excluded_window": r(outside(p), 3),
            "robustness_ratio_to_reactive_excluding_its_largest_episode": r(_ratio(outside(p), ref_out)),
            "cold_while_booting_share": r((total - p["unasked"]) / total) if total > 0 else None,
            "cold_never_requested_share": r(p["unasked"] / total) if total > 0 else None,
        }
    return out


FORECAST_NOTE = ("baseline, not the LSTM: the last value of the system demand (all users summed) plus the chosen "
                 "quantile of that forecast's own past errors per horizon (trailing 7 days, refit hourly, an error "
                 "used only once its target is past) - the last-value baseline of models/baselines.py applied to "
                 "the sum, so the bound is a bound of the sum (DESIGN.md 'Aggregation'); errors are scaled by the "
                 "square root of the level. Sized by scaler.policy.plan_pools every 5 minutes (the forecast-and-"
                 "scale cadence; 'warmcast_1min': every minute) for boot time + the decision interval, warm pool for "
                 "30 min, no hysteresis or scale-in grace, and a reactive safety net that pulls warm instances.")


LSTM_NOTE = ("warmcast's own forecasts: one LSTM per user (models.train.train on the demand before the scored period "
             "only: {train}), issuing per-user quantile forecasts at every 5-minute origin of the scored period from "
             "the demand before that origin (models.backtest.lstm_forecasts); each origin's forecasts are aggregated "
             "as the pipeline does (pipeline.aggregate.sample_totals: {n_paths} joint sample paths of the users' sum, "
             "dependence from each user's one-step demand changes over the {history} buckets before the origin) and "
             "the upper bound at the knob `level` is that quantile of the sampled sum (1: the largest path). The "
             "target is each 5-minute bucket's average demand (the forecast contract), not its peak minute as in "
             "the baseline. {users} Sized by the same plan every 5 minutes; no forecast before the scored period "
             "(only the safety net there).")


_TOPDOWN_TEXT = ("the top-down forecast's at the same level (pipeline.topdown: the system's 5-minute demand, last "
                 "value or recent peak plus the quantile of its own errors over the {history} buckets before the "
                 "origin, refit at every origin; users without a model included)")
RECONCILED_NOTE = ("'warmcast_lstm' sizes as the pipeline's reconciled_target does: per origin, horizon and resource, "
                   "the upper bound is whichever of four scored best (lowest pinball loss at the level) over the "
                   "{history} latest origins whose demand was known by then: the higher of that sampled quantile and "
                   + _TOPDOWN_TEXT + ", the top-down bound alone, the sampled quantile alone, or the average of the "
                   f"two (the higher of the two until {RECONCILE_MIN_SCORED} origins are scored).")
MAX_NOTE = ("'warmcast_lstm_max' always sizes from the higher of that sampled quantile and " + _TOPDOWN_TEXT
            + " (the pipeline's reconciled_target before it chose by score).")


@dataclass(frozen=True)
class LstmForecastConfig:
    """How ``--forecaster lstm`` trains and aggregates. ``val_days`` (None: 1 day, or half a shorter
    training window) and ``min_history_days`` (None: 2 days, or half of what the window leaves
    before the validation tail) go to :class:`models.train.TrainConfig`; ``n_paths``, ``history_buckets``,
    ``seed``: the aggregation's (as in the pipeline's settings)."""

    epochs: int = 8
    global_epochs: int = 5
    hidden: int = 64  # as models.train.TrainConfig
    val_days: float | None = None
    min_history_days: float | None = None
    n_paths: int = 1000
    history_buckets: int = 288
    seed: int = 0

    def train_config(self, window_days: float):
        from models.train import TrainConfig

        val = self.val_days if self.val_days is not None else min(1.0, window_days / 2)
        # a user's history counts from its first active bucket: a threshold of the whole window before the
        # tail would leave every user not active from its first bucket on the global model
        hist = self.min_history_days if self.min_history_days is not None else min(2.0, (window_days - val) / 2)
        return TrainConfig(epochs=self.epochs, global_epochs=self.global_epochs, hidden=self.hidden, val_days=val,
                           min_history_days=hist, seed=self.seed)


def _on_grid(when, what: str) -> None:
    from pipeline.schemas import BUCKET_SECONDS

    if (when.timestamp() % BUCKET_SECONDS) != 0:
        raise ValueError(f"{what} {when.isoformat()} is not on the 5-minute forecast grid")


def train_lstm_models(demand, since, scored_start, config: LstmForecastConfig = LstmForecastConfig()):
    """Per-user (and global) LSTMs trained on the rows of ``demand`` in ``[since, scored_start)``
    only (:func:`models.train.train`); the rows from ``scored_start`` on are dropped before training."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from models import train as train_module

    _on_grid(since, "the training start")
    _on_grid(scored_start, "the scored period's start")
    ts_type = demand.schema.field("ts").type
    before = demand.filter(pc.and_(pc.greater_equal(demand["ts"], pa.scalar(since, ts_type)),
                                   pc.less(demand["ts"], pa.scalar(scored_start, ts_type))))
    if before.num_rows == 0:
        raise ValueError(f"no demand before the scored period ({since.isoformat()} – {scored_start.isoformat()}) "
                         "to train the LSTMs on: lengthen the warm-up (--warmup-hours)")
    window_days = (scored_start - since).total_seconds() / 86_400
    tc = config.train_config(window_days)
    if window_days < tc.val_days + 1 / 24:
        raise ValueError(f"the {window_days:.2f} day(s) before the scored period leave no training data before the "
                         f"{tc.val_days:g}-day validation tail: lengthen the warm-up (--warmup-hours) or pass --val-days")
    trained = train_module.train(before, since=since, until=scored_start, config=tc)
    if trained.until > scored_start:
        raise ValueError(f"the models were trained on data until {trained.until.isoformat()}, after the scored "
                         f"period's start {scored_start.isoformat()}")
    return trained


def _dense_history(demand, users: Sequence[str], start, n_buckets: int) -> np.ndarray:
    """float64 ``[U, n_buckets, 4]`` demand of ``users`` on the 5-minute grid from ``start``
    (DEMAND_RESOURCES order, 0 without a row); the grid :func:`pipeline.aggregate.residual_history` reads."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.schemas import BUCKET_SECONDS, DEMAND_RESOURCES

    grid = np.zeros((len(users), n_buckets, len(DEMAND_RESOURCES)))
    if demand.num_rows == 0 or not len(users):
        return grid
    u = pc.index_in(demand["user_id"], value_set=pa.array(list(users), pa.string())).to_numpy(zero_copy_only=False)
    t0 = int(start.timestamp() * 1_000_000)
    b = (pc.cast(demand["ts"].cast(pa.timestamp("us", tz="UTC")), pa.int64()).to_numpy() - t0) // (BUCKET_SECONDS * 1_000_000)
    ok = ~np.isnan(u.astype(np.float64)) & (b >= 0) & (b < n_buckets)
    ui, bi = u[ok].astype(np.int64), b[ok]
    for k, r in enumerate(DEMAND_RESOURCES):
        np.add.at(grid[:, :, k], (ui, bi), demand[r].to_numpy(zero_copy_only=False).astype(np.float64)[ok])
    return grid


def lstm_system_forecast(trained, demand, trace: SystemTrace, eval_start: int, *, n_paths: int = 1000,
                         history_buckets: int = 288, seed: int = 0, chunk_users: int = 256,
                         progress: Callable[[str], None] | None = None) -> SampledForecast:
    """The system forecast warmcast would have issued at every 5-minute origin of the scored
    period ``[eval_start, T)`` of ``trace``, from ``trained``'s per-user LSTMs and ``demand`` (the
    DEMAND table) before each origin.

    Per origin: the users' quantiles (:func:`models.backtest.lstm_forecasts`, issued at the origin
    from the buckets before it), their means (:func:`models.contract.quantile_mean`) and
    ``n_paths`` joint sample paths of their sum (:func:`pipeline.aggregate.sample_totals`, the
    empirical copula of each user's one-step changes over the ``history_buckets`` buckets before
    the origin, as :func:`pipeline.aggregate.residual_history`; seed ``seed + origin index``).
    Issue ``k`` is read from step ``eval_start + k·K`` (``K`` steps per bucket). Users first seen
    in the scored period have no model and are not in the forecast.
    """
    import time
    from datetime import timedelta

    from models.backtest import LSTM, lstm_forecasts, lstm_zero_masses
    from models.contract import quantile_mean
    from pipeline.aggregate import AggregateConfig, ForecastCube, ResidualHistory, sample_totals
    from pipeline.schemas import BUCKET_SECONDS, DEMAND_RESOURCES, HORIZONS_MIN

    k = round(BUCKET_SECONDS / trace.step_s)
    if abs(k * trace.step_s - BUCKET_SECONDS) > 1e-6:
        raise ValueError(f"step_s={trace.step_s:g} must divide the 5-minute forecast bucket")
    start = trace.start + timedelta(seconds=eval_start * trace.step_s)
    end = trace.start + timedelta(seconds=trace.steps * trace.step_s)
    _on_grid(start, "the scored period's start")
    _on_grid(end, "the trace's end")
    if trained.until > start:
        raise ValueError(f"the models were trained on data until {trained.until.isoformat()}, after the scored "
                         f"period's start {start.isoformat()}: they have seen it")
    users = list(trained.user_ids)
    n_orig = round((end - start).total_seconds() / BUCKET_SECONDS)
    res = [DEMAND_RESOURCES.index("cpu_cores"), DEMAND_RESOURCES.index("memory_gb")]
    t0 = time.perf_counter()
    q = np.empty((len(users), n_orig, 6, 2, 7), dtype=np.float32)
    p_zero = np.empty((len(users), n_orig, 6, 2), dtype=np.float32)
    for u0 in range(0, len(users), chunk_users):
        rows = np.arange(u0, min(len(users), u0 + chunk_users))
        part = lstm_forecasts(trained, demand, start, end, rows)
        if part[LSTM].shape[1] != n_orig:
            raise RuntimeError(f"lstm_forecasts gave {part[LSTM].shape[1]} origins for the {n_orig} buckets of the scored period")
        q[rows] = part[LSTM][:, :, :, res, :]
        p_zero[rows] = lstm_zero_masses(trained, rows, {LSTM: part[LSTM]})[LSTM][:, :, :, res]
    q.sort(axis=-1)  # non-crossing, as read_user_forecast repairs a stored forecast
    mean = quantile_mean(q, p_zero)  # [U, O, 6, 2], as the published forecast's mean (models.contract.to_forecast_table)
    if progress:
        progress(f"{LSTM_POLICY}: per-user forecasts of {len(users)} users at {n_orig} origins in "
                 f"{time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    hist_start = start - (history_buckets + 1) * timedelta(seconds=BUCKET_SECONDS)
    grid = _dense_history(demand, users, hist_start, history_buckets + n_orig)  # [U, H + 1 + O - 1, 4]
    totals = np.empty((n_orig, n_paths, 6, 2), dtype=np.float32)
    for o in range(n_orig):
        issued_at = start + o * timedelta(seconds=BUCKET_SECONDS)
        changes = np.diff(grid[:, o:o + history_buckets + 1], axis=1)  # the buckets before issued_at only
        cube = ForecastCube(issued_at, users, HORIZONS_MIN, ("cpu_cores", "memory_gb"),
                            q[:, o].astype(np.float64), mean[:, o], p_zero[:, o].astype(np.float64))
        paths, _ = sample_totals(cube, ResidualHistory(users, changes), AggregateConfig(n_paths=n_paths, seed=seed + o))
        totals[o] = np.sort(paths, axis=0)
    if progress:
        progress(f"{LSTM_POLICY}: {n_paths} sample paths of the system sum at {n_orig} origins in "
                 f"{time.perf_counter() - t0:.1f} s")
    return SampledForecast(eval_start + k * np.arange(n_orig), totals, mean.sum(axis=0))


def data_hours(loc, prefix: str = "") -> tuple["datetime", "datetime"]:
    """``[first hour, last hour + 1 h)`` of the ``date=/hour=`` partitions under ``loc``/``prefix``."""
    from datetime import timedelta

    from pipeline.landing import partition_hour

    hours = {h for f in loc.list_files(loc.path(prefix) if prefix else None) if (h := partition_hour(f)) is not None}
    if not hours:
        raise FileNotFoundError(f"no date=YYYY-MM-DD/hour=HH partitions under {loc.uri}/{prefix}".rstrip("/"))
    return min(hours), max(hours) + timedelta(hours=1)


def run_evaluation(loc, source: str, out, *, since=None, until=None, step_s: float = 60.0,
                   policies: Sequence[str] | None = None, vcpu: float | None = None, boot_s: float = 300.0,
                   warmup_s: float | None = None, forecaster: str = "baseline",
                   lstm: LstmForecastConfig = LstmForecastConfig(), warm_headroom: float = 0.0,
                   progress: Callable[[str], None] | None = None) -> dict:
    """``warmcast evaluate``: system demand of a lake (``source="lake"``) or of the Parquet files
    of a landing folder written by ``warmcast import`` (``"trace"``, no ingest) over
    ``[since, until)`` (default: every partition hour present) on ``step_s`` steps; evaluate; write
    the report into ``out``. Returns the paths written (name → path).

    ``forecaster="lstm"`` (lake only) adds :data:`LSTM_POLICY`: warmcast's plan driven by per-user
    LSTMs trained on the lake's demand before the scored period (:func:`train_lstm_models`) and
    their forecasts issued at every 5-minute origin of it, aggregated (:func:`lstm_system_forecast`)
    and reconciled with the top-down forecast (:func:`topdown_system_forecast`) by recent score, as
    the pipeline sizes; :data:`LSTM_MAX_POLICY`, reconciled by the maximum; and
    :data:`LSTM_BOTTOM_UP_POLICY`, the aggregated forecasts alone.
    The scored period then starts on the 5-minute grid (the warm-up is rounded up to it).
    ``warm_headroom`` > 0: see :func:`with_warm_headroom` (adds :data:`WARM_POLICY`)."""
    from pathlib import Path

    from pipeline.demand import system_demand_from_landing, system_demand_from_lake
    from scaler.report import write_report
    from scaler.simulate import trace_from_system_demand

    if source not in ("lake", "trace"):
        raise ValueError(f"source must be 'lake' or 'trace', got {source!r}")
    if forecaster not in FORECASTERS:
        raise ValueError(f"forecaster must be one of {', '.join(FORECASTERS)}, got {forecaster!r}")
    if forecaster == "lstm" and source != "lake":
        raise ValueError("--forecaster lstm needs --source lake: the per-user models are trained on the lake's "
                         "per-user demand series (a trace's landing files are only summed)")
    if policies is None:
        policies = POLICY_NAMES
        if forecaster == "lstm":  # beside the other warmcast policies
            at = POLICY_NAMES.index("warmcast_1min") + 1
            policies = POLICY_NAMES[:at] + LSTM_POLICIES + POLICY_NAMES[at:]
        if warm_headroom > 0:
            at = policies.index(REFERENCE_POLICY) + 1
            policies = policies[:at] + (WARM_POLICY,) + policies[at:]
    wanted = [p for p in LSTM_POLICIES if p in policies]
    if wanted and forecaster != "lstm":
        raise ValueError(f"the {wanted[0]!r} policy needs --forecaster lstm")
    if WARM_POLICY in policies and not warm_headroom > 0:
        raise ValueError(f"the {WARM_POLICY!r} policy needs a warm headroom > 0 (--warm-headroom)")
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
    eval_start = default_eval_start(trace) if warmup_s is None else round(warmup_s / trace.step_s)
    note = FORECAST_NOTE
    forecasters = {name: "baseline: last value of the system sum + its past error quantiles"
                   for name in ("warmcast", "warmcast_1min")}
    specs = dict(POLICY_SPECS)
    meta = {"source": f"{source} {loc.uri}", "since": since.isoformat(), "until": until.isoformat(), "step_s": step_s,
            "forecaster": forecaster}
    if forecaster == "lstm" and set(LSTM_POLICIES) & set(policies):
        from datetime import timedelta

        from pipeline.demand import demand_from_lake

        per_bucket = max(1, round(300 / trace.step_s))
        eval_start = -(-eval_start // per_bucket) * per_bucket  # the first origin on the 5-minute grid
        if not 0 < eval_start < trace.steps:
            raise ValueError(f"the trace has {trace.steps} steps; a warm-up of {eval_start} leaves no training or no "
                             "scored period for the LSTMs")
        scored = trace.start + timedelta(seconds=eval_start * trace.step_s)
        demand = demand_from_lake(loc, since, until)
        if progress:
            progress(f"{LSTM_POLICY}: training per-user LSTMs on {since.isoformat()} – {scored.isoformat()} "
                     f"(epochs {lstm.epochs}, global {lstm.global_epochs})")
        trained = train_lstm_models(demand, since, scored, lstm)
        sampled = lstm_system_forecast(trained, demand, trace, eval_start, n_paths=lstm.n_paths,
                                       history_buckets=lstm.history_buckets, seed=lstm.seed, progress=progress)
        import pyarrow as pa
        import pyarrow.compute as pc

        later = demand.filter(pc.greater_equal(demand["ts"], pa.scalar(scored, demand.schema.field("ts").type)))
        new_users = sorted(set(pc.unique(later["user_id"]).to_pylist()) - set(trained.user_ids))
        users = (f"{len(trained.user_ids)} users forecast ({int(trained.uses_global.sum())} on the global model for "
                 f"too little history)" + (f"; {len(new_users)} users first seen in the scored period have no model "
                                           "and are left out of the forecast (the safety net covers them)." if new_users else "."))
        tc = trained.config
        train_text = (f"{since:%Y-%m-%d %H:%M} – {scored:%Y-%m-%d %H:%M} UTC, validation tail {tc.val_days:g} d, "
                      f"per-user models from {tc.min_history_days:g} d of history, epochs run global/per-user "
                      f"{trained.epochs_run[0]}/{trained.epochs_run[1]}")
        down = topdown_system_forecast(trace, eval_start, lstm.history_buckets)
        specs[LSTM_POLICY] = lstm_policy_spec(sampled, down, reconcile="score", window=lstm.history_buckets)
        specs[LSTM_MAX_POLICY] = lstm_policy_spec(sampled, down, reconcile="max")
        specs[LSTM_BOTTOM_UP_POLICY] = lstm_policy_spec(sampled)
        text = LSTM_NOTE.format(train=train_text, n_paths=lstm.n_paths, history=lstm.history_buckets, users=users)
        forecasters[LSTM_POLICY] = text + " " + RECONCILED_NOTE.format(history=lstm.history_buckets)
        forecasters[LSTM_MAX_POLICY] = text + " " + MAX_NOTE.format(history=lstm.history_buckets)
        forecasters[LSTM_BOTTOM_UP_POLICY] = text + f" '{LSTM_BOTTOM_UP_POLICY}': this sampled sum alone."
        meta["lstm"] = {"train_start": since.isoformat(), "train_end": scored.isoformat(), "users": len(trained.user_ids),
                        "on_global_model": int(trained.uses_global.sum()), "new_users_not_forecast": len(new_users),
                        "epochs_run": list(trained.epochs_run), "val_days": tc.val_days,
                        "min_history_days": tc.min_history_days, "n_paths": lstm.n_paths, "origins": len(sampled.issued_step)}
    elif source == "lake" and loc.is_dir(loc.path("models")):
        note += (" (The lake has a model store; `--forecaster lstm` replays warmcast's own per-user LSTMs as the "
                 f"{LSTM_POLICY!r} policy.)")
    if warm_headroom:
        specs = with_warm_headroom(specs, warm_headroom)
        note += (f" Warm pool headroom {warm_headroom:g}: every warmcast policy keeps a stopped warm pool of at least "
                 f"{warm_headroom:g} x its active target, and '{WARM_POLICY}' is reactive target tracking with the same "
                 "warm pool (what the warm pool alone buys).")
        meta["warm_headroom"] = warm_headroom
    ev = evaluate(trace, fleet, policies=policies, specs=specs, eval_start=eval_start, forecast_note=note,
                  forecasters=forecasters, progress=progress)
    return write_report(ev, Path(out), meta)
