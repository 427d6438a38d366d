"""Real-trace importers: Azure Functions 2019 and ServeGen, on small fixtures written here.

The ``slow`` tests read the published traces from ``$WARMCAST_TRACE_DIR`` (default
``<repo>/../shared/data``) and fail, not skip, when they are absent.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.importers import TraceFormatError, import_azure_functions, import_servegen
from pipeline.importers.azure_functions import DEFAULT_DURATION_MS, DEFAULT_MEMORY_MB, DURATION_COLUMNS, MEMORY_COLUMNS
from pipeline.landing import partition_hour
from pipeline.schemas import REQUEST_LOG, is_valid_id
from pipeline.storage import open_location

START = datetime(2024, 3, 1, tzinfo=timezone.utc)
START_US = int(START.timestamp()) * 1_000_000


def h(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def read_landing(root: Path) -> tuple[pa.Table, dict[str, bytes]]:
    """All landing rows (checked against their partition hour) and each file's bytes by relative path."""
    tables, blobs = [], {}
    for path in sorted(root.rglob("*.parquet")):
        blobs[str(path.relative_to(root))] = path.read_bytes()
        table = pq.read_table(path)
        assert table.schema.equals(REQUEST_LOG), path
        hour = partition_hour(str(path))
        assert hour is not None, path
        hour_us = int(hour.timestamp()) * 1_000_000
        ts = pc.cast(table["ts"], pa.int64()).to_numpy()
        assert ((ts >= hour_us) & (ts < hour_us + 3_600_000_000)).all(), f"{path}: rows outside the partition hour"
        tables.append(table)
    return (pa.concat_tables(tables) if tables else REQUEST_LOG.empty_table()), blobs


# ---------------------------------------------------------------- Azure Functions fixture

MINUTES = [538, 539, 540, 541, 542]  # 08:58 .. 09:02: crosses an hour boundary
FUNCTIONS = {  # name: (owner, app, per-minute counts)
    "f1": ("o1", "a1", [30, 0, 50, 10, 20]),
    "f2": ("o1", "a2", [1, 2, 0, 0, 7]),
    "f3": ("o2", "a3", [0, 0, 4, 0, 3]),
    "f4": ("o3", "a4", [0, 0, 0, 0, 0]),
}
DURATIONS_MS = {"f1": [2, 5, 10, 20, 40, 400, 900], "f2": [100, 100, 150, 200, 250, 300, 310], "f4": [1, 1, 1, 1, 1, 1, 1]}
MEMORY_MB = {"f1": [60, 62, 64, 70, 80, 90, 95, 99], "f3": [128, 128, 130, 131, 140, 150, 160, 170], "f4": [1] * 8}


