"""Fixtures shared across the test packages."""

from __future__ import annotations

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
