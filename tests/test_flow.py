"""SPEC 8, limits and pauses: the Scheduler's calls, what is stored, and a worker's slots (tests/e2e/test_flow.py
runs them across real nodes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.database import Database

from helpers import claim
from taskscheduler import AsyncScheduler, JobStatus, Scheduler
from taskscheduler.core.flow import Controls, keys_of
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.node import slots as slots_module
from taskscheduler.node.slots import Slots
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.testing import run_jobs


def test_limits_are_set_changed_listed_and_removed(scheduler: Scheduler) -> None:
    scheduler.set_limit("sample_jobs:Sleep", concurrency=2)
    scheduler.set_limit("mail", rate="10/m")
    scheduler.set_limit("mail", concurrency=1, rate="5/s")  # changed in place
    assert scheduler.limits() == {
        "mail": {"concurrency": 1, "rate": "5/s"},
        "sample_jobs:Sleep": {"concurrency": 2, "rate": None},
    }
    scheduler.remove_limit("mail")
    scheduler.remove_limit("never set")  # nothing to remove: no error
    assert list(scheduler.limits()) == ["sample_jobs:Sleep"]


@pytest.mark.parametrize(
    ("key", "concurrency", "rate", "match"),
    [
        ("", 1, None, "key must be"),
        (5, 1, None, "key must be"),
        ("*", 1, None, "a limit needs a class or a limit_key"),
        ("k", None, None, "needs concurrency, rate or both"),
        ("k", 0, None, "concurrency must be a whole number of at least 1"),
        ("k", True, None, "concurrency must be"),
        ("k", None, "10", "rate must be like"),
        ("k", None, "0/s", "rate must be like"),
        ("k", None, "3/d", "rate must be like"),
    ],
)
def test_a_bad_limit_is_refused_and_nothing_is_stored(
    scheduler: Scheduler, key: Any, concurrency: Any, rate: Any, match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        scheduler.set_limit(key, concurrency=concurrency, rate=rate)
    assert scheduler.limits() == {}


def test_pauses_are_listed_and_resumed(scheduler: Scheduler) -> None:
    scheduler.pause("*")
    scheduler.pause("sample_jobs:Noop")
    scheduler.pause("sample_jobs:Noop")  # twice is once
    assert scheduler.paused() == ["*", "sample_jobs:Noop"]
    scheduler.resume("*")
    scheduler.resume("not paused")
    assert scheduler.paused() == ["sample_jobs:Noop"]
    with pytest.raises(InvalidArgumentError):
        scheduler.pause("")


def test_what_a_node_holds_back(scheduler: Scheduler) -> None:
    job = scheduler.add_job("sample_jobs:Noop", limit_key="mail").document()
    assert keys_of(job) == ["sample_jobs:Noop", "mail"]
    now = scheduler.store.clock.now()
    assert Controls().held_back(job, now) is None
    scheduler.pause("mail")
    assert Controls.from_docs(scheduler.store.flow_controls()).held_back(job, now) == "paused"
    scheduler.resume("mail")
    scheduler.set_limit("mail", concurrency=1)
    controls = Controls.from_docs(scheduler.store.flow_controls())
    assert controls.limited(job) == ("mail",) and controls.held_back(job, now) is None
    assert scheduler.store.take_slot("mail", ObjectId(), ObjectId())
    assert Controls.from_docs(scheduler.store.flow_controls()).held_back(job, now) == "limit mail"


def test_a_slot_whose_run_is_over_is_taken_over(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose process died frees its slot when the run is orphaned: the next worker drops it (once a claim on
    its way would have landed: CLAIM_GRACE_SECONDS, made 0 here)."""
    monkeypatch.setattr(slots_module, "CLAIM_GRACE_SECONDS", 0.0)
    scheduler.set_limit("sample_jobs:Sleep", concurrency=1)
    dead = scheduler.add_job("sample_jobs:Sleep", {"seconds": 1})
    doc, worker = claim(scheduler, dead.id)
    store = scheduler.store
    assert Slots(store, worker, _logger()).take(dead.id, ["sample_jobs:Sleep"])  # (taken before the claim, really)
    other = scheduler.add_job("sample_jobs:Sleep", {"seconds": 1})
    slots = Slots(store, ObjectId(), _logger())
    assert not slots.take(other.id, ["sample_jobs:Sleep"])  # the first run still runs under its worker
    scheduler.lifecycle.release_orphan(store.find_job(dead.id), reason="test").record()  # swept: its run is over
    assert slots.take(other.id, ["sample_jobs:Sleep"])
    holders = store.limit_holders("sample_jobs:Sleep")
    assert [h["job"] for h in holders] == [other.id]
    slots.give_back(other.id, ["sample_jobs:Sleep"])
    assert store.limit_holders("sample_jobs:Sleep") == []


