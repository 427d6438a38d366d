"""System forecast: sampled bands are calibrated, the naive quantile sum is not, tiers weight the target."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.contract import MEAN_WEIGHTS, to_forecast_table
from pipeline.aggregate import (
    METHOD_COPULA,
    METHOD_INDEPENDENT,
    METHOD_NAIVE,
    METHOD_RECONCILED,
    METHOD_TIERED,
    METHOD_TOPDOWN,
    AggregateConfig,
    ResidualHistory,
    aggregate,
    provisioning_target,
    quantile_at,
    read_user_forecast,
    residual_history,
    system_history,
    user_service_levels,
)
from pipeline.topdown import topdown_forecast
from pipeline.schemas import DEMAND, DEMAND_RESOURCES, HORIZONS_MIN, QUANTILE_COLUMNS, QUANTILES, SYSTEM_FORECAST, USER_PROFILE

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
Z7 = np.array([NormalDist().inv_cdf(q) for q in QUANTILES])
M = 250  # past time points in the residual history


def _table(q: np.ndarray, ids: list[str] | None = None, mean: np.ndarray | None = None) -> pa.Table:
    """USER_FORECAST for ``q [n, 4, 7]`` (same at every horizon) or ``[n, 6, 4, 7]``."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim == 3:
        q = np.repeat(q[:, None], len(HORIZONS_MIN), axis=1)
    ids = ids or [f"u{i:03d}" for i in range(len(q))]
    return to_forecast_table(ids, T0, q, mean, "test")


def _profiles(rows: list[tuple[str, str, float]]) -> pa.Table:
    return pa.table({"user_id": [r[0] for r in rows], "tier": [r[1] for r in rows], "weight": [r[2] for r in rows],
                     "software_configs": [["python-3.12"]] * len(rows), "max_cores": [8.0] * len(rows)}, schema=USER_PROFILE)


def _coverage(rho: float, history: bool, calls: int = 250, n_users: int = 40, seed: int = 0) -> dict[str, float]:
    """Coverage of the 90 % bands on simulated truth; each call gives 4 trials (independent resources).

    Users are lognormal (``scale·exp(σ·Z)``, σ in [0.2, 0.6]) under a Gaussian copula with
    correlation ``rho``; their forecasts are the true quantiles, the history is ``M`` past ``Z``.
    """
    rng = np.random.default_rng(seed)
    hits = {"band": 0, "naive": 0}
    width = {"band": 0.0, "naive": 0.0}
    for k in range(calls):
        scale, sigma = rng.uniform(0.5, 3.0, (n_users, 4)), rng.uniform(0.2, 0.6, (n_users, 4))
        table = _table(scale[..., None] * np.exp(sigma[..., None] * Z7))
        z = np.sqrt(rho) * rng.normal(size=(1, M + 1, 4)) + np.sqrt(1 - rho) * rng.normal(size=(n_users, M + 1, 4))
        ids = [f"u{i:03d}" for i in range(n_users)]
        agg = aggregate(table, history=ResidualHistory(ids, z[:, :M]) if history else None, config=AggregateConfig(seed=k))
        truth = (scale * np.exp(sigma * z[:, M])).sum(axis=0)
        for name, lo, up in (("band", agg.lower[0], agg.upper[0]), ("naive", agg.naive_lower[0], agg.naive_upper[0])):
            hits[name] += int(((lo <= truth) & (truth <= up)).sum())
            width[name] += float((up - lo).sum())
    return {"band": hits["band"] / (4 * calls), "naive": hits["naive"] / (4 * calls), "width_ratio": width["naive"] / width["band"]}


# -- (a) and (b): calibration -------------------------------------------------------------------

def test_adding_user_quantiles_overstates_the_band_of_independent_users():
    cov = _coverage(rho=0.0, history=True)
    assert cov["width_ratio"] > 3.0  # 40 independent users: the naive band is several times too wide
    assert cov["naive"] > 0.99  # ... so it (almost) never misses
    assert 0.86 <= cov["band"] <= 0.94  # the sampled band is near nominal
    print("independent users:", cov)


