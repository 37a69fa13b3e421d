"""Scheduler on the real server: SPEC section 2 and the upstream SchedulerTest cases that still apply."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from blinker import Namespace
from bson import ObjectId
from pymongo import MongoClient
from pymongo.errors import AutoReconnect

import sample_jobs
from helpers import (
    claim,
    wait_until,
)
from taskscheduler import (
    JobStatus,
    Process,
    Scheduler,
)
from taskscheduler.constants import UNSET_TIME
from taskscheduler.errors import (
    InvalidArgumentError,
    JobNotFoundError,
    WaitTimeoutError,
)
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import StatusFeed, fields_equal, literal, utcnow
from taskscheduler.store.records import RunContext

NOOP = "sample_jobs:Noop"


def count_collections(db: Any) -> dict[str, int]:
    return {name: db[name].count_documents({}) for name in db.list_collection_names()}


def test_add_job_returns_waiting_process(scheduler: Scheduler) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    p = scheduler.add_job("test", {"foo": "bar"})
    assert isinstance(p, Process)
    assert isinstance(p.id, ObjectId)
    assert p.status == JobStatus.WAITING
    assert p.job_class == "test"
    assert p.data == {"foo": "bar"}
    assert p.created is not None and p.created >= before
    assert p.started is None and p.ended is None and p.worker is None
    assert p.progress == 0.0
    stored = scheduler.get_job(p.id)
    assert stored.status == JobStatus.WAITING and stored.data == {"foo": "bar"}
    assert stored.created == p.created


def test_add_job_accepts_class_object_and_dotted_name(scheduler: Scheduler) -> None:
    import sample_jobs

    assert scheduler.add_job(sample_jobs.Noop).job_class == NOOP
    assert scheduler.add_job("sample_jobs.Noop").job_class == NOOP


def test_add_job_rejects_non_job_class(scheduler: Scheduler, db: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="JobInterface"):
        scheduler.add_job(dict)
    with pytest.raises(InvalidArgumentError):
        scheduler.add_job("")
    assert scheduler.store.jobs.count_documents({}) == 0


def test_options_and_keywords_merge_keywords_win(scheduler: Scheduler) -> None:
    p = scheduler.add_job(NOOP, None, {"retry": 1, "interval": 60}, retry=3)
    assert p.options["retry"] == 3 and p.options["interval"] == 60


def test_add_job_advanced_options_stored_exactly(scheduler: Scheduler) -> None:
    p = scheduler.add_job("test", None, {"retry": 10, "interval": 60, "retry_interval": 10})
    opts = scheduler.get_job(p.id).options
    assert (opts["retry"], opts["interval"], opts["retry_interval"]) == (10, 60, 10)
    assert all(type(opts[k]) is int for k in ("retry", "interval", "retry_interval"))
    assert opts["interval_reference"] == "end" and opts["force_spawn"] is False and opts["timeout"] == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("at", "10"),
        ("at", True),
        ("at", -1),
        ("at", float("nan")),
        ("at", datetime(2030, 1, 1)),
        ("interval", "10"),
        ("interval", True),
        ("interval", 1.5),
        ("interval", 2**31),  # below -1 is "at once", as upstream reads it
        ("interval_reference", "middle"),
        ("interval_reference", 1),
        ("retry", "10"),
        ("retry", False),
        ("retry", 2**31),  # below -1 is endless, as upstream reads it
        ("retry_interval", "1"),
        ("retry_interval", -1),
        ("force_spawn", 1),
        ("force_spawn", "yes"),
        ("timeout", "10"),
        ("timeout", -1),
        ("timeout", 2.5),
        ("id", "foobar"),
        ("id", 123),
        ("ignore_data", "foobar"),
        ("ignore_data", 0),
        ("foobar", 1),
    ],
)
def test_invalid_job_option_writes_nothing(scheduler: Scheduler, db: Any, name: str, value: Any) -> None:
    before = count_collections(db)
    with pytest.raises(InvalidArgumentError, match=name):
        scheduler.add_job("test", None, {name: value})
    with pytest.raises(InvalidArgumentError):
        scheduler.add_job_once("test", None, {name: value})
    assert count_collections(db) == before


def test_unencodable_data_is_a_clear_error(scheduler: Scheduler, db: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="BSON"):
        scheduler.add_job("test", {"x": object()})
    assert scheduler.store.jobs.count_documents({}) == 0


def test_custom_id(scheduler: Scheduler) -> None:
    job_id = ObjectId()
    p = scheduler.add_job("test", None, {"id": job_id})
    assert p.id == job_id and scheduler.get_job(job_id).id == job_id
    assert "id" not in p.options
    with pytest.raises(InvalidArgumentError, match="already exists"):
        scheduler.add_job("test", None, {"id": job_id})
    assert scheduler.store.jobs.count_documents({}) == 1


def test_future_at_is_postponed_and_datetime_accepted(scheduler: Scheduler) -> None:
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    p = scheduler.add_job("test", None, at=later)
    assert p.status == JobStatus.POSTPONED
    assert p.options["at"] == pytest.approx(later.timestamp())
    assert scheduler.add_job("test", None, at=int(time.time()) - 10).status == JobStatus.WAITING


def test_get_job_missing_and_bad_id(scheduler: Scheduler) -> None:
    with pytest.raises(JobNotFoundError):
        scheduler.get_job(ObjectId())
    with pytest.raises(InvalidArgumentError):
        scheduler.get_job("not-an-id")  # type: ignore[arg-type]


def test_get_jobs_default_and_query(scheduler: Scheduler) -> None:
    a = scheduler.add_job("a")
    b = scheduler.add_job("b")
    scheduler.cancel_job(b.id)
    assert [p.id for p in scheduler.get_jobs()] == [a.id]
    assert list(scheduler.get_jobs({"status": JobStatus.DONE})) == []
    assert [p.id for p in scheduler.get_jobs({"status": JobStatus.CANCELED})] == [b.id]
    assert [p.id for p in scheduler.get_jobs({"$or": [{"class": "a"}, {"class": "b"}]})] == [a.id, b.id]
    with pytest.raises(InvalidArgumentError):
        list(scheduler.get_jobs({"status": {"$bogus": 1}}))


def test_cancel_waiting_job(scheduler: Scheduler) -> None:
    p = scheduler.add_job("test")
    scheduler.cancel_job(p.id)
    canceled = scheduler.get_job(p.id)
    assert canceled.status == JobStatus.CANCELED and canceled.ended is not None
    scheduler.cancel_job(p.id)  # a no-op
    assert scheduler.get_job(p.id).ended == canceled.ended


def test_cancel_missing_job(scheduler: Scheduler) -> None:
    with pytest.raises(JobNotFoundError):
        scheduler.cancel_job(ObjectId())


def _set_status(scheduler: Scheduler, job_id: ObjectId, status: JobStatus) -> None:
    """Move a WAITING job straight to ``status`` (one conditional update, as the library makes them)."""
    fields = {"status": literal(int(status)), "ended": literal(utcnow())}
    assert scheduler.store.transition(job_id, fields_equal({"status": int(JobStatus.WAITING)}), fields)


@pytest.mark.parametrize("status", [JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT])
def test_cancel_finished_job_is_refused(scheduler: Scheduler, status: JobStatus) -> None:
    p = scheduler.add_job("test")
    _set_status(scheduler, p.id, status)
    before = scheduler.store.find_job(p.id)
    seen: list[str] = []
    scheduler.on("*", lambda name, q: seen.append(name))
    with pytest.raises(InvalidArgumentError, match=status.name):
        scheduler.cancel_job(p.id)
    assert scheduler.store.find_job(p.id) == before
    assert scheduler.store.job_events(p.id) == [] and seen == []


def test_cancel_cancels_unfinished_children(scheduler: Scheduler) -> None:
    parent = scheduler.add_job("test")
    kid = scheduler.add_job("test", {"parent": parent.id})
    later_kid = scheduler.add_job("test", {"parent": parent.id}, at=time.time() + 3600)
    done_kid = scheduler.add_job("test", {"parent": parent.id})
    other = scheduler.add_job("test")
    _set_status(scheduler, done_kid.id, JobStatus.DONE)
    scheduler.cancel_job(parent.id)
    assert scheduler.get_job(parent.id).status == JobStatus.CANCELED
    assert scheduler.get_job(kid.id).status == JobStatus.CANCELED
    assert scheduler.get_job(later_kid.id).status == JobStatus.CANCELED
    assert scheduler.get_job(done_kid.id).status == JobStatus.DONE
    assert scheduler.get_job(other.id).status == JobStatus.WAITING


def test_flush(scheduler: Scheduler) -> None:
    p = scheduler.add_job("test")
    scheduler.flush()
    with pytest.raises(JobNotFoundError):
        scheduler.get_job(p.id)
    assert scheduler.add_job("test").status == JobStatus.WAITING


def test_add_job_once_returns_existing(scheduler: Scheduler) -> None:
    data = {"n": str(ObjectId())}
    a = scheduler.add_job_once("test", data)
    b = scheduler.add_job_once("test", data)
    assert a.id == b.id and b.status == JobStatus.WAITING
    assert len(list(scheduler.get_jobs())) == 1


def test_add_job_once_reschedules_when_options_change(scheduler: Scheduler) -> None:
    a = scheduler.add_job_once("test", "x", {"interval": 1})
    b = scheduler.add_job_once("test", "x", {"interval": 2})
    assert a.id != b.id
    assert scheduler.get_job(a.id).status == JobStatus.CANCELED
    assert [p.id for p in scheduler.get_jobs()] == [b.id]


def test_add_job_once_compares_only_submitted_options(scheduler: Scheduler) -> None:
    a = scheduler.add_job_once("test", "x", {"interval": 1, "at": int(time.time()) + 3600})
    b = scheduler.add_job_once("test", "x", {"interval": 1})
    assert a.id == b.id


def test_add_job_once_ignores_option_key_order(scheduler: Scheduler) -> None:
    a = scheduler.add_job_once("test", {"a": 1, "b": 2}, {"retry": 2, "interval": 5})
    b = scheduler.add_job_once("test", {"a": 1, "b": 2}, {"interval": 5, "retry": 2})
    assert a.id == b.id


def test_add_job_once_different_data_adds_second_job(scheduler: Scheduler) -> None:
    a = scheduler.add_job_once("test", "foo")
    b = scheduler.add_job_once("test", "bar")
    assert a.id != b.id
    assert {p.id for p in scheduler.get_jobs()} == {a.id, b.id}


def test_add_job_once_ignore_data_replaces(scheduler: Scheduler) -> None:
    a = scheduler.add_job_once("test", "foo", {"ignore_data": True})
    b = scheduler.add_job_once("test", "bar", {"ignore_data": True})
    assert a.id != b.id
    assert scheduler.get_job(a.id).status == JobStatus.CANCELED
    assert [p.id for p in scheduler.get_jobs()] == [b.id]
    assert scheduler.add_job_once("test", "bar", {"ignore_data": True}).id == b.id


def test_add_job_once_is_race_free(scheduler: Scheduler, new_scheduler: Callable[..., Scheduler]) -> None:
    results: list[ObjectId] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(10)

    def call() -> None:
        own = new_scheduler()
        barrier.wait()
        try:
            results.append(own.add_job_once("test", {"k": 1}, {"retry": 1}).id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert len(list(scheduler.get_jobs())) == 1


def test_update_progress(scheduler: Scheduler) -> None:
    p = scheduler.add_job("test")
    scheduler.update_progress(p.id, 50.5)
    assert scheduler.get_job(p.id).progress == 50.5
    scheduler.update_progress(p.id, 50.6)  # within the 500 ms rate limit: dropped
    assert scheduler.get_job(p.id).progress == 50.5
    scheduler.update_progress(p.id, 100)  # the final 100 always writes
    assert scheduler.get_job(p.id).progress == 100.0


def test_update_progress_none_keeps_progress_and_writes_nothing(
    scheduler: Scheduler, db: Any, new_scheduler: Callable[..., Scheduler]
) -> None:
    s = new_scheduler({"progress_rate_limit": 0})
    p = s.add_job("test")
    s.update_progress(p.id, 42)
    before = s.store.find_job(p.id)
    assert before["progress"] == 42.0
    assert before["alive"] == UNSET_TIME  # progress is not a heartbeat: queue nodes renew leases
    marker = s.add_job("test")
    with db.watch([{"$match": {"ns.coll": "taskscheduler.jobs"}}], max_await_time_ms=100) as stream:
        s.update_progress(p.id)
        s.cancel_job(marker.id)  # a write after it: once the stream shows this one, it has shown all before
        changes = []
        deadline = time.monotonic() + 10
        while not any(c["documentKey"]["_id"] == marker.id for c in changes):
            assert time.monotonic() < deadline, changes
            change = stream.try_next()
            if change is not None:
                changes.append(change)
    assert [c["documentKey"]["_id"] for c in changes] == [marker.id]
    assert s.store.find_job(p.id) == before
    with pytest.raises(JobNotFoundError):
        s.update_progress(ObjectId())  # None still checks that the job exists


def test_update_progress_without_rate_limit(scheduler: Scheduler) -> None:
    scheduler.set_options({"progress_rate_limit": 0})
    p = scheduler.add_job("test")
    scheduler.update_progress(p.id, 50.5)
    scheduler.update_progress(p.id, 50.6)
    assert scheduler.get_job(p.id).progress == 50.6


@pytest.mark.parametrize("value", [-0.1, 100.1, 101, "50", True, float("nan")])
def test_update_progress_out_of_range(scheduler: Scheduler, value: Any) -> None:
    p = scheduler.add_job("test")
    with pytest.raises(InvalidArgumentError):
        scheduler.update_progress(p.id, value)
    assert scheduler.get_job(p.id).progress == 0.0


def test_update_progress_unknown_job(scheduler: Scheduler) -> None:
    with pytest.raises(JobNotFoundError):
        scheduler.update_progress(ObjectId(), 10)


def test_default_job_options_from_constructor(db: Any, size_guard: Any) -> None:
    s = Scheduler(
        db,
        options={
            "default_retry": 1,
            "default_at": 1000000,
            "default_retry_interval": 1,
            "default_interval_reference": "start",
            "default_interval": 300,
            "default_timeout": 1,
        },
    )
    opts = s.add_job("test").options
    assert opts["retry"] == 1 and opts["at"] == 1000000 and opts["retry_interval"] == 1
    assert opts["interval_reference"] == "start" and opts["interval"] == 300 and opts["timeout"] == 1


def test_set_options_changes_defaults_and_get_options(scheduler: Scheduler) -> None:
    assert scheduler.set_options({"default_retry": 2, "progress_rate_limit": 100}) is scheduler
    assert scheduler.add_job("test").options["retry"] == 2
    got = scheduler.get_options()
    assert got["progress_rate_limit"] == 100 and got["job_queue"] == "taskscheduler.jobs"
    assert got["job_queue_size"] == 100_000_000 and got["event_queue_size"] == 500_000_000


@pytest.mark.parametrize(
    "options",
    [
        {"foo": "bar"},
        {"job_queue_size": "1"},
        {"job_queue": ""},
        {"default_interval_reference": "x"},
        {"progress_rate_limit": -1},
        {"job_retention": 0},
        {"default_retry": "1"},
    ],
)
def test_invalid_scheduler_options(db: Any, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        Scheduler(db, options=options)
    s = Scheduler(db)
    with pytest.raises(InvalidArgumentError):
        s.set_options(options)
    assert s.get_options()["job_queue"] == "taskscheduler.jobs"


def test_events_on_add_and_cancel(scheduler: Scheduler) -> None:
    seen: list[tuple[str, Any]] = []
    scheduler.on("waiting", lambda name, p: seen.append((name, p.id)))
    scheduler.on("taskscheduler.onCancel", lambda name, p: seen.append((name, p.id)))
    scheduler.on("*", lambda name, p: seen.append(("*" + name, p.id)))
    p = scheduler.add_job("test")
    scheduler.cancel_job(p.id)
    assert seen == [
        ("taskscheduler.onWaiting", p.id),
        ("*taskscheduler.onWaiting", p.id),
        ("taskscheduler.onCancel", p.id),
        ("*taskscheduler.onCancel", p.id),
    ]


def test_on_rejects_unknown_event(scheduler: Scheduler) -> None:
    with pytest.raises(InvalidArgumentError):
        scheduler.on("exploded", lambda *a: None)


def test_custom_emitter_namespace(new_scheduler: Callable[..., Scheduler], size_guard: Any) -> None:
    ns = Namespace()
    got: list[Any] = []
    ns.signal("taskscheduler.onPostponed").connect(
        lambda sender, **kw: got.append((sender, kw["payload"].id)), weak=False
    )
    p = new_scheduler(emitter=ns).add_job("test", at=time.time() + 60)
    assert got == [("taskscheduler.onPostponed", p.id)]


def test_wait_for_already_finished(scheduler: Scheduler) -> None:
    p = scheduler.add_job("test")
    scheduler.cancel_job(p.id)
    stale = Process(p.document(), scheduler)
    scheduler.wait_for([stale], timeout=5)
    assert stale.status == JobStatus.CANCELED


def watching(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once the scheduler opens a change stream (a wait or a listen watches: changes after it are seen)."""
    opened = threading.Event()
    real = scheduler.store.status_feed

    def feed(*args: Any, **kw: Any) -> Any:
        stream = real(*args, **kw)
        opened.set()
        return stream

    monkeypatch.setattr(scheduler.store, "status_feed", feed)
    return opened


