#!/usr/bin/env bash
# Entry point of the warmcast image (see Dockerfile and docker-compose.yml).
#
#   init              one-shot set-up: Airflow metadata DB migration, the forecast store's role,
#                     database and tables, the admin login of Airflow's SimpleAuthManager
#   aws-demo          a local AWS endpoint (moto) on 127.0.0.1:5000 with the fleet bootstrapped
#   warmcast ARGS...  the warmcast command
#   ARGS...           anything else is an `airflow` subcommand (api-server, scheduler, ...)
set -euo pipefail

case "${1:-}" in
init)
    airflow db migrate
    # The forecast store: its own role and database on the metadata DB's server, both named in
    # WARMCAST_STORE_URL (so its password is stated once, in that URL). Idempotent: an existing
    # role gets the URL's password again, an existing database is kept.
    python - <<'PY'
import os

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from pipeline.forecast_store import ForecastStore

admin = make_url(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
store = make_url(os.environ["WARMCAST_STORE_URL"])
if store.get_backend_name() == "postgresql" and store.host == admin.host:
    with psycopg.connect(host=admin.host, port=admin.port or 5432, user=admin.username,
                         password=admin.password, dbname=admin.database, autocommit=True) as conn:
        role, db = sql.Identifier(store.username), sql.Identifier(store.database)
        exists = conn.execute("select 1 from pg_roles where rolname = %s", (store.username,)).fetchone()
        verb = "alter" if exists else "create"
        conn.execute(sql.SQL(verb + " role {} login password {}").format(role, sql.Literal(store.password)))
        if not conn.execute("select 1 from pg_database where datname = %s", (store.database,)).fetchone():
            conn.execute(sql.SQL("create database {} owner {}").format(db, role))
ForecastStore(os.environ["WARMCAST_STORE_URL"]).create_schema()
print(f"forecast store ready: {ForecastStore(os.environ['WARMCAST_STORE_URL']).display_url}")
PY
    # SimpleAuthManager (Airflow 3's default; no FAB provider in this image) reads its users from
    # [core] simple_auth_manager_users and their passwords from this JSON file. Writing the admin's
    # password here is what "create the admin user" means for it; other users keep theirs.
    python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
users = json.loads(path.read_text() or "{}") if path.exists() else {}
users[os.environ["AIRFLOW_ADMIN_USER"]] = os.environ["AIRFLOW_ADMIN_PASSWORD"]
path.parent.mkdir(parents=True, exist_ok=True)
path.touch(mode=0o600)
path.write_text(json.dumps(users) + "\n")
print(f"airflow login: {os.environ['AIRFLOW_ADMIN_USER']} (password from AIRFLOW_ADMIN_PASSWORD)")
PY
    ;;
aws-demo)
    # moto accepts any credentials; boto3 only needs some (scaler.local_endpoint.LOCAL_CREDENTIALS).
    export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
    warmcast aws local-endpoint --port 5000 &
    endpoint=$!
    trap 'kill "$endpoint" 2>/dev/null' TERM INT
    python -c "
import socket, time
for _ in range(60):
    try:
        socket.create_connection(('127.0.0.1', 5000), 1).close(); break
    except OSError:
        time.sleep(1)
else:
    raise SystemExit('local AWS endpoint did not start on 127.0.0.1:5000')"
    warmcast aws bootstrap --endpoint-url http://127.0.0.1:5000
    wait "$endpoint"
    ;;
warmcast)
    exec "$@"
    ;;
*)
    exec airflow "$@"
    ;;
esac
