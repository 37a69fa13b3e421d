"""The storage model: collections, indexes, capped rules (SPEC section 5), flush() racing a writer, query plans."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import bson
import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.database import Database

from helpers import (
    Recorder,
    SizeGuard,
    claim,
    unindexed,
)
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import KillReason
from taskscheduler.errors import InvalidArgumentError, QueueFullError, ServerUnavailableError
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import (
    ID_BATCH,
    fields_equal,
    fingerprint,
    literal,
    same_value,
    utcnow,
    with_prefix,
)


def test_collections_are_capped_by_default_with_named_indexes(scheduler: Scheduler, db: Any) -> None:
    p = scheduler.add_job("test")
    infos = {c["name"]: c["options"] for c in db.list_collections()}
    assert infos["taskscheduler.jobs"].get("capped") is True
    assert infos["taskscheduler.jobs"].get("size") == 100_000_000
    assert infos["taskscheduler.events"].get("capped") is True
    names = set(db["taskscheduler.jobs"].index_information())
    assert {"status_expires", "class_status", "class_key_status", "parent_status"} <= names
    assert "once_active" not in names  # add_job_once keys live in taskscheduler.jobs.once
    assert "status_alive" not in names and "ended_ttl" not in names
    events = db["taskscheduler.events"].index_information()
    assert events["job_run"]["key"] == [("job", 1), ("run", 1)] and "time_ttl" not in events
    assert db["taskscheduler.jobs"].index_information()["status_expires"]["key"] == [("status", 1), ("expires", 1)]
    # The room ledger of the capped job collection holds the bytes its documents use.
    stored = db["taskscheduler.jobs"].find_one({"_id": p.id})
    ledger = db["taskscheduler.jobs.room"].find_one({"_id": "used"})
    # A producer's first reservation is its job's size: one that adds a single job holds no room it does not use.
    assert ledger == {"_id": "used", "bytes": len(bson.encode(stored))}
    scheduler.store._ready = False
    scheduler.store.ensure()  # idempotent
    assert set(db["taskscheduler.jobs"].index_information()) == names
    assert db["taskscheduler.events"].index_information() == events


def test_size_zero_means_ordinary_collections_with_ttl(db: Any) -> None:
    s = Scheduler(
        db,
        options={
            "job_queue": "plain.jobs",
            "job_queue_size": 0,
            "event_queue": "plain.events",
            "event_queue_size": 0,
            "job_retention": 3600,
        },
    )
    s.add_job("test")
    infos = {c["name"]: c["options"] for c in db.list_collections()}
    assert not infos["plain.jobs"].get("capped") and not infos["plain.events"].get("capped")
    ttl = db["plain.jobs"].index_information()["ended_ttl"]
    assert ttl["expireAfterSeconds"] == 3600
    assert db["plain.events"].index_information()["time_ttl"]["expireAfterSeconds"] == 3600


def test_one_event_document_per_status_change(scheduler: Scheduler) -> None:
    p = scheduler.add_job("test")
    scheduler.cancel_job(p.id)
    events = scheduler.store.job_events(p.id)
    assert [e["status"] for e in events] == [JobStatus.CANCELED]  # creation is the job document itself
    assert all(e["class"] == "test" for e in events)


def test_a_status_change_that_lost_its_race_changes_nothing(scheduler: Scheduler) -> None:
    store = scheduler.store
    p = scheduler.add_job("test")
    winner, loser = ObjectId(), ObjectId()
    assert store.claim(p.id, winner, 30.0) is not None
    before = store.find_job(p.id)
    done = {"status": literal(int(JobStatus.DONE)), "ended": literal(utcnow()), "progress": literal(100.0)}
    with store.status_feed(ids=[p.id]) as feed:
        assert store.claim(p.id, loser, 30.0) is None  # no longer WAITING
        owned_by_loser = fields_equal({"status": int(JobStatus.PROCESSING), "worker": loser})
        assert not store.transition(p.id, owned_by_loser, done)
        assert store.find_job(p.id) == before
        owned_by_winner = fields_equal({"status": int(JobStatus.PROCESSING), "worker": winner})
        assert store.transition(p.id, owned_by_winner, done)
        assert not store.transition(p.id, owned_by_winner, done)  # no longer PROCESSING: changes nothing
        change = feed.poll(5)
    assert change is not None and change.status == JobStatus.DONE  # the first status change the feed saw
    after = store.find_job(p.id)
    assert after["worker"] == winner and after["status"] == JobStatus.DONE and after["progress"] == 100.0


def test_queue_full_instead_of_evicting_unfinished_jobs(db: Any, new_scheduler: Callable[..., Scheduler]) -> None:
    s = new_scheduler({"job_queue": "small.jobs", "job_queue_size": 4096})
    added = []
    with pytest.raises(QueueFullError, match="small.jobs"):
        for _ in range(100):
            added.append(s.add_job("test", "x" * 300))
    jobs = db["small.jobs"]
    assert jobs.count_documents({}) == len(added) > 3
    assert {d["_id"] for d in jobs.find()} == {p.id for p in added}
    for p in added:  # finished jobs may be evicted to make room
        s.cancel_job(p.id)
    more = [s.add_job("test", "y" * 300) for _ in range(len(added))]
    assert {d["_id"] for d in jobs.find({"status": 0})} == {p.id for p in more}


def test_size_guard_catches_a_size_change(db: Any, new_scheduler: Callable[..., Scheduler]) -> None:
    guard = SizeGuard(db, "taskscheduler.jobs")
    p = new_scheduler().add_job("test")
    db["taskscheduler.jobs"].update_one({"_id": p.id}, {"$set": {"status": "a longer value than an int"}})
    with pytest.raises(AssertionError, match="sizes changed"):
        guard.verify()


def test_lifecycle_updates_keep_the_document_size(scheduler: Scheduler, size_guard: SizeGuard) -> None:
    p = scheduler.add_job("test", {"k": [1, 2, 3]}, retry=1, retry_interval=60)
    life, store = scheduler.lifecycle, scheduler.store
    worker = ObjectId()
    assert store.claim(p.id, worker, 30.0) is not None
    assert store.claim(p.id, ObjectId(), 30.0) is None  # already owned
    assert store.set_progress(p.id, 12.5, worker, None)
    assert not store.set_progress(p.id, 50.0, ObjectId(), None)  # not the owner
    assert not store.heartbeat({p.id: worker})  # renewed: nothing lost
    assert p.id in store.heartbeat({p.id: ObjectId()})  # not held by that worker
    # Released (orphaned), claimed again, failed: its retry is written into the same document (POSTPONED).
    assert life.release(store.find_job(p.id), worker, orphaned=True, reason="test").record()
    worker = ObjectId()
    doc = store.claim(p.id, worker, 30.0)
    assert doc is not None
    assert life.end(doc, worker, JobStatus.FAILED, error={"class": "E", "message": "m" * 500}).record()
    postponed = store.find_job(p.id)
    assert postponed["status"] == JobStatus.POSTPONED and postponed["run"] == 2
    assert life.unpostpone(postponed)
    scheduler.cancel_job(p.id)
    assert scheduler.requeue_job(p.id).run == 3
    worker = ObjectId()
    doc = store.claim(p.id, worker, 30.0)
    assert doc is not None
    assert life.end(doc, worker, JobStatus.DONE, result="r" * 1000, has_result=True).record()
    assert store.find_job(p.id)["status"] == JobStatus.DONE
    size_guard.verify()
    assert size_guard.checked_updates >= 10


def test_steady_state_queries_are_served_by_indexes(recorded: tuple[Database[dict[str, Any]], Recorder]) -> None:
    db, recorder = recorded
    s = Scheduler(db, options={"progress_rate_limit": 0})
    store, life = s.store, s.lifecycle
    parent = s.add_job("test")
    child = s.add_job("test", {"parent": parent.id})
    once = s.add_job_once("test", {"a": 1}, {"retry": 1})
    s.add_job_once("test", {"a": 1}, {"retry": 1})
    later = s.add_job("test", {"later": 1}, at=time.time() + 3600)
    s.get_job(child.id)
    s.update_progress(child.id, 10)
    worker = ObjectId()
    claimed = store.claim(parent.id, worker, 30.0)
    store.heartbeat({parent.id: worker})
    life.orphans()
    list(store.scan((JobStatus.WAITING, JobStatus.POSTPONED)))
    store.children(parent.id, active_only=True)
    s.cancel_job(once.id)
    s.wait_for([s.get_job(once.id)], timeout=5)
    s.get_job(once.id).runs()
    recorder.commands.clear()
    s.cancel_job(child.id)
    s.add_job_once("test", {"a": 2})
    assert claimed is not None
    assert life.end(claimed, worker, JobStatus.FAILED, error={"class": "E", "message": "m"}).record()
    s.requeue_job(parent.id)
    assert store.claim(parent.id, worker, 30.0) is not None
    store.heartbeat({parent.id: worker})
    life.orphans()
    assert life.unpostpone(store.find_job(later.id))
    list(store.scan((JobStatus.WAITING, JobStatus.POSTPONED)))
    store.children(parent.id)
    s.wait_for([s.get_job(child.id)], timeout=5)
    assert s.get_job(child.id).runs()[0]["status"] == JobStatus.CANCELED
    assert s.get_job(parent.id).error is not None
    count, slow = unindexed(db, recorder.commands)
    assert count >= 10
    assert slow == [], "\n".join(map(str, slow))


def test_recording_a_killed_workers_end_is_served_by_indexes(
    recorded: tuple[Database[dict[str, Any]], Recorder],
) -> None:
    """What a node records after a kill (a timeout, a dead worker) is steady state too: every timeout does it."""
    db, recorder = recorded
    s = Scheduler(db)
    store, life = s.store, s.lifecycle
    timed, died = s.add_job("test", retry=1, retry_interval=0), s.add_job("test")
    workers = {timed.id: ObjectId(), died.id: ObjectId()}
    for job_id, worker in workers.items():
        doc = store.claim(job_id, worker, 30.0)
        assert doc is not None
        store.insert_events(life.end(doc, worker, JobStatus.DONE).events)  # written, then the worker died
    recorder.commands.clear()
    life.after_kill(timed.id, workers[timed.id], 1, "timeout", 1).record()
    life.after_kill(died.id, workers[died.id], 1, KillReason.DIED, 0, "worker process died (signal 9)").record()
    assert [r["status"] for r in s.get_job(timed.id).runs()] == [JobStatus.TIMEOUT]
    assert store.find_job(died.id)["status"] == JobStatus.WAITING
    count, slow = unindexed(db, recorder.commands)
    assert count >= 4
    assert slow == [], "\n".join(map(str, slow))


def test_many_jobs_are_read_by_id_in_batches(recorded: tuple[Database[dict[str, Any]], Recorder]) -> None:
    db, recorder = recorded
    s = Scheduler(db, options={"job_queue_size": 0, "event_queue_size": 0})
    added = [s.add_job("test") for _ in range(ID_BATCH * 2 + 5)]
    recorder.commands.clear()
    found = list(s.store.find_by_ids([p.id for p in added] + [ObjectId()]))
    assert sorted(d["_id"] for d in found) == sorted(p.id for p in added)
    sizes = [len(cmd["filter"]["_id"]["$in"]) for name, cmd in recorder.commands if name == "find"]
    assert sizes == [ID_BATCH, ID_BATCH, 6]


def test_helpers() -> None:
    assert fingerprint("c", {"a": 1, "b": 2}) == fingerprint("c", {"b": 2, "a": 1})
    assert fingerprint("c", {"a": 1}) != fingerprint("c", {"a": 2})
    assert same_value({"a": [{"x": 1, "y": 2}]}, {"a": [{"y": 2, "x": 1}]})
    assert with_prefix({"_id": 1, "$or": [{"status": 2}, {"class": "x"}]}, "fullDocument.") == {
        "fullDocument._id": 1,
        "$or": [{"fullDocument.status": 2}, {"fullDocument.class": "x"}],
    }


def test_every_index_fits_the_documented_shard_keys(db: Any, new_scheduler: Callable[..., Scheduler]) -> None:
    """MongoDB requires a unique index on a sharded collection to start with the shard key."""
    from taskscheduler.store import shard_keys

    s = new_scheduler({"job_queue_size": 0, "event_queue_size": 0})
    s.add_job_once("test", {"a": 1})  # creates every collection the library uses
    keys = shard_keys(s.store.job_queue, s.store.event_queue)
    assert set(keys) <= set(db.list_collection_names())
    for collection, key in keys.items():
        for index in db[collection].list_indexes():
            if index["name"] == "_id_" or not index.get("unique"):
                continue
            prefix = list(index["key"])[: len(key)]
            assert prefix == list(key), f"{collection}.{index['name']} is unique but not prefixed by {key}"
    for collection in keys:
        assert not any(i.get("unique") for i in db[collection].list_indexes() if i["name"] != "_id_")


def test_a_stale_add_job_once_key_is_taken_over(scheduler: Scheduler) -> None:
    """A caller that took a key and died before inserting its job does not block the key for ever."""

    key = fingerprint("test", {"a": 1})
    scheduler.store.ensure()
    scheduler.store.once.insert_one({"_id": key, "job": ObjectId(), "since": utcnow() - timedelta(minutes=5)})
    p = scheduler.add_job_once("test", {"a": 1})
    assert scheduler.store.once_holder(key)["job"] == p.id
    assert scheduler.add_job_once("test", {"a": 1}).id == p.id


def test_a_requeued_once_job_needs_its_key(scheduler: Scheduler) -> None:
    first = scheduler.add_job_once("test", "k")
    scheduler.cancel_job(first.id)
    second = scheduler.add_job_once("test", "k")
    assert second.id != first.id
    with pytest.raises(InvalidArgumentError, match="add_job_once key"):
        scheduler.requeue_job(first.id)
    scheduler.cancel_job(second.id)
    assert scheduler.requeue_job(first.id).status == JobStatus.WAITING
    assert scheduler.add_job_once("test", "k").id == first.id


def test_a_reservation_that_races_the_ledgers_creation_is_tried_again(
    new_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two producers on a new collection: the first finds no ledger to reserve in, the second opens it right then;
    the first must reserve again, not report a collection with 100 MB free as full."""
    first, second = new_scheduler(), new_scheduler()
    real = first.store.room.update_one
    tries: list[int] = []
    raced: list[Any] = []

    def racing(query: Any, update: Any, *args: Any, **kw: Any) -> Any:
        result = real(query, update, *args, **kw)
        if "$inc" in update and result.modified_count == 0:
            tries.append(1)
            if not raced:  # it found no ledger; the ledger is opened before we look at it
                raced.append(second.add_job("test"))
        return result

    monkeypatch.setattr(first.store.room, "update_one", racing)
    p = first.add_job("test")
    assert raced and first.get_job(p.id).status == JobStatus.WAITING


