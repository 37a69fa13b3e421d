"""A job's events in the order they happened.

Events are stamped by the processes that write them, each on its own estimate of the server's clock (see
:mod:`taskscheduler.clock`), and two estimates may differ by their round trips: tens of milliseconds on a loaded
machine. Sorted by time alone, a node's release of a run can then come after the claim that followed it (a sweep
at 12.340 by one node, the next claim at 12.310 by a worker of another). The order of a run's tenures is known
all the same: whatever ends a worker's hold on a run (its release, its end, a sweep of it) is a change from
"owned by that worker", so it happened before the run's next claim. :func:`in_order` restores that.
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


def in_order(events: Sequence[Event]) -> list[Event]:
    """``events`` of one job as sorted by (run, time), with every event that ends a worker's hold on a run moved
    before the run's next claim when its stamp put it after. A run whose events are not all stamped with a time
    (hostile data, SPEC 2) is left as stored."""
    ordered: list[Event] = []
    for _, run in groupby(events, key=lambda event: repr(event.get("run"))):
        ordered.extend(_run_in_order(list(run)))
    return ordered


def _run_in_order(events: list[Event]) -> list[Event]:
    stamped = [(event, at) for event in events if isinstance(at := event.get("time"), datetime)]
    if len(events) < 3 or len(stamped) < len(events):
        return events
    try:
        # The run's claims by time (stable: claims stamped alike stay as stored), and each worker's among them.
        claimed = sorted(((event, at) for event, at in stamped if _is_claim(event)), key=lambda claim: claim[1])
        claims = [at for _, at in claimed]
        by_worker: dict[ObjectId, tuple[list[datetime], list[int]]] = {}
        for n, (event, at) in enumerate(claimed):
            worker = event.get("worker")
            if isinstance(worker, ObjectId):
                times, positions = by_worker.setdefault(worker, ([], []))
                times.append(at)
                positions.append(n)
        keys: list[tuple[datetime, int, int]] = []
        for index, (event, at) in enumerate(stamped):
            key = (at, 1, index)
            worker = event.get("worker")
            if not _is_claim(event) and isinstance(worker, ObjectId) and worker in by_worker:
                # The worker's latest claim stamped before this event, and the run's claim after that one.
                times, positions = by_worker[worker]
                latest = bisect_right(times, at) - 1
                following = positions[latest] + 1 if latest >= 0 else len(claims)
                if following < len(claims) and times[latest] < claims[following] <= at:
                    key = (claims[following], 0, index)  # just before that next claim
            keys.append(key)
        return [events[index] for *_, index in sorted(keys)]
    except TypeError:  # naive and aware times mixed (hostile data): as stored
        return events


def _is_claim(event: Mapping[str, Any]) -> bool:
    status = event.get("status")
    return type(status) is int and status == JobStatus.PROCESSING