def test_the_band_is_calibrated_for_correlated_users_and_ignoring_dependence_is_not():
    cov = _coverage(rho=0.5, history=True)
    assert 0.86 <= cov["band"] <= 0.94
    assert cov["naive"] > 0.96 and cov["width_ratio"] > 1.2
    independent = _coverage(rho=0.5, history=False, calls=40)
    assert independent["band"] < 0.75  # without the residual ranks the band is far too narrow
    print("rho 0.5:", cov, "ignoring dependence:", independent)


def test_comonotone_history_reproduces_the_quantile_sum():
    # Users whose residuals always moved together peak together: the band is the naive one.
    rng = np.random.default_rng(3)
    q = np.sort(rng.gamma(2.0, 1.0, (30, 4, 7)), axis=-1)
    common = rng.normal(size=M)
    agg = aggregate(_table(q), history=ResidualHistory([f"u{i:03d}" for i in range(30)], np.tile(common, (30, 1))),
                    config=AggregateConfig(n_paths=4000))
    assert agg.method == METHOD_COPULA
    np.testing.assert_allclose(agg.upper, agg.naive_upper, rtol=0.03)
    np.testing.assert_allclose(agg.lower, agg.naive_lower, rtol=0.03)
    np.testing.assert_allclose(agg.diversification, 1.0, atol=0.05)


# -- the inverse CDF ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=7, max_size=7),
       st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=50))
def test_the_inverse_cdf_is_monotone_non_negative_and_hits_the_quantiles(qs, us):
    q = np.sort(np.asarray(qs))
    u = np.sort(np.asarray(us))
    x = quantile_at(np.broadcast_to(q, (len(u), 7)), u)
    assert (x >= 0).all() and (np.diff(x) >= -1e-9 * (1 + np.abs(x[1:]))).all()
    np.testing.assert_allclose(quantile_at(np.broadcast_to(q, (7, 7)), np.asarray(QUANTILES)), q, rtol=1e-12, atol=1e-12)


def test_tails_are_the_documented_ones():
    q = np.array([2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0])
    # lower: the q05-q10 slope continued to u = 0 (here 2 - 1 = 1 >= 0); upper: exponential, scale (q95-q90)/ln 2
    assert quantile_at(q, 0.0) == pytest.approx(1.0)
    assert quantile_at(q, 0.025) == pytest.approx(1.5)
    assert quantile_at(q, 0.975) == pytest.approx(9.0 + 2.0 / np.log(2) * np.log(2.0))
    # a user near zero: the lower tail is flattened so demand never goes negative
    assert quantile_at(np.array([0.5, 3, 4, 5, 6, 7, 9.0]), 0.0) == pytest.approx(0.0)


# -- tier and consumption weighting -------------------------------------------------------------

def test_tier_weighting_formula_on_a_hand_computed_case():
    q = np.array([[1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6], [10, 10, 10, 10, 12, 14, 20], [0, 0, 0, 0, 1, 2, 4]], dtype=float)
    mean = np.array([4.0, 3.0, 11.0, 0.5])
    profiles = _profiles([("a", "premium", 4.0), ("b", "standard", 2.0), ("c", "free", 1.0)])  # "d" has no profile
    levels, weights = user_service_levels(["a", "b", "c", "d"], profiles)
    assert levels.tolist() == [0.95, 0.90, 0.50, 0.90] and weights.tolist() == [4.0, 2.0, 1.0, 1.0]
    # buffers Q(τ) - m: a 7-4 = 3, b 5-3 = 2, c 10-11 = -1, d 2-0.5 = 1.5; Σm = 18.5; Σ w·buffer = 12+4-1+1.5 = 16.5
    qq, mm = q[:, None, None, :], mean[:, None, None]
    assert provisioning_target(qq, mm, levels, weights, 1.0)[0, 0] == pytest.approx(35.0)
    assert provisioning_target(qq, mm, levels, weights, 0.5)[0, 0] == pytest.approx(18.5 + 8.25)
    # a level between two quantiles interpolates: premium at 0.8 -> 5 + (0.8-0.75)/0.15 = 5.333
    assert provisioning_target(qq[:1], mm[:1], np.array([0.8]), np.array([1.0]))[0, 0] == pytest.approx(5.0 + 1 / 3)
    # free users at weight 0 contribute exactly their mean
    assert provisioning_target(qq[2:3], mm[2:3], np.array([0.5]), np.array([0.0]))[0, 0] == pytest.approx(11.0)


