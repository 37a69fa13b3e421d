"""Hostile review: one test per defect found by killing, pausing or cutting off processes at the worst moment, or by
running two producers/nodes at the same instant. Each test fails against the code it was written for; the docstring
says what a user sees and which promise of SPEC.md it breaks."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database
from pymongo.errors import AutoReconnect

from helpers import TESTS_DIR, Node, wait_until
from taskscheduler import AbstractJob, DefaultWorkerFactory, JobStatus, Queue, Scheduler, Worker
from taskscheduler.constants import DEFAULT_JOB_QUEUE
from taskscheduler.core.lifecycle import ONCE_PENDING_SECONDS
from taskscheduler.errors import InvalidArgumentError, QueueFullError, ServerUnavailableError, WaitTimeoutError
from taskscheduler.node.fencing import LeaseSlot
from taskscheduler.node.heartbeat import Heartbeat
from taskscheduler.node.manager import WorkerManager, _Child
from taskscheduler.node.protocol import Claimed, JobClaimed, JobFinished, KillReason, RunJob
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import StatusFeed, utcnow
from taskscheduler.store.records import RunContext

# -- job classes (importable as test_attack:..., also by queue nodes started with --import test_attack) ---------------


class Abort(BaseException):
    """Like asyncio.CancelledError, gevent.Timeout or trio.Cancelled: an exception that is not an Exception."""


class RaisesBaseException(AbstractJob):
    def start(self) -> None:
        raise Abort("job gave up")


class AsyncTouch(AbstractJob):
    async def start(self) -> str:  # type: ignore[override]
        Path(self.data).write_text("ran")
        return "ran"


class EndThenLinger(AbstractJob):
    """Appends ``start`` and ``end`` lines (its work), then lingers ``data["linger"]`` s before returning."""

    def start(self) -> str:
        self._line("start")
        self._line("end")
        time.sleep(float(self.data["linger"]))
        return "done"

    def _line(self, what: str) -> None:
        fd = os.open(self.data["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{what} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


# -- helpers -------------------------------------------------------------------------------------------------------


def claim(scheduler: Scheduler, job_id: ObjectId, lease: float = 30.0, worker: ObjectId | None = None) -> tuple[
    dict[str, Any], ObjectId
]:
    worker = worker or ObjectId()
    doc = scheduler.lifecycle.claim(job_id, worker, lease)
    assert doc is not None
    return doc, worker


def active(db: Database[dict[str, Any]], job_class: str) -> list[dict[str, Any]]:
    return list(db[DEFAULT_JOB_QUEUE].find({"class": job_class, "status": {"$lt": int(JobStatus.DONE)}}))


def _report(queue: Queue, message: Any) -> None:
    """A manager report as the node takes it: tracked by its inbox thread, then handled by its loop."""
    queue._track(message)
    queue._on_manager_message(message)


def fake_child(worker: ObjectId, pid: int) -> _Child:
    parent, _ = Pipe()
    return _Child(worker, pid, parent, LeaseSlot(), dedicated=False)


def factory(server: EmbeddedServer, db: Database[dict[str, Any]]) -> DefaultWorkerFactory:
    return DefaultWorkerFactory(server.uri, db.name, imports=["sample_jobs"])


# == capped job collection: the room ledger =========================================================================


def test_ledger_limit_is_the_option_not_the_collections_real_cap(db: Database[dict[str, Any]]) -> None:
    """SPEC 5: a job that has not finished is never evicted, "with any number of concurrent producers in any number
    of processes". The ledger limit is each producer's own ``job_queue_size`` option, not the size the capped
    collection really has: a producer configured larger than the collection was created with (a raised setting,
    a second service, the CLI's default) reserves room that does not exist, and the server silently evicts
    unfinished jobs. Store._reserve (limit = self.job_queue_size); Store._create ignores an existing cap."""
    Scheduler(db, options={"job_queue_size": 8192}).store.ensure()  # how the collection was first created
    producer = Scheduler(db, options={"job_queue_size": 1_000_000})
    added: list[ObjectId] = []
    for _ in range(40):
        try:
            added.append(producer.add_job("sample_jobs:Noop", {"pad": "x" * 400}).id)
        except QueueFullError:
            break
    stored = {d["_id"] for d in db[DEFAULT_JOB_QUEUE].find({}, {"_id": 1})}
    lost = [job for job in added if job not in stored]
    assert len(lost) == 0, f"{len(lost)} of {len(added)} WAITING jobs add_job returned were evicted by later inserts"


def test_queue_full_raised_although_finished_jobs_could_make_room(db: Database[dict[str, Any]]) -> None:
    """SPEC 5: QueueFullError only "when the job collection has no room" (finished jobs are evictable room). In the
    steady state a capped collection is full of finished jobs; _reserve frees at most ROOM_FREE_BATCH (100) per try
    and tries 3 times (the third free is never followed by a reservation), so a job larger than ~200 finished
    documents is refused with "busy producers" although nothing else is going on. Store._reserve/_free."""
    scheduler = Scheduler(db, options={"job_queue_size": 400_000})
    with pytest.raises(QueueFullError):
        for _ in range(2000):
            scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 100})
    # They all ran and finished (a status write keeps the size).
    db[DEFAULT_JOB_QUEUE].update_many({}, {"$set": {"status": int(JobStatus.DONE)}})
    big = scheduler.add_job("sample_jobs:Noop", {"pad": "b" * 150_000})  # 38 % of the collection, all finished
    assert scheduler.get_job(big.id).status == JobStatus.WAITING


def test_failed_inserts_leak_ledger_bytes_until_an_empty_collection_is_full(
    db: Database[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 5: QueueFullError when there is no room. A reservation is kept whenever an insert fails without a
    DuplicateKeyError (outage, timeout) or its producer is killed between reserving and inserting, and nothing ever
    reconciles the ledger with the collection: the drift only grows, until add_job refuses every job although the
    collection holds none. Store.insert_job ("keeping the reservation errs on the safe side")."""
    scheduler = Scheduler(db, options={"job_queue_size": 20_000})
    jobs = scheduler.store.jobs

    def outage(doc: Any, *args: Any, **kw: Any) -> None:
        raise AutoReconnect("connection closed")  # the insert never reached the server

    monkeypatch.setattr(jobs, "insert_one", outage)
    for _ in range(60):
        with contextlib.suppress(ServerUnavailableError, QueueFullError):
            scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 200})
    monkeypatch.undo()
    assert db[DEFAULT_JOB_QUEUE].count_documents({}) == 0
    # The outage is over and the collection is empty: there is room for any job.
    scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 200})  # QueueFullError: "full (19459 of 20000 bytes used...)"


