"""The event catalogue, and emitters shared between a Scheduler and a Queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from blinker import Namespace
from bson import ObjectId
from pymongo.database import Database

from helpers import wait_until, worker_factory
from taskscheduler import JobStatus, Queue, Scheduler, events
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.ops.embedded import EmbeddedServer


def test_names() -> None:
    assert events.resolve("waiting") == "taskscheduler.onWaiting"
    assert events.resolve("taskscheduler.onWorkerKill") == "taskscheduler.onWorkerKill"
    assert events.STATUS_EVENTS[JobStatus.CANCELED] == "taskscheduler.onCancel"
    assert events.STATUS_EVENTS[JobStatus.TIMEOUT] == "taskscheduler.onTimeout"
    with pytest.raises(InvalidArgumentError):
        events.resolve("onWaiting")


def test_emitter_calls_specific_then_all() -> None:
    emitter = events.Emitter()
    got: list[tuple[str, str, Any]] = []
    emitter.on("done", lambda name, p: got.append(("done", name, p)))
    emitter.on("*", lambda name, p: got.append(("*", name, p)))
    emitter.emit_status(JobStatus.DONE, "payload")
    emitter.emit(events.WORKER_SPAWN, {"pid": 1})
    assert got == [
        ("done", "taskscheduler.onDone", "payload"),
        ("*", "taskscheduler.onDone", "payload"),
        ("*", "taskscheduler.onWorkerSpawn", {"pid": 1}),
    ]
    with pytest.raises(InvalidArgumentError):
        events.Emitter(object())  # type: ignore[arg-type]


def test_a_shared_emitter_fires_each_change_once(
    db: Database[dict[str, Any]], server: EmbeddedServer, new_scheduler: Callable[..., Scheduler]
) -> None:
    """A Scheduler and a Queue sharing one emitter fire each status change once."""
    shared = Namespace()
    seen: list[tuple[str, ObjectId]] = []
    scheduler = new_scheduler(emitter=shared)
    queue = Queue(scheduler, db, worker_factory(server.uri, db.name), emitter=shared)
    queue.on("*", lambda name, process: seen.append((name, process.id)))
    with scheduler.store.status_feed(lookup=True) as feed:
        p = scheduler.add_job("sample_jobs:Noop")
        change = wait_until(lambda: feed.poll(0.5), 10, what="the insert in the stream")
        queue._on_change(change)
    assert seen == [("taskscheduler.onWaiting", p.id)]
