"""Regression tests of the crash-safe lifecycle: one per defect a review found by killing, pausing and cutting off
processes at the wrong moment (numbered as in the issue). Each failed on the design they replace."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from blinker import Namespace
from bson import ObjectId
from pymongo import MongoClient
from pymongo.database import Database

from crash_jobs import HUGE, read_log
from helpers import IdleWorkerFactory, Node, as_record, wait_until
from taskscheduler import DefaultWorkerFactory, JobStatus, Queue, Scheduler, Worker
from taskscheduler.core.runs import next_start
from taskscheduler.errors import QueueFullError, ServerUnavailableError, WaitTimeoutError
from taskscheduler.node.fencing import lease_clock
from taskscheduler.node.heartbeat import Heartbeat
from taskscheduler.node.manager import WorkerManager
from taskscheduler.node.protocol import Fence, KillJob, KillReason, RunJob
from taskscheduler.node.queue import _Timers
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import StatusFeed
from taskscheduler.store.records import RunContext


def claim(scheduler: Scheduler, job_id: ObjectId, lease: float = 30.0) -> tuple[dict[str, Any], ObjectId]:
    worker = ObjectId()
    doc = scheduler.lifecycle.claim(job_id, worker, lease)
    assert doc is not None
    return doc, worker


def jobs_of(scheduler: Scheduler, job_class: str) -> list[dict[str, Any]]:
    return list(scheduler.store.jobs.find({"class": job_class}))


def end_events(scheduler: Scheduler, job_id: ObjectId) -> list[tuple[int, int]]:
    """(run, status) of the events that record a run's end."""
    ends = (JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED)
    return [(e["run"], e["status"]) for e in scheduler.store.job_events(job_id) if e["status"] in ends]


