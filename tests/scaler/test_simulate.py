"""The replay simulator on hand-computable traces: a step, a spike, a daily sine, constant fleets.

Conventions of every example: instances of 4 vCPU / 16 GB at $0.50 per hour, boot 300 s, resume
60 s, fluid packing (an instance serves 4 cores); memory demand is half the cores, so cores bind.
A reactive policy decides at the start of step t from step t−1's metric, so a launch answers a
breach one metric period after it began and serves ``boot`` later.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.demand import build_demand_series
from pipeline.generate import generate_requests
from pipeline.schemas import HORIZONS_MIN, SYSTEM_FORECAST
from scaler.policy import InstanceShape
from scaler.sim_policies import (
    AwsPredictive,
    ForecastArrays,
    KnativeAutoscaler,
    NaivePredictive,
    Oracle,
    ReactiveTargetTracking,
    Scheduled,
    Warmcast,
    _seasonal_drift,
    empirical_forecast,
    forecast_from_table,
)
from scaler.simulate import FleetModel, SystemTrace, cold_at_cost, simulate, sweep, trace_from_demand, trace_from_requests

SHAPE = InstanceShape(vcpu=4, memory_gb=16, hourly_price_usd=0.5, boot_s=300, resume_s=60)
FLEET = FleetModel(SHAPE)
START = datetime(2026, 3, 2, tzinfo=timezone.utc)


def trace(cores, step_s: float = 60.0, requests=None) -> SystemTrace:
    cores = np.asarray(cores, dtype=np.float64)
    return SystemTrace(cores, cores / 2, step_s, None if requests is None else np.asarray(requests, float), START)


def test_step_reactive_cold_demand_is_the_demand_during_metric_minute_plus_boot():
    x = np.zeros(40)
    x[10:] = 8.0  # 2 instances from step 10
    r = simulate(trace(x, requests=np.where(x > 0, 10.0, 0.0)), ReactiveTargetTracking(target_utilisation=1.0), FLEET)
    m = r.metrics
    # seen at the start of step 11, launched then, in service from step 16: steps 10..15 are cold
    assert m.cold_core_seconds == 8 * (60 + 300)
    assert m.cold_requests == 6 * 10
    assert r.ready[15] == 0 and r.ready[16] == 2
    # waits: (16 − t − ½) min for t = 10..15 → 330, 270, 210, 150, 90, 30 s
    assert (m.wait_p50_s, m.wait_p99_s) == (150.0, 330.0)
    assert m.instance_hours == pytest.approx(2 * (40 - 11) / 60)  # billed from launch (booting) on
    assert m.cost_usd == pytest.approx(m.instance_hours * 0.5)
    # on 5-minute steps the metric period and the boot are one step each
    x5 = np.zeros(12)
    x5[4:] = 8.0
    m5 = simulate(trace(x5, 300.0), ReactiveTargetTracking(target_utilisation=1.0), FLEET).metrics
    assert m5.cold_core_seconds == 8 * (300 + 300) and (m5.wait_p50_s, m5.wait_p99_s) == (150.0, 450.0)


def test_step_through_a_stopped_warm_pool_waits_for_the_resume_not_the_boot():
    x = np.zeros(40)
    x[10:] = 8.0
    r = simulate(trace(x), ReactiveTargetTracking(target_utilisation=1.0, warm_size=2), FLEET)
    # the warm pool is launched at 0 and stopped at 5; resumed at 11, in service at 12
    assert r.ready[11] == 0 and r.ready[12] == 2
    assert r.metrics.cold_core_seconds == 8 * (60 + 60)
    assert r.warm_pending[11] == 2 and r.warm[16] == 2  # refilled by a launch at 11


def test_reactive_warm_headroom_follows_the_active_target():
    x = np.zeros(60)
    x[10:] = 8.0  # 2 instances from step 10, 4 from step 30
    x[30:] = 16.0
    r = simulate(trace(x), ReactiveTargetTracking(target_utilisation=1.0, warm_headroom=1.0), FLEET)
    # no demand in the first boot window: no initial fleet and no warm pool. Target 2 at step 11:
    # 2 boot (in service at 16) and 2 more into the warm pool (initialised at 16)
    assert r.ready[15] == 0 and r.ready[16] == 2 and r.warm[16] == 2
    # target 4 at step 31: the 2 warm instances resume (in service at 32), and the pool refills to 4
    assert r.ready[31] == 2 and r.ready[32] == 4 and r.warm[31] == 0 and r.warm[36] == 4
    cold = r.metrics.cold_core_seconds
    assert cold == 8 * (60 + 300) + 8 * 60 * 2  # steps 10..15 (8 cores); steps 30, 31 (8 of 16 cores)


def test_single_spike_reactive_and_oracle():
    x = np.full(60, 4.0)  # one instance
    x[20] = 12.0  # three instances for one minute
    req = np.where(x > 4, 3.0, 1.0)
    r = simulate(trace(x, requests=req), ReactiveTargetTracking(target_utilisation=1.0), FLEET)
    m = r.metrics
    assert m.cold_core_seconds == (12 - 4) * 60 and m.cold_requests == pytest.approx(3 * (1 - 4 / 12))
    assert m.wait_p50_s == m.wait_p99_s == (26 - 20 - 0.5) * 60  # the two launched at 21 serve from 26
    # the two extra instances live from the launch at 21 until the 15-min low alarm clears at 36
    assert r.desired[35] == 3 and r.desired[36] == 1
    assert m.instance_hours == pytest.approx((60 + 2 * 15) / 60)
    o = simulate(trace(x, requests=req), Oracle(), FLEET)
    assert o.metrics.cold_core_seconds == 0 and o.metrics.cold_requests == 0
    assert o.metrics.instance_hours == pytest.approx((60 + 2 * 6) / 60)  # launched at 15, gone at 21


def test_daily_sine_reactive_cold_demand_and_oracle_cost_are_exact():
    t = np.arange(2 * 288)  # two days of 5-minute steps; boot = one step
    x = 40 + 30 * np.sin(2 * np.pi * t / 288)
    r = simulate(trace(x, 300.0), ReactiveTargetTracking(target_utilisation=1.0), FLEET)
    # rising: the target is the need for x[t−1], in service one step later, so step t has the
    # instances for x[t−2]; falling: the low alarm keeps more. Cold = Σ max(0, x[t] − 4·ceil(x[t−2]/4))
    # (from step 3: the fleet starts with enough for steps 0 and 1, and keeps it through step 2).
    expected = np.maximum(0, x[3:] - 4 * np.ceil(x[1:-2] / 4 - 1e-9)).sum() * 300
    assert r.metrics.cold_core_seconds == pytest.approx(expected, rel=1e-12)
    assert r.cold_share[:3].sum() == 0
    assert expected > 0
    o = simulate(trace(x, 300.0), Oracle(), FLEET)
    want = np.ceil(np.maximum(x, np.append(x[1:], 0)) / 4 - 1e-9)  # peak of steps t, t+1 (need() ignores float noise)
    assert o.metrics.cold_core_seconds == 0
    assert o.metrics.instance_hours == pytest.approx(want.sum() * 300 / 3600)


def test_daily_sine_aws_predictive_floor_is_yesterdays_hour_and_ignores_the_future():
    t = np.arange(3 * 1440)
    x = 40 + 30 * np.sin(2 * np.pi * t / 1440)
    pol = AwsPredictive(target_utilisation=0.5)
    simulate(trace(x), pol, FLEET)
    hourly = x.reshape(-1, 60).mean(axis=1)
    hour = (t + 5) // 60  # capacity in service boot (5 min) before its hour
    assert (pol._floor[: 1440 - 5] == 0).all()  # day one: no history
    day2 = slice(1440, 2 * 1440 - 5)
    assert (pol._floor[day2] == np.ceil(hourly[hour[day2] - 24] / 2)).all()
    y = x.copy()
    y[2 * 1440:] *= 3  # change day three: day two's floor cannot move
    other = AwsPredictive(target_utilisation=0.5)
    simulate(trace(y), other, FLEET)
    assert (other._floor[: 2 * 1440 - 5] == pol._floor[: 2 * 1440 - 5]).all()


def test_oracle_has_no_cold_starts_when_max_allows_and_the_excess_when_not():
    rng = np.random.default_rng(3)
    x = np.maximum(0, np.cumsum(rng.normal(0, 3, 500)) + 40)
    assert simulate(trace(x), Oracle(), FLEET).metrics.cold_core_seconds == 0
    capped = FleetModel(SHAPE, max_size=8)  # 32 cores
    m = simulate(trace(x), Oracle(), capped).metrics
    assert m.cold_core_seconds == pytest.approx(np.maximum(0, x - 32).sum() * 60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_more_capacity_never_increases_cold_starts(data):
    n = data.draw(st.integers(2, 40))
    x = np.array(data.draw(st.lists(st.floats(0, 60), min_size=n, max_size=n)))
    a = np.array(data.draw(st.lists(st.integers(0, 15), min_size=n, max_size=n)))
    b = a + np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)))
    boot = data.draw(st.sampled_from([0.0, 60.0, 300.0]))
    shape = InstanceShape(4, 16, boot_s=boot)
    runs = [simulate(trace(x), Scheduled(s), FleetModel(shape, initial_size=int(s[0]))) for s in (a, b)]
    assert (runs[1].ready >= runs[0].ready).all()
    assert runs[1].metrics.cold_core_seconds <= runs[0].metrics.cold_core_seconds + 1e-9
    k = round(boot / 60)  # last-in-first-out: in service = the lowest target over the boot window
    want = [a[max(0, i - k): i + 1].min() for i in range(n)]  # (the fleet starts at a[0])
    assert runs[0].ready.tolist() == want
    small, big = data.draw(st.integers(0, 10)), data.draw(st.integers(0, 5))
    o = [simulate(trace(x), Oracle(), FleetModel(shape, max_size=m)).metrics.cold_core_seconds
         for m in (small, small + big)]
    assert o[1] <= o[0] + 1e-9


def test_instance_hours_of_a_constant_fleet_and_of_a_stopped_warm_pool():
    x = np.full(1000, 10.0)
    m = simulate(trace(x), Scheduled(np.full(1000, 7)), FleetModel(SHAPE, initial_size=7)).metrics
    assert m.instance_hours == 7 * 1000 / 60 and m.warm_stopped_hours == 0
    assert m.cost_usd == pytest.approx(7 * 1000 / 60 * 0.5)
    assert m.utilisation == pytest.approx(10 / 28)
    fleet = FleetModel(SHAPE, initial_size=7, stopped_cost_fraction=0.1)
    w = simulate(trace(x), Scheduled(np.full(1000, 7), np.full(1000, 3)), fleet).metrics
    # warm instances boot 5 min at full price, then wait stopped at 10 %
    assert w.instance_hours == pytest.approx((7 * 1000 + 3 * 5) / 60)
    assert w.warm_stopped_hours == pytest.approx(3 * 995 / 60)
    assert w.equivalent_instance_hours == pytest.approx((7 * 1000 + 3 * 5 + 0.1 * 3 * 995) / 60)
    run = simulate(trace(x), Scheduled(np.full(1000, 7), np.full(1000, 3), warm_running=True), fleet).metrics
    assert run.instance_hours == 10 * 1000 / 60 and run.warm_stopped_hours == 0
    half = simulate(trace(x), Scheduled(np.full(1000, 7)), FleetModel(SHAPE, initial_size=7), eval_start=500).metrics
    assert half.instance_hours == 7 * 500 / 60 and half.steps == 500


def test_knative_panics_on_a_burst_and_holds_for_a_stable_window():
    x = np.full(60, 4.0)
    x[10] = 16.0  # 10-second steps: stable window 6 steps, panic window 1 step
    r = simulate(trace(x, 10.0), KnativeAutoscaler(target_utilisation=1.0), FLEET)
    assert r.desired[10] == 1 and (r.desired[11:17] == 4).all() and r.desired[17] == 1


def wiggly(days: int, step_s: float = 300.0, seed: int = 0) -> np.ndarray:
    n = int(days * 86_400 / step_s)
    t = np.arange(n) * step_s / 86_400
    rng = np.random.default_rng(seed)
    return np.maximum(0, 40 + 25 * np.sin(2 * np.pi * t) + rng.normal(0, 4, n))


@pytest.mark.parametrize("make", [lambda: ReactiveTargetTracking(), lambda: KnativeAutoscaler(),
                                  lambda: AwsPredictive(), lambda: NaivePredictive(), lambda: Warmcast()])
def test_decisions_read_only_the_past(make):
    x = wiggly(3)
    cut = 2 * 288 + 7
    y = x.copy()
    y[cut:] = y[cut:] * 2 + 5
    a, b = (simulate(trace(v, 300.0), make(), FLEET).desired for v in (x, y))
    assert (a[: cut + 1] == b[: cut + 1]).all()  # the decision at `cut` reads steps < cut
    assert (a != b).any()


def test_warmcast_sizes_from_an_injected_forecast_and_its_warm_pool():
    n = 60
    upper = np.zeros((n, 6, 2))
    upper[:, :, 0] = [20, 20, 20, 28, 28, 36]  # cores at 5..30 min; 4 cores an instance
    fc = ForecastArrays(np.arange(n), upper, upper * 0.8)
    pol = Warmcast(forecast=fc, safety_utilisation=None)
    r = simulate(trace(np.full(n, 10.0)), pol, FLEET)
    # boot 300 s + 5-min cadence → the 10-min horizon: 20 cores → 5 active; 30 min: 36 → 9 − 5 = 4 warm
    assert r.desired[5] == 5 and r.warm_pending[5] + r.warm[5] == 4
    assert r.metrics.cold_core_seconds == 0


def test_forecast_from_a_system_forecast_table():
    rows = [{"issued_at": START + timedelta(minutes=10), "horizon_min": h, "resource": res, "mean": v * 0.5,
             "lower": 0.0, "upper": v, "level": 0.9, "n_users": 3, "method": "test"}
            for h in HORIZONS_MIN for res, v in (("cpu_cores", float(h)), ("memory_gb", 2.0 * h), ("gpus", 0.0))]
    fc = forecast_from_table(pa.Table.from_pylist(rows, schema=SYSTEM_FORECAST), trace(np.zeros(30)))
    assert fc.issued_step.tolist() == [10]
    assert fc.upper[0, :, 0].tolist() == list(map(float, HORIZONS_MIN))
    assert fc.mean[0, :, 1].tolist() == list(map(float, HORIZONS_MIN))


def test_empirical_forecast_is_the_last_value_plus_past_error_quantiles():
    x = np.tile([0.0, 10.0], 500)  # alternating on 5-min steps: the next bucket is 10 above or below
    fc = empirical_forecast(trace(x, 300.0), 1.0, refit_s=3600)
    # errors at h = 1 are +10 and −10 (unconditional): upper = last + 10, mean = last + 0
    assert fc.upper[100, 0, 0] == 20.0 and fc.upper[101, 0, 0] == 10.0 and fc.mean[100, 0, 0] == 10.0
    assert fc.upper[5, 0, 0] == x[4] and fc.upper[5, 5, 0] == x[4]  # no error known yet: the last value
    assert (fc.upper[:, :, 0] >= 0).all() and (fc.mean <= fc.upper).all()


def test_empirical_forecast_keeps_the_recent_peak_when_its_past_errors_score_better():
    x = np.tile([10.0, 0.0], 30)  # alternating on 5-min steps: x[even] = 10, x[odd] = 0
    tr = trace(x, 300.0)
    last = empirical_forecast(tr, 0.9, refit_s=300)
    sel = empirical_forecast(tr, 0.9, refit_s=300, point_windows_s=(0.0, 600.0))
    # at step 40, origins 1..34 are scored (17 odd, 17 even). Odd horizons (5, 15, 25 min): the
    # last value's errors are +10 / −10, the 0.9 quantile 10, pinball loss about it ½·0.1·20 = 1.0;
    # the peak of the last 2 steps (always 10) errs 0 / −10, quantile 0, loss ½·0.1·10 = 0.5: the
    # peak wins. Even horizons: the last value never errs (loss 0) and stays the point
    for t in (40, 41):
        p = x[t - 1]  # 0 at t = 40, 10 at t = 41
        assert last.upper[t, :, 0].tolist() == [p + 10, p, p + 10, p, p + 10, p]
        assert sel.upper[t, :, 0].tolist() == [10.0, p, 10.0, p, 10.0, p]
        # mean error of the peak: −10 × (odd origins) / (origins) = −10·17/34 at 40, −10·18/35 at 41
        m = 10.0 - 10.0 * (17 / 34 if t == 40 else 18 / 35)
        assert sel.mean[t, :, 0] == pytest.approx([m, p, m, p, m, p], abs=1e-12)
        assert sel.upper[t, :, 1].tolist() == [5.0, p / 2, 5.0, p / 2, 5.0, p / 2]  # memory = cores / 2
    # no error known yet: every loss is 0 and the tie keeps the last value
    assert sel.upper[5, 0, 0] == x[4] == last.upper[5, 0, 0]
    # a candidate list of one is that point alone; () is the last value
    one = empirical_forecast(tr, 0.9, refit_s=300, point_windows_s=(600.0,))
    assert one.upper[40, 0, 0] == 10.0 and one.upper[5, 0, 0] == 10.0
    assert np.array_equal(empirical_forecast(tr, 0.9, refit_s=300, point_windows_s=(0.0,)).upper, last.upper)


def test_warmcast_on_alternating_windows_holds_the_peak_at_half_the_cost():
    x = np.tile(np.repeat([40.0, 8.0], 10), 60)  # 10-min windows alternating 10 and 2 instances' worth
    tr = trace(x)
    eval_start = 600
    old = simulate(tr, Warmcast(level=0.9, point_windows_s=()), FLEET, eval_start=eval_start).metrics
    new = simulate(tr, Warmcast(level=0.9), FLEET, eval_start=eval_start).metrics
    # the last value scales in during every low window and needs its +32-core error quantile on top
    # of every level (it churns instances); the recent peak holds exactly the 10 instances
    assert new.cold_core_seconds == 0.0 and old.cold_core_seconds == 0.0
    assert old.instance_hours > 1.5 * new.instance_hours and new.launches < old.launches
    assert new.instance_hours == pytest.approx(10 * (len(x) - eval_start) / 60)


def test_trace_from_requests_matches_the_demand_series_on_5_minute_buckets():
    since = START
    requests = pa.concat_tables(list(generate_requests(20, 0.25, since, seed=1)))
    until = since + timedelta(hours=6)
    five = trace_from_requests(requests, since, until, 300.0)
    demand = build_demand_series(requests, since, until)
    ref = trace_from_demand(demand)
    off = int((ref.start - since).total_seconds() // 300)
    np.testing.assert_allclose(five.cores[off: off + ref.steps], ref.cores, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(five.memory_gb[off: off + ref.steps], ref.memory_gb, rtol=1e-9, atol=1e-9)
    assert five.requests.sum() == len(requests)
    one = trace_from_requests(requests, since, until, 60.0)
    np.testing.assert_allclose(one.cores.reshape(-1, 5).mean(axis=1), five.cores, rtol=1e-9, atol=1e-9)


def test_sweep_and_equal_cost_interpolation():
    x = wiggly(2, 60.0)
    curve = sweep(lambda u: ReactiveTargetTracking(target_utilisation=u), [0.6, 0.8, 1.0], trace(x), FLEET)
    hours = [m.equivalent_instance_hours for m in curve]
    assert hours[0] > hours[1] > hours[2]
    assert cold_at_cost(curve, hours[1]) == pytest.approx(curve[1].cold_core_seconds)
    assert np.isnan(cold_at_cost(curve, hours[0] * 2))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        SystemTrace(np.array([1.0, -1.0]), np.zeros(2))
    with pytest.raises(ValueError, match="as long as"):
        SystemTrace(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="eval_start"):
        simulate(trace(np.zeros(3)), Oracle(), FLEET, eval_start=4)


def test_warmcast_matches_a_straightforward_instance_list_replay():
    """The benchmark's plain loop (instance lists, forecast recomputed at every decision) and the
    fast replay agree exactly, warm pool and safety net included."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "simulate.py"
    spec = importlib.util.spec_from_file_location("bench_simulate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = wiggly(1, 60.0, seed=5) * 3
    fleet = FleetModel(InstanceShape(8, 32, hourly_price_usd=0.4, boot_s=300, resume_s=60))
    ref = bench.straightforward_warmcast(trace(x), fleet, 0.9, 6 * 3600.0)
    fast = simulate(trace(x), Warmcast(level=0.9, refit_s=300, window_s=6 * 3600.0, error_scale="none",
                                       hysteresis=0.1, scale_in_grace_s=900.0), fleet).metrics
    assert fast.cold_core_seconds == pytest.approx(ref["cold_core_seconds"], rel=1e-9, abs=1e-6)
    assert fast.instance_hours == pytest.approx(ref["instance_hours"], rel=1e-12)
    assert fast.warm_stopped_hours == pytest.approx(ref["warm_stopped_hours"], rel=1e-12, abs=1e-12)
    assert fast.warm_stopped_hours > 0 and fast.cold_core_seconds > 0  # both paths are exercised


def test_the_simulator_imports_neither_torch_nor_airflow():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = ("import sys, scaler.simulate, scaler.sim_policies\n"
            "bad = [m for m in ('torch', 'airflow', 'lightning', 'models') if m in sys.modules]\nassert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr[-2000:]


def test_step_naive_heuristic_without_history_is_reactive_at_full_utilisation():
    x = np.zeros(40)
    x[10:] = 8.0
    r = simulate(trace(x), NaivePredictive(), FLEET)
    # no past increments yet: the forecast is the last value, so it answers like reactive at 100 %
    assert r.metrics.cold_core_seconds == 8 * (60 + 300) and r.ready[16] == 2


def test_daily_sine_trace_from_one_minute_requests_is_exact():
    """A request per minute lasting 90 s with cores following a sine: each minute holds the
    request's 60 s plus the previous one's last 30 s."""
    n = 3 * 60
    cores = 10 + 5 * np.sin(2 * np.pi * np.arange(n) / 60)
    rows = pa.table({"ts": pa.array([START + timedelta(minutes=i) for i in range(n)], pa.timestamp("us", "UTC")),
                     "duration_s": np.full(n, 90.0), "cpu_cores": cores, "memory_mb": np.full(n, 1024.0),
                     "gpus": np.zeros(n)})
    tr = trace_from_requests(rows, START, START + timedelta(minutes=n), 60.0)
    assert tr.cores == pytest.approx(cores + np.append(0, cores[:-1]) / 2)
    assert tr.memory_gb == pytest.approx(np.append(1, np.full(n - 1, 1.5)))
    assert tr.requests.tolist() == [1.0] * n


def test_empirical_forecast_seasonal_candidate_foresees_a_spike_at_the_top_of_every_hour():
    x = np.full(60 * 12, 10.0)  # 1-min steps, 12 hours: 10 cores, and 40 at minute 1 of every hour
    x[1::60] = 40.0
    tr = trace(x)
    t = 60 * 8 - 5  # origin 5 minutes before 08:00; horizon 2 (15 min bucket 2: steps t+5 .. t+9) holds the spike
    plain = empirical_forecast(tr, 0.95, refit_s=3600)
    seas = empirical_forecast(tr, 0.95, refit_s=3600, seasonal_periods_s=(3600.0,), seasonal_count=3)
    # the last value errs +30 at one origin in 12 per horizon: its 0.95 quantile is +30 at every origin
    assert plain.upper[t, :, 0].tolist() == [40.0] * 6
    # the seasonal point: last value + mean change over the same span one, two and three hours ago
    # (spike 40 - level 10 in the second bucket, 0 elsewhere); it never errs, so it wins everywhere
    assert seas.upper[t, :, 0].tolist() == [10.0, 40.0, 10.0, 10.0, 10.0, 10.0]
    assert seas.upper[t + 5, :, 0].tolist() == [40.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    assert seas.mean[t, :, 0].tolist() == [10.0, 40.0, 10.0, 10.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="longest horizon"):
        empirical_forecast(tr, 0.95, seasonal_periods_s=(600.0,))
    with pytest.raises(ValueError, match="seasonal_count"):
        empirical_forecast(tr, 0.95, seasonal_periods_s=(3600.0,), seasonal_count=0)


def test_seasonal_drift_averages_the_periods_already_seen():
    x = np.arange(200, dtype=float)[:, None]  # a ramp: every change over j steps is j
    peak = x  # buckets of one step (k = 1)
    d = _seasonal_drift(x, peak, period=50, count=3, k=1, hz=6)
    # origin 120: periods 1 and 2 seen (120-1-150 < 0): peak[120-50i+j] - x[119-50i] = j + 1
    assert d[120, :, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert d[40, :, 0].tolist() == [0.0] * 6  # no period past yet: the last value


def test_daily_drift_adds_yesterdays_change_over_the_same_span():
    x = np.full(288 * 3, 10.0)  # 5-minute steps, 3 days: 10 cores and 30 at step 100 of every day
    x[100::288] = 30.0
    tr = trace(x, 300.0)
    t = 288 * 2 + 100  # the origin whose first bucket is today's spike
    drift = empirical_forecast(tr, 0.5, refit_s=3600, daily_drift=True)
    plain = empirical_forecast(tr, 0.5, refit_s=3600)
    # yesterday from the same origin: +20 into the next bucket, 0 into the ones after; median error 0
    assert drift.upper[t, :, 0].tolist() == [30.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    assert plain.upper[t, :, 0].tolist() == [10.0] * 6
    assert drift.upper[150, :, 0].tolist() == [10.0] * 6  # no yesterday yet: the last value
