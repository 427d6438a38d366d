"""Ingest: every row ends up in the lake or in quarantine with a reason; re-runs replace."""

from __future__ import annotations

import gzip
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_settings
from pipeline.generate import make_request_table
from pipeline.ingest import ValidationGateError, ingest_interval
from pipeline.intervals import IntervalError
from pipeline.landing import write_landing
from pipeline.readers import LandingFileError
from pipeline.storage import StorageError, open_location

UTC = timezone.utc
H10 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
PART = "date=2026-03-02/hour=10"
HEADER = "request_id,user_id,program_id,software_config,ts,duration_s,cpu_cores,memory_mb,gpus"


def _rows(n: int, start: datetime = H10, step_s: int = 60, prefix: str = "r", user: str = "u1") -> pa.Table:
    return make_request_table(
        [{"request_id": f"{prefix}{i}", "user_id": user, "ts": start + timedelta(seconds=i * step_s)} for i in range(n)]
    )


@pytest.fixture
def env(tmp_path: Path):
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    landing.mkdir()

    def settings(**ingest):
        ingest.setdefault("share_gate_min_rows", 10**9)  # unit tests check rows, not the share gate
        return load_settings(overrides={"lake": str(lake), "landing": str(landing), "ingest": ingest}, environ={})

    class Env:
        pass

    e = Env()
    e.landing, e.lake, e.settings = landing, lake, settings
    e.loc = open_location(str(landing))

    def write(name: str, text: str | bytes, part: str = PART) -> Path:
        path = landing / part / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    e.write = write
    return e


def lake_rows(lake: Path, table: str = "request_logs") -> pa.Table:
    files = sorted((lake / table).rglob("*.parquet"))
    if not files:
        return pa.table({})
    return pa.concat_tables([pq.read_table(f) for f in files])


def quarantine(lake: Path) -> list[dict]:
    t = lake_rows(lake, "quarantine")
    return t.to_pylist() if t.num_columns else []


def ingest(env, start=H10, end=H10 + timedelta(hours=1), **ingest_settings):
    return ingest_interval(env.settings(**ingest_settings), start, end)


def test_clean_files_in_every_format_reach_the_lake(env):
    table = _rows(30)
    write_landing(env.loc, table.slice(0, 10), "a", "csv")
    write_landing(env.loc, table.slice(10, 10), "b", "jsonl", gzip_files=True)
    write_landing(env.loc, table.slice(20, 10), "c", "parquet")
    report = ingest(env)
    assert (report.rows_in, report.rows_valid, report.rows_quarantined) == (30, 30, 0)
    got = lake_rows(env.lake).sort_by("ts")
    assert got.column("request_id").to_pylist() == table.column("request_id").to_pylist()
    assert got.column("ts").to_pylist() == table.column("ts").to_pylist()
    # one file per 5-minute slot, named by the slot start, in hive partitions
    assert sorted(p.name for p in (env.lake / "request_logs" / PART).glob("*.parquet"))[0] == "20260302T100000Z.parquet"
    assert len(list((env.lake / "request_logs" / PART).glob("*.parquet"))) == 12


def test_rerun_and_backfill_never_duplicate(env):
    write_landing(env.loc, _rows(20), "a", "parquet")
    ingest(env)
    ingest(env)  # re-run of the same hour
    for k in range(12):  # back-fill the same hour as 5-minute runs, as Airflow does
        s = H10 + timedelta(minutes=5 * k)
        ingest(env, s, s + timedelta(minutes=5))
    assert lake_rows(env.lake).num_rows == 20
    assert len(set(lake_rows(env.lake).column("request_id").to_pylist())) == 20


def test_a_five_minute_run_takes_only_its_own_rows(env):
    write_landing(env.loc, _rows(20), "a", "parquet")  # one row a minute, 10:00 .. 10:19
    report = ingest(env, H10 + timedelta(minutes=5), H10 + timedelta(minutes=10))
    assert report.rows_in == 5
    got = lake_rows(env.lake)
    assert sorted(got.column("request_id").to_pylist()) == ["r5", "r6", "r7", "r8", "r9"]


