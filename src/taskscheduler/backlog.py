"""The jobs a worker manager holds for its next free worker: higher priority first, first in first out within
one priority."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from bson import ObjectId

from . import options as o
from .protocol import RunJob


def priority_of(task: RunJob) -> int:
    value: Any = (task.doc.get("options") or {}).get(o.PRIORITY, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Backlog:
    """A priority queue of RunJob messages keyed by job id (a job is held once; a newer message replaces an
    older one in place). Removal is lazy: stale heap entries are skipped when they surface."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, ObjectId]] = []
        self._tasks: dict[ObjectId, tuple[int, RunJob]] = {}  # job -> (sequence, message)
        self._order = itertools.count(1)
        self._front = itertools.count(-1, -1)  # sequences of jobs put back: ahead of their priority's others

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._tasks

    def add(self, task: RunJob) -> None:
        job_id = task.doc["_id"]
        held = self._tasks.get(job_id)
        if held is not None and priority_of(held[1]) == priority_of(task):
            self._tasks[job_id] = (held[0], task)  # same place in the line, newer document
            return
        self._push(task, next(self._order))

    def put_back(self, task: RunJob) -> None:
        """A job that could not be handed over: first again among its priority."""
        self._push(task, next(self._front))

    def discard(self, job_id: ObjectId) -> None:
        self._tasks.pop(job_id, None)
        if not self._tasks:
            self._heap.clear()

    def pop(self) -> RunJob:
        """The next job to run (IndexError when empty)."""
        while self._heap:
            _, seq, job_id = heapq.heappop(self._heap)
            held = self._tasks.get(job_id)
            if held is not None and held[0] == seq:
                del self._tasks[job_id]
                return held[1]
        raise IndexError("the backlog is empty")

    def _push(self, task: RunJob, seq: int) -> None:
        job_id = task.doc["_id"]
        self._tasks[job_id] = (seq, task)
        heapq.heappush(self._heap, (-priority_of(task), seq, job_id))
