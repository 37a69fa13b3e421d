"""A job's events in the order they happened (store.history), when the processes that stamped them disagree
about the server's clock by some milliseconds: a release or sweep of a run comes before the run's next claim.

Seen in CI (test_orphanings' four outages, on a loaded machine): a node's sweep stamped 30 ms after the claim that
followed it, so the job's history read "PROCESSING, PROCESSING, WAITING, WAITING"."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from bson import ObjectId
from pymongo.database import Database

from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import DEFAULT_EVENT_QUEUE
from taskscheduler.store.history import in_order

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
P, W, D = int(JobStatus.PROCESSING), int(JobStatus.WAITING), int(JobStatus.DONE)


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def event(status: int, worker: ObjectId | None, ms: int, run: Any = 1, **more: Any) -> dict[str, Any]:
    return {"_id": ObjectId(), "run": run, "status": status, "worker": worker, "time": at(ms), **more}


def names(events: list[dict[str, Any]]) -> list[str]:
    return [f"{JobStatus(e['status']).name}:{e['worker']}" for e in events]


def as_stored(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(events, key=lambda e: (e["run"], e["time"]))


def test_a_sweep_stamped_after_the_next_claim_comes_before_it() -> None:
    a, b, c = ObjectId(), ObjectId(), ObjectId()
    truth = [
        event(P, a, 0),
        event(W, a, 3000),
        event(P, b, 3100),
        event(W, b, 6130),  # the sweeping node's clock reads 30 ms ahead of the next claim's worker
        event(P, c, 6100),
        event(D, c, 9000),
    ]
    stored = as_stored(truth)
    assert names(stored) != names(truth)  # what job_events returned before
    assert names(in_order(stored)) == names(truth)


def test_the_end_that_opened_a_run_comes_before_the_runs_first_claim() -> None:
    """A retry without delay: worker a's end of run 1 writes the WAITING of run 2 (naming a); worker b claims run
    2 at once, its stamp 15 ms before a's."""
    a, b = ObjectId(), ObjectId()
    truth = [
        event(P, a, 0),
        event(int(JobStatus.FAILED), a, 800),
        event(W, a, 800, run=2),
        event(P, b, 785, run=2),
        event(D, b, 900, run=2),
    ]
    assert names(in_order(as_stored(truth))) == names(truth)


def test_a_run_coming_due_or_a_verdict_comes_before_the_claim_it_allowed() -> None:
    a, b = ObjectId(), ObjectId()
    postponed = int(JobStatus.POSTPONED)
    due = [event(postponed, a, 0), event(W, None, 1000), event(P, b, 990), event(D, b, 1500)]
    assert names(in_order(as_stored(due))) == names(due)
    held = [
        event(P, a, 0),
        event(postponed, a, 3000),  # held for its verdict, naming the worker it swept
        event(W, None, 9000),  # the verdict: due again
        event(P, b, 8980),
        event(D, b, 9500),
    ]
    assert names(in_order(as_stored(held))) == names(held)


def test_what_opens_a_run_after_a_hold_ended_stays_where_it_is() -> None:
    a, b = ObjectId(), ObjectId()
    truth = [event(P, a, 0), event(W, a, 100), event(W, None, 150), event(P, b, 200)]
    assert in_order(truth) == truth


def test_events_already_in_order_are_left_as_they_are() -> None:
    a, b = ObjectId(), ObjectId()
    truth = [event(P, a, 0), event(W, a, 10), event(P, b, 20), event(D, b, 30), event(W, None, 40, run=2)]
    assert in_order(truth) == truth


def test_a_worker_that_claims_again_keeps_its_release_between_its_claims() -> None:
    a, b = ObjectId(), ObjectId()
    truth = [event(P, a, 0), event(W, a, 100), event(P, a, 200), event(W, a, 300), event(P, b, 400)]
    assert in_order(as_stored(truth)) == truth


def test_each_run_is_ordered_on_its_own() -> None:
    a, b = ObjectId(), ObjectId()
    run1 = [event(P, a, 0), event(W, a, 520), event(P, b, 500), event(D, b, 900)]
    run2 = [event(P, a, 1000, run=2), event(D, a, 1100, run=2)]
    result = in_order(as_stored(run1 + run2))
    assert names(result) == names([run1[0], run1[1], run1[2], run1[3], *run2])


def test_events_that_name_no_worker_or_are_not_stamped_keep_the_stored_order() -> None:
    a, b = ObjectId(), ObjectId()
    unstamped = [event(P, a, 0), event(W, a, 520), event(P, b, 500)]
    unstamped[1]["time"] = "yesterday"  # hostile (SPEC 2): the run is left as stored, nothing raises
    assert in_order(unstamped) == unstamped
    mixed = [event(P, a, 0), event(W, a, 520), event(P, b, 500)]
    mixed[0]["time"] = mixed[0]["time"].replace(tzinfo=None)
    assert in_order(mixed) == mixed
    nameless = as_stored([event(P, a, 0), event(W, a, 400), event(D, None, 520), event(P, b, 500)])
    assert in_order(nameless) == nameless  # no rule places a DONE naming no worker
    hostile = [event(P, a, 0), {**event(W, a, 520), "status": "2"}, event(P, b, 500), event(True, b, 510)]
    assert sorted(id(e) for e in in_order(hostile)) == sorted(id(e) for e in hostile)  # a permutation, no error


def test_job_events_and_the_run_listing_read_the_history_in_order(scheduler: Scheduler, db: Database[Any]) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    a, b = ObjectId(), ObjectId()
    truth = [event(P, a, 0), event(W, a, 3040), event(P, b, 3010), event(D, b, 4000, started=at(3010), ended=at(4000))]
    db[DEFAULT_EVENT_QUEUE].insert_many([dict(e, job=p.id, **{"class": "sample_jobs:Noop"}) for e in truth])
    expected = [truth[0]["_id"], truth[1]["_id"], truth[2]["_id"], truth[3]["_id"]]
    assert [e["_id"] for e in scheduler.store.job_events(p.id)] == expected
    events, total = scheduler.store.recent_run_events(p.id, 10)
    assert [e["_id"] for e in events] == expected and total == 1


def test_a_long_history_of_tenures_each_release_stamped_late() -> None:
    """A run put back 2,000 times (hostile data can hold that many), each release stamped after the next claim:
    every release still comes right after its own claim."""
    workers = [ObjectId() for _ in range(2000)]
    truth = []
    for n, worker in enumerate(workers):
        truth.append(event(P, worker, n * 100))
        truth.append(event(W, worker, n * 100 + 120))  # 20 ms after the next claim
    assert names(in_order(as_stored(truth))) == names(truth)
