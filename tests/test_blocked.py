"""node/blocked.py: the jobs a node holds back for their dependencies, looked at again on a timer and at once when
the node sees one of their dependencies end."""

from __future__ import annotations

import pytest

from taskscheduler import JobStatus, Scheduler
from taskscheduler.node import blocked as blocked_module
from taskscheduler.node.blocked import Blocked
from taskscheduler.testing import run_jobs


@pytest.fixture(autouse=True)
def slow_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Looks on the timer a minute apart: any look within a test was brought forward."""
    monkeypatch.setattr(blocked_module, "CHECK_SECONDS", 60.0)


def test_an_awaited_dependency_ending_brings_the_next_look_forward(scheduler: Scheduler) -> None:
    dependency = scheduler.add_job("sample_jobs:Echo", "a", priority=10)
    other = scheduler.add_job("sample_jobs:Echo", "b", priority=10)
    dependent = scheduler.add_job("sample_jobs:Echo", "c", depends_on=[dependency])
    blocked = Blocked(scheduler.lifecycle)
    blocked.hold(dependent.document())
    assert blocked.release() == []  # its dependency has not run yet
    assert [p.id for p in run_jobs(scheduler)][:2] == [dependency.id, other.id]  # now both are DONE

    blocked.ended(other.id)  # nobody here waits for it: the next look keeps its time
    assert blocked.release() == []
    blocked.ended(dependency.id)
    released = blocked.release()
    assert [doc["_id"] for doc in released] == [dependent.id]
    assert blocked.jobs == {}
    blocked.ended(dependency.id)  # forgotten with the job it held: no look for nobody
    assert blocked.release() == []


def test_a_dependency_two_held_jobs_wait_for_is_awaited_until_both_are_gone(scheduler: Scheduler) -> None:
    dependency = scheduler.add_job("sample_jobs:Echo", "a")
    first = scheduler.add_job("sample_jobs:Echo", "b", depends_on=[dependency])
    second = scheduler.add_job("sample_jobs:Echo", "c", depends_on=[dependency])
    blocked = Blocked(scheduler.lifecycle)
    blocked.hold(first.document())
    blocked.hold(second.document())
    blocked.hold(second.document())  # held again (a second scan): counted once
    assert blocked.release() == []
    blocked.drop(first.id)
    scheduler.cancel_job(dependency.id)
    blocked.ended(dependency.id)  # the second still waits for it: looked at now, and let go (canceled)
    assert blocked.release() == []
    assert scheduler.get_job(second.id).status == JobStatus.CANCELED
    assert blocked.jobs == {}
