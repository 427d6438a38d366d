"""The forecast_and_scale DAG through ``dag.test()``: real lake, model store, SQLite store, moto.

One module-scoped lake (6 generated users over the last ~4 days, with one model version trained
on its first 3 days) is copied for every test, so a test may append to it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.dags.conftest import TEST_FLEET, make_lake, read_xcom, task_states, write_requests

DAG_ID = "forecast_and_scale"
DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "forecast_and_scale.py"
UTC = timezone.utc
NOW = datetime.now(UTC)
TODAY = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
START = TODAY - timedelta(days=4)
TRAIN_UNTIL = START + timedelta(days=3)
#: A historical issue time: after the model's training window, well before the wall clock.
PAST = TRAIN_UNTIL + timedelta(hours=2, minutes=5)
MUTATING = {"UpdateAutoScalingGroup", "SetDesiredCapacity", "PutWarmPool", "CreateOrUpdateTags", "DeleteWarmPool",
            "CreateAutoScalingGroup", "PutLifecycleHook", "SetInstanceProtection", "DeleteAutoScalingGroup"}


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=DAG_FILE)
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


@pytest.fixture(scope="module")
def trained_lake(tmp_path_factory) -> Path:
    """``<root>/landing`` (profiles) and ``<root>/lake`` (requests up to an hour past now, one model version)."""
    from models.persist import train_from_lake
    from models.train import TrainConfig
    from pipeline.storage import open_location

    root = tmp_path_factory.mktemp("forecast-dag")
    days = (NOW + timedelta(hours=1) - START) // timedelta(hours=1) / 24
    _, lake = make_lake(root, users=6, start=START, days=days, seed=5)
    t0 = time.perf_counter()
    train_from_lake(open_location(str(lake)), TRAIN_UNTIL, 3.0, TrainConfig(epochs=1, global_epochs=1))
    print(f"\ntrained the fixture's model version in {time.perf_counter() - t0:.1f} s")
    return root


def _configure(monkeypatch, root: Path) -> dict[str, Path]:
    fleet = root / "fleet.toml"
    fleet.write_text(TEST_FLEET)
    env = {"WARMCAST_LAKE": root / "lake", "WARMCAST_LANDING": root / "landing", "WARMCAST_STORE_URL": f"sqlite:///{root}/warmcast.db",
           "WARMCAST_SCALER__FLEET": fleet, "WARMCAST_AGGREGATE__N_PATHS": "200"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return {"lake": root / "lake", "landing": root / "landing", "db": root / "warmcast.db"}


@pytest.fixture
def env(tmp_path, monkeypatch, trained_lake, warmcast_env) -> dict[str, Path]:
    """A private copy of the trained lake, named by ``WARMCAST_*`` (store: SQLite in the copy)."""
    root = tmp_path / "copy"
    shutil.copytree(trained_lake, root)
    return _configure(monkeypatch, root)


@pytest.fixture
def aws(monkeypatch):
    """moto with the test fleet bootstrapped; yields ``(clients, calls)``: every AWS operation any
    client makes from then on (the DAG's own clients, built by the Airflow hook, included)."""
    import boto3
    import botocore.client
    from moto import mock_aws

    from scaler.aws import AwsClients
    from scaler.aws_bootstrap import bootstrap
    from scaler.fleet import fleet_from_dict

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", '{"conn_type": "aws", "extra": {"region_name": "us-east-1"}}')
    import tomllib

    with mock_aws():
        clients = AwsClients(boto3.client("autoscaling", region_name="us-east-1"), boto3.client("ec2", region_name="us-east-1"))
        bootstrap(clients, fleet_from_dict(tomllib.loads(TEST_FLEET)))
        calls: list[str] = []
        real = botocore.client.BaseClient._make_api_call

        def record(self, operation_name, api_params):
            calls.append(operation_name)
            return real(self, operation_name, api_params)

        monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", record)
        yield clients, calls


def run_dag(dag, logical_date: datetime):
    t0 = time.perf_counter()
    dr = dag.test(logical_date=logical_date)
    print(f"dag.test({logical_date.isoformat()}): {time.perf_counter() - t0:.1f} s, {dr.state}")
    return dr


def store():
    from pipeline.config import load_settings
    from pipeline.forecast_store import ForecastStore

    return ForecastStore(load_settings().store_url)


def desired(clients, name: str = "general") -> int:
    return clients.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["DesiredCapacity"]


# --- shape ---------------------------------------------------------------------------------------


def test_dag_shape(dag):
    assert dag.schedule == "1-59/5 * * * *"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert set(dag.task_ids) == {"plan", "forecast", "aggregate", "store", "scale"}
    assert dag.get_task("forecast").upstream_task_ids == {"plan"}
    assert dag.get_task("aggregate").upstream_task_ids == {"forecast"}
    assert dag.get_task("store").upstream_task_ids == {"forecast", "aggregate"}
    assert dag.get_task("scale").upstream_task_ids == {"store"}
    assert dag.get_task("store").retries >= 1  # an unreachable database is retried
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    assert isinstance(dag.get_task("forecast"), MappedOperator)


# --- runs ----------------------------------------------------------------------------------------


def test_backfilled_run_stores_its_forecast_and_makes_no_mutating_aws_call(dag, env, aws):
    clients, calls = aws
    before = desired(clients)
    dr = run_dag(dag, PAST)

    assert dr.state == "success", task_states(dr)
    users = store().read_user_forecasts(PAST)
    assert users.num_rows == 6 * 6 * 4  # 6 users x 6 horizons x 4 resources
    assert set(users["model_version"].to_pylist()) <= {f"lstm:{v}" for v in _versions(env)} | {f"lstm:{v}+global" for v in _versions(env)}
    system = store().read_system_forecasts(PAST, PAST + timedelta(seconds=1))
    assert system.num_rows > 0 and set(system["n_users"].to_pylist()) == {6}
    # the per-user forecasts summed, and reconciled with the system's own recent errors (what the scaler reads)
    assert {"tiered_target", "topdown_empirical", "reconciled_target"} <= set(system["method"].to_pylist())
    # ... unless the operator turns the top-down band off: the tiered target alone, from the same shards
    from pipeline.config import load_settings
    from pipeline.forecast_cycle import aggregate_issue

    env_settings = load_settings()
    off = dataclasses.replace(env_settings, aggregate=dataclasses.replace(env_settings.aggregate, topdown=False))
    shards = [read_xcom(dr, "forecast", i) for i in range(len(read_xcom(dr, "plan")))]
    written = aggregate_issue(off, PAST, shards)
    methods = set(pq.read_table(written["path"])["method"].to_pylist())
    assert "tiered_target" in methods and not methods & {"topdown_empirical", "reconciled_target"}
    # the Parquet copies beside the database rows
    day = env["lake"] / "forecasts"
    assert (day / "users" / f"date={PAST:%Y-%m-%d}" / f"{PAST:%Y%m%dT%H%M%SZ}-shard-00000.parquet").is_file()
    assert (day / "system" / f"date={PAST:%Y-%m-%d}" / f"{PAST:%Y%m%dT%H%M%SZ}.parquet").is_file()
    # the scaler planned, recorded dry-run decisions, and called nothing that mutates
    assert calls and not (set(calls) & MUTATING), calls
    assert desired(clients) == before
    decisions = store().read_decisions(PAST, PAST + timedelta(seconds=1)).to_pylist()
    assert decisions and all(d["dry_run"] and not d["applied"] for d in decisions)
    scaled = read_xcom(dr, "scale")
    assert scaled["dry_run"] and "historical run" in scaled["reasons"][0]


def _versions(env) -> list[str]:
    from models.store import ModelStore

    return ModelStore(str(env["lake"]), "users").versions()


def test_live_run_resizes_the_group_in_moto(dag, env, aws):
    clients, calls = aws
    from pipeline.intervals import floor_to_slot

    at = floor_to_slot(datetime.now(UTC), 5)
    assert desired(clients) == 1
    dr = run_dag(dag, at)

    assert dr.state == "success", task_states(dr)
    scaled = read_xcom(dr, "scale")
    assert scaled["dry_run"] is False and scaled["applied"] >= 1 and not scaled["failed"], scaled
    active = [d for d in store().read_decisions(at, at + timedelta(seconds=1)).to_pylist()
              if d["pool"] == "general" and d["pool_kind"] == "active"][0]
    assert active["applied"] and not active["dry_run"] and active["target"] > 1
    assert desired(clients) == active["target"]
    assert "UpdateAutoScalingGroup" in calls


def test_live_run_while_another_run_holds_the_scaler_lease_applies_nothing(dag, env, aws):
    """Two scaler runs at once: the one without the lease records and changes nothing, and says who holds it."""
    clients, calls = aws
    from pipeline.intervals import floor_to_slot
    from scaler.lease import ScalerLease

    other = ScalerLease(store(), owner="other-host:1:abc")
    store().create_schema()
    other.acquire()
    at = floor_to_slot(datetime.now(UTC), 5)
    dr = run_dag(dag, at)

    assert dr.state == "success", task_states(dr)
    scaled = read_xcom(dr, "scale")
    assert "other-host:1:abc" in scaled["skipped"] and scaled["applied"] == 0, scaled
    assert not MUTATING & set(calls), calls
    assert desired(clients) == 1
    assert store().read_decisions(at, at + timedelta(seconds=1)).num_rows == 0
    assert other.holder()["owner"] == "other-host:1:abc"  # the loser did not release someone else's lease


def test_live_run_with_subpools_creates_tagged_user_groups(dag, env, aws):
    """A fleet with ``[subpools]``: the live run gives users whose forecast needs them a tagged
    sub-pool group preloaded with their most-requested software (from the lake's request logs)."""
    clients, calls = aws
    from pipeline.intervals import floor_to_slot
    from scaler.subpools import SUBPOOL_PREFIX

    fleet = Path(str(env["lake"])).parent / "fleet.toml"
    fleet.write_text(fleet.read_text() + """
[subpools]
instance_type = "t3.nano"
vcpu = 0.25
memory_gb = 0.5
hourly_price_usd = 0.005
boot_s = 120
mode = "scale"
enter_instances = 0.5
exit_instances = 0.25
max_subpools = 3
max_size = 40
""")
    at = floor_to_slot(datetime.now(UTC), 5)
    dr = run_dag(dag, at)

    assert dr.state == "success", task_states(dr)
    groups = clients.autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"]
    subs = [g for g in groups if g["AutoScalingGroupName"].startswith(SUBPOOL_PREFIX)]
    assert 1 <= len(subs) <= 3, [(d["pool"], d["reason"]) for d in store().read_decisions(at, at + timedelta(seconds=1)).to_pylist()]
    from scaler.subpools import subpool_group_name

    for g in subs:
        tags = {t["Key"]: t["Value"] for t in g["Tags"]}
        # the owning user is a tag; the name is a hash of it, never the raw id
        assert g["AutoScalingGroupName"] == subpool_group_name(tags["warmcast:user"]), tags
        assert tags["warmcast:user"] not in g["AutoScalingGroupName"] and tags["warmcast:software-configs"], tags
    rows = [d for d in store().read_decisions(at, at + timedelta(seconds=1)).to_pylist() if d["pool_kind"] == "subpool"]
    assert rows and all(r["applied"] for r in rows if "action=create" in r["reason"]), rows
    assert "CreateAutoScalingGroup" in calls


def test_backfill_reads_nothing_from_after_its_issue_time(dag, env, aws):
    from models.persist import load_trained, save_trained
    from models.store import ModelStore
    from pipeline.generate import generate_requests
    from pipeline.storage import open_location

    first = run_dag(dag, PAST)
    assert first.state == "success", task_states(first)
    users_before = store().read_user_forecasts(PAST).to_pylist()
    system_before = store().read_system_forecasts(PAST, PAST + timedelta(seconds=1)).to_pylist()
    old_version = read_xcom(first, "plan")[0]["version"]

    # Later data (8 users: two new ones), some in the issue time's own hour, and a model version
    # whose training window ends after the issue time (what a later daily run would publish).
    late = pa.concat_tables(list(generate_requests(users=8, days=0.5, start=PAST, seed=99)))
    assert write_requests(env["lake"], late, "late")
    lake = open_location(str(env["lake"]))
    _, trained = load_trained(lake)
    newer = save_trained(lake, dataclasses.replace(trained, until=PAST + timedelta(hours=6)))
    assert ModelStore(lake, "users").latest_version() == newer != old_version

    again = run_dag(dag, PAST)

    assert again.state == "success", task_states(again)
    assert read_xcom(again, "plan")[0]["version"] == old_version
    assert store().read_user_forecasts(PAST).to_pylist() == users_before
    assert store().read_system_forecasts(PAST, PAST + timedelta(seconds=1)).to_pylist() == system_before
    # ... while a forecast issued after the new data does see it: the new users and the new version.
    later = PAST + timedelta(hours=7)
    assert run_dag(dag, later).state == "success"
    after = store().read_user_forecasts(later)
    assert len(set(after["user_id"].to_pylist())) == 8
    assert {v.split("+")[0] for v in after["model_version"].to_pylist()} == {f"lstm:{newer}"}


def test_without_a_model_users_get_the_flagged_fallback(dag, tmp_path, monkeypatch, warmcast_env, aws):
    make_lake(tmp_path, users=4, start=PAST - timedelta(days=2), days=2.0, seed=3)
    _configure(monkeypatch, tmp_path)

    dr = run_dag(dag, PAST)

    assert dr.state == "success", task_states(dr)
    assert read_xcom(dr, "plan")[0]["version"] is None
    rows = store().read_user_forecasts(PAST)
    assert len(set(rows["user_id"].to_pylist())) == 4
    assert set(rows["model_version"].to_pylist()) == {"fallback:baseline:last_value"}
    assert store().read_system_forecasts(PAST, PAST + timedelta(seconds=1)).num_rows > 0


def test_fallback_fail_refuses_to_forecast_without_a_model(tmp_path):
    from models.persist import NoModelError, forecast_users
    from pipeline.storage import open_location

    _, lake = make_lake(tmp_path, users=2, start=PAST - timedelta(days=1), days=1.0, seed=3)
    with pytest.raises(NoModelError, match="no model version .* was trained before .*run the train_user_models DAG"):
        forecast_users(open_location(str(lake)), PAST, ["user-0001"], None, fallback="fail")


def test_no_users_at_all_succeeds_stores_nothing_and_holds(dag, tmp_path, monkeypatch, warmcast_env, aws):
    clients, calls = aws
    (tmp_path / "lake").mkdir()
    (tmp_path / "landing").mkdir()
    _configure(monkeypatch, tmp_path)

    dr = run_dag(dag, PAST)

    assert dr.state == "success", task_states(dr)
    assert read_xcom(dr, "plan") == [{"shard": 0, "users": [], "version": None}]
    assert store().count("user_forecasts") == 0 and store().count("system_forecasts") == 0
    decisions = store().read_decisions(PAST, PAST + timedelta(seconds=1)).to_pylist()
    assert decisions and all(d["dry_run"] and not d["applied"] for d in decisions)
    assert any("no system forecast issued" in r for r in read_xcom(dr, "scale")["reasons"])
    assert not (set(calls) & MUTATING) and desired(clients) == 1


def test_unreachable_database_fails_store_clearly_and_keeps_the_parquet_copies(dag, env, aws, monkeypatch):
    from pipeline.config import load_settings
    from pipeline.forecast_cycle import store_issue
    from pipeline.forecast_store import StoreUnavailableError

    monkeypatch.setenv("WARMCAST_STORE_URL", "postgresql+psycopg://warmcast:s3cret@127.0.0.1:9/warmcast")
    monkeypatch.setattr(dag.get_task("store"), "retries", 0)  # dag.test() would sit out the retry delay

    dr = run_dag(dag, PAST)

    assert dr.state == "failed"
    states = task_states(dr)
    assert states["store"] == "failed" and states["scale"] == "upstream_failed", states
    assert states["aggregate"] == "success" and states["forecast[0]"] == "success"
    forecasts = env["lake"] / "forecasts"
    assert (forecasts / "users" / f"date={PAST:%Y-%m-%d}" / f"{PAST:%Y%m%dT%H%M%SZ}-shard-00000.parquet").is_file()
    assert (forecasts / "system" / f"date={PAST:%Y-%m-%d}" / f"{PAST:%Y%m%dT%H%M%SZ}.parquet").is_file()
    # the error the task raised (and logged): the database named, its password masked
    with pytest.raises(StoreUnavailableError) as err:
        store_issue(load_settings(), PAST, [read_xcom(dr, "forecast", 0)], read_xcom(dr, "aggregate"))
    assert "postgresql+psycopg://warmcast:***@127.0.0.1:9/warmcast is unreachable" in str(err.value)
    assert "s3cret" not in str(err.value)
