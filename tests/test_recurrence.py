"""Cron expressions, time zones, daylight-saving transitions and retry delays (taskscheduler.recurrence)."""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from helpers import as_record
from taskscheduler import JobStatus
from taskscheduler.core.runs import next_start
from taskscheduler.errors import (
    InvalidArgumentError,
)
from taskscheduler.recurrence import cron_expression, next_cron_time, retry_delay, timezone_name

ZURICH = ZoneInfo("Europe/Zurich")


def _ts(*args: int, tz: Any = ZURICH) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def _local(ts: float, tz: Any = ZURICH) -> datetime:
    return datetime.fromtimestamp(ts, tz)


@pytest.mark.parametrize(
    "expr",
    ["*/5 * * * *", "0 9 * * mon-fri", "30 2 1,15 jan,jul *", "@hourly", "@DAILY", "  0   0 * * 0 ", "0 0 L * *"],
)
def test_valid_expressions_are_kept_normalised(expr: str) -> None:
    kept = cron_expression("cron", expr)
    assert kept == kept.strip() and "  " not in kept


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("* * * *", "5 fields"),
        ("0 0 * * * *", "5 fields"),  # seconds (or years) are not part of the contract
        ("61 * * * *", "not a valid cron expression"),
        ("* 25 * * *", "not a valid cron expression"),
        ("* * * * funday", "not a valid cron expression"),
        ("@fortnightly", "unknown alias"),
        (5, "must be a cron expression string"),
        (None, "must be a cron expression string"),
        ("* " * 200, "at most"),
        ("0 0 30 2 *", "never matches"),
        ("0 0 31 4,6,9,11 *", "never matches"),
    ],
)
def test_invalid_expressions_name_the_option(expr: Any, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match="option cron") as info:
        cron_expression("cron", expr)
    assert says in str(info.value)


def test_empty_expression_means_no_cron() -> None:
    assert cron_expression("cron", "") == "" and cron_expression("cron", "   ") == ""


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "utc+1", 3, None, "../etc/passwd"])
def test_unknown_zones_are_refused(zone: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="option timezone"):
        timezone_name("timezone", zone)


def test_expression_is_read_in_its_zone() -> None:
    after = _ts(2026, 6, 1, 12, 0, tz=timezone.utc)
    assert _local(next_cron_time("0 9 * * *", "Europe/Zurich", after)).hour == 9
    assert _local(next_cron_time("0 9 * * *", "America/New_York", after), ZoneInfo("America/New_York")).hour == 9
    assert next_cron_time("0 9 * * *", "UTC", after) == _ts(2026, 6, 2, 9, 0, tz=timezone.utc)


def test_a_skipped_time_runs_once_right_after_the_gap() -> None:
    # 2026-03-29 in Zurich: clocks go from 02:00 to 03:00, so 02:30 does not exist that day.
    first = next_cron_time("30 2 * * *", "Europe/Zurich", _ts(2026, 3, 28, 12, 0))
    second = next_cron_time("30 2 * * *", "Europe/Zurich", first)
    assert _local(first) == datetime(2026, 3, 29, 3, 0, tzinfo=ZURICH)  # croniter's documented rule
    assert _local(second) == datetime(2026, 3, 30, 2, 30, tzinfo=ZURICH)


def test_a_repeated_time_runs_once() -> None:
    # 2026-10-25 in Zurich: clocks go from 03:00 back to 02:00, so 02:30 happens twice.
    first = next_cron_time("30 2 * * *", "Europe/Zurich", _ts(2026, 10, 24, 12, 0))
    second = next_cron_time("30 2 * * *", "Europe/Zurich", first)
    assert _local(first).utcoffset() == timedelta(hours=2) and _local(first).hour == 2
    assert _local(second).date() == datetime(2026, 10, 26).date()  # not again an hour later


def test_an_hourly_job_runs_in_each_real_hour_of_a_repeated_hour() -> None:
    start = _ts(2026, 10, 25, 1, 30)
    runs = [start]
    for _ in range(3):
        runs.append(next_cron_time("0 * * * *", "Europe/Zurich", runs[-1]))
    assert [b - a for a, b in zip(runs[1:], runs[2:], strict=False)] == [3600.0, 3600.0]


def test_no_catch_up_storm_after_downtime() -> None:
    # An hourly job whose run was due three hours ago ends now: its next run is the next hour from now,
    # not the three it missed.
    now = time.time()
    doc = {"options": {"cron": "0 * * * *", "timezone": "UTC", "at": now - 3 * 3600, "retry": 0}}
    follow = next_start(as_record(doc), JobStatus.DONE, now)
    assert follow is not None
    status, at, _ = follow
    assert status == JobStatus.POSTPONED and now < at <= now + 3600 and at % 3600 == 0


def test_cron_follows_failure_once_retries_are_spent() -> None:
    now = time.time()
    doc = {"options": {"cron": "*/10 * * * *", "timezone": "UTC", "retry": 0, "retry_interval": 5}}
    status, at, retry = next_start(as_record(doc), JobStatus.FAILED, now) or (None, 0.0, 0)
    assert status == JobStatus.POSTPONED and at % 600 == 0 and now < at <= now + 600 and retry == 0
    retrying = {"options": dict(doc["options"], retry=2)}
    status, at, retry = next_start(as_record(retrying), JobStatus.FAILED, now) or (None, 0.0, 0)
    assert at == pytest.approx(now + 5, abs=0.01) and retry == 1


