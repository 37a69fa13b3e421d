"""docs/events.md, executed: for every scenario of "Order per scenario", the events a queue node records for the
job, in order, and what the event collection and ``Process.runs()`` hold afterwards.

Each node runs in a forked process and appends every event its ``Queue.on("*")`` handler receives to a file. A
node with no workers (``pm=static, min_children=0``) only watches: it lets a scenario choose which node runs a
job (the victim of a kill or a SIGTERM) while still seeing the job's whole life from its first event.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

from helpers import wait_until
from taskscheduler import JobStatus, Process, Scheduler
from taskscheduler.ops.embedded import EmbeddedServer

pytestmark = pytest.mark.e2e

PREFIX = "taskscheduler.on"
#: A node that runs jobs: the default dynamic pool (one worker, up to two).
WORKERS: dict[str, Any] = {"max_children": 2}
#: A node that only watches: it never runs a job.
WATCH_ONLY: dict[str, Any] = {"pm": "static", "min_children": 0, "max_children": 1}
#: The orphaned_timeout (lease) of every node here; orphans are looked for every half of it.
LEASE = 2.0


def _recording_node(uri: str, database: str, record: str, manager: dict[str, Any], shared: bool) -> None:
    """A queue node (in a forked process) that appends ``name id status|signal`` per event it receives."""
    from blinker import Namespace

    from taskscheduler import DefaultWorkerFactory, Queue
    from taskscheduler.store import connect

    db = connect(uri, database)
    namespace = Namespace() if shared else None  # shared: the node's Scheduler and Queue fire on one namespace
    node = Queue(
        Scheduler(db, emitter=namespace),
        db,
        DefaultWorkerFactory(uri, database, manager_options=manager, imports=["sample_jobs"]),
        emitter=namespace,
        options={"orphaned_timeout": LEASE},
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


class RecordingNode:
    """A queue node in a forked child process, and the events it recorded."""

    def __init__(self, child: Any, record: Path) -> None:
        self.child = child
        self.record = record
        self.killed = False

    def lines(self) -> list[list[str]]:
        return [line.split() for line in self.record.read_text().splitlines()] if self.record.exists() else []

    def events(self, job_id: ObjectId) -> list[str]:
        """Short names of the status events of one job, in the order the node fired them."""
        return [_short(line[0]) for line in self.lines() if line[1] == str(job_id)]

    def worker_events(self) -> list[tuple[str, str]]:
        """(short name, signal) of this node's workerSpawn/workerKill events, in order."""
        return [(_short(line[0]), line[2]) for line in self.lines() if line[0].endswith(("WorkerSpawn", "WorkerKill"))]

    def barrier(self, scheduler: Scheduler, timeout: float = 20.0) -> None:
        """Return once the node's change stream has delivered everything written before this call: a probe job
        (postponed for an hour, never run) is added and its event awaited. Also how a node is known to be ready
        (its change stream open): until then probes are missed, so a new one is added every second."""
        deadline = time.monotonic() + timeout
        while True:
            probe = scheduler.add_job("sample_jobs:Noop", at=time.time() + 3600).id
            try:
                wait_until(lambda p=probe: self.events(p), 1.0, what="the node to see a probe job")
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def send(self, sig: int = signal.SIGTERM) -> None:
        if self.child.is_alive():
            assert self.child.pid is not None
            os.kill(self.child.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        self.send(sig)
        self.child.join(15)
        return self.child.exitcode

    def kill(self) -> None:
        """SIGKILL the node process; its manager, then its workers, die with their parent (PR_SET_PDEATHSIG)."""
        self.killed = True
        self.stop(signal.SIGKILL)


@pytest.fixture
def start_recording_node(
    server: EmbeddedServer, db_name: str, tmp_path: Path, scheduler: Scheduler
) -> Iterator[Callable[..., RecordingNode]]:
    nodes: list[RecordingNode] = []
    ctx = multiprocessing.get_context("fork")

    def start(manager: dict[str, Any] | None = None, shared: bool = False) -> RecordingNode:
        record = tmp_path / f"events{len(nodes)}.log"
        child = ctx.Process(target=_recording_node, args=(server.uri, db_name, str(record), manager or WORKERS, shared))
        child.start()
        node = RecordingNode(child, record)
        nodes.append(node)
        node.barrier(scheduler)
        return node

    yield start
    # All of them at once: a node takes up to a second to stop (its stream reader's await).
    for node in nodes:
        node.send()
    for node in nodes:
        code = node.stop()
        assert node.killed or code == 0, f"node exited with {code}"


def _short(name: str) -> str:
    name = name.removeprefix(PREFIX)
    return name[:1].lower() + name[1:]


def stored(scheduler: Scheduler, job_id: ObjectId) -> list[tuple[int, str]]:
    """(run, status) of the job's event documents, in the store's order (run, then time)."""
    return [(e["run"], JobStatus(e["status"]).name) for e in scheduler.store.job_events(job_id)]


def ended_runs(process: Process) -> list[tuple[int, str]]:
    return [(r["run"], JobStatus(r["status"]).name) for r in process.runs()]


def running(scheduler: Scheduler, job_id: ObjectId) -> Callable[[], bool]:
    return lambda: scheduler.get_job(job_id).status == JobStatus.PROCESSING


# -- the scenarios of docs/events.md, one test each ------------------------------------------------------------------


def test_success(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    node = start_recording_node()
    p = scheduler.add_job("sample_jobs:Echo", "hi").wait(timeout=30)
    node.barrier(scheduler)
    assert node.events(p.id) == ["waiting", "processing", "done"]
    assert stored(scheduler, p.id) == [(1, "PROCESSING"), (1, "DONE")]
    assert ended_runs(p) == [(1, "DONE")] and p.runs()[0]["result"] == "hi"
    assert p.run == 1 and p.result == "hi"


def test_failure_with_retry_keeps_the_id(
    scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]
) -> None:
    node = start_recording_node()
    p = scheduler.add_job("sample_jobs:Fail", "e", retry=1, retry_interval=0).wait(timeout=30)
    node.barrier(scheduler)
    assert p.status == JobStatus.FAILED and p.run == 2
    assert node.events(p.id) == ["waiting", "processing", "failed", "waiting", "processing", "failed"]
    assert stored(scheduler, p.id) == [
        (1, "PROCESSING"),
        (1, "FAILED"),
        (2, "WAITING"),
        (2, "PROCESSING"),
        (2, "FAILED"),
    ]
    assert ended_runs(p) == [(1, "FAILED"), (2, "FAILED")]
    assert p.error is not None and p.error["class"] == "ValueError"
    assert scheduler.store.jobs.count_documents({"class": "sample_jobs:Fail"}) == 1  # no second document


def test_timeout(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    node = start_recording_node()
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60}, timeout=1).wait(timeout=30)
    node.barrier(scheduler)
    assert node.events(p.id) == ["waiting", "processing", "timeout"]
    assert stored(scheduler, p.id) == [(1, "PROCESSING"), (1, "TIMEOUT")]
    assert p.error is not None and p.error["class"] == "taskscheduler.errors.JobTimeoutError"
    sigkill = str(int(signal.SIGKILL))
    wait_until(lambda: len(node.worker_events()) >= 3, 10, what="the replacement worker")
    # The manager forks the replacement in the same tick as it kills (a killed worker no longer counts), and
    # reports the kill when it reaps the dead worker, one tick later.
    assert node.worker_events() == [("workerSpawn", "None"), ("workerSpawn", "None"), ("workerKill", sigkill)]


