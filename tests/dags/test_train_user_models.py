"""The train_user_models DAG through ``dag.test()``: sharded training publishes whole versions only.

Tiny on purpose (5 generated users, a 2-day window, 1 epoch): the DAG's wiring and the model
store's publish protocol are under test here, not the model's accuracy (tests/models does that).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.dags.conftest import make_lake, read_xcom, task_states

DAG_ID = "train_user_models"
DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "train_user_models.py"
UTC = timezone.utc
START = datetime(2026, 11, 2, tzinfo=UTC)
DAY1 = START + timedelta(days=2)  # trains on [START, DAY1)
USERS = 5


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAG_FILE)
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


@pytest.fixture
def lake(tmp_path, monkeypatch, warmcast_env) -> Path:
    landing, lake = make_lake(tmp_path, users=USERS, start=START, days=3.0, seed=11)
    for key, value in {"WARMCAST_LAKE": lake, "WARMCAST_LANDING": landing, "WARMCAST_TRAIN__DAYS": "2",
                       "WARMCAST_TRAIN__EPOCHS": "1", "WARMCAST_TRAIN__GLOBAL_EPOCHS": "1", "WARMCAST_TRAIN__THREADS": "1",
                       "WARMCAST_TRAIN__HIDDEN": "16",  # [train] hidden reaches every task (and keeps them quick)
                       # 5 users in shards of 2 would need 3 tasks; at most 2 are allowed: 2 shards of 3 and 2
                       "WARMCAST_TRAIN__SHARD_SIZE": "2", "WARMCAST_TRAIN__MAX_SHARDS": "2"}.items():
        monkeypatch.setenv(key, str(value))
    return lake


def run_dag(dag, logical_date: datetime):
    t0 = time.perf_counter()
    dr = dag.test(logical_date=logical_date)
    print(f"dag.test({logical_date.isoformat()}): {time.perf_counter() - t0:.1f} s, {dr.state}")
    return dr


def stores(lake: Path):
    from models.store import ModelStore

    return ModelStore(str(lake), "users"), ModelStore(str(lake), "global")


def asset_events(dr) -> int:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return len(session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == "warmcast.user_models", AssetEvent.source_run_id == dr.run_id)).all())


def test_dag_shape(dag):
    from airflow.sdk import Asset
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    assert dag.schedule == "@daily" and dag.max_active_runs == 1
    assert set(dag.task_ids) == {"train_global", "train_shard", "publish"}
    assert isinstance(dag.get_task("train_shard"), MappedOperator)
    assert dag.get_task("publish").upstream_task_ids == {"train_global", "train_shard"}
    assert dag.get_task("publish").outlets == [Asset(name="warmcast.user_models", group="warmcast")]


def test_daily_runs_publish_whole_versions_and_fine_tune_from_the_day_before(dag, lake, monkeypatch):
    from models.persist import load_trained
    from pipeline.demand import demand_from_lake
    from pipeline.storage import open_location

    users, glob = stores(lake)
    dr = run_dag(dag, DAY1)

    assert dr.state == "success", task_states(dr)
    assert sorted(s for s in task_states(dr) if s.startswith("train_shard")) == ["train_shard[0]", "train_shard[1]"]
    published = read_xcom(dr, "publish")
    v1 = published["version"]
    assert users.versions() == [v1] and users.latest_version() == v1 and glob.versions() == [v1]
    in_window = set(demand_from_lake(open_location(str(lake)), START, DAY1)["user_id"].to_pylist())
    assert len(in_window) == USERS
    model = users.load_version(v1)
    assert set(model.user_ids) == in_window and len(model.user_ids) == USERS
    assert model.manifest["n_users"] == USERS and [s["n_users"] for s in model.manifest["shards"]] == [3, 2]
    assert model.metadata["fine_tuned_from"] is None
    assert users.training_window(v1) == (START, DAY1)
    _, trained = load_trained(open_location(str(lake)))  # the forecaster's view: every user, one global model
    assert trained.model.hidden == trained.global_model.hidden == 16
    assert trained.user_ids == model.user_ids and trained.global_model.n_users == 1
    assert asset_events(dr) == 1

    # A re-run of the same date: a new whole version, from the same starting point (not from v1).
    again = run_dag(dag, DAY1)
    assert again.state == "success", task_states(again)
    v2 = read_xcom(again, "publish")["version"]
    assert v2 != v1 and users.versions() == [v1, v2] and users.latest_version() == v2
    assert users.load_version(v2).metadata["fine_tuned_from"] is None
    assert users.load_version(v1).user_ids == model.user_ids  # the older version stays loadable

    # The next day fine-tunes from the newest version trained before it; with a retention of two
    # versions, publishing it deletes the oldest (both entries).
    assert read_xcom(again, "publish").get("pruned") is None  # no retention set: nothing pruned
    monkeypatch.setenv("WARMCAST_TRAIN__KEEP_VERSIONS", "2")
    day2 = run_dag(dag, DAY1 + timedelta(days=1))
    assert day2.state == "success", task_states(day2)
    v3 = read_xcom(day2, "publish")["version"]
    assert users.latest_version() == v3 and users.load_version(v3).metadata["fine_tuned_from"] == v2
    assert read_xcom(day2, "publish")["pruned"] == [v1]
    assert users.versions() == [v2, v3] and glob.versions() == [v2, v3]
    assert not (lake / "models" / "users" / "versions" / v1).exists()
    assert users.version_trained_before(DAY1 + timedelta(hours=12)) == v2  # what a forecast at that time uses


def test_a_failed_shard_publishes_nothing(dag, lake, monkeypatch):
    import models.persist

    real = models.persist.train_shard

    def fail_second(lake_loc, shard, config):
        if shard["shard"] == 1:
            raise RuntimeError("worker lost (simulated)")
        return real(lake_loc, shard, config)

    monkeypatch.setattr(models.persist, "train_shard", fail_second)
    monkeypatch.setitem(dag.get_task("train_shard").partial_kwargs, "retries", 0)  # no retry delay in dag.test()

    dr = run_dag(dag, DAY1)

    assert dr.state == "failed"
    states = task_states(dr)
    assert states["train_shard[0]"] == "success" and states["train_shard[1]"] == "failed", states
    assert states["publish"] == "upstream_failed"
    users, glob = stores(lake)
    version = read_xcom(dr, "train_global")[0]["version"]
    assert (lake / "models" / "users" / "versions" / version / "shard-00000.pt").is_file()  # half-written ...
    assert users.versions() == [] and users.latest_version() is None and glob.versions() == []  # ... never visible
    assert asset_events(dr) == 0
