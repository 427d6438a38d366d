"""Demand series: overlap-weighted concurrency per 5-minute bucket, zero-filled, long format."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import load_settings
from pipeline.demand import build_demand_series, demand_from_lake, read_requests, summarize
from pipeline.generate import make_request_table
from pipeline.ingest import ingest_interval
from pipeline.landing import write_landing
from pipeline.schemas import DEMAND
from pipeline.storage import open_location

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def _series(rows):
    return build_demand_series(make_request_table(rows)).to_pylist()


def test_a_request_across_a_boundary_counts_in_each_bucket_by_overlap():
    rows = _series([{"user_id": "u1", "ts": T0 + timedelta(minutes=4), "duration_s": 120, "cpu_cores": 3, "memory_mb": 1024, "gpus": 1}])
    assert [r["ts"] for r in rows] == [T0, T0 + timedelta(minutes=5)]
    assert [r["requests"] for r in rows] == [1, 0]  # counted where it arrives
    assert [r["cpu_cores"] for r in rows] == pytest.approx([3 * 60 / 300, 3 * 60 / 300])
    assert [r["memory_gb"] for r in rows] == pytest.approx([1.0 * 60 / 300] * 2)
    assert [r["gpus"] for r in rows] == pytest.approx([60 / 300] * 2)


def test_long_requests_fill_whole_buckets_and_gaps_are_zero_filled():
    rows = _series(
        [
            {"user_id": "u1", "ts": T0, "duration_s": 900, "cpu_cores": 2},  # three full buckets
            {"user_id": "u1", "ts": T0 + timedelta(minutes=40), "duration_s": 0},
        ]
    )
    assert len(rows) == 9  # 10:00 .. 10:40, zero-filled between
    assert [r["cpu_cores"] for r in rows[:4]] == pytest.approx([2, 2, 2, 0])
    assert [r["requests"] for r in rows] == [1, 0, 0, 0, 0, 0, 0, 0, 1]


def test_users_are_separate_and_sorted():
    table = build_demand_series(
        make_request_table(
            [
                {"user_id": "b", "ts": T0 + timedelta(minutes=10)},
                {"user_id": "a", "ts": T0},
                {"user_id": "a", "ts": T0 + timedelta(minutes=5)},
            ]
        )
    )
    assert table.schema == DEMAND
    assert table.column("user_id").to_pylist() == ["a", "a", "b"]
    assert table.column("requests").to_pylist() == [1, 1, 1]


def test_window_bounds_clip_buckets():
    table = build_demand_series(
        make_request_table([{"user_id": "u", "ts": T0, "duration_s": 3600, "cpu_cores": 1}]),
        since=T0 + timedelta(minutes=10),
        until=T0 + timedelta(minutes=20),
    )
    assert table.column("ts").to_pylist() == [T0 + timedelta(minutes=10), T0 + timedelta(minutes=15)]
    assert table.column("requests").to_pylist() == [0, 0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 7200), st.floats(0, 5000), st.floats(0, 16)),
        min_size=1,
        max_size=40,
    )
)
def test_core_seconds_are_conserved(reqs):
    """Σ over buckets of cpu_cores·300 equals Σ over requests of cores·duration."""
    rows = [
        {"request_id": f"r{i}", "user_id": f"u{u}", "ts": T0 + timedelta(seconds=s), "duration_s": d, "cpu_cores": c}
        for i, (u, s, d, c) in enumerate(reqs)
    ]
    table = build_demand_series(make_request_table(rows))
    expected = sum(round(d * 1e6) / 1e6 * c for _, _, d, c in reqs)
    assert pc.sum(table["cpu_cores"]).as_py() * 300 == pytest.approx(expected, rel=1e-9, abs=1e-6)
    assert pc.sum(table["requests"]).as_py() == len(reqs)
    assert pc.min(table["cpu_cores"]).as_py() >= 0


def test_from_the_lake_with_lookback(tmp_path):
    landing = open_location(str(tmp_path / "landing"))
    rows = [
        {"request_id": "early", "user_id": "u1", "ts": T0 - timedelta(minutes=30), "duration_s": 3600, "cpu_cores": 4},
        {"request_id": "in", "user_id": "u1", "ts": T0 + timedelta(minutes=2), "cpu_cores": 1},
    ]
    write_landing(landing, make_request_table(rows), "a")
    settings = load_settings(overrides={"lake": str(tmp_path / "lake"), "landing": str(tmp_path / "landing")}, environ={})
    ingest_interval(settings, T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    lake = open_location(str(tmp_path / "lake"))
    assert read_requests(lake, T0, T0 + timedelta(hours=1)).column("request_id").to_pylist() == ["in"]
    demand = demand_from_lake(lake, T0, T0 + timedelta(minutes=30)).to_pylist()
    # the request that started 30 min before the window still occupies 4 cores in it
    assert demand[0]["ts"] == T0 and demand[0]["cpu_cores"] == pytest.approx(4 + 1 / 300)
    assert sum(r["requests"] for r in demand) == 1
    summary = summarize(demand_from_lake(lake, T0, T0 + timedelta(minutes=30)))
    assert summary.users == 1 and summary.peak_cpu_cores == pytest.approx(4 + 1 / 300)
    assert "u1" in summary.render()


def test_empty_inputs():
    assert build_demand_series(make_request_table([])).num_rows == 0
    assert summarize(build_demand_series(make_request_table([]))).users == 0


def test_one_minute_buckets_and_the_system_sum_share_the_overlap_arithmetic():
    from pipeline.demand import system_demand

    reqs = make_request_table([
        {"user_id": "a", "ts": T0 + timedelta(seconds=30), "duration_s": 90, "cpu_cores": 2, "memory_mb": 2048},
        {"user_id": "b", "ts": T0 + timedelta(seconds=150), "duration_s": 600, "cpu_cores": 1},  # runs past the window
        {"user_id": "b", "ts": T0 - timedelta(seconds=60), "duration_s": 120, "cpu_cores": 4},  # started before it
    ])
    rows = build_demand_series(reqs, T0, T0 + timedelta(minutes=5), step_s=60).to_pylist()
    a = [r["cpu_cores"] for r in rows if r["user_id"] == "a"]
    assert a == pytest.approx([2 * 30 / 60, 2.0])  # 30 s of minute 0, all of minute 1
    sys_ = system_demand([reqs.slice(0, 1), reqs.slice(1)], T0, T0 + timedelta(minutes=5), step_s=60)
    # minute 0: a 1 core-avg + the early request's last 60 s (4); minute 2: b from 150 s → 30 s of 1 core
    assert sys_.cpu_cores.tolist() == pytest.approx([1 + 4, 2, 0.5, 1, 1])
    assert sys_.memory_gb.tolist() == pytest.approx([1.0 + 0.5, 2.0, 0.5 * 0.5, 0.5, 0.5])
    assert sys_.requests.tolist() == [1, 0, 1, 0, 0]  # arrivals inside the window only
    five = system_demand([reqs], T0, T0 + timedelta(minutes=5), step_s=300)
    assert five.cpu_cores.tolist() == pytest.approx([sum([5, 2, 0.5, 1, 1]) / 5])
    with pytest.raises(ValueError, match="demand step"):
        build_demand_series(reqs, step_s=120)
    with pytest.raises(ValueError, match="bucket grid"):
        system_demand([reqs], T0 + timedelta(seconds=7), T0 + timedelta(minutes=5), step_s=60)