def test_tiered_target_in_the_aggregate_follows_the_formula():
    rng = np.random.default_rng(5)
    n = 60
    q = np.sort(rng.gamma(2.0, 1.0, (n, 4, 7)), axis=-1)
    ids = [f"u{i:03d}" for i in range(n)]
    tiers = ["premium", "standard", "free"]
    profiles = _profiles([(u, tiers[i % 3], [4.0, 2.0, 1.0][i % 3]) for i, u in enumerate(ids)])
    agg = aggregate(_table(q, ids), profiles=profiles)
    cube = read_user_forecast(_table(q, ids))
    levels, weights = user_service_levels(ids, profiles)
    np.testing.assert_allclose(agg.target, provisioning_target(cube.quantiles, cube.mean, levels, weights, agg.diversification))
    np.testing.assert_allclose(agg.diversification, (agg.upper - agg.mean) / (agg.naive_upper - agg.mean))
    assert (agg.diversification > 0.05).all() and (agg.diversification < 0.5).all()  # independent users diversify
    rows = agg.table([METHOD_TIERED]).to_pylist()
    assert all(r["upper"] == pytest.approx(t) for r, t in zip(rows, agg.target.ravel()))
    assert all(r["lower"] <= r["upper"] and 0 <= r["level"] <= 1 for r in rows)
    # the row's level is the central band whose upper bound is the target
    covered = (agg.totals <= agg.target[None]).mean(axis=0)
    np.testing.assert_allclose(agg.target_level, np.maximum(0, 2 * covered - 1))


def test_all_premium_users_at_weight_one_are_provisioned_at_the_band_upper():
    q = np.sort(np.random.default_rng(2).gamma(2.0, 1.0, (25, 4, 7)), axis=-1)
    ids = [f"u{i:03d}" for i in range(25)]
    agg = aggregate(_table(q, ids), profiles=_profiles([(u, "premium", 1.0) for u in ids]))
    np.testing.assert_allclose(agg.target, agg.upper, rtol=1e-9)


def test_bad_profiles_are_refused_or_defaulted(caplog):
    with pytest.raises(ValueError, match="weight"):
        user_service_levels(["a"], _profiles([("a", "free", -1.0)]))
    with pytest.raises(ValueError, match="duplicate"):
        user_service_levels(["a"], _profiles([("a", "free", 1.0), ("a", "premium", 1.0)]))
    with caplog.at_level(logging.WARNING, logger="pipeline.aggregate"):
        levels, _ = user_service_levels(["a", "b"], _profiles([("a", "platinum", 1.0)]), AggregateConfig(default_tier_level=0.8))
    assert levels.tolist() == [0.8, 0.8] and "platinum" in caplog.text


# -- the system forecast table and determinism ---------------------------------------------------

