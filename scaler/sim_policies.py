"""The policies :func:`scaler.simulate.simulate` replays, each with its main knob (``knob``).

Each policy precomputes per-step targets with numpy in ``prepare`` and reads them in ``decide``.
At step ``t`` a policy reads demand of steps ``< t`` only, except :class:`Oracle`. "Need at
utilisation u" means the instances whose ``vcpu × u`` cores and ``memory_gb × u`` GB cover the
demand (:meth:`FleetModel.need`); without ``u``, the fleet's serving capacity.

* :class:`ReactiveTargetTracking` (knob ``target_utilisation``): AWS target tracking on a
  1-minute (one-step) metric: scale out at once to the need at target for the last step (AWS's
  high alarm waits 3 datapoints; the issue asks for "immediately"); scale in
  to the need for the highest step of the last ``scale_in_window_s`` only when that window is full
  and ``scale_in_cooldown_s`` has passed since the last scaling. Optional static stopped warm pool.
* :class:`KnativeAutoscaler` (knob ``target_utilisation``): Knative KPA: need for the average
  over the stable window (60 s); panic when the panic window's need reaches ``panic_threshold`` ×
  ready instances, and while panicking (until a stable window passes without the condition) never
  scale down; otherwise scale down at most to ready / ``max_scale_down_rate``.
* :class:`AwsPredictive` (knob ``target_utilisation``): AWS predictive scaling on top of target
  tracking: every 6 h an hourly load forecast for 48 h is issued from completed hours (the mean
  of the same hour one day and one week earlier, the latest such hours that lie before the issue);
  capacity for an hour is in service ``boot_s`` before the hour starts (the scheduling buffer) and
  is a minimum: the tracking part never scales in below it.
* :class:`NaivePredictive` (knob ``level``): last value plus the ``level`` quantile of past
  increments over the boot time (``max(x[s..s+boot]) − x[s−1]``, trailing 7 days, refit hourly),
  at serving capacity, every step, scale-in at once.
* :class:`Warmcast` (knob ``level``): ``scaler.policy.plan_pools`` every ``decide_every_s``
  (the forecast-and-scale cadence), from a system forecast issued with past data only — by default
  :func:`empirical_forecast` (a point + empirical error quantiles of the system series; the point
  is the last value or a recent peak, whichever past errors score better at ``level``), or an
  injected :class:`ForecastArrays` (e.g. :meth:`SampledForecast.at`, the per-user LSTM forecasts
  aggregated, built by :func:`scaler.evaluate.lstm_system_forecast`) — plus an optional reactive safety net that pulls warm instances
  as soon as the last step did not fit. The plan's ``decision_interval_s`` is ``decide_every_s``, so its active horizon
  covers boot time plus the wait for the next plan: until the *next* plan's launches are in service.
* :class:`Oracle` (knob ``coverage``): perfect foresight over the boot time: ``coverage`` × the
  peak of steps ``t .. t + boot``, at serving capacity.
* :class:`Scheduled`: replays given targets (recorded decisions, or tests).

Users are summed before any policy sees them. The default warmcast forecast is issued on that sum,
so its error quantiles carry the users' joint behaviour (DESIGN.md "Aggregation": a bound of the
sum, never a sum of bounds); per-user model forecasts enter as the pipeline's SYSTEM_FORECAST,
converted with :func:`forecast_from_table`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schemas import HORIZONS_MIN
from pipeline.topdown import empirical_quantiles, trailing_stats
from pipeline.topdown import lag as _lag
from pipeline.topdown import max_ahead as _max_ahead
from pipeline.topdown import seasonal_drift as _seasonal_drift  # noqa: F401 (tests use it from here)
from scaler.policy import InstanceShape, PlanOptions, Pool, PoolPolicy, PoolState, plan_pools
from scaler.simulate import Decision, FleetModel, FleetState, ScalingPolicy, SystemTrace

WEEK_S = 7 * 86_400.0
#: Warmcast's candidate forecast points: the last value (0: one step) and the peak of the last
#: 5 .. 30 minutes (the forecast's horizons); see :func:`empirical_forecast`.
POINT_WINDOWS_S = (0.0,) + tuple(60.0 * h for h in HORIZONS_MIN)
_HOLD = np.iinfo(np.int64).max
_SIM_RESOURCES = ("cpu_cores", "memory_gb")


def _demand(trace: SystemTrace) -> np.ndarray:
    return np.stack([trace.cores, trace.memory_gb], axis=1)  # [T, 2]


def _mean_behind(a: np.ndarray, w: int) -> np.ndarray:
    """``out[t] = mean(a[t - w : t])`` over the steps that exist (0 at t = 0)."""
    cs = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0)])
    t = np.arange(len(a))
    lo = np.maximum(t - w, 0)
    cnt = np.maximum(t - lo, 1).reshape((-1,) + (1,) * (a.ndim - 1))
    return (cs[t] - cs[lo]) / cnt


@dataclass
class ReactiveTargetTracking(ScalingPolicy):
    """AWS-style target tracking; see the module doc. Times in seconds, ``warm_size`` instances;
    ``warm_headroom``: the stopped warm pool holds at least this share of the active target
    (``ceil(warm_headroom × active)``), as :class:`~scaler.policy.PoolPolicy` does for warmcast."""

    target_utilisation: float = 0.7
    scale_in_window_s: float = 900.0
    scale_in_cooldown_s: float = 300.0
    warm_size: int = 0
    warm_headroom: float = 0.0
    name = "reactive"
    knob = "target_utilisation"

    def prepare(self, trace: SystemTrace, fleet: FleetModel) -> None:
        dt = trace.step_s
        self._out = fleet.need(_lag(trace.cores), _lag(trace.memory_gb), self.target_utilisation)
        w = max(1, round(self.scale_in_window_s / dt))
        self._in = _max_ahead(self._out[::-1], w)[::-1].astype(np.int64)  # max of out[t-w+1 .. t]
        self._in[:w] = _HOLD  # the low alarm needs a full window of datapoints
        self._cool = max(0, round(self.scale_in_cooldown_s / dt))
        self._floor = np.zeros(trace.steps, dtype=np.int64)

    def decide(self, t: int, state: FleetState) -> Decision:
        cur, floor = state.desired, int(self._floor[t])
        want = max(int(self._out[t]), floor)
        if want <= cur:  # scale in only on a full window past the cooldown
            down = max(int(self._in[t]), floor)
            want = down if down < cur and t - max(state.last_scale_out, state.last_scale_in) >= self._cool else cur
        return Decision(want, max(self.warm_size, math.ceil(self.warm_headroom * want - 1e-9)))


@dataclass
class AwsPredictive(ReactiveTargetTracking):
    """Target tracking under an hourly forecast minimum; see the module doc."""

    reissue_h: int = 6
    name = "aws_predictive"

    def prepare(self, trace: SystemTrace, fleet: FleetModel) -> None:
        super().prepare(trace, fleet)
        n, sph = trace.steps, max(1, round(3600 / trace.step_s))
        boot, _ = fleet.delay_steps(trace.step_s)
        nh = -(-n // sph)
        x = np.zeros((nh * sph, 2))
        x[:n] = _demand(trace)
        cnt = np.minimum(sph, n - np.arange(nh) * sph)[:, None]
        hourly = x.reshape(nh, sph, 2).sum(axis=1) / cnt  # [H, 2] mean load per hour
        t = np.arange(n)
        target = (t + boot) // sph
        issue = (t // (self.reissue_h * sph)) * self.reissue_h  # hours before `issue` are known
        total, count = np.zeros((n, 2)), np.zeros((n, 1))
        for period in (24, 168):
            k = np.maximum(1, -(-(target + 1 - issue) // period))
            src = target - k * period
            ok = (src >= 0)[:, None]
            total += np.where(ok, hourly[np.clip(src, 0, nh - 1)], 0.0)
            count += ok
        load = total / np.maximum(count, 1)
        self.forecast_load = load  # [T, 2] forecast mean load (cores, GB) of the hour holding step t + boot
        self._floor = fleet.need(load[:, 0], load[:, 1], self.target_utilisation)


@dataclass
class KnativeAutoscaler(ScalingPolicy):
    """Knative KPA stable/panic windows; see the module doc. Windows in seconds."""

    target_utilisation: float = 0.7
    stable_window_s: float = 60.0
    panic_window_pct: float = 10.0
    panic_threshold: float = 2.0
    max_scale_down_rate: float = 2.0
    name = "knative"
    knob = "target_utilisation"

    def prepare(self, trace: SystemTrace, fleet: FleetModel) -> None:
        dt, x = trace.step_s, _demand(trace)
        self._stable_steps = max(1, round(self.stable_window_s / dt))
        panic = max(1, round(self.stable_window_s * self.panic_window_pct / 100 / dt))
        s, p = _mean_behind(x, self._stable_steps), _mean_behind(x, panic)
        self._stable = fleet.need(s[:, 0], s[:, 1], self.target_utilisation)
        self._panic = fleet.need(p[:, 0], p[:, 1], self.target_utilisation)
        self._panic_until = -1

    def decide(self, t: int, state: FleetState) -> Decision:
        cur = state.desired
        if t == 0:
            return Decision(cur)
        dp, ready = int(self._panic[t]), max(state.ready, 1)
        if dp >= self.panic_threshold * ready:
            self._panic_until = t + self._stable_steps
        if t < self._panic_until:
            return Decision(max(dp, cur))
        return Decision(max(int(self._stable[t]), int(state.ready // self.max_scale_down_rate)))


@dataclass
class NaivePredictive(ScalingPolicy):
    """Last value + ``level`` quantile of past increments over the boot time; see the module doc."""

    level: float = 0.95
    window_s: float = WEEK_S
    refit_s: float = 3600.0
    name = "naive_predictive"
    knob = "level"

    def prepare(self, trace: SystemTrace, fleet: FleetModel) -> None:
        n, dt, x = trace.steps, trace.step_s, _demand(trace)
        boot, _ = fleet.delay_steps(dt)
        ahead = _max_ahead(x, boot + 1)  # peak of x[s .. s+boot]
        s = np.arange(1, max(1, n - boot))
        inc = ahead[s] - x[s - 1]  # known once x[s+boot] is, i.e. from step s+boot+1
        q, _ = trailing_stats(inc, s + boot + 1, n, max(1, round(self.refit_s / dt)),
                              max(1, round(self.window_s / dt)), self.level)
        self.upper = np.maximum(_lag(x) + q, 0.0)  # [T, 2] forecast peak over the boot time
        self._want = fleet.need(self.upper[:, 0], self.upper[:, 1])

    def decide(self, t: int, state: FleetState) -> Decision:
        return Decision(int(self._want[t]) if t else state.desired)


@dataclass
class Oracle(ScalingPolicy):
    """Perfect foresight of the peak over the boot time, scaled by ``coverage``."""

    coverage: float = 1.0
    name = "oracle"
    knob = "coverage"

    def prepare(self, trace: SystemTrace, fleet: FleetModel) -> None:
        boot, _ = fleet.delay_steps(trace.step_s)
        peak = _max_ahead(_demand(trace), boot + 1) * self.coverage
        self._want = fleet.need(peak[:, 0], peak[:, 1])

    def decide(self, t: int, state: FleetState) -> Decision:
        return Decision(int(self._want[t]))


@dataclass
class Scheduled(ScalingPolicy):
    """Replays targets: ``active[t]`` (and ``warm[t]``) instances at step ``t``."""

    active: np.ndarray
    warm: np.ndarray | None = None
    warm_running: bool = False
    name = "scheduled"

    def decide(self, t: int, state: FleetState) -> Decision:
        return Decision(int(self.active[t]), 0 if self.warm is None else int(self.warm[t]), self.warm_running)


@dataclass(frozen=True)
class ForecastArrays:
    """System forecasts on the step grid: issue ``i`` is read from step ``issued_step[i]`` on
    (ascending). ``upper``, ``mean``: ``[N, 6, 2]`` for horizons 5..30 min and
    (cpu_cores, memory_gb), demand units."""

    issued_step: np.ndarray
    upper: np.ndarray
    mean: np.ndarray


@dataclass(frozen=True)
class SampledForecast:
    """System forecasts as joint sample paths of the sum of the users' demand (the aggregation of
    :mod:`pipeline.aggregate`): issue ``i`` is read from step ``issued_step[i]`` on (ascending).
    ``totals``: ``[N, P, 6, 2]``, ``P`` sampled sums per issue, horizon and (cpu_cores, memory_gb);
    ``mean``: ``[N, 6, 2]``, Σ users' means. Demand units. :meth:`at` turns it into the
    :class:`ForecastArrays` of one level, so a sweep over ``level`` rebuilds the bound each time."""

    issued_step: np.ndarray
    totals: np.ndarray
    mean: np.ndarray

    def at(self, level: float) -> ForecastArrays:
        """``upper`` = the ``level`` quantile of the sampled sums (one-sided, like the default
        forecast's error quantile; 1: the largest path); ``mean`` capped at it."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"level must lie in [0, 1], got {level}")
        upper = np.quantile(self.totals, level, axis=1).astype(np.float64)
        return ForecastArrays(self.issued_step, upper, np.minimum(self.mean, upper))


def empirical_forecast(trace: SystemTrace, level: float, *, window_s: float = WEEK_S, refit_s: float = 3600.0,
                       bucket_s: float = 300.0, error_scale: str = "none", daily_drift: bool = False,
                       point_windows_s: tuple[float, ...] = (),
                       seasonal_periods_s: tuple[float, ...] = (), seasonal_count: int = 3) -> ForecastArrays:
    """Last value + empirical error quantiles of the system series, issued at every step.

    Target of horizon ``h`` issued at ``o``: the highest step of bucket ``h`` (steps
    ``o + (h−1)K .. o + hK − 1``, ``K = bucket_s / step_s``) — what capacity must cover; on a
    5-minute grid it is the bucket's average, as in the forecast contract. ``upper`` = point
    + the ``level`` quantile of errors (target − point) of origins on the bucket grid (``o = K, 2K, ..``: where a 5-minute plan reads them), trailing
    ``window_s``, refit every ``refit_s``, each error used only once all six buckets are past;
    ``mean`` likewise with the mean error. Before any error is known, both are the point.

    The point is the last value ``x[o−1]``; with ``daily_drift`` it adds yesterday's change over
    the same span (``peak[o − D + (h−1)K] − x[o − 1 − D]``, ``D`` = a day of steps; the last
    value where yesterday is unknown). ``error_scale="sqrt"``: errors are measured in units of
    ``sqrt(x[o−1] + c)`` (``c`` = 1 % of the mean demand so far, at least 1e-3) and scaled back
    by the current level, so the margin follows the level (the noise of a sum of many users grows
    like the square root of their total); ``"none"``: absolute errors.

    ``point_windows_s``: candidate points, each the peak of the last ``w`` seconds
    (``max(x[o − W .. o − 1])``, ``W = max(1, round(w / step_s))`` steps: 0 is the last value);
    empty: the last value only. Each candidate gets its own error quantiles; at every refit, per
    horizon and resource, the candidate whose trailing errors have the lowest mean pinball loss
    at ``level`` about their own quantile (the proper score of a ``level`` quantile, from the
    same past errors as the quantile; ties: the shorter window) supplies point, ``upper`` and
    ``mean``. A series that falls back and returns (windows of alternating rate) then keeps
    its recent peak; a smooth one keeps the last value. Daily drift is added to every candidate.

    ``seasonal_periods_s``: more candidates, one per period ``P`` (e.g. an hour: timers that fire
    at the top of every hour; a day): the last value plus the mean change over the same span in
    the last ``seasonal_count`` periods, ``x[o−1] + mean_i(peak[o − iP + (h−1)K] − x[o − 1 − iP])``
    over the periods already seen (none: the last value). Periods shorter than the horizons
    (``P < 6K`` steps) would read the future and are refused. They compete in the same selection.
    """
    k = max(1, round(bucket_s / trace.step_s))
    if abs(k * trace.step_s - bucket_s) > 1e-6:
        raise ValueError(f"step_s={trace.step_s} must divide the forecast bucket of {bucket_s} s")
    upper, mean = empirical_quantiles(
        _demand(trace), level, k=k, window=max(1, round(window_s / trace.step_s)),
        refit=max(1, round(refit_s / trace.step_s)), error_scale=error_scale,
        point_widths=[max(1, round(w / trace.step_s)) for w in point_windows_s] or [1],
        seasonal_periods=[round(p / trace.step_s) for p in seasonal_periods_s], seasonal_count=seasonal_count,
        daily_period=round(86_400 / trace.step_s) if daily_drift else None)
    return ForecastArrays(np.arange(trace.steps), upper, mean)


def forecast_from_table(table: pa.Table, trace: SystemTrace) -> ForecastArrays:
    """A SYSTEM_FORECAST table as :class:`ForecastArrays` on ``trace``'s grid: each issue is read
    from the first step that starts at or after ``issued_at``. Missing cells are NaN (the plan holds)."""
    t0 = int(trace.start.timestamp() * 1_000_000)
    issued = pc.cast(table["issued_at"], pa.int64()).to_numpy()
    step_us = trace.step_s * 1_000_000
    issues, inv = np.unique(issued, return_inverse=True)
    up, mean = np.full((2, len(issues), len(HORIZONS_MIN), 2), np.nan)
    hm = table["horizon_min"].to_numpy()
    h = np.searchsorted(HORIZONS_MIN, hm)
    known = np.isin(hm, HORIZONS_MIN)
    res = table["resource"].to_numpy(zero_copy_only=False)
    for r, name in enumerate(_SIM_RESOURCES):
        sel = (res == name) & known
        up[inv[sel], h[sel], r] = table["upper"].to_numpy()[sel]
        mean[inv[sel], h[sel], r] = table["mean"].to_numpy()[sel]
    return ForecastArrays(np.ceil((issues - t0) / step_us).astype(np.int64), up, mean)


@dataclass
class Warmcast(ScalingPolicy):
    """warmcast's plan (``scaler.policy.plan_pools``) from forecasts; see the module doc.

    ``level``: quantile of the default forecast's upper bound. ``error_scale``, ``daily_drift``:
    see :func:`empirical_forecast` (default: errors scaled by the square root of the level, which
    at equal cost cut cold demand by 20-60 % on the synthetic, demo and ServeGen traces; the daily
    drift helped the demo trace and hurt ServeGen, so it is off). ``point_windows_s``: candidate
    points of :func:`empirical_forecast` (default :data:`POINT_WINDOWS_S`; ``()``: the last value
    only, the forecast before the selection). ``seasonal_periods_s`` / ``seasonal_count``: seasonal
    candidates of :func:`empirical_forecast`, off by default: a daily one cut cold demand at equal
    cost to ~0 on the (daily-periodic) demo lake, but an hourly or daily one made ServeGen ~5 %
    worse and did not help the Azure sample (its hourly timer spike is learnt only after 4 hours
    of warm-up). ``warm_headroom``: :class:`~scaler.policy.PoolPolicy`'s, for the default pool
    policy (a given ``pool_policy`` carries its own). ``pool_policy``: the plan's pool
    policy (mode is forced to ``scale``); None: no step limit, target utilisation = the fleet's
    serving capacity, fleet bounds, a warm pool up to the fleet's max, and ``hysteresis`` /
    ``scale_in_grace_s`` (default 0: scale in as soon as the forecast allows, like the naive
    heuristic; the 10 % / 900 s of ``PoolPolicy``'s defaults hold capacity the forecast already
    says is idle, which cost about half of warmcast's edge on the synthetic trace). ``safety_utilisation``:
    scale out (warm pool first) as soon as the last step's need at this utilisation exceeds the
    target; None: off. ``forecast``: injected forecasts instead of the default.
    """

    level: float = 0.95
    decide_every_s: float = 300.0
    safety_utilisation: float | None = 1.0
    pool_policy: PoolPolicy | None = None
    options: PlanOptions = field(default_factory=PlanOptions)
    forecast: ForecastArrays | None = None
    window_s: float = WEEK_S
    refit_s: float = 3600.0
    error_scale: str = "sqrt"
    daily_drift: bool = False
    point_windows_s: tuple[float, ...] = POINT_WINDOWS_S
    seasonal_periods_s: tuple[float, ...] = ()
    seasonal_count: int = 3
    warm_headroom: float = 0.0
    hysteresis: float = 0.0
    scale_in_grace_s: float = 0.0
    name = "warmcast"
    knob = "level"

    def prepare(self, trace: SystemTrace, fleet: FleetModel) -> None:
        dt, s = trace.step_s, fleet.shape
        fc = self.forecast
        if fc is None:
            fc = empirical_forecast(trace, self.level, window_s=self.window_s, refit_s=self.refit_s,
                                    error_scale=self.error_scale, daily_drift=self.daily_drift,
                                    point_windows_s=self.point_windows_s,
                                    seasonal_periods_s=self.seasonal_periods_s, seasonal_count=self.seasonal_count)
        self.issued = fc
        self._which = np.searchsorted(fc.issued_step, np.arange(trace.steps), side="right") - 1
        self._every = max(1, round(self.decide_every_s / dt))
        pol = self.pool_policy or PoolPolicy(
            min_size=fleet.min_size, max_size=fleet.max_size, max_step=max(1, fleet.max_size),
            target_utilisation=fleet.capacity_utilisation, warm_max_size=fleet.max_size,
            hysteresis=self.hysteresis, scale_in_grace_s=self.scale_in_grace_s, warm_headroom=self.warm_headroom)
        pol = replace(pol, mode="scale")
        shape = InstanceShape(s.vcpu, s.memory_gb, s.gpus, s.hourly_price_usd, s.boot_s, s.resume_s)
        self._pool = Pool("sim", shape, pol)
        # plan_pools sizes the active pool for boot_s + decision_interval_s: the next plan's launches
        self._options = replace(self.options, decision_interval_s=self._every * dt)
        self._in_use = np.ceil(_lag(trace.cores) / s.vcpu - 1e-9).astype(np.int64)
        u = self.safety_utilisation
        self._safety = None if u is None else fleet.need(_lag(trace.cores), _lag(trace.memory_gb), u)
        self._start, self._dt = trace.start, dt

    def _rows(self, i: int, issued_at) -> list[dict]:
        fc = self.issued
        return [{"issued_at": issued_at, "horizon_min": h, "resource": res,
                 "mean": float(fc.mean[i, j, r]), "upper": float(fc.upper[i, j, r])}
                for j, h in enumerate(HORIZONS_MIN) for r, res in enumerate(_SIM_RESOURCES)]

    def decide(self, t: int, state: FleetState) -> Decision:
        active, warm, running = state.desired, state.warm_desired, state.warm_running
        i = int(self._which[t])
        if t % self._every == 0 and t > 0 and i >= 0:
            now = self._start + timedelta(seconds=t * self._dt)
            issued_at = self._start + timedelta(seconds=int(self.issued.issued_step[i]) * self._dt)
            pool_state = PoolState(
                desired=state.desired, in_service=state.ready, in_use=min(state.ready, int(self._in_use[t])),
                warm_size=state.warm + state.warm_pending, warm_state="Running" if running else "Stopped",
                last_scale_out_at=(self._start + timedelta(seconds=state.last_scale_out * self._dt)
                                   if state.last_scale_out >= 0 else None))
            plan = plan_pools(self._rows(i, issued_at), {"sim": pool_state}, [self._pool], now,
                              options=self._options).pools[0]
            active, warm, running = plan.active.target, plan.warm.target, plan.warm_state == "Running"
        if self._safety is not None:
            active = max(active, int(self._safety[t]))
        return Decision(active, warm, running)