def test_timeout_with_retry(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    node = start_recording_node()
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60}, timeout=1, retry=1, retry_interval=0)
    p.wait(timeout=30)
    node.barrier(scheduler)
    assert p.status == JobStatus.TIMEOUT and p.run == 2
    assert node.events(p.id) == ["waiting", "processing", "timeout", "waiting", "processing", "timeout"]
    assert stored(scheduler, p.id) == [
        (1, "PROCESSING"),
        (1, "TIMEOUT"),
        (2, "WAITING"),
        (2, "PROCESSING"),
        (2, "TIMEOUT"),
    ]
    assert ended_runs(p) == [(1, "TIMEOUT"), (2, "TIMEOUT")]


def test_cancel_while_running(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    node = start_recording_node()
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60})
    wait_until(running(scheduler, p.id), 20, what="the job to run")
    scheduler.cancel_job(p.id)
    sigkill = str(int(signal.SIGKILL))
    wait_until(lambda: ("workerKill", sigkill) in node.worker_events(), 10, what="the canceled job's worker killed")
    # The node records the run's start (the canceler recorded CANCELED) once it has seen the worker die.
    wait_until(lambda: len(stored(scheduler, p.id)) == 2, 10, what="the canceled run's PROCESSING event")
    node.barrier(scheduler)
    assert node.events(p.id) == ["waiting", "processing", "cancel"]
    assert stored(scheduler, p.id) == [(1, "PROCESSING"), (1, "CANCELED")]
    assert ended_runs(p.refresh()) == [(1, "CANCELED")]