def test_rows_follow_the_contract_and_the_run_is_deterministic():
    q = np.sort(np.random.default_rng(7).gamma(2.0, 1.0, (50, 6, 4, 7)), axis=-1)
    table = _table(q)
    a = aggregate(table, config=AggregateConfig(seed=11))
    out = a.table()
    assert out.schema == SYSTEM_FORECAST and out.num_rows == 3 * 6 * 4
    assert set(out["method"].to_pylist()) == {METHOD_INDEPENDENT, METHOD_NAIVE, METHOD_TIERED}
    assert pc.all(pc.less_equal(out["lower"], out["upper"])).as_py() and set(out["n_users"].to_pylist()) == {50}
    np.testing.assert_allclose(a.mean, q.sum(axis=0) @ MEAN_WEIGHTS, rtol=1e-9)  # Σ users' mean column
    # the same seed gives the same numbers, whatever the chunking or the row order
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    b = aggregate(shuffled, config=AggregateConfig(seed=11, chunk_mb=0.2))
    np.testing.assert_allclose(b.totals, a.totals, rtol=1e-5)  # the same draws; float32 sums within a chunk
    assert not np.allclose(aggregate(table, config=AggregateConfig(seed=12)).totals, a.totals)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(0.5, 0.99), st.booleans())
def test_system_rows_keep_their_invariants(n_users, seed, level, with_history):
    rng = np.random.default_rng(seed)
    q = np.sort(rng.gamma(0.5, 2.0, (n_users, 4, 7)) * (rng.random((n_users, 4, 1)) < 0.7), axis=-1)  # zeros included
    ids = [f"u{i:03d}" for i in range(n_users)]
    history = ResidualHistory(ids, rng.normal(size=(n_users, 30, 4)).round(0)) if with_history else None  # ties
    profiles = _profiles([(u, ["free", "standard", "premium"][i % 3], float(i % 4)) for i, u in enumerate(ids)])
    agg = aggregate(_table(q, ids), profiles=profiles, history=history, config=AggregateConfig(n_paths=200, level=level, seed=seed))
    out = agg.table().to_pandas()
    assert (out["lower"] <= out["upper"]).all() and (out[["mean", "lower", "upper"]] >= 0).all().all()
    assert out["level"].between(0, 1).all() and (out["n_users"] == n_users).all()
    assert np.isfinite(agg.totals).all() and (agg.totals >= 0).all()
    assert agg.method == (METHOD_COPULA if with_history else METHOD_INDEPENDENT)


# -- bad input ----------------------------------------------------------------------------------

def test_no_users_gives_a_zero_forecast_not_a_crash():
    empty = to_forecast_table([], T0, np.zeros((0, 6, 4, 7)), None, "test")
    agg = aggregate(empty, issued_at=T0)
    rows = agg.table().to_pylist()
    assert len(rows) == 3 * 6 * 4 and {r["n_users"] for r in rows} == {0}
    assert all(r["mean"] == r["lower"] == r["upper"] == 0.0 for r in rows)
    assert aggregate(empty).table().num_rows == 0  # no issue time known: nothing to say


def test_a_user_missing_a_horizon_is_refused_with_its_name():
    table = _table(np.sort(np.random.default_rng(1).gamma(2, 1, (5, 4, 7)), axis=-1))
    gap = pc.and_(pc.equal(table["user_id"], "u003"), pc.equal(table["horizon_min"], 30))
    with pytest.raises(ValueError, match=r"no row for user .u003. at horizon 30 min"):
        aggregate(table.filter(pc.invert(gap)))
    # a horizon no user has is simply not in the output (the scaler then reports it incomplete)
    agg = aggregate(table.filter(pc.not_equal(table["horizon_min"], 30)))
    assert agg.horizons == (5, 10, 15, 20, 25)


def test_crossing_quantiles_are_sorted_with_a_warning(caplog):
    q = np.sort(np.random.default_rng(4).gamma(2, 1, (6, 4, 7)), axis=-1)
    good = _table(q)
    bad_q = {c: good[c].to_numpy().copy() for c in QUANTILE_COLUMNS}
    bad_q["q10"][5], bad_q["q90"][5] = bad_q["q90"][5], bad_q["q10"][5]  # one row crosses
    bad = good
    for c in ("q10", "q90"):
        bad = bad.set_column(bad.schema.get_field_index(c), c, pa.array(bad_q[c]))
    with caplog.at_level(logging.WARNING, logger="pipeline.aggregate"):
        repaired = aggregate(bad)
    assert "1 crossing" in caplog.text and "u000" in caplog.text
    np.testing.assert_allclose(repaired.totals, aggregate(good).totals)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_quantiles_are_refused(value):
    table = _table(np.sort(np.random.default_rng(4).gamma(2, 1, (3, 4, 7)), axis=-1))
    q50 = table["q50"].to_numpy().copy()
    q50[30] = value  # rows are (user, horizon, resource): row 30 is user u001, horizon 10 min, memory_gb
    with pytest.raises(ValueError, match=r"non-finite .*'u001'.*horizon 10 min, memory_gb"):
        aggregate(table.set_column(table.schema.get_field_index("q50"), "q50", pa.array(q50)))


