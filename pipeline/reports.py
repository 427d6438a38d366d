"""The daily reports of the ``pipeline_reports`` DAG, written to the lake for the day ``[start, end)``:

* ``<lake>/reports/date=YYYY-MM-DD/status.json`` — :func:`pipeline.status.pipeline_status` as of
  the day's end (what ``warmcast status --at END --json`` prints);
* ``<lake>/reports/date=YYYY-MM-DD/shadow.json`` — :func:`scaler.shadow.shadow_report` of the day's
  scaling decisions (what ``warmcast shadow --since START --until END --json`` prints), when the
  store holds any decision for that day.

Each file is replaced whole (written to a temporary name, then renamed), so a re-run or back-fill
of a day rewrites its reports and a reader never sees half of one.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from pipeline.config import Settings
from pipeline.storage import location_from_settings

log = logging.getLogger(__name__)

DAY = timedelta(days=1)


def report_day(logical_date: datetime | None, triggered_at: datetime | None) -> tuple[datetime, datetime]:
    """The day ``[start, end)`` a run reports on: a scheduled or back-filled run (daily, zero-width
    interval at midnight) the day before its logical date; a manual run the last whole UTC day before
    it was triggered."""
    anchor = logical_date if logical_date is not None else triggered_at
    if anchor is None:
        raise ValueError("a report run needs a logical date or a trigger time")
    anchor = anchor.astimezone(timezone.utc)
    end = anchor.replace(hour=0, minute=0, second=0, microsecond=0)
    return end - DAY, end


def report_path(start: datetime, name: str) -> tuple[str, ...]:
    return ("reports", f"date={start:%Y-%m-%d}", name)


def write_daily_reports(settings: Settings, start: datetime, end: datetime) -> dict[str, Any]:
    """Write the day's status and shadow reports to the lake; returns their paths and headline figures."""
    from pipeline.forecast_store import ForecastStore, ForecastStoreError
    from pipeline.status import pipeline_status
    from scaler.fleet import load_fleet
    from scaler.shadow import shadow_from_store

    lake = location_from_settings(settings.lake, settings)
    status = pipeline_status(settings, end)
    status_path = lake.path(*report_path(start, "status.json"))
    lake.write_bytes(status_path, json.dumps(status.to_dict(), indent=1).encode())
    log.info("%s", status.render())
    out: dict[str, Any] = {"day": f"{start:%Y-%m-%d}", "status": status.state, "status_path": lake.display(status_path),
                           "checks": {c.name: c.state for c in status.checks}}
    try:
        report = shadow_from_store(ForecastStore(settings.store_url), lake, start, end, load_fleet(settings.scaler.fleet))
    except ForecastStoreError as exc:  # unreachable or without the table: the status report above says so too
        log.warning("shadow report for %s: cannot read the scaling decisions: %s", out["day"], exc)
        out["shadow"] = f"not written: cannot read the scaling decisions ({exc})"
        return out
    if report is None:
        log.info("shadow report for %s: no scaling decision recorded that day; not written", out["day"])
        out["shadow"] = "not written: no scaling decision that day"
        return out
    shadow_path = lake.path(*report_path(start, "shadow.json"))
    lake.write_bytes(shadow_path, json.dumps(report.to_dict(), indent=1).encode())
    log.info("%s", report.render())
    out["shadow"] = lake.display(shadow_path)
    out["shadow_short_share"] = {"recorded": report.recorded["short_bucket_share"], "proposed": report.proposed["short_bucket_share"]}
    return out
