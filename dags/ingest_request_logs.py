"""Ingest raw request logs into the Parquet lake, one 5-minute slot per run.

Every 5 minutes, catch-up on: the run for logical date *d* ingests the landing rows with
``ts`` in ``[d - 5 min, d)`` into ``<lake>/request_logs/date=…/hour=…/<slot start>.parquet``
(replaced on re-run, so re-runs and back-fills never duplicate rows). A manual or
asset-triggered run (no logical date) ingests the last complete slot before it was triggered.
The interval comes from :func:`pipeline.intervals.run_interval`, not from Airflow's data interval,
which is zero-width for cron schedules.

Produces the Asset ``REQUEST_LOGS``, named ``warmcast.request_logs`` (group ``warmcast``; its URI
defaults to the name). Downstream DAGs schedule on it by name,
``schedule=[Asset.ref(name="warmcast.request_logs")]``, or by an identical definition,
``Asset(name="warmcast.request_logs", group="warmcast")``; they should not import this file (that
would register this DAG a second time). The name says which table, not where the lake lives, so it
stays the same when the lake moves from a local folder to S3; and it has no URI scheme on purpose:
an unknown scheme such as ``warmcast://`` makes Airflow load every provider's asset handlers
(boto3 among them, ~0.1 s and 300 modules) each time the file is parsed.

Storage comes from :func:`pipeline.config.load_settings` (``WARMCAST_LAKE``, ``WARMCAST_LANDING``,
``WARMCAST_CONFIG``), read when the task runs. ``start_date`` comes from the Airflow config option
``[warmcast] start_date`` (env ``AIRFLOW__WARMCAST__START_DATE``, ISO-8601 with a zone; default
2026-11-01T00:00Z); the first run, at logical date ``start_date``, ingests the slot that *ends*
there. It is not a ``WARMCAST_*`` variable because :func:`load_settings` refuses ``WARMCAST_*``
names it does not know.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Asset, task
from airflow.sdk.configuration import conf

REQUEST_LOGS = Asset(name="warmcast.request_logs", group="warmcast")

START_DATE = datetime.fromisoformat(conf.get("warmcast", "start_date", fallback="2026-11-01T00:00:00+00:00"))

with DAG(
    dag_id="ingest_request_logs",
    description="Land raw request logs into the Parquet lake, one 5-minute slot per run",
    schedule="*/5 * * * *",
    start_date=START_DATE,
    catchup=True,
    max_active_runs=4,
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
    },
    tags=["warmcast", "ingest"],
    doc_md=__doc__,
):

    @task(outlets=[REQUEST_LOGS], execution_timeout=timedelta(minutes=10))
    def ingest(dag_run=None) -> dict:
        """Ingest this run's slot; returns the ingest report (rows in / valid / quarantined, files)."""
        from pipeline.config import load_settings
        from pipeline.ingest import ingest_interval
        from pipeline.intervals import run_interval

        settings = load_settings()
        start, end = run_interval(dag_run.logical_date, dag_run.run_after, settings.ingest.slot_minutes)
        return ingest_interval(settings, start, end).to_dict()

    ingest()