def test_two_workers_handed_the_same_job_each_hold_their_own_slot(scheduler: Scheduler) -> None:
    """Two nodes hand one job to a worker each; the loser of the claim gives back its own slot, never the
    winner's (which left the limit one run short, and let a third run in)."""
    scheduler.set_limit("k", concurrency=2)
    store, job = scheduler.store, ObjectId()
    winner, loser = ObjectId(), ObjectId()
    assert store.take_slot("k", job, winner) and store.take_slot("k", job, loser)
    store.free_slots(["k"], job, loser)
    assert [(h["job"], h["worker"]) for h in store.limit_holders("k")] == [(job, winner)]
    assert store.take_slot("k", job, winner)  # taken already: no second slot
    assert len(store.limit_holders("k")) == 1


def test_a_rate_limit_counts_starts_in_a_sliding_window(scheduler: Scheduler) -> None:
    scheduler.set_limit("r", rate="2/s")
    store, worker = scheduler.store, ObjectId()
    jobs = [ObjectId() for _ in range(3)]
    assert store.take_slot("r", jobs[0], worker) and store.take_slot("r", jobs[1], worker)
    store.free_slots(["r"], jobs[0])
    store.free_slots(["r"], jobs[1])
    assert not store.take_slot("r", jobs[2], worker)  # two starts within the last second, although none runs
    deadline = time.monotonic() + 3
    while not store.take_slot("r", jobs[2], worker):  # the window slides on
        assert time.monotonic() < deadline, "the window never slid"
        time.sleep(0.05)


def test_run_jobs_honours_pauses(scheduler: Scheduler) -> None:
    scheduler.pause("sample_jobs:Noop")
    paused = scheduler.add_job("sample_jobs:Noop")
    other = scheduler.add_job("sample_jobs:Echo", "x")
    assert [p.id for p in run_jobs(scheduler)] == [other.id]
    scheduler.resume("sample_jobs:Noop")
    assert [p.id for p in run_jobs(scheduler)] == [paused.id]


def test_limit_key_is_a_checked_job_option(scheduler: Scheduler) -> None:
    with pytest.raises(InvalidArgumentError, match="limit_key"):
        scheduler.add_job("sample_jobs:Noop", limit_key=5)
    with pytest.raises(InvalidArgumentError, match="limit_key"):
        scheduler.add_job("sample_jobs:Noop", limit_key="a\nb")
    assert scheduler.add_job("sample_jobs:Noop", limit_key="mail").options["limit_key"] == "mail"


def test_the_async_scheduler_has_the_flow_calls(server: EmbeddedServer, db: Database[dict[str, Any]]) -> None:
    asyncio.run(_async_flow_calls(server, db.name))


async def _async_flow_calls(server: EmbeddedServer, database: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
    scheduler = AsyncScheduler(client[database])
    await scheduler.set_limit("k", concurrency=3)
    await scheduler.pause("k")
    assert await scheduler.limits() == {"k": {"concurrency": 3, "rate": None}}
    assert await scheduler.paused() == ["k"]
    await scheduler.resume("k")
    await scheduler.remove_limit("k")
    assert await scheduler.paused() == [] and await scheduler.limits() == {}
    chain = await scheduler.add_chain([("sample_jobs:Noop", None), ("sample_jobs:Noop", None)])
    assert await chain[1].blocked_by() == [chain[0].id]
    assert chain[1].status == JobStatus.WAITING
    await scheduler.close()
    await client.close()


def _logger() -> Any:
    import logging

    return logging.getLogger("test")
