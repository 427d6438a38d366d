"""Storage: local folders and s3:// (against a local moto S3 endpoint), atomic writes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import boto3
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_settings
from pipeline.demand import read_requests
from pipeline.generate import make_request_table
from pipeline.ingest import ingest_interval
from pipeline.landing import write_landing
from pipeline.storage import StorageError, open_location

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def test_local_paths_refuse_escapes(tmp_path):
    loc = open_location(str(tmp_path))
    assert loc.path("a", "b.parquet") == f"{tmp_path}/a/b.parquet"
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="refusing path component"):
            loc.path(bad)


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_location("gs://bucket/x")


def test_atomic_write_leaves_the_old_version_on_failure(tmp_path):
    loc = open_location(str(tmp_path))
    loc.write_bytes(loc.path("f.txt"), b"old")
    with pytest.raises(RuntimeError):
        with loc.write_atomic(loc.path("f.txt")) as out:
            out.write(b"half")
            raise RuntimeError("crash")
    assert (tmp_path / "f.txt").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_gz_names_are_not_recompressed(tmp_path):
    loc = open_location(str(tmp_path))
    loc.write_bytes(loc.path("x.csv.gz"), b"\x1f\x8bpayload")
    assert (tmp_path / "x.csv.gz").read_bytes() == b"\x1f\x8bpayload"
    assert loc.read_bytes(loc.path("x.csv.gz")) == b"\x1f\x8bpayload"


def test_ingest_from_and_to_s3_on_a_local_endpoint(s3_endpoint):
    settings = load_settings(
        overrides={"lake": "s3://warmcast-test/lake", "landing": "s3://warmcast-test/landing", "aws": {"s3_endpoint_url": s3_endpoint}},
        environ={},
    )
    landing = open_location("s3://warmcast-test/landing", s3_endpoint_url=s3_endpoint)
    rows = [{"request_id": f"r{i}", "user_id": "u1", "ts": T0 + timedelta(minutes=i)} for i in range(12)]
    write_landing(landing, make_request_table(rows), "a", "csv", gzip_files=True)
    report = ingest_interval(settings, T0, T0 + timedelta(minutes=10))
    assert (report.rows_in, report.rows_valid) == (10, 10)
    assert report.lake_files[0] == "warmcast-test/lake/request_logs/date=2026-03-02/hour=10/20260302T100000Z.parquet"
    lake = open_location("s3://warmcast-test/lake", s3_endpoint_url=s3_endpoint)
    with lake.fs.open_input_file(report.lake_files[0]) as f:
        assert pq.read_table(f).num_rows == 5
    ingest_interval(settings, T0, T0 + timedelta(minutes=10))  # re-run replaces, never duplicates
    assert read_requests(lake).num_rows == 10
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="warmcast-test", Prefix="lake/")["Contents"]]
    # pyarrow keeps empty folder markers ("…/_staging/") after deletes; no staged data may remain
    assert not [k for k in keys if ("_staging" in k or ".tmp-" in k) and not k.endswith("/")]
