"""Metrics on hand-computed examples, and the backtest table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.metrics import (
    CALIBRATION_COLUMNS,
    TABLE_COLUMNS,
    backtest_table,
    calibration_bracket,
    compare_to_best,
    forecast_targets,
    format_backtest_table,
    interval_coverage,
    interval_coverage_pit,
    metrics_json,
    pinball_loss,
    pit_interval,
    score_forecast,
)
from pipeline.schemas import DEMAND_RESOURCES

Q = np.array([8.0, 9.0, 9.5, 10.0, 11.0, 12.0, 13.0])


def test_pinball_loss_by_hand():
    # y = 10: 0.05*2 + 0.1*1 + 0.25*0.5 + 0 + 0.25*1 + 0.1*2 + 0.05*3 = 0.925, over 7 levels
    assert pinball_loss(np.array(10.0), Q) == pytest.approx(0.925 / 7)
    # y = 14, above every quantile: sum tau * (14 - q)
    expected = (0.05 * 6 + 0.1 * 5 + 0.25 * 4.5 + 0.5 * 4 + 0.75 * 3 + 0.9 * 2 + 0.95 * 1) / 7
    assert pinball_loss(np.array([14.0]), Q[None])[0] == pytest.approx(expected)
    # A point forecast (all quantiles equal) scores half the absolute error on average.
    assert pinball_loss(np.array(3.0), np.full(7, 5.0)) == pytest.approx(2.0 * np.mean([1 - t for t in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)]))
    assert np.isnan(pinball_loss(np.array(np.nan), Q))
    with pytest.raises(ValueError):
        pinball_loss(np.zeros(3), np.zeros((3, 5)))


def test_interval_coverage_is_inclusive_and_skips_missing():
    y = np.array([0.0, 1.0, 2.0, 5.0, np.nan])
    lower = np.array([0.0, 1.5, 0.0, 0.0, 0.0])
    upper = np.array([1.0, 3.0, 2.0, 4.0, 9.0])
    assert interval_coverage(y, lower, upper) == pytest.approx(2 / 4)  # 0 in [0,1], 2 in [0,2]
    assert np.isnan(interval_coverage(np.array([np.nan]), np.zeros(1), np.ones(1)))


def test_pit_interval_by_hand():
    # Q = 8, 9, 9.5, 10, 11, 12, 13 at 0.05 … 0.95: linear between knots, flat beyond them.
    for y, expected in [(7.0, (0.0, 0.0)), (8.5, (0.075, 0.075)), (9.75, (0.375, 0.375)), (10.0, (0.5, 0.5)),
                        (12.5, (0.925, 0.925)), (14.0, (1.0, 1.0)),
                        (8.0, (0.0, 0.05)), (13.0, (0.95, 1.0))]:  # a tie with an outer knot: its tail's mass
        np.testing.assert_allclose(pit_interval(np.array(y), Q), expected, err_msg=str(y))
    np.testing.assert_allclose(pit_interval(np.array(0.0), np.zeros(7)), (0.0, 1.0))  # all mass at 0
    np.testing.assert_allclose(pit_interval(np.array(0.0), np.array([0, 0, 0, 1, 2, 3, 4.0])), (0.0, 0.25))
    np.testing.assert_allclose(pit_interval(np.array(5.0), np.array([1, 2, 3, 4, 5, 5, 5.0])), (0.75, 1.0))
    np.testing.assert_allclose(pit_interval(np.array(3.0), np.array([1, 2, 3, 3, 4, 5, 6.0])), (0.25, 0.5))
    np.testing.assert_allclose(pit_interval(np.array(10.0), Q[::-1]), (0.5, 0.5))  # crossing quantiles are sorted
    assert np.isnan(pit_interval(np.array(np.nan), Q)).all()


def test_p_zero_resolves_the_mass_at_zero_and_changes_nothing_else():
    q1 = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # only q05 = 0: P(0) in [0.05, 0.10]
    # the knots alone say P(0) = 0.05: an actual 0 is below the 90 % interval for sure
    np.testing.assert_allclose(pit_interval(np.array(0.0), q1), (0.0, 0.05))
    assert interval_coverage_pit(np.array([0.0]), q1[None], 0.05, 0.95) == 0.0
    # with p_zero = 0.08 the PIT is uniform on [0, 0.08]: covered (0.08 - 0.05) / 0.08 of the time
    np.testing.assert_allclose(pit_interval(np.array(0.0), q1, p_zero=np.array(0.08)), (0.0, 0.08))
    assert interval_coverage_pit(np.array([0.0]), q1[None], 0.05, 0.95, p_zero=np.array([0.08])) == pytest.approx(0.375)
    q3 = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0])  # P(0) in [0.25, 0.5]
    assert interval_coverage_pit(np.array([0.0]), q3[None], 0.10, 0.90, p_zero=np.array([0.4])) == pytest.approx(0.75)
    # NaN (not given), positive actuals, and a forecast with q05 > 0: as without
    y = np.array([0.0, 0.5, 2.5, 0.0])
    q = np.stack([q1, q1, q3, q1 + 1.0])
    p0 = np.array([np.nan, 0.08, 0.4, 0.02])
    lo, hi = pit_interval(y, q, p_zero=p0)
    lo0, hi0 = pit_interval(y, q)
    np.testing.assert_allclose(np.stack([lo, hi]), np.stack([lo0, hi0]))
    # score_forecast applies it point by point, as interval_coverage_pit does
    rng = np.random.default_rng(3)
    yy = np.where(rng.random((3, 4, 6, 4)) < 0.5, 0.0, rng.random((3, 4, 6, 4)) * 4)
    qq = np.sort(np.maximum(rng.normal(1.0, 2.0, (3, 4, 6, 4, 7)), 0.0), axis=-1)
    m = (qq <= 0).sum(-1)
    low, high = np.array([0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]), np.array([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0])
    pz = low[m] + rng.random(m.shape) * (high[m] - low[m])
    table = backtest_table({"m": score_forecast(qq, yy, p_zero=pz)})
    for h, hm in enumerate((5, 10, 15, 20, 25, 30)):
        for r, res in enumerate(DEMAND_RESOURCES):
            row = table[(table["horizon_min"] == hm) & (table["resource"] == res)].iloc[0]
            expect = interval_coverage_pit(yy[:, :, h, r].ravel(), qq[:, :, h, r].reshape(-1, 7), 0.05, 0.95, p_zero=pz[:, :, h, r].ravel())
            assert row["coverage90_pit"] == pytest.approx(expect)
    assert (table["coverage90_pit"] > backtest_table({"m": qq}, yy)["coverage90_pit"]).any()


def test_tie_aware_coverage_equals_the_inclusive_one_without_ties():
    rng = np.random.default_rng(3)
    y = rng.gamma(2.0, 3.0, (6, 5, 6, 4))
    q = np.sort(rng.gamma(2.0, 3.0, (*y.shape, 7)), axis=-1)
    assert not (q == y[..., None]).any()
    for lo, hi, i, j in ((0.05, 0.95, 0, 6), (0.10, 0.90, 1, 5)):
        inclusive = interval_coverage(y, q[..., i], q[..., j])
        assert 0.2 < inclusive < 0.8
        assert interval_coverage_pit(y, q, lo, hi) == pytest.approx(inclusive, abs=1e-12)
    table = backtest_table({"m": q.astype(np.float32)}, y.astype(np.float32))
    np.testing.assert_array_equal(table["coverage80_pit"], table["coverage80"])
    np.testing.assert_array_equal(table["coverage90_pit"], table["coverage90"])
    for col in ("q05", "q50", "q95"):  # no ties: y < q and y <= q agree, and so does the PIT share
        np.testing.assert_array_equal(table[f"below_{col}"], table[f"at_or_below_{col}"])
        np.testing.assert_allclose(table[f"pit_{col}"], table[f"below_{col}"])


def test_all_zero_actuals_under_all_zero_quantiles():
    y = np.zeros((3, 2, 6, 4))
    q = np.zeros((*y.shape, 7))
    # PIT uniform on [0, 1]: the 90 % interval [0.05, 0.95] holds 0.9 of it, the 80 % one 0.8.
    assert interval_coverage(y, q[..., 0], q[..., 6]) == 1.0
    assert interval_coverage_pit(y, q, 0.05, 0.95) == pytest.approx(0.9)
    assert interval_coverage_pit(y, q, 0.10, 0.90) == pytest.approx(0.8)
    table = backtest_table({"zero": q}, y)
    assert (table["coverage80"] == 1.0).all() and (table["coverage90"] == 1.0).all()
    np.testing.assert_allclose(table["coverage80_pit"], 0.8)
    np.testing.assert_allclose(table["coverage90_pit"], 0.9)
    for col, tau in zip(("q05", "q10", "q25", "q50", "q75", "q90", "q95"), (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)):
        assert (table[f"below_{col}"] == 0.0).all() and (table[f"at_or_below_{col}"] == 1.0).all()
        np.testing.assert_allclose(table[f"pit_{col}"], tau)


# The mixed case: five forecasts and actuals, by hand.
#   y    quantiles (q05 … q95)    PIT         90 %: incl / tie-aware     80 %: incl / tie-aware
#   0    0 0 0 1 2 3 4            [0, 0.25]   1 / (0.25-0.05)/0.25 = .8  1 / (0.25-0.10)/0.25 = .6
#   0    0 1 2 3 4 5 6            [0, 0.05]   1 / 0                      0 / 0
#   2.5  0 1 2 3 4 5 6            0.375       1 / 1                      1 / 1
#   5    1 2 3 4 5 5 5            [0.75, 1]   1 / (0.95-0.75)/0.25 = .8  1 / (0.90-0.75)/0.25 = .6
#   7    0 1 2 3 4 5 6            1           0 / 0                      0 / 0
MIXED_Y = np.array([0.0, 0.0, 2.5, 5.0, 7.0])
MIXED_Q = np.array([[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 5, 5], [0, 1, 2, 3, 4, 5, 6.0]])


def test_mixed_ties_by_hand():
    assert interval_coverage(MIXED_Y, MIXED_Q[:, 0], MIXED_Q[:, 6]) == pytest.approx(4 / 5)
    assert interval_coverage(MIXED_Y, MIXED_Q[:, 1], MIXED_Q[:, 5]) == pytest.approx(3 / 5)
    assert interval_coverage_pit(MIXED_Y, MIXED_Q, 0.05, 0.95) == pytest.approx((0.8 + 0 + 1 + 0.8 + 0) / 5)
    assert interval_coverage_pit(MIXED_Y, MIXED_Q, 0.10, 0.90) == pytest.approx((0.6 + 0 + 1 + 0.6 + 0) / 5)
    assert interval_coverage_pit(np.append(MIXED_Y, np.nan), np.vstack([MIXED_Q, MIXED_Q[:1]]), 0.05, 0.95) == pytest.approx(2.6 / 5)
    # The same through the backtest table (five users, float32); per-level shares at q25 and q50:
    #   q25 = 0, 2, 2, 3, 2:  y < q: -, x, -, -, -  (1/5)   y <= q: x, x, -, -, -  (2/5)
    #                         P(PIT <= 0.25): 0.25/0.25 = 1, 1, 0 (0.375), 0 (>= 0.75), 0  (2/5)
    #   q50 = 1, 3, 3, 4, 3:  y < q: x, x, x, -, -  (3/5) = y <= q = P(PIT <= 0.5)
    y = np.broadcast_to(MIXED_Y[:, None, None, None], (5, 1, 6, 4)).copy()
    q = np.broadcast_to(MIXED_Q[:, None, None, None, :], (5, 1, 6, 4, 7)).copy()
    table = backtest_table({"m": q}, y)
    np.testing.assert_allclose(table["coverage90"], 0.8)
    np.testing.assert_allclose(table["coverage80"], 0.6)
    np.testing.assert_allclose(table["coverage90_pit"], 2.6 / 5)
    np.testing.assert_allclose(table["coverage80_pit"], 2.2 / 5)
    np.testing.assert_allclose(table[["below_q25", "at_or_below_q25", "pit_q25"]], np.tile([0.2, 0.4, 0.4], (24, 1)))
    np.testing.assert_allclose(table[["below_q50", "at_or_below_q50", "pit_q50"]], np.tile([0.6, 0.6, 0.6], (24, 1)))
    blob = json.loads(json.dumps(metrics_json(table)))["m"]["15"]["memory_gb"]
    assert blob["coverage90_pit"] == pytest.approx(0.52) and blob["coverage90"] == pytest.approx(0.8)
    assert blob["calibration"]["q25"] == pytest.approx({"level": 0.25, "below": 0.2, "at_or_below": 0.4, "pit": 0.4})
    assert list(blob["calibration"]) == ["q05", "q10", "q25", "q50", "q75", "q90", "q95"]


def test_forecast_targets_index_the_right_buckets():
    values = np.arange(10, dtype=np.float32)[None, :, None].repeat(4, axis=2)
    y = forecast_targets(values, np.array([0, 3, 7]))
    np.testing.assert_array_equal(y[0, 0, :, 0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(y[0, 1, :, 2], [3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(y[0, 2, :3, 1], [7, 8, 9])
    assert np.isnan(y[0, 2, 3:]).all()  # past the end of the series


def test_backtest_table_by_hand():
    y = np.full((2, 3, 6, 4), 10.0)
    exact = np.repeat(y[..., None], 7, axis=-1)
    wide = np.broadcast_to(Q, (*y.shape, 7)).copy()
    biased = exact + 5.0  # every quantile 5 above: loss = mean(1 - tau) * 5, never covered
    table = backtest_table({"exact": exact, "wide": wide, "biased": biased}, y)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert len(table) == 3 * 6 * 4
    by = table.set_index(["model", "horizon_min", "resource"])
    assert by.loc[("exact", 5, "cpu_cores"), "pinball"] == 0.0
    assert by.loc[("wide", 30, "gpus"), "pinball"] == pytest.approx(0.925 / 7)
    assert by.loc[("biased", 15, "requests"), "pinball"] == pytest.approx(5.0 * 0.5)
    assert by.loc[("exact", 5, "cpu_cores"), "coverage90"] == 1.0
    assert by.loc[("biased", 5, "cpu_cores"), "coverage80"] == 0.0
    assert (table["n"] == 2 * 3).all()
    bracket = calibration_bracket(table).set_index("model")
    assert (bracket["cells"] == 6 * 4 * 7).all()
    # exact: y == every quantile, so share(y < q) = 0 <= level <= 1 = share(y <= q) everywhere
    assert bracket.loc["exact", "inside"] == 168 and bracket.loc["exact", "worst_miss"] == 0 and bracket.loc["exact", "worst_cell"] == ""
    # wide: only q50 (= y) brackets its level; q25 = 9.5 < y misses by 0.25, as does q75 = 11 > y
    assert bracket.loc["wide", "inside"] == 24
    assert bracket.loc["wide", "worst_miss"] == pytest.approx(0.25) and bracket.loc["wide", "worst_cell"] == "5 min requests q25"
    # biased: every quantile above y, share(y < q) = 1: q05 misses by 0.95
    assert bracket.loc["biased", "inside"] == 0 and bracket.loc["biased", "worst_miss"] == pytest.approx(0.95)


def test_backtest_table_scores_every_model_on_the_same_points():
    rng = np.random.default_rng(0)
    y = rng.random((3, 4, 6, 4)) * 10
    y[0, 0, 0, 0] = np.nan  # missing actual
    a = np.sort(rng.random((3, 4, 6, 4, 7)) * 10, axis=-1)
    b = a.copy()
    b[1, 1, 0, 0, :] = np.nan  # a model without a forecast there
    table = backtest_table({"a": a, "b": b}, y, horizons_min=(5, 30))
    assert sorted(set(table["horizon_min"])) == [5, 30]
    cell = table[(table["horizon_min"] == 5) & (table["resource"] == "requests")]
    assert cell["n"].tolist() == [10, 10]  # 12 points minus one missing actual and one missing forecast
    assert cell["pinball"].iloc[0] == pytest.approx(cell["pinball"].iloc[1])
    with pytest.raises(ValueError, match="do not match"):
        backtest_table({"a": a[:, :2]}, y)


def test_scores_of_user_chunks_add_up_to_the_whole():
    rng = np.random.default_rng(1)
    y = rng.random((10, 5, 6, 4)) * 10
    q = np.sort(rng.random((10, 5, 6, 4, 7)) * 10, axis=-1)
    whole = backtest_table({"m": q}, y)
    parts = score_forecast(q[:4], y[:4]) + score_forecast(q[4:], y[4:])
    chunked = backtest_table({"m": parts})
    cols = ["pinball", "coverage80", "coverage90", "coverage80_pit", "coverage90_pit", *CALIBRATION_COLUMNS]
    np.testing.assert_allclose(chunked[cols], whole[cols])
    np.testing.assert_allclose(backtest_table({"m": score_forecast(q, y, chunk_users=3)})[cols], whole[cols])
    assert (chunked["n"] == 50).all()
    with pytest.raises(ValueError, match="targets are needed"):
        backtest_table({"m": q})


def test_compare_json_and_printer():
    y = np.full((1, 2, 6, 4), 10.0)
    exact = np.repeat(y[..., None], 7, axis=-1)
    wide = np.broadcast_to(Q, (*y.shape, 7)).copy()
    table = backtest_table({"lstm": exact + 0.1, "last_value": wide, "seasonal_daily": exact + 3.0}, y)
    cmp = compare_to_best(table, "lstm", ["last_value", "seasonal_daily"])
    assert len(cmp) == 24
    assert (cmp["best_reference"] == "last_value").all()
    lstm_loss = 0.1 * np.mean([1 - t for t in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)])  # = 0.05
    assert cmp["improvement"].iloc[0] == pytest.approx(1 - lstm_loss / (0.925 / 7))
    blob = json.loads(json.dumps(metrics_json(table)))
    assert blob["last_value"]["5"]["cpu_cores"]["pinball"] == pytest.approx(0.925 / 7)
    assert set(blob["lstm"]["30"]) == set(DEMAND_RESOURCES)
    assert blob["last_value"]["5"]["cpu_cores"]["coverage90_pit"] == 1.0
    assert blob["last_value"]["5"]["cpu_cores"]["calibration"]["q50"] == {"level": 0.5, "below": 0.0, "at_or_below": 1.0, "pit": 1.0}
    text = format_backtest_table(table)
    assert "pit80" in text and "pit90" in text and max(map(len, text.splitlines())) <= 110
    assert "*lstm" in text and "last_value" in text and "30 min" in text
    assert text.count("*lstm") == 24  # best in each of the 6 x 4 groups
    assert text.index("requests") < text.index("cpu_cores") < text.index("gpus")
