"""The waiting jobs a node leaves to their preferred node for a while (see peers.py): each ripens after its delay,
and a ripe one goes to a free worker of this node, in the order a node starts jobs. A job claimed meanwhile (by
its preferred node, most often) is dropped as soon as its change arrives, and never costs this node a claim."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from ..store.views import JobView
from .backlog import start_order

_Order = tuple[int, float, Any]


class Deferred:
    """Job documents keyed by id, each with the moment (``time.monotonic()``) from which this node may claim it.
    A job that needs no free worker (``counted=False``: force_spawn, which gets a worker of its own) goes as soon
    as it is ripe, whatever the count asked for."""

    def __init__(self) -> None:
        self._docs: dict[Any, tuple[int, dict[str, Any], bool]] = {}  # job -> (entry number, document, counted)
        self._unripe: list[tuple[float, int, Any]] = []  # (ripe at, entry, job)
        self._ripe: list[tuple[_Order, int, Any]] = []  # (start order, entry, job): counted ones
        self._ripe_free: list[tuple[_Order, int, Any]] = []  # ... and the ones that need no free worker
        self._all: list[tuple[_Order, int, Any]] = []  # every one, ripe or not, in start order
        self._entries = itertools.count()

    def __len__(self) -> int:
        return len(self._docs)

    def __bool__(self) -> bool:
        return bool(self._docs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._docs

    def add(self, doc: dict[str, Any], ripe_at: float, counted: bool = True) -> None:
        """Hold ``doc`` until ``ripe_at`` (a newer document of the same job replaces the older one)."""
        entry, job_id = next(self._entries), JobView(doc).id
        self._docs[job_id] = (entry, doc, counted)
        heapq.heappush(self._unripe, (ripe_at, entry, job_id))
        heapq.heappush(self._all, (start_order(doc), entry, job_id))
        if len(self._all) > 2 * len(self._docs) + 64:  # entries of jobs taken or dropped: keep it bounded
            self._all = [item for item in self._all if not self._stale(item[1], item[2])]
            heapq.heapify(self._all)

    def drop(self, job_id: Any) -> dict[str, Any] | None:
        """Forget a job (claimed elsewhere, no longer waiting): its heap entries are skipped lazily."""
        held = self._docs.pop(job_id, None)
        if not self._docs:
            for heap in (self._unripe, self._ripe, self._ripe_free, self._all):
                heap.clear()
        return held[1] if held is not None else None

    def next_ripe(self, now: float) -> float | None:
        """When the next job ripens after ``now`` (``time.monotonic()``), or None when none is left to ripen (the
        ripe ones wait for a free worker: what frees one wakes the node)."""
        self._ripen(now)
        return self._unripe[0][0] if self._unripe else None

    def take(self, now: float, count: int) -> list[dict[str, Any]]:
        """The ripe jobs that need no free worker, and up to ``count`` others, first in the order a node starts jobs;
        they leave the structure."""
        self._ripen(now)
        taken = self._pop(self._ripe_free, len(self._docs))
        return taken + self._pop(self._ripe, count)

    def take_before(self, order: _Order, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` jobs, ripe or not, of a higher priority than a job of start order ``order``: they go to a
        free worker before it, as a node starts jobs (a busy preferred node does not make a job of a higher priority
        wait behind a lower one here)."""
        taken: list[dict[str, Any]] = []
        while self._all and len(taken) < count:
            first, entry, job_id = self._all[0]
            if self._stale(entry, job_id):
                heapq.heappop(self._all)
                continue
            if first[0] >= order[0]:
                break
            heapq.heappop(self._all)
            taken.append(self._docs.pop(job_id)[1])
        return taken

    def _pop(self, heap: list[tuple[_Order, int, Any]], count: int) -> list[dict[str, Any]]:
        taken: list[dict[str, Any]] = []
        while heap and len(taken) < count:
            _, entry, job_id = heapq.heappop(heap)
            if not self._stale(entry, job_id):
                taken.append(self._docs.pop(job_id)[1])
        return taken

    def _ripen(self, now: float) -> None:
        while self._unripe and (self._unripe[0][0] <= now or self._stale(self._unripe[0][1], self._unripe[0][2])):
            _, entry, job_id = heapq.heappop(self._unripe)
            if not self._stale(entry, job_id):
                _, doc, counted = self._docs[job_id]
                heapq.heappush(self._ripe if counted else self._ripe_free, (start_order(doc), entry, job_id))

    def _stale(self, entry: int, job_id: Any) -> bool:
        held = self._docs.get(job_id)
        return held is None or held[0] != entry
