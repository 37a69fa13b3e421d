"""get_jobs: no filter lists the unfinished jobs, the empty filter every job, any other filter what it matches;
the same through Scheduler and AsyncScheduler."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient

import sample_jobs
from taskscheduler import AsyncScheduler, JobStatus, Scheduler
from taskscheduler.ops.embedded import EmbeddedServer

FUTURE = 2_000_000_000


@pytest.fixture
def jobs(scheduler: Scheduler) -> dict[str, ObjectId]:
    """One waiting, one postponed and one finished (canceled) job."""
    waiting = scheduler.add_job(sample_jobs.Noop, "waiting")
    postponed = scheduler.add_job(sample_jobs.Noop, "postponed", at=FUTURE)
    finished = scheduler.add_job(sample_jobs.Noop, "finished", at=FUTURE)
    scheduler.cancel_job(finished.id)
    assert waiting.status == JobStatus.WAITING and postponed.status == JobStatus.POSTPONED
    return {"waiting": waiting.id, "postponed": postponed.id, "finished": finished.id}


def found(ids: list[ObjectId], jobs: dict[str, ObjectId]) -> set[str]:
    names = {job_id: name for name, job_id in jobs.items()}
    assert len(ids) == len(set(ids))
    return {names[i] for i in ids}


def test_none_lists_the_unfinished_jobs_the_empty_filter_every_job(
    scheduler: Scheduler, jobs: dict[str, ObjectId]
) -> None:
    assert found([p.id for p in scheduler.get_jobs()], jobs) == {"waiting", "postponed"}
    assert found([p.id for p in scheduler.get_jobs(None)], jobs) == {"waiting", "postponed"}
    assert found([p.id for p in scheduler.get_jobs({})], jobs) == {"waiting", "postponed", "finished"}
    canceled = scheduler.get_jobs({"status": int(JobStatus.CANCELED)})
    assert found([p.id for p in canceled], jobs) == {"finished"}
    assert found([p.id for p in scheduler.get_jobs({"data": {"$ne": "waiting"}})], jobs) == {"postponed", "finished"}


def test_async_get_jobs_reads_none_and_the_empty_filter_as_the_sync_api(
    server: EmbeddedServer, db_name: str, jobs: dict[str, ObjectId]
) -> None:
    async def main() -> dict[str, set[str]]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        aio = AsyncScheduler(client[db_name])
        try:
            return {
                "default": found([p.id for p in await aio.get_jobs()], jobs),
                "none": found([p.id async for p in aio.get_jobs(None)], jobs),
                "empty": found([p.id for p in await aio.get_jobs({})], jobs),
                "empty, iterated": found([p.id async for p in aio.get_jobs({})], jobs),
                "canceled": found([p.id for p in await aio.get_jobs({"status": int(JobStatus.CANCELED)})], jobs),
            }
        finally:
            await aio.close()
            await client.close()

    assert asyncio.run(main()) == {
        "default": {"waiting", "postponed"},
        "none": {"waiting", "postponed"},
        "empty": {"waiting", "postponed", "finished"},
        "empty, iterated": {"waiting", "postponed", "finished"},
        "canceled": {"finished"},
    }