def applied_then_lost(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next transition is written, but its answer never arrives (the connection drops)."""
    real = store.transition

    def transition(*args: Any, **kw: Any) -> bool:
        monkeypatch.setattr(store, "transition", real)
        real(*args, **kw)
        raise ServerUnavailableError("connection closed")

    monkeypatch.setattr(store, "transition", transition)


# 1. A worker killed between writing its run's end and the job's status left a next run behind, and its node then
#    added a second one; cancelling a running interval job did not stop its series.


def test_1_worker_killed_mid_end_leaves_one_next_run_and_no_stale_outcome(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60}, interval=60, timeout=1)
    doc, worker = claim(scheduler, p.id)
    dying = scheduler.lifecycle.end(doc, worker, JobStatus.DONE, result="late", has_result=True)
    scheduler.store.insert_events(dying.events)  # ...and SIGKILL (timeout) before the status write
    scheduler.lifecycle.after_kill(p.id, worker, 1, "timeout", 1).record()
    (stored,) = jobs_of(scheduler, "sample_jobs:Sleep")
    assert stored["_id"] == p.id and stored["status"] == JobStatus.POSTPONED and stored["run"] == 2
    assert end_events(scheduler, p.id) == [(1, JobStatus.TIMEOUT)]  # the dead worker's DONE is withdrawn
    assert scheduler.get_job(p.id).error["class"] == "taskscheduler.errors.JobTimeoutError"
    # Recording the kill again (the node's retry) changes nothing.
    scheduler.lifecycle.after_kill(p.id, worker, 1, "timeout", 1).record()
    assert len(jobs_of(scheduler, "sample_jobs:Sleep")) == 1 and scheduler.get_job(p.id).run == 2


def test_1_cancelling_a_running_interval_job_ends_its_series(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker = claim(scheduler, p.id)
    scheduler.cancel_job(p.id)
    assert scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record() is False  # the worker lost it
    scheduler.lifecycle.after_kill(p.id, worker, 1, "cancel", 0).record()
    (stored,) = jobs_of(scheduler, "sample_jobs:Noop")
    assert stored["status"] == JobStatus.CANCELED and stored["run"] == 1
    assert end_events(scheduler, p.id) == [(1, JobStatus.CANCELED)]


@pytest.mark.e2e
def test_1_interval_job_with_timeouts_keeps_one_document_until_canceled(
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
    assert [d["_id"] for d in jobs_of(scheduler, "sample_jobs:Sleep")] == [p.id]


# 2. The node's retry after an outage built a new end each time: two next runs and two TIMEOUT events.


def test_2_a_retried_end_record_writes_everything_once(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 9}, retry=3, retry_interval=0, timeout=1)
    doc, worker = claim(scheduler, p.id)
    kill = scheduler.lifecycle.after_kill(p.id, worker, 1, "timeout", 1)
    applied_then_lost(scheduler.store, monkeypatch)
    with pytest.raises(ServerUnavailableError):
        kill.record()
    kill.record()  # the node's next round
    (stored,) = jobs_of(scheduler, "sample_jobs:Sleep")
    assert stored["run"] == 2 and stored["status"] == JobStatus.WAITING and stored["options"]["retry"] == 2
    statuses = [e["status"] for e in scheduler.store.job_events(p.id)]
    assert statuses == [JobStatus.PROCESSING, JobStatus.TIMEOUT, JobStatus.WAITING]


# 3. A stalled node's job was taken over while its worker kept running it; heartbeats ignored lost ownership;
#    orphan checks used the checker's timeout and clock.


def test_3_lease_is_the_owners_and_on_the_server_clock(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id, lease=30)
    assert scheduler.lifecycle.orphans() == []  # whatever the checker's own orphaned_timeout
    stored = scheduler.store.find_job(p.id)  # alive and expires are the server's own times
    assert stored["expires"] > stored["alive"] and abs((stored["alive"] - doc["started"]).total_seconds()) < 5
    q = scheduler.add_job("sample_jobs:Noop")
    _, short = claim(scheduler, q.id, lease=0.3)
    wait_until(lambda: [d["_id"] for d in scheduler.lifecycle.orphans()] == [q.id], 10, what="the short lease to end")


def test_3_heartbeat_reports_jobs_taken_over(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id, lease=0.2)
    orphan = wait_until(lambda: scheduler.lifecycle.orphans(), 10, what="expiry")[0]
    assert scheduler.lifecycle.release(
        orphan, worker, orphaned=True, reason="test", expires=orphan["expires"]
    ).record()
    claim(scheduler, p.id)  # another node's worker
    assert scheduler.lifecycle.heartbeat({p.id: (worker, 1)}) == {p.id}
    renewed = scheduler.store.find_job(p.id)
    assert renewed["worker"] != worker


def test_3_a_heartbeat_after_the_check_saves_the_job(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    _, worker = claim(scheduler, p.id, lease=0.2)
    orphan = wait_until(lambda: scheduler.lifecycle.orphans(), 10, what="expiry")[0]
    assert scheduler.lifecycle.heartbeat({p.id: (worker, 1)}) == set()  # its node came back just in time
    change = scheduler.lifecycle.release(orphan, worker, orphaned=True, reason="test", expires=orphan["expires"])
    assert change.record() is False
    assert scheduler.get_job(p.id).status == JobStatus.PROCESSING


@pytest.mark.e2e
def test_3_a_stalled_node_never_runs_a_job_beside_its_successor(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    stalled = start_node("--import", "crash_jobs", orphaned_timeout=2)
    p = scheduler.add_job("crash_jobs:StartLog", {"path": log, "seconds": 6})
    first = wait_until(lambda: [pid for what, pid, _ in read_log(log) if what == "start"], 30, what="first run")[0]
    os.kill(stalled.pid, signal.SIGSTOP)  # the queue process only: its manager and worker go on
    try:
        died_at = wait_until(lambda: None if _alive(first) else time.time(), 10, what="the stalled node to fence")
        start_node("--import", "crash_jobs", orphaned_timeout=2)
        starts = wait_until(lambda: [e for e in read_log(log) if e[0] == "start"][1:], 30, what="second run")
        assert starts[0][2] > died_at, "the successor started while the stalled node's worker still ran the job"
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    p.wait(timeout=30)
    assert p.status == JobStatus.DONE
    assert [what for what, _, _ in read_log(log)] == ["start", "start", "end"]
    assert stalled.proc.poll() is None, stalled.output()[-2000:]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# 4. QueueFullError was check-then-insert: concurrent producers near a full capped collection evicted jobs.


def _produce(uri: str, name: str, attempts: int, out: Any) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(uri, tz_aware=True)
    scheduler = Scheduler(client[name], options={"job_queue_size": 40_000})
    added = []
    for _ in range(attempts):
        try:
            added.append(str(scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 500}).id))
        except QueueFullError:
            pass
    out.send(added)
    client.close()


def test_4_concurrent_producers_never_evict_an_unfinished_job(
    server: EmbeddedServer, db: Database[dict[str, Any]], db_name: str
) -> None:
    Scheduler(db, options={"job_queue_size": 40_000}).store.ensure()
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for _ in range(4):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_produce, args=(server.uri, db_name, 40, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    added = [job_id for pipe in pipes for job_id in pipe.recv()]
    for proc in procs:
        proc.join(30)
    stored = {str(d["_id"]) for d in db["taskscheduler.jobs"].find({}, {"_id": 1})}
    assert 0 < len(added) < 160  # it filled up
    assert stored == set(added)  # every job a producer was told was added is still there


# 5. A next run that did not fit was dropped with a log line; a retried end record of an add_job_once job ended
#    its series.


def test_5_a_retry_needs_no_room_in_a_full_collection(db: Database[dict[str, Any]]) -> None:
    scheduler = Scheduler(db, options={"job_queue_size": 8_000})
    p = scheduler.add_job("sample_jobs:Fail", "x", retry=1, retry_interval=0)
    with pytest.raises(QueueFullError):
        for _ in range(100):
            scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 200})
    before = scheduler.store.jobs.count_documents({})
    doc, worker = claim(scheduler, p.id)
    assert scheduler.lifecycle.end(doc, worker, JobStatus.FAILED, error={"class": "E", "message": "m"}).record()
    assert scheduler.store.jobs.count_documents({}) == before
    retried = scheduler.get_job(p.id)
    assert retried.status == JobStatus.WAITING and retried.run == 2


def test_5_a_retried_end_of_an_add_job_once_series_keeps_the_series(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = scheduler.add_job_once("sample_jobs:Noop", "once", interval=60)
    doc, worker = claim(scheduler, p.id)
    end = scheduler.lifecycle.end(doc, worker, JobStatus.DONE)
    applied_then_lost(scheduler.store, monkeypatch)
    with pytest.raises(ServerUnavailableError):
        end.record()
    assert end.record() is True
    again = scheduler.get_job(p.id)
    assert again.status == JobStatus.POSTPONED and again.run == 2
    assert scheduler.add_job_once("sample_jobs:Noop", "once", interval=60).id == p.id  # still the active one


# 6. A result or error over 16 MB crashed the worker: the job was orphaned three times, its cause lost.


def test_6_oversized_result_and_error_are_recorded(
    scheduler: Scheduler, db: Database[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(ObjectId(), scheduler, db)
    with caplog.at_level(logging.WARNING, logger="taskscheduler"):
        done = worker.process_one(scheduler.add_job("crash_jobs:HugeResult").id)
    assert done.status == JobStatus.DONE and done.result is None
    assert "result is too large" in caplog.text
    failed = worker.process_one(scheduler.add_job("crash_jobs:HugeError").id)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error["class"] == "RuntimeError" and "characters cut" in failed.error["message"]
    assert len(failed.error["message"]) < HUGE // 100


# 7. A force_spawn job that arrived while the manager backed off spawning was dropped.


def test_7_force_spawn_during_a_spawn_backoff_runs_after_it() -> None:
    manager = WorkerManager(IdleWorkerFactory(), options={"pm": "ondemand", "min_children": 0})
    manager._spawn_blocked_until = time.monotonic() + 0.3  # a fork just failed
    manager._add(RunJob({"_id": ObjectId(), "options": {"force_spawn": True}}, 30.0))
    assert manager.count() == 0
    try:
        wait_until(lambda: manager._spawn_forced() or manager.count() == 1, 5, what="the forced worker")
    finally:
        manager._stop_all()
    assert manager.count() == 0


# 8. A MongoDB outage failed every running job that reported progress.


def test_8_progress_during_an_outage_is_dropped_not_raised(
    server: EmbeddedServer, db_name: str, client: MongoClient[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    outage_client: MongoClient[dict[str, Any]] = MongoClient(
        server.uri, tz_aware=True, appname="progress-outage", serverSelectionTimeoutMS=2000
    )
    scheduler = Scheduler(outage_client[db_name])
    p = scheduler.add_job("sample_jobs:Noop")
    _, worker = claim(scheduler, p.id)
    scheduler = scheduler.for_run(RunContext(worker, p.id, 1))  # as inside the worker that runs it
    client.admin.command(
        "configureFailPoint",
        "failCommand",
        mode="alwaysOn",
        data={"failCommands": ["update"], "closeConnection": True, "appName": "progress-outage"},
    )
    try:
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="taskscheduler"):
            scheduler.update_progress(p.id, 50)
        assert time.monotonic() - began < 10
        assert "not stored (MongoDB unreachable)" in caplog.text
    finally:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
        outage_client.close()


# 9. Retry, interval and postponed times were truncated to whole seconds: runs started up to 1 s early.


def test_9_next_runs_keep_milliseconds() -> None:
    doc = {"options": {"retry": 1, "retry_interval": 2, "interval": 0}}
    follow = next_start(as_record(doc), JobStatus.FAILED, 4_000_000_000.25)
    assert follow is not None and follow[1] == 4_000_000_002.25
    doc = {"options": {"retry": 0, "interval": 5, "interval_reference": "end"}}
    follow = next_start(as_record(doc), JobStatus.DONE, 4_000_000_000.125)
    assert follow is not None and follow[1] == 4_000_000_005.125


def test_9_postponed_time_is_stored_with_milliseconds(scheduler: Scheduler) -> None:
    at = time.time() + 100.375
    p = scheduler.add_job("sample_jobs:Noop", at=at)
    assert scheduler.get_job(p.id).options["at"] == pytest.approx(at, abs=0.001)


# 10. A shared emitter fired every status event twice; wait_for hung after a stream gap; listen() ignored $expr.


def test_10_a_shared_emitter_fires_each_change_once(db: Database[dict[str, Any]], server: EmbeddedServer) -> None:
    shared = Namespace()
    seen: list[tuple[str, ObjectId]] = []
    scheduler = Scheduler(db, emitter=shared)
    queue = Queue(scheduler, db, DefaultWorkerFactory(server.uri, db.name, imports=["sample_jobs"]), emitter=shared)
    queue.on("*", lambda name, process: seen.append((name, process.id)))
    with scheduler.store.status_feed(lookup=True) as feed:
        p = scheduler.add_job("sample_jobs:Noop")
        change = wait_until(lambda: feed.poll(0.5), 10, what="the insert in the stream")
        queue._on_change(change)
    assert seen == [("taskscheduler.onWaiting", p.id)]


def test_10_wait_for_rereads_after_a_stream_gap(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id)
    opened: list[StatusFeed] = []
    real = scheduler.store.status_feed

    def deaf_feed(*args: Any, **kw: Any) -> StatusFeed:
        feed = real(*args, **kw)
        opened.append(feed)
        monkeypatch.setattr(feed, "poll", lambda timeout: time.sleep(min(timeout, 0.05)))  # hears nothing
        return feed

    monkeypatch.setattr(scheduler.store, "status_feed", deaf_feed)
    waiter = threading.Thread(target=lambda: p.wait(timeout=20))
    waiter.start()
    wait_until(lambda: opened, 10, what="wait() to watch")
    assert scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record()
    opened[0].gaps += 1  # the stream restarted without its token: whatever it missed is gone
    waiter.join(20)
    assert not waiter.is_alive() and p.status == JobStatus.DONE


def test_10_listen_understands_expr_filters(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id)
    seen: list[JobStatus] = []
    timer = threading.Timer(0.5, lambda: scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record())
    timer.start()
    try:
        scheduler.listen(
            lambda process: seen.append(process.status) or True,
            {"$expr": {"$eq": ["$status", int(JobStatus.DONE)]}, "_id": p.id},
            timeout=15,
        )
    except WaitTimeoutError:
        pytest.fail("listen() never matched an $expr filter")
    finally:
        timer.join()
    assert seen == [JobStatus.DONE]


# 11. The node's per-round work was one try block: one failing step skipped the heartbeat and orphan check.


def test_11_one_failing_step_skips_nothing_else(
    db: Database[dict[str, Any]], server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = Queue(Scheduler(db), db, DefaultWorkerFactory(server.uri, db.name, imports=["sample_jobs"]))
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("cannot record a kill")

    monkeypatch.setattr(queue, "_record_kills", broken)
    monkeypatch.setattr(queue, "_release_due", lambda: ran.append("due"))
    monkeypatch.setattr(queue, "_reschedule_orphans", lambda: ran.append("orphans"))
    monkeypatch.setattr(queue, "_check_manager", lambda: ran.append("manager"))
    timers = _Timers(2.0)
    timers.orphans = 0.0
    with queue.store.status_feed() as feed:
        for _ in range(2):
            queue._iterate(feed, timers, 0)
            timers.orphans = 0.0
    assert ran == ["due", "orphans", "manager"] * 2


def test_11_leases_are_renewed_beside_the_loop_and_lost_jobs_killed(scheduler: Scheduler) -> None:
    mine, taken = scheduler.add_job("sample_jobs:Noop"), scheduler.add_job("sample_jobs:Noop")
    _, worker = claim(scheduler, mine.id, lease=2)
    _, other = claim(scheduler, taken.id, lease=2)
    sent: list[Any] = []
    stale = ObjectId()
    owners = {mine.id: (worker, 1), taken.id: (stale, 1)}  # the second was taken over by `other`
    beat = Heartbeat(scheduler.lifecycle, 2.0, lambda: owners, lambda m: sent.append(m) or True, logging.getLogger())
    before = scheduler.store.find_job(mine.id)["expires"]
    began = lease_clock()
    beat.start()
    try:
        wait_until(lambda: any(isinstance(m, Fence) for m in sent), 5, what="a renewal")
    finally:
        beat.stop()
    assert beat.period == pytest.approx(2 / 6)
    assert scheduler.store.find_job(mine.id)["expires"] > before
    assert KillJob(taken.id, stale, KillReason.LOST, 1) in sent and not any(
        isinstance(m, KillJob) and m.job_id == mine.id for m in sent
    )
    fence = next(m for m in sent if isinstance(m, Fence))
    assert began <= fence.deadline - 1.0 <= lease_clock()  # half a lease from the renewal, on the fences' clock
    assert fence.renewed == ((mine.id, worker),)  # only what was renewed may run on


def test_3_the_server_clock_is_read_as_aware_utc(scheduler: Scheduler) -> None:
    """A naive reading would be taken for local time: hours off on a machine whose zone is not UTC."""
    server_now = scheduler.store.server_time()
    assert server_now.utcoffset() is not None and server_now.utcoffset().total_seconds() == 0
    assert abs(server_now.timestamp() - time.time()) < 5
