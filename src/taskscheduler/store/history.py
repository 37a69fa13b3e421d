"""A job's events in the order they happened.

Events are stamped by the processes that write them, each on its own estimate of the server's clock (see
:mod:`taskscheduler.clock`), and two estimates may differ by their round trips: tens of milliseconds on a loaded
machine. Sorted by time alone, a node's release of a run can then come after the claim that followed it (a sweep
at 12.340 by one node, the next claim at 12.310 by a worker of another). The order of a run's claims is known all
the same, and three rules place the other events around them:

- Whatever ends a worker's hold on a run (its end, a release, another node's sweep, a hold for a verdict) is a
  change from "owned by that worker": it happened after that worker's claim and before the run's next claim.
  It cannot come before a claim of that worker either, and a worker that claimed the run again had ended its
  earlier hold first.
- The WAITING or POSTPONED event the previous run's end wrote for this run comes before the run's first claim.
- What names no claim of the run (a postponed run coming due, a held run's verdict, a cancel of a run that was
  put back) cannot have happened while a worker held the run: stamped inside a hold, it is listed next to the
  nearer edge of that hold (a cancel: after its end).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from datetime import datetime
from itertools import groupby
from typing import Any, TypeVar

from bson import ObjectId

from ..constants import JobStatus

Event = TypeVar("Event", bound=Mapping[str, Any])

#: Statuses of the events that make a run claimable (or about to be).
_OPENING = (int(JobStatus.WAITING), int(JobStatus.POSTPONED))


def in_order(events: Sequence[Event]) -> list[Event]:
    """``events`` of one job as sorted by (run, time), each run's events put in the order of its claims by the
    rules above where their stamps say otherwise. A run whose events are not all stamped with a time
    (hostile data, SPEC 2) is left as stored."""
    ordered: list[Event] = []
    for _, run in groupby(events, key=lambda event: repr(event.get("run"))):
        ordered.extend(_run_in_order(list(run)))
    return ordered


def _run_in_order(events: list[Event]) -> list[Event]:
    stamped = [(event, at) for event in events if isinstance(at := event.get("time"), datetime)]
    if len(events) < 2 or len(stamped) < len(events):
        return events
    try:
        return [events[key[-1]] for key in sorted(_keys(stamped))]
    except TypeError:  # naive and aware times mixed (hostile data): as stored
        return events


#: An event's place: (time, 0 just before the claim stamped then or 1, the event it follows, how closely, itself).
Key = tuple[datetime, int, int, int, int]


def _keys(stamped: list[tuple[Event, datetime]]) -> list[Key]:
    """Each event's place in its run (see the module's rules)."""
    run = _Claims(stamped)
    unnamed = [index for index, (event, _) in enumerate(stamped) if not _is_claim(event) and not run.place(index)]
    for index in unnamed:
        run.place_unnamed(index)
    return run.keys


class _Claims:
    """A run's claims by time (stable: claims stamped alike stay as stored), each worker's among them, and the
    place of each event so far."""

    def __init__(self, stamped: list[tuple[Event, datetime]]) -> None:
        self.stamped = stamped
        self.keys: list[Key] = [(at, 1, index, 0, index) for index, (_, at) in enumerate(stamped)]
        self.order = sorted(
            (i for i, (event, _) in enumerate(stamped) if _is_claim(event)), key=lambda i: stamped[i][1]
        )
        self.times = [stamped[index][1] for index in self.order]
        self.by_worker: dict[ObjectId, tuple[list[datetime], list[int]]] = {}
        for k, index in enumerate(self.order):
            if isinstance(worker := stamped[index][0].get("worker"), ObjectId):
                times, positions = self.by_worker.setdefault(worker, ([], []))
                times.append(self.times[k])
                positions.append(k)
        self.ends: list[list[int]] = [[] for _ in self.order]  # the events that end each claim's hold
        self._first: dict[int, int | None] = {}  # the earliest of them, once all are placed

    def place(self, index: int) -> bool:
        """Place an event that opens the run or names a worker that claimed it; False for the others."""
        event, at = self.stamped[index]
        claims = self.times
        if _opens_run(event):
            if claims and claims[0] <= at:
                self.keys[index] = (claims[0], 0, index, 0, index)  # before the run's first claim
            return True
        worker = event.get("worker")
        mine = self.by_worker.get(worker) if isinstance(worker, ObjectId) else None
        if mine is None:
            return False
        # It ends its worker's latest claim stamped before it (or the first: it cannot come before a claim of it).
        latest = max(bisect_right(mine[0], at) - 1, 0)
        if latest > 0 and not self.ends[mine[1][latest - 1]] and not _is_terminal(event):
            latest -= 1  # the worker claimed the run again: its earlier claim must have ended before that
        self._ends(index, mine[1][latest])
        return True

    def _ends(self, index: int, k: int) -> None:
        at, claims = self.stamped[index][1], self.times
        self.ends[k].append(index)
        if at < claims[k]:
            self.keys[index] = (claims[k], 1, self.order[k], 1, index)  # right after that claim
        elif k + 1 < len(claims) and claims[k] < claims[k + 1] <= at:
            self.keys[index] = (claims[k + 1], 0, index, 0, index)  # before the run's next claim

    def _first_end(self, k: int) -> int | None:
        """The earliest stamped event that ends claim ``k``'s hold (None: not seen), once per claim."""
        if k not in self._first:
            ends = self.ends[k]
            self._first[k] = min(ends, key=lambda i: self.stamped[i][1]) if ends else None
        return self._first[k]

    def place_unnamed(self, index: int) -> None:
        """Place an event that names no claim of the run, once the named ones are placed: stamped while a worker
        held the run, where it cannot have happened, it goes next to the nearer edge of that hold."""
        event, at = self.stamped[index]
        k = bisect_right(self.times, at) - 1
        if k < 0 or not self.times[k] < at:
            return
        end = self._first_end(k)
        ended = self.stamped[end][1] if end is not None else None
        if ended is not None and at >= ended:
            return  # after that hold, as stamped
        if _is_opening(event) and (ended is None or at - self.times[k] <= ended - at):
            self.keys[index] = (self.times[k], 0, index, 0, index)  # before the claim it allowed
        elif end is not None:
            first = self.keys[end]
            self.keys[index] = (first[0], first[1], first[2], first[3] + 1, index)  # right after the hold's end


def _opens_run(event: Mapping[str, Any]) -> bool:
    """The WAITING or POSTPONED event the previous run's end wrote for this one (it carries that end's id)."""
    return _is_opening(event) and event.get("end") is not None


def _is_claim(event: Mapping[str, Any]) -> bool:
    status = event.get("status")
    return type(status) is int and status == JobStatus.PROCESSING


def _is_terminal(event: Mapping[str, Any]) -> bool:
    status = event.get("status")
    return type(status) is int and status >= JobStatus.DONE


def _is_opening(event: Mapping[str, Any]) -> bool:
    status = event.get("status")
    return type(status) is int and status in _OPENING
