"""Retrain every user's LSTM once a day, sharded, and publish one model version atomically.

``train_global`` → ``train_shard`` (mapped, one task per user shard) → ``publish``; each task is
one call into :mod:`models.persist` (sharded training):

* ``train_global`` lists the users with demand in the training window ``[d − train.days, d)``
  (*d*: the run's logical date; a manual run: the last slot boundary before it was triggered),
  cuts them into shards of ``train.shard_size`` users (bigger shards when more than
  ``train.max_shards`` ≤ 1024 tasks would be needed), trains the global model once, fine-tuned
  from the newest version trained on data before *d*, and writes it, unpublished, under a fresh
  version id;
* ``train_shard`` trains one shard's users, warm-started from their previous version (daily
  retraining fine-tunes) or from the new global model, and writes one shard file, unpublished;
* ``publish`` checks the shards hold exactly the planned users, then writes the index, metadata
  and manifests and moves ``latest``: the version appears whole or not at all. A failed shard
  leaves the previous version serving (the half-written files are never listed or loaded), and
  produces no Asset event.

Emits the Asset ``warmcast.user_models`` (group ``warmcast``) when a version is published. A
re-run for the same date publishes a new version trained from the same starting point (never
from its own earlier output). Back-fill: ``airflow backfill create --dag-id train_user_models
--from-date … --to-date …`` trains each day on data before that day only; the
``forecast_and_scale`` DAG then uses, for each issue time, the newest version trained before it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Asset, task
from airflow.sdk.configuration import conf

USER_MODELS = Asset(name="warmcast.user_models", group="warmcast")

START_DATE = datetime.fromisoformat(conf.get("warmcast", "start_date", fallback="2026-11-01T00:00:00+00:00"))


def _train_config(settings):
    from models.train import TrainConfig

    t = settings.train
    return TrainConfig(epochs=t.epochs, global_epochs=t.global_epochs, threads=t.threads,
                       global_max_users=t.global_max_users, hidden=t.hidden)


with DAG(
    dag_id="train_user_models",
    description="Daily: train the global model, then every user's LSTM in shards; publish one version",
    schedule="@daily",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=5)},
    dagrun_timeout=timedelta(hours=6),
    tags=["warmcast", "train"],
    doc_md=__doc__,
):

    @task(execution_timeout=timedelta(hours=2))
    def train_global(dag_run=None) -> list:
        """Users in the window, sharded; the global model trained once and written (unpublished)."""
        from models.persist import plan_training
        from pipeline.config import load_settings
        from pipeline.intervals import run_interval
        from pipeline.storage import location_from_settings

        settings = load_settings()
        until = run_interval(dag_run.logical_date, dag_run.run_after, settings.ingest.slot_minutes)[1]
        t = settings.train
        return plan_training(location_from_settings(settings.lake, settings), until, t.days, _train_config(settings),
                             t.shard_size, t.max_shards)

    @task(multiple_outputs=False, execution_timeout=timedelta(hours=2))
    def train_shard(shard: dict) -> dict:
        """One shard's users trained and written as one unpublished shard file."""
        from models.persist import train_shard as train_one
        from pipeline.config import load_settings
        from pipeline.storage import location_from_settings

        settings = load_settings()
        return train_one(location_from_settings(settings.lake, settings), shard, _train_config(settings))

    @task(multiple_outputs=False, outlets=[USER_MODELS], execution_timeout=timedelta(minutes=30))
    def publish(planned: list, shards: list) -> dict:
        """Make the version visible: index, metadata, manifests, then ``latest``; then, with
        ``train.keep_versions``, delete the older versions beyond it."""
        from models.persist import publish_training
        from pipeline.config import load_settings
        from pipeline.storage import location_from_settings

        settings = load_settings()
        return publish_training(location_from_settings(settings.lake, settings), list(planned), list(shards), _train_config(settings),
                                keep_versions=settings.train.keep_versions)

    planned = train_global()
    publish(planned, train_shard.expand(shard=planned))
