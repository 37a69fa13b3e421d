"""The worker manager's backlog: higher priority first, first in first out within one priority."""

from __future__ import annotations

import pytest
from bson import ObjectId

from taskscheduler.node.backlog import Backlog
from taskscheduler.node.protocol import RunJob


def _task(priority: int | None = None, **doc: object) -> RunJob:
    options = {} if priority is None else {"priority": priority}
    return RunJob({"_id": ObjectId(), "options": options, **doc}, 30.0)


def _drain(backlog: Backlog) -> list[RunJob]:
    out = []
    while backlog:
        out.append(backlog.pop())
    return out


def test_priority_then_arrival() -> None:
    backlog = Backlog()
    tasks = [_task(0), _task(-5), _task(10), _task(0), _task(10), _task(None), _task(100), _task(-100)]
    for t in tasks:
        backlog.add(t)
    order = _drain(backlog)
    expected = [tasks[6], tasks[2], tasks[4], tasks[0], tasks[3], tasks[5], tasks[1], tasks[7]]
    assert [t.doc["_id"] for t in order] == [t.doc["_id"] for t in expected]


def test_a_job_is_held_once_and_keeps_its_place() -> None:
    backlog = Backlog()
    first, second = _task(1), _task(1)
    backlog.add(first)
    backlog.add(second)
    newer = RunJob(dict(first.doc, run=2), 30.0)
    backlog.add(newer)  # the same job again (a newer document): one entry, still first
    assert len(backlog) == 2
    assert backlog.pop() is newer and backlog.pop() is second and not backlog


def test_a_changed_priority_moves_the_job() -> None:
    backlog = Backlog()
    low, other = _task(0), _task(5)
    backlog.add(low)
    backlog.add(other)
    backlog.add(RunJob(dict(low.doc, options={"priority": 9}), 30.0))
    assert [t.doc["_id"] for t in _drain(backlog)] == [low.doc["_id"], other.doc["_id"]]


def test_put_back_goes_first_within_its_priority_only() -> None:
    backlog = Backlog()
    high, mid1, mid2 = _task(50), _task(0), _task(0)
    for t in (high, mid1, mid2):
        backlog.add(t)
    assert backlog.pop() is high
    assert backlog.pop() is mid1
    backlog.put_back(mid1)  # could not be handed over
    assert [t.doc["_id"] for t in _drain(backlog)] == [mid1.doc["_id"], mid2.doc["_id"]]


def test_discard_and_empty_pop() -> None:
    backlog = Backlog()
    a, b = _task(), _task()
    backlog.add(a)
    backlog.add(b)
    backlog.discard(a.doc["_id"])
    backlog.discard(ObjectId())  # unknown: nothing happens
    assert a.doc["_id"] not in backlog and b.doc["_id"] in backlog
    assert backlog.pop() is b
    with pytest.raises(IndexError):
        backlog.pop()


@pytest.mark.parametrize("bad", [True, "7", 1.5])
def test_a_malformed_priority_counts_as_zero(bad: object) -> None:
    backlog = Backlog()
    odd, high = RunJob({"_id": ObjectId(), "options": {"priority": bad}}, 30.0), _task(1)
    backlog.add(odd)
    backlog.add(high)
    assert backlog.pop() is high


def test_backlog_put_back_keeps_first_in_first_out_within_a_priority() -> None:
    """SPEC 6: jobs put back after their workers died come back first in, first out within their priority."""
    from bson import ObjectId

    from taskscheduler.node.backlog import Backlog
    from taskscheduler.node.protocol import RunJob

    def task(name: str) -> RunJob:
        return RunJob({"_id": ObjectId(), "name": name, "options": {"priority": 0}}, 30.0)

    backlog = Backlog()
    a, b, c = task("a"), task("b"), task("c")
    for t in (a, b, c):
        backlog.add(t)
    first, second = backlog.pop(), backlog.pop()
    assert [first.doc["name"], second.doc["name"]] == ["a", "b"]
    backlog.put_back(first)  # the workers a and b were handed to died; reaped in the order they were handed
    backlog.put_back(second)
    assert [backlog.pop().doc["name"] for _ in range(3)] == ["a", "b", "c"]
