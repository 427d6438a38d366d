"""The forecast cycle's read of earlier system bounds for the reconciled target's choice."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from pipeline.aggregate import METHOD_RECONCILED, METHOD_TIERED, METHOD_TOPDOWN, AggregateConfig
from pipeline.config import Settings
from pipeline.forecast_cycle import _past_bounds
from pipeline.forecast_store import ForecastStore
from pipeline.schemas import SYSTEM_FORECAST

AT = datetime(2026, 11, 10, 12, 0, tzinfo=timezone.utc)
STEP = timedelta(minutes=5)


def _rows(issued_at: datetime, method: str) -> list[dict]:
    return [{"issued_at": issued_at, "horizon_min": 5, "resource": "cpu_cores", "mean": 1.0, "lower": 0.0, "upper": 2.0,
             "level": 0.9, "n_users": 3, "method": method}]


def test_the_past_bounds_are_the_window_of_earlier_tiered_and_top_down_rows_from_the_store(tmp_path):
    settings = Settings(store_url=f"sqlite:///{tmp_path / 'store.db'}")
    store = ForecastStore(settings.store_url)
    store.create_schema()
    config = AggregateConfig(reconcile_window=10)  # the window and 6 horizons: issues AT - 16 .. AT - 1 steps
    rows = []
    for k in (0, 1, 16, 17):
        for method in (METHOD_TIERED, METHOD_TOPDOWN, METHOD_RECONCILED):
            rows += _rows(AT - k * STEP, method)
    store.write_system_forecast(pa.Table.from_pylist(rows, schema=SYSTEM_FORECAST))
    past = _past_bounds(settings, AT, config)
    assert sorted(set(past["method"].to_pylist())) == [METHOD_TIERED, METHOD_TOPDOWN]
    assert sorted(set(past["issued_at"].to_pylist())) == [AT - 16 * STEP, AT - STEP]  # not this issue, not older


def test_an_unreachable_store_means_the_maximum_this_time_with_a_warning(caplog):
    settings = Settings(store_url="postgresql+psycopg://warmcast:s3cret-pw@127.0.0.1:1/warmcast")
    with caplog.at_level(logging.WARNING, logger="pipeline.forecast_cycle"):
        assert _past_bounds(settings, AT, AggregateConfig()) is None
    assert "forecast store is unavailable" in caplog.text and "s3cret-pw" not in caplog.text
