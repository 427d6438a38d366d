"""Baselines (known answers, no leakage, calibration, non-crossing) and the forecast contract."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.baselines import DAY, METHODS, WEEK, BaselineConfig, forecast_baseline, forecast_baselines
from models.contract import from_forecast_table, quantile_mean, to_forecast_table, validate_forecast_table
from models.metrics import backtest_table, forecast_targets
from pipeline.schemas import DEMAND_RESOURCES, HORIZONS_MIN, P_ZERO_LOW, QUANTILE_COLUMNS, USER_FORECAST

UTC = timezone.utc
T0 = datetime(2026, 3, 2, tzinfo=UTC)


def _daily_pattern(n_users: int, days: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    day = rng.gamma(2.0, 3.0, size=(n_users, DAY, 4)).astype(np.float32)
    return np.tile(day, (1, days, 1))


def test_constant_series_has_zero_error_for_every_method():
    values = np.full((3, 3 * DAY, 4), 7.5, dtype=np.float32)
    for method, fc in forecast_baselines(values).items():
        assert np.all(fc.point == 7.5), method
        assert np.all(fc.quantiles == 7.5), method  # zero-width: every past error is 0
        assert fc.quantiles.shape == (3, 3 * DAY, 6, 4, 7)


def test_daily_seasonal_naive_is_exact_on_a_daily_periodic_series():
    values = _daily_pattern(4, 4)
    origins = np.arange(2 * DAY, 4 * DAY - 5)  # every target inside the series
    targets = forecast_targets(values, origins)
    daily = forecast_baseline(values, "seasonal_daily", origins)
    np.testing.assert_array_equal(daily.point, targets)
    np.testing.assert_array_equal(daily.quantiles, np.repeat(targets[..., None], 7, axis=-1))
    assert not daily.fallback.any()
    last = forecast_baseline(values, "last_value", origins)
    assert np.abs(last.point - targets).mean() > 1.0  # the test can fail: others are not exact


def test_weekly_seasonal_naive_is_exact_on_a_weekly_periodic_series():
    rng = np.random.default_rng(1)
    week = rng.gamma(2.0, 2.0, size=(2, WEEK, 4)).astype(np.float32)
    values = np.tile(week, (1, 2, 1))[:, : WEEK + 2 * DAY]
    origins = np.arange(WEEK + 10, WEEK + 2 * DAY - 5)
    fc = forecast_baseline(values, "seasonal_weekly", origins)
    np.testing.assert_array_equal(fc.point, forecast_targets(values, origins))
    # First day of the second week: no own errors yet (recalibrated daily), random-walk fallback.
    assert fc.defined.all()
    early = forecast_baseline(values, "seasonal_weekly", np.array([WEEK - 5, WEEK - 4]))
    np.testing.assert_array_equal(early.defined, [[False] * 5 + [True], [False] * 4 + [True] * 2])
    calibrated = fc.origins >= WEEK + DAY
    assert fc.fallback[:, ~calibrated].all() and not fc.fallback[:, calibrated].any()
    np.testing.assert_array_equal(fc.quantiles[:, calibrated, ..., 0], fc.quantiles[:, calibrated, ..., -1])


def test_moving_average_and_last_value_known_answers():
    values = np.arange(40, dtype=np.float32)[None, :, None].repeat(4, axis=2)  # 0, 1, 2, ...
    origins = np.array([12, 20, 40])
    ma = forecast_baseline(values, "moving_average", origins, BaselineConfig(window=4))
    np.testing.assert_allclose(ma.point[0, :, 0, 0], [9.5, 17.5, 37.5])  # mean of the 4 before
    lv = forecast_baseline(values, "last_value", origins)
    np.testing.assert_array_equal(lv.point[0, :, :, 1], np.array([[11.0] * 6, [19.0] * 6, [39.0] * 6]))


@pytest.mark.parametrize("method", METHODS)
def test_no_leakage_changing_the_future_leaves_past_forecasts_alone(method):
    values = _daily_pattern(3, 9, seed=2) + np.random.default_rng(3).normal(0, 1, (3, 9 * DAY, 4)).astype(np.float32) ** 2
    cut = 8 * DAY + 37
    changed = values.copy()
    changed[:, cut:] = np.random.default_rng(4).gamma(5.0, 10.0, size=changed[:, cut:].shape)
    cfg = BaselineConfig(refit_every=12)  # recalibrate often: more chances to leak
    a = forecast_baseline(values, method, config=cfg)
    b = forecast_baseline(changed, method, config=cfg)
    past = a.origins <= cut
    np.testing.assert_array_equal(a.quantiles[:, past], b.quantiles[:, past])
    np.testing.assert_array_equal(a.point[:, past], b.point[:, past])
    assert not np.array_equal(a.quantiles[:, ~past], b.quantiles[:, ~past])  # the future does matter
    # Asking for a subset of origins gives the same numbers.
    sub = forecast_baseline(values, method, np.array([cut, 5, 3 * DAY]), cfg)
    np.testing.assert_array_equal(sub.quantiles, a.quantiles[:, [cut - 1, 4, 3 * DAY - 1]])


@pytest.mark.parametrize("method", ["last_value", "moving_average"])
def test_quantiles_are_calibrated_on_iid_noise(method):
    rng = np.random.default_rng(5)
    values = (20.0 + rng.normal(0.0, 2.0, size=(60, 4 * DAY, 4))).astype(np.float32)
    origins = np.arange(2 * DAY, 4 * DAY - 5)
    fc = forecast_baseline(values, method, origins, BaselineConfig(window=24))
    table = backtest_table({method: fc.quantiles}, forecast_targets(values, origins))
    assert table["coverage90"].between(0.87, 0.93).all(), table
    assert table["coverage80"].between(0.76, 0.84).all(), table
    assert not fc.fallback.any()


def test_fallback_before_enough_errors_is_flagged_and_widens_with_horizon():
    rng = np.random.default_rng(6)
    values = (10.0 + rng.normal(0.0, 1.0, size=(2, 2 * DAY, 4))).astype(np.float32)
    fc = forecast_baseline(values, "seasonal_daily", np.array([DAY + 10]))  # no own errors before c=288
    assert fc.fallback.all()
    width = fc.quantiles[..., -1] - fc.quantiles[..., 0]
    assert (width > 0).all()
    assert (width[:, :, 5] > width[:, :, 0]).all()  # random-walk spread grows with the horizon


def test_bad_inputs_zeros_single_request_nan_and_inf():
    values = np.zeros((4, 2 * DAY, 4), dtype=np.float32)
    values[1, 100, 0] = 1.0  # one request
    values[2, 50:60] = np.nan
    values[2, 300] = np.inf
    values[3] = np.nan  # no data at all
    for method, fc in forecast_baselines(values).items():
        assert np.isfinite(fc.quantiles).all(), method
        assert (fc.quantiles >= 0).all(), method
        assert np.all(fc.quantiles[0] == 0) and np.all(fc.quantiles[3] == 0), method


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    method=st.sampled_from(METHODS),
    t_len=st.integers(2, 2 * DAY),
    refit=st.integers(1, 50),
    window=st.integers(1, 300),
    min_errors=st.integers(1, 100),
    holes=st.booleans(),
)
def test_quantiles_never_cross_and_never_go_negative(seed, method, t_len, refit, window, min_errors, holes):
    rng = np.random.default_rng(seed)
    values = rng.gamma(0.5, 4.0, size=(3, t_len, 4)).astype(np.float32) * (rng.random((3, t_len, 4)) < 0.6)
    if holes:
        values[rng.random(values.shape) < 0.05] = np.nan
    cfg = BaselineConfig(window=window, error_window=window, refit_every=refit, min_errors=min_errors, chunk_users=2)
    q = forecast_baseline(values, method, config=cfg).quantiles
    assert np.isfinite(q).all()
    assert (q >= 0).all()
    assert (np.diff(q, axis=-1) >= 0).all()


# ---- the forecast contract ------------------------------------------------------------------


def test_contract_round_trip_of_a_baseline_forecast():
    values = _daily_pattern(3, 2) + 1.0
    fc = forecast_baseline(values, "seasonal_daily", np.array([2 * DAY]))
    users = ["alice", "bob", "carol"]
    issued = T0 + timedelta(days=2)
    table = to_forecast_table(users, issued, fc.quantiles[:, 0], fc.point[:, 0], fc.model_version)
    assert table.schema == USER_FORECAST
    assert table.num_rows == 3 * 6 * 4
    validate_forecast_table(table)
    rows = table.to_pylist()
    assert [r["resource"] for r in rows[:4]] == list(DEMAND_RESOURCES)
    for r in rows:
        assert r["target_start"] == r["issued_at"] + timedelta(minutes=r["horizon_min"] - 5)
    assert rows[0]["target_start"] == issued and rows[-1]["target_start"] == issued + timedelta(minutes=25)
    back = from_forecast_table(table)
    assert back.user_ids == users and back.issued_at == issued
    np.testing.assert_allclose(back.quantiles, fc.quantiles[:, 0], rtol=1e-6)
    np.testing.assert_allclose(back.mean, fc.point[:, 0], rtol=1e-6)
    assert back.model_version == ["baseline:seasonal_daily"] * 3


def test_contract_enforces_non_crossing_and_grid():
    q = np.sort(np.random.default_rng(7).random((2, 6, 4, 7)), axis=-1)
    ok = to_forecast_table(["a", "b"], T0, q, None, ["lstm:v1", "fallback:seasonal_daily"])
    np.testing.assert_allclose(ok["mean"].to_numpy().reshape(2, 6, 4), quantile_mean(q))
    assert from_forecast_table(ok).model_version == ["lstm:v1", "fallback:seasonal_daily"]
    crossed = q.copy()
    crossed[1, 2, 3, 4] = crossed[1, 2, 3, 3] - 0.5
    with pytest.raises(ValueError, match="crossing quantiles for user 'b': q50 > q75"):
        to_forecast_table(["a", "b"], T0, crossed, None, "v")
    fuzz = q.copy()
    fuzz[0, 0, 0, 2] = fuzz[0, 0, 0, 1] - 1e-9  # rounding noise is repaired, not an error
    fixed = from_forecast_table(to_forecast_table(["a", "b"], T0, fuzz, None, "v")).quantiles
    assert (np.diff(fixed, axis=-1) >= 0).all()
    with pytest.raises(ValueError, match="bucket grid"):
        to_forecast_table(["a", "b"], T0 + timedelta(minutes=2), q, None, "v")
    with pytest.raises(ValueError, match="non-finite"):
        to_forecast_table(["a", "b"], T0, np.where(q > 0.99, np.nan, q), None, "v")
    neg = to_forecast_table(["a", "b"], T0, q - 0.5, None, "v")
    assert min(neg[c].to_numpy().min() for c in QUANTILE_COLUMNS) == 0.0


def test_contract_carries_p_zero_inside_the_bracket_of_the_zero_quantiles():
    # user a: q05 = q10 = 0 < q25 (P(0) in [0.10, 0.25]); user b: q05 > 0 (P(0) in [0, 0.05])
    q = np.tile(np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0]), (2, 6, 4, 1))
    q[1] += 0.5
    p0 = np.full((2, 6, 4), 0.2)
    p0[1] = 0.03
    table = to_forecast_table(["a", "b"], T0, q, None, "lstm:v", p0)
    validate_forecast_table(table)
    back = from_forecast_table(table)
    np.testing.assert_allclose(back.p_zero, p0)
    # the mean: the zero segment now reaches level 0.2 instead of 0.10: (0.2 - 0.1) * q25 / 2 less;
    # with q05 > 0 the atom takes p_zero * q05 from the flat part below q05
    np.testing.assert_allclose(back.mean[0], quantile_mean(q[0]) - 0.1 * 1.0 / 2)
    np.testing.assert_allclose(back.mean[1], quantile_mean(q[1]) - 0.03 * 0.5)
    np.testing.assert_allclose(quantile_mean(q, np.array(P_ZERO_LOW)[(q <= 0).sum(-1)]), quantile_mean(q))  # the bracket's low end: no change
    bad = p0.copy()
    bad[0, 2, 1] = 0.3  # above 0.25 with only two zero quantiles
    with pytest.raises(ValueError, match=r"p_zero 0.3 for user 'a' \(15 min, cpu_cores\) lies outside \[0.1, 0.25\]"):
        to_forecast_table(["a", "b"], T0, q, None, "v", bad)
    with pytest.raises(ValueError, match="p_zero must be"):
        to_forecast_table(["a", "b"], T0, q, None, "v", p0[:, :3])
    broken = table.set_column(table.schema.get_field_index("p_zero"), "p_zero", pa.array(np.full(table.num_rows, 0.6)))
    with pytest.raises(ValueError, match="p_zero outside the bracket"):
        validate_forecast_table(broken)
    # without it (a producer that does not estimate it, or a table written before the column): null / NaN
    plain = to_forecast_table(["a", "b"], T0, q, None, "v")
    assert plain["p_zero"].null_count == plain.num_rows and np.isnan(from_forecast_table(plain).p_zero).all()
    old = plain.drop_columns(["p_zero"])
    validate_forecast_table(old)
    assert np.isnan(from_forecast_table(old).p_zero).all()


def test_contract_reader_rejects_broken_tables():
    q = np.sort(np.random.default_rng(8).random((2, 6, 4, 7)), axis=-1)
    table = pa.concat_tables([to_forecast_table(["a", "b"], T0, q, None, "v"), to_forecast_table(["a"], T0 + timedelta(minutes=5), q[:1], None, "v")])
    with pytest.raises(ValueError, match="2 issue times"):
        from_forecast_table(table)
    assert from_forecast_table(table, issued_at=T0 + timedelta(minutes=5)).user_ids == ["a"]
    with pytest.raises(ValueError, match="has 23 of 24"):
        from_forecast_table(table.slice(0, 47))
    shifted = table.set_column(3, "target_start", table["issued_at"])
    with pytest.raises(ValueError, match="target_start"):
        validate_forecast_table(shifted)
    assert HORIZONS_MIN == (5, 10, 15, 20, 25, 30)
