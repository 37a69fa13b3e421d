"""The queue node's loop, driven in-process: what it keeps of its workers' claims, and its round of steps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from pymongo.database import Database

from helpers import claim, wait_until, worker_factory
from taskscheduler import JobStatus, Queue, Scheduler
from taskscheduler.constants import NO_WORKER
from taskscheduler.node.heartbeat import Heartbeat
from taskscheduler.node.protocol import JobClaimed, JobFinished
from taskscheduler.node.queue import _Timers
from taskscheduler.node.wakeups import Wakeups
from taskscheduler.ops.embedded import EmbeddedServer


@pytest.fixture
def queue(db: Database[dict[str, Any]], server: EmbeddedServer, new_scheduler: Callable[..., Scheduler]) -> Queue:
    """A queue node of the test's database, driven in this process (nothing forked: its loop is not started)."""
    return Queue(new_scheduler(), db, worker_factory(server.uri, db.name))


def test_a_late_finish_of_the_previous_run_keeps_the_nodes_claim_of_the_next(
    queue: Queue, scheduler: Scheduler
) -> None:
    """SPEC 4: a node keeps renewing worker B's claim of run 2 when worker A's Finished of run 1 is read after it."""
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker_a = claim(scheduler, p.id, lease=1.0)
    _report(queue, JobClaimed(p.id, worker_a, 1))
    assert scheduler.lifecycle.end(doc, worker_a, JobStatus.DONE).record()  # run 2 WAITING at once
    _, worker_b = claim(scheduler, p.id, lease=1.0)  # the node's other worker claims run 2
    _report(queue, JobClaimed(p.id, worker_b, 2))
    _report(queue, JobFinished(p.id, worker_a))  # A's Finished, read after B's claim
    beat = Heartbeat(scheduler.lifecycle, 1.0, queue._owners, lambda m: True, logging.getLogger("test"))
    for _ in range(8):  # 1.6 s of heartbeats, as the node's thread does
        beat.beat()
        time.sleep(0.2)  # the heartbeat thread's pace: past the 1 s lease, which only these beats renew
    queue._reschedule_orphans()
    now = scheduler.store.find_job(p.id)
    assert now["status"] == JobStatus.PROCESSING and now["worker"] == worker_b, "the node released its own live job"


def test_one_failing_step_of_a_node_round_skips_nothing_else(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """One failing step of a node's round (recording a kill) skips neither the due jobs, the orphans nor the manager."""
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("cannot record a kill")

    monkeypatch.setattr(queue, "_record_kills", broken)
    monkeypatch.setattr(queue, "_release_due", lambda: ran.append("due"))
    monkeypatch.setattr(queue, "_reschedule_orphans", lambda: ran.append("orphans"))
    monkeypatch.setattr(queue, "_check_manager", lambda: ran.append("manager"))
    timers = _Timers(2.0)
    timers.orphans = 0.0
    with queue.store.status_feed(flow=True) as feed:
        queue._wakeups = Wakeups(feed).start()
        try:
            for _ in range(2):
                queue._iterate(timers)
                timers.orphans = 0.0
        finally:
            queue._wakeups.stop()
    assert ran == ["due", "orphans", "manager"] * 2


def _report(queue: Queue, message: Any) -> None:
    """A manager report as the node takes it: tracked by its inbox thread, then handled by its loop."""
    queue._track(message)
    queue._on_manager_message(message)


def test_a_nodes_sweep_settles_a_canceled_run_whose_node_died(queue: Queue, scheduler: Scheduler) -> None:
    """The worker and its node died between the worker's end events and its status write, on a canceled job."""
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker = claim(scheduler, p.id, lease=0.3)
    scheduler.store.insert_events(scheduler.lifecycle.end(doc, worker, JobStatus.DONE).events)
    scheduler.cancel_job(p.id)
    wait_until(lambda: scheduler.store.server_time() > scheduler.store.find_job(p.id)["expires"], timeout=10)
    queue._reschedule_orphans()
    assert scheduler.store.find_job(p.id)["worker"] == NO_WORKER
    ends = [(e["run"], e["status"]) for e in scheduler.store.job_events(p.id) if e["status"] != JobStatus.PROCESSING]
    assert ends == [(1, JobStatus.CANCELED)]
