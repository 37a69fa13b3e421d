"""What a new user meets on the first day (issue 21): ``taskscheduler info`` counts recent run ends right, and the
commands the quickstart and the examples' README walk through answer as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.database import Database

from helpers import TESTS_DIR, Recorder, index_names
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import DEFAULT_EVENT_QUEUE
from taskscheduler.core.changes import derived_id
from taskscheduler.ops.cluster import cluster_info
from taskscheduler.ops.embedded import EmbeddedServer

#: A fixed job id, so the derived ids below (and the times their first bytes seem to say) are the same every run.
JOB = ObjectId("65a000000000000000000021")


def _derived(before: bool, now: Any) -> ObjectId:
    """A derived event id (as a shared run end or a cancel has) whose first four bytes read as a time an hour or
    more before ``now`` (``before``) or after it: a hash, not a time, so it may read as either."""
    for n in range(1000):
        found = derived_id(JOB, 1, b"cancel%d" % n)
        if (found.generation_time < now - timedelta(hours=1)) == before and found.generation_time != now:
            return found
    raise AssertionError("no such id among the first 1000")


def test_info_counts_run_ends_by_their_time_whatever_their_ids_say(
    scheduler: Scheduler, db: Database[dict[str, Any]]
) -> None:
    # Given a canceled job whose CANCELED event is stored under derived ids, as cancels and shared ends are: one
    # end just now under an id that reads as long ago, one two hours ago under an id that reads as years ahead
    job = scheduler.add_job("sample_jobs:Noop")
    scheduler.cancel_job(job.id)
    events = db[DEFAULT_EVENT_QUEUE]
    (end,) = events.find({"job": job.id, "status": int(JobStatus.CANCELED)})
    now = scheduler.store.server_time()
    events.delete_one({"_id": end["_id"]})
    events.insert_one({**end, "_id": _derived(True, now), "time": now})
    events.insert_one({**end, "_id": _derived(False, now), "time": now - timedelta(hours=2)})
    # When an operator asks for the cluster's summary
    summary = cluster_info(scheduler)
    # Then the recent end counts in the last minute and hour, and the old one in neither
    assert summary["runs_ended"] == {"last_minute": {"canceled": 1}, "last_hour": {"canceled": 1}}


def test_info_counts_run_ends_of_the_last_minute_apart_from_the_hour(
    scheduler: Scheduler, db: Database[dict[str, Any]]
) -> None:
    job = scheduler.add_job("sample_jobs:Noop")
    scheduler.cancel_job(job.id)
    events = db[DEFAULT_EVENT_QUEUE]
    (end,) = events.find({"job": job.id})
    now = scheduler.store.server_time()
    for minutes, status in [(0, JobStatus.DONE), (5, JobStatus.FAILED), (30, JobStatus.FAILED)]:
        events.insert_one({**end, "_id": ObjectId(), "status": int(status), "time": now - timedelta(minutes=minutes)})
    summary = cluster_info(scheduler)
    assert summary["runs_ended"]["last_minute"] == {"canceled": 1, "done": 1}
    assert summary["runs_ended"]["last_hour"] == {"canceled": 1, "done": 1, "failed": 2}


@pytest.mark.parametrize(
    ("options", "index"), [({}, "time"), ({"event_queue_size": 0, "job_queue_size": 0}, "time_ttl")]
)
def test_info_reads_recent_run_ends_through_the_time_index(
    server: EmbeddedServer, db_name: str, options: dict[str, Any], index: str
) -> None:
    recorder = Recorder()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[recorder])
    try:
        s = Scheduler(client[db_name], options=options)
        s.cancel_job(s.add_job("sample_jobs:Noop").id)
        recorder.commands.clear()
        assert cluster_info(s)["runs_ended"]["last_minute"] == {"canceled": 1}
        reads = [
            c
            for _, c in recorder.commands
            if c.get("aggregate") == DEFAULT_EVENT_QUEUE or c.get("find") == DEFAULT_EVENT_QUEUE
        ]
        assert len(reads) == 1, reads
        (read,) = reads
        # Grouped on the server (an hour of a busy cluster's events never comes to the client), the window first
        first = read["pipeline"][0]["$match"]
        assert list(first) == ["time"]
        plan = client[db_name].command(
            "explain", {"aggregate": DEFAULT_EVENT_QUEUE, "pipeline": [read["pipeline"][0]], "cursor": {}}
        )
        assert index in index_names(plan), plan
    finally:
        client.drop_database(db_name)
        client.close()


@pytest.fixture
def run(server: EmbeddedServer, db_name: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs ``taskscheduler ARGS`` in a child process against the test's database."""

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name
        )
        return subprocess.run(
            [sys.executable, "-m", "taskscheduler", *args], capture_output=True, text=True, env=env, timeout=60
        )

    return call


def test_resume_says_when_the_key_was_not_paused(
    run: Callable[..., subprocess.CompletedProcess[str]], scheduler: Scheduler
) -> None:
    # Given a pause on one class
    scheduler.pause("sample_jobs:Noop")
    # When a mistyped key is resumed
    typo = run("resume", "sample_jobs:Nop")
    # Then it says the key was not paused and what is, and the real pause holds on
    assert typo.returncode == 0, typo.stderr
    assert typo.stdout == "sample_jobs:Nop was not paused (paused: sample_jobs:Noop)\n"
    assert scheduler.paused() == ["sample_jobs:Noop"]
    # And the right key resumes it
    right = run("resume", "sample_jobs:Noop")
    assert (right.returncode, right.stdout) == (0, "resumed sample_jobs:Noop\n")
    assert scheduler.paused() == []
    again = run("resume", "sample_jobs:Noop")
    assert again.stdout == "sample_jobs:Noop was not paused (paused: nothing)\n"


def test_pause_of_a_paused_key_says_so(
    run: Callable[..., subprocess.CompletedProcess[str]], scheduler: Scheduler
) -> None:
    first, second = run("pause", "*"), run("pause", "*")
    assert first.stdout == "paused *: running runs finish, due jobs wait\n"
    assert second.stdout == "paused * (already): running runs finish, due jobs wait\n"
    assert scheduler.paused() == ["*"]


@pytest.mark.parametrize(
    "args",
    [
        ("pause", "sample_jobs.Noop"),
        ("limit", "sample_jobs.Noop", "--concurrency", "1"),
        ("resume", "sample_jobs.Noop"),
    ],
)
def test_a_dotted_class_as_key_gets_a_note_on_how_classes_are_named(
    run: Callable[..., subprocess.CompletedProcess[str]], args: tuple[str, ...]
) -> None:
    done = run(*args)
    assert done.returncode == 0, done.stderr
    assert "note: a class is named 'module:QualName' ('sample_jobs:Noop')" in done.stderr


@pytest.mark.parametrize("key", ["sample_jobs:Noop", "mail", "*", "mail-api"])
def test_class_names_and_plain_keys_get_no_note(run: Callable[..., subprocess.CompletedProcess[str]], key: str) -> None:
    done = run("pause", key)
    assert done.returncode == 0, done.stderr
    assert "note:" not in done.stderr
