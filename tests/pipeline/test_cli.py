"""The warmcast command: subcommands end to end, exit codes, clear errors."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main

START = "2026-11-02T09:00:00Z"


@pytest.fixture(autouse=True)
def _no_warmcast_env(monkeypatch):
    for key in ("WARMCAST_CONFIG", "WARMCAST_LAKE", "WARMCAST_LANDING"):
        monkeypatch.delenv(key, raising=False)


def test_generate_ingest_demand_round_trip(tmp_path, capsys):
    landing, lake, out = tmp_path / "landing", tmp_path / "lake", tmp_path / "demand.parquet"
    assert main(["generate", "--users", "12", "--days", "0.125", "--start", START, "--out", str(landing), "--seed", "3", "--format", "csv"]) == 0
    assert (landing / "_users.csv").exists()
    assert main(["ingest", "--landing", str(landing), "--lake", str(lake), "--start", START, "--end", "2026-11-02T12:00:00Z", "--run-hours", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("gate passed") == 3 and "0 to quarantine" in text
    assert main(["demand", "--lake", str(lake), "--since", START, "--until", "2026-11-02T12:00:00Z", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "demand series:" in text and "top users by mean cpu cores" in text
    demand = pq.read_table(out)
    assert demand.num_rows > 0 and set(demand.column_names) == {"user_id", "ts", "requests", "cpu_cores", "memory_gb", "gpus"}


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    (tmp_path / "landing").mkdir()
    common = ["--landing", str(tmp_path / "landing"), "--lake", str(tmp_path / "lake")]
    assert main(["ingest", *common, "--start", "2026-11-02T09:01:00Z", "--end", "2026-11-02T09:05:00Z"]) == 2
    assert "not on the 5-minute slot grid" in capsys.readouterr().err
    assert main(["ingest", "--landing", str(tmp_path / "missing"), "--lake", str(tmp_path / "lake"), "--start", START, "--end", "2026-11-02T09:05:00Z"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "lake").exists()
    with pytest.raises(SystemExit):  # argparse refuses a time without a zone
        main(["ingest", *common, "--start", "2026-11-02T09:00:00", "--end", "2026-11-02T09:05:00Z"])
    assert "has no time zone" in capsys.readouterr().err
    assert main(["import", "azure-functions", str(tmp_path / "nope"), "--out", str(tmp_path / "l2")]) == 2
    assert "nope" in capsys.readouterr().err


def test_gate_failure_exits_1(tmp_path, capsys):
    part = tmp_path / "landing" / "date=2026-11-02" / "hour=09"
    part.mkdir(parents=True)
    header = "request_id,user_id,program_id,software_config,ts,duration_s,cpu_cores,memory_mb,gpus"
    (part / "a.csv").write_text(header + "\n" + "\n".join(f"r{i},u1,p,c,{START},-1,1,1,0" for i in range(300)) + "\n")
    rc = main(["ingest", "--landing", str(tmp_path / "landing"), "--lake", str(tmp_path / "lake"), "--start", START, "--end", "2026-11-02T10:00:00Z"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "failed its validation gate" in captured.err and "quarantine_share" in captured.err


def test_demo_on_small_defaults(tmp_path, capsys):
    rc = main(["demo", "--landing", str(tmp_path / "landing"), "--lake", str(tmp_path / "lake"), "--users", "8", "--days", "0.5", "--skip-models"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[3/6] demand series" in out and "8 users" in out


def test_train_then_forecast_from_the_lake(tmp_path, capsys):
    landing, lake = str(tmp_path / "landing"), str(tmp_path / "lake")
    assert main(["demo", "--landing", landing, "--lake", lake, "--users", "6", "--days", "3.5", "--skip-models"]) == 0
    until = "2026-11-05T12:00:00Z"
    assert main(["train", "--lake", lake, "--until", until, "--days", "3.5", "--epochs", "2", "--global-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "model version" in out and "6 users" in out and "last_value" in out
    fc = tmp_path / "fc.parquet"
    assert main(["forecast", "--lake", lake, "--at", until, "--out", str(fc)]) == 0
    table = pq.read_table(fc)
    assert table.num_rows == 6 * 6 * 4  # users x horizons x resources
    assert all(v.startswith("lstm:") for v in table.column("model_version").to_pylist())
    # forecasting needs a trained model: a clear error, exit 2
    assert main(["forecast", "--lake", str(tmp_path / "empty-lake"), "--at", until, "--out", str(fc)]) == 2
    assert "run `warmcast train` first" in capsys.readouterr().err


def test_ingest_never_loads_torch_or_airflow(tmp_path):
    (tmp_path / "landing").mkdir()
    code = (
        "import sys; from pipeline.cli import main; "
        f"rc = main(['ingest', '--landing', {str(tmp_path / 'landing')!r}, '--lake', {str(tmp_path / 'lake')!r}, "
        "'--start', '2026-11-02T09:00:00Z', '--end', '2026-11-02T09:05:00Z']); "
        "assert rc == 0, rc; bad = [m for m in ('torch', 'airflow', 'lightning') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_demo_end_to_end_fills_the_forecast_store(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WARMCAST_STORE_URL", f"sqlite:///{tmp_path}/db/warmcast.db")
    rc = main(["demo", "--landing", str(tmp_path / "landing"), "--lake", str(tmp_path / "lake"), "--users", "6", "--days", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[5/6]" in out and "stored 144 user" in out
    assert "topdown_empirical" in out and "sizes pools for the 'reconciled_target' upper bound" in out
    assert "[6/6] scaling the fleet" in out and "bootstrap: 3 Auto Scaling groups created" in out

    from pipeline.forecast_store import ForecastStore

    store = ForecastStore(f"sqlite:///{tmp_path}/db/warmcast.db")
    assert store.count("user_forecasts") == 6 * 6 * 4
    assert store.count("system_forecasts") > 0
    assert list((tmp_path / "lake" / "forecasts" / "system").rglob("*.parquet"))  # the Parquet copy
    # [6/6]: the scaler's cycle ran against the local endpoint and its decisions were recorded
    issued = datetime(2026, 11, 5, 23, 0, tzinfo=timezone.utc)
    decisions = store.read_decisions(issued, issued + timedelta(seconds=1)).to_pylist()
    active = {d["pool"]: d for d in decisions if d["pool_kind"] == "active"}
    assert set(active) == {"general", "memory", "gpu"}
    assert not any(d["dry_run"] for d in decisions)
    assert any(d["applied"] and d["target"] > d["current"] for d in active.values())  # real calls made
    applied = sum(1 for d in decisions if d["applied"])
    assert f"{applied} of {len(decisions)} decisions applied" in out


def test_demo_skip_scale_stops_after_the_forecast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WARMCAST_STORE_URL", f"sqlite:///{tmp_path}/db/warmcast.db")
    rc = main(["demo", "--landing", str(tmp_path / "landing"), "--lake", str(tmp_path / "lake"), "--users", "4",
               "--days", "3", "--skip-scale"])
    assert rc == 0
    assert "[5/6]" in capsys.readouterr().out

    from pipeline.forecast_store import ForecastStore

    assert ForecastStore(f"sqlite:///{tmp_path}/db/warmcast.db").count("scaling_decisions") == 0