def test_postponed(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    node = start_recording_node()
    at = time.time() + 1
    p = scheduler.add_job("sample_jobs:Noop", at=at)
    assert p.status == JobStatus.POSTPONED
    p.wait(timeout=30)
    node.barrier(scheduler)
    assert node.events(p.id) == ["postponed", "waiting", "processing", "done"]
    assert stored(scheduler, p.id) == [(1, "WAITING"), (1, "PROCESSING"), (1, "DONE")]
    assert p.started is not None and p.started.timestamp() >= round(at, 3)


def test_interval_runs(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    node = start_recording_node()
    p = scheduler.add_job("sample_jobs:Noop", interval=2)
    p.wait(timeout=30)  # a recurring job: returns when the run it showed (1) has ended
    assert p.status == JobStatus.POSTPONED and p.run == 2
    assert ended_runs(p) == [(1, "DONE")]
    p.wait(timeout=30)
    assert p.status == JobStatus.POSTPONED and p.run == 3
    scheduler.cancel_job(p.id)  # ends the series
    node.barrier(scheduler)
    assert node.events(p.id) == [
        "waiting",
        "processing",
        "done",
        "postponed",
        "waiting",
        "processing",
        "done",
        "postponed",
        "cancel",
    ]
    assert stored(scheduler, p.id) == [
        (1, "PROCESSING"),
        (1, "DONE"),
        (2, "POSTPONED"),
        (2, "WAITING"),
        (2, "PROCESSING"),
        (2, "DONE"),
        (3, "POSTPONED"),
        (3, "CANCELED"),
    ]
    assert ended_runs(p.refresh()) == [(1, "DONE"), (2, "DONE"), (3, "CANCELED")]


def test_requeue(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    node = start_recording_node()
    p = scheduler.add_job("sample_jobs:Fail", "r").wait(timeout=30)
    assert p.status == JobStatus.FAILED and p.run == 1
    again = scheduler.requeue_job(p.id)
    assert again.id == p.id and again.run == 2 and again.status == JobStatus.WAITING
    again.wait(timeout=30)
    node.barrier(scheduler)
    assert node.events(p.id) == ["waiting", "processing", "failed", "waiting", "processing", "failed"]
    assert stored(scheduler, p.id) == [
        (1, "PROCESSING"),
        (1, "FAILED"),
        (2, "WAITING"),
        (2, "PROCESSING"),
        (2, "FAILED"),
    ]
    assert ended_runs(again) == [(1, "FAILED"), (2, "FAILED")]


def _released_note(scheduler: Scheduler, job_id: ObjectId) -> dict[str, Any]:
    released = [e for e in scheduler.store.job_events(job_id) if e["status"] == JobStatus.WAITING]
    assert released and all(e["worker"] is not None for e in released)
    return dict(released[-1]["error"])


def test_orphan_after_node_killed(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    watcher = start_recording_node(WATCH_ONLY)
    victim = start_recording_node()
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 3})
    wait_until(running(scheduler, p.id), 20, what="the victim to run the job")
    start_recording_node()  # the node that runs it again (it can no longer take the victim's claim)
    victim.kill()
    p.wait(timeout=30)
    watcher.barrier(scheduler)
    assert p.status == JobStatus.DONE and p.run == 1
    assert watcher.events(p.id) == ["waiting", "processing", "waiting", "processing", "done"]
    assert stored(scheduler, p.id) == [(1, "PROCESSING"), (1, "WAITING"), (1, "PROCESSING"), (1, "DONE")]
    assert ended_runs(p) == [(1, "DONE")]
    # Put back by another node (a sweep): no count is stored; the release event counts while the victim stays dead.
    assert scheduler.store.find_job(p.id)["orphaned"] == 0
    note = _released_note(scheduler, p.id)
    assert note["class"] == "taskscheduler.errors.JobReleasedError"
    assert note["message"] == "its node stopped renewing the lease"
    assert [e["sweep"]["back"] for e in scheduler.store.job_events(p.id) if "sweep" in e] == [False]


def _kill_worker(pid_file: Path) -> None:
    """SIGKILL the worker running a ``WritePid`` job, from outside (as the OOM killer would)."""
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 20, what="the job's worker pid"))
    pid_file.unlink()
    os.kill(pid, signal.SIGKILL)