def test_invariant_rows_in_equal_lake_plus_quarantine(env):
    lines = [HEADER]
    for i in range(40):
        lines.append(f"ok{i},u1,p,c,2026-03-02T10:{i:02d}:00Z,1,1,100,0")
    lines += [
        "neg1,u1,p,c,2026-03-02T10:01:00Z,-5,1,100,0",  # negative duration
        "neg2,u1,p,c,2026-03-02T10:01:00Z,5,-1,100,0",  # negative cores
        "big1,u1,p,c,2026-03-02T10:01:00Z,5,1,1e30,0",  # absurd memory
        "typ1,u1,p,c,2026-03-02T10:01:00Z,five,1,100,0",  # wrong type
        "ts1,u1,p,c,yesterday,5,1,100,0",  # unparseable ts
        "ts2,u1,p,c,2026-03-02T13:00:00Z,5,1,100,0",  # ts outside the file's hour
        "ok0,u1,p,c,2026-03-02T10:02:00Z,1,1,100,0",  # duplicate request_id in the file
        "short,u1,p,c",  # wrong column count
    ]
    env.write("a.csv", "\n".join(lines) + "\n")
    report = ingest(env)
    assert report.rows_in == 48
    assert report.rows_valid + report.rows_quarantined == report.rows_in
    assert lake_rows(env.lake).num_rows == 40
    q = {r["request_id"] or r["raw"]: r for r in quarantine(env.lake)}
    assert len(q) == 8
    assert q["neg1"]["reason"] == "negative duration_s"
    assert q["neg2"]["reason"] == "negative cpu_cores"
    assert q["big1"]["reason"].startswith("memory_mb above the limit")
    assert q["typ1"]["reason"] == "duration_s is not a number" and q["typ1"]["duration_s"] == "five"
    assert q["ts1"]["reason"] == "ts is not an ISO-8601 time with a zone"
    assert q["ts2"]["reason"].startswith("ts outside its landing partition hour")
    assert q["ok0"]["reason"].startswith("duplicate request_id")
    assert q["short,u1,p,c"]["reason"] == "CSV row has 4 columns, expected 9"
    # each names its file and line
    assert q["neg1"]["source_file"].endswith(f"{PART}/a.csv") and q["neg1"]["source_row"] == 42
    assert q["short,u1,p,c"]["source_row"] == 49


def test_bad_json_lines_and_types(env):
    good = {"request_id": "j1", "user_id": "u1", "program_id": "p", "software_config": "c", "ts": "2026-03-02T10:00:00Z",
            "duration_s": 1, "cpu_cores": 1, "memory_mb": 1, "gpus": 0}
    lines = [json.dumps(good), "{not json", "[1, 2]", json.dumps(good | {"request_id": "j2", "cpu_cores": "lots"}),
             json.dumps(good | {"request_id": "j3", "ts": "2026-03-02 10:00:00"})]
    env.write("a.jsonl", "\n".join(lines) + "\n")
    report = ingest(env)
    assert (report.rows_in, report.rows_valid, report.rows_quarantined) == (5, 1, 4)
    reasons = sorted(r["reason"] for r in quarantine(env.lake))
    assert reasons[0] == "JSON line is a list, not an object"
    assert reasons[1] == "cpu_cores is not a number"
    assert reasons[2].startswith("malformed JSON")
    assert reasons[3] == "ts is not an ISO-8601 time with a zone"
    raw = [r for r in quarantine(env.lake) if r["raw"]]
    assert {r["raw"] for r in raw} == {"{not json", "[1, 2]"}
    assert {r["source_row"] for r in raw} == {2, 3}


def test_missing_column_quarantines_the_rows(env):
    env.write("a.csv", HEADER.rsplit(",", 1)[0] + "\nm1,u1,p,c,2026-03-02T10:00:00Z,1,1,100\n")
    report = ingest(env)
    assert report.rows_quarantined == 1 and report.rows_valid == 0
    assert quarantine(env.lake)[0]["reason"] == "missing column gpus"


@pytest.mark.parametrize("user", ["../../etc/passwd", "a\x00b", "a\nb", "", ".hidden", "x" * 200])
def test_unsafe_user_ids_are_quarantined(env, user):
    table = make_request_table([{"request_id": "r1", "user_id": user, "ts": H10}])
    (env.landing / PART).mkdir(parents=True)
    pq.write_table(table, env.landing / PART / "a.parquet")
    report = ingest(env)
    assert report.rows_quarantined == 1 and report.rows_valid == 0
    row = quarantine(env.lake)[0]
    assert "user_id is not a well-formed id" in row["reason"] or row["reason"] == "missing user_id"
    assert row["user_id"] == user  # kept as it came, for the operator to see
    # nothing named after the user was created anywhere
    assert not any("passwd" in str(p) for p in env.lake.rglob("*"))


def test_duplicates_across_files_keep_the_first_copy(env):
    write_landing(env.loc, _rows(5), "a", "parquet")
    write_landing(env.loc, _rows(5, user="u2"), "b", "csv")  # same request ids, later file
    report = ingest(env)
    assert (report.rows_valid, report.rows_quarantined) == (5, 5)
    assert set(lake_rows(env.lake).column("user_id").to_pylist()) == {"u1"}
    assert {r["source_file"].rsplit("/", 1)[-1] for r in quarantine(env.lake)} == {"b.csv"}


def test_empty_files_and_no_files(env):
    env.write("empty.csv", "")
    env.write("header-only.csv", HEADER + "\n")
    env.write("empty.jsonl", "\n")
    report = ingest(env)
    assert report.rows_in == 0 and report.files_read == 3 and len(report.empty_files) == 3
    # an hour with no files at all: empty partitions, not a crash
    later = H10 + timedelta(hours=5)
    report = ingest(env, later, later + timedelta(minutes=5))
    assert report.rows_in == 0 and report.gate_passed
    empty = env.lake / "request_logs" / "date=2026-03-02" / "hour=15" / "20260302T150000Z.parquet"
    assert pq.read_table(empty).num_rows == 0


