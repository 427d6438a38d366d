"""The forecast and decision store: SQL tables (SQLAlchemy Core) plus a Parquet copy of every write.

Tables (``sql/schema.sql`` is their PostgreSQL DDL, kept equal to :data:`metadata` by a test),
with the natural keys of the Arrow contracts in :mod:`pipeline.schemas`:

=====================  ==============================================  ====================
table                  primary key                                     contract
=====================  ==============================================  ====================
``user_forecasts``     issued_at, user_id, horizon_min, resource       ``USER_FORECAST``
``system_forecasts``   issued_at, horizon_min, resource, method        ``SYSTEM_FORECAST``
``scaling_decisions``  decided_at, pool, pool_kind                     ``SCALING_DECISION``
``model_versions``     name, version                                   (model store manifest)
``scaler_leases``      name                                            (scaler run lease)
=====================  ==============================================  ====================

Every write is an upsert on the primary key (``INSERT … ON CONFLICT (key) DO UPDATE`` on SQLite
and PostgreSQL): re-running a task replaces its rows and never duplicates them. A write only
adds or replaces the rows it carries (a user-forecast write may be one shard of an issue).
Timestamps are UTC (``TIMESTAMP WITH TIME ZONE`` on PostgreSQL; ISO text on SQLite, read back as
UTC). ``ForecastStore(url, schema="name")`` keeps the tables in a PostgreSQL schema of their own.

Parquet copies (zstd, through :mod:`pipeline.storage`, written *before* the database so a
database outage never loses a forecast), one file per issue time / decision time::

    <lake>/forecasts/users/date=YYYY-MM-DD/<issued_at>[-<part>].parquet
    <lake>/forecasts/system/date=YYYY-MM-DD/<issued_at>.parquet
    <lake>/decisions/date=YYYY-MM-DD/<decided_at>.parquet

with times written ``YYYYMMDDTHHMMSSZ``. A database that cannot be reached raises
:class:`StoreUnavailableError` naming the URL with its password masked (an Airflow task then
retries); the Parquet copy is already in place.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from pipeline.config import mask_url_password
from pipeline.schemas import QUANTILE_COLUMNS, SCALING_DECISION, SYSTEM_FORECAST, USER_FORECAST, add_missing_nullable, check_id
from pipeline.storage import Location, open_location, parquet_bytes

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_BATCH_ROWS = 20_000


class ForecastStoreError(RuntimeError):
    """The store refused a write or a read (bad input, unsupported database)."""


class StoreUnavailableError(ForecastStoreError):
    """The database could not be reached; the message names the URL with its password masked."""


class UtcDateTime(sa.types.TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


metadata = sa.MetaData()
_F = sa.Double
user_forecasts = sa.Table(
    "user_forecasts", metadata,
    sa.Column("issued_at", UtcDateTime, primary_key=True),
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("horizon_min", sa.SmallInteger, primary_key=True),
    sa.Column("resource", sa.String(32), primary_key=True),
    sa.Column("target_start", UtcDateTime, nullable=False),
    *[sa.Column(c, _F, nullable=False) for c in QUANTILE_COLUMNS],
    sa.Column("mean", _F, nullable=False),
    sa.Column("model_version", sa.String(256), nullable=False),
    sa.Column("p_zero", _F),  # P(demand = 0); null: not estimated (added later: create_schema adds it)
)
system_forecasts = sa.Table(
    "system_forecasts", metadata,
    sa.Column("issued_at", UtcDateTime, primary_key=True),
    sa.Column("horizon_min", sa.SmallInteger, primary_key=True),
    sa.Column("resource", sa.String(32), primary_key=True),
    sa.Column("method", sa.String(64), primary_key=True),
    sa.Column("mean", _F, nullable=False),
    sa.Column("lower", _F, nullable=False),
    sa.Column("upper", _F, nullable=False),
    sa.Column("level", _F, nullable=False),
    sa.Column("n_users", sa.BigInteger, nullable=False),
)
scaling_decisions = sa.Table(
    "scaling_decisions", metadata,
    sa.Column("decided_at", UtcDateTime, primary_key=True),
    sa.Column("pool", sa.String(128), primary_key=True),
    sa.Column("pool_kind", sa.String(16), primary_key=True),  # a pool has an active and a warm row
    sa.Column("current", sa.BigInteger, nullable=False),
    sa.Column("target", sa.BigInteger, nullable=False),
    sa.Column("applied", sa.Boolean, nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)
model_versions = sa.Table(
    "model_versions", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(128), primary_key=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("n_users", sa.BigInteger, nullable=False),
    sa.Column("training_start", UtcDateTime),
    sa.Column("training_end", UtcDateTime),
    sa.Column("metrics", sa.Text, nullable=False),  # JSON object
    sa.Column("code_version", sa.String(128)),
)
#: One row per lease (``scale``: the right to apply scaling decisions); see :mod:`scaler.lease`.
scaler_leases = sa.Table(
    "scaler_leases", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),  # host:pid:random of the holder
    sa.Column("acquired_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
)
_CONTRACTS = {"user_forecasts": USER_FORECAST, "system_forecasts": SYSTEM_FORECAST, "scaling_decisions": SCALING_DECISION}


def schema_ddl() -> str:
    """The PostgreSQL DDL of :data:`metadata` (what ``sql/schema.sql`` holds)."""
    dialect = postgresql.dialect()
    parts = [str(sa.schema.CreateTable(t).compile(dialect=dialect)).strip() + ";" for t in metadata.sorted_tables]
    return "\n".join(line.rstrip() for line in "\n\n".join(parts).splitlines()) + "\n"


def _stamp(t: datetime) -> str:
    return f"{t.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


def _sqlite_column(col: pa.ChunkedArray) -> list[Any]:
    """Python values for SQLite; timestamps as SQLAlchemy's SQLite DATETIME text (naive UTC, microseconds)."""
    if not pa.types.is_timestamp(col.type):
        return col.to_pylist()
    enc = pc.dictionary_encode(col.cast(pa.timestamp("us", tz="UTC"))).combine_chunks()  # few distinct times
    text = [None if t is None else f"{t:%Y-%m-%d %H:%M:%S.%f}" for t in enc.dictionary.to_pylist()]
    return pa.array(text, pa.string()).take(enc.indices).to_pylist()


