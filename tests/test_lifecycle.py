"""How runs end: retries and intervals in place (one document per job), orphans, requeue, the run history, and
recording an end again after an outage."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import bson
import pytest
from bson import ObjectId

from helpers import SizeGuard, as_record, claim, wait_until
from taskscheduler import JobStatus, Scheduler, Worker
from taskscheduler.constants import NO_WORKER, UNSET_TIME, KillReason
from taskscheduler.core import lifecycle, runs
from taskscheduler.core.once import ONCE_PENDING_SECONDS
from taskscheduler.errors import (
    InvalidArgumentError,
    JobNotFoundError,
    QueueFullError,
    ServerUnavailableError,
)
from taskscheduler.store import utcnow

LEASE = 30.0
ERROR = {"class": "E", "message": "m", "traceback": ""}


def claimed(scheduler: Scheduler, **options: Any) -> tuple[dict[str, Any], ObjectId]:
    p = scheduler.add_job("sample_jobs:Fail", "x", options)
    return claim(scheduler, p.id)


def statuses(scheduler: Scheduler, job_id: ObjectId) -> list[tuple[int, int]]:
    """(run, status) of every event of a job, oldest first."""
    return [(e["run"], e["status"]) for e in scheduler.store.job_events(job_id)]


def test_recording_an_end_twice_after_a_lost_answer_writes_it_once(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc, worker = claimed(scheduler, retry=1, retry_interval=0)
    seen: list[tuple[str, int]] = []
    scheduler.on("*", lambda name, p: seen.append((name.removeprefix("taskscheduler.on"), p.run)))
    end = scheduler.lifecycle.end(doc, worker, JobStatus.FAILED, error=ERROR)
    real = scheduler.store.transition

    def applied_then_lost(*args: Any, **kw: Any) -> bool:
        real(*args, **kw)
        raise ServerUnavailableError("connection closed")

    monkeypatch.setattr(scheduler.store, "transition", applied_then_lost)
    with pytest.raises(ServerUnavailableError):
        end.record()
    monkeypatch.setattr(scheduler.store, "transition", real)
    assert end.record() is True
    assert end.record() is True  # recorded: nothing more happens
    # The run ended and its retry followed in the same document: WAITING (due at once), run 2, retry spent.
    job = scheduler.get_job(doc["_id"])
    assert job.status == JobStatus.WAITING and job.run == 2 and job.options["retry"] == 0
    assert job.worker is None and job.error == ERROR
    assert statuses(scheduler, doc["_id"]) == [
        (1, JobStatus.PROCESSING),
        (1, JobStatus.FAILED),
        (2, JobStatus.WAITING),
    ]
    assert [p.id for p in scheduler.get_jobs()] == [doc["_id"]]  # one document, no second job for the retry
    assert seen == [("Failed", 1), ("Waiting", 2)]  # announced once, after it was written


def test_lost_ownership_withdraws_the_end_and_the_next_run(scheduler: Scheduler) -> None:
    doc, worker = claimed(scheduler, retry=1, retry_interval=0)
    # Someone else took it back (its node saw the lease end): the job is WAITING again, same run.
    assert scheduler.lifecycle.release(doc, worker, orphaned=True, reason="test").record() is True
    end = scheduler.lifecycle.end(doc, worker, JobStatus.FAILED, error=ERROR)
    assert end.record() is False
    job = scheduler.store.find_job(doc["_id"])
    assert job["status"] == JobStatus.WAITING and job["run"] == 1 and job["options"]["retry"] == 1
    assert job["orphaned"] == 1 and job["outcome"] == lifecycle.NO_EVENT
    assert [p.id for p in scheduler.get_jobs()] == [doc["_id"]]
    # The run's start and its release are kept; the end that lost and the retry it announced are withdrawn.
    events = scheduler.store.job_events(doc["_id"])
    assert [(e["run"], e["status"]) for e in events] == [(1, JobStatus.PROCESSING), (1, JobStatus.WAITING)]
    assert events[1]["error"]["class"] == "taskscheduler.errors.JobReleasedError"
    assert scheduler.get_job(doc["_id"]).runs() == []


def test_a_retried_record_after_the_next_run_ended_keeps_the_first_run(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run 1's end is written but its answer lost; before the retried ``record()``, run 2 runs and ends. The
    retry must not take the later change for a lost race and withdraw run 1's (recorded) events."""
    doc, worker = claimed(scheduler, retry=1, retry_interval=0)
    end = scheduler.lifecycle.end(doc, worker, JobStatus.FAILED, error=ERROR)
    real = scheduler.store.transition

    def applied_then_lost(*args: Any, **kw: Any) -> bool:
        real(*args, **kw)
        raise ServerUnavailableError("connection closed")

    monkeypatch.setattr(scheduler.store, "transition", applied_then_lost)
    with pytest.raises(ServerUnavailableError):
        end.record()
    monkeypatch.setattr(scheduler.store, "transition", real)
    second, other = claim(scheduler, doc["_id"])
    assert second["run"] == 2
    assert scheduler.lifecycle.end(second, other, JobStatus.FAILED, error=ERROR).record() is True
    end.record()  # the first worker tries again (its answer was lost)
    runs = scheduler.get_job(doc["_id"]).runs()
    assert [(r["run"], r["status"], r["worker"]) for r in runs] == [
        (1, JobStatus.FAILED, worker),
        (2, JobStatus.FAILED, other),
    ]


