"""`warmcast aws bootstrap` then `warmcast scale` against a local AWS endpoint, as an operator runs them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.schemas import SCALING_DECISION, SYSTEM_FORECAST
from scaler.local_endpoint import LOCAL_CREDENTIALS, local_aws_endpoint


@pytest.fixture
def endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LOCAL_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LOCAL_CREDENTIALS["aws_secret_access_key"])
    for key in ("WARMCAST_CONFIG", "WARMCAST_SCALER__DRY_RUN"):
        monkeypatch.delenv(key, raising=False)
    with local_aws_endpoint() as url:
        yield url


def _forecast(path, issued_at: datetime, cpu: float) -> str:
    rows = [
        {"issued_at": issued_at, "horizon_min": h, "resource": r, "mean": m, "lower": 0.8 * m, "upper": 1.2 * m,
         "level": 0.9, "n_users": 10, "method": "test"}
        for h in (5, 10, 15, 20, 25, 30)
        for r, m in (("requests", 100.0), ("cpu_cores", cpu), ("memory_gb", 2 * cpu), ("gpus", 0.0))
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=SYSTEM_FORECAST), path)
    return str(path)


def _desired(url: str) -> dict[str, int]:
    asg = boto3.client("autoscaling", endpoint_url=url, region_name="us-east-1")
    return {g["AutoScalingGroupName"]: g["DesiredCapacity"] for g in asg.describe_auto_scaling_groups()["AutoScalingGroups"]}


def test_bootstrap_then_scale_resizes_and_dry_run_changes_nothing(endpoint, tmp_path, capsys):
    assert main(["aws", "bootstrap", "--endpoint-url", endpoint]) == 0
    assert "group            general" in capsys.readouterr().out
    before = _desired(endpoint)
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    now -= timedelta(minutes=now.minute % 5)
    fc = _forecast(tmp_path / "fc.parquet", now, cpu=40.0)

    store = ["--store-url", f"sqlite:///{tmp_path}/warmcast.db"]
    assert main(["scale", "--forecast", fc, "--endpoint-url", endpoint, "--now", now.isoformat(), "--dry-run"]) == 0
    assert "dry-run: would apply" in capsys.readouterr().out
    assert _desired(endpoint) == before

    out = tmp_path / "decisions.parquet"
    assert main(["scale", "--forecast", fc, "--endpoint-url", endpoint, "--now", now.isoformat(), "--decisions-out", str(out),
                 *store]) == 0
    after = _desired(endpoint)
    assert after["general"] > before["general"]
    decisions = pq.read_table(out)
    assert decisions.schema.names == SCALING_DECISION.names
    assert any(decisions.column("applied").to_pylist())

    # a historical (back-filled) decision time never touches AWS
    past = now - timedelta(days=2)
    fc_past = _forecast(tmp_path / "past.parquet", past, cpu=400.0)
    assert main(["scale", "--forecast", fc_past, "--endpoint-url", endpoint, "--now", past.isoformat(), *store]) == 0
    assert "never touches AWS" in capsys.readouterr().out
    assert _desired(endpoint) == after


def test_iam_policy_is_printed_as_json(capsys):
    import json

    assert main(["aws", "iam-policy"]) == 0
    policy = json.loads(capsys.readouterr().out)
    assert policy["Version"] == "2012-10-17" and policy["Statement"]


def _user_forecast(path, issued_at: datetime, users: dict[str, float]) -> str:
    from tests.scaler.conftest import user_forecast_table

    pq.write_table(user_forecast_table({u: (c, c) for u, c in users.items()}, issued_at=issued_at), path)
    return str(path)


def _requests(path, ts: datetime) -> str:
    from pipeline.schemas import REQUEST_LOG

    rows = [{"request_id": f"r{i}", "user_id": u, "program_id": "p", "software_config": c, "ts": ts - timedelta(hours=1),
             "duration_s": 60.0, "cpu_cores": 2.0, "memory_mb": 512.0, "gpus": 0.0}
            for i, (u, c) in enumerate([("heavy-user", "python-3.12")] * 3 + [("heavy-user", "cuda-12")])]
    pq.write_table(pa.Table.from_pylist(rows, schema=REQUEST_LOG), path)
    return str(path)


def test_scale_creates_a_user_sub_pool_and_a_second_run_holding_the_lease_applies_nothing(endpoint, tmp_path, capsys):
    from scaler.lease import ScalerLease
    from pipeline.forecast_store import ForecastStore
    from scaler.subpools import subpool_group_name

    assert main(["aws", "bootstrap", "--endpoint-url", endpoint]) == 0
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    now -= timedelta(minutes=now.minute % 5)
    url = f"sqlite:///{tmp_path}/warmcast.db"
    args = ["scale", "--forecast", _forecast(tmp_path / "fc.parquet", now, cpu=40.0), "--endpoint-url", endpoint,
            "--now", now.isoformat(), "--store-url", url,
            "--user-forecast", _user_forecast(tmp_path / "users.parquet", now, {"heavy-user": 30.0, "light": 1.0}),
            "--requests", _requests(tmp_path / "requests.parquet", now)]
    capsys.readouterr()

    # another run holds the lease: this one applies nothing, says who holds it, exits 3
    other = ScalerLease(ForecastStore(url), owner="other-host:4242:cafe")
    ForecastStore(url).create_schema()
    other.acquire()
    before = _desired(endpoint)
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "held by other-host:4242:cafe" in err and "applied nothing" in err
    assert _desired(endpoint) == before
    other.release()

    assert main(args) == 0
    out = capsys.readouterr().out
    group = subpool_group_name("heavy-user")
    assert _desired(endpoint)[group] == 6  # ceil(30 cores at q90 / (8 vCPU × 0.7)), the example fleet's sub-pool shape
    assert "light" not in out  # 1 core: no sub-pool
    line = next(l for l in out.splitlines() if l.startswith(group))
    assert "subpool" in line and "created" in line and "user=heavy-user" in line and "python-3.12, cuda-12" in line
