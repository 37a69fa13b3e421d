"""A job's events in the order they happened.

Events are stamped by the processes that write them, each on its own estimate of the server's clock (see
:mod:`taskscheduler.clock`), and two estimates may differ by their round trips: tens of milliseconds on a loaded
machine. Sorted by time alone, a node's release of a run can then come after the claim that followed it (a sweep
at 12.340 by one node, the next claim at 12.310 by a worker of another). The order of a run's claims is known all
the same, and two rules place the other events around them:

- Whatever ends a worker's hold on a run (its end, a release, another node's sweep, a hold for a verdict) is a
  change from "owned by that worker": it happened after that worker's claim and before the run's next claim.
- What makes a run WAITING or POSTPONED without naming a claim of it (the end of the previous run that opened
  this one, a postponed run coming due, a held run's verdict, a requeue) cannot have happened while a worker
  held the run: stamped inside a worker's hold, it happened before that claim.
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
    two rules above where their stamps say otherwise. A run whose events are not all stamped with a time
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
        return [events[index] for *_, index in sorted(_keys(stamped))]
    except TypeError:  # naive and aware times mixed (hostile data): as stored
        return events


def _keys(stamped: list[tuple[Event, datetime]]) -> list[tuple[datetime, int, int]]:
    """Each event's place: (time, 1, index) as stamped, or (a claim's time, 0, index) to go just before it."""
    claimed = sorted(((event, at) for event, at in stamped if _is_claim(event)), key=lambda claim: claim[1])
    claims = [at for _, at in claimed]  # stable above: claims stamped alike stay as stored
    by_worker: dict[ObjectId, tuple[list[datetime], list[int]]] = {}
    for n, (event, at) in enumerate(claimed):
        if isinstance(worker := event.get("worker"), ObjectId):
            times, positions = by_worker.setdefault(worker, ([], []))
            times.append(at)
            positions.append(n)
    keys = [(at, 1, index) for index, (_, at) in enumerate(stamped)]
    held_until: list[datetime | None] = [None] * len(claims)  # when each claim's hold ended (None: not seen)
    opening: list[int] = []
    for index, (event, at) in enumerate(stamped):
        if _is_claim(event):
            continue
        worker = event.get("worker")
        mine = by_worker.get(worker) if isinstance(worker, ObjectId) else None
        latest = bisect_right(mine[0], at) - 1 if mine is not None else -1
        if mine is None or latest < 0:
            if _is_opening(event):
                opening.append(index)
            continue
        claim = mine[1][latest]  # this event ends that claim's hold
        ended = held_until[claim]
        held_until[claim] = at if ended is None or at < ended else ended
        following = claim + 1
        if following < len(claims) and claims[claim] < claims[following] <= at:
            keys[index] = (claims[following], 0, index)
    for index in opening:
        at = stamped[index][1]
        claim = bisect_right(claims, at) - 1
        ended = held_until[claim] if claim >= 0 else None
        if claim >= 0 and (ended is None or at < ended) and claims[claim] < at:
            keys[index] = (claims[claim], 0, index)  # stamped while a worker held the run: before that claim
    return keys


def _is_claim(event: Mapping[str, Any]) -> bool:
    status = event.get("status")
    return type(status) is int and status == JobStatus.PROCESSING


def _is_opening(event: Mapping[str, Any]) -> bool:
    status = event.get("status")
    return type(status) is int and status in _OPENING