def test_flush_while_a_worker_records_leaves_uncapped_collections_without_ttl(
    db: Database[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2/5: flush() while "running queue nodes keep working"; the collections are capped (or TTL-expired when
    size 0). flush drops the collections and creates them again afterwards; a worker (or producer) writing in
    between makes the server create them implicitly as ordinary collections, which ensure() then accepts ("already
    exists"): from then on the event (or job) collection is neither capped nor expired and grows without bound, and
    the room ledger guards a collection that no longer evicts. Store.flush / Store._create."""
    operator, worker_side = Scheduler(db), Scheduler(db)
    p = worker_side.add_job("sample_jobs:Noop")
    doc, worker = claim(worker_side, p.id)
    real_drop = operator.store.events.drop

    def drop_then_a_run_ends(*args: Any, **kw: Any) -> None:
        real_drop(*args, **kw)
        monkeypatch.setattr(operator.store.events, "drop", real_drop)  # the race happens once
        worker_side.lifecycle.end(doc, worker, JobStatus.DONE).record()  # a worker records its run's end

    monkeypatch.setattr(operator.store.events, "drop", drop_then_a_run_ends)
    operator.flush()
    options = {c["name"]: c.get("options", {}) for c in db.list_collections()}
    ttl = [i for i in db["taskscheduler.events"].list_indexes() if "expireAfterSeconds" in i]
    assert options["taskscheduler.events"].get("capped") or ttl, "the event collection is now unbounded"


# == add_job_once ===================================================================================================


def test_add_job_once_fails_for_30_s_after_its_finished_job_was_freed(db: Database[dict[str, Any]]) -> None:
    """SPEC 2: add_job_once "always returns a Process". A key whose holder document is missing is taken for an insert
    in progress for ONCE_PENDING_SECONDS; but the holder may just as well be a finished job the capped collection's
    room ledger deleted (Store._free), or a producer killed between take_once and its insert. Every call for that
    key then sleeps ~14 s and raises TaskSchedulerError "gave up after 40 attempts". Lifecycle.add_once/_fresh."""
    scheduler = Scheduler(db, options={"job_queue_size": 50_000})
    p = scheduler.add_job_once("sample_jobs:Noop", "refresh")
    doc, worker = claim(scheduler, p.id)
    assert scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record()
    assert scheduler.store._free(1)  # another producer made room: the finished job goes
    assert scheduler.store.find_job(p.id) is None
    began = time.monotonic()
    again = scheduler.add_job_once("sample_jobs:Noop", "refresh")
    assert again.status == JobStatus.WAITING and time.monotonic() - began < 5


def test_add_job_once_stalled_producer_leaves_two_active_jobs(
    db: Database[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2: add_job_once is race-free, "two concurrent calls leave exactly one active job". A producer that took
    the key and then stalls (SIGSTOP, VM pause, a slow ensure()/_free before its insert) for ONCE_PENDING_SECONDS
    (measured with each producer's own clock: skew between machines does the same at once) has its key taken over;
    it never looks again and inserts anyway. Lifecycle.add_once (no check after take_once/insert)."""
    first, second = Scheduler(db), Scheduler(db)
    real_insert = first.store.insert_job

    def stalled_insert(doc: dict[str, Any], reserved: int | None = None) -> None:
        stale = utcnow() - timedelta(seconds=ONCE_PENDING_SECONDS + 1)
        first.store.once.update_one({"_id": doc["once"]}, {"$set": {"since": stale}})  # 31 s pass...
        second.add_job_once("sample_jobs:Noop", "nightly")  # ...and another producer asks for the same job
        real_insert(doc, reserved)

    monkeypatch.setattr(first.store, "insert_job", stalled_insert)
    first.add_job_once("sample_jobs:Noop", "nightly")
    assert len(active(db, "sample_jobs:Noop")) == 1


# == exactly once ===================================================================================================


def test_requeue_of_a_canceled_running_job_lets_a_second_worker_start_it(scheduler: Scheduler) -> None:
    """SPEC 4: "a job runs on at most one worker at a time in the whole cluster". cancel_job of a PROCESSING job
    only marks it CANCELED (its node kills the worker later: within 2 s, or at the fence, L/2, when that node is cut
    off); requeue_job right after makes it WAITING at once, so another node's worker claims and runs it while the
    canceled run's worker still runs. Lifecycle.requeue (and cancel) ignore a live `worker`/`expires`."""
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60})
    _, first = claim(scheduler, p.id)  # node 1's worker runs it
    scheduler.cancel_job(p.id)  # node 1 has not seen the cancel in its change stream yet
    with contextlib.suppress(InvalidArgumentError):  # refusing the requeue until the run is over would be fine
        scheduler.requeue_job(p.id)
    second = scheduler.lifecycle.claim(p.id, ObjectId(), 30.0)  # node 2
    assert second is None, f"worker {second and second['worker']} started the job while worker {first} still runs it"


def test_node_forgets_a_claim_when_the_previous_runs_finish_is_read_late(
    db: Database[dict[str, Any]], server: EmbeddedServer, scheduler: Scheduler
) -> None:
    """SPEC 4: exactly once; a live worker's job is never orphaned. The node keys its running jobs by job id, and
    JobFinished/JobKilled drop the entry whoever it belongs to. When worker B's claim of run 2 is reported before
    worker A's Finished for run 1 (A slow to send it after recording, e.g. blocked on logging; or both ready in one
    wait()), the node forgets B's claim: its lease is never renewed and the node's own orphan sweep releases the job
    B is still running; another worker then runs it beside B. Queue._on_manager_message (JobFinished/JobKilled)."""
    queue = Queue(Scheduler(db), db, factory(server, db))
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
        time.sleep(0.2)
    queue._reschedule_orphans()
    now = scheduler.store.find_job(p.id)
    assert now["status"] == JobStatus.PROCESSING and now["worker"] == worker_b, "the node released its own live job"


def test_fence_from_other_jobs_keeps_an_unrenewed_claim_running_past_its_lease(
    db: Database[dict[str, Any]], server: EmbeddedServer, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 4: "a node that could not renew its leases for half the timeout kills its running jobs itself before any
    other node may take them over". The Fence is one deadline for all jobs, but the heartbeat renews only the jobs
    the node's main loop has heard of. A claim reported while the loop is busy (a long scan, a burst of due jobs,
    an AfterKill during a slow server: the thread exists because the loop can be slow) is never renewed, yet the
    fences earned by the other jobs keep its worker alive past its lease: other nodes take it over and it runs
    twice. Heartbeat.beat (Fence without job ids), WorkerManager._enforce_deadlines (max(child.fence, _fence))."""
    known, unknown = scheduler.add_job("sample_jobs:Noop"), scheduler.add_job("sample_jobs:Noop")
    doc_a, worker_a = claim(scheduler, known.id, lease=1.2)
    doc_b, worker_b = claim(scheduler, unknown.id, lease=1.2)
    manager = WorkerManager(factory(server, db))
    killed: list[tuple[ObjectId, KillReason]] = []

    def kill(child: _Child, reason: KillReason) -> None:
        child.kill_reason = reason
        killed.append((child.job, reason))

    monkeypatch.setattr(manager, "_kill", kill)
    for pid, (worker, doc) in enumerate([(worker_a, doc_a), (worker_b, doc_b)], start=1):
        child = manager._children[pid] = fake_child(worker, pid)
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
        time.sleep(0.2)


def test_stale_heartbeat_snapshot_kills_the_healthy_worker_of_the_next_run(
    db: Database[dict[str, Any]], server: EmbeddedServer, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 4: a heartbeat kills the worker that no longer owns a job. KillJob names only the job, and the manager
    kills whichever worker runs that job now: when the heartbeat's snapshot still says worker A (run 1 just ended,
    A's Finished not read yet) and worker B of the same node already claimed run 2 (interval -1, a retry with
    retry_interval 0, a requeue), B is killed mid-run and its run released and run again. KillJob / Heartbeat.beat /
    WorkerManager._kill_job (no worker id, no run)."""
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker_a = claim(scheduler, p.id)
    assert scheduler.lifecycle.end(doc, worker_a, JobStatus.DONE).record()
    doc2, worker_b = claim(scheduler, p.id)
    manager = WorkerManager(factory(server, db))
    killed: list[ObjectId] = []
    monkeypatch.setattr(manager, "_kill", lambda child, reason: killed.append(child.id))
    idle_a = manager._children[1] = fake_child(worker_a, 1)  # A finished run 1: idle
    busy_b = manager._children[2] = fake_child(worker_b, 2)
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


def test_a_dead_workers_in_flight_end_lands_after_its_node_withdrew_its_events(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2: "Every ended run is recorded in the event collection"; Process.result/error are the last ended run's.
    A SIGKILLed worker's last request may still be applied by the server after the kill (it was on the wire, or
    queued behind a lock). AfterKill withdraws the dead worker's end events first and only then tries its own
    transition: when the worker's in-flight end lands in between, the job moves to its next run with `outcome`
    pointing at a deleted event, the node's transition loses, and run 1's end is recorded nowhere.
    AfterKill.record (delete_unrecorded_events before, not after, winning the transition)."""
    p = scheduler.add_job("sample_jobs:Echo", "payload", interval=-1)
    doc, worker = claim(scheduler, p.id)
    store = scheduler.store
    dying = scheduler.lifecycle.end(doc, worker, JobStatus.DONE, result="payload", has_result=True)
    store.insert_events(dying.events)  # the worker wrote its events and sent its transition; then SIGKILL (stop)
    real = store.transition

    def in_flight_lands_first(*args: Any, **kw: Any) -> bool:
        monkeypatch.setattr(store, "transition", real)
        assert real(p.id, dying.when, dict(dying.fields, change={"$literal": dying.marker}))  # the worker's write
        return real(*args, **kw)  # then the node's

    monkeypatch.setattr(store, "transition", in_flight_lands_first)
    scheduler.lifecycle.after_kill(p.id, worker, 1, "stop", 0).record()
    job = scheduler.get_job(p.id)
    assert job.run == 2  # run 1 ended (the worker's end counted) and run 2 follows: fine
    assert [r["status"] for r in job.runs()] == [JobStatus.DONE] and job.result == "payload", "run 1's end is lost"


@pytest.mark.e2e
def test_a_run_that_finished_during_a_short_outage_is_killed_and_run_again(
    scheduler: Scheduler,
    start_node: Callable[..., Node],
    tmp_path: Path,
    client: Any,
) -> None:
    """SPEC 4 outages: "a MongoDB outage shorter than orphaned_timeout fails no job ... a run's end is recorded once
    the server is back, once". A worker whose start() has returned and which is only waiting to record its end is
    still fenced at L/2 like a running job: it is killed, its finished run is released and the job runs a second
    time (its side effects twice). A finished run runs no job code, so fencing it protects nothing; the same kill
    hits a job that returned just before its `timeout` (then recorded TIMEOUT instead of DONE).
    WorkerManager._enforce_deadlines / worker protocol (no "start() returned" message)."""
    log = tmp_path / "runs.log"
    start_node("--import", "test_attack", orphaned_timeout=3)
    p = scheduler.add_job("test_attack:EndThenLinger", {"path": str(log), "linger": 0.3})
    wait_until(lambda: log.exists() and "end" in log.read_text(), 30, interval=0.01, what="the job's work")
    client.admin.command(
        "configureFailPoint", "failCommand", mode="alwaysOn", data={"failCommands": ["update"], "closeConnection": True}
    )
    try:
        time.sleep(2.5)  # shorter than orphaned_timeout (3 s)
    finally:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
    p.wait(timeout=30)
    time.sleep(1)
    starts = [line for line in log.read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 1 and p.status == JobStatus.DONE, f"ran {len(starts)} times, ended {p.status.name}"


@pytest.mark.e2e
def test_a_free_worker_wades_through_jobs_other_nodes_took_before_a_new_one(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """SPEC 4 latency: "a WAITING job starts within 1 s when a worker slot is free". A node hands its manager every
    WAITING job it sees and, without status listeners, never hears that another node claimed one (its stream is
    filtered to WAITING/POSTPONED/CANCELED): while its workers are busy, its manager's _pending grows with every job
    the cluster runs (full documents: memory unbounded in the backlog), and a worker that becomes free tries to claim
    each of them, one round trip each, FIFO, before a new job. Queue.ROUTED / _route (no DropJob for a claim),
    WorkerManager._pending."""
    start_node("--import", "crash_jobs", "--pm", "static", "--min-children", "1", "--max-children", "1")
    flag = tmp_path / "busy"
    flag.touch()
    busy = scheduler.add_job("crash_jobs:ProgressThroughOutage", {"flag": str(flag)})  # runs while the flag exists
    wait_until(lambda: scheduler.get_job(busy.id).status == JobStatus.PROCESSING, 30, what="the node to be busy")
    elsewhere = ObjectId()  # the workers of other nodes, which take every job at once
    for _ in range(300):
        scheduler.lifecycle.claim(scheduler.add_job("sample_jobs:Noop").id, elsewhere, 120.0)
    time.sleep(1)  # the node has seen them all in its change stream
    flag.unlink()
    busy.wait(timeout=30)
    began = time.monotonic()
    fresh = scheduler.add_job("sample_jobs:Noop")
    fresh.wait(timeout=60)
    took = time.monotonic() - began
    assert took < 2.0, f"a new job waited {took:.1f} s for a free worker (SPEC: within 1 s)"


# == wait(), events ================================================================================================


def test_wait_hangs_when_the_stream_breaks_before_its_first_answer(
    scheduler: Scheduler, db: Database[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2: wait_for returns when the job is terminal, "no race between checking and watching". StatusFeed keeps
    its resume token only after a successful try_next; when the connection drops before that (and the driver's own
    resume fails: server unreachable longer than serverSelectionTimeoutMS) it reopens the stream at "now" without
    counting a gap, so a change between opening and reopening is never seen: wait() hangs (forever without a
    timeout). Same for a queue node (a job inserted during its first scan is never routed). StatusFeed._open/poll/
    _recover (token None: no gap)."""
    other = Scheduler(db)  # the worker's process
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id)
    real = scheduler.store.status_feed

    def dropping_feed(*args: Any, **kw: Any) -> StatusFeed:
        feed = real(*args, **kw)
        assert feed._stream is not None
        first = feed._stream.try_next

        def try_next() -> Any:
            monkeypatch.setattr(feed._stream, "try_next", first)
            assert other.lifecycle.end(doc, worker, JobStatus.DONE).record()  # the run ends...
            raise AutoReconnect("connection closed")  # ...and the stream's connection drops

        monkeypatch.setattr(feed._stream, "try_next", try_next)
        return feed

    monkeypatch.setattr(scheduler.store, "status_feed", dropping_feed)
    try:
        p.wait(timeout=5)
    except WaitTimeoutError:
        pytest.fail(f"wait() never saw the end of job {p.id} (stored: {scheduler.get_job(p.id).status.name})")
    assert p.status == JobStatus.DONE


