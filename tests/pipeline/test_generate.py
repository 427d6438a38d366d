"""The synthetic request-log generator: contract, determinism, and that the archetypes show."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.archetypes import ARCHETYPE_NAMES, SOFTWARE_CONFIGS, user_traits
from pipeline.generate import (
    USERS_FILE,
    expected_rows,
    generate_landing,
    generate_requests,
    make_request_table,
    user_profiles,
)
from pipeline.landing import is_data_file, partition_hour
from pipeline.schemas import REQUEST_LOG, USER_PROFILE, is_valid_id
from pipeline.storage import open_location

MONDAY = datetime(2025, 1, 6, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def week() -> pa.Table:
    """60 users (every archetype present), one week from a Monday."""
    return pa.concat_tables(generate_requests(60, 7, MONDAY, seed=11))


def _frame(table: pa.Table, users: int, seed: int):
    """Rows with each user's archetype and local (wall-clock) hour and weekday."""
    traits = user_traits(users, seed)
    df = table.to_pandas()
    u = df["user_id"].str[1:].astype(int).to_numpy()
    local = df["ts"].dt.tz_convert(None) + np.asarray(traits.utc_offset_min[u], dtype="timedelta64[m]")
    df["archetype"] = np.array(ARCHETYPE_NAMES)[traits.archetype[u]]
    df["local_hour"] = local.dt.hour.to_numpy()
    df["local_weekday"] = local.dt.day_of_week.to_numpy()
    df["local_minute"] = local.dt.floor("min").to_numpy()
    return df


def test_chunks_conform_to_the_request_log_schema(week):
    assert week.schema.equals(REQUEST_LOG)
    assert len(week) > 10_000
    assert pc.min(week["duration_s"]).as_py() > 0
    assert pc.min(week["memory_mb"]).as_py() > 0
    assert pc.min(week["cpu_cores"]).as_py() > 0
    assert set(pc.unique(week["software_config"]).to_pylist()) <= set(SOFTWARE_CONFIGS)


def test_ids_are_valid_and_request_ids_unique(week):
    for column in ("request_id", "user_id", "program_id", "software_config"):
        values = pc.unique(week[column]).to_pylist()
        assert all(is_valid_id(v) for v in values), column
    assert pc.count_distinct(week["request_id"]).as_py() == len(week)
    assert week["request_id"][0].as_py() == "syn-11-0000000000"
    assert all(len(u) == 6 and u.startswith("u") for u in pc.unique(week["user_id"]).to_pylist())


def test_chunks_are_hours_in_time_order_and_cover_the_span():
    start = datetime(2025, 3, 4, 10, 17, 30, tzinfo=timezone(timedelta(hours=2)))  # not hour-aligned
    chunks = list(generate_requests(25, 0.5, start, seed=3, target_rows=20_000))
    assert len(chunks) == 12
    previous = start - timedelta(microseconds=1)
    for i, chunk in enumerate(chunks):
        ts = chunk["ts"].to_pylist()
        assert ts == sorted(ts)
        lo, hi = start + timedelta(hours=i), start + timedelta(hours=i + 1)
        assert all(lo <= t < hi for t in ts)
        assert ts[0] >= previous
        previous = ts[-1]
        assert len(chunk) < 0.2 * 20_000  # one hour, not the whole span


def test_target_rows_scales_the_output_within_five_percent():
    for target in (3_000, 60_000):  # below and above the natural volume
        rows = sum(len(t) for t in generate_requests(20, 1, MONDAY, seed=5, target_rows=target))
        assert abs(rows - target) <= 0.05 * target, (target, rows)
    natural = expected_rows(20, 1, MONDAY, seed=5)
    rows = sum(len(t) for t in generate_requests(20, 1, MONDAY, seed=5))
    assert abs(rows - natural) <= 5 * math.sqrt(natural) + 0.05 * natural


