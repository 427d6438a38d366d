"""A trained version survives the model store: the loaded models forecast exactly as the trained ones."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from models.persist import load_trained, save_trained
from models.train import TrainConfig, predict, train
from pipeline.demand import build_demand_series, demand_from_lake
from pipeline.generate import generate_requests
from pipeline.storage import open_location

START = datetime(2026, 11, 2, tzinfo=timezone.utc)


def test_save_load_round_trip_forecasts_identically(tmp_path):
    requests = pa.concat_tables(list(generate_requests(users=5, days=3.0, start=START, seed=4)))
    demand = build_demand_series(requests)
    until = START + timedelta(days=3)
    trained = train(demand, since=START, until=until, config=TrainConfig(epochs=1, global_epochs=1))
    lake = open_location(str(tmp_path / "lake"))
    assert load_trained(lake) is None
    version = save_trained(lake, trained)
    loaded_version, loaded = load_trained(lake)
    assert loaded_version == version and loaded.user_ids == trained.user_ids
    assert (loaded.since, loaded.until) == (trained.since, trained.until)
    assert np.array_equal(loaded.uses_global, trained.uses_global)
    at = until - timedelta(hours=2)
    a, b = predict(trained, demand, at), predict(loaded, demand, at)
    assert a.user_ids == b.user_ids
    np.testing.assert_array_equal(a.quantiles, b.quantiles)


def test_a_version_trained_with_the_older_18_inputs_still_forecasts():
    """Versions published before the inputs 18-21 existed keep forecasting (from the first 18),
    as a current model that ignores those inputs would."""
    import dataclasses

    import torch

    from models.module import StackedLSTM

    requests = pa.concat_tables(list(generate_requests(users=3, days=3.0, start=START, seed=2)))
    demand = build_demand_series(requests)
    until = START + timedelta(days=3)
    trained = train(demand, since=START, until=until, config=TrainConfig(epochs=1, global_epochs=1))

    def current_and_old(model: StackedLSTM) -> tuple[StackedLSTM, StackedLSTM]:
        weights = {k: v.detach().clone() for k, v in model.get_all().items()}
        weights["w_in"][:, 18:] = 0.0  # a current model that ignores the new inputs
        return StackedLSTM.from_weights(weights), StackedLSTM.from_weights(dict(weights, w_in=weights["w_in"][:, :18]))

    (mine, mine_old), (glob, glob_old) = current_and_old(trained.model), current_and_old(trained.global_model)
    new = dataclasses.replace(trained, model=mine, global_model=glob)
    old = dataclasses.replace(trained, model=mine_old, global_model=glob_old)
    assert old.model.n_inputs == 18 and torch.count_nonzero(new.model.w_in[:, 18:]) == 0
    at = until - timedelta(hours=1)
    np.testing.assert_allclose(predict(old, demand, at).quantiles, predict(new, demand, at).quantiles, rtol=1e-5, atol=1e-6)


def _lake_with_requests(tmp_path, users: int, days: float, seed: int = 4):
    """Generated requests written straight into the lake's hour partitions (as ingest would)."""
    lake = tmp_path / "lake"
    for i, hour in enumerate(generate_requests(users=users, days=days, start=START, seed=seed)):
        t = START + timedelta(hours=i)
        path = lake / "request_logs" / f"date={t:%Y-%m-%d}" / f"hour={t:%H}" / "part.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(hour, path)
    return open_location(str(lake))


def test_shard_users_bounds_the_number_of_shards():
    from models.persist import shard_users

    users = [f"u{i:03d}" for i in range(10)]
    assert shard_users(users, 4, 10) == [users[0:4], users[4:8], users[8:10]]
    assert [len(s) for s in shard_users(users, 1, 3)] == [4, 4, 2]  # 10 tasks wanted, 3 allowed
    assert shard_users(list(reversed(users)) + users[:2], 100, 1) == [users]  # sorted, deduplicated
    assert shard_users([], 4, 10) == []


def test_sharded_training_publishes_one_version_that_forecasts_like_any_other(tmp_path):
    from models.persist import FORECAST_CONTEXT, forecast_users, plan_forecast, plan_training, publish_training, train_shard
    from models.store import ModelStore

    lake = _lake_with_requests(tmp_path, users=5, days=3.0)
    until = START + timedelta(days=3)
    config = TrainConfig(epochs=1, global_epochs=1)
    planned = plan_training(lake, until, 3.0, config, shard_size=2, max_shards=8)
    assert [len(s["users"]) for s in planned] == [2, 2, 1] and len({s["version"] for s in planned}) == 1
    results = [train_shard(lake, s, config) for s in planned]
    assert ModelStore(lake, "users").versions() == []  # nothing visible before publish
    with pytest.raises(ValueError, match="a shard is missing"):
        publish_training(lake, planned, results[:2], config)
    out = publish_training(lake, planned, results, config)
    assert out["n_users"] == 5 and out["n_shards"] == 3
    version, trained = load_trained(lake)
    assert version == out["version"] and sorted(trained.user_ids) == sorted(u for s in planned for u in s["users"])
    at = until + timedelta(minutes=30)
    shards = plan_forecast(lake, at, shard_size=3, max_shards=8)
    assert {s["version"] for s in shards} == {version} and [len(s["users"]) for s in shards] == [3, 2]
    table = forecast_users(lake, at, shards[1]["users"], version)
    assert sorted(set(table["user_id"].to_pylist())) == shards[1]["users"]
    assert all(v.startswith(f"lstm:{version}") for v in table["model_version"].to_pylist())
    # sharded forecasts are those of the whole population, user by user
    whole = predict(trained, demand_from_lake(lake, at - FORECAST_CONTEXT, at), at)
    user = shards[1]["users"][0]
    np.testing.assert_allclose(table.filter(pc.equal(table["user_id"], user))["q50"].to_numpy(),
                               whole.quantiles[whole.user_ids.index(user), :, :, 3].reshape(-1), rtol=1e-5, atol=1e-6)