def test_a_dead_workers_unrecorded_end_is_withdrawn_entirely(scheduler: Scheduler) -> None:
    """A worker wrote the events of its run's end (the end and the retry it announces), then died before the
    update: its node puts the job back and withdraws every one of those events, the retry's included."""
    doc, worker = claimed(scheduler, retry=1, retry_interval=0)
    unrecorded = scheduler.lifecycle.end(doc, worker, JobStatus.FAILED, error=ERROR)
    scheduler.store.insert_events(unrecorded.events)
    scheduler.lifecycle.after_kill(doc["_id"], worker, 1, KillReason.DIED, 0, "worker process died (signal 9)").record()
    job = scheduler.store.find_job(doc["_id"])
    assert job["status"] == JobStatus.WAITING and job["run"] == 1 and job["orphaned"] == 1
    assert statuses(scheduler, doc["_id"]) == [(1, JobStatus.PROCESSING), (1, JobStatus.WAITING)]
    assert scheduler.get_job(doc["_id"]).runs() == []


def test_third_orphaning_fails_the_job(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    for count in (1, 2):
        doc, worker = claim(scheduler, p.id)
        assert scheduler.lifecycle.release(doc, worker, orphaned=True, reason="gone").record()
        back = scheduler.store.find_job(p.id)
        assert back["status"] == JobStatus.WAITING and back["orphaned"] == count and back["run"] == 1
    doc, worker = claim(scheduler, p.id)
    assert scheduler.lifecycle.release(doc, worker, orphaned=True, reason="gone").record()
    failed = scheduler.get_job(p.id)
    assert failed.status == JobStatus.FAILED and failed.run == 1 and failed.ended is not None
    assert failed.error is not None
    assert failed.error["class"] == "taskscheduler.errors.OrphanedJobError"
    assert "3 times" in failed.error["message"] and "gone" in failed.error["message"]
    (run,) = failed.runs()
    assert run["status"] == JobStatus.FAILED and run["worker"] == worker


def test_interval_after_timeout_is_measured_from_now(scheduler: Scheduler) -> None:
    doc, _ = claimed(scheduler, interval=60, interval_reference="start")
    long_ago = dict(doc, started=utcnow().replace(year=2000))
    now = time.time()
    after_timeout = runs.next_start(as_record(long_ago), JobStatus.TIMEOUT, now)
    assert after_timeout is not None
    status, at, retry = after_timeout
    assert status == JobStatus.POSTPONED and at == pytest.approx(now + 60, abs=0.01) and retry == 0
    # A run that ended normally is measured from its start, as asked: long overdue, so due at once.
    after_done = runs.next_start(as_record(long_ago), JobStatus.DONE, now)
    assert after_done is not None
    assert after_done[0] == JobStatus.WAITING
    assert after_done[1] == pytest.approx(long_ago["started"].timestamp() + 60, abs=0.01)


# -- requeue -----------------------------------------------------------------------------------------------------


def _failed(scheduler: Scheduler, job_id: ObjectId) -> None:
    doc, worker = claim(scheduler, job_id)
    assert scheduler.lifecycle.end(doc, worker, JobStatus.FAILED, error=ERROR).record()


def _timed_out(scheduler: Scheduler, job_id: ObjectId) -> None:
    _, worker = claim(scheduler, job_id)
    scheduler.lifecycle.after_kill(job_id, worker, 1, "timeout", 1).record()  # what the node records


def _canceled(scheduler: Scheduler, job_id: ObjectId) -> None:
    _, worker = claim(scheduler, job_id)
    scheduler.cancel_job(job_id)
    with pytest.raises(InvalidArgumentError, match="still being stopped"):
        scheduler.requeue_job(job_id)  # its worker may still run it: no second one yet
    scheduler.lifecycle.after_kill(job_id, worker, 1, "cancel", 0).record()  # its node saw the worker die


@pytest.mark.parametrize(
    ("status", "end"),
    [(JobStatus.FAILED, _failed), (JobStatus.TIMEOUT, _timed_out), (JobStatus.CANCELED, _canceled)],
)
def test_requeue_puts_an_ended_job_back_to_waiting_with_the_next_run(
    scheduler: Scheduler, db: Any, status: JobStatus, end: Any, new_scheduler: Callable[..., Scheduler]
) -> None:
    p = scheduler.add_job("sample_jobs:Noop", {"n": 1})
    end(scheduler, p.id)
    assert scheduler.get_job(p.id).status == status
    seen: list[tuple[str, ObjectId, int]] = []
    scheduler.on("*", lambda name, q: seen.append((name, q.id, q.run)))
    requeued = scheduler.requeue_job(p.id)
    assert requeued.id == p.id and requeued.status == JobStatus.WAITING and requeued.run == 2
    stored = scheduler.store.find_job(p.id)
    assert stored["status"] == JobStatus.WAITING and stored["run"] == 2
    assert stored["worker"] == NO_WORKER and stored["progress"] == 0.0 and stored["orphaned"] == 0
    assert stored["options"]["at"] == 0.0
    assert seen == [("taskscheduler.onWaiting", p.id, 2)]
    assert [p.id for p in scheduler.get_jobs()] == [p.id]
    # A worker runs it again, as run 2 of the same job; the first run stays in its history.
    done = Worker(ObjectId(), new_scheduler(), db).process_one(p.id)
    assert done.id == p.id and done.status == JobStatus.DONE and done.run == 2
    assert [(r["run"], r["status"]) for r in done.runs()] == [(1, status), (2, JobStatus.DONE)]


def _waiting(scheduler: Scheduler) -> ObjectId:
    return scheduler.add_job("sample_jobs:Noop").id


def _postponed(scheduler: Scheduler) -> ObjectId:
    return scheduler.add_job("sample_jobs:Noop", at=time.time() + 3600).id


def _processing(scheduler: Scheduler) -> ObjectId:
    job_id = _waiting(scheduler)
    claim(scheduler, job_id)
    return job_id


def _done(scheduler: Scheduler) -> ObjectId:
    job_id = _waiting(scheduler)
    doc, worker = claim(scheduler, job_id)
    assert scheduler.lifecycle.end(doc, worker, JobStatus.DONE, result=1, has_result=True).record()
    return job_id


@pytest.mark.parametrize(
    ("status", "make"),
    [
        (JobStatus.WAITING, _waiting),
        (JobStatus.POSTPONED, _postponed),
        (JobStatus.PROCESSING, _processing),
        (JobStatus.DONE, _done),
    ],
)
def test_requeue_refuses_other_statuses_and_changes_nothing(scheduler: Scheduler, status: JobStatus, make: Any) -> None:
    job_id = make(scheduler)
    before = scheduler.store.find_job(job_id)
    events = scheduler.store.job_events(job_id)
    assert before["status"] == status
    with pytest.raises(InvalidArgumentError, match=status.name):
        scheduler.requeue_job(job_id)
    assert scheduler.store.find_job(job_id) == before
    assert scheduler.store.job_events(job_id) == events


def test_requeue_unknown_job(scheduler: Scheduler) -> None:
    with pytest.raises(JobNotFoundError):
        scheduler.requeue_job(ObjectId())


def test_requeue_refuses_a_second_active_add_job_once_job(scheduler: Scheduler) -> None:
    first = scheduler.add_job_once("sample_jobs:Noop", "same")
    scheduler.cancel_job(first.id)
    second = scheduler.add_job_once("sample_jobs:Noop", "same")
    assert second.id != first.id
    before = scheduler.store.find_job(first.id)
    with pytest.raises(InvalidArgumentError, match="add_job_once"):
        scheduler.requeue_job(first.id)
    assert scheduler.store.find_job(first.id) == before
    assert [p.id for p in scheduler.get_jobs()] == [second.id]


# -- the run history -----------------------------------------------------------------------------------------------


def test_runs_after_a_retry_chain_lists_each_run_oldest_first(
    scheduler: Scheduler, db: Any, new_scheduler: Callable[..., Scheduler]
) -> None:
    p = scheduler.add_job("sample_jobs:Fail", "r", retry=2, retry_interval=0)
    # Run 1 times out (recorded by its node after the kill), runs 2 and 3 fail in two different workers.
    _, first_worker = claim(scheduler, p.id)
    scheduler.lifecycle.after_kill(p.id, first_worker, 1, "timeout", 7).record()
    after_first = scheduler.get_job(p.id)
    assert after_first.status == JobStatus.WAITING and after_first.run == 2 and after_first.options["retry"] == 1
    assert after_first.error is not None and after_first.error["class"] == "taskscheduler.errors.JobTimeoutError"
    workers = [first_worker]
    for _ in range(2):
        worker = Worker(ObjectId(), new_scheduler(), db)
        workers.append(worker.id)
        worker.process_one(p.id)
    final = scheduler.get_job(p.id)
    assert final.id == p.id and final.status == JobStatus.FAILED and final.run == 3
    assert final.options["retry"] == 0
    runs = final.runs()
    assert [(r["job"], r["run"], r["status"], r["worker"]) for r in runs] == [
        (p.id, 1, JobStatus.TIMEOUT, workers[0]),
        (p.id, 2, JobStatus.FAILED, workers[1]),
        (p.id, 3, JobStatus.FAILED, workers[2]),
    ]
    assert runs[0]["error"]["class"] == "taskscheduler.errors.JobTimeoutError"
    assert "7 s" in runs[0]["error"]["message"]
    assert [r["error"]["class"] for r in runs[1:]] == ["ValueError", "ValueError"]
    assert all(r["error"]["message"] == "boom: r" for r in runs[1:])
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier["started"] <= earlier["ended"] <= later["started"] <= later["ended"]
    assert final.error == runs[-1]["error"]  # the job's error is its last run's
    assert scheduler.store.jobs.count_documents({}) == 1


# -- capped collections: the next run is written in place ------------------------------------------------------


@pytest.mark.parametrize(
    ("job_class", "options", "next_status"),
    [
        ("sample_jobs:Fail", {"retry": 2, "retry_interval": 60}, JobStatus.POSTPONED),
        ("sample_jobs:Fail", {"retry": -1, "retry_interval": 0}, JobStatus.WAITING),
        ("sample_jobs:Noop", {"interval": 60}, JobStatus.POSTPONED),
        ("sample_jobs:Noop", {"interval": -1}, JobStatus.WAITING),
    ],
)
def test_a_run_end_that_schedules_the_next_run_keeps_the_document_size(
    scheduler: Scheduler,
    db: Any,
    size_guard: SizeGuard,
    job_class: str,
    options: dict[str, Any],
    next_status: JobStatus, new_scheduler: Callable[..., Scheduler],
) -> None:
    # An int ``at`` in the past: the next run's time (a double) is written over it in place.
    p = scheduler.add_job(job_class, {"payload": [1, 2, 3]}, options, at=int(time.time()) - 5)
    inserted = len(bson.encode(scheduler.store.find_job(p.id)))
    worker = Worker(ObjectId(), new_scheduler(), db)
    worker.process_one(p.id)
    stored = scheduler.store.find_job(p.id)
    assert stored["status"] == next_status and stored["run"] == 2
    assert stored["ended"] != UNSET_TIME and stored["outcome"] != lifecycle.NO_EVENT
    assert len(bson.encode(stored)) == inserted
    size_guard.verify()
    assert size_guard.checked_updates >= 2  # the claim and the run's end


# -- add_job_once against a full collection and against a concurrent requeue ---------------------------------------


def _active(scheduler: Scheduler, job_class: str) -> list[Any]:
    return [p for p in scheduler.get_jobs({"class": job_class}) if not p.status.is_terminal]


def test_add_job_once_on_a_full_collection_keeps_the_job_it_would_replace(
    new_scheduler: Callable[..., Scheduler]
) -> None:

    scheduler = new_scheduler({"job_queue_size": 60_000})
    kept = scheduler.add_job_once("sample_jobs:Echo", {"k": 1}, retry=1)
    with pytest.raises(QueueFullError):
        for _ in range(1000):  # unfinished jobs fill the collection
            scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 200})
    with pytest.raises(QueueFullError):
        scheduler.add_job_once("sample_jobs:Echo", {"k": 1}, retry=2)  # would replace kept: no room for it
    assert scheduler.get_job(kept.id).status == JobStatus.WAITING  # not canceled by a call that failed
    assert [p.id for p in _active(scheduler, "sample_jobs:Echo")] == [kept.id]