def test_office_hours_users_work_weekday_daytime(week):
    df = _frame(week, 60, 11)
    office = df[(df["archetype"] == "office_hours") & (df["local_weekday"] < 5)]
    day = office["local_hour"].between(10, 15).sum() / 6  # per hour, 10:00-16:00
    night = office["local_hour"].between(0, 4).sum() / 5  # per hour, 00:00-05:00
    assert day > 10 * night
    weekend = df[(df["archetype"] == "office_hours") & (df["local_weekday"] >= 5)]
    assert len(weekend) / 2 < 0.3 * len(office) / 5  # a weekend day is quiet


def test_nightly_batch_users_peak_around_two_at_night(week):
    df = _frame(week, 60, 11)
    nightly = df[df["archetype"] == "nightly_batch"]
    by_hour = nightly["local_hour"].value_counts()
    assert by_hour.idxmax() in (1, 2)
    assert nightly["local_hour"].between(0, 3).mean() > 0.7


def test_gpu_heavy_users_ask_for_gpus_and_run_long(week):
    df = _frame(week, 60, 11)
    gpu = df[df["archetype"] == "gpu_heavy"]
    cpu = df[df["archetype"] != "gpu_heavy"]
    assert len(gpu) > 0
    assert (gpu["gpus"] > 0).all() and (cpu["gpus"] == 0).all()
    assert gpu["duration_s"].median() > 10 * cpu["duration_s"].median()
    assert gpu["software_config"].str.endswith("-cuda").all()


def test_bursty_users_are_overdispersed_and_sparse_users_sparse(week):
    df = _frame(week, 60, 11)
    daytime = df[df["local_hour"].between(10, 16) & (df["local_weekday"] < 5)]

    def dispersion(kind: str) -> float:
        """Median over users of var/mean of requests per minute (1 for a steady Poisson)."""
        minutes = 5 * 7 * 60  # weekdays, local 10:00-17:00
        counts = daytime[daytime["archetype"] == kind].groupby(["user_id", "local_minute"]).size()
        ratios = []
        for _, c in counts.groupby(level=0):
            full = np.concatenate([c.to_numpy(), np.zeros(minutes - len(c))])
            ratios.append(full.var() / full.mean())
        return float(np.median(ratios))

    assert dispersion("bursty") > 3.0
    assert dispersion("office_hours") < 2.0
    sparse = df[df["archetype"] == "sparse"]
    per_user_day = sparse.groupby("user_id").size() / 7
    assert 0.5 < per_user_day.median() < 20


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path):
    def landing_bytes(name: str, seed: int, fmt: str) -> dict[str, bytes]:
        loc = open_location(tmp_path / name)
        summary = generate_landing(loc, 12, 0.25, MONDAY, seed, fmt=fmt, gzip_files=fmt == "jsonl")
        assert summary.rows > 0 and summary.files
        return {p[len(loc.root) :]: loc.read_bytes(p) for p in loc.list_files()}

    for fmt in ("parquet", "jsonl"):
        a = landing_bytes(f"a-{fmt}", 7, fmt)
        assert a == landing_bytes(f"b-{fmt}", 7, fmt)
        other = landing_bytes(f"c-{fmt}", 8, fmt)
        assert a != other
        assert a[f"/{USERS_FILE}"] != other[f"/{USERS_FILE}"]


def test_landing_files_sit_in_their_hour_partitions(tmp_path):
    loc = open_location(tmp_path / "landing")
    summary = generate_landing(loc, 15, 0.2, MONDAY + timedelta(minutes=30), seed=2)
    assert summary.chunks == 5 and summary.end == MONDAY + timedelta(minutes=30 + 288)
    data = [p for p in loc.list_files() if is_data_file(p)]
    assert sorted(data) == sorted(summary.files)
    assert not is_data_file(summary.users_file)  # ingest does not mistake profiles for requests
    total = 0
    for path in data:
        table = pq.read_table(path)
        assert table.schema.equals(REQUEST_LOG)
        hour = partition_hour(path)
        assert all(hour <= t < hour + timedelta(hours=1) for t in table["ts"].to_pylist())
        assert path.rsplit("/", 1)[-1].startswith("synthetic-")
        total += len(table)
    assert total == summary.rows
    assert json.loads(json.dumps(summary.to_dict()))["files"] == len(data)


