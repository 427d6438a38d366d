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
from pathlib import Path

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
