"""The jobs a node leaves to their preferred node for a while."""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from taskscheduler.node.deferred import Deferred


def _job(priority: int = 0) -> dict[str, Any]:
    return {"_id": ObjectId(), "class": "jobs:Noop", "options": {"priority": priority}}


def test_jobs_ripen_after_their_delay_and_go_in_start_order() -> None:
    deferred = Deferred()
    low, high, late = _job(-5), _job(50), _job(90)
    deferred.add(low, 1.0)
    deferred.add(high, 1.0)
    deferred.add(late, 3.0)
    assert deferred.next_ripe() == 1.0
    assert deferred.take(0.5, 10) == []
    assert not deferred.ripe(0.5)
    assert deferred.take(1.0, 1) == [high]  # the higher priority first
    assert deferred.take(2.0, 10) == [low]
    assert deferred.next_ripe() == 3.0 and late["_id"] in deferred
    assert deferred.take(3.0, 10) == [late]
    assert not deferred and deferred.next_ripe() is None


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