def test_profiles_file_round_trips_and_matches_the_requests(tmp_path):
    loc = open_location(tmp_path / "landing")
    generate_landing(loc, 30, 1, MONDAY, seed=4)
    raw = pacsv.read_csv(
        pa.BufferReader(loc.read_bytes(loc.path(USERS_FILE))),
        convert_options=pacsv.ConvertOptions(column_types={"user_id": pa.string(), "tier": pa.string(), "software_configs": pa.string()}),
    )
    assert raw.column_names == USER_PROFILE.names
    parsed = raw.set_column(3, "software_configs", pc.split_pattern(raw["software_configs"], "|")).cast(USER_PROFILE)
    profiles = user_profiles(30, seed=4)
    assert parsed.equals(profiles)
    assert profiles.schema.equals(USER_PROFILE)

    requests = pa.concat_tables(generate_requests(30, 1, MONDAY, seed=4)).to_pandas()
    by_user = {r["user_id"]: r for r in profiles.to_pylist()}
    assert set(profiles["tier"].to_pylist()) <= {"free", "standard", "premium"}
    assert all({"free": 1.0, "standard": 2.0, "premium": 4.0}[p["tier"]] == p["weight"] for p in by_user.values())
    assert all(1 <= len(p["software_configs"]) <= 3 for p in by_user.values())
    for user, rows in requests.groupby("user_id"):
        assert set(rows["software_config"]) <= set(by_user[user]["software_configs"])
        assert rows["cpu_cores"].max() <= by_user[user]["max_cores"]


def test_mix_override_and_population_is_seeded():
    only_office = user_traits(20, 1, {"office_hours": 1})
    assert set(only_office.archetype.tolist()) == {ARCHETYPE_NAMES.index("office_hours")}
    small = user_traits(5, 1)
    assert sorted(small.archetype.tolist()) == list(range(5))  # every archetype even at 5 users
    assert user_profiles(40, 1).equals(user_profiles(40, 1))
    assert not user_profiles(40, 1).equals(user_profiles(40, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"users": 0}, "users"),
        ({"users": True}, "users"),
        ({"users": 2.5}, "users"),
        ({"days": 0}, "days"),
        ({"days": -1.0}, "days"),
        ({"days": float("nan")}, "days"),
        ({"start": datetime(2025, 1, 6)}, "timezone-aware"),
        ({"start": "2025-01-06"}, "datetime"),
        ({"seed": -1}, "seed"),
        ({"target_rows": 0}, "target_rows"),
        ({"mix": {"nocturnal": 1.0}}, "unknown archetype"),
        ({"mix": {"sparse": 0.0}}, "positive sum"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = {"users": 3, "days": 0.1, "start": MONDAY, "seed": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_requests(**args)  # raises before the first chunk is asked for


def test_landing_rejects_unknown_format_before_writing(tmp_path):
    loc = open_location(tmp_path / "landing")
    with pytest.raises(ValueError, match="unknown landing format"):
        generate_landing(loc, 3, 0.1, MONDAY, 1, fmt="xml")
    assert loc.list_files() == []


def test_make_request_table_fills_defaults_and_normalises_ts():
    paris = timezone(timedelta(hours=1))
    table = make_request_table(
        [
            {"user_id": "u1", "ts": datetime(2025, 1, 6, 10, 0, tzinfo=paris)},
            {"user_id": "u2", "ts": MONDAY, "gpus": 2.0, "request_id": "r-x"},
        ]
    )
    assert table.schema.equals(REQUEST_LOG)
    assert table["ts"].to_pylist() == [datetime(2025, 1, 6, 9, 0, tzinfo=timezone.utc), MONDAY]
    assert table["request_id"].to_pylist() == ["req-000000", "r-x"]
    assert table["gpus"].to_pylist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="timezone-aware"):
        make_request_table([{"user_id": "u1", "ts": datetime(2025, 1, 6)}])
    with pytest.raises(ValueError, match="unknown field"):
        make_request_table([{"user_id": "u1", "ts": MONDAY, "cpus": 1}])
    with pytest.raises(ValueError, match="required"):
        make_request_table([{"ts": MONDAY}])