def test_several_issue_times_need_a_choice():
    q = np.sort(np.random.default_rng(4).gamma(2, 1, (3, 6, 4, 7)), axis=-1)
    later = to_forecast_table(["u000", "u001", "u002"], T0 + timedelta(minutes=5), q, None, "test")
    both = pa.concat_tables([_table(q), later])
    with pytest.raises(ValueError, match="2 issue times"):
        aggregate(both)
    assert aggregate(both, issued_at=T0 + timedelta(minutes=5)).issued_at == T0 + timedelta(minutes=5)


def test_history_of_the_wrong_shape_is_refused_and_short_history_means_independent(caplog):
    table = _table(np.sort(np.random.default_rng(4).gamma(2, 1, (3, 4, 7)), axis=-1))
    ids = ["u000", "u001", "u002"]
    with pytest.raises(ValueError, match="history values"):
        aggregate(table, history=ResidualHistory(ids, np.zeros((3, 30, 3))))
    with caplog.at_level(logging.WARNING, logger="pipeline.aggregate"):
        assert aggregate(table, history=ResidualHistory(ids, np.zeros((3, 5)))).method == METHOD_INDEPENDENT
    assert "independent" in caplog.text
    # users without history (or NaN history) are sampled independently, the others keep their ranks
    x = np.random.default_rng(0).normal(size=(2, 100, 4))
    x[0, :10] = np.nan
    assert aggregate(table, history=ResidualHistory(["u000", "zzz"], x)).method == METHOD_COPULA


# -- residual history from the demand series -----------------------------------------------------

def test_residual_history_reads_only_buckets_before_the_issue():
    step = timedelta(minutes=5)
    rows = []
    for k in range(-6, 3):  # buckets around the issue time; the last three are in the future
        rows.append({"user_id": "a", "ts": T0 + k * step, "requests": k + 10, "cpu_cores": float(k * k),
                     "memory_gb": 1.0, "gpus": 0.0})
    rows.append({"user_id": "b", "ts": T0 - 2 * step, "requests": 1, "cpu_cores": 2.0, "memory_gb": 0.5, "gpus": 1.0})
    demand = pa.Table.from_pylist(rows, schema=DEMAND)
    hist = residual_history(demand, T0, window=4)
    assert hist.user_ids == ["a", "b"] and hist.values.shape == (2, 4, len(DEMAND_RESOURCES))
    cpu = DEMAND_RESOURCES.index("cpu_cores")
    np.testing.assert_allclose(hist.values[0, :, cpu], [16 - 25, 9 - 16, 4 - 9, 1 - 4])  # buckets -5..-1
    np.testing.assert_allclose(hist.values[1, :, cpu], [0, 0, 2, -2])  # missing buckets are zero demand
    later = pa.concat_tables([demand, pa.Table.from_pylist([{**rows[0], "ts": T0 + 10 * step, "cpu_cores": 99.0}], schema=DEMAND)])
    np.testing.assert_array_equal(residual_history(later, T0, window=4).values, hist.values)


# -- top-down band and the reconciled target ------------------------------------------------------

def _swinging_system(n: int = 288, amplitude: float = 40.0) -> np.ndarray:
    """A system series that moves by +-amplitude from bucket to bucket around 100 (every resource)."""
    swing = amplitude * np.where(np.arange(n) % 2 == 0, -1.0, 1.0)
    return np.repeat((100.0 + swing)[:, None], len(DEMAND_RESOURCES), axis=1)


