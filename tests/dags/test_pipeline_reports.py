"""The pipeline_reports DAG through ``dag.test()``: a day's status and shadow reports in the lake."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from tests.dags.conftest import make_lake, read_xcom, task_states

DAG_ID = "pipeline_reports"
DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "pipeline_reports.py"
DAY = datetime(2026, 11, 2, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAG_FILE)
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def test_report_day():
    from pipeline.reports import report_day

    assert report_day(datetime(2026, 11, 3, tzinfo=timezone.utc), None) == (DAY, DAY + timedelta(days=1))
    assert report_day(None, datetime(2026, 11, 3, 13, 20, tzinfo=timezone.utc)) == (DAY, DAY + timedelta(days=1))


def test_a_day_with_decisions_gets_both_reports(dag, tmp_path, monkeypatch):
    from pipeline.config import load_settings
    from pipeline.forecast_store import ForecastStore
    from pipeline.schemas import SCALING_DECISION
    from pipeline.storage import open_location
    from scaler.fleet import load_fleet
    from pipeline.demand import system_demand_from_lake
    from scaler.shadow import demand_array, shadow_report

    landing, lake = make_lake(tmp_path, users=4, start=DAY, days=1.0, seed=3)
    db = f"sqlite:///{tmp_path}/warmcast.db"
    for key, value in {"WARMCAST_LAKE": lake, "WARMCAST_LANDING": landing, "WARMCAST_STORE_URL": db}.items():
        monkeypatch.setenv(key, str(value))
    store = ForecastStore(db)
    store.create_schema()
    rows = [{"decided_at": DAY + k * timedelta(minutes=5), "pool": "general", "pool_kind": "active", "current": 1,
             "target": 1 + k % 3, "applied": False, "dry_run": False, "reason": "shadow (forecast_only), not applied; mode=forecast_only"}
            for k in range(288)]
    store.write_decisions(pa.Table.from_pylist(rows, schema=SCALING_DECISION))

    dr = dag.test(logical_date=DAY + timedelta(days=1))
    assert task_states(dr) == {"report": "success"}
    out = read_xcom(dr, "report")
    folder = lake / "reports" / "date=2026-11-02"
    status = json.loads((folder / "status.json").read_text())
    assert status["at"] == "2026-11-03T00:00:00+00:00" and len(status["checks"]) == 6
    assert status["state"] == out["status"] == "fail"  # the lake was written without ingest runs: no validation results
    assert {c["name"]: c["state"] for c in status["checks"]}["ingest"] == "fail"
    shadow = json.loads((folder / "shadow.json").read_text())
    settings = load_settings()
    want = shadow_report(store.read_decisions(DAY - timedelta(minutes=20), DAY + timedelta(days=1)),
                         demand_array(system_demand_from_lake(open_location(str(lake)), DAY, DAY + timedelta(days=1))), DAY, DAY + timedelta(days=1),
                         load_fleet(settings.scaler.fleet))
    assert shadow == json.loads(json.dumps(want.to_dict()))
    assert shadow["buckets"] == 287 and shadow["pools"] == ["general"]  # from a boot time (general: 240 s) after 00:00
    assert out["shadow_short_share"]["proposed"] == shadow["proposed"]["short_bucket_share"]

    # the next day has no decisions: its status is written, its shadow report is not
    dr = dag.test(logical_date=DAY + timedelta(days=2))
    assert task_states(dr) == {"report": "success"}
    assert read_xcom(dr, "report")["shadow"] == "not written: no scaling decision that day"
    assert (lake / "reports" / "date=2026-11-03" / "status.json").exists()
    assert not (lake / "reports" / "date=2026-11-03" / "shadow.json").exists()


def test_an_unreachable_store_still_gets_the_status_report(tmp_path, monkeypatch):
    from pipeline.config import load_settings
    from pipeline.reports import write_daily_reports

    landing, lake = make_lake(tmp_path, users=2, start=DAY, days=0.1, seed=1)
    settings = load_settings(overrides={"lake": str(lake), "landing": str(landing),
                                        "store_url": "postgresql+psycopg://warmcast:s3cret@127.0.0.1:9/warmcast"}, environ={})
    out = write_daily_reports(settings, DAY, DAY + timedelta(days=1))
    assert out["checks"]["forecasts"] == "fail" and out["shadow"].startswith("not written: cannot read the scaling decisions")
    assert "s3cret" not in json.dumps(out) and "***" in out["shadow"]  # the password is masked
    status = json.loads((lake / "reports" / "date=2026-11-02" / "status.json").read_text())
    assert "s3cret" not in json.dumps(status)
