"""The scaler end to end over HTTP: a real moto server on 127.0.0.1, the demo fleet file, boto3 clients
built from settings — as ``warmcast aws bootstrap`` then ``warmcast scale`` would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from pipeline.config import AwsSettings
from scaler.aws import describe_groups, make_clients, scale_cycle
from scaler.aws_bootstrap import bootstrap
from scaler.fleet import load_fleet
from scaler.local_endpoint import LOCAL_CREDENTIALS, local_aws_endpoint
from tests.scaler.conftest import NOW, forecast_rows

REPO = Path(__file__).resolve().parents[2]


def test_bootstrap_then_apply_twice_over_http_the_second_is_a_no_op():
    fleet = load_fleet()  # scaler/fleet.example.toml
    rows = forecast_rows(cpu=[30, 30, 35, 40, 45, 60], memory=[150, 150, 160, 170, 180, 200], gpus=1.0)
    with local_aws_endpoint() as url:
        assert url.startswith("http://127.0.0.1:")
        clients = make_clients(AwsSettings(endpoint_url=url, retry_mode="standard", max_attempts=3), **LOCAL_CREDENTIALS)
        bootstrap(clients, fleet)
        before = describe_groups(clients.autoscaling, [p.name for p in fleet.pools])
        _, first = scale_cycle(clients.autoscaling, fleet.policy_pools(), rows, NOW)
        after = describe_groups(clients.autoscaling, [p.name for p in fleet.pools])
        _, second = scale_cycle(clients.autoscaling, fleet.policy_pools(), rows, NOW + timedelta(minutes=1))
        again = describe_groups(clients.autoscaling, [p.name for p in fleet.pools])
    assert not first.failed and first.calls > 0
    assert {n: s.desired for n, s in after.items()} != {n: s.desired for n, s in before.items()}
    assert after["gpu"].desired >= 2  # 1 GPU at 70 % utilisation
    assert second.calls == 0 and not any(d["applied"] for d in second.decisions)
    assert again == after


def test_client_from_the_airflow_connection_keeps_our_retry_config(tmp_path):
    """Inside Airflow the clients come from ``aws_default`` via AwsBaseHook. Run in a subprocess with its own
    AIRFLOW_HOME: importing airflow here would read (and write) the developer's real ~/airflow."""
    code = (
        "import json\nfrom pipeline.config import AwsSettings\nfrom scaler.aws import clients_from_airflow\n"
        "c = clients_from_airflow(AwsSettings(region='eu-west-1', retry_mode='adaptive', max_attempts=5))\n"
        "print(json.dumps([c.autoscaling.meta.endpoint_url, c.autoscaling.meta.config.retries,"
        " c.ec2.meta.region_name]))\n"
    )
    conn = {"conn_type": "aws", "login": "testing", "password": "testing",
            "extra": {"endpoint_url": "http://127.0.0.1:4566"}}
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(conn),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    endpoint, retries, region = json.loads(out.stdout.strip().splitlines()[-1])
    assert endpoint == "http://127.0.0.1:4566" and region == "eu-west-1"
    assert retries == {"mode": "adaptive", "total_max_attempts": 6}


def test_scaler_imports_neither_torch_nor_airflow():
    code = ("import sys, scaler.policy, scaler.placement, scaler.aws, scaler.aws_bootstrap, scaler.fleet, "
            "scaler.local_endpoint\nbad = [m for m in ('torch', 'airflow', 'lightning') if m in sys.modules]\n"
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
