"""A job's history (store.history.in_order: its events listed in the order of the run's claims when the writers'
stamps disagree by some milliseconds) as the library's own writers write it, each step stamped by a process of its
own, and with hostile event documents (SPEC 2).

Each stamp below is what the writer's process read from its own estimate of the server's clock (store.clock): the
``Stamps`` helper sets that reading for each step, as two processes whose estimates differ by a few ms would."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId
from bson.int64 import Int64
from pymongo.database import Database
from starlette.testclient import TestClient

from helpers import cli_in_process
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import DEFAULT_EVENT_QUEUE
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store.history import in_order

P, W, D = int(JobStatus.PROCESSING), int(JobStatus.WAITING), int(JobStatus.DONE)
F, C, PP = int(JobStatus.FAILED), int(JobStatus.CANCELED), int(JobStatus.POSTPONED)
T0 = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
#: The CLI run in this process leaves its MongoClient to the garbage collector, which warns (in any later test).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def event(status: Any, worker: Any, ms: int, run: Any = 1, **more: Any) -> dict[str, Any]:
    return {"_id": ObjectId(), "run": run, "status": status, "worker": worker, "time": at(ms), **more}


def as_stored(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(events, key=lambda e: (e["run"], e["time"]))


def statuses(events: list[Any]) -> list[tuple[Any, str]]:
    return [(e.get("run"), JobStatus(e["status"]).name) for e in events]


class Stamps:
    """The reading of the server's clock each writer stamps with: ``set(ms)`` before a step, relative to a base
    taken from the real clock (so that schedules computed from it stay sane)."""

    def __init__(self, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = scheduler.store.clock
        self.base = clock.now()
        self.current = self.base
        monkeypatch.setattr(clock, "now", lambda earliest=False: self.current)

    def set(self, ms: int) -> None:
        self.current = self.base + timedelta(milliseconds=ms)


@pytest.fixture
def stamps(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> Stamps:
    return Stamps(scheduler, monkeypatch)


def claim(scheduler: Scheduler, job_id: ObjectId, worker: ObjectId) -> dict[str, Any]:
    doc = scheduler.lifecycle.claim(scheduler.store.find_job(job_id), worker, 30.0)
    assert doc is not None
    return doc


def history(scheduler: Scheduler, job_id: ObjectId) -> list[tuple[Any, str]]:
    events = scheduler.store.job_events(job_id)
    assert len({e["_id"] for e in events}) == len(events)  # nothing listed twice
    assert len(events) == scheduler.store.events.count_documents({"job": job_id})  # nothing lost
    return statuses(events)


# -- 1. histories the library writes -------------------------------------------------------------------------------


def test_a_worker_claiming_the_retry_its_own_end_announced(scheduler: Scheduler, stamps: Stamps) -> None:
    p = scheduler.add_job("sample_jobs:Noop", {}, {"retry": 1, "retry_interval": 0})
    a = ObjectId()
    stamps.set(0)
    doc = claim(scheduler, p.id, a)
    stamps.set(800)
    assert scheduler.lifecycle.end(doc, a, JobStatus.FAILED, error={"class": "E", "message": "x"}).record()
    stamps.set(795)  # the same worker's next reading, 5 ms lower
    doc = claim(scheduler, p.id, a)
    stamps.set(900)
    assert scheduler.lifecycle.end(doc, a, JobStatus.DONE).record()
    assert history(scheduler, p.id) == [
        (1, "PROCESSING"),
        (1, "FAILED"),
        (2, "WAITING"),
        (2, "PROCESSING"),
        (2, "DONE"),
    ]


def test_a_cancel_right_after_the_claim(scheduler: Scheduler, stamps: Stamps) -> None:
    """A retry without delay claimed at once by the worker whose end announced it, its stamp 5 ms earlier: run 2's
    WAITING (written by that end) still comes before the claim."""
    p = scheduler.add_job("sample_jobs:Noop")
    a = ObjectId()
    stamps.set(1000)
    claim(scheduler, p.id, a)
    stamps.set(995)  # the producer's reading, 5 ms behind the worker's
    scheduler.cancel_job(p.id)
    stamps.set(1200)  # its node, after killing the worker
    scheduler.lifecycle.settle_cancel(scheduler.store.find_job(p.id))
    assert history(scheduler, p.id) == [(1, "PROCESSING"), (1, "CANCELED")]
    assert [r["status"] for r in p.runs()] == [C]


def test_a_release_at_a_stop_right_after_the_claim(scheduler: Scheduler, stamps: Stamps) -> None:
    """A producer's cancel of a running job stamped 5 ms before the worker's claim: listed after the claim it ends."""
    p = scheduler.add_job("sample_jobs:Noop")
    a, b = ObjectId(), ObjectId()
    stamps.set(1000)
    doc = claim(scheduler, p.id, a)
    stamps.set(995)  # the node's reading, 5 ms behind its worker's
    assert scheduler.lifecycle.release(doc, a, orphaned=False, reason="queue node stopped").record()
    stamps.set(1100)
    doc = claim(scheduler, p.id, b)
    stamps.set(1200)
    assert scheduler.lifecycle.end(doc, b, JobStatus.DONE).record()
    assert history(scheduler, p.id) == [(1, "PROCESSING"), (1, "WAITING"), (1, "PROCESSING"), (1, "DONE")]


def test_a_worker_that_claims_again_before_its_release_stamp(scheduler: Scheduler, stamps: Stamps) -> None:
    """A node's release at its stop stamped 5 ms before its worker's claim: after that claim, before the next."""
    p = scheduler.add_job("sample_jobs:Noop")
    a = ObjectId()
    stamps.set(0)
    doc = claim(scheduler, p.id, a)
    stamps.set(1000)  # the node's reading, ahead
    assert scheduler.lifecycle.release(
        doc, a, orphaned=False, reason="lease not renewed in time (node fenced)"
    ).record()
    stamps.set(990)
    doc = claim(scheduler, p.id, a)
    stamps.set(2000)
    assert scheduler.lifecycle.end(doc, a, JobStatus.DONE).record()
    assert history(scheduler, p.id) == [(1, "PROCESSING"), (1, "WAITING"), (1, "PROCESSING"), (1, "DONE")]


def test_a_cancel_of_a_run_just_released(scheduler: Scheduler, stamps: Stamps) -> None:
    """A worker that claims the run again, the release of its first claim stamped 10 ms after the second claim:
    the release ends the first claim."""
    p = scheduler.add_job("sample_jobs:Noop")
    a = ObjectId()
    stamps.set(0)
    doc = claim(scheduler, p.id, a)
    stamps.set(1000)
    assert scheduler.lifecycle.release(doc, a, orphaned=False, reason="queue node stopped").record()
    stamps.set(995)
    scheduler.cancel_job(p.id)
    assert history(scheduler, p.id) == [(1, "PROCESSING"), (1, "WAITING"), (1, "CANCELED")]


def test_a_retry_claimed_by_another_worker_and_a_requeue_claimed_early(scheduler: Scheduler, stamps: Stamps) -> None:
    """A cancel of a run just put back, stamped 5 ms before the release: after the release (a CANCELED job's
    history ends CANCELED)."""
    """Held: the opening events of run 2 (another worker's end) and run 3 (a requeue), each stamped after the claim
    it allowed, are listed before it; the sweep of run 3 stamped after the next claim comes before it."""
    p = scheduler.add_job("sample_jobs:Noop", {}, {"retry": 1, "retry_interval": 0})
    a, b, c, d = ObjectId(), ObjectId(), ObjectId(), ObjectId()
    stamps.set(0)
    doc = claim(scheduler, p.id, a)
    stamps.set(800)
    assert scheduler.lifecycle.end(doc, a, JobStatus.FAILED, error={"class": "E", "message": "x"}).record()
    stamps.set(785)
    doc = claim(scheduler, p.id, b)
    stamps.set(900)
    assert scheduler.lifecycle.end(doc, b, JobStatus.FAILED, error={"class": "E", "message": "y"}).record()
    stamps.set(2000)
    scheduler.requeue_job(p.id)
    stamps.set(1980)
    doc = claim(scheduler, p.id, c)
    stamps.set(5040)  # a sweeping node ahead
    assert scheduler.lifecycle.release_orphan(
        scheduler.store.find_job(p.id), "its node stopped renewing the lease"
    ).record()
    stamps.set(5010)
    doc = claim(scheduler, p.id, d)
    stamps.set(6000)
    assert scheduler.lifecycle.end(doc, d, JobStatus.DONE).record()
    assert history(scheduler, p.id) == [
        (1, "PROCESSING"),
        (1, "FAILED"),
        (2, "WAITING"),
        (2, "PROCESSING"),
        (2, "FAILED"),
        (3, "WAITING"),
        (3, "PROCESSING"),
        (3, "WAITING"),
        (3, "PROCESSING"),
        (3, "DONE"),
    ]
    assert [(r["run"], r["status"]) for r in p.runs()] == [(1, F), (2, F), (3, D)]


# -- 2. hostile event documents (SPEC 2) ---------------------------------------------------------------------------


_cli = cli_in_process


@pytest.fixture
def web(scheduler: Scheduler) -> Iterator[TestClient]:
    from taskscheduler.ops.dashboard.app import create_app

    with TestClient(create_app(scheduler), raise_server_exceptions=False) as c:
        yield c


def _stored(db: Database[Any], job_id: ObjectId, docs: list[dict[str, Any]]) -> None:
    db[DEFAULT_EVENT_QUEUE].insert_many([dict(d, job=job_id, **{"class": "sample_jobs:Noop"}) for d in docs])


HOSTILE_ENDS = {
    "an announcement whose end is a document": [event(D, None, 0), event(W, None, 10, run=2, end={"x": 1})],
    "an announcement whose end is an array": [event(D, None, 0), event(PP, None, 10, run=2, end=[1, 2])],
    "two ends of a run, one with a document as _id": [
        {**event(D, None, 0), "_id": {"not": "an id"}},
        event(F, None, 10),
    ],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ENDS))
def test_unhashable_end_or_id_in_a_jobs_events(
    case: str,
    scheduler: Scheduler,
    db: Database[Any],
    web: TestClient,
    server: EmbeddedServer,
    db_name: str,
) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    _stored(db, p.id, HOSTILE_ENDS[case])
    assert len(scheduler.store.job_events(p.id)) == len(HOSTILE_ENDS[case])  # in_order itself holds
    scheduler.store.recent_run_events(p.id, 10)
    failures = []
    try:
        scheduler.get_job(p.id).runs()
    except Exception as exc:
        failures.append(f"runs(): {exc!r}")
    code, out = _cli("show", str(p.id), "--mongodb-uri", server.uri, "--database", db_name)
    if code not in (0, None):
        failures.append(f"show: {code!r}")
    page = web.get(f"/api/jobs/{p.id}")
    if page.status_code != 200:
        failures.append(f"job page: {page.status_code}")
    assert not failures, failures


def test_hostile_runs_of_mixed_types_and_odd_fields_lose_and_duplicate_nothing(
    scheduler: Scheduler, db: Database[Any], web: TestClient
) -> None:
    """Held: run numbers stored as 1, 1.0 and Int64(1) sort together on the server but group apart here; statuses,
    workers and times of any type; none of it raises, loses or repeats an event in job_events, recent_run_events,
    runs() or the job page."""
    p = scheduler.add_job("sample_jobs:Noop")
    a, b = ObjectId(), ObjectId()
    docs = [
        event(P, a, 0),
        event(W, a, 520, run=1.0),
        event(P, b, 500, run=Int64(1)),
        event(D, b, 900, started=at(500), ended=at(900)),
        event(P, "a", 950),
        event(Int64(2), a, 960),
        event(True, b, 970),
        event(W, [a], 980),
        {**event(W, None, 990), "time": "yesterday"},
        {**event(P, b, 995), "time": None},
        event(D, b, 1000, run=None),
        event(D, b, 1000, run="2"),
        event(D, b, 1000, run={"n": 2}),
        {"_id": ObjectId(), "status": P},
    ]
    _stored(db, p.id, docs)
    events = scheduler.store.job_events(p.id)
    assert sorted(e["_id"] for e in events) == sorted(d["_id"] for d in docs)
    recent, _ = scheduler.store.recent_run_events(p.id, 10)
    assert len({e["_id"] for e in recent}) == len(recent)
    p.runs()
    assert web.get(f"/api/jobs/{p.id}").status_code == 200


def test_random_hostile_runs_are_always_a_permutation() -> None:
    """Held: 300 random runs of odd statuses, workers and times (close together, mostly out of order) never make
    in_order raise, drop or repeat an event."""
    rng = random.Random(7)
    workers = [ObjectId() for _ in range(4)] + [None, "w", 3]
    stat = [P, P, W, PP, D, F, C, True, Int64(2), 2.0, "2", None]
    for _ in range(300):
        run = [
            event(rng.choice(stat), rng.choice(workers), rng.randrange(0, 60), run=rng.choice([1, 1, 2]))
            for _ in range(rng.randrange(1, 30))
        ]
        stored = as_stored(run)
        assert sorted(id(e) for e in in_order(stored)) == sorted(id(e) for e in stored)


def test_forty_thousand_events_of_one_run_in_the_worst_shapes_found() -> None:
    """Held: one worker claiming 20,000 times with every release stamped after its next claim, and 20,000 claims
    each with an opening stamped inside it, are ordered right (by bisection: a pairing that costs claims x events
    would not finish here)."""
    a = ObjectId()
    one_worker = [e for i in range(20_000) for e in (event(P, a, i * 100), event(W, a, i * 100 + 120))]
    assert [e["_id"] for e in in_order(as_stored(one_worker))] == [e["_id"] for e in one_worker]
    openings = [e for i in range(20_000) for e in (event(W, None, i * 100 + 50), event(P, ObjectId(), i * 100))]
    assert [e["_id"] for e in in_order(as_stored(openings))] == [e["_id"] for e in openings]


def test_duplicated_sweeps_of_one_worker_and_a_verdict_stay_in_the_hold_they_end() -> None:
    """Held: two sweep events naming worker a (attempts of one sweep), the second stamped after b's claim; then b
    swept and held for its verdict, the verdict (naming no worker) stamped after c's claim."""
    a, b, c = ObjectId(), ObjectId(), ObjectId()
    truth = [
        event(P, a, 0),
        event(W, a, 3000, sweep={"back": False}),
        event(W, a, 3130, sweep={"back": False}),
        event(P, b, 3100),
        event(PP, b, 6000, sweep={"back": False}, error={"message": "its node stopped renewing the lease"}),
        event(W, None, 12030),
        event(P, c, 12000),
        event(D, c, 13000),
    ]
    assert [e["_id"] for e in in_order(as_stored(truth))] == [e["_id"] for e in truth]


def test_twenty_thousand_unnamed_events_inside_one_hold_with_twenty_thousand_ends() -> None:
    """Hostile: one claim whose hold 20,000 events end and 20,000 events naming no claim fall inside; each
    unnamed one is placed next to the nearer edge of that hold (the hold's end found once, not once per event)."""
    a = ObjectId()
    claim_event, ends = event(P, a, 0), [event(W, a, 100_000 + i) for i in range(20_000)]
    inside = [event(W, None, 10 + i) for i in range(20_000)]  # nearer the claim: before it
    ordered = in_order(as_stored([claim_event, *ends, *inside]))
    assert [e["_id"] for e in ordered[:20_000]] == [e["_id"] for e in inside]
    assert ordered[20_000]["_id"] == claim_event["_id"] and len(ordered) == 40_001
