"""Forecast every user, aggregate to a system forecast, store it, and resize the fleet; every 5 minutes.

``plan`` → ``forecast`` (mapped, one task per user shard) → ``aggregate`` → ``store`` → ``scale``;
each task is one call into :mod:`pipeline.forecast_cycle` (its docstring has the details).

Issue time: a run for logical date *d* issues its forecast at ``at = d`` floored to the 5-minute
grid (:func:`pipeline.intervals.run_interval`'s end; a manual run: the last slot boundary before it
was triggered) and reads only lake data from before ``at``: the model version trained on data
before ``at`` (the model store's :meth:`~models.store.ModelStore.version_trained_before`) and
demand before ``at``. Back-fills therefore reproduce history without leakage::

    airflow backfill create --dag-id forecast_and_scale \\
        --from-date 2026-11-05T00:00:00+00:00 --to-date 2026-11-06T00:00:00+00:00

The schedule fires one minute after each slot boundary (``1-59/5``) so the ingest run of the slot
that just closed has landed it in the lake; the forecast is still issued at the boundary.

Scaling: a run whose issue time is more than ``scaler.max_forecast_age_s`` (600 s) before the wall
clock — every back-filled run, and a live run that started too late or retried too long — records
its decisions as dry-run and never calls a mutating AWS API (logged as ``DRY RUN``); so does a run
without a system forecast of its own (no users). Live runs use the Airflow connection
``scaler.aws_conn_id`` (``aws_default``). ``max_active_runs=1``: two cycles never resize at once;
and a live run holds the scaler lease in the store (:mod:`scaler.lease`), so a back-fill batch or a
``warmcast scale`` by hand cannot apply at the same time (the loser's ``scale`` returns ``skipped``).
With a ``[subpools]`` table in the fleet file, user sub-pools are sized from this issue's user forecasts.

No model yet: users get the ``forecast.fallback`` baseline (default ``last_value``), flagged
``model_version = "fallback:baseline:last_value"``, so the fleet is sized from the strong
baseline until the first ``train_user_models`` run publishes; ``forecast.fallback = "fail"`` fails
the run instead. No users at all: the run succeeds, stores nothing and the scaler records a
dry-run hold. Database unreachable: ``store`` fails with a message naming the (password-masked) URL
and retries; the Parquet copies under ``<lake>/forecasts/`` are already written.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task
from airflow.sdk.configuration import conf

START_DATE = datetime.fromisoformat(conf.get("warmcast", "start_date", fallback="2026-11-01T00:00:00+00:00"))


def _issue_time(dag_run) -> datetime:
    from pipeline.config import load_settings
    from pipeline.forecast_cycle import issue_time

    return issue_time(dag_run.logical_date, dag_run.run_after, load_settings().ingest.slot_minutes)


with DAG(
    dag_id="forecast_and_scale",
    description="Per-user forecasts → system forecast with bounds → forecast store → Auto Scaling groups",
    schedule="1-59/5 * * * *",
    start_date=START_DATE,
    catchup=False,  # history comes from `airflow backfill create`, not from unpausing
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    dagrun_timeout=timedelta(minutes=15),
    tags=["warmcast", "forecast", "scale"],
    doc_md=__doc__,
):

    # A ``-> dict`` annotation would make each key a separate XCom; one return value is enough.
    @task(execution_timeout=timedelta(minutes=2))
    def plan(dag_run=None) -> list:
        """The users to forecast, sharded; each shard names the model version to use."""
        from pipeline.config import load_settings
        from pipeline.forecast_cycle import plan_issue

        return plan_issue(load_settings(), _issue_time(dag_run))

    @task(multiple_outputs=False, execution_timeout=timedelta(minutes=4))
    def forecast(shard: dict, dag_run=None) -> dict:
        """One shard's per-user forecasts, written to the lake."""
        from pipeline.config import load_settings
        from pipeline.forecast_cycle import forecast_shard

        return forecast_shard(load_settings(), _issue_time(dag_run), shard)

    @task(multiple_outputs=False, execution_timeout=timedelta(minutes=3))
    def aggregate(shards: list, dag_run=None) -> dict:
        """The system forecast with bounds, written to the lake."""
        from pipeline.config import load_settings
        from pipeline.forecast_cycle import aggregate_issue

        return aggregate_issue(load_settings(), _issue_time(dag_run), list(shards))

    @task(multiple_outputs=False, retries=3, retry_delay=timedelta(seconds=20), retry_exponential_backoff=2.0, execution_timeout=timedelta(minutes=3))
    def store(shards: list, system: dict, dag_run=None) -> dict:
        """User and system forecasts into the forecast store's database."""
        from pipeline.config import load_settings
        from pipeline.forecast_cycle import store_issue

        return store_issue(load_settings(), _issue_time(dag_run), list(shards), system)

    @task(multiple_outputs=False, retries=1, execution_timeout=timedelta(minutes=3))
    def scale(stored: dict, dag_run=None) -> dict:
        """Resize the fleet from this issue's forecast (dry run for back-fills and stale runs)."""
        from pipeline.config import load_settings
        from pipeline.forecast_cycle import scale_issue
        from scaler.aws import clients_from_airflow

        settings = load_settings()
        return scale_issue(settings, _issue_time(dag_run), lambda: clients_from_airflow(settings.aws, settings.scaler.aws_conn_id))

    shards = forecast.expand(shard=plan())
    system = aggregate(shards)
    scale(store(shards, system))
