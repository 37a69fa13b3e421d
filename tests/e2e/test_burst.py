"""SPEC 9: `taskscheduler queue --burst` serves until no job of its modules is due or running, then stops as on
SIGTERM and exits 0; postponed jobs not yet due do not keep it alive."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from helpers import Node
from taskscheduler import JobStatus, Queue, Scheduler
from taskscheduler.errors import InvalidArgumentError

#: Generous: a burst node stops within a second of going idle; this only bounds a hung test.
EXIT_SECONDS = 60


def test_a_burst_node_runs_what_is_due_and_exits_0(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    jobs = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.3}) for _ in range(3)]
    retried = scheduler.add_job("sample_jobs:Fail", "x", retry=1, retry_interval=0)  # its next run is due at once
    later = scheduler.add_job("sample_jobs:Noop", at=time.time() + 3600)
    other = scheduler.add_job("other_module:Job", {"ignored": True})  # no job of this node's modules
    node = start_node("--burst", "--max-children", "2")
    assert node.proc.wait(EXIT_SECONDS) == 0, node.output()[-3000:]
    assert [scheduler.get_job(p.id).status for p in jobs] == [JobStatus.DONE] * 3
    failed = scheduler.get_job(retried.id)
    assert failed.status == JobStatus.FAILED and len(failed.runs()) == 2  # the retry ran before the node stopped
    assert scheduler.get_job(later.id).status == JobStatus.POSTPONED  # not due: it did not keep the node alive
    assert scheduler.get_job(other.id).status == JobStatus.WAITING
    assert scheduler.store.jobs.count_documents({"status": int(JobStatus.PROCESSING)}) == 0
    assert "burst mode: no job of this node's modules is due or running; stopping" in node.output()


def test_a_burst_node_with_nothing_to_do_exits_0_at_once(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    node = start_node("--burst")
    assert node.proc.wait(EXIT_SECONDS) == 0, node.output()[-3000:]
    assert "queue node stopped" in node.output()


def test_a_burst_node_waits_for_a_postponed_job_that_becomes_due(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    running = scheduler.add_job("sample_jobs:Sleep", {"seconds": 2.5})
    soon = scheduler.add_job("sample_jobs:Noop", at=time.time() + 1.5)  # due while the first one runs
    node = start_node("--burst")
    assert node.proc.wait(EXIT_SECONDS) == 0, node.output()[-3000:]
    assert scheduler.get_job(running.id).status == JobStatus.DONE
    assert scheduler.get_job(soon.id).status == JobStatus.DONE


def test_the_burst_option_is_checked(scheduler: Scheduler) -> None:
    from taskscheduler import DefaultWorkerFactory

    factory = DefaultWorkerFactory("mongodb://127.0.0.1:1", "x", imports=["sample_jobs"])
    with pytest.raises(InvalidArgumentError, match="option burst must be a boolean"):
        Queue(scheduler, scheduler.db, factory, options={"burst": "yes"})
    assert Queue(scheduler, scheduler.db, factory, options={"burst": True}).get_options()["burst"] is True
