"""The jobs a worker manager holds for its next free worker: higher priority first, first due first out within
one priority."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from bson import ObjectId

from .. import options as o
from ..store.views import JobView
from .protocol import RunJob


def priority_of(task: RunJob) -> int:
    return -start_order(task.doc)[0]


def _options(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The job's options, or none when the stored value is no document (a malformed job still takes its place)."""
    return JobView(doc).options


class Backlog:
    """A priority queue of RunJob messages keyed by job id (a job is held once; a newer message replaces an
    older one). Within a priority, the job due first goes first: its ``at`` (a postponed, retried or interval
    run), else its creation. The order is the job's own, not its arrival's: a job put back after a failed hand-
    over, or released by a dead worker, is back in its place. Removal is lazy: stale heap entries are skipped."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, ObjectId]] = []
        self._tasks: dict[ObjectId, tuple[tuple[int, float, ObjectId], RunJob]] = {}  # job -> (key, message)

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._tasks

    def add(self, task: RunJob) -> None:
        key = _key(task)
        held = self._tasks.get(key[2])
        self._tasks[key[2]] = (key, task)
        if held is None or held[0] != key:
            heapq.heappush(self._heap, key)

    def put_back(self, task: RunJob) -> None:
        """A job that could not be handed over: in its place again."""
        self.add(task)

    def discard(self, job_id: ObjectId) -> None:
        self._tasks.pop(job_id, None)
        if not self._tasks:
            self._heap.clear()

    def pop(self) -> RunJob:
        """The next job to run (IndexError when empty)."""
        while self._heap:
            key = heapq.heappop(self._heap)
            held = self._tasks.get(key[2])
            if held is not None and held[0] == key:
                del self._tasks[key[2]]
                return held[1]
        raise IndexError("the backlog is empty")


def _key(task: RunJob) -> tuple[int, float, ObjectId]:
    return start_order(task.doc)


def start_order(doc: Mapping[str, Any]) -> tuple[int, float, ObjectId]:
    """Where a job stands in the order a node starts jobs (smallest first): higher priority first, then the one due
    first (its ``at``, else its creation), then by id."""
    job_id: ObjectId = JobView(doc).id
    value: Any = _options(doc).get(o.PRIORITY, 0)
    priority = value if isinstance(value, int) and not isinstance(value, bool) else 0
    return (-priority, _due(doc, job_id), job_id)


def _due(doc: Any, job_id: ObjectId) -> float:
    at = _options(doc).get(o.AT)
    if isinstance(at, (int, float)) and not isinstance(at, bool) and math.isfinite(at) and at > 0:
        return float(at)  # NaN would make the heap unordered
    created = JobView(doc).created_value
    if isinstance(created, datetime):
        return created.timestamp()
    return job_id.generation_time.timestamp() if isinstance(job_id, ObjectId) else 0.0