def test_a_narrow_bottom_up_band_is_raised_to_the_top_down_one():
    q = np.repeat(np.linspace(9.5, 10.5, 7)[None, None], 10, axis=0).repeat(4, axis=1)  # 10 users, ~10 each
    system = _swinging_system()
    agg = aggregate(_table(q), system=system, config=AggregateConfig(seed=1))
    td_up, td_mean = topdown_forecast(system, 0.95)
    td_lo, _ = topdown_forecast(system, 0.05)
    np.testing.assert_allclose(agg.topdown_upper, td_up)
    np.testing.assert_allclose(agg.topdown_lower, np.minimum(td_lo, td_up))
    np.testing.assert_allclose(agg.topdown_mean, td_mean)
    assert (agg.topdown_upper > agg.target).all()  # the users' sum says ~100 +- 2, the system swings by 80
    np.testing.assert_allclose(agg.reconciled, agg.topdown_upper)
    np.testing.assert_allclose(agg.reconciled_level, 0.9)
    out = agg.table().to_pandas()
    assert set(out["method"]) == {METHOD_INDEPENDENT, METHOD_NAIVE, METHOD_TIERED, METHOD_TOPDOWN, METHOD_RECONCILED}
    assert len(out) == 5 * 6 * 4 and (out["lower"] <= out["upper"]).all()
    rec = out[out["method"] == METHOD_RECONCILED].sort_values(["horizon_min", "resource"])
    tiered = out[out["method"] == METHOD_TIERED].sort_values(["horizon_min", "resource"])
    np.testing.assert_allclose(rec["mean"], tiered["mean"])  # Σ users' means
    td = out[out["method"] == METHOD_TOPDOWN]
    assert np.allclose(np.sort(td["mean"]), np.sort(td_mean.ravel()))  # its own mean


def test_a_wide_bottom_up_target_stands_when_the_system_has_been_calm():
    q = np.sort(np.random.default_rng(2).gamma(2.0, 5.0, (10, 4, 7)), axis=-1) * np.linspace(0.2, 3.0, 7)
    calm = np.full((288, len(DEMAND_RESOURCES)), float(q[:, :, 3].sum(axis=0).mean()))
    agg = aggregate(_table(q), system=calm, config=AggregateConfig(seed=1))
    assert (agg.topdown_upper < agg.target).all()
    np.testing.assert_array_equal(agg.reconciled, agg.target)
    np.testing.assert_array_equal(agg.reconciled_level, agg.target_level)
    np.testing.assert_array_equal(agg.reconciled_lower, agg.target_lower)


def _past_bounds(system: np.ndarray, tiered_off: float, topdown_off: float, issues: int = 294) -> pa.Table:
    """Earlier issues' tiered_target / topdown_empirical rows whose upper is the actual demand of its
    target bucket (``system``, the buckets before T0) plus an offset; targets not yet over: 1e6."""
    step, rows = timedelta(minutes=5), []
    for k in range(1, issues + 1):
        for j, h in enumerate(HORIZONS_MIN):
            back = k - j
            for r, res in enumerate(DEMAND_RESOURCES):
                y = system[-back, r] if 1 <= back <= len(system) else 1e6
                for method, off in ((METHOD_TIERED, tiered_off), (METHOD_TOPDOWN, topdown_off)):
                    rows.append({"issued_at": T0 - k * step, "horizon_min": h, "resource": res, "mean": y, "lower": 0.0,
                                 "upper": max(0.0, y + off), "level": 0.9, "n_users": 10, "method": method})
    return pa.Table.from_pylist(rows, schema=SYSTEM_FORECAST)


