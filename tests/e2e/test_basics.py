"""End to end: real queue nodes (``taskscheduler queue`` processes), their managers and workers, a real server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Node,
    alive,
    wait_until,
)
from taskscheduler import JobStatus, Scheduler
from taskscheduler.errors import JobFailedError

pytestmark = pytest.mark.e2e


def test_job_runs_and_stores_result(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    node = start_node()
    p = scheduler.add_job("sample_jobs:Echo", {"hello": "world"})
    p.wait(timeout=30)
    assert p.status == JobStatus.DONE
    assert p.result == {"hello": "world"}
    assert p.progress == 100.0 and p.started is not None and p.ended is not None and p.ended >= p.started
    assert p.worker is not None and p.error is None
    assert node.stop() == 0


def test_failure_records_error_and_wait_for_throws(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    p = scheduler.add_job("sample_jobs:Fail", "x")
    with pytest.raises(JobFailedError) as info:
        scheduler.wait_for([p], Scheduler.OPTION_THROW_EXCEPTION, timeout=30)
    assert info.value.process.status == JobStatus.FAILED
    assert info.value.error is not None
    assert info.value.error["class"] == "ValueError"
    assert info.value.error["message"] == "boom: x"
    assert "Traceback" in info.value.error["traceback"] and "sample_jobs.py" in info.value.error["traceback"]
    assert p.status == JobStatus.FAILED and p.error == info.value.error
    q = scheduler.add_job("sample_jobs:Fail", "y")
    q.wait(timeout=30)  # without throw: returns with the status
    assert q.status == JobStatus.FAILED


def test_unimportable_class_fails_with_invalid_job_error(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()  # its allow-list: sample_jobs (jobs of other modules wait for a node that serves them)
    missing = scheduler.add_job("sample_jobs:Missing").wait(timeout=30)
    no_module = scheduler.add_job("sample_jobs.nope:Job").wait(timeout=30)
    for p in (missing, no_module):
        assert p.status == JobStatus.FAILED
        assert p.error is not None and p.error["class"] == "taskscheduler.errors.InvalidJobError"


def test_unencodable_result_still_done(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    p = scheduler.add_job("sample_jobs:Unencodable").wait(timeout=30)
    assert p.status == JobStatus.DONE and p.result is None


def test_retry_chain_runs_three_times(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    p = scheduler.add_job("sample_jobs:Fail", "r", retry=2, retry_interval=0)
    # Retries are runs of the same job: wait() follows it to its end, and only the last failure throws.
    with pytest.raises(JobFailedError) as info:
        p.wait(timeout=30, throw=True)
    assert info.value.process is p
    assert p.status == JobStatus.FAILED and p.run == 3 and p.options["retry"] == 0
    runs = p.runs()
    assert [(r["run"], r["status"]) for r in runs] == [(n, JobStatus.FAILED) for n in (1, 2, 3)]
    assert all(r["error"]["message"] == "boom: r" and r["job"] == p.id for r in runs)
    assert p.error == runs[-1]["error"] == info.value.error
    assert scheduler.store.jobs.count_documents({}) == 1
    assert list(scheduler.get_jobs()) == []


def test_timeout_kills_job_blocked_in_c(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 3600}, timeout=1)
    p.wait(timeout=30)
    assert p.status == JobStatus.TIMEOUT
    assert p.error is not None and "timeout" in p.error["message"]
    assert p.ended is not None and p.started is not None
    assert (p.ended - p.started).total_seconds() < 5
    assert scheduler.add_job("sample_jobs:Noop").wait(timeout=30).status == JobStatus.DONE


def test_cancel_running_job_kills_it(scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node()
    pid_file = tmp_path / "pid"
    p = scheduler.add_job("sample_jobs:WritePid", {"path": str(pid_file), "seconds": 3600})
    wait_until(pid_file.exists, 30, what="job start")
    pid = int(wait_until(pid_file.read_text, 5))
    scheduler.cancel_job(p.id)
    canceled_at = time.monotonic()
    wait_until(lambda: not alive(pid), 5, what="worker killed")
    assert time.monotonic() - canceled_at < 2.5
    assert scheduler.get_job(p.id).status == JobStatus.CANCELED
    assert scheduler.add_job("sample_jobs:Noop").wait(timeout=30).status == JobStatus.DONE
    assert node.stop() == 0


def test_postponed_job_starts_within_a_second(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    # A first job done means the node is in its loop: the measurement is then about scheduling only.
    assert scheduler.add_job("sample_jobs:Noop").wait(timeout=30).status == JobStatus.DONE
    at = time.time() + 2
    p = scheduler.add_job("sample_jobs:Noop", at=at)
    assert p.status == JobStatus.POSTPONED
    p.wait(timeout=30)
    assert p.status == JobStatus.DONE and p.started is not None
    assert at <= p.started.timestamp() + 0.05 < at + 1.0


def test_interval_adds_next_run(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    p = scheduler.add_job("sample_jobs:Echo", "tick", interval=100)
    p.wait(timeout=30)  # a recurring job: returns once its run has ended, showing that run's outcome
    assert p.status == JobStatus.POSTPONED and p.run == 2
    assert p.options["interval"] == 100 and p.options["at"] > time.time() + 90
    assert p.result == "tick" and p.ended is not None and p.worker is None
    assert [(r["run"], r["status"], r["result"]) for r in p.runs()] == [(1, JobStatus.DONE, "tick")]
    assert [q.id for q in scheduler.get_jobs()] == [p.id]  # the next run is the same job


def test_progress_reaches_100(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    p = scheduler.add_job("sample_jobs:Progress").wait(timeout=30)
    assert p.status == JobStatus.DONE and p.progress == 100.0


def unused(*_: Any) -> None:
    pass


@pytest.mark.e2e
def test_interval_job_with_timeouts_keeps_one_document_until_canceled(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    start_node()
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60}, interval=1, timeout=1)
    wait_until(lambda: len(scheduler.get_job(p.id).runs()) >= 2, 30, what="two timed-out runs")
    wait_until(lambda: scheduler.get_job(p.id).status == JobStatus.PROCESSING, 15, what="the third run")
    scheduler.cancel_job(p.id)
    p.wait(timeout=10)
    runs = p.runs()
    assert p.status == JobStatus.CANCELED
    assert [r["status"] for r in runs[:-1]] == [JobStatus.TIMEOUT] * (len(runs) - 1)
    assert runs[-1]["status"] == JobStatus.CANCELED and [r["run"] for r in runs] == list(range(1, len(runs) + 1))
    assert [d["_id"] for d in scheduler.store.jobs.find({"class": "sample_jobs:Sleep"})] == [p.id]