def _conform(table: pa.Table, schema: pa.Schema, key: Sequence[str], what: str) -> pa.Table:
    """``table`` as exactly ``schema`` (columns, order, types); raises on missing columns, nulls, duplicate keys."""
    table = add_missing_nullable(table, schema)
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ForecastStoreError(f"{what}: missing columns {missing}")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ForecastStoreError(f"{what}: columns do not match the contract: {exc}") from exc
    nulls = [n for n in schema.names if not schema.field(n).nullable and table[n].null_count]
    if nulls:
        raise ForecastStoreError(f"{what}: null values in {nulls}")
    if table.num_rows and table.group_by(list(key)).aggregate([([], "count_all")]).num_rows != table.num_rows:
        raise ForecastStoreError(f"{what}: duplicate rows for the key {tuple(key)}")
    return table


def _add_new_columns(conn, schema: str | None) -> None:
    """Add the nullable columns a table created by an older version lacks (``ALTER TABLE … ADD
    COLUMN``; e.g. ``user_forecasts.p_zero``): ``create_all`` only creates missing tables."""
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name, schema=schema)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable:
                raise ForecastStoreError(f"table {table.name} lacks column {col.name}, which cannot be added to existing rows "
                                         "(NOT NULL): migrate it by hand")
            quote = conn.dialect.identifier_preparer.quote
            name = quote(table.name) if schema is None else f"{quote(schema)}.{quote(table.name)}"
            conn.execute(sa.text(f"ALTER TABLE {name} ADD COLUMN {quote(col.name)} {col.type.compile(dialect=conn.dialect)}"))