def _failed_once_job(scheduler: Scheduler) -> Any:
    p = scheduler.add_job_once("sample_jobs:Echo", {"k": "r"})
    worker = ObjectId()
    claimed = scheduler.store.claim(p.id, worker, 30.0)
    assert claimed is not None
    assert scheduler.lifecycle.end(claimed, worker, JobStatus.FAILED, error={"class": "E", "message": "m"}).record()
    return p


def test_a_requeue_between_add_job_once_reading_the_key_and_taking_it_leaves_one_active_job(
    new_scheduler: Callable[..., Scheduler]
) -> None:
    adder, operator = new_scheduler(), new_scheduler()
    failed = _failed_once_job(adder)
    take = adder.store.take_once
    requeued: list[Any] = []

    def requeue_first(*args: Any, **kw: Any) -> bool:
        if not requeued:  # the operator requeues the failed job after add_job_once read it as finished
            requeued.append(operator.requeue_job(failed.id))
        return take(*args, **kw)

    adder.store.take_once = requeue_first  # type: ignore[method-assign]
    again = adder.add_job_once("sample_jobs:Echo", {"k": "r"})
    assert requeued and requeued[0].status == JobStatus.WAITING
    assert again.id == failed.id  # the requeued job is the one active job of the key
    assert [p.id for p in _active(adder, "sample_jobs:Echo")] == [failed.id]


