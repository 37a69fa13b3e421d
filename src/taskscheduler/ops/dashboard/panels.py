"""The dashboard's panels beside the job table, as plain JSON: trends (how runs ended over the last hour), flow
control (limits and pauses with what each holds) and schedules (the recurring jobs).

Each read costs the server more than a page of jobs does (an hour of events, a count per limit), so each is
computed at most once per :class:`Cached` period per dashboard, however many pages ask.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Generic, TypeVar

from ...client.scheduler import Scheduler
from ...constants import JobStatus
from ...core.flow import EVERY_JOB, Controls
from ...store.mongo.trends import TREND_MINUTES, RunTrends
from ...store.schema import status_label
from ..schedules import schedules
from .views import iso

#: Seconds a computed trends panel is served before it is computed again.
TRENDS_SECONDS = 10.0
#: Seconds a computed flow-control panel is served (the page's own pause or resume recomputes it at once).
FLOW_SECONDS = 3.0
#: Limits and pauses shown at most each (each costs a count of the jobs waiting under it).
MAX_CONTROLS = 100
#: Schedules shown at most (the soonest first), with how many there are.
MAX_SCHEDULES = 200
#: Statuses counted as failures in a class's failure rate (a CANCELED run was an operator's or a dependency's
#: decision, not a failure of the job).
FAILURES = (int(JobStatus.FAILED), int(JobStatus.TIMEOUT))

T = TypeVar("T")


class Cached(Generic[T]):
    """A value computed by ``compute`` at most once per ``seconds``; callers in other threads meanwhile get the
    value being served (one computation at a time)."""

    def __init__(self, compute: Callable[[], T], seconds: float) -> None:
        self.compute = compute
        self.seconds = seconds
        self._lock = threading.Lock()
        self._value: T | None = None
        self._at = -float("inf")

    def get(self, fresh: bool = False) -> T:
        """The value, computed again when older than ``seconds`` (``fresh``: now)."""
        with self._lock:
            if fresh or self._value is None or time.monotonic() - self._at >= self.seconds:
                self._value = self.compute()
                self._at = time.monotonic()
            return self._value


def trends_view(scheduler: Scheduler) -> dict[str, Any]:
    """Runs ended per minute by status over the last :data:`TREND_MINUTES` minutes (``minutes``: one entry per
    minute, oldest first, ending now) and per class (the most runs first): runs, counts per status, failure rate
    (FAILED and TIMEOUT of the runs that were not canceled) and p50/p95 run durations in seconds."""
    store = scheduler.store
    now = store.server_time()
    since = now - timedelta(minutes=TREND_MINUTES)
    found = store.run_trends(since)
    return _trends_json(found, now)


def _trends_json(found: RunTrends, now: Any) -> dict[str, Any]:
    ends = [s for s in JobStatus if s.is_terminal]
    minutes = []
    for minute in range(TREND_MINUTES):
        counts = {s.name.lower(): found.minutes.get((minute, int(s)), 0) for s in ends}
        minutes.append({"start": iso(found.since + timedelta(minutes=minute)), **counts})
    classes = []
    for trend in found.classes:
        failed = sum(trend.counts.get(s, 0) for s in FAILURES)
        judged = trend.runs - trend.counts.get(int(JobStatus.CANCELED), 0)
        classes.append(
            {
                "class": trend.job_class,
                "runs": trend.runs,
                "counts": {status_label(s): n for s, n in sorted(trend.counts.items())},
                "failure_rate": failed / judged if judged else None,
                "p50": trend.percentile(0.5),
                "p95": trend.percentile(0.95),
                "timed": trend.timed,
            }
        )
    return {
        "since": iso(found.since),
        "until": iso(now),
        "minutes": minutes,
        "classes": classes,
        "classes_total": found.classes_total,
    }


def flow_view(scheduler: Scheduler) -> dict[str, Any]:
    """Limits and pauses (SPEC 8) with what each holds, as ``taskscheduler info`` shows them: a limit's runs
    holding its slots and the jobs waiting under it, a pause's waiting jobs. A limit document this library did
    not write limits nothing and says so (``malformed``). At most :data:`MAX_CONTROLS` of each, with the
    totals."""
    store = scheduler.store
    controls = Controls.from_docs(store.flow_controls())
    described = controls.described()
    limits = []
    for key in sorted(described)[:MAX_CONTROLS]:
        limit = controls.limits.get(key)
        limits.append(
            {
                "key": key,
                **described[key],
                "running": len(limit.holders) if limit is not None else 0,
                "waiting": store.waiting_under(key),
            }
        )
    paused = [
        {"key": key, "waiting": store.waiting_under(None if key == EVERY_JOB else key)}
        for key in sorted(controls.paused)[:MAX_CONTROLS]
    ]
    return {
        "limits": limits,
        "limits_total": len(described),
        "paused": paused,
        "paused_total": len(controls.paused),
    }


def schedules_view(scheduler: Scheduler) -> dict[str, Any]:
    """The recurring jobs as ``taskscheduler schedules`` lists them (the soonest first), at most
    :data:`MAX_SCHEDULES`, with ``total``."""
    found = schedules(scheduler)
    return {"schedules": [s.to_dict() for s in found[:MAX_SCHEDULES]], "total": len(found)}
