"""Fixtures shared across the test packages."""

from __future__ import annotations

import os
import uuid

import boto3
import pytest

from scaler.local_endpoint import LOCAL_CREDENTIALS, local_aws_endpoint

TEST_BUCKET = "warmcast-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 endpoint (moto server on 127.0.0.1) with the bucket ``warmcast-test``; its URL."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", LOCAL_CREDENTIALS["aws_access_key_id"])
    mp.setenv("AWS_SECRET_ACCESS_KEY", LOCAL_CREDENTIALS["aws_secret_access_key"])
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with local_aws_endpoint() as url:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=TEST_BUCKET)
        yield url
    mp.undo()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_store(request, tmp_path):
    """A fresh forecast store with its tables, on each backend: a SQLite file, or a schema of its own
    on the PostgreSQL server of ``WARMCAST_TEST_PG_URL`` (dropped after; skipped when that is unset)."""
    from pipeline.forecast_store import ForecastStore

    if request.param == "sqlite":
        s = ForecastStore(f"sqlite:///{tmp_path}/db-store/warmcast.db")
    else:
        url = os.environ.get("WARMCAST_TEST_PG_URL")
        if not url:
            pytest.skip("WARMCAST_TEST_PG_URL is not set: no PostgreSQL server to test against")
        s = ForecastStore(url, schema=f"warmcast_test_{uuid.uuid4().hex[:12]}")
    s.create_schema()
    try:
        yield s
    finally:
        if s.schema:
            s.drop_schema()
