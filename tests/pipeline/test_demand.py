"""Demand series: overlap-weighted concurrency per 5-minute bucket, zero-filled, long format."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
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


@pytest.fixture(scope="module")
def synthetic_lake(tmp_path_factory):
    """Twelve synthetic users over six hours, ingested: long requests cross buckets and hours."""
    from pipeline.generate import generate_requests

    root = tmp_path_factory.mktemp("streamed")
    landing = open_location(str(root / "landing"))
    write_landing(landing, pa.concat_tables(list(generate_requests(12, 0.25, T0, seed=4, target_rows=6000))), "gen")
    settings = load_settings(overrides={"lake": str(root / "lake"), "landing": str(root / "landing")}, environ={})
    ingest_interval(settings, T0, T0 + timedelta(hours=6))
    return open_location(str(root / "lake"))


def _assert_same_demand(got, want):
    assert got.num_rows == want.num_rows > 0
    for name in ("user_id", "ts", "requests"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist()
    for name in ("cpu_cores", "memory_gb", "gpus"):  # the same sums, in another order
        assert got.column(name).to_pylist() == pytest.approx(want.column(name).to_pylist(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("batch_rows, fold_rows", [(1 << 20, 1 << 22), (97, 50)])
def test_the_streamed_lake_read_equals_the_demand_of_all_rows_at_once(synthetic_lake, monkeypatch, batch_rows, fold_rows):
    """demand_from_lake sums each batch on its own (and folds the partial sums when they pile up):
    the same series as build_demand_series of every row read at once, with the look-back, a user
    filter, and in batches of 97 rows with a fold every ~50 partial rows."""
    import pipeline.demand as demand

    monkeypatch.setattr(demand, "_BATCH_ROWS", batch_rows)
    monkeypatch.setattr(demand, "_FOLD_ROWS", fold_rows)
    since, until = T0 + timedelta(hours=2, minutes=5), T0 + timedelta(hours=5)
    whole = build_demand_series(read_requests(synthetic_lake, until=until), since, until)
    _assert_same_demand(demand_from_lake(synthetic_lake, since, until), whole)
    some = sorted(set(whole.column("user_id").to_pylist()))[::3]
    _assert_same_demand(demand_from_lake(synthetic_lake, since, until, users=some),
                        whole.filter(pc.is_in(whole["user_id"], pa.array(some))))
    everything = demand_from_lake(synthetic_lake)  # no bounds: every row
    _assert_same_demand(everything, build_demand_series(read_requests(synthetic_lake)))
    assert demand_from_lake(synthetic_lake, T0 + timedelta(days=3), T0 + timedelta(days=4)).num_rows == 0
    assert demand_from_lake(open_location(str(synthetic_lake.root) + "-none"), since, until).num_rows == 0


def test_active_users_reads_the_id_dictionary_alone(synthetic_lake, monkeypatch):
    import pipeline.demand as demand
    from pipeline.demand import active_users

    monkeypatch.setattr(demand, "_BATCH_ROWS", 97)
    for lo, hi in ((T0, T0 + timedelta(hours=6)), (T0 + timedelta(hours=1, minutes=3), T0 + timedelta(hours=1, minutes=9))):
        want = set(read_requests(synthetic_lake, lo, hi, columns=["user_id"]).column("user_id").to_pylist())
        assert want and active_users(synthetic_lake, lo, hi) == want
        few = sorted(want)[:2] + ["nobody"]
        assert active_users(synthetic_lake, lo, hi, users=few) == set(few[:2])
    assert active_users(synthetic_lake, T0 + timedelta(hours=1), T0 + timedelta(hours=1)) == set()
    assert active_users(open_location(str(synthetic_lake.root) + "-none"), T0, T0 + timedelta(hours=1)) == set()


def test_a_request_that_began_before_the_look_back_still_counts_while_it_runs(tmp_path):
    """A 14-hour job (the nightly-batch kind) seen from windows that start 8 and 12 hours after it
    began: every read of the lake counts its 4 cores while it runs, beyond the 6-hour look-back
    (found through the files' duration statistics), and a short request from before the look-back
    does not count."""
    from pipeline.demand import system_demand_from_lake

    landing = open_location(str(tmp_path / "landing"))
    rows = [{"user_id": "batch", "ts": T0 + timedelta(minutes=1), "duration_s": 14 * 3600.0, "cpu_cores": 4.0},
            {"user_id": "batch", "ts": T0 + timedelta(minutes=2), "duration_s": 60.0, "cpu_cores": 8.0}]
    rows += [{"user_id": "short", "ts": T0 + timedelta(hours=h, minutes=30)} for h in range(0, 18, 2)]
    write_landing(landing, make_request_table(rows), "a")
    settings = load_settings(overrides={"lake": str(tmp_path / "lake"), "landing": str(tmp_path / "landing")}, environ={})
    ingest_interval(settings, T0, T0 + timedelta(hours=18))
    lake = open_location(str(tmp_path / "lake"))
    for since in (T0 + timedelta(hours=8), T0 + timedelta(hours=12)):
        until = T0 + timedelta(hours=16)
        d = demand_from_lake(lake, since, until)
        batch = {r["ts"]: r["cpu_cores"] for r in d.to_pylist() if r["user_id"] == "batch"}
        end = T0 + timedelta(hours=14)  # the job runs [00:01, 14:01)
        running = [since + k * timedelta(minutes=5) for k in range(int((end - since) / timedelta(minutes=5)))]
        assert [batch[t] for t in running] == pytest.approx([4.0] * len(running)), since
        assert batch[end] == pytest.approx(4.0 * 60 / 300)
        assert sum(r["requests"] for r in d.to_pylist() if r["user_id"] == "batch") == 0  # it arrived before the window
        system = system_demand_from_lake(lake, since, until)
        assert system.cpu_cores[: len(running)].tolist() == pytest.approx([4.0 + (1 / 300 if (t - T0).seconds % 7200 == 1800 else 0)
                                                                          for t in running])
        assert d.filter(pc.equal(d["user_id"], "batch")).num_rows == len(running) + 1


def test_a_window_lists_only_its_days_partitions(tmp_path):
    """A read with both bounds lists the ``date=`` partitions of its days only (and finds the same
    rows as a scan of the whole lake); the validation results and anything ``_``- or
    ``.``-prefixed beside the partitions are not data."""
    from pipeline.demand import _lake_dataset

    landing = open_location(str(tmp_path / "landing"))
    days = [T0 + timedelta(days=k, hours=1) for k in (0, 1, 2, 9)]
    write_landing(landing, make_request_table([{"user_id": f"u{k}", "ts": t} for k, t in enumerate(days)]), "a")
    settings = load_settings(overrides={"lake": str(tmp_path / "lake"), "landing": str(tmp_path / "landing")}, environ={})
    for t in days:
        ingest_interval(settings, t - timedelta(hours=1), t + timedelta(hours=1))
    lake = open_location(str(tmp_path / "lake"))
    stray = tmp_path / "lake" / "request_logs" / f"date={days[0]:%Y-%m-%d}" / f"hour={days[0]:%H}" / ".partial.parquet"
    stray.write_bytes(b"not parquet")
    window = _lake_dataset(lake, since=T0 + timedelta(days=1), until=T0 + timedelta(days=2, hours=3))
    assert sorted({f.split("/date=")[1][:10] for f in window.files}) == ["2026-03-03", "2026-03-04"]
    assert all(f.endswith(".parquet") and "/_" not in f and "/." not in f for f in window.files)
    whole = _lake_dataset(lake)
    assert len(whole.files) > len(window.files)
    since, until = T0 + timedelta(days=1), T0 + timedelta(days=2, hours=3)
    assert read_requests(lake, since, until)["user_id"].to_pylist() == ["u1", "u2"]
    assert demand_from_lake(lake, since, until)["user_id"].unique().to_pylist() == ["u1", "u2"]
    assert read_requests(lake)["user_id"].to_pylist() == ["u0", "u1", "u2", "u3"]  # no bounds: the whole lake
    plus2 = timezone(timedelta(hours=2))  # the same window written in another zone: the same UTC days
    assert read_requests(lake, since.astimezone(plus2), until.astimezone(plus2)).equals(read_requests(lake, since, until))
    early = (T0 + timedelta(days=1, minutes=30)).astimezone(timezone(timedelta(hours=14)))  # 10:30 UTC is the next day at +14:00
    assert read_requests(lake, early, early + timedelta(hours=1))["user_id"].to_pylist() == ["u1"]
    # days without a file (the lake exists): no rows, not an error
    from pipeline.demand import active_users, system_demand_from_lake

    gap = (T0 + timedelta(days=4), T0 + timedelta(days=5))
    assert read_requests(lake, *gap).num_rows == 0 and read_requests(lake, *gap).schema == read_requests(lake).schema
    assert demand_from_lake(lake, *gap).num_rows == 0 and active_users(lake, *gap) == set()
    assert system_demand_from_lake(lake, T0 + timedelta(days=30), T0 + timedelta(days=31)).cpu_cores.sum() == 0