def test_the_reconciled_target_is_the_bound_that_scored_best_on_the_recent_issues():
    q = np.repeat(np.linspace(9.5, 10.5, 7)[None, None], 10, axis=0).repeat(4, axis=1)  # 10 users, ~10 each
    system = _swinging_system()
    safe = aggregate(_table(q), system=system, config=AggregateConfig(seed=1))  # no past: the maximum
    assert (safe.topdown_upper > safe.target).all() and (safe.reconciled_from == "max").all()
    # the sum of the users' forecasts was just above every past bucket, the top-down bound 80 over
    agg = aggregate(_table(q), system=system, config=AggregateConfig(seed=1), past=_past_bounds(system, 1.0, 80.0))
    assert (agg.reconciled_from == "bottom_up").all()
    np.testing.assert_array_equal(agg.reconciled, agg.target)
    np.testing.assert_array_equal(agg.reconciled_level, agg.target_level)
    np.testing.assert_array_equal(agg.reconciled_lower, agg.target_lower)
    rec = agg.table([METHOD_RECONCILED]).to_pandas()
    np.testing.assert_allclose(np.sort(rec["upper"]), np.sort(agg.target.ravel()))
    # the sum fell 50 short every time: the top-down bound (here the maximum too: ties keep the maximum)
    short = aggregate(_table(q), system=system, config=AggregateConfig(seed=1), past=_past_bounds(system, -50.0, 5.0))
    assert (short.reconciled_from == "max").all()
    np.testing.assert_array_equal(short.reconciled, short.topdown_upper)
    # one 40 under, the other 40 over: their average hit every bucket
    mid = aggregate(_table(q), system=system, config=AggregateConfig(seed=1), past=_past_bounds(system, -40.0, 40.0))
    assert (mid.reconciled_from == "average").all()
    np.testing.assert_allclose(mid.reconciled, (mid.target + mid.topdown_upper) / 2)
    np.testing.assert_allclose(mid.reconciled_level, (0.9 + mid.target_level) / 2)
    assert (mid.reconciled_lower <= mid.reconciled).all()
    # "max" ignores the past; too few scored issues (20 < 24 at 5 min) keep the maximum
    fixed = aggregate(_table(q), system=system, config=AggregateConfig(seed=1, reconcile="max"),
                      past=_past_bounds(system, 1.0, 80.0))
    np.testing.assert_array_equal(fixed.reconciled, safe.reconciled)
    few = aggregate(_table(q), system=system, config=AggregateConfig(seed=1), past=_past_bounds(system, 1.0, 80.0, issues=20))
    assert (few.reconciled_from == "max").all()
    # rows of this very issue (a re-run) and rows off its 5-minute grid are not scored
    noise = _past_bounds(system, -1e3, -1e3, issues=3)
    field = SYSTEM_FORECAST.field("issued_at")
    shifted = noise.set_column(0, field, pa.array([t + timedelta(minutes=2) for t in noise["issued_at"].to_pylist()], field.type))
    own = noise.set_column(0, field, pa.array([T0] * noise.num_rows, field.type))
    past = pa.concat_tables([_past_bounds(system, 1.0, 80.0), shifted, own])
    again = aggregate(_table(q), system=system, config=AggregateConfig(seed=1), past=past)
    assert (again.reconciled_from == "bottom_up").all()
    with pytest.raises(ValueError, match="reconcile must be"):
        AggregateConfig(reconcile="min")


def test_too_little_system_history_leaves_the_tiered_target_alone(caplog):
    q = np.sort(np.random.default_rng(3).gamma(2.0, 1.0, (5, 4, 7)), axis=-1)
    with caplog.at_level(logging.INFO, logger="pipeline.aggregate"):
        agg = aggregate(_table(q), system=_swinging_system(17))  # 11 past errors
    assert agg.reconciled is None and "too few for the top-down band" in caplog.text
    assert set(agg.table()["method"].to_pylist()) == {METHOD_INDEPENDENT, METHOD_NAIVE, METHOD_TIERED}
    assert aggregate(_table(q), system=_swinging_system(18)).reconciled is not None
    with pytest.raises(ValueError, match="system history must be"):
        aggregate(_table(q), system=np.ones((288, 2)))


