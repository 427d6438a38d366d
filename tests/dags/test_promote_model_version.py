"""The promote_model_version DAG through ``dag.test()``: a manual rollback from the Airflow UI."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.dags.conftest import read_xcom, task_states

DAG_ID = "promote_model_version"
DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "promote_model_version.py"
WINDOW = (datetime(2026, 11, 2, tzinfo=timezone.utc), datetime(2026, 11, 5, tzinfo=timezone.utc))


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAG_FILE)
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def publish_versions(lake: Path, n: int) -> list[str]:
    """``n`` versions in both entries of the store, as publish_version writes them (global first)."""
    import torch

    from models.store import ModelStore

    versions = []
    for i in range(n):
        version = ModelStore.new_version()
        ModelStore(str(lake), "global").save(["global"], {"w": torch.full((1, 3), float(i))}, version=version, training_window=WINDOW)
        ModelStore(str(lake), "users").save(["a", "b"], {"w": torch.full((2, 3), float(i))}, version=version, training_window=WINDOW)
        versions.append(version)
    return versions


def latest(lake: Path) -> tuple[str | None, str | None]:
    from models.store import ModelStore

    return ModelStore(str(lake), "users").latest_version(), ModelStore(str(lake), "global").latest_version()


def test_dag_shape(dag):
    from airflow.sdk import Asset

    assert dag.schedule is None and dag.max_active_runs == 1 and dag.task_ids == ["promote"]
    assert dag.params["version"] == "previous"
    assert dag.get_task("promote").outlets == [Asset(name="warmcast.user_models", group="warmcast")]


def test_roll_back_to_the_previous_version_then_forward_again(dag, warmcast_env):
    _, lake = warmcast_env
    v1, v2, v3 = publish_versions(lake, 3)
    assert latest(lake) == (v3, v3)

    dr = dag.test()  # the default: the version before the current latest
    assert dr.state == "success", task_states(dr)
    assert read_xcom(dr, "promote") == {"previous": v3, "latest": v2}
    assert latest(lake) == (v2, v2)

    dr = dag.test()  # again: one further back
    assert dr.state == "success" and latest(lake) == (v1, v1)
    dr = dag.test()  # nothing before v1: the run fails, latest stays
    assert dr.state == "failed" and latest(lake) == (v1, v1)

    dr = dag.test(run_conf={"version": v3})  # forward again, by id
    assert dr.state == "success", task_states(dr)
    assert read_xcom(dr, "promote") == {"previous": v1, "latest": v3} and latest(lake) == (v3, v3)


def test_a_corrupt_or_unknown_version_is_refused_and_latest_stays(dag, warmcast_env):
    _, lake = warmcast_env
    v1, v2 = publish_versions(lake, 2)
    shard = lake / "models" / "global" / "versions" / v1 / "shard-00000.pt"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    for conf in ({"version": v1}, {"version": "20990101T000000000000Z-abcdef"}, {"version": "../../etc"}):
        dr = dag.test(run_conf=conf)
        assert dr.state == "failed", conf
        assert task_states(dr)["promote"] == "failed"
        assert latest(lake) == (v2, v2)
