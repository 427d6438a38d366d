"""Metrics on hand-computed examples, and the backtest table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.metrics import (
    TABLE_COLUMNS,
    backtest_table,
    compare_to_best,
    forecast_targets,
    format_backtest_table,
    interval_coverage,
    metrics_json,
    pinball_loss,
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
    np.testing.assert_allclose(chunked[["pinball", "coverage80", "coverage90"]], whole[["pinball", "coverage80", "coverage90"]])
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
    text = format_backtest_table(table)
    assert "*lstm" in text and "last_value" in text and "30 min" in text
    assert text.count("*lstm") == 24  # best in each of the 6 x 4 groups
    assert text.index("requests") < text.index("cpu_cores") < text.index("gpus")
