"""Airflow for the DAG tests: a throw-away AIRFLOW_HOME with a migrated SQLite metadata DB.

Airflow reads its configuration once, when it is first imported, so the environment below is
set when pytest imports this conftest, before any test module under ``tests/dags`` imports
airflow. Only ``tests/dags`` pays for Airflow: ``tests/pipeline`` and the rest never import it,
and the one ``airflow db migrate`` (about 3 s) runs in the session fixture :func:`airflow_db`,
which only DAG tests request.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "dags"

if "airflow" in sys.modules:  # its config is already read; the settings below would be ignored
    raise RuntimeError(
        "airflow was imported before tests/dags/conftest.py could point AIRFLOW_HOME at a temporary "
        "folder; the DAG tests would use (and migrate) the real ~/airflow. Import airflow lazily."
    )

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="warmcast-airflow-home-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, True)

AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__DATABASE__LOAD_DEFAULT_CONNECTIONS": "False",
    # Parse every DAG file (the DagBag test must see a broken file, not skip it heuristically).
    "AIRFLOW__CORE__DAG_DISCOVERY_SAFE_MODE": "False",
}
# Drop Airflow settings inherited from the shell (a developer's own AIRFLOW__* exports).
for _key in [k for k in os.environ if k.startswith("AIRFLOW__") or k == "AIRFLOW_CONFIG"]:
    del os.environ[_key]
os.environ.update(AIRFLOW_ENV)

#: Seconds the session's ``airflow db migrate`` took; the tests print it.
MIGRATE_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrate the session's SQLite metadata DB once (a subprocess, same environment); its path."""
    airflow = Path(sys.executable).with_name("airflow")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(airflow), "db", "migrate"], env=os.environ.copy(), capture_output=True, text=True, timeout=300
    )
    MIGRATE_SECONDS["db_migrate"] = time.perf_counter() - t0
    if proc.returncode != 0:
        pytest.fail(f"airflow db migrate failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    print(f"\nairflow db migrate: {MIGRATE_SECONDS['db_migrate']:.1f} s ({AIRFLOW_HOME})")
    return AIRFLOW_HOME / "airflow.db"


@pytest.fixture
def warmcast_env(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A fresh landing folder and lake for one test, named by ``WARMCAST_*`` for the DAG's tasks.

    ``dag.test()`` runs tasks in this process, so ``load_settings()`` inside a task reads these.
    """
    for key in [k for k in os.environ if k.startswith("WARMCAST_")]:
        monkeypatch.delenv(key)
    landing, lake = tmp_path / "landing", tmp_path / "lake"
    monkeypatch.setenv("WARMCAST_LANDING", str(landing))
    monkeypatch.setenv("WARMCAST_LAKE", str(lake))
    return landing, lake


# --- a small lake for the model DAGs -------------------------------------------------------------

#: A tiny fleet of small instances so a few synthetic users move the group (moto does not check sizes).
TEST_FLEET = """
[defaults]
mode = "scale"
target_utilisation = 0.7
hysteresis = 0.0
scale_in_grace_s = 900
max_step = 50
availability_zones = ["us-east-1a"]
instance_type = "t3.micro"

[[pools]]
name = "general"
vcpu = 1
memory_gb = 2
hourly_price_usd = 0.01
boot_s = 120
min_size = 1
max_size = 60
warm_max_size = 5
"""


def write_requests(lake: Path, table: pa.Table, name: str) -> list[Path]:
    """Write request-log rows into the lake's hour partitions as ``<name>.parquet`` (one file per
    hour), as ingest would have; returns the files."""
    from pipeline.schemas import REQUEST_LOG

    table = table.cast(REQUEST_LOG)
    ts_type = table.schema.field("ts").type
    out = []
    for h in sorted({t.replace(minute=0, second=0, microsecond=0) for t in table["ts"].to_pylist()}):
        in_hour = pc.and_(pc.greater_equal(table["ts"], pa.scalar(h, ts_type)), pc.less(table["ts"], pa.scalar(h + timedelta(hours=1), ts_type)))
        path = lake / "request_logs" / f"date={h:%Y-%m-%d}" / f"hour={h:%H}" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(in_hour), path)
        out.append(path)
    return out


def make_lake(root: Path, *, users: int, start, days: float, seed: int) -> tuple[Path, Path]:
    """``days`` of generated requests from ``start`` in ``root/lake``, and ``root/landing`` holding only
    the users' profiles (``_users.csv``); returns ``(landing, lake)``."""
    from pipeline.generate import USERS_FILE, generate_requests, profiles_csv, user_profiles

    landing, lake = root / "landing", root / "lake"
    landing.mkdir(parents=True, exist_ok=True)
    (landing / USERS_FILE).write_bytes(profiles_csv(user_profiles(users, seed)))
    write_requests(lake, pa.concat_tables(list(generate_requests(users=users, days=days, start=start, seed=seed))), "generated")
    return landing, lake


def read_xcom(dr, task_id: str, map_index: int = -1):
    """A task's return value (XCom) in run ``dr``."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=dr.run_id, dag_ids=dr.dag_id, task_ids=task_id,
                                                 key="return_value", map_indexes=map_index)).first()
        assert row is not None, f"{task_id}[{map_index}] pushed no return value"
        return XComModel.deserialize_value(row)


def task_states(dr) -> dict[str, str]:
    """``task_id`` (``task_id[i]`` for a mapped instance) → state."""
    return {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): ti.state for ti in dr.get_task_instances()}