def test_flush_while_a_worker_records_keeps_the_event_collection_bounded(
    db: Database[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, new_scheduler: Callable[..., Scheduler]
) -> None:
    """SPEC 2/5: a run's end written between flush()'s drop and create leaves the event collection bounded."""
    operator, worker_side = new_scheduler(), new_scheduler()
    p = worker_side.add_job("sample_jobs:Noop")
    doc, worker = claim(worker_side, p.id)
    real_drop = operator.store.events.drop

    def drop_then_a_run_ends(*args: Any, **kw: Any) -> None:
        real_drop(*args, **kw)
        monkeypatch.setattr(operator.store.events, "drop", real_drop)  # the race happens once
        worker_side.lifecycle.end(doc, worker, JobStatus.DONE).record()  # a worker records its run's end

    monkeypatch.setattr(operator.store.events, "drop", drop_then_a_run_ends)
    operator.flush()
    options = {c["name"]: c.get("options", {}) for c in db.list_collections()}
    ttl = [i for i in db["taskscheduler.events"].list_indexes() if "expireAfterSeconds" in i]
    assert options["taskscheduler.events"].get("capped") or ttl, "the event collection is now unbounded"


def test_a_uri_naming_another_replica_set_says_what_to_check(server: EmbeddedServer) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(
        f"mongodb://127.0.0.1:{server.port}/?replicaSet=rs0&serverSelectionTimeoutMS=500"
    )
    try:
        with pytest.raises(ServerUnavailableError) as caught:
            Scheduler(client["wrong_set"]).add_job("sample_jobs:Noop")
    finally:
        client.close()
    message = str(caught.value)
    assert "a set named 'rs0': check replicaSet= in the URI" in message and "'secantus'" in message
    assert len(message.splitlines()) == 1
