"""Scheduling (SPEC section 6): cron with time zones, retry backoff, priorities, function and async jobs; strict
validation, then each behaviour end to end through real queue nodes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sample_jobs
from helpers import Node, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.options import MAX_TIMESTAMP

ONE_WORKER = ("--pm", "static", "--min-children", "1", "--max-children", "1")


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"cron": "*/5 * * * *", "interval": 60}, "cannot be combined with option interval"),
        ({"cron": "*/5 * * * *", "interval": -1}, "cannot be combined with option interval"),
        ({"cron": "every day"}, "option cron"),
        ({"cron": 5}, "option cron"),
        ({"cron": "0 0 * * * *"}, "option cron"),
        ({"cron": "@hourly", "timezone": "Nowhere/Land"}, "option timezone"),
        ({"timezone": 1}, "option timezone"),
        ({"priority": 101}, "option priority"),
        ({"priority": -101}, "option priority"),
        ({"priority": True}, "option priority"),
        ({"priority": "5"}, "option priority"),
        ({"priority": 1.0}, "option priority"),
        ({"retry_backoff": 0.5}, "option retry_backoff"),
        ({"retry_backoff": "2"}, "option retry_backoff"),
        ({"retry_backoff": True}, "option retry_backoff"),
        ({"retry_backoff": float("inf")}, "option retry_backoff"),
        ({"retry_backoff": float("nan")}, "option retry_backoff"),
        ({"retry_max_interval": -1}, "option retry_max_interval"),
        ({"retry_max_interval": 1.5}, "option retry_max_interval"),
        ({"retry_max_interval": 2**31}, "option retry_max_interval"),
        ({"retry_jitter": 1}, "option retry_jitter"),
        ({"retry_jitter": "yes"}, "option retry_jitter"),
    ],
)
def test_bad_scheduling_options_write_nothing(scheduler: Scheduler, options: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        scheduler.add_job(sample_jobs.Noop, None, options)
    with pytest.raises(InvalidArgumentError, match=says):
        scheduler.add_job_once(sample_jobs.Noop, None, options)
    assert scheduler.store.jobs.count_documents({}) == 0 and scheduler.store.events.count_documents({}) == 0


def test_scheduling_options_are_stored_with_their_types(scheduler: Scheduler) -> None:
    p = scheduler.add_job(
        sample_jobs.Noop,
        cron="@daily",
        timezone="Asia/Kolkata",
        retry_backoff=2,
        retry_max_interval=60,
        retry_jitter=True,
        priority=-7,
    )
    stored = scheduler.store.jobs.find_one({"_id": p.id}) or {}
    opts = stored["options"]
    assert opts["cron"] == "@daily" and opts["timezone"] == "Asia/Kolkata" and opts["priority"] == -7
    assert opts["retry_backoff"] == 2.0 and isinstance(opts["retry_backoff"], float)
    assert opts["retry_max_interval"] == 60 and opts["retry_jitter"] is True
    assert p.status == JobStatus.POSTPONED and opts["at"] > time.time()
    assert (opts["at"] + 5.5 * 3600) % 86400 == 0  # midnight in Kolkata (UTC+05:30)
    plain = scheduler.add_job(sample_jobs.Noop)
    assert plain.options["cron"] == "" and plain.options["priority"] == 0 and plain.options["retry_backoff"] == 1.0


def test_cron_job_with_a_later_at_starts_at_the_first_match_after_it(scheduler: Scheduler) -> None:
    at = time.time() + 3 * 3600
    p = scheduler.add_job(sample_jobs.Noop, cron="0 * * * *", at=at)
    assert at < p.options["at"] <= at + 3600 and p.options["at"] % 3600 == 0


def test_functions_are_jobs_but_only_importable_ones(scheduler: Scheduler) -> None:
    assert scheduler.add_job(sample_jobs.add_numbers, {"a": 1, "b": 2}).job_class == "sample_jobs:add_numbers"
    assert scheduler.add_job("sample_jobs.add_numbers", {"a": 1, "b": 2}).job_class == "sample_jobs:add_numbers"

    def local(data: Any) -> None:
        return None

    for bad in (local, lambda data: None, print, len, object()):
        with pytest.raises(InvalidArgumentError):
            scheduler.add_job(bad)  # type: ignore[arg-type]
    assert scheduler.store.jobs.count_documents({}) == 2


# -- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_one_worker_starts_by_priority_then_first_in(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node(*ONE_WORKER)
    blocker = scheduler.add_job(sample_jobs.Sleep, {"seconds": 1.5})
    wait_until(lambda: blocker.refresh().status == JobStatus.PROCESSING, 20, what="the blocker to start")
    plan = [("a", 0), ("b", -10), ("c", 50), ("d", 0), ("e", 50), ("f", 10), ("g", -10)]
    jobs = {name: scheduler.add_job(sample_jobs.StartTime, {"name": name}, priority=prio) for name, prio in plan}
    scheduler.wait_for(list(jobs.values()), timeout=60)
    assert blocker.refresh().status == JobStatus.DONE
    started = sorted(jobs, key=lambda name: jobs[name].result)
    assert started == ["c", "e", "f", "a", "d", "b", "g"]


@pytest.mark.e2e
def test_a_burst_of_low_priority_jobs_does_not_delay_a_high_one(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    start_node(*ONE_WORKER)
    warm = scheduler.add_job(sample_jobs.Noop).wait(timeout=20)
    assert warm.status == JobStatus.DONE
    low = [scheduler.add_job(sample_jobs.StartTime, {"seconds": 0.1}, priority=-50) for _ in range(30)]
    added = time.time()
    high = scheduler.add_job(sample_jobs.StartTime, None, priority=50)
    high.wait(timeout=30)
    scheduler.wait_for(low, timeout=60)
    high_start = float(high.result)
    ahead = [float(p.result) for p in low if float(p.result) < high_start]
    # Those that started before the high job was added ran anyway; after that, at most the one being handed
    # over at that instant may go first.
    assert len([t for t in ahead if t >= added]) <= 1
    assert high_start - added < 0.1 + 1.0  # at most one low job's run time plus the node's reaction


@pytest.mark.e2e
def test_retry_delays_grow_by_the_backoff(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    p = scheduler.add_job(sample_jobs.Fail, "again", retry=4, retry_interval=1, retry_backoff=1.5, retry_max_interval=2)
    jittered = scheduler.add_job(sample_jobs.Fail, "jitter", retry=3, retry_interval=2, retry_jitter=True)
    scheduler.wait_for([p, jittered], timeout=60)
    assert jittered.status == JobStatus.FAILED and jittered.run == 4
    jitter_runs = jittered.runs()
    for a, b in zip(jitter_runs, jitter_runs[1:], strict=False):
        waited = (b["started"] - a["ended"]).total_seconds()
        assert 1.0 - 0.005 <= waited < 2.0 + 1.0  # drawn from [delay / 2, delay], then at most the node's lag
    assert p.status == JobStatus.FAILED and p.run == 5
    runs = p.runs()
    assert [r["status"] for r in runs] == [JobStatus.FAILED] * 5
    waits = [(b["started"] - a["ended"]).total_seconds() for a, b in zip(runs, runs[1:], strict=False)]
    for waited, delay in zip(waits, [1.0, 1.5, 2.0, 2.0], strict=True):
        assert delay - 0.005 <= waited < delay + 1.0, waits


@pytest.mark.e2e
def test_cron_job_after_downtime_runs_once_then_waits_for_its_next_match(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    p = scheduler.add_job(sample_jobs.Echo, "tick", cron="0 * * * *", timezone="Asia/Kolkata")
    assert p.status == JobStatus.POSTPONED and p.options["at"] % 3600 == 1800  # whole hours in UTC+05:30
    # No node ran for three hours: the run was due then (same-size write of the double, as a run's end does).
    scheduler.store.jobs.update_one({"_id": p.id}, {"$set": {"options.at": time.time() - 3 * 3600}})
    start_node()
    p.wait(timeout=30)  # a recurring job: returns once the run it showed has ended
    assert p.status == JobStatus.POSTPONED and p.run == 2 and p.result == "tick"
    assert p.options["at"] > time.time() and p.options["at"] % 3600 == 1800
    barrier = scheduler.add_job(sample_jobs.Noop).wait(timeout=20)  # the node is past any catch-up by now
    assert barrier.status == JobStatus.DONE
    assert [r["status"] for r in p.refresh().runs()] == [JobStatus.DONE] and p.run == 2


@pytest.mark.e2e
def test_function_jobs_behave_as_class_jobs(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node()
    summed = scheduler.add_job(sample_jobs.add_numbers, {"a": 2, "b": 40})
    me = scheduler.add_job("sample_jobs:whoami", {"k": "v"})
    failing = scheduler.add_job(sample_jobs.failing_function, "x", retry=1, retry_interval=0)
    slow = scheduler.add_job(sample_jobs.sleepy_function, {"seconds": 30}, timeout=1)
    coroutine = scheduler.add_job(sample_jobs.async_function, 7)
    scheduler.wait_for([summed, me, failing, slow, coroutine], timeout=60)
    assert summed.status == JobStatus.DONE and summed.result == 42 and summed.progress == 100.0
    assert me.result == {"id": str(me.id), "data": {"k": "v"}, "scheduler": "Scheduler"}
    assert failing.status == JobStatus.FAILED and failing.run == 2
    assert failing.error is not None and failing.error["class"] == "RuntimeError"
    assert failing.error["message"] == "function failed: x" and "failing_function" in failing.error["traceback"]
    assert slow.status == JobStatus.TIMEOUT
    assert slow.error is not None and slow.error["class"] == "taskscheduler.errors.JobTimeoutError"
    assert coroutine.status == JobStatus.DONE and coroutine.result == {"async": 7}


@pytest.mark.e2e
def test_async_jobs_run_in_their_own_loop_and_are_killed_like_sync_ones(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    start_node()
    echo = scheduler.add_job(sample_jobs.AsyncEcho, {"n": 1})
    timed = scheduler.add_job(sample_jobs.AsyncSleep, {"seconds": 30}, timeout=1)
    doomed = scheduler.add_job(sample_jobs.AsyncSleep, {"seconds": 30})
    wait_until(lambda: doomed.refresh().status == JobStatus.PROCESSING, 20, what="the async job to start")
    canceled_at = time.monotonic()
    scheduler.cancel_job(doomed.id)
    scheduler.wait_for([echo, timed, doomed], timeout=30)
    assert echo.status == JobStatus.DONE and echo.result == {"data": {"n": 1}, "current": str(echo.id)}
    assert timed.status == JobStatus.TIMEOUT
    assert doomed.status == JobStatus.CANCELED and doomed.ended is not None
    assert time.monotonic() - canceled_at < 10


def test_a_default_interval_does_not_apply_to_cron_jobs(new_scheduler: Callable[..., Scheduler]) -> None:
    scheduler = new_scheduler({"default_interval": 60})
    p = scheduler.add_job(sample_jobs.Noop, cron="@hourly")
    assert p.options["interval"] == 0 and p.options["cron"] == "@hourly"
    assert scheduler.add_job(sample_jobs.Noop).options["interval"] == 60


@pytest.mark.e2e
@pytest.mark.parametrize(
    "function", [sample_jobs.generator_job, sample_jobs.async_generator_job], ids=["generator", "async_generator"]
)
def test_a_generator_function_job_runs_its_body_or_is_refused(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path, function: Any
) -> None:
    """SPEC 2: add_job(f, data) runs f(data): an (async) generator function's body runs, or add_job refuses it."""
    marker = tmp_path / f"{function.__name__}.ran"
    try:
        p = scheduler.add_job(function, {"marker": str(marker)})
    except InvalidArgumentError:
        return  # refused up front: fine
    start_node()
    p.wait(timeout=30)
    assert marker.exists(), f"job ended {p.status.name} but the body of {function.__name__} never ran"


def test_cron_with_an_at_near_the_end_of_time_is_an_invalid_argument(scheduler: Scheduler) -> None:
    """SPEC 2/6: a cron whose first match after `at` lies past year 9999 is an InvalidArgumentError, nothing written."""
    for cron in ("* * * * *", "@yearly"):
        with pytest.raises(InvalidArgumentError):
            scheduler.add_job(sample_jobs.Noop, cron=cron, at=MAX_TIMESTAMP - 5)
    assert scheduler.store.jobs.count_documents({}) == 0