def test_a_requeue_while_add_job_once_inserts_its_replacement_is_refused(
    new_scheduler: Callable[..., Scheduler]
) -> None:
    adder, operator = new_scheduler(), new_scheduler()
    failed = _failed_once_job(adder)
    insert = adder.store.insert_job
    refused: list[Exception] = []

    def requeue_first(*args: Any, **kw: Any) -> None:
        if not refused:  # the key is the new job's now; the operator requeues the old one
            with pytest.raises(InvalidArgumentError, match="same add_job_once key") as info:
                operator.requeue_job(failed.id)
            refused.append(info.value)
        insert(*args, **kw)

    adder.store.insert_job = requeue_first  # type: ignore[method-assign]
    new = adder.add_job_once("sample_jobs:Echo", {"k": "r"})
    assert refused and new.id != failed.id
    assert operator.get_job(failed.id).status == JobStatus.FAILED
    assert [p.id for p in _active(adder, "sample_jobs:Echo")] == [new.id]


def test_requeue_of_an_add_job_once_job_takes_its_key_back(new_scheduler: Callable[..., Scheduler]) -> None:
    scheduler = new_scheduler()
    failed = _failed_once_job(scheduler)
    scheduler.requeue_job(failed.id)
    holder = scheduler.store.once_holder(scheduler.store.find_job(failed.id)["once"]) or {}
    assert holder.get("job") == failed.id and holder.get("inserted") is True  # settled, not pending
    assert scheduler.add_job_once("sample_jobs:Echo", {"k": "r"}).id == failed.id


