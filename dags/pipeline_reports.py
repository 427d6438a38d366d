"""Daily reports for operators: the pipeline's health and the shadow-mode comparison of each day.

``@daily``; a run for logical date *d* reports on the day ``[d − 1 day, d)`` (a manual run: the last
whole UTC day before it was triggered) and writes to the lake (``pipeline/reports.py``):

* ``reports/date=YYYY-MM-DD/status.json`` — every ``warmcast status`` check as of the day's end;
* ``reports/date=YYYY-MM-DD/shadow.json`` — the day's recorded scaling decisions scored on the
  demand that came (``warmcast shadow``): what the groups had against what warmcast proposed.

The task log prints both tables. The task does not fail when a check does (``warmcast status``, run
by a probe, is the alert); it fails when a report cannot be written. Back-fill past days with
``airflow backfill create --dag-id pipeline_reports``: each run rewrites its day's files.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, get_current_context, task

with DAG(
    dag_id="pipeline_reports",
    description="Daily: the pipeline's status as of midnight and the day's shadow-mode report, into the lake",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    tags=["warmcast", "reports"],
) as dag:

    @task(retries=2, retry_delay=timedelta(minutes=5), execution_timeout=timedelta(minutes=30))
    def report() -> dict:
        """Write the day's status and shadow reports; returns their paths and headline figures."""
        from pipeline.config import load_settings
        from pipeline.reports import report_day, write_daily_reports

        dag_run = get_current_context()["dag_run"]
        start, end = report_day(dag_run.logical_date, dag_run.run_after)
        return write_daily_reports(load_settings(), start, end)

    report()
