"""Rolling-origin backtest (models/backtest.py) and the ``warmcast backtest`` command."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from models.backtest import MODELS, REPORT_HORIZONS, BacktestConfig, backtest, evaluate_backtest, forecast_sample, lstm_forecasts
from models.features import BUCKET
from models.metrics import interval_coverage_pit, pinball_loss
from models.train import TrainConfig, predict
from pipeline.cli import main
from pipeline.schemas import DEMAND, DEMAND_RESOURCES, QUANTILE_COLUMNS

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
DAYS = 3.0
HOLDOUT_DAYS = 0.25  # 72 origins
FAST = TrainConfig(epochs=6, global_epochs=3, patience=3, chunk_steps=96, segment_steps=12, eval_chunk_steps=24,
                   eval_burn_in=24, val_days=0.5, min_history_days=1.0, progress_bar=False, checkpoint=False, accelerator="cpu")
CONFIG = BacktestConfig(holdout_days=HOLDOUT_DAYS, train=FAST, chunk_users=2, max_forecast_rows=10**7)


def pulse_demand(days: float = DAYS) -> pa.Table:
    """Three users: ``pulse`` (8 cores for 30 min every 2 h, else 0.5: the last value misses every
    edge), ``noisy`` (Poisson around a daily sine) and ``flat`` (a constant with noise)."""
    rng = np.random.default_rng(1)
    steps = int(days * 288)
    t = np.arange(steps)
    series = {
        "pulse": np.where(t % 24 < 6, 8.0, 0.5) * rng.lognormal(0, 0.05, steps),
        "noisy": rng.poisson(3 + 2 * np.sin(2 * np.pi * t / 288)).astype(float),
        "flat": 2.0 + rng.normal(0, 0.1, steps).clip(-1, 1),
    }
    users = np.repeat(list(series), steps)
    values = np.concatenate(list(series.values()))
    return pa.table({
        "user_id": pa.array(users, pa.string()),
        "ts": pa.array(np.tile(T0 + t * BUCKET, len(series)), DEMAND.field("ts").type),
        "requests": pa.array(np.round(values).astype(np.int64)),
        "cpu_cores": pa.array(values), "memory_gb": pa.array(2 * values), "gpus": pa.array(np.zeros(len(values))),
    }, schema=DEMAND)


@pytest.fixture(scope="module")
def result():
    demand = pulse_demand()
    return demand, backtest(demand, CONFIG)


def test_trains_before_the_holdout_and_scores_every_origin_of_it(result):
    demand, res = result
    end = T0 + timedelta(days=DAYS)
    n_origins = round(HOLDOUT_DAYS * 288)
    assert res.holdout_end == end and res.holdout_start == end - n_origins * BUCKET
    assert res.trained.until == res.holdout_start  # the training window stops at the holdout
    assert res.n_origins == n_origins and res.users == ["flat", "noisy", "pulse"] and res.new_users == []
    table = res.table
    assert set(table["model"]) == set(MODELS) and set(table["horizon_min"]) == set(REPORT_HORIZONS)
    assert set(table["resource"]) == set(DEMAND_RESOURCES) and len(table) == len(MODELS) * 3 * 4
    for minutes in REPORT_HORIZONS:  # every origin whose target lies before the end; same points for every model
        n = table[table["horizon_min"] == minutes]["n"]
        assert (n == 3 * (n_origins - (minutes // 5 - 1))).all()
    assert table["pinball"].notna().all() and table["coverage90"].between(0, 1).all()
    # gpus are always 0 and the last value forecasts 0 at every level: inclusively always covered,
    # tie-aware the PIT is uniform on [0, 1] and the intervals hold their nominal 0.8 / 0.9.
    gpus = table[(table["model"] == "last_value") & (table["resource"] == "gpus")]
    assert (gpus["coverage90"] == 1.0).all() and (gpus["coverage80"] == 1.0).all()
    np.testing.assert_allclose(gpus[["coverage80_pit", "coverage90_pit"]], np.tile([0.8, 0.9], (3, 1)))


def test_forecasts_file_rows_reproduce_the_table(result):
    _, res = result
    fc = res.forecasts.to_pandas()
    assert set(fc["model"]) == set(MODELS) and res.forecast_users == res.users
    assert len(fc) == len(MODELS) * 3 * res.n_origins * 6 * 4
    assert (fc["target_start"] == fc["issued_at"] + pd.to_timedelta(fc["horizon_min"].astype("int64") - 5, unit="min")).all()
    scored = fc[fc["actual"].notna()]
    for (model, minutes, resource), g in scored.groupby(["model", "horizon_min", "resource"]):
        if minutes not in REPORT_HORIZONS:
            continue
        row = res.table[(res.table["model"] == model) & (res.table["horizon_min"] == minutes) & (res.table["resource"] == resource)].iloc[0]
        loss = pinball_loss(g["actual"].to_numpy(), g[list(QUANTILE_COLUMNS)].to_numpy())
        assert len(g) == row["n"]
        assert loss.mean() == pytest.approx(row["pinball"], rel=1e-4, abs=1e-6)
        inside = (g["q05"] <= g["actual"]) & (g["actual"] <= g["q95"])
        assert inside.mean() == pytest.approx(row["coverage90"])
        q = g[list(QUANTILE_COLUMNS)].to_numpy()
        p0 = g["p_zero"].to_numpy(dtype=float, na_value=np.nan)  # the LSTMs' P(demand = 0); null for the baselines
        assert np.isfinite(p0).all() == (model in ("lstm", "global")) and np.isfinite(p0).any() == (model in ("lstm", "global"))
        assert interval_coverage_pit(g["actual"].to_numpy(), q, 0.05, 0.95, p_zero=p0) == pytest.approx(row["coverage90_pit"], abs=1e-6)
        assert interval_coverage_pit(g["actual"].to_numpy(), q, 0.10, 0.90, p_zero=p0) == pytest.approx(row["coverage80_pit"], abs=1e-6)
        assert (g["actual"] < g["q25"]).mean() == pytest.approx(row["below_q25"])
        assert (g["actual"] <= g["q25"]).mean() == pytest.approx(row["at_or_below_q25"])


def test_actuals_and_last_value_line_up_with_the_demand(result):
    demand, res = result
    fc = res.forecasts.to_pandas()
    d = demand.to_pandas().set_index(["user_id", "ts"])["cpu_cores"]
    rows = fc[(fc["model"] == "last_value") & (fc["resource"] == "cpu_cores") & (fc["user_id"] == "pulse")]
    for issued in rows["issued_at"].unique()[:5]:
        r = rows[rows["issued_at"] == issued].set_index("horizon_min")
        for h in (5, 30):
            assert r.loc[h, "actual"] == pytest.approx(d[("pulse", issued + pd.Timedelta(minutes=h - 5))])
        assert r.loc[5, "mean"] == pytest.approx(d[("pulse", issued - pd.Timedelta(minutes=5))])  # the last bucket seen


def test_lstm_beats_the_last_value_on_the_seasonal_user_at_30_minutes(result):
    _, res = result
    fc = res.forecasts.to_pandas()
    g = fc[(fc["user_id"] == "pulse") & (fc["horizon_min"] == 30) & (fc["resource"] == "cpu_cores") & fc["actual"].notna()]
    loss = {m: pinball_loss(x["actual"].to_numpy(), x[list(QUANTILE_COLUMNS)].to_numpy()).mean() for m, x in g.groupby("model")}
    assert loss["lstm"] < 0.8 * loss["last_value"]


def test_changing_data_after_an_origin_never_changes_its_forecast(result):
    demand, res = result
    cut = res.holdout_start + 30 * BUCKET  # origins issued at or before `cut` know only buckets before it
    ts_type = demand.schema.field("ts").type
    later = pc.greater_equal(demand["ts"], pa.scalar(cut, ts_type)).to_numpy(zero_copy_only=False)
    changed = demand
    for col in ("requests", "cpu_cores", "memory_gb"):
        arr = demand[col].to_numpy()
        changed = changed.set_column(changed.schema.get_field_index(col), col, pa.array(np.where(later, arr * 3 + 5, arr).astype(arr.dtype)))
    again = evaluate_backtest(res.trained, changed, res.holdout_start, res.holdout_end, CONFIG)
    q = list(QUANTILE_COLUMNS) + ["mean"]
    a, b = (r.forecasts.to_pandas() for r in (res, again))
    early = a["issued_at"] <= cut
    assert len(a) == len(b) and early.sum() > 0
    np.testing.assert_array_equal(a.loc[early, q].to_numpy(), b.loc[early, q].to_numpy())
    for model in ("lstm", "global", "last_value", "moving_average"):  # they read the changed data from the next origin on
        m = (a["model"] == model) & (a["issued_at"] == cut + BUCKET)
        assert not np.array_equal(a.loc[m, q].to_numpy(), b.loc[m, q].to_numpy()), model


def test_one_origin_chunks_reproduce_predict_exactly(result):
    demand, res = result
    assert (res.trained.model.cal_spread != 1).any()  # the recalibration is fitted, so both paths must apply it
    trained = dataclasses.replace(res.trained, config=dataclasses.replace(res.trained.config, eval_chunk_steps=1))
    lstm = lstm_forecasts(trained, demand, res.holdout_start, res.holdout_end)["lstm"]
    for k in (0, 17, res.n_origins - 1):
        fc = predict(trained, demand, res.holdout_start + k * BUCKET)
        rows = [fc.user_ids.index(u) for u in trained.user_ids]
        np.testing.assert_allclose(lstm[:, k], fc.quantiles[rows], rtol=1e-4, atol=1e-5)


def test_forecast_sample_stays_within_its_budget():
    keep, stride = forecast_sample(1000, 864, 6, 1_000_000)
    assert stride == 1 and 1 <= len(keep) and len(keep) * 864 * 24 * 6 <= 1_000_000 and keep[0] == 0
    keep, stride = forecast_sample(10, 100_000, 6, 1_000_000)  # one user is too many: thin its origins
    assert len(keep) == 1 and -(-100_000 // stride) * 24 * 6 <= 1_000_000
    assert len(forecast_sample(10, 10, 6, 0)[0]) == 0


def test_bad_input_is_refused_with_a_clear_error(result):
    demand, res = result
    with pytest.raises(ValueError, match="empty"):
        backtest(DEMAND.empty_table(), CONFIG)
    with pytest.raises(ValueError, match="holdout of 2.8 day"):  # 0.2 days left, training needs 1.5
        backtest(demand, dataclasses.replace(CONFIG, holdout_days=2.8))
    with pytest.raises(ValueError, match="holdout of 5 day"):
        backtest(demand, dataclasses.replace(CONFIG, holdout_days=5))
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="holdout_days"):
            BacktestConfig(holdout_days=bad)
    with pytest.raises(ValueError, match="seen the test window"):
        evaluate_backtest(res.trained, demand, res.holdout_start - BUCKET, res.holdout_end, CONFIG)


START = "2026-11-02T00:00:00Z"


def test_cli_backtest_writes_metrics_and_forecasts(tmp_path, capsys, monkeypatch):
    for key in ("WARMCAST_CONFIG", "WARMCAST_LAKE", "WARMCAST_LANDING"):
        monkeypatch.delenv(key, raising=False)
    landing, lake, out = tmp_path / "landing", tmp_path / "lake", tmp_path / "bt"
    empty = ["backtest", "--lake", str(tmp_path / "empty"), "--holdout-days", "0.25", "--out", str(out)]
    assert main(empty) == 2
    assert "no request logs" in capsys.readouterr().err and not out.exists()

    assert main(["generate", "--users", "4", "--days", "1.5", "--start", START, "--out", str(landing), "--seed", "5"]) == 0
    ingest = ["ingest", "--landing", str(landing), "--lake", str(lake), "--start", START, "--end", "2026-11-03T12:00:00Z", "--run-hours", "36"]
    assert main(ingest) == 0
    capsys.readouterr()
    common = ["backtest", "--lake", str(lake), "--out", str(out), "--epochs", "1", "--global-epochs", "1", "--val-days", "0.25",
              "--min-history-days", "0.5"]
    assert main([*common, "--holdout-days", "3"]) == 2
    assert "holdout of 3 day(s) leaves 0.00 day(s) of the demand's 1.50" in capsys.readouterr().err
    assert main([*common, "--holdout-days", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "lstm vs the best baseline" in text and "seasonal_daily" in text and "30 min" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) == set(MODELS)
    assert set(metrics["metrics"]["lstm"]) == {"5", "15", "30"}
    cell = metrics["metrics"]["lstm"]["30"]["cpu_cores"]
    assert cell["n"] > 0 and cell["pinball"] >= 0 and 0 <= cell["coverage90"] <= 1
    assert 0 <= cell["coverage90_pit"] <= 1 and 0 <= cell["coverage80_pit"] <= 1
    level = cell["calibration"]["q90"]
    assert level["level"] == 0.9 and 0 <= level["below"] <= level["pit"] <= level["at_or_below"] <= 1
    assert "coverage90_pit" in metrics["definitions"] and "calibration" in metrics["definitions"]
    assert metrics["holdout"]["origins"] == 72 and metrics["holdout"]["end"] == "2026-11-03T12:00:00+00:00"
    assert len(metrics["lstm_vs_best_baseline"]) == 12
    forecasts = pq.read_table(out / "forecasts.parquet")
    assert set(forecasts["model"].to_pylist()) == set(MODELS) and forecasts.num_rows == metrics["forecasts"]["rows"]
    assert (out / "table.txt").read_text().strip() in text
    assert metrics["train"]["config"]["calibration_floor"] is True
    assert main([*common, "--holdout-days", "0.25", "--no-calibration-floor"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["config"]["calibration_floor"] is False


def test_backtest_lake_counts_a_long_request_in_every_bucket_it_runs(tmp_path, monkeypatch):
    """The lake's demand for a backtest is read in one streamed pass from its first hour: a request
    running 14 h counts 4 cores in each of its buckets. (Until 2026-12-06 the demand was built 6 h
    at a time, each piece reading 6 h back, so such a request vanished from a piece that started more
    than 6 h after it: 4 → 0 cores from 12:00 to 14:01.)"""
    import models.backtest as bt
    from pipeline.config import load_settings
    from pipeline.generate import make_request_table
    from pipeline.ingest import ingest_interval
    from pipeline.landing import write_landing
    from pipeline.storage import open_location

    start = datetime(2026, 11, 2, tzinfo=timezone.utc)
    rows = [{"user_id": "batch", "ts": start + timedelta(minutes=1), "duration_s": 14 * 3600.0, "cpu_cores": 4.0},
            {"user_id": "batch", "ts": start + timedelta(hours=17, minutes=58), "cpu_cores": 1.0}]  # the lake spans 18 h
    rows += [{"user_id": "short", "ts": start + timedelta(hours=h, minutes=30)} for h in range(0, 18, 2)]  # typical 1 s ones
    write_landing(open_location(str(tmp_path / "landing")), make_request_table(rows), "a")
    ingest_interval(load_settings(overrides={"lake": str(tmp_path / "lake"), "landing": str(tmp_path / "landing")}, environ={}),
                    start, start + timedelta(hours=18))
    seen = {}
    monkeypatch.setattr(bt, "backtest", lambda demand, config, until=None: seen.setdefault("demand", demand))
    bt.backtest_lake(open_location(str(tmp_path / "lake")), CONFIG)
    d = seen["demand"].filter(pc.equal(seen["demand"]["user_id"], "batch"))
    cores = dict(zip(d["ts"].to_pylist(), d["cpu_cores"].to_pylist()))
    running = [start + k * BUCKET for k in range(1, 168)]  # every whole bucket of the 14 hours
    assert [cores[t] for t in running] == pytest.approx([4.0] * len(running))
    assert cores[start] == pytest.approx(4.0 * 240 / 300)  # it started a minute into the first bucket
    assert cores[start + timedelta(hours=14)] == pytest.approx(4.0 * 60 / 300)  # and ran a minute into the 169th
