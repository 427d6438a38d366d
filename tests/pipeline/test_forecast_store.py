"""Forecast store: upserts on natural keys, reads, Parquet copies, a clear error when the database is down.

Every test runs on SQLite, and on PostgreSQL when ``WARMCAST_TEST_PG_URL`` names a server
(``make test`` and ``.ci/run`` set it): each PostgreSQL test creates its own uniquely named
schema and drops it afterwards, never touching any other schema.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from models.contract import to_forecast_table
from pipeline.aggregate import METHOD_TIERED, METHOD_TOPDOWN, AggregateConfig, aggregate
from pipeline.forecast_store import ForecastStore, ForecastStoreError, StoreUnavailableError, metadata, schema_ddl
from pipeline.schemas import SCALING_DECISION, SYSTEM_FORECAST, USER_FORECAST

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
PG_ENV = "WARMCAST_TEST_PG_URL"
ROOT = Path(__file__).resolve().parents[2]


def _pg_store(tmp_path):
    """A store in a fresh, uniquely named PostgreSQL schema (skips when no server is configured)."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server to test the store against")
    return ForecastStore(url, schema=f"warmcast_test_{uuid.uuid4().hex[:12]}", lake=str(tmp_path / "lake"))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A fresh store with its tables created, on each backend; the lake copy goes to ``tmp_path/lake``."""
    if request.param == "sqlite":
        s = ForecastStore(f"sqlite:///{tmp_path}/store/warmcast.db", lake=str(tmp_path / "lake"))
    else:
        s = _pg_store(tmp_path)
    s.create_schema()
    try:
        yield s
    finally:
        if s.schema:
            s.drop_schema()  # only the schema this test created


def _users(n: int = 3, issued_at: datetime = T0, shift: float = 0.0) -> pa.Table:
    q = np.sort(np.random.default_rng(n).gamma(2.0, 1.0, (n, 6, 4, 7)), axis=-1) + shift
    return to_forecast_table([f"u{i}" for i in range(n)], issued_at, q, None, "baseline:last_value")


def _system(issued_at: datetime = T0, n: int = 3) -> pa.Table:
    return aggregate(_users(n, issued_at)).table()


def _decisions(decided_at: datetime, target: int = 4) -> pa.Table:
    return pa.Table.from_pylist([
        {"decided_at": decided_at, "pool": "cpu-active", "pool_kind": "active", "current": 2, "target": target,
         "applied": True, "dry_run": False, "reason": "forecast 5 min upper"},
        {"decided_at": decided_at, "pool": "cpu-active", "pool_kind": "warm", "current": 1, "target": 1,
         "applied": False, "dry_run": True, "reason": "hold: within hysteresis"},
    ], schema=SCALING_DECISION)


def test_schema_sql_is_the_ddl_of_the_store_metadata():
    text = (ROOT / "sql" / "schema.sql").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--")).strip() + "\n"
    assert body == schema_ddl()
    for name in ("user_forecasts", "system_forecasts", "scaling_decisions", "model_versions"):
        assert f"CREATE TABLE {name} (" in text


def test_user_forecasts_round_trip_and_reruns_replace_rows(store):
    first = _users()
    assert store.write_user_forecasts(first) == first.num_rows
    back = store.read_user_forecasts(T0)
    assert back.schema == USER_FORECAST and back.equals(first.sort_by([("user_id", "ascending"), ("horizon_min", "ascending"), ("resource", "ascending")]))
    assert back["issued_at"][0].as_py() == T0  # UTC, timezone-aware, whatever the backend
    store.write_user_forecasts(_users(shift=1.0))  # a re-run of the same issue
    assert store.count("user_forecasts") == first.num_rows
    again = store.read_user_forecasts(T0)
    np.testing.assert_allclose(again["q50"].to_numpy(), back["q50"].to_numpy() + 1.0)
    store.write_user_forecasts(_users(issued_at=T0 + timedelta(minutes=5)))
    assert store.count("user_forecasts") == 2 * first.num_rows


def test_p_zero_round_trips_and_an_older_table_gains_the_column(store):
    q = np.tile(np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0]), (2, 6, 4, 1))
    with_p0 = to_forecast_table(["a", "b"], T0, q, None, "lstm:v", np.full((2, 6, 4), 0.2))
    store.write_user_forecasts(with_p0)
    np.testing.assert_allclose(store.read_user_forecasts(T0)["p_zero"].to_numpy(), 0.2)
    # a store created before the column existed: drop it, as an old deployment's table lacks it
    table = f'"{store.schema}".user_forecasts' if store.schema else "user_forecasts"
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN p_zero"))
    with pytest.raises(ForecastStoreError, match="p_zero"):
        store.write_user_forecasts(with_p0)
    store.create_schema()  # adds the missing nullable column; the rows already there keep theirs as null
    old = store.read_user_forecasts(T0)
    assert old.schema == USER_FORECAST and old["p_zero"].null_count == old.num_rows
    store.write_user_forecasts(with_p0.drop_columns(["p_zero"]).filter(pc.equal(with_p0["user_id"], "a")))  # an old writer
    store.write_user_forecasts(with_p0.filter(pc.equal(with_p0["user_id"], "b")))
    back = store.read_user_forecasts(T0)
    assert back.filter(pc.equal(back["user_id"], "a"))["p_zero"].null_count == 24
    np.testing.assert_allclose(back.filter(pc.equal(back["user_id"], "b"))["p_zero"].to_numpy(), 0.2)


def test_system_forecasts_upsert_and_range_reads(store):
    for k in range(4):
        store.write_system_forecast(_system(T0 + k * timedelta(minutes=5)))
    per_issue = _system().num_rows
    assert store.count("system_forecasts") == 4 * per_issue
    store.write_system_forecast(_system(T0 + timedelta(minutes=5)))  # re-run: replaced, not duplicated
    assert store.count("system_forecasts") == 4 * per_issue
    got = store.read_system_forecasts(T0 + timedelta(minutes=5), T0 + timedelta(minutes=15))
    assert got.schema == SYSTEM_FORECAST and got.num_rows == 2 * per_issue
    assert sorted(set(got["issued_at"].to_pylist())) == [T0 + timedelta(minutes=5), T0 + timedelta(minutes=10)]
    tiered = store.read_system_forecasts(T0, T0 + timedelta(hours=1), method=METHOD_TIERED)
    assert set(tiered["method"].to_pylist()) == {METHOD_TIERED} and tiered.num_rows == 4 * 24
    # bounds given in another time zone mean the same instants
    cet = timezone(timedelta(hours=1))
    assert store.read_system_forecasts(T0.astimezone(cet), (T0 + timedelta(minutes=5)).astimezone(cet)).num_rows == per_issue


def test_latest_system_forecast_at_or_before_a_time(store):
    for k in (0, 1, 3):
        store.write_system_forecast(_system(T0 + k * timedelta(minutes=5)))
    latest = store.latest_system_forecast(T0 + timedelta(minutes=12), method=METHOD_TIERED)
    assert set(latest["issued_at"].to_pylist()) == {T0 + timedelta(minutes=5)} and latest.num_rows == 24
    assert set(store.latest_system_forecast(T0 + timedelta(minutes=15))["issued_at"].to_pylist()) == {T0 + timedelta(minutes=15)}
    assert store.latest_system_forecast(T0 - timedelta(seconds=1)).num_rows == 0
    # the table is exactly what the scaler reads: one row per horizon and resource
    rows = latest.to_pylist()
    assert len({(r["horizon_min"], r["resource"]) for r in rows}) == len(rows)


def test_decisions_and_model_versions(store):
    store.write_decisions(_decisions(T0))
    store.write_decisions(_decisions(T0, target=6))  # re-run of the same cycle
    store.write_decisions(_decisions(T0 + timedelta(minutes=5)))
    got = store.read_decisions(T0, T0 + timedelta(minutes=1))
    assert got.schema == SCALING_DECISION and got.num_rows == 2
    assert got.to_pylist()[0] == {**_decisions(T0, target=6).to_pylist()[0]}
    assert [r["applied"] for r in got.to_pylist()] == [True, False]
    store.write_model_version("lstm", "v1", created_at=T0, n_users=10, training_window=(T0 - timedelta(days=14), T0),
                              metrics={"pinball": 0.12})
    store.write_model_version("lstm", "v1", created_at=T0, n_users=12, metrics={"pinball": 0.11})
    (row,) = store.read_model_versions("lstm")
    assert row["n_users"] == 12 and row["metrics"] == {"pinball": 0.11} and row["created_at"] == T0
    assert row["training_start"] is None


def test_every_write_leaves_a_parquet_copy_in_the_lake(store, tmp_path):
    users, system = _users(), _system()
    store.write_user_forecasts(users, part="shard-0001")
    store.write_system_forecast(system)
    store.write_decisions(_decisions(T0))
    lake = tmp_path / "lake"
    assert pq.read_table(lake / "forecasts/users/date=2026-03-02/20260302T100000Z-shard-0001.parquet").equals(users)
    assert pq.read_table(lake / "forecasts/system/date=2026-03-02/20260302T100000Z.parquet").equals(system)
    assert pq.read_table(lake / "decisions/date=2026-03-02/20260302T100000Z.parquet").num_rows == 2


def test_bad_writes_are_refused_with_a_message(store):
    system = _system()
    with pytest.raises(ForecastStoreError, match="duplicate rows"):
        store.write_system_forecast(pa.concat_tables([system, system.slice(0, 1)]))
    with pytest.raises(ForecastStoreError, match="missing columns"):
        store.write_system_forecast(system.drop_columns(["method"]))
    assert store.write_system_forecast(SYSTEM_FORECAST.empty_table()) == 0
    store.create_schema()  # idempotent
    assert store.count("system_forecasts") == 0


def test_postgresql_tables_live_in_the_store_schema_and_go_with_it(tmp_path):
    store = _pg_store(tmp_path)
    store.create_schema()
    try:
        assert set(sa.inspect(store.engine).get_table_names(schema=store.schema)) == set(metadata.tables)
        store.write_system_forecast(_system())
    finally:
        store.drop_schema()
    assert store.schema not in sa.inspect(store.engine).get_schema_names()


def test_unreachable_database_names_the_url_without_its_password_and_keeps_the_parquet_copy(tmp_path):
    url = "postgresql+psycopg://warmcast:s3cret-pw@127.0.0.1:1/warmcast"
    store = ForecastStore(url, lake=str(tmp_path / "lake"), connect_timeout_s=2)
    with pytest.raises(StoreUnavailableError) as err:
        store.write_system_forecast(_system())
    assert "warmcast:***@127.0.0.1:1/warmcast" in str(err.value) and "s3cret-pw" not in str(err.value)
    assert (tmp_path / "lake/forecasts/system/date=2026-03-02/20260302T100000Z.parquet").exists()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        ForecastStore(f"sqlite:///{blocker}/warmcast.db").create_schema()


def test_schemas_are_checked_before_anything_is_created():
    with pytest.raises(ForecastStoreError, match="only on PostgreSQL"):
        ForecastStore("sqlite:///:memory:", schema="x")
    with pytest.raises(ForecastStoreError, match="lower-case identifier"):
        ForecastStore("postgresql+psycopg://u@h/db", schema="x; drop table y")
    with pytest.raises(ForecastStoreError, match="only sqlite and postgresql"):
        ForecastStore("mysql://u:pw@h/db")


def test_a_store_without_tables_says_so_rather_than_unreachable(tmp_path):
    store = ForecastStore(f"sqlite:///{tmp_path}/empty.db")
    with pytest.raises(ForecastStoreError, match="no such table") as err:
        store.write_system_forecast(_system())
    assert not isinstance(err.value, StoreUnavailableError)


def test_past_bounds_read_back_from_the_store_drive_the_reconciled_choice(store):
    """The reconciled target's choice from rows as each backend returns them (time zones included)."""
    from tests.pipeline.test_aggregate import _past_bounds, _swinging_system, _table

    system = _swinging_system()
    q = np.repeat(np.linspace(9.5, 10.5, 7)[None, None], 10, axis=0).repeat(4, axis=1)
    written = _past_bounds(system, 1.0, 80.0)
    store.write_system_forecast(written)
    back = store.read_system_forecasts(T0 - timedelta(hours=25), T0)
    assert back.num_rows == written.num_rows and set(back["method"].to_pylist()) == {METHOD_TIERED, METHOD_TOPDOWN}
    agg = aggregate(_table(q), system=system, config=AggregateConfig(seed=1), past=back)
    assert (agg.reconciled_from == "bottom_up").all()
