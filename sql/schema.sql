-- The forecast and decision store (PostgreSQL DDL; SQLite gets the same tables from SQLAlchemy).
-- Generated from pipeline/forecast_store.py `metadata` (`schema_ddl()`); a test keeps the two equal.
-- Columns are the Arrow contracts in pipeline/schemas.py; primary keys are their natural keys, and
-- every write is an upsert on them (re-runs replace rows, never duplicate). Times are UTC.
-- Apply with: psql "$URL" -f sql/schema.sql   (or ForecastStore(url).create_schema()).

CREATE TABLE model_versions (
	name VARCHAR(128) NOT NULL,
	version VARCHAR(128) NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	n_users BIGINT NOT NULL,
	training_start TIMESTAMP WITH TIME ZONE,
	training_end TIMESTAMP WITH TIME ZONE,
	metrics TEXT NOT NULL,
	code_version VARCHAR(128),
	PRIMARY KEY (name, version)
);

CREATE TABLE scaler_leases (
	name VARCHAR(64) NOT NULL,
	owner VARCHAR(256) NOT NULL,
	acquired_at TIMESTAMP WITH TIME ZONE NOT NULL,
	expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (name)
);

CREATE TABLE scaling_decisions (
	decided_at TIMESTAMP WITH TIME ZONE NOT NULL,
	pool VARCHAR(128) NOT NULL,
	pool_kind VARCHAR(16) NOT NULL,
	current BIGINT NOT NULL,
	target BIGINT NOT NULL,
	applied BOOLEAN NOT NULL,
	dry_run BOOLEAN NOT NULL,
	reason TEXT NOT NULL,
	PRIMARY KEY (decided_at, pool, pool_kind)
);

CREATE TABLE system_forecasts (
	issued_at TIMESTAMP WITH TIME ZONE NOT NULL,
	horizon_min SMALLINT NOT NULL,
	resource VARCHAR(32) NOT NULL,
	method VARCHAR(64) NOT NULL,
	mean DOUBLE PRECISION NOT NULL,
	lower DOUBLE PRECISION NOT NULL,
	upper DOUBLE PRECISION NOT NULL,
	level DOUBLE PRECISION NOT NULL,
	n_users BIGINT NOT NULL,
	PRIMARY KEY (issued_at, horizon_min, resource, method)
);

CREATE TABLE user_forecasts (
	issued_at TIMESTAMP WITH TIME ZONE NOT NULL,
	user_id VARCHAR(128) NOT NULL,
	horizon_min SMALLINT NOT NULL,
	resource VARCHAR(32) NOT NULL,
	target_start TIMESTAMP WITH TIME ZONE NOT NULL,
	q05 DOUBLE PRECISION NOT NULL,
	q10 DOUBLE PRECISION NOT NULL,
	q25 DOUBLE PRECISION NOT NULL,
	q50 DOUBLE PRECISION NOT NULL,
	q75 DOUBLE PRECISION NOT NULL,
	q90 DOUBLE PRECISION NOT NULL,
	q95 DOUBLE PRECISION NOT NULL,
	mean DOUBLE PRECISION NOT NULL,
	model_version VARCHAR(256) NOT NULL,
	p_zero DOUBLE PRECISION,
	PRIMARY KEY (issued_at, user_id, horizon_min, resource)
);
