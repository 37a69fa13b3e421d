"""The jobs a node leaves to their preferred node for a while."""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from taskscheduler.node.backlog import start_order
from taskscheduler.node.deferred import Deferred


def _job(priority: int = 0) -> dict[str, Any]:
    return {"_id": ObjectId(), "class": "jobs:Noop", "options": {"priority": priority}}


def test_jobs_ripen_after_their_delay_and_go_in_start_order() -> None:
    deferred = Deferred()
    low, high, late = _job(-5), _job(50), _job(90)
    deferred.add(low, 1.0)
    deferred.add(high, 1.0)
    deferred.add(late, 3.0)
    assert deferred.next_ripe(0.0) == 1.0
    assert deferred.take(0.5, 10) == []
    assert deferred.take(1.0, 1) == [high]  # the higher priority first
    assert deferred.take(2.0, 10) == [low]
    assert deferred.next_ripe(2.0) == 3.0 and late["_id"] in deferred
    assert deferred.take(3.0, 10) == [late]
    assert not deferred and deferred.next_ripe(3.0) is None


def test_a_job_claimed_elsewhere_is_dropped_and_a_newer_document_replaces_the_older() -> None:
    deferred = Deferred()
    claimed, again = _job(), _job()
    deferred.add(claimed, 1.0)
    deferred.add(again, 1.0)
    newer = {**again, "run": 2}
    deferred.add(newer, 2.0)
    assert deferred.drop(claimed["_id"]) == claimed
    assert deferred.drop(claimed["_id"]) is None
    assert deferred.take(1.5, 10) == []  # the newer document ripens later
    assert deferred.take(2.0, 10) == [newer]
    assert len(deferred) == 0


def test_a_job_that_needs_no_free_worker_goes_once_ripe_whatever_the_count() -> None:
    deferred = Deferred()
    forced, plain = _job(), _job(10)
    deferred.add(forced, 1.0, counted=False)
    deferred.add(plain, 1.0)
    assert deferred.take(1.0, 0) == [forced]  # no free worker: only the one with a worker of its own
    assert deferred.take(1.0, 1) == [plain]


def test_jobs_of_a_higher_priority_go_before_a_job_of_ours_ripe_or_not() -> None:
    deferred = Deferred()
    high, higher, same, low = _job(50), _job(90), _job(0), _job(-50)
    for doc in (high, higher, same, low):
        deferred.add(doc, 5.0)
    ours = _job(0)
    assert deferred.take_before(start_order(ours), 1) == [higher]
    assert deferred.take_before(start_order(ours), 5) == [high]  # never one of the same or a lower priority
    assert deferred.take(5.0, 5) == [same, low]


def test_the_next_ripening_is_in_the_future_once_the_ripe_ones_wait_for_a_worker() -> None:
    deferred = Deferred()
    deferred.add(_job(), 1.0)
    deferred.add(_job(), 4.0)
    assert deferred.next_ripe(0.0) == 1.0
    assert deferred.next_ripe(2.0) == 4.0  # the ripe one waits for a free worker: no timer for it (no spin)
    assert deferred.next_ripe(4.0) is None
    assert len(deferred.take(4.0, 5)) == 2


def test_entries_of_jobs_taken_or_dropped_do_not_pile_up() -> None:
    deferred = Deferred()
    keep = _job()
    deferred.add(keep, 0.0)
    for _ in range(5000):
        doc = _job()
        deferred.add(doc, 0.0)
        assert deferred.take(0.0, 1) != [] or deferred.drop(doc["_id"]) is not None
    assert len(deferred) <= 1
    assert len(deferred._all) <= 2 * len(deferred) + 65