def test_missing_or_unreadable_landing_writes_nothing(env, tmp_path):
    settings = load_settings(overrides={"lake": str(env.lake), "landing": str(tmp_path / "nope")}, environ={})
    with pytest.raises(StorageError, match="does not exist"):
        ingest_interval(settings, H10, H10 + timedelta(minutes=5))
    assert not env.lake.exists()
    env.write("bad.parquet", b"PAR1 this is not parquet")
    with pytest.raises(LandingFileError, match=r"bad\.parquet"):
        ingest(env)
    os.remove(env.landing / PART / "bad.parquet")
    env.write("bad.csv.gz", b"not gzip at all")
    with pytest.raises(LandingFileError, match=r"bad\.csv\.gz"):
        ingest(env)
    assert not (env.lake / "request_logs").exists() or not list((env.lake / "request_logs").rglob("*.parquet"))


def test_interval_must_be_on_the_grid(env):
    with pytest.raises(IntervalError, match="slot grid"):
        ingest(env, H10 + timedelta(minutes=1), H10 + timedelta(minutes=6))
    with pytest.raises(IntervalError, match="not after"):
        ingest(env, H10, H10)


def test_gate_failure_publishes_nothing_and_keeps_the_result(env):
    write_landing(env.loc, _rows(10), "a", "parquet")
    ingest(env)
    before = lake_rows(env.lake).num_rows
    bad = "\n".join([HEADER] + [f"b{i},u1,p,c,2026-03-02T10:00:00Z,-1,1,1,0" for i in range(30)]) + "\n"
    env.write("b.csv", bad)
    with pytest.raises(ValidationGateError, match="quarantine_share") as err:
        ingest(env, share_gate_min_rows=1, max_quarantine_share=0.2)
    assert lake_rows(env.lake).num_rows == before  # previous state kept
    assert quarantine(env.lake) == []
    result = json.loads(Path(err.value.report.validation_file).read_text())
    assert result["report"]["gate_passed"] is False
    assert result["great_expectations"]["request_logs.batch"]["success"] is False
    assert not list((env.lake / "_staging").rglob("*.parquet")) if (env.lake / "_staging").exists() else True


def test_validation_result_is_stored_beside_the_partition(env):
    write_landing(env.loc, _rows(10), "a", "parquet")
    report = ingest(env)
    path = Path(report.validation_file)
    assert path.parent == env.lake / "request_logs" / PART and path.name.startswith("_validation-")
    doc = json.loads(path.read_text())
    rows_suite = doc["great_expectations"]["request_logs.rows"]
    assert rows_suite["success"] is True
    assert len(rows_suite["results"]) >= 13


def test_crash_mid_run_leaves_the_previous_state(env, monkeypatch):
    write_landing(env.loc, _rows(10), "a", "parquet")
    write_landing(env.loc, _rows(10, start=H10 + timedelta(hours=1), prefix="s"), "a", "parquet")
    ingest(env, H10, H10 + timedelta(hours=2))
    before = sorted(lake_rows(env.lake).column("request_id").to_pylist())
    write_landing(env.loc, _rows(15, start=H10 + timedelta(hours=1), prefix="t"), "b", "parquet")

    import pipeline.ingest as mod

    real = mod.read_landing_file

    def explode(landing, path):
        if path.endswith("/b.parquet"):
            raise RuntimeError("simulated crash")
        return real(landing, path)

    monkeypatch.setattr(mod, "read_landing_file", explode)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(env, H10, H10 + timedelta(hours=2))
    assert sorted(lake_rows(env.lake).column("request_id").to_pylist()) == before
    assert not list((env.lake / "_staging").rglob("*")) if (env.lake / "_staging").exists() else True


def test_quarantine_file_disappears_when_a_rerun_is_clean(env):
    env.write("a.csv", HEADER + "\nq1,u1,p,c,2026-03-02T10:00:00Z,-1,1,1,0\n")
    ingest(env)
    assert len(quarantine(env.lake)) == 1
    (env.landing / PART / "a.csv").write_text(HEADER + "\nq1,u1,p,c,2026-03-02T10:00:00Z,1,1,1,0\n")
    ingest(env)
    assert quarantine(env.lake) == [] and lake_rows(env.lake).num_rows == 1


def test_gzip_csv_and_absurd_values(env):
    text = HEADER + "\n" + "\n".join(
        [
            "g1,u1,p,c,2026-03-02T10:00:00Z,1,1,1,0",
            "g2,u1,p,c,2026-03-02T10:00:00Z,1e12,1,1,0",
            "g3,u1,p,c,2026-03-02T10:00:00Z,1,5000,1,0",
            "g4,u1,p,c,2026-03-02T10:00:00Z,1,1,1,1000",
        ]
    ) + "\n"
    env.write("a.csv.gz", gzip.compress(text.encode()))
    report = ingest(env)
    assert report.rows_valid == 1
    assert sorted(r["reason"].split(" above")[0] for r in quarantine(env.lake)) == ["cpu_cores", "duration_s", "gpus"]