def test_wait_for_sees_changes_and_updates_in_place(
    scheduler: Scheduler, new_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = scheduler.add_job("test"), scheduler.add_job("test")
    other = new_scheduler()
    opened = watching(scheduler, monkeypatch)

    def finish() -> None:
        assert opened.wait(10)
        other.cancel_job(a.id)
        wait_until(lambda: seen, what="the first cancel seen by the wait")
        other.cancel_job(b.id)

    seen: list[str] = []
    scheduler.on("cancel", lambda name, p: seen.append(str(p.id)))
    t = threading.Thread(target=finish)
    t.start()
    scheduler.wait_for([a, b, a], timeout=10)
    t.join()
    assert a.status == JobStatus.CANCELED and b.status == JobStatus.CANCELED
    assert seen == [str(a.id), str(b.id)]


def test_wait_for_timeout(scheduler: Scheduler) -> None:
    p = scheduler.add_job("test")
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        scheduler.wait_for([p], timeout=0.5)
    assert time.monotonic() - started < 3
    with pytest.raises(TimeoutError):
        p.wait(timeout=0.2)


def test_wait_for_rejects_non_process(scheduler: Scheduler) -> None:
    with pytest.raises(InvalidArgumentError):
        scheduler.wait_for([ObjectId()])  # type: ignore[list-item]


def test_listen_by_id(
    scheduler: Scheduler, new_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = scheduler.add_job("test")
    q = scheduler.add_job("test")
    calls: list[tuple[ObjectId, JobStatus]] = []
    opened = watching(scheduler, monkeypatch)

    def cancel_later() -> None:
        assert opened.wait(10)
        new_scheduler().cancel_job(q.id)
        new_scheduler().cancel_job(p.id)

    t = threading.Thread(target=cancel_later)
    t.start()
    scheduler.listen(lambda proc: calls.append((proc.id, proc.status)) or True, {"_id": p.id}, timeout=10)
    t.join()
    assert calls == [(p.id, JobStatus.CANCELED)]


def test_listen_timeout(scheduler: Scheduler) -> None:
    with pytest.raises(WaitTimeoutError):
        scheduler.listen(lambda proc: True, {"class": "nothing"}, timeout=0.3)


def test_process_refresh_and_to_dict(scheduler: Scheduler) -> None:
    p = scheduler.add_job("test", {"a": 1})
    scheduler.cancel_job(p.id)
    assert p.status == JobStatus.WAITING
    assert p.refresh() is p and p.status == JobStatus.CANCELED
    d = p.to_dict()
    assert d["_id"] == str(p.id) and d["worker"] is None and d["started"] is None and d["status"] == JobStatus.CANCELED
    assert d["ended"] == p.ended.isoformat() and d["data"] == {"a": 1} and d["status_name"] == "CANCELED"
    json.dumps(d)  # plain JSON-ready
    assert p.error is None and p.result is None


def test_wait_returns_when_the_stream_breaks_before_its_first_answer(
    scheduler: Scheduler, new_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2: wait_for sees the end of a job that ended while its stream's connection dropped before a first answer."""
    other = new_scheduler()  # the worker's process
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id)
    real = scheduler.store.status_feed

    def dropping_feed(*args: Any, **kw: Any) -> StatusFeed:
        feed = real(*args, **kw)
        assert feed._stream is not None
        first = feed._stream.try_next

        def try_next() -> Any:
            monkeypatch.setattr(feed._stream, "try_next", first)
            assert other.lifecycle.end(doc, worker, JobStatus.DONE).record()  # the run ends...
            raise AutoReconnect("connection closed")  # ...and the stream's connection drops

        monkeypatch.setattr(feed._stream, "try_next", try_next)
        return feed

    monkeypatch.setattr(scheduler.store, "status_feed", dropping_feed)
    try:
        p.wait(timeout=5)
    except WaitTimeoutError:
        pytest.fail(f"wait() never saw the end of job {p.id} (stored: {scheduler.get_job(p.id).status.name})")
    assert p.status == JobStatus.DONE


def test_listen_with_a_bad_query_is_an_invalid_argument(scheduler: Scheduler) -> None:
    """SPEC 2: listen's query is get_jobs' filter language: a bad one raises InvalidArgumentError as get_jobs does."""
    with pytest.raises(InvalidArgumentError):
        scheduler.listen(lambda process: True, {"status": {"$bogus": 1}}, timeout=3)


def _waiting_in_thread(scheduler: Scheduler, process: Any, monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
    """Start process.wait() in a thread; return once it has read the job and watches the stream."""
    ready = threading.Event()
    real = scheduler._read_pending

    def read(wait: Any, ids: Any) -> None:
        real(wait, ids)
        ready.set()

    monkeypatch.setattr(scheduler, "_read_pending", read)
    waiter = threading.Thread(target=lambda: process.wait(timeout=15))
    waiter.start()
    assert ready.wait(10)
    return waiter


def test_own_cancel_fires_once_while_waiting(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 2 events: each status change fires once per observer, also its own cancel_job during a wait_for."""
    fired: list[ObjectId] = []
    scheduler.on("cancel", lambda name, process: fired.append(process.id))
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 60})
    waiter = _waiting_in_thread(scheduler, scheduler.get_job(p.id), monkeypatch)
    scheduler.cancel_job(p.id)
    waiter.join(15)
    assert not waiter.is_alive()
    assert fired == [p.id], f"cancel fired {len(fired)} times"


def test_a_second_claim_of_a_released_run_fires_while_waiting(
    scheduler: Scheduler, new_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2 events: two changes to the same status in one run both fire during a wait_for."""
    seen: list[str] = []
    scheduler.on("*", lambda name, process: seen.append(name.removeprefix("taskscheduler.on").lower()))
    other = new_scheduler()  # the queue nodes' side
    p = other.add_job("sample_jobs:Noop")
    waiter = _waiting_in_thread(scheduler, scheduler.get_job(p.id), monkeypatch)
    doc, worker_a = claim(other, p.id)
    assert other.lifecycle.release(doc, worker_a, orphaned=True, reason="node died").record()
    doc, worker_b = claim(other, p.id)
    assert other.lifecycle.end(doc, worker_b, JobStatus.DONE).record()
    waiter.join(15)
    assert not waiter.is_alive()
    assert seen == ["processing", "waiting", "processing", "done"]


def test_add_job_once_with_cron_and_at_is_idempotent(scheduler: Scheduler) -> None:
    """SPEC 2: add_job_once of a cron job with an `at` returns the active job (its stored `at` is the first match)."""
    at = time.time() + 2 * 86400
    first = scheduler.add_job_once(sample_jobs.Noop, {"k": 1}, cron="0 3 * * *", at=at)
    second = scheduler.add_job_once(sample_jobs.Noop, {"k": 1}, cron="0 3 * * *", at=at)
    assert second.id == first.id, "the same add_job_once replaced the cron job"
    assert first.refresh().status == JobStatus.POSTPONED


def test_progress_during_an_outage_is_dropped_not_raised(
    server: EmbeddedServer, db_name: str, client: MongoClient[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """A MongoDB outage drops a running job's progress with a warning; it never fails the job."""
    outage_client: MongoClient[dict[str, Any]] = MongoClient(
        server.uri, tz_aware=True, appname="progress-outage", serverSelectionTimeoutMS=2000
    )
    scheduler = Scheduler(outage_client[db_name])
    p = scheduler.add_job("sample_jobs:Noop")
    _, worker = claim(scheduler, p.id)
    scheduler = scheduler.for_run(RunContext(worker, p.id, 1))  # as inside the worker that runs it
    client.admin.command(
        "configureFailPoint",
        "failCommand",
        mode="alwaysOn",
        data={"failCommands": ["update"], "closeConnection": True, "appName": "progress-outage"},
    )
    try:
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="taskscheduler"):
            scheduler.update_progress(p.id, 50)
        assert time.monotonic() - began < 10
        assert "not stored (MongoDB unreachable)" in caplog.text
    finally:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
        outage_client.close()


def test_a_postponed_time_is_stored_with_milliseconds(scheduler: Scheduler) -> None:
    at = time.time() + 100.375
    p = scheduler.add_job("sample_jobs:Noop", at=at)
    assert scheduler.get_job(p.id).options["at"] == pytest.approx(at, abs=0.001)


def test_wait_for_rereads_after_a_stream_gap(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    """wait_for reads the jobs again after a gap in its stream, so it returns when a job ended in the gap."""
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id)
    opened: list[StatusFeed] = []
    real = scheduler.store.status_feed

    def deaf_feed(*args: Any, **kw: Any) -> StatusFeed:
        feed = real(*args, **kw)
        opened.append(feed)
        monkeypatch.setattr(feed, "poll", lambda timeout: time.sleep(min(timeout, 0.05)))  # hears nothing
        return feed

    monkeypatch.setattr(scheduler.store, "status_feed", deaf_feed)
    waiter = threading.Thread(target=lambda: p.wait(timeout=20))
    waiter.start()
    wait_until(lambda: opened, 10, what="wait() to watch")
    assert scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record()
    opened[0].gaps += 1  # the stream restarted without its token: whatever it missed is gone
    waiter.join(20)
    assert not waiter.is_alive() and p.status == JobStatus.DONE


def test_listen_understands_expr_filters(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    doc, worker = claim(scheduler, p.id)
    seen: list[JobStatus] = []
    timer = threading.Timer(0.5, lambda: scheduler.lifecycle.end(doc, worker, JobStatus.DONE).record())
    timer.start()
    try:
        scheduler.listen(
            lambda process: seen.append(process.status) or True,
            {"$expr": {"$eq": ["$status", int(JobStatus.DONE)]}, "_id": p.id},
            timeout=15,
        )
    except WaitTimeoutError:
        pytest.fail("listen() never matched an $expr filter")
    finally:
        timer.join()
    assert seen == [JobStatus.DONE]


def test_set_options_through_a_run_view_keeps_one_store(new_scheduler: Callable[..., Scheduler]) -> None:
    """A job's code that changes options through its run's view changes its worker's Scheduler as a whole: the
    worker reads and gives back room through the store its lifecycle uses."""
    worker_scheduler = new_scheduler()
    view = worker_scheduler.for_run(RunContext(ObjectId(), ObjectId(), 1))
    view.set_options({"progress_rate_limit": 0})
    assert worker_scheduler.store is worker_scheduler.lifecycle.store is view.store