def test_without_a_version_the_baseline_forecasts_only_from_the_past(tmp_path):
    from models.persist import forecast_users

    lake = _lake_with_requests(tmp_path, users=3, days=2.0)
    at = START + timedelta(days=1, hours=3)
    users = ["user-0000", "user-0001"]
    table = forecast_users(lake, at, users, None, fallback="seasonal_daily")
    assert table.num_rows == 2 * 6 * 4 and set(table["model_version"].to_pylist()) == {"fallback:baseline:seasonal_daily"}
    # the same issue from a lake cut at ``at`` is identical: nothing after ``at`` was read
    cut = tmp_path / "cut"
    shutil.copytree(lake.root, cut)
    for p in (cut / "request_logs").rglob("*.parquet"):
        t = pq.read_table(p)
        pq.write_table(t.filter(pc.less(t["ts"], pa.scalar(at, t.schema.field("ts").type))), p)
    assert forecast_users(open_location(str(cut)), at, users, None, fallback="seasonal_daily").equals(table)


def test_a_forecast_reads_only_its_windows_and_forecasts_as_from_the_whole_week(tmp_path):
    """forecast_from_lake reads the warm-up and its day/week lags (models.train.forecast_windows),
    and only who had requests in the hours between: the same forecast as predict() over the
    whole context, and the same again after those hours' resources were scaled x100."""
    from models.persist import FORECAST_CONTEXT, forecast_demand, forecast_from_lake
    from models.train import forecast_windows

    lake = _lake_with_requests(tmp_path, users=3, days=8.5, seed=5)
    at = START + timedelta(days=8, hours=6)
    config = TrainConfig(epochs=1, global_epochs=1)
    windows = forecast_windows(at, config)
    steps = config.eval_burn_in + 1
    bucket = timedelta(minutes=5)
    # a week ago (lag inputs of the next bucket); a day ago (of the next and of the 6th bucket)
    assert windows == [(at - (steps + 2015) * bucket, at - 2015 * bucket), (at - (steps + 287) * bucket, at - 282 * bucket),
                       (at - steps * bucket, at)]
    full = demand_from_lake(lake, at - FORECAST_CONTEXT, at)
    trained = train(full.filter(pc.less(full["ts"], pa.scalar(at - timedelta(days=1), full.schema.field("ts").type))),
                    since=START, until=at - timedelta(days=1), config=config)
    save_trained(lake, trained)
    read = forecast_demand(lake, at, trained.config)
    assert read.num_rows < 0.15 * full.num_rows
    table = forecast_from_lake(lake, at)
    whole = predict(trained, full, at)
    for k, user in enumerate(whole.user_ids):
        mine = table.filter(pc.equal(table["user_id"], user))
        np.testing.assert_allclose(mine["q95"].to_numpy(), whole.quantiles[k, :, :, 6].reshape(-1), rtol=1e-5, atol=1e-6)
    # between the windows (and their lookback) only who had requests counts: scale those
    # requests' resources by 100 and the forecast does not change
    from pipeline.demand import DEFAULT_LOOKBACK
    for p in (tmp_path / "lake" / "request_logs").rglob("*.parquet"):
        t = pq.read_table(p)
        ts = t["ts"]
        keep = None
        for lo, hi in windows:
            inside = pc.and_(pc.greater_equal(ts, pa.scalar(lo - DEFAULT_LOOKBACK, ts.type)), pc.less(ts, pa.scalar(hi, ts.type)))
            keep = inside if keep is None else pc.or_(keep, inside)
        keep = keep.to_numpy(zero_copy_only=False)
        for col in ("cpu_cores", "memory_mb"):
            i = t.schema.get_field_index(col)
            t = t.set_column(i, col, pa.array(np.where(keep, t[col].to_numpy(), t[col].to_numpy() * 100), t.schema.field(col).type))
        pq.write_table(t, p)
    assert not demand_from_lake(lake, at - FORECAST_CONTEXT, at).equals(full)  # the lake did change
    assert forecast_from_lake(lake, at).equals(table)


def test_forecast_windows_merge_when_the_warm_up_reaches_a_lag():
    from models.train import forecast_windows

    at = START + timedelta(days=9)
    long = forecast_windows(at, TrainConfig(eval_burn_in=400))  # 401 steps: more than the day lag's shift
    assert long == [(at - (401 + 2015) * timedelta(minutes=5), at - 2015 * timedelta(minutes=5)),
                    (at - (401 + 287) * timedelta(minutes=5), at)]
