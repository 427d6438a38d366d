"""Data intervals on the slot grid (5 minutes by default), and how a run picks its interval.

Airflow 3 cron schedules give zero-width data intervals (start == end == logical date), and
manual or asset-triggered runs have no logical date at all, so the DAGs ask this module for the
interval instead of trusting Airflow's: a run for logical date *d* covers ``[d - slot, d)``; a
run without one covers the last *complete* slot before it was triggered.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


class IntervalError(ValueError):
    """An interval is inverted, naive, or not on the slot grid."""


def parse_time(text: str | datetime) -> datetime:
    """Parse an ISO-8601 time; a time without a zone is refused (say ``Z`` or ``+00:00``)."""
    if isinstance(text, datetime):
        value = text
    else:
        try:
            value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise IntervalError(f"{text!r} is not an ISO-8601 time (e.g. 2026-11-28T10:05:00Z)") from exc
    if value.tzinfo is None:
        raise IntervalError(f"{text!s} has no time zone; write it in UTC, e.g. 2026-11-28T10:05:00Z")
    return value.astimezone(timezone.utc)


def floor_to_slot(t: datetime, slot_minutes: int) -> datetime:
    t = t.astimezone(timezone.utc)
    epoch = int(t.timestamp())
    step = slot_minutes * 60
    return datetime.fromtimestamp(epoch - epoch % step, tz=timezone.utc)


def check_interval(start: datetime, end: datetime, slot_minutes: int) -> tuple[datetime, datetime]:
    """Return ``(start, end)`` in UTC, or raise :class:`IntervalError` naming the problem."""
    start, end = parse_time(start), parse_time(end)
    if end <= start:
        raise IntervalError(f"interval end {end.isoformat()} is not after its start {start.isoformat()}")
    for name, t in (("start", start), ("end", end)):
        if floor_to_slot(t, slot_minutes) != t:
            raise IntervalError(
                f"interval {name} {t.isoformat()} is not on the {slot_minutes}-minute slot grid "
                f"(e.g. {floor_to_slot(t, slot_minutes).isoformat()})"
            )
    return start, end


def slots(start: datetime, end: datetime, slot_minutes: int) -> list[datetime]:
    """Slot starts in ``[start, end)``."""
    step = timedelta(minutes=slot_minutes)
    out, t = [], start
    while t < end:
        out.append(t)
        t += step
    return out


def run_interval(logical_date: datetime | None, triggered_at: datetime | None, slot_minutes: int = 5) -> tuple[datetime, datetime]:
    """The data interval a scheduled, back-filled or manual run must process.

    Scheduled and back-filled runs: ``[logical_date - slot, logical_date)`` (logical_date floored
    to the grid). Manual / asset-triggered runs (``logical_date is None``): the last complete slot
    before ``triggered_at``.
    """
    anchor = logical_date if logical_date is not None else triggered_at
    if anchor is None:
        raise IntervalError("a run needs a logical date or a trigger time to pick its interval")
    end = floor_to_slot(parse_time(anchor), slot_minutes)
    return end - timedelta(minutes=slot_minutes), end
