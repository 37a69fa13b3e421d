"""End to end under faults: several nodes, killed nodes, SIGTERM, orphans, a server that drops connections."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient

from helpers import Node, alive, live_children, wait_until
from taskscheduler import JobStatus, Scheduler

pytestmark = pytest.mark.e2e


def runs(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines() if line.strip())


def test_two_nodes_run_each_job_exactly_once(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    nodes = [start_node("--max-children", "3"), start_node("--max-children", "3")]
    jobs = [scheduler.add_job("sample_jobs:CountRun", {"path": str(log)}) for _ in range(150)]
    scheduler.wait_for(jobs, timeout=240)
    assert all(p.status == JobStatus.DONE for p in jobs)
    counted = runs(log)
    assert len(counted) == 150 and set(counted.values()) == {1}
    assert counted.keys() == {str(p.id) for p in jobs}
    pids = {line.split()[1] for line in log.read_text().splitlines()}
    assert len(pids) >= 2  # the work really was spread over workers
    assert [n.stop() for n in nodes] == [0, 0]


def test_sigkill_of_a_node_group_reruns_job_elsewhere(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    victim = start_node(orphaned_timeout=2)
    p = scheduler.add_job("sample_jobs:WritePid", {"path": str(pid_file), "seconds": 2})
    wait_until(pid_file.exists, 30, what="first run")
    first_pid = wait_until(pid_file.read_text, 5)
    victim.kill_group()
    assert scheduler.get_job(p.id).status == JobStatus.PROCESSING
    start_node(orphaned_timeout=2)
    p.wait(timeout=60)
    assert p.status == JobStatus.DONE
    assert pid_file.read_text() != first_pid
    doc = scheduler.store.find_job(p.id)
    assert doc["orphaned"] == 0  # put back by another node: the sweep's event counts, not the job document
    assert [e["status"] for e in scheduler.store.job_events(p.id)] == [
        JobStatus.PROCESSING,
        JobStatus.WAITING,
        JobStatus.PROCESSING,
        JobStatus.DONE,
    ]


def test_sigterm_puts_running_job_back_and_exits_zero(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    node = start_node()
    p = scheduler.add_job("sample_jobs:WritePid", {"path": str(pid_file), "seconds": 3600})
    wait_until(pid_file.exists, 30, what="job start")
    worker_pid = int(wait_until(pid_file.read_text, 5))
    started = time.monotonic()
    assert node.stop(signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - started < 10
    back = scheduler.get_job(p.id)
    assert back.status == JobStatus.WAITING and back.worker is None
    assert not alive(worker_pid)
    assert scheduler.store.jobs.count_documents({"status": JobStatus.PROCESSING}) == 0


def test_sigint_stops_gracefully_too(scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    node = start_node()
    p = scheduler.add_job("sample_jobs:WritePid", {"path": str(pid_file), "seconds": 3600})
    wait_until(pid_file.exists, 30, what="job start")
    assert node.stop(signal.SIGINT, timeout=15) == 0
    assert scheduler.get_job(p.id).status == JobStatus.WAITING


def test_long_job_without_progress_is_not_orphaned(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node(orphaned_timeout=1)
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 3.5}).wait(timeout=30)
    assert p.status == JobStatus.DONE
    assert scheduler.store.find_job(p.id)["orphaned"] == 0


def test_worker_crash_three_times_ends_failed(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    start_node(orphaned_timeout=1)
    pid_file = tmp_path / "pid"
    p = scheduler.add_job("sample_jobs:WritePid", {"path": str(pid_file), "seconds": 3600})
    for attempt in range(3):
        pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30, what=f"run {attempt}"))
        pid_file.unlink()
        os.kill(pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.status == JobStatus.FAILED
    assert p.error is not None and "orphaned" in p.error["message"]


def test_orphan_of_a_dead_node_is_reset_by_another(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    # A job claimed by a node that died before doing anything else: its short lease runs out, never renewed.

    dead = ObjectId()
    assert scheduler.store.claim(p.id, dead, 0.5) is not None
    start_node(orphaned_timeout=1)
    p.wait(timeout=30)
    assert p.status == JobStatus.DONE and p.run == 1 and p.worker not in (None, dead)
    assert scheduler.store.find_job(p.id)["orphaned"] == 0  # a sweep stores no count (SPEC 4: dead processes only)
    events = scheduler.store.job_events(p.id)
    assert [(e["status"], e["worker"] == dead) for e in events] == [
        (JobStatus.PROCESSING, True),
        (JobStatus.WAITING, True),
        (JobStatus.PROCESSING, False),
        (JobStatus.DONE, False),
    ]
    assert events[1]["error"]["class"] == "taskscheduler.errors.JobReleasedError"
    assert [r["status"] for r in p.runs()] == [JobStatus.DONE]


def test_node_recovers_after_server_closes_connections(
    scheduler: Scheduler, start_node: Callable[..., Node], client: MongoClient[dict[str, Any]]
) -> None:
    node = start_node(orphaned_timeout=1)  # orphan checks every 0.5 s: the node's own reads hit the failpoint
    busy = scheduler.add_job("sample_jobs:Sleep", {"seconds": 4})
    wait_until(lambda: scheduler.get_job(busy.id).status == JobStatus.PROCESSING, 30, what="running")
    client.admin.command(
        "configureFailPoint",
        "failCommand",
        mode={"times": 200},
        data={"failCommands": ["getMore", "aggregate", "update", "insert", "find"], "closeConnection": True},
    )
    try:
        time.sleep(3)  # the fault itself: connections closed for 3 s (not a wait for anything)
    finally:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
    assert node.proc.poll() is None, node.output()
    p = scheduler.add_job("sample_jobs:Noop")
    p.wait(timeout=60)
    assert p.status == JobStatus.DONE
    busy.wait(timeout=30)
    assert busy.status == JobStatus.DONE
    log = node.output()
    assert "round failed" in log or "interrupted" in log, log[-2000:]


def test_node_keeps_working_after_flush(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    assert scheduler.add_job("sample_jobs:Noop").wait(timeout=30).status == JobStatus.DONE
    scheduler.flush()
    assert scheduler.store.jobs.count_documents({}) == 0
    p = scheduler.add_job("sample_jobs:Echo", "after flush").wait(timeout=30)
    assert p.status == JobStatus.DONE and p.result == "after flush"


def test_node_restarts_a_dead_manager(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    import psutil

    node = start_node()
    assert scheduler.add_job("sample_jobs:Noop").wait(timeout=30).status == JobStatus.DONE
    (manager,) = psutil.Process(node.pid).children()
    manager.kill()
    wait_until(
        lambda: (
            [c.pid for c in live_children(node.pid)]
            not in ([], [manager.pid])
        ),
        20,
        what="a new manager",
    )
    assert scheduler.add_job("sample_jobs:Noop").wait(timeout=30).status == JobStatus.DONE
    assert node.stop() == 0


@pytest.mark.e2e
def test_a_run_that_returned_during_a_short_outage_runs_once_and_ends_done(
    scheduler: Scheduler,
    start_node: Callable[..., Node],
    tmp_path: Path,
    client: Any,
) -> None:
    """SPEC 4: an outage shorter than orphaned_timeout fails no job: a returned run is recorded once after it."""
    log = tmp_path / "runs.log"
    start_node("--import", "crash_jobs", orphaned_timeout=3)
    p = scheduler.add_job("crash_jobs:EndThenLinger", {"path": str(log), "linger": 0.3})
    wait_until(lambda: log.exists() and "end" in log.read_text(), 30, interval=0.01, what="the job's work")
    client.admin.command(
        "configureFailPoint", "failCommand", mode="alwaysOn", data={"failCommands": ["update"], "closeConnection": True}
    )
    try:
        time.sleep(2.5)  # shorter than orphaned_timeout (3 s)
    finally:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
    p.wait(timeout=30)
    assert scheduler.add_job("sample_jobs:Noop").wait(timeout=30).status == JobStatus.DONE  # the node went on
    starts = [line for line in log.read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 1 and p.status == JobStatus.DONE, f"ran {len(starts)} times, ended {p.status.name}"
