"""Roll the per-user models back (or forward) from the Airflow UI: point ``latest`` at a version.

Manual only (no schedule): trigger it with the param ``version`` — a published version id, or
``previous`` (the default: the newest version published before the current ``latest``). One task,
``promote``: every file of that version is read and checked against its manifest (both entries,
users and global) before ``latest`` moves (:func:`models.persist.promote_version`); a corrupt or
unknown version fails the run naming the problem and leaves ``latest`` where it was.

From the next ``forecast_and_scale`` cycle the forecasts use it (the newest version trained
before the issue time is ``latest`` whenever its training window fits), and the next
``train_user_models`` run fine-tunes from it and becomes ``latest`` in turn: pause that DAG to
hold a rollback. The same as ``warmcast models promote VERSION`` on the command line. Emits the
Asset ``warmcast.user_models``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from airflow.sdk import DAG, Asset, Param, get_current_context, task

USER_MODELS = Asset(name="warmcast.user_models", group="warmcast")
PREVIOUS = "previous"  # models.persist.PREVIOUS (not imported here: DAG files parse without torch)
log = logging.getLogger(__name__)

with DAG(
    dag_id="promote_model_version",
    description="Manual: verify a model version and make it latest (roll back or forward)",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={"version": Param(PREVIOUS, type="string", minLength=1, maxLength=64,
                             description="a published version id, or 'previous': the one before the current latest")},
    tags=["warmcast", "models"],
) as dag:

    @task(outlets=[USER_MODELS], retries=0, execution_timeout=timedelta(minutes=30))
    def promote() -> dict:
        """Verify the version, then move ``latest`` to it; returns the previous and the new latest."""
        from models.persist import promote_version, resolve_version
        from pipeline.config import load_settings
        from pipeline.storage import location_from_settings

        settings = load_settings()
        lake = location_from_settings(settings.lake, settings)
        version = resolve_version(lake, str(get_current_context()["params"]["version"]))
        previous = promote_version(lake, version)
        log.info("latest: %s -> %s", previous, version)
        return {"previous": previous, "latest": version}

    promote()