class ForecastStore:
    """The store at a SQLAlchemy ``url`` (``sqlite:///path.db``, ``postgresql+psycopg://user@host/db``).

    ``schema``: a PostgreSQL schema for the tables (created by :meth:`create_schema`); ``lake``: a
    :class:`Location` or URI for the Parquet copies (None: no copies).
    """

    def __init__(self, url: str, *, schema: str | None = None, lake: Location | str | None = None, connect_timeout_s: int = 10):
        self.url = url
        self.display_url = mask_url_password(url)
        self.lake = open_location(lake) if isinstance(lake, str) else lake
        try:
            self.dialect = sa.engine.make_url(url).get_backend_name()
        except sa.exc.ArgumentError as exc:
            raise ForecastStoreError(f"forecast store {self.display_url}: not a database URL") from exc
        if self.dialect not in ("sqlite", "postgresql"):
            raise ForecastStoreError(f"forecast store {self.display_url}: only sqlite and postgresql are supported")
        if schema is not None and (self.dialect != "postgresql" or not _SCHEMA_NAME.fullmatch(schema)):
            raise ForecastStoreError(f"schema {schema!r}: a lower-case identifier, and only on PostgreSQL")
        self.schema = schema
        kwargs: dict[str, Any] = {}
        if self.dialect == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": connect_timeout_s}
        engine = sa.create_engine(url, **kwargs)
        self.engine: Engine = engine.execution_options(schema_translate_map={None: schema}) if schema else engine

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0]
        detail = detail.replace(self.url, self.display_url)
        return StoreUnavailableError(f"forecast store {self.display_url} is unreachable: {detail}")

    def _run(self, fn, begin: bool = True):
        """``fn(connection)``, in a transaction when ``begin``; failing to connect is :class:`StoreUnavailableError`."""
        try:
            conn = self.engine.connect()
        except sa.exc.DBAPIError as exc:
            raise self._unavailable(exc) from exc
        try:
            with conn, (conn.begin() if begin else contextlib.nullcontext()):
                return fn(conn)
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:  # the server went away mid-way
                raise self._unavailable(exc) from exc
            detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
            raise ForecastStoreError(f"forecast store {self.display_url}: {detail}") from exc

    def create_schema(self) -> None:
        """Create the PostgreSQL schema (if any) and the tables (those missing are added); idempotent."""
        def create(conn):
            if self.schema:
                conn.execute(sa.schema.CreateSchema(self.schema, if_not_exists=True))
            metadata.create_all(conn)
            _add_new_columns(conn, self.schema)
        if self.dialect == "sqlite":
            db = sa.engine.make_url(self.url).database
            if db and db != ":memory:" and not db.startswith("file:"):
                from pathlib import Path
                try:
                    Path(db).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreUnavailableError(f"forecast store {self.display_url} is unreachable: {exc}") from exc
        self._run(create)

    def drop_schema(self) -> None:
        """Drop this store's PostgreSQL schema and everything in it (tests); refuses without a schema."""
        if not self.schema:
            raise ForecastStoreError("drop_schema needs a store opened with schema=")
        self._run(lambda conn: conn.execute(sa.schema.DropSchema(self.schema, cascade=True, if_exists=True)))

    # -- writes -----------------------------------------------------------------------------

    def _upsert(self, table: sa.Table, data: pa.Table) -> int:
        """``INSERT … ON CONFLICT (primary key) DO UPDATE`` of every row of ``data``, in one transaction.

        The statement is SQLAlchemy Core; the rows go through the driver in bulk (an issue of
        10k users is 240k user-forecast rows): ``executemany`` of tuples on SQLite, ``COPY`` into a
        temporary table and ``INSERT … SELECT`` on PostgreSQL.
        """
        if data.num_rows == 0:
            return 0
        names = [c.name for c in table.columns]
        key = [c.name for c in table.primary_key]
        pg = self.dialect == "postgresql"
        if pg:  # staged in a temporary table (pg_temp is never schema-translated)
            stage = sa.Table(f"_load_{table.name}", sa.MetaData(), *[sa.Column(c.name, c.type) for c in table.columns],
                             schema="pg_temp", prefixes=["TEMPORARY"], postgresql_on_commit="DROP")
            stmt = postgresql.insert(table).from_select(names, sa.select(stage))
        else:
            stmt = sqlite.insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=key, set_={n: stmt.excluded[n] for n in names if n not in key})

        def write(conn) -> int:
            if pg:
                stage.create(conn)
                buf = io.BytesIO()
                pa_csv.write_csv(data.select(names), buf, pa_csv.WriteOptions(include_header=False))
                with conn.connection.driver_connection.cursor() as cur:
                    with cur.copy(f"COPY pg_temp.{stage.name} ({', '.join(names)}) FROM STDIN (FORMAT csv)") as copy:
                        copy.write(buf.getvalue())
                conn.execute(stmt)
            else:
                compiled = stmt.compile(dialect=conn.dialect)
                if list(compiled.positiontup) != names:
                    raise ForecastStoreError(f"unexpected parameter order for {table.name}: {compiled.positiontup}")
                rows = list(zip(*[_sqlite_column(data[n]) for n in names]))
                conn.exec_driver_sql(str(compiled), rows)
            return data.num_rows
        return self._run(write)

    def _copy(self, table: pa.Table, folder: str, time_col: str, part: str | None = None) -> list[str]:
        """Write ``table`` to the lake, one file per value of ``time_col``; returns the paths."""
        if self.lake is None or table.num_rows == 0:
            return []
        paths = []
        for t in pc.unique(table[time_col]).to_pylist():
            rows = table.filter(pc.equal(table[time_col], pa.scalar(t, table.schema.field(time_col).type)))
            name = _stamp(t) + (f"-{check_id(part, 'part')}" if part else "") + ".parquet"
            path = self.lake.path(folder, f"date={t.astimezone(timezone.utc):%Y-%m-%d}", name)
            self.lake.write_bytes(path, parquet_bytes(rows))
            paths.append(path)
        return paths

    def write_user_forecasts(self, table: pa.Table, part: str | None = None) -> int:
        """Upsert :data:`USER_FORECAST` rows; ``part`` names this shard's Parquet copy. Returns rows written."""
        table = _conform(table, USER_FORECAST, ["issued_at", "user_id", "horizon_min", "resource"], "user forecasts")
        self._copy(table, "forecasts/users", "issued_at", part)
        return self._upsert(user_forecasts, table)

    def write_system_forecast(self, table: pa.Table) -> int:
        """Upsert :data:`SYSTEM_FORECAST` rows (all methods of one or more issues). Returns rows written."""
        table = _conform(table, SYSTEM_FORECAST, ["issued_at", "horizon_min", "resource", "method"], "system forecast")
        self._copy(table, "forecasts/system", "issued_at")
        return self._upsert(system_forecasts, table)

    def write_decisions(self, table: pa.Table) -> int:
        """Upsert :data:`SCALING_DECISION` rows (applied or not, every decision is recorded)."""
        table = _conform(table, SCALING_DECISION, ["decided_at", "pool", "pool_kind"], "scaling decisions")
        self._copy(table, "decisions", "decided_at")
        return self._upsert(scaling_decisions, table)

    def write_model_version(self, name: str, version: str, *, created_at: datetime, n_users: int,
                            training_window: tuple[datetime, datetime] | None = None,
                            metrics: Mapping[str, Any] | None = None, code_version: str | None = None) -> None:
        """Record one published model version (e.g. from the model store's manifest and metadata)."""
        ts = pa.timestamp("us", tz="UTC")
        row = pa.table({
            "name": pa.array([check_id(name, "model name")]), "version": pa.array([check_id(version, "model version")]),
            "created_at": pa.array([created_at], ts), "n_users": pa.array([int(n_users)], pa.int64()),
            "training_start": pa.array([training_window[0] if training_window else None], ts),
            "training_end": pa.array([training_window[1] if training_window else None], ts),
            "metrics": pa.array([json.dumps(dict(metrics or {}), sort_keys=True, default=str)]),
            "code_version": pa.array([code_version], pa.string())})
        self._upsert(model_versions, row)

    # -- reads ------------------------------------------------------------------------------

    def _select(self, stmt, schema: pa.Schema | None) -> pa.Table | list[dict[str, Any]]:
        rows = self._run(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)], begin=False)
        return rows if schema is None else pa.Table.from_pylist(rows, schema=schema)

    def read_system_forecasts(self, start: datetime, end: datetime, method: str | None = None) -> pa.Table:
        """:data:`SYSTEM_FORECAST` rows issued in ``[start, end)``, ordered by issue, method, horizon, resource."""
        t = system_forecasts
        stmt = sa.select(*[t.c[n] for n in SYSTEM_FORECAST.names]).where(t.c.issued_at >= start, t.c.issued_at < end)
        if method is not None:
            stmt = stmt.where(t.c.method == method)
        return self._select(stmt.order_by(t.c.issued_at, t.c.method, t.c.horizon_min, t.c.resource), SYSTEM_FORECAST)

    def latest_system_forecast(self, at: datetime, method: str | None = None) -> pa.Table:
        """The newest issue at or before ``at`` (of ``method``, if given); an empty table when there is none."""
        t = system_forecasts
        newest = sa.select(sa.func.max(t.c.issued_at)).where(t.c.issued_at <= at)
        if method is not None:
            newest = newest.where(t.c.method == method)
        stmt = sa.select(*[t.c[n] for n in SYSTEM_FORECAST.names]).where(t.c.issued_at == newest.scalar_subquery())
        if method is not None:
            stmt = stmt.where(t.c.method == method)
        return self._select(stmt.order_by(t.c.method, t.c.horizon_min, t.c.resource), SYSTEM_FORECAST)

    def read_user_forecasts(self, issued_at: datetime) -> pa.Table:
        """:data:`USER_FORECAST` rows of one issue, ordered by user, horizon, resource."""
        t = user_forecasts
        stmt = sa.select(*[t.c[n] for n in USER_FORECAST.names]).where(t.c.issued_at == issued_at)
        return self._select(stmt.order_by(t.c.user_id, t.c.horizon_min, t.c.resource), USER_FORECAST)

    def read_decisions(self, start: datetime, end: datetime) -> pa.Table:
        """:data:`SCALING_DECISION` rows decided in ``[start, end)``, ordered by time and pool."""
        t = scaling_decisions
        stmt = sa.select(*[t.c[n] for n in SCALING_DECISION.names]).where(t.c.decided_at >= start, t.c.decided_at < end)
        return self._select(stmt.order_by(t.c.decided_at, t.c.pool), SCALING_DECISION)

    def read_model_versions(self, name: str | None = None) -> list[dict[str, Any]]:
        """Recorded model versions (``metrics`` parsed), newest first."""
        t = model_versions
        stmt = sa.select(t) if name is None else sa.select(t).where(t.c.name == name)
        rows = self._select(stmt.order_by(t.c.created_at.desc()), None)
        return [{**r, "metrics": json.loads(r["metrics"])} for r in rows]

    def count(self, table: str) -> int:
        """Rows in one of the tables (operators' sanity check; tests)."""
        if table not in metadata.tables:
            raise ForecastStoreError(f"unknown table {table!r}; tables are {sorted(metadata.tables)}")
        stmt = sa.select(sa.func.count()).select_from(metadata.tables[table])
        return int(self._run(lambda conn: conn.execute(stmt).scalar_one(), begin=False))
