"""The waiting jobs a node leaves to their preferred node for a while (see peers.py): each ripens after its delay,
and a ripe one goes to a free worker of this node, in the order a node starts jobs. A job claimed meanwhile (by
its preferred node, most often) is dropped as soon as its change arrives, and never costs this node a claim."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from .backlog import start_order


class Deferred:
    """Job documents keyed by id, each with the moment (``time.monotonic()``) from which this node may claim it."""

    def __init__(self) -> None:
        self._docs: dict[Any, tuple[int, dict[str, Any]]] = {}  # job -> (entry number, document)
        self._unripe: list[tuple[float, int, Any]] = []  # (ripe at, entry, job)
        self._ripe: list[tuple[tuple[int, float, Any], int, Any]] = []  # (start order, entry, job)
        self._entries = itertools.count()

    def __len__(self) -> int:
        return len(self._docs)

    def __bool__(self) -> bool:
        return bool(self._docs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._docs

    def add(self, doc: dict[str, Any], ripe_at: float) -> None:
        """Hold ``doc`` until ``ripe_at`` (a newer document of the same job replaces the older one)."""
        entry = next(self._entries)
        self._docs[doc["_id"]] = (entry, doc)
        heapq.heappush(self._unripe, (ripe_at, entry, doc["_id"]))

    def drop(self, job_id: Any) -> dict[str, Any] | None:
        """Forget a job (claimed elsewhere, no longer waiting): its heap entries are skipped lazily."""
        held = self._docs.pop(job_id, None)
        if not self._docs:
            self._unripe.clear()
            self._ripe.clear()
        return held[1] if held is not None else None

    def next_ripe(self) -> float | None:
        """When the next job ripens (``time.monotonic()``), or None when none is left to ripen."""
        while self._unripe and self._stale(self._unripe[0][1], self._unripe[0][2]):
            heapq.heappop(self._unripe)
        return self._unripe[0][0] if self._unripe else None

    def ripe(self, now: float) -> bool:
        """Whether a job is ripe at ``now``."""
        self._ripen(now)
        return bool(self._ripe)

    def take(self, now: float, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` ripe jobs, first in the order a node starts jobs; they leave the structure."""
        self._ripen(now)
        taken: list[dict[str, Any]] = []
        while self._ripe and len(taken) < count:
            _, entry, job_id = heapq.heappop(self._ripe)
            if self._stale(entry, job_id):
                continue
            taken.append(self._docs.pop(job_id)[1])
        return taken

    def _ripen(self, now: float) -> None:
        while self._unripe and self._unripe[0][0] <= now:
            _, entry, job_id = heapq.heappop(self._unripe)
            if not self._stale(entry, job_id):
                heapq.heappush(self._ripe, (start_order(self._docs[job_id][1]), entry, job_id))

    def _stale(self, entry: int, job_id: Any) -> bool:
        held = self._docs.get(job_id)
        return held is None or held[0] != entry
