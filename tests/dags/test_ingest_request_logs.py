"""The ingest_request_logs DAG: it parses fast and thin, and its runs ingest their own slot.

``dag.test()`` runs the real task (and the real :mod:`pipeline.ingest`) in this process against
a temporary landing folder and lake, on the session's migrated SQLite metadata DB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.landing import write_landing
from pipeline.schemas import REQUEST_LOG
from pipeline.storage import open_location

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
DAG_ID = "ingest_request_logs"
DAG_FILE = DAGS_FOLDER / "ingest_request_logs.py"
UTC = timezone.utc
SLOT = timedelta(minutes=5)

#: Modules a DAG file must not pull in at parse time (the scheduler parses it every 30 s).
HEAVY_MODULES = ("pyarrow", "pandas", "numpy", "torch", "great_expectations", "boto3", "pipeline.ingest")


def request_rows(times: list[datetime], prefix: str) -> pa.Table:
    """Request-log rows arriving at ``times``; ids ``<prefix>-<i>``."""
    n = len(times)
    return pa.table(
        {
            "request_id": [f"{prefix}-{i}" for i in range(n)],
            "user_id": [f"user-{i % 3}" for i in range(n)],
            "program_id": ["prog-1"] * n,
            "software_config": ["python-3.12"] * n,
            "ts": times,
            "duration_s": [30.0 + i for i in range(n)],
            "cpu_cores": [1.0] * n,
            "memory_mb": [512.0] * n,
            "gpus": [0.0] * n,
        },
        schema=REQUEST_LOG,
    )


def land(landing: Path, table: pa.Table, name: str) -> None:
    write_landing(open_location(landing), table, name, "parquet")


def spread(start: datetime, n: int) -> list[datetime]:
    """``n`` arrival times spread over the slot starting at ``start`` (first at the start itself)."""
    return [start + timedelta(seconds=i * 299 // max(n - 1, 1)) for i in range(n)]


def slot_file(lake: Path, slot_start: datetime) -> Path:
    return lake / "request_logs" / f"date={slot_start:%Y-%m-%d}" / f"hour={slot_start:%H}" / f"{slot_start:%Y%m%dT%H%M%SZ}.parquet"


def lake_files(lake: Path) -> list[Path]:
    """Published slot files of the request_logs table (not staging, hidden or validation files)."""
    root = lake / "request_logs"
    return sorted(p for p in root.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))


def read_ids(path: Path) -> list[str]:
    return pq.read_table(path)["request_id"].to_pylist()


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAG_FILE)
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def run_dag(dag, **kwargs):
    """``dag.test(**kwargs)``; returns the run and prints how long it took."""
    t0 = time.perf_counter()
    dr = dag.test(**kwargs)
    print(f"dag.test({', '.join(f'{k}={v}' for k, v in kwargs.items())}): {time.perf_counter() - t0:.1f} s")
    return dr


def task_states(dr) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def ingest_report(dr) -> dict:
    """The ``ingest`` task's return value (its XCom), as the next task would receive it."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(run_id=dr.run_id, dag_ids=dr.dag_id, task_ids="ingest", key="return_value")
        ).first()
        assert row is not None, "the ingest task pushed no report"
        return XComModel.deserialize_value(row)


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dag_file", sorted(DAGS_FOLDER.glob("*.py")), ids=lambda p: p.name)
def test_dag_file_parses_fast_without_heavy_imports(dag_file):
    # A fresh interpreter, as the DAG processor has: airflow.sdk is loaded, the DAG file is not.
    probe = f"""
import importlib.util, json, sys, time
import airflow.sdk
before = set(sys.modules)
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location("dag_under_test", {str(dag_file)!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
heavy = {HEAVY_MODULES!r}
new = set(sys.modules) - before
print(json.dumps({{"seconds": time.perf_counter() - t0,
                  "loaded": sorted(h for h in heavy if any(m == h or m.startswith(h + ".") for m in new))}}))
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], f"{dag_file.name} imports heavy modules at parse time: {result['loaded']}"
    assert result["seconds"] < 1.0, f"{dag_file.name} took {result['seconds']:.2f} s to parse"


def test_dagbag_has_no_import_errors(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAGS_FOLDER)
    assert bag.import_errors == {}
    assert DAG_ID in bag.dag_ids
    stat = next(s for s in bag.dagbag_stats if Path(s.file).name == DAG_FILE.name)
    assert stat.duration < timedelta(seconds=1), f"parse took {stat.duration}"


def test_dag_shape(dag):
    from airflow.sdk import Asset

    assert list(dag.task_ids) == ["ingest"]
    assert dag.schedule == "*/5 * * * *"
    assert dag.catchup is True
    assert 1 <= dag.max_active_runs <= 8
    assert dag.start_date is not None and dag.start_date.tzinfo is not None
    task = dag.get_task("ingest")
    assert task.retries >= 1 and task.retry_delay > timedelta(0)
    # The Asset downstream DAGs schedule on.
    assert task.outlets == [Asset(name="warmcast.request_logs", group="warmcast")]
    assert "warmcast" in dag.tags


# --- runs ----------------------------------------------------------------------------------------

LOGICAL = datetime(2026, 11, 28, 10, 5, tzinfo=UTC)  # covers [10:00, 10:05)


def test_scheduled_run_ingests_exactly_its_interval(dag, warmcast_env):
    landing, lake = warmcast_env
    start = LOGICAL - SLOT
    inside = request_rows(spread(start, 7), "in")
    before = request_rows(spread(start - SLOT, 3), "before")  # [09:55, 10:00): previous hour
    after = request_rows(spread(LOGICAL, 4), "after")  # [10:05, 10:10): same hour file
    land(landing, pa.concat_tables([inside, after]), "batch-a")
    land(landing, before, "batch-b")

    dr = run_dag(dag, logical_date=LOGICAL)

    assert dr.state == "success", task_states(dr)
    assert lake_files(lake) == [slot_file(lake, start)]
    table = pq.read_table(slot_file(lake, start))
    assert sorted(table["request_id"].to_pylist()) == sorted(inside["request_id"].to_pylist())
    ts = table["ts"].to_pylist()
    assert min(ts) >= start and max(ts) < LOGICAL
    report = ingest_report(dr)
    assert report["rows_valid"] == 7 and report["rows_quarantined"] == 0


def test_run_emits_the_lake_asset_event(dag, warmcast_env):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    landing, _ = warmcast_env
    land(landing, request_rows(spread(LOGICAL - SLOT, 2), "ev"), "batch")

    dr = run_dag(dag, logical_date=LOGICAL)

    assert dr.state == "success", task_states(dr)
    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == "warmcast.request_logs", AssetEvent.source_run_id == dr.run_id)
        ).all()
    assert len(events) == 1


def test_backfilled_past_interval_processes_only_its_own_slot(dag, warmcast_env):
    landing, lake = warmcast_env
    old_logical = datetime(2026, 11, 20, 3, 30, tzinfo=UTC)  # covers [03:25, 03:30) a week earlier
    old_start = old_logical - SLOT
    old = request_rows(spread(old_start, 5), "old")
    old_next = request_rows(spread(old_logical, 5), "old-next")  # the slot after, same hour
    recent = request_rows(spread(LOGICAL - SLOT, 6), "recent")
    land(landing, pa.concat_tables([old, old_next]), "old-batch")
    land(landing, recent, "recent-batch")

    dr = run_dag(dag, logical_date=old_logical)

    assert dr.state == "success", task_states(dr)
    assert lake_files(lake) == [slot_file(lake, old_start)]
    assert sorted(read_ids(slot_file(lake, old_start))) == sorted(old["request_id"].to_pylist())


def test_rerun_of_the_same_logical_date_does_not_duplicate_rows(dag, warmcast_env):
    landing, lake = warmcast_env
    start = LOGICAL - SLOT
    first = request_rows(spread(start, 6), "r")
    land(landing, first, "batch-1")

    assert run_dag(dag, logical_date=LOGICAL).state == "success"
    assert sorted(read_ids(slot_file(lake, start))) == sorted(first["request_id"].to_pylist())

    dr = run_dag(dag, logical_date=LOGICAL)

    assert dr.state == "success", task_states(dr)
    assert lake_files(lake) == [slot_file(lake, start)]
    ids = read_ids(slot_file(lake, start))
    assert len(ids) == len(set(ids)) == 6
    assert sorted(ids) == sorted(first["request_id"].to_pylist())


def test_manual_run_without_logical_date_ingests_the_last_complete_slot(dag, warmcast_env):
    landing, lake = warmcast_env
    triggered = datetime(2026, 11, 28, 10, 7, 30, tzinfo=UTC)  # mid-slot: [10:05, 10:10) is incomplete
    complete = request_rows(spread(datetime(2026, 11, 28, 10, 0, tzinfo=UTC), 4), "done")
    incomplete = request_rows([datetime(2026, 11, 28, 10, 5, tzinfo=UTC) + timedelta(seconds=s) for s in (0, 60, 120)], "open")
    land(landing, pa.concat_tables([complete, incomplete]), "batch")

    dr = run_dag(dag, logical_date=None, run_after=triggered)

    assert dr.state == "success", task_states(dr)
    assert dr.logical_date is None
    start = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert lake_files(lake) == [slot_file(lake, start)]
    assert sorted(read_ids(slot_file(lake, start))) == sorted(complete["request_id"].to_pylist())


def test_failed_validation_gate_fails_the_run_and_publishes_nothing(dag, warmcast_env, monkeypatch):
    # No retries here: dag.test() would otherwise sit out the retry delay before failing.
    monkeypatch.setattr(dag.get_task("ingest"), "retries", 0)
    # 3 of 10 rows have a negative duration: a 30 % quarantine share, over the 5 % gate (which a
    # small batch only meets when the share gate applies to it).
    monkeypatch.setenv("WARMCAST_INGEST__MAX_QUARANTINE_SHARE", "0.05")
    monkeypatch.setenv("WARMCAST_INGEST__SHARE_GATE_MIN_ROWS", "1")
    landing, lake = warmcast_env
    start = LOGICAL - SLOT
    rows = request_rows(spread(start, 10), "bad")
    durations = pa.array([-1.0, -1.0, -1.0] + [30.0] * 7, pa.float64())
    land(landing, rows.set_column(rows.schema.get_field_index("duration_s"), "duration_s", durations), "batch")

    dr = run_dag(dag, logical_date=LOGICAL)

    assert dr.state == "failed"
    assert task_states(dr) == {"ingest": "failed"}
    assert lake_files(lake) == []
