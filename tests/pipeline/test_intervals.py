"""Which interval a scheduled, back-filled or manual run processes, and how bad intervals are refused."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.intervals import IntervalError, check_interval, floor_to_slot, parse_time, run_interval, slots

UTC = timezone.utc


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- parse_time ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["2026-11-28T10:05:00Z", "2026-11-28T10:05:00+00:00", " 2026-11-28T10:05:00Z ", "2026-11-28T11:05:00+01:00"],
)
def test_parse_time_reads_iso_times_with_a_zone_as_utc(text):
    value = parse_time(text)
    assert value == t("2026-11-28T10:05:00")
    assert value.utcoffset() == timedelta(0)


def test_parse_time_converts_aware_datetimes_to_utc():
    eastern = timezone(timedelta(hours=-5))
    value = parse_time(datetime(2026, 11, 28, 5, 5, tzinfo=eastern))
    assert value == t("2026-11-28T10:05:00") and value.tzinfo == UTC


@pytest.mark.parametrize("bad", ["2026-11-28T10:05:00", datetime(2026, 11, 28, 10, 5)])
def test_parse_time_refuses_times_without_a_zone(bad):
    with pytest.raises(IntervalError, match="no time zone"):
        parse_time(bad)


@pytest.mark.parametrize("bad", ["yesterday", "", "2026-13-01T00:00:00Z"])
def test_parse_time_refuses_text_that_is_not_iso(bad):
    with pytest.raises(IntervalError, match="not an ISO-8601 time"):
        parse_time(bad)


def test_interval_error_is_a_value_error():
    assert issubclass(IntervalError, ValueError)


# --- check_interval ------------------------------------------------------------------------------


def test_check_interval_accepts_a_grid_aligned_interval():
    assert check_interval("2026-11-28T10:00:00Z", "2026-11-28T10:15:00Z", 5) == (t("2026-11-28T10:00"), t("2026-11-28T10:15"))


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-11-28T10:05:00Z", "2026-11-28T10:05:00Z", "is not after its start"),  # empty
        ("2026-11-28T10:10:00Z", "2026-11-28T10:05:00Z", "is not after its start"),  # inverted
        ("2026-11-28T10:02:00Z", "2026-11-28T10:05:00Z", "start .* not on the 5-minute slot grid"),
        ("2026-11-28T10:00:00Z", "2026-11-28T10:05:30Z", "end .* not on the 5-minute slot grid"),
        ("2026-11-28T10:00:00", "2026-11-28T10:05:00Z", "no time zone"),
    ],
)
def test_check_interval_refuses_bad_intervals(start, end, message):
    with pytest.raises(IntervalError, match=message):
        check_interval(start, end, 5)


def test_check_interval_error_suggests_the_grid_time():
    with pytest.raises(IntervalError, match=r"e\.g\. 2026-11-28T10:00:00\+00:00"):
        check_interval("2026-11-28T10:02:00Z", "2026-11-28T10:05:00Z", 5)


def test_slots_lists_the_slot_starts_of_an_interval():
    assert slots(t("2026-11-28T10:00"), t("2026-11-28T10:15"), 5) == [t("2026-11-28T10:00"), t("2026-11-28T10:05"), t("2026-11-28T10:10")]
    assert slots(t("2026-11-28T10:00"), t("2026-11-28T10:00"), 5) == []


# --- run_interval --------------------------------------------------------------------------------


def test_scheduled_run_covers_the_slot_before_its_logical_date():
    # The trigger time does not matter when there is a logical date (a late or back-filled run).
    assert run_interval(t("2026-11-28T10:05"), t("2026-11-28T23:59"), 5) == (t("2026-11-28T10:00"), t("2026-11-28T10:05"))


def test_backfilled_run_covers_its_own_old_slot():
    assert run_interval(t("2026-11-01T00:00"), t("2026-11-28T10:00"), 5) == (t("2026-10-31T23:55"), t("2026-11-01T00:00"))


def test_logical_date_off_the_grid_is_floored():
    assert run_interval(t("2026-11-28T10:07:13"), None, 5) == (t("2026-11-28T10:00"), t("2026-11-28T10:05"))


@pytest.mark.parametrize(
    ("triggered", "expected_start"),
    [
        ("2026-11-28T10:07:30", "2026-11-28T10:00"),  # mid-slot: the running slot is not complete
        ("2026-11-28T10:05:00", "2026-11-28T10:00"),  # exactly on the grid: [10:00, 10:05) just closed
        ("2026-11-28T00:01:00", "2026-11-27T23:55"),  # crosses midnight
    ],
)
def test_manual_run_covers_the_last_complete_slot_before_its_trigger(triggered, expected_start):
    start, end = run_interval(None, t(triggered), 5)
    assert (start, end) == (t(expected_start), t(expected_start) + timedelta(minutes=5))
    assert end <= t(triggered)


def test_manual_run_accepts_other_zones_and_answers_in_utc():
    start, end = run_interval(None, datetime(2026, 11, 28, 11, 7, tzinfo=timezone(timedelta(hours=1))), 5)
    assert (start, end) == (t("2026-11-28T10:00"), t("2026-11-28T10:05"))
    assert start.tzinfo == UTC


def test_run_interval_honours_the_slot_length():
    assert run_interval(t("2026-11-28T10:20"), None, 15) == (t("2026-11-28T10:00"), t("2026-11-28T10:15"))


def test_run_interval_needs_a_logical_date_or_a_trigger_time():
    with pytest.raises(IntervalError, match="needs a logical date or a trigger time"):
        run_interval(None, None, 5)


def test_run_interval_refuses_a_naive_anchor():
    with pytest.raises(IntervalError, match="no time zone"):
        run_interval(datetime(2026, 11, 28, 10, 5), None, 5)


aware_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


@given(anchor=aware_times, slot=st.sampled_from([1, 5, 10, 15, 30, 60]), manual=st.booleans())
def test_run_interval_is_one_grid_slot_that_ends_at_or_before_its_anchor(anchor, slot, manual):
    start, end = run_interval(None if manual else anchor, anchor if manual else None, slot)
    assert end - start == timedelta(minutes=slot)
    assert start <= anchor - timedelta(minutes=slot) < end <= anchor
    assert check_interval(start, end, slot) == (start, end)
    assert floor_to_slot(anchor, slot) == end
