"""The event catalogue."""

from __future__ import annotations

from typing import Any

import pytest

from taskscheduler import JobStatus, events
from taskscheduler.errors import InvalidArgumentError


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
