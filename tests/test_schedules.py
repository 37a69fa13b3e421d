"""SPEC 7, "Schedules": the recurring jobs that have not ended, as ``taskscheduler.ops.schedules`` lists them for
``taskscheduler schedules`` and the dashboard. Runs go through ``run_jobs`` (the lifecycle without a node)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database

from helpers import Recorder, unindexed
from taskscheduler import JobStatus, Scheduler
from taskscheduler.ops.schedules import Schedule, interval_text, iso_utc, schedules
from taskscheduler.testing import run_jobs


def by_id(scheduler: Scheduler) -> dict[ObjectId, Schedule]:
    return {s.id: s for s in schedules(scheduler)}


def test_recurring_jobs_are_listed_and_one_off_jobs_are_not(scheduler: Scheduler) -> None:
    later = time.time() + 7200
    hourly = scheduler.add_job("sample_jobs:Noop", interval=3600, at=later)
    cron = scheduler.add_job("sample_jobs:Noop", cron="0 7 * * *", timezone="Europe/Zurich", at=later)
    once = scheduler.add_job("sample_jobs:Noop", at=later)
    found = by_id(scheduler)
    assert set(found) == {hourly.id, cron.id}
    assert once.id not in found
    every = found[hourly.id]
    assert (every.kind, every.expression, every.timezone) == ("interval", "every 1h", None)
    assert every.job_class == "sample_jobs:Noop"
    assert every.status == JobStatus.POSTPONED
    assert every.next_start == pytest.approx(later, abs=0.001)
    assert (every.last_status, every.last_end, every.runs, every.paused) == (None, None, 0, False)
    daily = found[cron.id]
    assert (daily.kind, daily.expression, daily.timezone) == ("cron", "0 7 * * *", "Europe/Zurich")


def test_a_run_that_ended_shows_its_status_end_and_the_next_start(scheduler: Scheduler) -> None:
    ok = scheduler.add_job("sample_jobs:Noop", interval=600)
    failing = scheduler.add_job("sample_jobs:Fail", interval=600, interval_reference="start")
    before = scheduler.store.server_time().timestamp()
    assert {p.id for p in run_jobs(scheduler)} == {ok.id, failing.id}
    after = scheduler.store.server_time().timestamp()
    found = by_id(scheduler)
    good, bad = found[ok.id], found[failing.id]
    assert (good.status, good.last_status, good.runs) == (JobStatus.POSTPONED, JobStatus.DONE, 1)
    assert (bad.status, bad.last_status, bad.runs) == (JobStatus.POSTPONED, JobStatus.FAILED, 1)
    assert bad.expression == "every 10m from each start"
    for s in (good, bad):
        assert s.last_end is not None and before - 1 <= s.last_end <= after + 1
        assert s.next_start is not None and before + 599 <= s.next_start <= after + 601
    # Soonest first: the failing job's next run counts from its start, which came before the other's end.
    assert [s.id for s in schedules(scheduler)] == sorted([ok.id, failing.id], key=lambda i: found[i].next_start)


def test_a_waiting_schedule_is_due_since_it_was_added(scheduler: Scheduler) -> None:
    due = scheduler.add_job("sample_jobs:Noop", interval=300)
    found = by_id(scheduler)[due.id]
    assert found.status == JobStatus.WAITING
    assert due.created is not None
    assert found.next_start == pytest.approx(due.created.timestamp(), abs=0.001)


def test_a_cron_schedule_starts_at_its_first_match_read_in_its_zone(scheduler: Scheduler) -> None:
    # 2031-05-06 is a Tuesday: midnight in New York is 04:00 UTC (daylight saving time).
    at = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    job = scheduler.add_job("sample_jobs:Noop", cron="@daily", timezone="America/New_York", at=at)
    found = by_id(scheduler)[job.id]
    assert (found.status, found.timezone) == (JobStatus.POSTPONED, "America/New_York")
    assert found.next_start == datetime(2031, 5, 7, 4, 0, tzinfo=timezone.utc).timestamp()
    utc = scheduler.add_job("sample_jobs:Noop", cron="*/5 * * * *")
    assert by_id(scheduler)[utc.id].timezone == "UTC"


def test_a_canceled_recurring_job_is_no_schedule_until_requeued(scheduler: Scheduler) -> None:
    job = scheduler.add_job("sample_jobs:Noop", interval=60, at=time.time() + 600)
    scheduler.cancel_job(job.id)
    assert by_id(scheduler) == {}
    scheduler.requeue_job(job.id)
    again = by_id(scheduler)[job.id]
    # The canceled run counts as an ended run, as ``show`` lists it.
    assert (again.status, again.last_status, again.runs) == (JobStatus.WAITING, JobStatus.CANCELED, 1)
    assert again.last_end is not None


def test_paused_by_class_limit_key_or_every_job(scheduler: Scheduler) -> None:
    later = time.time() + 600
    plain = scheduler.add_job("sample_jobs:Noop", interval=60, at=later)
    keyed = scheduler.add_job("sample_jobs:Echo", interval=60, at=later, limit_key="mail")
    assert not any(s.paused for s in schedules(scheduler))
    scheduler.pause("mail")
    assert {i: s.paused for i, s in by_id(scheduler).items()} == {plain.id: False, keyed.id: True}
    scheduler.pause("sample_jobs:Noop")
    assert all(s.paused for s in schedules(scheduler))
    scheduler.resume("mail")
    scheduler.resume("sample_jobs:Noop")
    scheduler.pause("*")
    assert all(s.paused for s in schedules(scheduler))


def test_to_dict_is_plain_json_with_names_and_utc_times(scheduler: Scheduler) -> None:
    at = datetime(2031, 5, 6, 7, 8, 9, 250000, tzinfo=timezone.utc)
    job = scheduler.add_job("sample_jobs:Noop", cron="@daily", timezone="America/New_York", at=at)
    scheduler.store.jobs.update_one({"_id": job.id}, {"$set": {"options.at": at.timestamp()}})  # to the ms
    plain = by_id(scheduler)[job.id].to_dict()
    assert json.loads(json.dumps(plain)) == plain
    assert plain == {
        "id": str(job.id),
        "job_class": "sample_jobs:Noop",
        "kind": "cron",
        "expression": "@daily",
        "timezone": "America/New_York",
        "next_start": "2031-05-06T07:08:09.250+00:00",
        "last_status": None,
        "last_end": None,
        "runs": 0,
        "paused": False,
        "status": "POSTPONED",
    }


def test_malformed_documents_are_left_out_and_never_raise(scheduler: Scheduler) -> None:
    good = scheduler.add_job("sample_jobs:Noop", interval=60, at=time.time() + 600)
    stored = scheduler.store.find_job(good.id)
    assert stored is not None
    hostile: list[dict[str, Any]] = [
        {**stored, "_id": ObjectId(), "options": {**stored["options"], "interval": "10"}},
        {**stored, "_id": ObjectId(), "status": 1.0},
        {**stored, "_id": "not-an-id"},
        {**stored, "_id": ObjectId(), "options": "nonsense"},
        {**stored, "_id": ObjectId(), "class": 42, "run": "x", "outcome": "y", "options": {"cron": "@hourly"}},
    ]
    scheduler.store.jobs.insert_many(hostile)
    found = by_id(scheduler)
    odd = hostile[-1]["_id"]
    assert set(found) == {good.id, odd}
    assert (found[odd].job_class, found[odd].runs, found[odd].last_status, found[odd].next_start) == (
        "42",
        0,
        None,
        None,
    )


def test_the_reads_are_served_by_indexes(recorded: tuple[Database[dict[str, Any]], Recorder]) -> None:
    db, recorder = recorded
    s = Scheduler(db)
    for _ in range(3):
        s.add_job("sample_jobs:Noop")
    s.add_job("sample_jobs:Noop", interval=3600)
    run_jobs(s)
    recorder.commands.clear()
    assert [x.runs for x in schedules(s)] == [1]
    # Pauses and limits are read whole from their own small collection (a few controls), as every reader does.
    commands = [(n, c) for n, c in recorder.commands if c.get("find") != "taskscheduler.jobs.flow"]
    count, slow = unindexed(db, commands)
    assert count >= 2  # the recurring jobs, and their last runs' events
    assert slow == [], "\n".join(map(str, slow))


@pytest.mark.parametrize(
    ("seconds", "reference", "text"),
    [
        (1, "end", "every 1s"),
        (90, "end", "every 1m 30s"),
        (3600, "end", "every 1h"),
        (90061, "end", "every 1d 1h 1m 1s"),
        (300, "start", "every 5m from each start"),
        (-1, "end", "again at once after each run"),
    ],
)
def test_intervals_read_as_words(seconds: int, reference: str, text: str) -> None:
    assert interval_text(seconds, reference) == text


def test_times_beyond_what_a_datetime_holds_are_unknown() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000+00:00"
    assert iso_utc(1e20) is None
    assert iso_utc(None) is None
