"""SPEC 8, dependencies across real queue nodes: a dependent starts only after its dependencies ended DONE, within
a second of the last one, whatever process dies in between; a failure for good cancels it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helpers import Node, wait_until
from taskscheduler import JobStatus, Scheduler

DEPENDENCY_ERROR = "taskscheduler.errors.DependencyFailedError"


def test_a_chain_runs_in_order_across_two_nodes(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    start_node("--max-children", "2")
    start_node("--max-children", "2")
    first, second = (scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.5}) for _ in range(2))
    gather = scheduler.add_job("sample_jobs:Gather", None, depends_on=[first, second])
    gather.wait(timeout=60)
    ends = [scheduler.get_job(p.id).ended for p in (first, second)]
    assert gather.status == JobStatus.DONE and gather.result == ["slept", "slept"]
    assert gather.started is not None and all(e is not None and gather.started >= e for e in ends)
    waited = (gather.started - max(e for e in ends if e is not None)).total_seconds()
    assert waited < 1.0, f"started {waited:.2f} s after its last dependency ended"


def test_a_dependent_starts_when_the_node_that_ran_its_dependency_is_killed_right_after(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """No lost wake-up: the node that ran the dependency dies the moment it ended; another node starts the rest.
    The first node does not serve the dependent's module, so it cannot have claimed it in that moment (a fresh
    clone's run once found it claimed, PROCESSING, when the node was killed)."""
    node = start_node()
    dependency = scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.3})
    dependent = scheduler.add_job(
        "crash_jobs:Ticker", {"log": str(tmp_path / "ticks"), "seconds": 0}, depends_on=[dependency]
    )
    wait_until(lambda: scheduler.get_job(dependency.id).status == JobStatus.DONE, 30, what="the dependency")
    node.kill_group()
    assert scheduler.get_job(dependent.id).status == JobStatus.WAITING
    start_node(modules=("sample_jobs", "crash_jobs"))
    assert dependent.wait(timeout=30).status == JobStatus.DONE


def test_a_dependency_failing_after_its_retries_cancels_the_dependent(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    start_node()
    failing = scheduler.add_job("sample_jobs:Fail", "x", retry=1, retry_interval=0)
    dependent = scheduler.add_job("sample_jobs:Noop", depends_on=[failing])
    dependent.wait(timeout=30)
    assert dependent.status == JobStatus.CANCELED and dependent.error is not None
    assert dependent.error["class"] == DEPENDENCY_ERROR and str(failing.id) in dependent.error["message"]
    assert len(scheduler.get_job(failing.id).runs()) == 2  # canceled only once the retry failed too
    assert dependent.runs()[0]["status"] == JobStatus.CANCELED and dependent.started is None