def test_add_job_once_adds_at_once_when_the_key_holders_finished_job_was_deleted(
    new_scheduler: Callable[..., Scheduler]
) -> None:
    """SPEC 2: add_job_once always returns a Process: a key whose finished job made room for others is free at once."""
    scheduler = new_scheduler({"job_queue_size": 50_000})
    p = scheduler.add_job_once("sample_jobs:Noop", "refresh")
    doc, worker = claim(scheduler, p.id)
    assert scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record()
    assert scheduler.store._free(1)  # another producer made room: the finished job goes
    assert scheduler.store.find_job(p.id) is None
    began = time.monotonic()
    again = scheduler.add_job_once("sample_jobs:Noop", "refresh")
    assert again.status == JobStatus.WAITING and time.monotonic() - began < 5


def test_add_job_once_of_a_producer_stalled_past_its_key_leaves_one_active_job(
    new_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2: two add_job_once calls leave one active job, also when the first stalls past its key's pending time."""
    first, second = new_scheduler(), new_scheduler()
    real_insert = first.store.insert_job

    def stalled_insert(doc: dict[str, Any], reserved: int | None = None) -> None:
        stale = utcnow() - timedelta(seconds=ONCE_PENDING_SECONDS + 1)
        first.store.once.update_one({"_id": doc["once"]}, {"$set": {"since": stale}})  # 31 s pass...
        second.add_job_once("sample_jobs:Noop", "nightly")  # ...and another producer asks for the same job
        real_insert(doc, reserved)

    monkeypatch.setattr(first.store, "insert_job", stalled_insert)
    first.add_job_once("sample_jobs:Noop", "nightly")
    assert len(_active(first, "sample_jobs:Noop")) == 1


def test_a_canceled_running_job_is_not_claimed_again_while_its_run_may_go_on(scheduler: Scheduler) -> None:
    """SPEC 4: a job runs on at most one worker: a requeue right after a cancel never lets a second worker claim it."""
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60})
    _, first = claim(scheduler, p.id)  # node 1's worker runs it
    scheduler.cancel_job(p.id)  # node 1 has not seen the cancel in its change stream yet
    with contextlib.suppress(InvalidArgumentError):  # refusing the requeue until the run is over would be fine
        scheduler.requeue_job(p.id)
    second = scheduler.lifecycle.claim(p.id, ObjectId(), 30.0)  # node 2
    assert second is None, f"worker {second and second['worker']} started the job while worker {first} still runs it"