def test_system_history_sums_every_user_before_the_issue_only():
    step = timedelta(minutes=5)
    rows = [{"user_id": u, "ts": T0 + k * step, "requests": 1, "cpu_cores": c * (k + 10), "memory_gb": 1.0, "gpus": 0.0}
            for u, c in (("a", 1.0), ("b", 2.0)) for k in range(-3, 2) if not (u == "b" and k == -2)]
    demand = pa.Table.from_pylist(rows, schema=DEMAND)
    hist = system_history(demand, T0, window=4)
    assert hist.shape == (4, len(DEMAND_RESOURCES))
    cpu, mem = DEMAND_RESOURCES.index("cpu_cores"), DEMAND_RESOURCES.index("memory_gb")
    np.testing.assert_allclose(hist[:, cpu], [0.0, 7 + 14, 8, 9 + 18])  # bucket -4 empty, b missing at -2
    np.testing.assert_allclose(hist[:, mem], [0.0, 2.0, 1.0, 2.0])


def _one_user(q: list[float], p_zero: float | None) -> "ForecastCube":
    from pipeline.aggregate import ForecastCube

    quantiles = np.tile(np.array(q, dtype=np.float64), (1, 6, 1, 1))
    p0 = None if p_zero is None else np.full((1, 6, 1), p_zero)
    return ForecastCube(T0, ["u"], HORIZONS_MIN, ("cpu_cores",), quantiles, np.ones((1, 6, 1)), p0)


def test_sample_paths_put_the_forecasts_zero_mass_at_zero():
    from pipeline.aggregate import sample_totals

    cfg = AggregateConfig(n_paths=40_000, seed=3)
    q2 = [0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0]  # two zero quantiles: P(0) in [0.10, 0.25]
    draws = sample_totals(_one_user(q2, 0.2), config=cfg)[0][:, :, 0]
    plain = sample_totals(_one_user(q2, None), config=cfg)[0][:, :, 0]
    assert abs((plain == 0).mean() - 0.10) < 0.01 and abs((draws == 0).mean() - 0.20) < 0.01
    # from level 0.2 linear up to q25 = 1 at 0.25: P(draw <= 0.5) = 0.225; above q25 nothing moves
    assert abs((draws <= 0.5).mean() - 0.225) < 0.01
    np.testing.assert_array_equal(draws[draws > 1.0 + 1e-6].size, plain[plain > 1.0 + 1e-6].size)
    np.testing.assert_array_equal(np.sort(draws[draws > 1.0 + 1e-6]), np.sort(plain[plain > 1.0 + 1e-6]))
    # p_zero at its bracket's low end (what the quantiles alone say), or NaN: the same draws
    np.testing.assert_array_equal(sample_totals(_one_user(q2, 0.10), config=cfg)[0], sample_totals(_one_user(q2, None), config=cfg)[0])
    np.testing.assert_array_equal(sample_totals(_one_user(q2, float("nan")), config=cfg)[0], plain[:, :, None])
    # q05 > 0: an atom at 0 below p_zero, the tail model above it
    q0 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]
    atom = sample_totals(_one_user(q0, 0.03), config=cfg)[0][:, :, 0]
    plain0 = sample_totals(_one_user(q0, None), config=cfg)[0][:, :, 0]
    assert (plain0 == 0).mean() == 0 and abs((atom == 0).mean() - 0.03) < 0.005
    assert abs((atom < 1.0).mean() - 0.05) < 0.006  # below q05: 5 % in all, as before


def test_read_user_forecast_reads_p_zero_and_keeps_it_in_the_bracket():
    q = np.tile(np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0]), (2, 6, 4, 1))
    table = to_forecast_table(["a", "b"], T0, q, None, "lstm:v", np.full((2, 6, 4), 0.2))
    cube = read_user_forecast(table)
    np.testing.assert_allclose(cube.p_zero, 0.2)
    assert read_user_forecast(to_forecast_table(["a", "b"], T0, q, None, "v")).p_zero is None
    assert read_user_forecast(table.drop_columns(["p_zero"])).p_zero is None