def test_listen_with_a_bad_query_raises_a_driver_error(scheduler: Scheduler) -> None:
    """SPEC 2: listen's query is "the same filter language as get_jobs", and bad input raises InvalidArgumentError
    (get_jobs does). listen() lets pymongo's OperationFailure out instead. Scheduler.listen / StatusFeed._open."""
    with pytest.raises(InvalidArgumentError):
        scheduler.listen(lambda process: True, {"status": {"$bogus": 1}}, timeout=3)


def _waiting_in_thread(scheduler: Scheduler, process: Any, monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
    """Start process.wait() in a thread; return once it has read the job and watches the stream."""
    ready = threading.Event()
    real = scheduler._read_pending

    def read(wait: Any, ids: Any) -> None:
        real(wait, ids)
        ready.set()

    monkeypatch.setattr(scheduler, "_read_pending", read)
    waiter = threading.Thread(target=lambda: process.wait(timeout=15))
    waiter.start()
    assert ready.wait(10)
    return waiter


def test_own_cancel_fires_twice_while_waiting(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 2 events: "Each status change fires exactly once per observer", the observer seeing "its own ...
    cancel_job calls and every change observed during wait_for". wait_for builds the observed document from the
    stale Process (lookup=False) and sets only status and run, so its dedup key (job, status, run, started, change)
    lacks the change mark the instance's own cancel used: `cancel` fires twice. Scheduler.wait_for (doc from
    by_id[...]._doc; StatusChange carries no started/change)."""
    fired: list[ObjectId] = []
    scheduler.on("cancel", lambda name, process: fired.append(process.id))
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60})
    waiter = _waiting_in_thread(scheduler, scheduler.get_job(p.id), monkeypatch)
    scheduler.cancel_job(p.id)
    waiter.join(15)
    assert not waiter.is_alive()
    assert fired == [p.id], f"cancel fired {len(fired)} times"


def test_a_second_claim_of_a_released_run_never_fires_while_waiting(
    scheduler: Scheduler, db: Database[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2 events: each status change fires exactly once per observer. Inside wait_for the dedup key keeps the
    `started` and `change` of the Process as it was when the wait began, so two changes to the same status in the
    same run look alike: after an orphaned run is released, the new worker's `processing` is swallowed (and a
    retry's `waiting` after a release's, etc.). Scheduler.wait_for / events._change_key."""
    seen: list[str] = []
    scheduler.on("*", lambda name, process: seen.append(name.removeprefix("taskscheduler.on").lower()))
    other = Scheduler(db)  # the queue nodes' side
    p = other.add_job("sample_jobs:Noop")
    waiter = _waiting_in_thread(scheduler, scheduler.get_job(p.id), monkeypatch)
    doc, worker_a = claim(other, p.id)
    assert other.lifecycle.release(doc, worker_a, orphaned=True, reason="node died").record()
    doc, worker_b = claim(other, p.id)
    assert other.lifecycle.end(doc, worker_b, JobStatus.DONE).record()
    waiter.join(15)
    assert not waiter.is_alive()
    assert seen == ["processing", "waiting", "processing", "done"]


# == workers =======================================================================================================


def test_a_base_exception_in_start_leaves_the_job_processing(
    scheduler: Scheduler, db: Database[dict[str, Any]]
) -> None:
    """SPEC 4 failure: "an exception in start() ends the job FAILED with its class, message and traceback stored".
    Worker._execute catches Exception and SystemExit only: a BaseException (asyncio.CancelledError, gevent.Timeout,
    KeyboardInterrupt raised by the job) unwinds the worker, which still reports Finished(claimed=True); the node
    then neither records an end nor renews the lease. The job stays PROCESSING, is orphaned and run again three
    times, and ends FAILED with OrphanedJobError instead of its own error. Worker._execute / Worker.run."""
    worker = Worker(ObjectId(), scheduler, db)
    p = scheduler.add_job("test_attack:RaisesBaseException")
    with contextlib.suppress(BaseException):
        worker.process_one(p.id)
    p.refresh()
    assert p.status == JobStatus.FAILED and p.error is not None and p.error["class"].endswith("Abort")


# == CLI ===========================================================================================================


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "--limit", "99999999999999999999"],
        ["add", "sample_jobs:Noop", "--job-queue", ".jobs"],
        ["add", "sample_jobs:Noop", "--job-queue", "a..b"],
        ["add", "sample_jobs:Noop", "--job-queue", "system.jobs"],
        ["add", "sample_jobs:Noop", "--job-queue", "big", "--job-queue-size", "99999999999999999999"],
        ["jobs", "--event-queue", "a..b"],
        ["jobs", "--mongodb-uri", "mongodb://someone:wrong@{host}/?directConnection=true"],
        ["add", "sample_jobs:Noop", "--data", '{{"owner": {{"$oid": "zz"}}}}'],
        ["server", "--port", "0", "--data-dir", "/proc/no/such/dir"],
    ],
    ids=[
        "huge-limit",
        "leading-dot",
        "double-dot",
        "system-name",
        "huge-size",
        "event-queue-name",
        "wrong-password",
        "bad-extended-json",
        "bad-data-dir",
    ],
)
def test_cli_operator_mistakes_print_one_line_not_a_traceback(
    server: EmbeddedServer, db_name: str, args: list[str]
) -> None:
    """SPEC 3: "Bad input: one-line error on stderr, exit code 2 ... Never a traceback for an operator's mistake".
    Collection names are checked for '$' and NUL only (pymongo's InvalidName and the server's InvalidNamespace leak),
    integer flags are not bounded to int64 (OverflowError), an authentication failure is an OperationFailure the CLI
    does not catch, bson's InvalidId is not a ValueError (--data), and the server's data dir is created unchecked.
    options.non_empty_string, cli --limit/--job-queue-size/--data, cli.main, EmbeddedServer.start."""
    host = server.uri.split("//")[1].split("/")[0]
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=server.uri)
    env["TASKSCHEDULER_DATABASE"] = db_name
    done = subprocess.run(
        [sys.executable, "-m", "taskscheduler", *[a.format(host=host) for a in args]],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode in (1, 2) and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_child_of_an_earlier_run_does_not_fail_later_runs_of_its_parent(
    scheduler: Scheduler, db: Database[dict[str, Any]]
) -> None:
    """One document per job for its whole life: a child that run 1 spawned and that failed fails run 1 only."""
    worker = Worker(ObjectId(), scheduler, db)
    parent = scheduler.add_job("sample_jobs:Noop", interval=-1)
    in_run_1 = scheduler.for_run(RunContext(worker.id, parent.id, 1))  # as inside the worker running run 1
    child = in_run_1.add_job("sample_jobs:Fail", {"parent": parent.id})
    assert scheduler.store.find_job(child.id)["parent_run"] == 1
    assert worker.process_one(child.id).status == JobStatus.FAILED
    worker.process_one(parent.id)
    assert [r["status"] for r in parent.runs()] == [JobStatus.FAILED]  # run 1: its child failed
    worker.process_one(parent.id)  # run 2 spawned no child
    assert [r["status"] for r in scheduler.get_job(parent.id).runs()] == [JobStatus.FAILED, JobStatus.DONE]
