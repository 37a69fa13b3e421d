"""The 15 MB job limit (SPEC 5): a change event carries the whole job document, and MongoDB fails a change stream
whose event exceeds 16 MB, so every way a job is written refuses a larger one before anything is written; results
stored with a run stay below the limit too."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import bson
import pytest
from bson import ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient
from pymongo.database import Database

import sample_jobs
from helpers import TESTS_DIR, Node, wait_until
from taskscheduler import AbstractJob, AsyncScheduler, JobStatus, Scheduler
from taskscheduler.core.changes import MAX_RESULT_SIZE
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.node.worker import Worker
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import MAX_JOB_SIZE

FUTURE = 2_000_000_000


def stored_size(scheduler: Scheduler, job_id: ObjectId) -> int:
    raw = scheduler.store.jobs.with_options(codec_options=bson.CodecOptions(document_class=RawBSONDocument))
    doc = raw.find_one({"_id": job_id})
    assert doc is not None
    return len(doc.raw)


def padding(scheduler: Scheduler, empty_job: ObjectId) -> int:
    """Characters of string data that make a job like ``empty_job`` (data ``""``) exactly MAX_JOB_SIZE bytes:
    a string's BSON size grows by one byte per ASCII character."""
    return MAX_JOB_SIZE - stored_size(scheduler, empty_job)


def written(scheduler: Scheduler) -> tuple[int, int, Any]:
    """What a refused add must leave as it was: jobs, events and the room ledger."""
    return (
        scheduler.store.jobs.count_documents({}),
        scheduler.store.events.count_documents({}),
        scheduler.store.room.find_one({"_id": "used"}),
    )


def assert_refused(error: BaseException, size: int) -> None:
    message = str(error)
    assert isinstance(error, InvalidArgumentError)
    assert f"{size} bytes" in message and str(MAX_JOB_SIZE) in message and "15 MB" in message


def test_add_job_takes_a_job_at_the_limit_and_refuses_one_byte_more(scheduler: Scheduler) -> None:
    n = padding(scheduler, scheduler.add_job(sample_jobs.Noop, "", at=FUTURE).id)
    at_limit = scheduler.add_job(sample_jobs.Noop, "x" * n, at=FUTURE)
    assert stored_size(scheduler, at_limit.id) == MAX_JOB_SIZE
    before = written(scheduler)
    with pytest.raises(InvalidArgumentError) as refused:
        scheduler.add_job(sample_jobs.Noop, "x" * (n + 1), at=FUTURE)
    assert_refused(refused.value, MAX_JOB_SIZE + 1)
    assert written(scheduler) == before


def test_add_job_once_refuses_a_job_over_the_limit_before_replacing_anything(scheduler: Scheduler) -> None:
    # With ignore_data, a call with other data replaces (cancels) the active job: a refused one must not.
    first = scheduler.add_job_once(sample_jobs.Noop, "", at=FUTURE, ignore_data=True)
    n = padding(scheduler, first.id)
    before = written(scheduler)
    with pytest.raises(InvalidArgumentError) as refused:
        scheduler.add_job_once(sample_jobs.Noop, "x" * (n + 1), at=FUTURE, ignore_data=True)
    assert_refused(refused.value, MAX_JOB_SIZE + 1)
    assert written(scheduler) == before and scheduler.get_job(first.id).status == JobStatus.POSTPONED
    replacing = scheduler.add_job_once(sample_jobs.Noop, "x" * n, at=FUTURE, ignore_data=True)
    assert stored_size(scheduler, replacing.id) == MAX_JOB_SIZE
    assert scheduler.get_job(first.id).status == JobStatus.CANCELED


def test_async_scheduler_takes_a_job_at_the_limit_and_refuses_one_byte_more(
    scheduler: Scheduler, server: EmbeddedServer, db_name: str
) -> None:
    n = padding(scheduler, scheduler.add_job(sample_jobs.Noop, "", at=FUTURE).id)

    async def main() -> tuple[ObjectId, list[BaseException]]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        aio = AsyncScheduler(client[db_name])
        try:
            at_limit = await aio.add_job(sample_jobs.Noop, "x" * n, at=FUTURE)
            refused: list[BaseException] = []
            for add in (aio.add_job, aio.add_job_once):
                try:
                    await add(sample_jobs.Noop, "x" * (n + 1), at=FUTURE)
                except InvalidArgumentError as exc:
                    refused.append(exc)
            return at_limit.id, refused
        finally:
            await aio.close()
            await client.close()

    job_id, refused = asyncio.run(main())
    assert stored_size(scheduler, job_id) == MAX_JOB_SIZE
    assert len(refused) == 2
    assert_refused(refused[0], MAX_JOB_SIZE + 1)
    assert scheduler.store.jobs.count_documents({}) == 2