def test_retry_delays_grow_by_the_backoff_up_to_the_bound() -> None:
    opts = {"retry_interval": 10, "retry_backoff": 2.0, "retry_max_interval": 70}
    assert [retry_delay(opts, n) for n in range(1, 6)] == [10, 20, 40, 70, 70]
    assert [retry_delay({"retry_interval": 7}, n) for n in range(1, 5)] == [7, 7, 7, 7]  # defaults: fixed delay
    assert retry_delay({"retry_interval": 1, "retry_backoff": 1000.0, "retry_max_interval": 5}, 10_000) == 5


def test_retry_jitter_draws_from_half_the_delay_to_the_delay() -> None:
    opts = {"retry_interval": 8, "retry_backoff": 2.0, "retry_max_interval": 3600, "retry_jitter": True}
    rng = random.Random(7)
    for n in range(1, 6):
        delay = 8 * 2 ** (n - 1)
        drawn = [retry_delay(opts, n, rng) for _ in range(200)]
        assert all(delay / 2 <= d <= delay for d in drawn)
        assert max(drawn) - min(drawn) > delay / 4  # actually spread, not a constant


def test_next_start_counts_failures_in_a_row() -> None:
    now = time.time()
    opts = {"retry": -1, "retry_interval": 2, "retry_backoff": 3.0, "retry_max_interval": 3600}
    delays = [next_start(as_record({"options": opts, "failures": f}), JobStatus.FAILED, now) for f in range(4)]
    assert [round(d[1] - now, 2) for d in delays if d] == [2, 6, 18, 54]


def test_a_stored_schedule_without_a_next_match_ends_the_job() -> None:
    doc = {"options": {"cron": "0 0 30 2 *", "timezone": "UTC", "retry": 0}}  # never validated, e.g. edited
    assert next_start(as_record(doc), JobStatus.DONE, time.time()) is None
    with pytest.raises(InvalidArgumentError, match="no next match"):
        next_cron_time("0 0 30 2 *", "UTC", time.time())


def test_cron_expression_with_random_field_is_refused_or_deterministic() -> None:
    """SPEC 6: croniter's 'R' field is refused, or gives the same next run for the same input."""
    try:
        expr = cron_expression("cron", "R * * * *")
    except InvalidArgumentError:
        return
    after = 1_704_067_200.0  # 2024-01-01 00:00 UTC
    seen = {next_cron_time(expr, "UTC", after) for _ in range(20)}
    assert len(seen) == 1, f"'R * * * *' gives {len(seen)} different next runs for the same input"


def test_retry_max_interval_bounds_the_delay_without_backoff() -> None:
    """SPEC 6: retry_max_interval bounds the delay with the default retry_backoff 1.0 too."""
    doc = {"options": {"retry": 3, "retry_interval": 600, "retry_max_interval": 60, "retry_backoff": 1.0}}
    now = 1_700_000_000.0
    follow = next_start(as_record(doc), JobStatus.FAILED, now)
    assert follow is not None
    assert follow[1] - now <= 60, f"retry delay {follow[1] - now} s exceeds retry_max_interval 60 s"


def test_retry_delay_formula_holds_for_many_failures() -> None:
    """SPEC 6: retry_interval * retry_backoff ** (n - 1) holds once the power overflows a float (retry_interval 0)."""
    options = {"retry_interval": 0, "retry_backoff": 2.0, "retry_max_interval": 3600}
    assert retry_delay(options, 10) == 0.0
    assert retry_delay(options, 2000) == 0.0


def test_cron_match_runs_once_when_the_worker_clock_is_behind() -> None:
    """SPEC 4/6: the next cron match lies after the run's own match, whatever the worker's clock says."""
    from datetime import datetime, timezone

    match = 1_704_110_400.0  # 2024-01-01 12:00:00 UTC, a match of "0 * * * *"
    doc = {
        "_id": None,
        "run": 1,
        "started": datetime.fromtimestamp(match + 0.010, timezone.utc),  # server clock, at the claim
        "failures": 0,
        "options": {"cron": "0 * * * *", "timezone": "UTC", "retry": 0, "at": match, "interval": 0},
    }
    follow = next_start(as_record(doc), JobStatus.DONE, match - 0.5)  # the worker's clock: half a second behind
    assert follow is not None
    assert follow[1] > match, f"the 12:00 match is scheduled again (next at {follow[1]} == its own at {match})"


def test_next_runs_keep_milliseconds() -> None:
    """Retry and interval next starts keep milliseconds (no run starts up to 1 s early)."""
    doc = {"options": {"retry": 1, "retry_interval": 2, "interval": 0}}
    follow = next_start(as_record(doc), JobStatus.FAILED, 4_000_000_000.25)
    assert follow is not None and follow[1] == 4_000_000_002.25
    doc = {"options": {"retry": 0, "interval": 5, "interval_reference": "end"}}
    follow = next_start(as_record(doc), JobStatus.DONE, 4_000_000_000.125)
    assert follow is not None and follow[1] == 4_000_000_005.125