def write_azure(root: Path, owner_hash=lambda o: h(o)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "invocations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["HashOwner", "HashApp", "HashFunction", "Trigger", *map(str, MINUTES)])
        for name, (owner, app, counts) in FUNCTIONS.items():
            w.writerow([owner_hash(owner), h(app), h(name), "http", *counts])
    with open(root / "durations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["HashOwner", "HashApp", "HashFunction", "Average", "Count", "Minimum", "Maximum", *DURATION_COLUMNS])
        for name, pcts in DURATIONS_MS.items():
            owner, app, _ = FUNCTIONS[name]
            w.writerow([owner_hash(owner), h(app), h(name), np.mean(pcts), 100, pcts[0], pcts[-1], *pcts])
    with open(root / "memory.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["HashFunction", "HashOwner", "HashApp", "SampleCount", "AverageAllocatedMb", *MEMORY_COLUMNS])
        for name, pcts in MEMORY_MB.items():
            owner, app, _ = FUNCTIONS[name]
            w.writerow([h(name), owner_hash(owner), h(app), 10, np.mean(pcts), *pcts])
    return root


def import_az(tmp_path: Path, seed: int = 1, out: str = "landing", **kw):
    trace = tmp_path / "azure" if (tmp_path / "azure").exists() else write_azure(tmp_path / "azure")
    summary = import_azure_functions(trace, open_location(tmp_path / out), seed, START, **kw)
    return summary, *read_landing(tmp_path / out)


def test_azure_rows_match_per_minute_counts_exactly(tmp_path):
    summary, table, blobs = import_az(tmp_path)
    total = sum(sum(c) for _, _, c in FUNCTIONS.values())
    assert summary.rows == len(table) == total
    assert summary.users == 2 and summary.programs == 3  # f4 never ran
    assert summary.skipped == {"functions_without_invocations": 1}
    assert summary.files == len(blobs)
    assert {p.split("/")[1] for p in blobs} == {"hour=08", "hour=09"}
    ids = table["request_id"].to_pylist()
    assert len(set(ids)) == len(ids) and all(is_valid_id(i) for i in ids)
    for col in ("user_id", "program_id", "software_config"):
        assert all(is_valid_id(v) for v in set(table[col].to_pylist()))
    ts = pc.cast(table["ts"], pa.int64()).to_numpy()
    minute = (ts - START_US) // 60_000_000
    programs = np.array(table["program_id"].to_pylist())
    for name, (owner, app, counts) in FUNCTIONS.items():
        mine = programs == "az-fn-" + h(name)[:16]
        got = [int(((minute == m) & mine).sum()) for m in MINUTES]
        assert got == counts, name
        if counts and sum(counts):
            rows = table.filter(pa.array(mine))
            assert set(rows["user_id"].to_pylist()) == {"az-" + h(owner)[:16]}
            assert set(rows["software_config"].to_pylist()) == {"az-app-" + h(app)[:16]}
    # the request id names the arrival's minute, so the arrival lies inside that minute
    id_minute = np.array([int(i.rsplit("-", 2)[1]) for i in ids])
    assert (id_minute == minute).all()
    assert summary.start_ts == START + timedelta(microseconds=int(ts.min() - START_US))
    assert summary.end_ts == START + timedelta(microseconds=int(ts.max() - START_US))
    assert pc.all(pc.equal(table["gpus"], 0.0)).as_py() and pc.all(pc.equal(table["cpu_cores"], 1.0)).as_py()


def test_azure_durations_and_memory_follow_percentile_rows(tmp_path):
    summary, table, _ = import_az(tmp_path)
    programs = np.array(table["program_id"].to_pylist())
    dur = table["duration_s"].to_numpy()
    mem = table["memory_mb"].to_numpy()
    for name in ("f1", "f2"):
        p = np.array(DURATIONS_MS[name]) / 1000
        d = dur[programs == "az-fn-" + h(name)[:16]]
        assert d.min() >= p[0] and d.max() <= p[-1]
    f1 = programs == "az-fn-" + h("f1")[:16]
    # 99 % of draws lie below p99 = 0.4 s, a quarter below p25 = 0.01 s; 110 draws, loose bounds
    assert (dur[f1] <= 0.4).mean() > 0.9 and 0.05 < (dur[f1] <= 0.010).mean() < 0.5
    assert mem[f1].min() >= 60 and mem[f1].max() <= 99
    f3 = programs == "az-fn-" + h("f3")[:16]
    assert (dur[f3] == DEFAULT_DURATION_MS / 1000).all()  # f3 has no durations row
    assert mem[f3].min() >= 128 and mem[f3].max() <= 170
    f2 = programs == "az-fn-" + h("f2")[:16]
    assert (mem[f2] == DEFAULT_MEMORY_MB).all()  # f2 has no memory row
    assert summary.defaulted == {
        "functions_without_durations": 1, "rows_with_default_duration": 7,
        "functions_without_memory": 1, "rows_with_default_memory": 10,
    }  # fmt: skip


def test_azure_same_seed_same_bytes_other_seed_differs(tmp_path):
    _, _, a = import_az(tmp_path, seed=5, out="a")
    _, _, b = import_az(tmp_path, seed=5, out="b")
    _, _, c = import_az(tmp_path, seed=6, out="c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_azure_owner_ids_stay_distinct_when_hash_prefixes_collide(tmp_path):
    write_azure(tmp_path / "azure", owner_hash=lambda o: "abcdef0123456789abcd" + h(o)[20:])
    summary, table, _ = import_az(tmp_path)
    users = set(table["user_id"].to_pylist())
    assert summary.users == len(users) == 2
    assert all(is_valid_id(u) and len(u) > len("az-") + 16 for u in users)


def test_azure_other_landing_format(tmp_path):
    summary = import_azure_functions(write_azure(tmp_path / "azure"), open_location(tmp_path / "l"), 1, START, fmt="jsonl")
    lines = sum(len(p.read_text().splitlines()) for p in (tmp_path / "l").rglob("*.jsonl"))
    assert lines == summary.rows == 127


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: os.remove(d / "memory.csv"), r"memory\.csv: file missing"),
        (lambda d: _edit(d / "invocations.csv", "HashOwner", "Owner"), r"invocations\.csv: missing column\(s\) HashOwner"),
        (lambda d: _edit(d / "invocations.csv", "Trigger", "trigger"), r"invocations\.csv: missing column\(s\) Trigger"),
        (lambda d: _edit(d / "durations.csv", "percentile_Average_50", "percentile_50"), r"durations\.csv: missing column\(s\) percentile_Average_50"),
        (lambda d: _edit(d / "memory.csv", "HashApp", "App"), r"memory\.csv: missing column\(s\) HashApp"),
        (lambda d: _edit(d / "invocations.csv", ",http,30,", ",http,x,"), r"invocations\.csv: data row 1, column '538': count 'x' is not a number"),
        (lambda d: _edit(d / "invocations.csv", ",http,1,2,", ",http,1,-2,"), r"invocations\.csv: data row 2, column '539': negative invocation count -2"),
        (lambda d: _edit(d / "invocations.csv", ",http,1,2,", ",http,1,2.5,"), r"data row 2, column '539': count '2.5' is not a whole number"),
        (lambda d: _edit(d / "durations.csv", ",2,5,10,20,", ",2,5,ten,20,"), r"durations\.csv: data row 1, column 'percentile_Average_25': 'ten' is not a number"),
        (lambda d: _edit(d / "durations.csv", ",2,5,10,20,", ",2,5,-10,20,"), r"durations\.csv: data row 1, column 'percentile_Average_25'"),
    ],
)
def test_azure_bad_format_errors_name_file_row_and_problem(tmp_path, breakage, message):
    trace = write_azure(tmp_path / "azure")
    breakage(trace)
    with pytest.raises(TraceFormatError, match=message):
        import_azure_functions(trace, open_location(tmp_path / "landing"), 1, START)
    assert not (tmp_path / "landing").exists()  # validated before anything is written


def test_azure_missing_directory(tmp_path):
    with pytest.raises(TraceFormatError, match="does not exist"):
        import_azure_functions(tmp_path / "nope", open_location(tmp_path / "landing"), 1, START)
    assert issubclass(TraceFormatError, ValueError)


# ---------------------------------------------------------------- ServeGen fixture


def write_servegen(root: Path, clients: dict[int, list[tuple]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for client, rows in clients.items():
        with open(root / f"chunk-{client}-trace.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


def sg_rows(n_windows: int, rate: float, dist: str, p1: float, p2: float, cv: float = 1.0) -> list[tuple]:
    return [(600 * i, rate, cv, dist, p1, p2) for i in range(n_windows)]


def sg_fixture(root: Path) -> Path:
    # client 0: 120 windows with a fractional count (x = 7.38), cycling through the distributions
    cycle = [("Gamma", 0.3, 20.0), ("Weibull", 0.5, 3.0), ("Exponential", 0.12, 0.0)]
    rows0 = [(600 * i, 0.0123, 2.0, *cycle[i % 3]) for i in range(120)]
    rows0[7] = (600 * 7, 0, 0, "", 0, 0)  # an empty window
    clients = {
        0: rows0,
        # client 1: one very bursty Gamma window, then one Poisson-like window, 600 arrivals each
        1: [(0, 1.0, 4.47, "Gamma", 0.05, 20.0), (600, 1.0, 1.0, "Exponential", 1.0, 1.0), (1200, 0, 0, "", 0, 0)],
        # client 12: whole counts, windows spaced wider than 600 s
        12: [(0, 0.5, 1.0, "Weibull", 1.2, 2.0), (3600, 0.25, 2.0, "Gamma", 0.25, 16.0)],
    }
    return write_servegen(root, clients)


def import_sg(tmp_path: Path, seed: int = 1, out: str = "landing", **kw):
    trace = tmp_path / "sg" if (tmp_path / "sg").exists() else sg_fixture(tmp_path / "sg")
    summary = import_servegen(trace, open_location(tmp_path / out), seed, START, **kw)
    return summary, *read_landing(tmp_path / out)


def window_of(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per row: client number and window start (s), parsed from request ids sg-c{N}-{ts_s}-{k}."""
    parts = [re.fullmatch(r"sg-c(\d+)-(\d+)-(\d+)", i) for i in table["request_id"].to_pylist()]
    assert all(parts)
    return np.array([int(p.group(1)) for p in parts]), np.array([int(p.group(2)) for p in parts])


def test_servegen_counts_windows_and_ids(tmp_path):
    summary, table, blobs = import_sg(tmp_path)
    client, window_s = window_of(table)
    ts = pc.cast(table["ts"], pa.int64()).to_numpy()
    offset = ts - (START_US + window_s * 1_000_000)
    assert ((offset >= 0) & (offset < 600_000_000)).all()  # every arrival inside its window
    ids = table["request_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert set(table["user_id"].to_pylist()) == {"sg-client-0", "sg-client-1", "sg-client-12"}
    assert all(is_valid_id(v) for c in ("user_id", "program_id", "software_config") for v in set(table[c].to_pylist()))
    assert summary.users == 3 and summary.rows == len(table) and summary.files == len(blobs)
    assert summary.skipped == {"empty_windows": 2}
    # whole counts are reproduced exactly
    assert int(((client == 1) & (window_s == 0)).sum()) == 600 and int(((client == 1) & (window_s == 600)).sum()) == 600
    assert int(((client == 12) & (window_s == 0)).sum()) == 300 and int(((client == 12) & (window_s == 3600)).sum()) == 150
    # fractional counts: floor or ceil per window, and rate*600 on average
    c0 = window_s[client == 0]
    per_window = np.bincount(c0 // 600, minlength=120)
    assert per_window[7] == 0
    busy = np.delete(per_window, 7)
    assert set(busy.tolist()) <= {7, 8}
    expected = 0.0123 * 600 * len(busy)  # variance <= 0.25 per window
    assert abs(busy.sum() - expected) <= 6 * 0.5 * np.sqrt(len(busy)) + 1
    d, m = table["duration_s"].to_numpy(), table["memory_mb"].to_numpy()
    assert d.min() >= 0.05 and d.max() <= 600 and 2.5 < np.median(d) < 6.5
    assert m.min() >= 32 and m.max() <= 16384 and 350 < np.median(m) < 750
    assert pc.all(pc.greater(table["gpus"], 0.0)).as_py()


def test_servegen_mean_count_matches_rate_over_many_windows(tmp_path):
    rates = [0.0017, 0.05, 0.123]  # 1.02, 30 and 73.8 requests per window
    rows = [(600 * i, rates[i % 3], 3.0, ("Gamma", "Weibull", "Exponential")[i % 3], 0.2, 5.0) for i in range(600)]
    write_servegen(tmp_path / "sg", {3: rows})
    _, table, _ = import_sg(tmp_path, seed=11)
    _, window_s = window_of(table)
    per_window = np.bincount(window_s // 600, minlength=600)
    for j, rate in enumerate(rates):
        counts = per_window[j::3]
        assert abs(counts.mean() - rate * 600) <= 6 * 0.5 / np.sqrt(len(counts)), rate


def test_servegen_keeps_the_fitted_burstiness(tmp_path):
    _, table, _ = import_sg(tmp_path, clients=["1"])
    _, window_s = window_of(table)
    ts = np.sort(pc.cast(table["ts"], pa.int64()).to_numpy()) / 1e6

    def cv(window: int) -> float:
        gaps = np.diff(ts[np.sort(window_s) == window])
        return gaps.std() / gaps.mean()

    assert cv(0) > 2.5  # Gamma shape 0.05: CV ~ 4.5
    assert 0.75 < cv(600) < 1.3  # Exponential: CV ~ 1


def test_servegen_client_filter_and_row_cap(tmp_path):
    summary, table, blobs = import_sg(tmp_path, clients=["sg-client-1", "chunk-12"], max_rows_per_client=400)
    assert set(table["user_id"].to_pylist()) == {"sg-client-1", "sg-client-12"}
    client, window_s = window_of(table)
    assert (client == 1).sum() == 400 and (client == 12).sum() == 400
    assert summary.skipped["rows_over_cap"] == (1200 - 400) + (450 - 400)
    assert all(p.split("/")[-1].startswith(("servegen-c1-", "servegen-c12-")) for p in blobs)
    # a cap keeps each client's earliest rows
    assert window_s[client == 12].max() == 3600 and (window_s[client == 12] == 0).sum() == 300


def test_servegen_same_seed_same_bytes_other_seed_differs(tmp_path):
    _, _, a = import_sg(tmp_path, seed=3, out="a")
    _, _, b = import_sg(tmp_path, seed=3, out="b")
    _, _, c = import_sg(tmp_path, seed=4, out="c")
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "row, message",
    [
        (("timestamp_s", "rate", "cv", "iat_distribution", "param1", "param2"), r"chunk-5-trace\.csv: row 1, timestamp_s: 'timestamp_s' is not a number"),
        ((0, "fast", 1, "Gamma", 1, 1), r"chunk-5-trace\.csv: row 1, rate_req_per_s: 'fast' is not a number"),
        ((0, -0.5, 1, "Gamma", 1, 1), r"row 1, rate_req_per_s: negative value '-0.5'"),
        ((0, 0.5, 1, "Pareto", 1, 1), r"row 1, iat_distribution: 'Pareto' is not one of"),
        ((0, 0.5, 1, "Gamma", 1), r"row 1 has 5 fields, expected 6"),
        ((0, 0.5, 1, "Weibull", 0, 1), r"row 1: Weibull shape and scale \(param1, param2\) must be positive"),
        ((600, 0.5, 1, "Gamma", 1, 1), r"row 2: window 600 s starts before the previous one"),
    ],
)
def test_servegen_bad_format_errors_name_file_row_and_problem(tmp_path, row, message):
    first = [(600, 0.5, 1, "Gamma", 1, 1)] if row[0] == 600 else []
    write_servegen(tmp_path / "sg", {4: [(0, 0.1, 1, "Gamma", 1, 1)], 5: first + [row]})
    with pytest.raises(TraceFormatError, match=message):
        import_servegen(tmp_path / "sg", open_location(tmp_path / "landing"), 1, START)
    assert not (tmp_path / "landing").exists()  # validated before anything is written


def test_servegen_missing_directory_files_and_clients(tmp_path):
    landing = open_location(tmp_path / "landing")
    with pytest.raises(TraceFormatError, match="does not exist"):
        import_servegen(tmp_path / "nope", landing, 1, START)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceFormatError, match="no chunk-N-trace.csv files"):
        import_servegen(tmp_path / "empty", landing, 1, START)
    sg_fixture(tmp_path / "sg")
    with pytest.raises(TraceFormatError, match=r"chunk-9-trace\.csv: file missing for requested client '9'"):
        import_servegen(tmp_path / "sg", landing, 1, START, clients=["0", "9"])


# ---------------------------------------------------------------- the real traces (slow)


def trace_dir() -> Path:
    root = Path(os.environ.get("WARMCAST_TRACE_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    if not root.is_dir():
        pytest.fail(f"real traces not found at {root}: set WARMCAST_TRACE_DIR to the folder holding azure_functions_2019_sample500/ and servegen_language_m_large/")
    return root


@pytest.mark.slow
def test_real_azure_functions_trace_imports_every_invocation(tmp_path):
    src = trace_dir() / "azure_functions_2019_sample500"
    with open(src / "invocations.csv", newline="") as f:
        rows = list(csv.reader(f))
    expected = sum(int(c) for row in rows[1:] for c in row[4:])
    summary = import_azure_functions(src, open_location(tmp_path / "landing"), 0, START)
    assert summary.rows == expected  # ~3.0 M
    assert summary.users == len({r[0] for r in rows[1:]}) and summary.programs == len({r[2] for r in rows[1:] if any(c != "0" for c in r[4:])})
    assert summary.start_ts >= START + timedelta(hours=8) and summary.end_ts < START + timedelta(hours=16)
    assert summary.defaulted == {}
    sample = pq.read_table(sorted((tmp_path / "landing").rglob("*.parquet"))[0])
    assert sample.schema.equals(REQUEST_LOG) and len(sample) > 0


@pytest.mark.slow
def test_real_servegen_trace_first_clients(tmp_path):
    # the full trace implies ~237 M requests (several minutes); the first five clients ~3.7 M
    src = trace_dir() / "servegen_language_m_large"
    clients = [str(i) for i in range(5)]
    expected = 0
    for c in clients:
        with open(src / f"chunk-{c}-trace.csv", newline="") as f:
            expected += sum(round(float(r[1]) * 600) for r in csv.reader(f))
    summary = import_servegen(src, open_location(tmp_path / "landing"), 0, START, clients=clients)
    assert summary.rows == expected
    assert summary.users == 5
    assert summary.start_ts >= START and summary.end_ts < START + timedelta(days=14)
    sample = pq.read_table(sorted((tmp_path / "landing").rglob("*.parquet"))[0])
    assert sample.schema.equals(REQUEST_LOG) and len(sample) > 0


@pytest.mark.slow
def test_real_azure_trace_through_ingest_and_demand(tmp_path):
    """The whole foundation on real data: every imported invocation reaches the lake or quarantine,
    and the demand series counts each arrival once."""
    from pipeline.config import load_settings
    from pipeline.demand import demand_from_lake
    from pipeline.ingest import ingest_interval

    summary = import_azure_functions(trace_dir() / "azure_functions_2019_sample500", open_location(tmp_path / "landing"), 0, START)
    settings = load_settings(overrides={"landing": str(tmp_path / "landing"), "lake": str(tmp_path / "lake")}, environ={})
    report = ingest_interval(settings, START, START + timedelta(days=1))
    assert report.rows_in == summary.rows
    assert report.rows_valid + report.rows_quarantined == report.rows_in
    assert report.gate_passed and report.rows_quarantined == 0, report.reasons
    demand = demand_from_lake(open_location(tmp_path / "lake"), START, START + timedelta(days=1))
    assert sum(demand.column("requests").to_pylist()) == summary.rows
    assert len(set(demand.column("user_id").to_pylist())) == summary.users
