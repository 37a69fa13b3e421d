"""End to end: pool modes, force_spawn, parent/child jobs, and the order of events seen by a queue node."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import Node, live_children, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.ops.embedded import EmbeddedServer

pytestmark = pytest.mark.e2e


def workers_of(node: Node) -> list[psutil.Process]:
    return [w for m in live_children(node.pid) for w in live_children(m.pid)]


def test_static_pool_has_exactly_min_children(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    node = start_node("--pm", "static", "--min-children", "3", "--max-children", "5")
    wait_until(lambda: len(workers_of(node)) == 3, 20, what="3 workers")
    jobs = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.5}) for _ in range(6)]
    busy = {"status": JobStatus.PROCESSING}
    wait_until(lambda: scheduler.store.jobs.count_documents(busy) == 3, 20, what="three jobs running, three waiting")
    assert len(workers_of(node)) == 3
    scheduler.wait_for(jobs, timeout=30)
    assert len(workers_of(node)) == 3


def test_dynamic_pool_grows_to_max_and_shrinks_back(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    node = start_node("--pm", "dynamic", "--min-children", "1", "--max-children", "3")
    wait_until(lambda: len(workers_of(node)) == 1, 20, what="1 worker")
    jobs = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 1.5}) for _ in range(6)]
    wait_until(lambda: len(workers_of(node)) == 3, 20, what="grown to 3")
    scheduler.wait_for(jobs, timeout=30)
    wait_until(lambda: len(workers_of(node)) == 1, 20, what="shrunk to 1")


def test_ondemand_workers_exit_after_their_job(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    node = start_node("--pm", "ondemand", "--max-children", "2")
    wait_until(lambda: "worker manager started" in node.output(), 20, what="the manager")
    # An idle ondemand pool forks nothing, and nothing says "I did not fork": give a fork time to show.
    time.sleep(0.5)
    assert workers_of(node) == []
    jobs = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.5}) for _ in range(3)]
    wait_until(lambda: len(workers_of(node)) >= 1, 20, what="a worker per job")
    assert len(workers_of(node)) <= 2
    scheduler.wait_for(jobs, timeout=30)
    wait_until(lambda: workers_of(node) == [], 10, what="ondemand workers gone")


def test_force_spawn_goes_beyond_max_children(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    node = start_node("--pm", "static", "--min-children", "1", "--max-children", "1")
    wait_until(lambda: len(workers_of(node)) == 1, 20, what="1 worker")
    busy = scheduler.add_job("sample_jobs:Sleep", {"seconds": 3})
    wait_until(lambda: scheduler.get_job(busy.id).status == JobStatus.PROCESSING, 20, what="busy")
    forced = scheduler.add_job("sample_jobs:Sleep", {"seconds": 1}, force_spawn=True)
    wait_until(lambda: len(workers_of(node)) == 2, 20, what="a dedicated worker")
    forced.wait(timeout=30)
    assert forced.status == JobStatus.DONE
    assert scheduler.get_job(busy.id).status == JobStatus.PROCESSING  # it ran beside, not after
    busy.wait(timeout=30)


def test_child_of_failed_parent_is_canceled(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    parent = scheduler.add_job("sample_jobs:Fail", "parent").wait(timeout=30)
    assert parent.status == JobStatus.FAILED
    child = scheduler.add_job("sample_jobs:Noop", {"parent": parent.id})
    child.wait(timeout=30)
    assert child.status == JobStatus.CANCELED


def test_parent_fails_when_a_child_failed(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node("--max-children", "3")
    parent = scheduler.add_job("sample_jobs:SpawnChildren", {"child": "sample_jobs:Fail", "count": 2})
    parent.wait(timeout=60)
    assert parent.status == JobStatus.FAILED
    assert parent.error is not None and parent.error["class"] == "taskscheduler.errors.ChildJobFailedError"
    ok = scheduler.add_job("sample_jobs:SpawnChildren", {"child": "sample_jobs:Noop", "count": 2}).wait(timeout=60)
    assert ok.status == JobStatus.DONE and len(ok.result) == 2


def _queue_node(uri: str, database: str, record: str, manager: dict[str, Any]) -> None:
    from taskscheduler import DefaultWorkerFactory, Queue
    from taskscheduler.store import connect

    db = connect(uri, database)
    node = Queue(
        Scheduler(db),
        db,
        DefaultWorkerFactory(uri, database, manager_options=manager, imports=["sample_jobs"]),
        options={"orphaned_timeout": 2},
    )

    def write(name: str, payload: Any) -> None:
        if isinstance(payload, dict):
            line = f"{name} {payload['_id']} {payload['signal']}"
        else:
            line = f"{name} {payload.id} {payload.status.name}"
        with open(record, "a") as out:
            out.write(line + "\n")

    node.on("*", write)
    node.process()
    os._exit(node.exit_code)


@pytest.fixture
def observed_node(server: EmbeddedServer, db_name: str, tmp_path: Path) -> Any:
    record = tmp_path / "events.log"
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_queue_node, args=(server.uri, db_name, str(record), {"max_children": 2}))
    proc.start()

    def lines() -> list[list[str]]:
        return [line.split() for line in record.read_text().splitlines()] if record.exists() else []

    wait_until(lambda: any(line[0].endswith("WorkerSpawn") for line in lines()), 20, what="node ready")
    yield lines
    if proc.pid is not None:
        os.kill(proc.pid, signal.SIGTERM)
    proc.join(15)
    assert proc.exitcode == 0


def job_events(lines: list[list[str]], job_id: Any) -> list[str]:
    return [line[0].removeprefix("taskscheduler.on") for line in lines if line[1] == str(job_id)]


def test_event_order_success_failure_timeout_cancel(scheduler: Scheduler, observed_node: Any) -> None:
    ok = scheduler.add_job("sample_jobs:Noop").wait(timeout=30)
    failed = scheduler.add_job("sample_jobs:Fail", "e", retry=1, retry_interval=0).wait(timeout=30)
    assert failed.status == JobStatus.FAILED and failed.run == 2
    timed = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60}, timeout=1).wait(timeout=30)
    running = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60})
    wait_until(lambda: scheduler.get_job(running.id).status == JobStatus.PROCESSING, 20, what="running")
    scheduler.cancel_job(running.id)
    wait_until(lambda: "Cancel" in job_events(observed_node(), running.id), 10, what="cancel event")
    sigkill = str(int(signal.SIGKILL))
    wait_until(
        lambda: sum(1 for line in observed_node() if line[0].endswith("WorkerKill") and line[2] == sigkill) >= 2,
        10,
        what="the kills of the timed-out and the canceled worker",
    )
    lines = observed_node()
    assert job_events(lines, ok.id) == ["Waiting", "Processing", "Done"]
    # The retry is the same job: each run fires its own events, the first failure included.
    assert job_events(lines, failed.id) == ["Waiting", "Processing", "Failed", "Waiting", "Processing", "Failed"]
    assert [line[2] for line in lines if line[1] == str(failed.id)] == [
        "WAITING",
        "PROCESSING",
        "FAILED",
        "WAITING",
        "PROCESSING",
        "FAILED",
    ]
    assert job_events(lines, timed.id) == ["Waiting", "Processing", "Timeout"]
    assert job_events(lines, running.id) == ["Waiting", "Processing", "Cancel"]
    kills = [line for line in lines if line[0].endswith("WorkerKill")]
    assert [k[2] for k in kills].count(str(int(signal.SIGKILL))) >= 2  # the timed-out and the canceled worker
