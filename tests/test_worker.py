"""Worker in-process (upstream WorkerTest cases that still apply): claim, run, record, retry, interval; errors that
are not Exceptions, outcomes too large to store, child jobs of earlier runs."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from multiprocessing import Pipe
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database

import sample_jobs
from crash_jobs import HUGE
from helpers import Recorder
from taskscheduler import JobStatus, Scheduler, Worker
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.store.records import RunContext


@pytest.fixture
def worker(scheduler: Scheduler, db: Any, new_scheduler: Callable[..., Scheduler]) -> Worker:
    return Worker(ObjectId(), new_scheduler(), db)


def test_success_job(scheduler: Scheduler, worker: Worker) -> None:
    p = scheduler.add_job("sample_jobs:Echo", {"x": 1})
    done = worker.process_one(p.id)
    assert done.status == JobStatus.DONE and done.result == {"x": 1} and done.ended is not None
    assert done.progress == 100.0 and done.worker == worker.id


def test_error_job(scheduler: Scheduler, worker: Worker) -> None:
    p = scheduler.add_job("sample_jobs:Fail", "w")
    failed = worker.process_one(p.id)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error["message"] == "boom: w"


def test_a_failed_run_keeps_the_progress_it_reached(scheduler: Scheduler, worker: Worker) -> None:
    p = scheduler.add_job("sample_jobs:FailHalfway")
    failed = worker.process_one(p.id)
    assert failed.status == JobStatus.FAILED and failed.progress == 40.0  # how far it got (SPEC 7), not 100
    assert scheduler.get_job(p.id).progress == 40.0


def test_invalid_job_class(scheduler: Scheduler, worker: Worker) -> None:
    p = scheduler.add_job("test")
    failed = worker.process_one(p.id)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert "InvalidJobError" in failed.error["class"]


def test_already_claimed_job_is_not_run_twice(
    scheduler: Scheduler, worker: Worker, db: Any, new_scheduler: Callable[..., Scheduler]
) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    other = Worker(ObjectId(), new_scheduler(), db)
    assert other.run(scheduler.store.find_job(p.id))
    assert not worker.run(scheduler.store.find_job(p.id))
    assert scheduler.get_job(p.id).worker == other.id


def test_retry_after_error(scheduler: Scheduler, worker: Worker) -> None:
    p = scheduler.add_job("sample_jobs:Fail", "r", retry=1)
    retry = worker.process_one(p.id)
    # The retry is the same job, written in place: POSTPONED by retry_interval (300 s), run 2, retry spent.
    assert retry.id == p.id and retry.run == 2 and retry.options["retry"] == 0
    assert retry.status == JobStatus.POSTPONED
    assert retry.options["at"] == pytest.approx(time.time() + 300, abs=5)
    assert retry.worker is None and retry.progress == 0.0
    assert retry.error is not None and retry.error["message"] == "boom: r"  # the ended run's error
    assert [(r["run"], r["status"], r["worker"]) for r in retry.runs()] == [(1, JobStatus.FAILED, worker.id)]
    assert [q.id for q in scheduler.get_jobs()] == [p.id]


def test_endless_retry_stays_endless(scheduler: Scheduler, worker: Worker) -> None:
    p = scheduler.add_job("sample_jobs:Fail", "r", retry=-1, retry_interval=0)
    worker.process_one(p.id)
    (retry,) = list(scheduler.get_jobs())
    assert retry.options["retry"] == -1 and retry.status == JobStatus.WAITING


@pytest.mark.parametrize("reference", ["start", "end"])
def test_interval_keeps_reference(scheduler: Scheduler, worker: Worker, reference: str) -> None:
    p = scheduler.add_job("sample_jobs:Noop", interval=100, interval_reference=reference)
    worker.process_one(p.id)
    (nxt,) = list(scheduler.get_jobs())
    assert nxt.options["interval_reference"] == reference and nxt.options["at"] > time.time() + 90


def test_endless_interval(scheduler: Scheduler, worker: Worker) -> None:
    p = scheduler.add_job("sample_jobs:Noop", interval=-1)
    for run in (2, 3):
        nxt = worker.process_one(p.id)
        assert nxt.id == p.id and nxt.status == JobStatus.WAITING and nxt.run == run
        assert nxt.options["interval"] == -1 and nxt.options["at"] == 0.0
    assert [r["status"] for r in nxt.runs()] == [JobStatus.DONE, JobStatus.DONE]
    assert [q.id for q in scheduler.get_jobs()] == [p.id]


def test_events_in_worker_process(scheduler: Scheduler, db: Any, new_scheduler: Callable[..., Scheduler]) -> None:
    own = new_scheduler()
    seen: list[str] = []
    own.on("*", lambda name, p: seen.append(name.removeprefix("taskscheduler.on")))
    p = scheduler.add_job("sample_jobs:Noop")
    Worker(ObjectId(), own, db).process_one(p.id)
    assert seen == ["Processing", "Done"]


def test_container_builds_job(scheduler: Scheduler, db: Any, new_scheduler: Callable[..., Scheduler]) -> None:

    calls: list[type] = []

    class Container:
        def get(self, cls: type) -> Any:
            calls.append(cls)
            return sample_jobs.Echo()

    p = scheduler.add_job("sample_jobs:Noop", "from container")
    done = Worker(ObjectId(), new_scheduler(), db, container=Container()).process_one(p.id)
    assert calls == [sample_jobs.Noop] and done.result == "from container"


def test_constructor_validation(db: Any, new_scheduler: Callable[..., Scheduler]) -> None:
    with pytest.raises(InvalidArgumentError):
        Worker("nope", new_scheduler(), db)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        Worker(ObjectId(), object(), db)  # type: ignore[arg-type]


def test_sys_exit_fails_the_job_not_the_worker(scheduler: Scheduler, worker: Worker) -> None:
    p = scheduler.add_job("sample_jobs:Exits")
    failed = worker.process_one(p.id)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error["class"] == "SystemExit" and failed.error["message"] == "3"


def test_a_claim_whose_outcome_the_server_could_not_give_is_handed_back(
    scheduler: Scheduler, worker: Worker, client: Any
) -> None:
    """The claim's connection breaks and the job is still WAITING: the worker says so (``unsettled``), so that its
    manager hands the job over again: no change event will announce it, and it must not wait forever."""

    from taskscheduler.node.protocol import Finished

    p = scheduler.add_job("sample_jobs:Echo", {"x": 1})
    ours, theirs = Pipe()
    client.admin.command(
        "configureFailPoint",
        "failCommand",
        mode="alwaysOn",  # the claim and every retry within its time bound
        data={"failCommands": ["update"], "closeConnection": True},
    )
    try:
        assert worker.run(scheduler.store.find_job(p.id) or {}, theirs) is False
    finally:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
    message = ours.recv()
    assert isinstance(message, Finished) and message.unsettled and not message.claimed
    assert p.refresh().status == JobStatus.WAITING
    assert worker.run(scheduler.store.find_job(p.id) or {}, theirs) is True
    assert p.refresh().status == JobStatus.DONE


def test_a_job_handed_over_without_its_large_data_runs_with_it(scheduler: Scheduler, worker: Worker) -> None:
    """A job whose data is large travels to the manager and worker without it; the worker reads it when it runs."""
    from taskscheduler.node.protocol import DATA_LEFT_OUT, INLINE_DATA_BYTES, handed_over

    data = {"blob": "z" * (INLINE_DATA_BYTES + 1)}
    p = scheduler.add_job("sample_jobs:Echo", data)
    stored = scheduler.store.find_job(p.id) or {}
    slim = handed_over(stored)
    assert "data" not in slim and slim[DATA_LEFT_OUT] is True
    assert handed_over(dict(stored, data={"small": 1})) == dict(stored, data={"small": 1})
    assert worker.run(slim) is True
    assert p.refresh().status == JobStatus.DONE and p.result == data


def test_a_base_exception_in_start_fails_the_job_with_its_own_error(
    scheduler: Scheduler, db: Database[dict[str, Any]]
) -> None:
    """SPEC 4: an exception in start() ends the job FAILED with its class, also one that is not an Exception."""
    worker = Worker(ObjectId(), scheduler, db)
    p = scheduler.add_job("crash_jobs:RaisesBaseException")
    with contextlib.suppress(BaseException):
        worker.process_one(p.id)
    p.refresh()
    assert p.status == JobStatus.FAILED and p.error is not None and p.error["class"].endswith("Abort")


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


def test_an_oversized_result_and_error_are_recorded_cut(
    scheduler: Scheduler, db: Database[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """A result or error over 16 MB ends the run (result None, error cut) instead of crashing the worker."""
    worker = Worker(ObjectId(), scheduler, db)
    with caplog.at_level(logging.WARNING, logger="taskscheduler"):
        done = worker.process_one(scheduler.add_job("crash_jobs:HugeResult").id)
    assert done.status == JobStatus.DONE and done.result is None
    assert "result is too large" in caplog.text
    failed = worker.process_one(scheduler.add_job("crash_jobs:HugeError").id)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error["class"] == "RuntimeError" and "characters cut" in failed.error["message"]
    assert len(failed.error["message"]) < HUGE // 100


WRITES_AND_READS = ("find", "update", "insert", "delete", "aggregate", "findAndModify", "count")


def test_a_job_that_never_had_a_child_costs_its_worker_three_commands(
    scheduler: Scheduler, recorded: tuple[Database[dict[str, Any]], Recorder]
) -> None:
    db, recorder = recorded
    worker = Worker(ObjectId(), Scheduler(db), db)
    doc = scheduler.lifecycle.load(scheduler.add_job("sample_jobs:Noop").id)
    recorder.commands.clear()
    worker.run(doc)
    sent = [name for name, _ in recorder.commands if name in WRITES_AND_READS]
    assert sent == ["update", "insert", "update"]  # the claim, the run's events, its end: no look at children
    assert scheduler.get_job(doc["_id"]).status == JobStatus.DONE


def test_a_child_added_while_its_parent_runs_is_looked_at_before_the_parent_ends(
    scheduler: Scheduler, worker: Worker
) -> None:
    parent = scheduler.add_job("sample_jobs:AddChild")
    assert worker.process_one(parent.id).status == JobStatus.DONE  # its child is still waiting: no failure
    child = ObjectId(scheduler.get_job(parent.id).result)
    assert scheduler.store.find_job(parent.id)["children"] is True
    assert scheduler.store.find_job(child)["children"] is False
    # The DONE end first written on condition of no child was withdrawn: one end of run 1, recorded once.
    ends = list(scheduler.store.events.find({"job": parent.id, "status": {"$gte": int(JobStatus.DONE)}}))
    assert [e["status"] for e in ends] == [JobStatus.DONE]


def test_a_child_that_failed_after_its_parent_was_claimed_fails_the_parent(
    scheduler: Scheduler, worker: Worker
) -> None:
    parent = scheduler.add_job("sample_jobs:Noop")
    claimed_as = scheduler.lifecycle.load(parent.id)  # the parent as its node handed it over: no child yet
    child = scheduler.add_job("sample_jobs:Fail", {"parent": parent.id})
    assert worker.process_one(child.id).status == JobStatus.FAILED
    worker.run(claimed_as)
    ended = scheduler.get_job(parent.id)
    assert ended.status == JobStatus.FAILED
    assert ended.error is not None and "child job" in ended.error["message"]
    ends = list(scheduler.store.events.find({"job": parent.id, "status": {"$gte": int(JobStatus.DONE)}}))
    assert [e["status"] for e in ends] == [JobStatus.FAILED]  # the DONE end it tried first left nothing


def test_a_job_stored_without_the_children_flag_still_looks_at_its_children(
    scheduler: Scheduler, worker: Worker
) -> None:
    older = scheduler.lifecycle.prepare("sample_jobs:Noop", None, {}, scheduler.get_options())
    del older["children"]  # as stored before the flag existed
    parent = scheduler.get_job(scheduler.lifecycle.add(older)["_id"])
    child = scheduler.add_job("sample_jobs:Fail", {"parent": parent.id})
    assert "children" not in scheduler.store.find_job(parent.id)  # not marked: it has no flag to flip
    assert worker.process_one(child.id).status == JobStatus.FAILED
    assert worker.process_one(parent.id).status == JobStatus.FAILED
