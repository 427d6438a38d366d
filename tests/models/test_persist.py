"""A trained version survives the model store: the loaded models forecast exactly as the trained ones."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

from models.persist import load_trained, save_trained
from models.train import TrainConfig, predict, train
from pipeline.demand import build_demand_series
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
