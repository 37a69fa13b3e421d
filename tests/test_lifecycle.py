"""How runs end: retries and intervals, orphans, and recording an end again after an outage."""

from __future__ import annotations

from typing import Any

import pytest
from bson import ObjectId

from taskscheduler import JobStatus, Scheduler, lifecycle
from taskscheduler.errors import ServerUnavailableError
from taskscheduler.store import utcnow


def claimed(scheduler: Scheduler, **options: Any) -> tuple[dict[str, Any], ObjectId]:
    p = scheduler.add_job("sample_jobs:Fail", "x", options)
    worker = ObjectId()
    assert scheduler.store.claim(p.id, worker, utcnow())
    return scheduler.store.find_job(p.id), worker


def test_recording_an_end_twice_after_a_lost_answer_writes_it_once(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc, worker = claimed(scheduler, retry=1, retry_interval=0)
    end = lifecycle.RunEnd(scheduler, doc, worker, JobStatus.FAILED, error={"class": "E", "message": "m"})
    real = scheduler.store.set_status

    def applied_then_lost(*args: Any, **kw: Any) -> bool:
        real(*args, **kw)
        raise ServerUnavailableError("connection closed")

    monkeypatch.setattr(scheduler.store, "set_status", applied_then_lost)
    with pytest.raises(ServerUnavailableError):
        end.record()
    monkeypatch.setattr(scheduler.store, "set_status", real)
    assert end.record() is True
    assert scheduler.get_job(doc["_id"]).status == JobStatus.FAILED
    assert [e["status"] for e in scheduler.store.job_events(doc["_id"])] == [JobStatus.PROCESSING, JobStatus.FAILED]
    retries = list(scheduler.get_jobs())
    assert len(retries) == 1 and retries[0].options["retry"] == 0


def test_lost_ownership_withdraws_the_end_and_the_next_run(scheduler: Scheduler) -> None:
    doc, worker = claimed(scheduler, retry=1, retry_interval=0)
    assert lifecycle.release(scheduler, doc, worker, orphaned=True, reason="test")  # someone else took it back
    end = lifecycle.RunEnd(scheduler, doc, worker, JobStatus.FAILED, error={"class": "E", "message": "m"})
    assert end.record() is False
    assert scheduler.get_job(doc["_id"]).status == JobStatus.WAITING
    assert [p.id for p in scheduler.get_jobs()] == [doc["_id"]]  # no retry added
    assert JobStatus.FAILED not in [e["status"] for e in scheduler.store.job_events(doc["_id"])]


def test_third_orphaning_fails_the_job(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    for _ in range(2):
        worker = ObjectId()
        assert scheduler.store.claim(p.id, worker, utcnow())
        assert lifecycle.release(scheduler, scheduler.store.find_job(p.id), worker, orphaned=True, reason="gone")
    worker = ObjectId()
    assert scheduler.store.claim(p.id, worker, utcnow())
    assert lifecycle.release(scheduler, scheduler.store.find_job(p.id), worker, orphaned=True, reason="gone")
    failed = scheduler.get_job(p.id)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error["class"] == "OrphanedJobError"


def test_interval_after_timeout_is_measured_from_now(scheduler: Scheduler) -> None:
    import time

    doc, worker = claimed(scheduler, interval=60, interval_reference="start")
    nxt = lifecycle.next_run(scheduler, dict(doc, started=utcnow().replace(year=2000)), JobStatus.TIMEOUT)
    assert nxt is not None and nxt["options"]["at"] >= int(time.time()) + 59