def test_cli_add_takes_a_job_at_the_limit_and_refuses_one_byte_more(
    scheduler: Scheduler, server: EmbeddedServer, db_name: str
) -> None:
    # One argument of a real exec is limited to 128 KiB (Linux): a child process hands the --data it reads from
    # stdin to the CLI's entry point, which then runs, prints and exits as `taskscheduler add` does.
    pythonpath = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath, TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name)
    entry = (
        "import sys; from taskscheduler.cli.commands import main; "
        f"main(['add', 'sample_jobs:Noop', '--at', '{FUTURE}', '--data', sys.stdin.read()])"
    )

    def add(data: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", entry], input=json.dumps(data), capture_output=True, text=True, env=env, timeout=60
        )

    empty = add("")
    assert empty.returncode == 0, empty.stderr
    n = padding(scheduler, ObjectId(empty.stdout.strip()))
    at_limit = add("x" * n)
    assert at_limit.returncode == 0 and stored_size(scheduler, ObjectId(at_limit.stdout.strip())) == MAX_JOB_SIZE
    before = written(scheduler)
    over = add("x" * (n + 1))
    assert over.returncode == 2 and over.stdout == ""
    assert len(over.stderr.splitlines()) == 1, over.stderr
    assert f"{MAX_JOB_SIZE + 1} bytes" in over.stderr and str(MAX_JOB_SIZE) in over.stderr
    assert written(scheduler) == before


def test_requeue_refuses_a_job_stored_over_the_limit(new_scheduler: Callable[..., Scheduler]) -> None:
    # An older version stored jobs up to 16 MB; requeuing one would put it back in every node's change stream.
    scheduler = new_scheduler()
    small = scheduler.add_job(sample_jobs.Noop, "", at=FUTURE)
    scheduler.cancel_job(small.id)
    doc = scheduler.store.jobs.find_one_and_delete({"_id": small.id})
    assert doc is not None
    scheduler.store.jobs.insert_one(dict(doc, data="x" * padding_of(doc, MAX_JOB_SIZE + 1)))
    before = written(scheduler)
    with pytest.raises(InvalidArgumentError) as refused:
        scheduler.requeue_job(small.id)
    assert_refused(refused.value, MAX_JOB_SIZE + 1)
    assert written(scheduler) == before
    again = scheduler.get_job(small.id)
    assert again.status == JobStatus.CANCELED and again.run == 1


def padding_of(doc: dict[str, Any], size: int) -> int:
    """Characters of string data that make ``doc`` (whose data is ``""``) ``size`` bytes."""
    return size - len(bson.encode(doc))


class SizedResult(AbstractJob):
    """Returns a string whose stored size as a result (``{"v": result}`` in BSON) is ``data`` bytes."""

    def start(self) -> str:
        return "x" * (int(self.data) - len(bson.encode({"v": ""})))


def test_a_result_over_the_result_limit_is_stored_as_none(
    db: Database[dict[str, Any]], caplog: pytest.LogCaptureFixture, new_scheduler: Callable[..., Scheduler]
) -> None:
    # No size guard: its change stream of 15 MB documents with pre-images outgrows the test server's messages.
    scheduler = new_scheduler()
    worker = Worker(ObjectId(), scheduler, db)
    fits = worker.process_one(scheduler.add_job(f"{__name__}:SizedResult", MAX_RESULT_SIZE).id)
    assert fits.status == JobStatus.DONE and isinstance(fits.result, str)
    with caplog.at_level(logging.WARNING, logger="taskscheduler"):
        over = worker.process_one(scheduler.add_job(f"{__name__}:SizedResult", MAX_RESULT_SIZE + 1).id)
    assert over.status == JobStatus.DONE and over.result is None
    assert "result is too large" in caplog.text
    biggest = max(len(bson.encode(e)) for e in scheduler.store.events.find({}))
    assert MAX_RESULT_SIZE < biggest <= MAX_JOB_SIZE


@pytest.mark.e2e
def test_a_job_just_under_the_limit_runs_while_other_jobs_keep_running(
    new_scheduler: Callable[..., Scheduler], start_node: Callable[..., Node]
) -> None:
    scheduler = new_scheduler()  # no size guard, as above
    start_node()
    n = padding(scheduler, scheduler.add_job(sample_jobs.Noop, "", at=FUTURE).id)
    running = scheduler.add_job(sample_jobs.Sleep, {"seconds": 1.5})
    wait_until(lambda: scheduler.get_job(running.id).status == JobStatus.PROCESSING, what="the first job running")
    with pytest.raises(InvalidArgumentError):
        scheduler.add_job(sample_jobs.Noop, "x" * (n + 1))
    big = scheduler.add_job(sample_jobs.Noop, "x" * (n - 1))
    others = [scheduler.add_job(sample_jobs.Echo, i) for i in range(3)]
    scheduler.wait_for([running, big, *others], timeout=60)
    assert [p.status for p in (running, big, *others)] == [JobStatus.DONE] * 5
    assert running.result == "slept" and [p.result for p in others] == [0, 1, 2]
    assert stored_size(scheduler, big.id) == MAX_JOB_SIZE - 1