def test_worker_killed_from_outside(
    scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode], tmp_path: Path
) -> None:
    node = start_recording_node()
    pid_file = tmp_path / "pid"
    p = scheduler.add_job("sample_jobs:WritePid", {"path": str(pid_file), "seconds": 1})
    _kill_worker(pid_file)
    p.wait(timeout=30)
    node.barrier(scheduler)
    assert p.status == JobStatus.DONE and p.run == 1
    assert node.events(p.id) == ["waiting", "processing", "waiting", "processing", "done"]
    assert stored(scheduler, p.id) == [(1, "PROCESSING"), (1, "WAITING"), (1, "PROCESSING"), (1, "DONE")]
    assert scheduler.store.find_job(p.id)["orphaned"] == 1
    assert _released_note(scheduler, p.id)["message"] == "worker process died (signal 9)"


def test_worker_killed_three_times(
    scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode], tmp_path: Path
) -> None:
    node = start_recording_node()
    pid_file = tmp_path / "pid"
    p = scheduler.add_job("sample_jobs:WritePid", {"path": str(pid_file), "seconds": 60})
    for _ in range(3):
        _kill_worker(pid_file)
    p.wait(timeout=30)
    node.barrier(scheduler)
    assert p.status == JobStatus.FAILED and p.run == 1
    assert node.events(p.id) == ["waiting", "processing", "waiting", "processing", "waiting", "processing", "failed"]
    assert stored(scheduler, p.id) == [
        (1, "PROCESSING"),
        (1, "WAITING"),
        (1, "PROCESSING"),
        (1, "WAITING"),
        (1, "PROCESSING"),
        (1, "FAILED"),
    ]
    assert p.error is not None and p.error["class"] == "taskscheduler.errors.OrphanedJobError"
    assert p.error["message"] == "job orphaned 3 times; last: worker process died (signal 9)"
    assert scheduler.store.find_job(p.id)["orphaned"] == 3
    assert ended_runs(p) == [(1, "FAILED")]


def test_sigterm_to_the_node(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    watcher = start_recording_node(WATCH_ONLY)
    victim = start_recording_node()
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 3})
    wait_until(running(scheduler, p.id), 20, what="the victim to run the job")
    start_recording_node()
    assert victim.stop(signal.SIGTERM) == 0
    sigkill = str(int(signal.SIGKILL))
    assert victim.worker_events() == [("workerSpawn", "None"), ("workerKill", sigkill)]
    p.wait(timeout=30)
    watcher.barrier(scheduler)
    assert p.status == JobStatus.DONE and p.run == 1
    assert watcher.events(p.id) == ["waiting", "processing", "waiting", "processing", "done"]
    assert stored(scheduler, p.id) == [(1, "PROCESSING"), (1, "WAITING"), (1, "PROCESSING"), (1, "DONE")]
    assert scheduler.store.find_job(p.id)["orphaned"] == 0
    assert _released_note(scheduler, p.id) == {
        "class": "taskscheduler.errors.JobReleasedError",
        "message": "queue node stopped",
        "traceback": "",
    }


def test_failure_with_retry_seen_late(scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]) -> None:
    """A node that reads its change stream late (paused here; busy, or resuming its stream after an outage, in
    real life) still fires every change of the job once, in order, although the documents it looks up are
    newer than the changes it reads."""
    watcher = start_recording_node(WATCH_ONLY)
    start_recording_node()
    assert watcher.child.pid is not None
    os.kill(watcher.child.pid, signal.SIGSTOP)
    try:
        p = scheduler.add_job("sample_jobs:Fail", "late", retry=1, retry_interval=0).wait(timeout=30)
    finally:
        os.kill(watcher.child.pid, signal.SIGCONT)
    watcher.barrier(scheduler)
    assert p.status == JobStatus.FAILED and p.run == 2
    assert watcher.events(p.id) == ["waiting", "processing", "failed", "waiting", "processing", "failed"]


def test_shared_namespace_fires_each_change_once(
    scheduler: Scheduler, start_recording_node: Callable[..., RecordingNode]
) -> None:
    """The node's own writes (un-postponing, recording a timeout and its retry) reach a handler on a namespace
    shared by its Scheduler and its Queue twice (emitted, then seen in the change stream): fired once."""
    node = start_recording_node(shared=True)
    p = scheduler.add_job(
        "sample_jobs:Sleep", {"seconds": 60}, at=time.time() + 1, timeout=1, retry=1, retry_interval=1
    )
    p.wait(timeout=30)
    node.barrier(scheduler)
    assert node.events(p.id) == [
        "postponed",
        "waiting",
        "processing",
        "timeout",
        "postponed",
        "waiting",
        "processing",
        "timeout",
    ]
