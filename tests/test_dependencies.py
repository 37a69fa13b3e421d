"""SPEC 8, dependencies: ``depends_on``, ``add_chain``, ``Process.blocked_by``, ``self.dependencies()``; the rules
run here through ``run_jobs`` (the lifecycle without a node; tests/e2e/test_dependencies.py has real nodes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database

from helpers import Recorder, unindexed
from taskscheduler import JobStatus, Scheduler
from taskscheduler.errors import InvalidArgumentError, JobNotFoundError
from taskscheduler.testing import run_jobs

DEPENDENCY_ERROR = "taskscheduler.errors.DependencyFailedError"


def count(scheduler: Scheduler) -> int:
    return scheduler.store.jobs.count_documents({})


def test_a_job_waits_for_every_dependency_to_end_done(scheduler: Scheduler) -> None:
    first = scheduler.add_job("sample_jobs:Echo", "a")
    second = scheduler.add_job("sample_jobs:Echo", "b", priority=-10)  # runs after the dependent would
    gather = scheduler.add_job("sample_jobs:Gather", None, depends_on=[first, second.id], priority=10)
    assert gather.blocked_by == [first.id, second.id]
    assert gather.options["depends_on"] == [first.id, second.id]
    ran = run_jobs(scheduler)
    assert [p.id for p in ran] == [first.id, second.id, gather.id]  # priority could not put it first
    done = scheduler.get_job(gather.id)
    assert done.status == JobStatus.DONE and done.result == ["a", "b"]  # read through self.dependencies()
    assert done.blocked_by == []


def test_add_chain_runs_its_steps_one_after_the_other(scheduler: Scheduler) -> None:
    steps: list[Any] = [
        ("sample_jobs:Echo", "one"),
        ("sample_jobs:Echo", "two", {"priority": 50}),
        ("sample_jobs:Gather", None),
    ]
    chain = scheduler.add_chain(steps)
    assert [p.options["depends_on"] for p in chain] == [[], [chain[0].id], [chain[1].id]]
    assert [p.id for p in run_jobs(scheduler)] == [p.id for p in chain]
    assert scheduler.get_job(chain[2].id).result == ["two"]


def test_a_bad_chain_writes_nothing(scheduler: Scheduler) -> None:
    with pytest.raises(InvalidArgumentError, match="step 2"):
        scheduler.add_chain([("sample_jobs:Noop", None), "sample_jobs:Noop"])
    with pytest.raises(InvalidArgumentError, match="option retry"):
        scheduler.add_chain([("sample_jobs:Noop", None), ("sample_jobs:Noop", None, {"retry": "2"})])
    with pytest.raises(InvalidArgumentError, match="at least one step"):
        scheduler.add_chain([])
    assert count(scheduler) == 0


@pytest.mark.parametrize(
    ("depends_on", "error", "match"),
    [
        (lambda s: [ObjectId()], JobNotFoundError, "no job with id"),
        (lambda s: [s.add_job("sample_jobs:Noop", interval=60)], InvalidArgumentError, "is recurring"),
        (lambda s: [s.add_job("sample_jobs:Noop", cron="* * * * *")], InvalidArgumentError, "is recurring"),
        (lambda s: [ObjectId() for _ in range(101)], InvalidArgumentError, "100 at most"),
        (lambda s: "6b1546274dada272c9b36858", InvalidArgumentError, "must be a list"),
        (lambda s: [str(ObjectId())], InvalidArgumentError, "must hold job ids"),
    ],
)
def test_dependencies_a_job_cannot_have_are_refused_and_nothing_is_written(
    scheduler: Scheduler, depends_on: Callable[[Scheduler], Any], error: type[Exception], match: str
) -> None:
    given = depends_on(scheduler)
    before = count(scheduler)
    with pytest.raises(error, match=match):
        scheduler.add_job("sample_jobs:Noop", depends_on=given)
    assert count(scheduler) == before


def test_a_failed_dependency_cancels_its_dependents_down_the_graph(scheduler: Scheduler) -> None:
    failing = scheduler.add_job("sample_jobs:Fail", "x")
    chain = scheduler.add_chain([("sample_jobs:Noop", None, {"depends_on": [failing]}), ("sample_jobs:Noop", None)])
    assert [p.status for p in run_jobs(scheduler)] == [JobStatus.FAILED]  # the others never ran
    first, second = (scheduler.get_job(p.id) for p in chain)
    assert (first.status, second.status) == (JobStatus.CANCELED, JobStatus.CANCELED)
    assert first.error == {
        "class": DEPENDENCY_ERROR,
        "message": f"canceled: dependency {failing.id} ended FAILED",
        "traceback": "",
    }
    assert second.error is not None and second.error["message"] == f"canceled: dependency {first.id} ended CANCELED"
    assert [r["status"] for r in first.runs()] == [JobStatus.CANCELED]


def test_only_a_failure_for_good_cancels_a_dependent(scheduler: Scheduler) -> None:
    flaky = scheduler.add_job("sample_jobs:FailOnce", None, retry=1, retry_interval=0)
    after = scheduler.add_job("sample_jobs:Noop", depends_on=[flaky])
    run_jobs(scheduler)
    assert [r["status"] for r in scheduler.get_job(flaky.id).runs()] == [JobStatus.FAILED, JobStatus.DONE]
    assert scheduler.get_job(after.id).status == JobStatus.DONE


def test_cancelling_a_dependency_cancels_its_dependents(scheduler: Scheduler) -> None:
    first = scheduler.add_job("sample_jobs:Noop", at=2_000_000_000)
    after = scheduler.add_job("sample_jobs:Noop", depends_on=[first])
    scheduler.cancel_job(first.id)
    canceled = scheduler.get_job(after.id)
    assert canceled.status == JobStatus.CANCELED and canceled.error is not None
    assert canceled.error["message"] == f"canceled: dependency {first.id} ended CANCELED"


def test_a_dependency_that_ended_before_the_job_was_added_counts_at_once(scheduler: Scheduler) -> None:
    done = scheduler.add_job("sample_jobs:Echo", "early")
    failed = scheduler.add_job("sample_jobs:Fail", "early")
    run_jobs(scheduler)
    ready = scheduler.add_job("sample_jobs:Gather", None, depends_on=[done])
    assert ready.blocked_by == [] and ready.status == JobStatus.WAITING
    doomed = scheduler.add_job("sample_jobs:Noop", depends_on=[done, failed])
    assert doomed.status == JobStatus.CANCELED  # at once, as the call returns
    assert scheduler.get_job(doomed.id).error["message"] == f"canceled: dependency {failed.id} ended FAILED"
    assert [p.id for p in run_jobs(scheduler)] == [ready.id]


def test_requeue_of_a_canceled_dependent_checks_its_dependencies_again(scheduler: Scheduler) -> None:
    failing = scheduler.add_job("sample_jobs:FailOnce", None)
    after = scheduler.add_job("sample_jobs:Noop", depends_on=[failing])
    run_jobs(scheduler)
    assert scheduler.get_job(after.id).status == JobStatus.CANCELED
    assert scheduler.requeue_job(after.id).status == JobStatus.CANCELED  # its dependency still failed
    scheduler.requeue_job(failing.id)
    again = scheduler.requeue_job(after.id)
    assert again.status == JobStatus.WAITING and again.blocked_by == [failing.id]
    run_jobs(scheduler)
    assert scheduler.get_job(after.id).status == JobStatus.DONE


def test_a_dependency_may_be_given_as_a_process_or_an_id_once_each(scheduler: Scheduler) -> None:
    first = scheduler.add_job("sample_jobs:Noop")
    after = scheduler.add_job("sample_jobs:Noop", {"x": 1}, {"depends_on": (first, first.id)})
    assert after.options["depends_on"] == [first.id]


def test_finding_dependents_is_served_by_an_index(recorded: tuple[Database[dict[str, Any]], Recorder]) -> None:
    db, recorder = recorded
    s = Scheduler(db)
    first = s.add_job("sample_jobs:Noop", at=2_000_000_000)
    s.add_job("sample_jobs:Noop", depends_on=[first])
    recorder.commands.clear()
    s.cancel_job(first.id)
    checked, slow = unindexed(db, recorder.commands)
    assert checked >= 2
    assert slow == [], "\n".join(map(str, slow))


def test_a_job_that_would_close_a_cycle_of_dependencies_is_refused(new_scheduler: Callable[..., Scheduler]) -> None:
    """SPEC 8: a dependency that is gone counts as DONE, and the ``id`` option lets a new job take the id of one
    that is gone (TTL retention removed the finished job). A job added under that id that depends on a job
    waiting for the id closes a cycle: both stay WAITING for ever, neither canceled, blocked_by naming each other.
    Expected: refused (nothing written), as an unknown dependency is."""
    scheduler = new_scheduler({"job_queue_size": 0})  # an ordinary collection: finished jobs expire by TTL
    gone = scheduler.add_job("sample_jobs:Noop")
    run_jobs(scheduler)
    later = scheduler.add_job("sample_jobs:Noop", depends_on=[gone.id], at=time.time() + 3600)
    scheduler.store.jobs.delete_one({"_id": gone.id})  # what the TTL index does after job_retention
    before = count(scheduler)
    with pytest.raises(InvalidArgumentError):
        scheduler.add_job("sample_jobs:Noop", id=gone.id, depends_on=[later.id])
    assert count(scheduler) == before
