"""WorkerManager options (upstream WorkerManagerTest), pool behaviour driven over its pipe, and the kills a heartbeat
asks of it (fences, lost leases) on fake workers."""

from __future__ import annotations

import logging
import os
import time
from multiprocessing import Pipe
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database

from helpers import IdleWorkerFactory, claim, wait_until, worker_factory
from taskscheduler import DefaultWorkerFactory, JobStatus, Scheduler
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.node.fencing import LeaseSlot
from taskscheduler.node.heartbeat import Heartbeat
from taskscheduler.node.manager import WorkerManager, _WorkerProc
from taskscheduler.node.protocol import (
    CancelJob,
    Claimed,
    Ending,
    JobKilled,
    KillReason,
    RunJob,
    Stop,
    WorkerExited,
    WorkerSpawned,
)
from taskscheduler.ops.embedded import EmbeddedServer


def factory(**manager: Any) -> DefaultWorkerFactory:
    return DefaultWorkerFactory("mongodb://127.0.0.1:1/?directConnection=true", "x", manager_options=manager or None)


@pytest.mark.parametrize(
    "options",
    [
        {"min_children": 3, "max_children": 2},
        {"pm": "foo"},
        {"pm": "STATIC"},
        {"min_children": "foo"},
        {"max_children": "foo"},
        {"max_children": 0},
        {"min_children": True},
        {"bar": 1},
    ],
)
def test_invalid_options(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        WorkerManager(factory(), options=options)
    with pytest.raises(InvalidArgumentError):
        factory(**options)


def test_defaults_and_constants() -> None:
    m = WorkerManager(factory())
    assert m.get_options() == {"pm": "dynamic", "min_children": 1, "max_children": 2}
    assert (WorkerManager.PM_DYNAMIC, WorkerManager.PM_STATIC, WorkerManager.PM_ONDEMAND) == (
        "dynamic",
        "static",
        "ondemand",
    )
    assert m.set_options({"pm": "static", "min_children": 2}).get_options()["min_children"] == 2
    with pytest.raises(InvalidArgumentError):
        WorkerManager(object())  # type: ignore[arg-type]


def test_manager_forks_min_children_and_stops_them() -> None:
    """A manager in its own process: static pool of 2, then 'stop' kills both and reports their ends."""
    parent, child = Pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the manager process
        code = 0
        try:
            parent.close()
            WorkerManager(IdleWorkerFactory(), options={"pm": "static", "min_children": 2}).process(child)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    child.close()
    messages: list[Any] = []

    def read(kind: type, count: int) -> bool:
        try:
            while parent.poll(0.1):
                messages.append(parent.recv())
        except EOFError:
            pass  # the manager has exited
        return sum(1 for m in messages if isinstance(m, kind)) >= count

    wait_until(lambda: read(WorkerSpawned, 2), 10, what="two workers")
    spawned = [m for m in messages if isinstance(m, WorkerSpawned)]
    assert len({m.worker_id for m in spawned}) == 2 and len({m.pid for m in spawned}) == 2
    parent.send(Stop())
    wait_until(lambda: read(WorkerExited, 2), 10, what="two exits")
    exited = [m for m in messages if isinstance(m, WorkerExited)]
    assert {(m.worker_id, m.pid) for m in exited} == {(m.worker_id, m.pid) for m in spawned}
    assert all(m.signal is None for m in exited)  # idle workers leave on the stop's Exit message, unkilled
    assert not [m for m in messages if isinstance(m, JobKilled)]  # idle workers: no job to report
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_a_claim_the_heartbeat_never_renewed_is_killed_before_its_lease_ends(
    db: Database[dict[str, Any]], server: EmbeddedServer, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 4: the fences other jobs earn never keep a worker running past the lease of a claim nobody renewed."""
    known, unknown = scheduler.add_job("sample_jobs:Noop"), scheduler.add_job("sample_jobs:Noop")
    doc_a, worker_a = claim(scheduler, known.id, lease=1.2)
    doc_b, worker_b = claim(scheduler, unknown.id, lease=1.2)
    manager = WorkerManager(worker_factory(server.uri, db.name))
    killed: list[tuple[ObjectId, KillReason]] = []

    def kill(child: _WorkerProc, reason: KillReason) -> None:
        child.kill_reason = reason
        killed.append((child.job, reason))

    monkeypatch.setattr(manager, "_kill", kill)
    for pid, (worker, doc) in enumerate([(worker_a, doc_a), (worker_b, doc_b)], start=1):
        child = manager._workers[pid] = fake_child(worker, pid)
        child.job, child.task = doc["_id"], RunJob(doc, 1.2)
        manager._on_worker_message(child, Claimed(doc["_id"], 0, 1))
    # The node's loop has read the first claim only; its heartbeat thread goes on.
    beat = Heartbeat(
        scheduler.lifecycle,
        1.2,
        lambda: {known.id: (worker_a, 1)},
        lambda m: manager._on_queue_message(m) or True,
        logging.getLogger("test"),
    )
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        beat.beat()
        manager._enforce_deadlines()
        if unknown.id in [d["_id"] for d in scheduler.lifecycle.orphans()]:  # any node may take it over now
            assert (unknown.id, KillReason.LOST) in killed, "its lease ran out while its worker was allowed to run on"
        time.sleep(0.2)  # the heartbeat thread's pace (L/6), not a wait for anything


def test_a_stale_heartbeat_snapshot_spares_the_worker_of_the_next_run(
    db: Database[dict[str, Any]], server: EmbeddedServer, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 4: a heartbeat kill names the worker and the run: run 1's stale owner never gets run 2's worker killed."""
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker_a = claim(scheduler, p.id)
    assert scheduler.lifecycle.end(doc, worker_a, JobStatus.DONE).record()
    doc2, worker_b = claim(scheduler, p.id)
    manager = WorkerManager(worker_factory(server.uri, db.name))
    killed: list[ObjectId] = []
    monkeypatch.setattr(manager, "_kill", lambda child, reason: killed.append(child.id))
    idle_a = manager._workers[1] = fake_child(worker_a, 1)  # A finished run 1: idle
    busy_b = manager._workers[2] = fake_child(worker_b, 2)
    busy_b.job, busy_b.task = p.id, RunJob(doc2, 30.0)
    manager._on_worker_message(busy_b, Claimed(p.id, 0, 2))
    beat = Heartbeat(
        scheduler.lifecycle,
        30.0,
        lambda: {p.id: (worker_a, 1)},  # the snapshot, taken before the node read A's Finished
        lambda m: manager._on_queue_message(m) or True,
        logging.getLogger("test"),
    )
    beat.beat()
    assert idle_a.job is None
    assert worker_b not in killed, "the healthy worker of run 2 was killed because run 1's worker had moved on"


@pytest.mark.parametrize("why", ["cancel", "timeout", "fence"])
def test_a_worker_whose_ending_waits_in_the_pipe_is_never_killed(why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 4: a run whose code returned is never killed (cancel, timeout or fence): its worker sends Ending before
    it writes anything about the end, and the manager reads what a worker sent before it decides a kill. Killed
    midway through recording, the worker could not withdraw an end that lost (a canceled run kept a DONE event)."""
    manager = WorkerManager(IdleWorkerFactory())
    killed: list[KillReason] = []
    monkeypatch.setattr(manager, "_kill", lambda child, reason: killed.append(reason))
    job_id, parent, worker_end = ObjectId(), *Pipe()
    proc = manager._workers[1] = _WorkerProc(ObjectId(), 1, parent, LeaseSlot(), dedicated=False)
    proc.job, proc.task = job_id, RunJob({"_id": job_id, "options": {"timeout": 1}}, 30.0)
    manager._on_worker_message(proc, Claimed(job_id, 1, 1))
    worker_end.send(Ending(job_id))  # the job's code returned; the manager has not read it yet
    if why == "cancel":
        manager._on_queue_message(CancelJob(job_id))
    else:
        proc.deadline = time.monotonic() - 1 if why == "timeout" else None
        proc.fence = 0.0 if why == "fence" else proc.fence
        manager._enforce_deadlines()
    assert killed == [] and proc.ending


def test_a_force_spawn_job_during_a_spawn_backoff_runs_after_it() -> None:
    manager = WorkerManager(IdleWorkerFactory(), options={"pm": "ondemand", "min_children": 0})
    manager._spawn_blocked_until = time.monotonic() + 0.3  # a fork just failed
    manager._add(RunJob({"_id": ObjectId(), "options": {"force_spawn": True}}, 30.0))
    assert manager.count() == 0
    try:
        wait_until(lambda: manager._spawn_forced() or manager.count() == 1, 5, what="the forced worker")
    finally:
        manager._stop_all()
    assert manager.count() == 0


def fake_child(worker: ObjectId, pid: int) -> _WorkerProc:
    parent, _ = Pipe()
    return _WorkerProc(worker, pid, parent, LeaseSlot(), dedicated=False)


@pytest.mark.parametrize("pm", ["static", "dynamic"])
def test_an_idle_manager_waits_long_and_a_busy_one_keeps_its_tick(pm: str) -> None:
    from taskscheduler.node import manager as manager_module

    manager = WorkerManager(factory(), options={"pm": pm, "min_children": 1, "max_children": 2})
    idle = manager._workers[1] = fake_child(ObjectId(), 1)
    assert manager._wait_time() == manager_module.IDLE_WAIT_SECONDS  # only messages, exits and signals wake it
    manager._workers[2] = fake_child(ObjectId(), 2)  # one more than the minimum
    expected = manager_module.TICK_SECONDS if pm == "dynamic" else manager_module.IDLE_WAIT_SECONDS
    assert manager._wait_time() == expected  # a dynamic pool lets the spare one go after its idle time
    del manager._workers[2]
    idle.job = ObjectId()  # a job handed over: its timeout and fence are timed
    assert manager._wait_time() == manager_module.TICK_SECONDS
    idle.job = None
    manager._outbox.append(object())  # reports waiting for room in the pipe
    assert manager._wait_time() == manager_module.OUTBOX_TICK_SECONDS
    manager._outbox.clear()
    del manager._workers[1]  # below the minimum: a spawn to try again
    assert manager._wait_time() == manager_module.TICK_SECONDS