def test_a_dead_workers_end_landing_after_its_node_withdrew_its_events_is_still_recorded(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2: every ended run is recorded, also when a killed worker's in-flight end lands during its cleanup."""
    p = scheduler.add_job("sample_jobs:Echo", "payload", interval=-1)
    doc, worker = claim(scheduler, p.id)
    store = scheduler.store
    dying = scheduler.lifecycle.end(doc, worker, JobStatus.DONE, result="payload", has_result=True)
    store.insert_events(dying.events)  # the worker wrote its events and sent its transition; then SIGKILL (stop)
    real = store.transition

    def in_flight_lands_first(*args: Any, **kw: Any) -> bool:
        monkeypatch.setattr(store, "transition", real)
        assert store.change(p.id, dying.when, dict(dying.fields, change=dying.marker))  # the worker's write
        return real(*args, **kw)  # then the node's

    monkeypatch.setattr(store, "transition", in_flight_lands_first)
    scheduler.lifecycle.after_kill(p.id, worker, 1, "stop", 0).record()
    job = scheduler.get_job(p.id)
    assert job.run == 2  # run 1 ended (the worker's end counted) and run 2 follows: fine
    assert [r["status"] for r in job.runs()] == [JobStatus.DONE] and job.result == "payload", "run 1's end is lost"


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


def test_a_worker_killed_mid_end_leaves_one_next_run_and_no_stale_outcome(scheduler: Scheduler) -> None:
    """A worker killed between writing its run's end and the job's status leaves one next run (the node adds none)."""
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


def test_cancelling_a_running_interval_job_ends_its_series(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker = claim(scheduler, p.id)
    scheduler.cancel_job(p.id)
    assert scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record() is False  # the worker lost it
    scheduler.lifecycle.after_kill(p.id, worker, 1, "cancel", 0).record()
    (stored,) = jobs_of(scheduler, "sample_jobs:Noop")
    assert stored["status"] == JobStatus.CANCELED and stored["run"] == 1
    assert end_events(scheduler, p.id) == [(1, JobStatus.CANCELED)]


def test_an_end_whose_answer_was_lost_and_whose_run_another_worker_ran_leaves_nothing(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A's end of run 1 got no answer (never written); its run was swept, worker B ran run 1 and the job
    moved on. A, back, finds the job at run 2: B's claim of run 1 after A's end was prepared proves A's end was
    never written, so A withdraws it (chaos seed 14 found A's FAILED and its run-2 WAITING left beside B's)."""
    p = scheduler.add_job("sample_jobs:Fail", "x", retry=3, retry_interval=0)
    doc_a, worker_a = claim(scheduler, p.id, lease=0.5)
    end_a = scheduler.lifecycle.end(doc_a, worker_a, JobStatus.FAILED, error=ERROR)
    store = scheduler.store

    def lost(*args: Any, **kw: Any) -> bool:
        raise ServerUnavailableError("connection closed")  # the update never reached the server

    monkeypatch.setattr(store, "transition", lost)
    with pytest.raises(ServerUnavailableError):
        end_a.record()
    monkeypatch.undo()
    wait_until(lambda: store.orphans(store.server_time()), timeout=10)
    assert scheduler.lifecycle.release_orphan(store.find_job(p.id), reason="swept").record()
    doc_b, worker_b = claim(scheduler, p.id)
    assert scheduler.lifecycle.end(doc_b, worker_b, JobStatus.FAILED, error=ERROR).record()
    assert end_a.record() is False  # A, back: lost
    assert end_events(scheduler, p.id) == [(1, JobStatus.FAILED)]
    entries = [e for e in store.job_events(p.id) if e["run"] == 2]
    assert [e["worker"] for e in entries] == [worker_b]


def test_a_cancel_cut_off_by_an_outage_leaves_no_second_cancel_event(
    scheduler: Scheduler, new_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel wrote its event, then the outage took its update and the look that would have withdrawn it; another
    cancel of the job (a node's, say) then records the very same event: one end of the run (chaos seeds 5 and 7
    found two CANCELED events on a dependent canceled by its producer and by a node at once)."""
    p = scheduler.add_job("sample_jobs:Noop")
    store = scheduler.store

    def outage(*args: Any, **kw: Any) -> Any:
        raise ServerUnavailableError("connection closed")

    monkeypatch.setattr(store, "transition", outage)
    monkeypatch.setattr(store, "find_job", outage)
    with pytest.raises(ServerUnavailableError):
        scheduler.lifecycle.cancel(p.document())
    monkeypatch.undo()
    other = new_scheduler()
    assert other.lifecycle.cancel(other.store.find_job(p.id)) is True
    assert end_events(scheduler, p.id) == [(1, JobStatus.CANCELED)]
    assert scheduler.get_job(p.id).runs()[0]["_id"] == store.find_job(p.id)["outcome"]


def test_two_cancels_of_one_state_write_one_event(
    scheduler: Scheduler, new_scheduler: Callable[..., Scheduler]
) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    doc_a, doc_b = scheduler.store.find_job(p.id), scheduler.store.find_job(p.id)
    assert scheduler.lifecycle.cancel(doc_a) is True
    assert new_scheduler().lifecycle.cancel(doc_b) is False  # as read before the first: it finds it CANCELED
    assert end_events(scheduler, p.id) == [(1, JobStatus.CANCELED)]


def test_a_worker_that_loses_its_end_to_a_cancel_settles_the_run_itself(scheduler: Scheduler) -> None:
    """The job canceled itself (or was canceled) while it ran: the worker's end loses, and lets go of the run."""
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker = claim(scheduler, p.id)
    scheduler.cancel_job(p.id)
    assert scheduler.store.find_job(p.id)["expires"] > UNSET_TIME  # its run is not settled yet
    assert scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record() is False
    stored = scheduler.store.find_job(p.id)
    assert (stored["status"], stored["worker"], stored["expires"]) == (JobStatus.CANCELED, NO_WORKER, UNSET_TIME)
    assert statuses(scheduler, p.id) == [(1, JobStatus.PROCESSING), (1, JobStatus.CANCELED)]


def test_a_canceled_run_whose_worker_died_mid_end_is_settled_by_a_sweep(scheduler: Scheduler) -> None:
    """SPEC 2: a worker SIGKILLed with its whole node between writing its end (and the next run) and the job's
    status, on a job canceled meanwhile, leaves no end of the run but the cancel once the lease has run out."""
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker = claim(scheduler, p.id, lease=0.5)
    dying = scheduler.lifecycle.end(doc, worker, JobStatus.DONE)
    scheduler.store.insert_events(dying.events)  # ...then SIGKILL of the node's process group
    scheduler.cancel_job(p.id)
    store = scheduler.store
    assert store.unsettled_cancels(store.server_time()) == []  # the lease runs on: its node may still settle it
    wait_until(lambda: [d["_id"] for d in store.unsettled_cancels(store.server_time())] == [p.id], timeout=10)
    (found,) = store.unsettled_cancels(store.server_time())
    scheduler.lifecycle.settle_cancel(found)
    assert end_events(scheduler, p.id) == [(1, JobStatus.CANCELED)]
    assert [(r, s) for r, s in statuses(scheduler, p.id) if r > 1] == [], "the dead worker's next run is left"
    assert [(r["run"], r["status"]) for r in scheduler.get_job(p.id).runs()] == [(1, JobStatus.CANCELED)]
    assert store.unsettled_cancels(store.server_time()) == []  # settled once
    stored = store.find_job(p.id)
    assert (stored["worker"], stored["expires"]) == (NO_WORKER, UNSET_TIME)


def test_a_requeue_after_the_lease_of_a_dead_canceled_run_settles_it_first(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    doc, worker = claim(scheduler, p.id, lease=0.3)
    scheduler.store.insert_events(scheduler.lifecycle.end(doc, worker, JobStatus.DONE).events)  # then it died
    scheduler.cancel_job(p.id)
    wait_until(lambda: scheduler.store.server_time() > scheduler.store.find_job(p.id)["expires"], timeout=10)
    scheduler.requeue_job(p.id)
    assert end_events(scheduler, p.id) == [(1, JobStatus.CANCELED)]
    assert [r for r, s in statuses(scheduler, p.id) if s == JobStatus.WAITING] == [2]  # the requeue's, only


def test_cancelling_a_job_that_is_not_running_stores_no_lease(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    _, worker = claim(scheduler, p.id, lease=30.0)
    scheduler.lifecycle.release_orphan(scheduler.store.find_job(p.id), reason="test").record()  # an old lease end
    scheduler.cancel_job(p.id)
    assert scheduler.store.find_job(p.id)["expires"] == UNSET_TIME
    assert scheduler.store.unsettled_cancels(scheduler.store.server_time() + timedelta(hours=1)) == []


def test_a_kill_recorded_again_after_a_lost_answer_writes_everything_once(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's retry of a kill's record after an outage adds one next run and one TIMEOUT event, not two."""
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


def test_the_lease_is_the_owners_and_on_the_server_clock(scheduler: Scheduler) -> None:
    """An orphan check uses the owner's lease on the server's clock, never the checker's timeout or clock."""
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id, lease=30)
    assert scheduler.lifecycle.orphans() == []  # whatever the checker's own orphaned_timeout
    stored = scheduler.store.find_job(p.id)  # alive and expires are the server's own times
    assert stored["expires"] > stored["alive"] and abs((stored["alive"] - doc["started"]).total_seconds()) < 5
    q = scheduler.add_job("sample_jobs:Noop")
    _, short = claim(scheduler, q.id, lease=0.3)
    wait_until(lambda: [d["_id"] for d in scheduler.lifecycle.orphans()] == [q.id], 10, what="the short lease to end")


def test_a_heartbeat_reports_jobs_taken_over(scheduler: Scheduler) -> None:
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


def test_a_heartbeat_after_the_orphan_check_saves_the_job(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    _, worker = claim(scheduler, p.id, lease=0.2)
    orphan = wait_until(lambda: scheduler.lifecycle.orphans(), 10, what="expiry")[0]
    assert scheduler.lifecycle.heartbeat({p.id: (worker, 1)}) == set()  # its node came back just in time
    change = scheduler.lifecycle.release(orphan, worker, orphaned=True, reason="test", expires=orphan["expires"])
    assert change.record() is False
    assert scheduler.get_job(p.id).status == JobStatus.PROCESSING


def test_a_retried_end_of_an_add_job_once_series_keeps_the_series(
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


def _due_now(scheduler: Scheduler) -> Any:
    """A POSTPONED job whose time has come (stored as a node finds it)."""
    p = scheduler.add_job("sample_jobs:Noop", at=time.time() + 60)
    scheduler.store.jobs.update_one({"_id": p.id}, {"$set": {"options.at": time.time() - 1.0}})
    return scheduler.store.find_job(p.id)


def test_a_node_dying_while_it_moves_a_due_job_leaves_its_event_for_the_next_node(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2 (events): a node killed between the two writes that move a due job to WAITING never leaves the run
    WAITING without its event (it was then claimed with no WAITING event before its claim: chaos seed 31)."""
    doc = _due_now(scheduler)

    def dies(*args: Any, **kw: Any) -> bool:
        raise ServerUnavailableError("the node died here")

    with monkeypatch.context() as patch:
        patch.setattr(scheduler.store, "change", dies)
        with pytest.raises(ServerUnavailableError):
            scheduler.lifecycle.unpostpone(doc)
    assert scheduler.store.find_job(doc["_id"])["status"] == JobStatus.POSTPONED
    event = scheduler.lifecycle.unpostpone(scheduler.store.find_job(doc["_id"]))  # the next node
    assert event is not None
    stored = scheduler.store.find_job(doc["_id"])
    assert stored["status"] == JobStatus.WAITING and stored["change"] == event.id
    waiting = [e for e in scheduler.store.job_events(doc["_id"]) if e["status"] == JobStatus.WAITING]
    assert [e["_id"] for e in waiting] == [event.id]


def test_a_due_job_canceled_before_its_node_moves_it_keeps_no_waiting_event(scheduler: Scheduler) -> None:
    doc = _due_now(scheduler)
    scheduler.cancel_job(doc["_id"])
    assert scheduler.lifecycle.unpostpone(doc) is None  # read before the cancel: the node loses
    statuses = [e["status"] for e in scheduler.store.job_events(doc["_id"])]
    assert JobStatus.WAITING not in statuses and JobStatus.CANCELED in statuses


def _hostile_child(scheduler: Scheduler, parent: ObjectId, **change: object) -> ObjectId:
    doc = scheduler.lifecycle.prepare("sample_jobs:Noop", {"parent": parent}, {}, scheduler.get_options())
    for name, value in change.items():
        if value is KeyError:
            del doc[name]
        else:
            doc[name] = value
    scheduler.store.jobs.insert_one(doc)  # anyone who can write the job collection
    return doc["_id"]


def test_a_node_recording_a_timeout_cancels_the_children_past_one_without_a_run(scheduler: Scheduler) -> None:
    """SPEC 2: a hostile child (no ``run``) made its parent's cancel look again for ever, in the node's loop."""
    parent = scheduler.add_job("sample_jobs:Noop", timeout=1)
    _, worker = claim(scheduler, parent.id)
    _hostile_child(scheduler, parent.id, run=KeyError)
    sibling = scheduler.add_job("sample_jobs:Noop", {"parent": parent.id})
    after_kill = scheduler.lifecycle.after_kill(parent.id, worker, 1, KillReason.TIMEOUT, 1)
    node_loop = threading.Thread(target=after_kill.record, daemon=True)  # what the node's _record_kills runs
    node_loop.start()
    node_loop.join(5)
    assert not node_loop.is_alive(), "the node's loop is stuck canceling the hostile child (it never returns)"
    assert scheduler.store.find_job(sibling.id)["status"] == JobStatus.CANCELED


def test_a_cancel_goes_on_past_a_child_whose_run_is_a_list(scheduler: Scheduler) -> None:
    parent = scheduler.add_job("sample_jobs:Noop")
    _hostile_child(scheduler, parent.id, run=[1])
    sibling = scheduler.add_job("sample_jobs:Noop", {"parent": parent.id})
    scheduler.cancel_job(parent.id)  # it raised TypeError (the event's dedupe key) and left the sibling running
    assert scheduler.store.find_job(sibling.id)["status"] == JobStatus.CANCELED


def test_an_end_retried_after_an_outage_writes_nothing_again_once_the_run_was_put_back(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's end whose update was cut off by an outage, then a sweep put the run back (withdrawing the end's
    events): the worker's next attempt must not write those events again, or a worker that dies right after would
    leave an end of the run that never happened (chaos seed 5)."""
    p = scheduler.add_job("sample_jobs:Echo", "x", retry=1, retry_interval=0)
    doc, worker = claim(scheduler, p.id)
    end = scheduler.lifecycle.end(doc, worker, JobStatus.FAILED, error={"class": "E", "message": "m"})
    store = scheduler.store
    real_change = store.change

    def cut_off(*args: Any, **kwargs: Any) -> Any:
        raise ServerUnavailableError("cut off")

    monkeypatch.setattr(store, "change", cut_off)
    with pytest.raises(ServerUnavailableError):
        end.record()
    monkeypatch.setattr(store, "change", real_change)
    assert scheduler.lifecycle.release(doc, worker, orphaned=False, reason="swept").record()  # withdraws them
    inserted: list[Any] = []
    real_insert = store.insert_events
    monkeypatch.setattr(store, "insert_events", lambda events: inserted.append(events) or real_insert(events))
    assert end.record() is False
    assert inserted == []  # not written again
    ends = [e for e in store.job_events(p.id) if e["status"] in (JobStatus.FAILED, JobStatus.DONE)]
    assert ends == [] and scheduler.get_job(p.id).status == JobStatus.WAITING
