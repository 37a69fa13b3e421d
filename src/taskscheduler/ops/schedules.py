"""The schedules of a queue (SPEC 7, "Schedules"): its recurring jobs, as ``taskscheduler schedules`` and the
dashboard list them.

A schedule is a job that repeats (``interval`` not 0, or a ``cron`` expression) and has not ended. A failed run
does not end a recurring job (its retries, then its next run follow); it ends only when it is canceled, when a
node ends its malformed document FAILED, or when a stored cron expression has no next match. It then runs no
more, so it is no schedule (``jobs --status`` still shows it, and ``requeue`` makes it one again).

Nothing here writes; the reads are the store's (:meth:`OperatorReads.recurring_jobs`), each served by an index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from bson import ObjectId

from .. import options as o
from ..client.scheduler import Scheduler
from ..constants import NO_WORKER, UNSET_TIME, JobStatus
from ..core.flow import EVERY_JOB
from ..store.views import EventView, JobView

Kind = Literal["interval", "cron"]

#: Units of an interval as :func:`interval_text` writes it, largest first.
_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))


@dataclass(frozen=True)
class Schedule:
    """One recurring job as an operator reads it. Times are unix seconds (UTC); :meth:`to_dict` gives ISO 8601."""

    id: ObjectId
    job_class: str
    kind: Kind
    #: The cron expression as stored, or the interval in words (``"every 1h 30m"``, see :func:`interval_text`).
    expression: str
    #: The zone the cron expression is read in; None for an interval (it counts seconds, in no zone).
    timezone: str | None
    #: When the next run may start: its time while POSTPONED; while WAITING the time it has been due since (it
    #: starts as soon as a worker is free); None while a run is going (the next start is decided when it ends).
    next_start: float | None
    #: Status and end of the last ended run (DONE, FAILED, TIMEOUT or CANCELED); None before the first ended.
    last_status: JobStatus | None
    last_end: float | None
    #: Runs ended so far (retries count as runs, as ``show`` lists them); a run going now is not counted yet.
    runs: int
    #: Whether a pause holds it: of its class, of its ``limit_key``, or of every job (``"*"``); see SPEC 8.
    paused: bool
    #: The job's own status: WAITING, POSTPONED or PROCESSING.
    status: JobStatus

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the id as a string, statuses by name, times as ISO 8601 in UTC (None when unset)."""
        return {
            "id": str(self.id),
            "job_class": self.job_class,
            "kind": self.kind,
            "expression": self.expression,
            "timezone": self.timezone,
            "next_start": iso_utc(self.next_start),
            "last_status": self.last_status.name if self.last_status is not None else None,
            "last_end": iso_utc(self.last_end),
            "runs": self.runs,
            "paused": self.paused,
            "status": self.status.name,
        }


def schedules(scheduler: Scheduler) -> list[Schedule]:
    """The queue's schedules, the soonest first: running ones, then by next start (then by id).

    Stored data is hostile input (SPEC 2): a document whose id is no ObjectId, whose status is no status, or
    whose ``interval`` or ``cron`` is of the wrong type is no schedule here (``jobs`` shows it as malformed, and
    a node ends it FAILED); any other field that is unreadable is shown as unknown (None), never raised."""
    store = scheduler.store
    docs = store.recurring_jobs()
    outcomes = [end for d in docs if isinstance(end := JobView(d).outcome_value, ObjectId) and end != NO_WORKER]
    found_ends = map(EventView, store.events_by_ids(outcomes, ["status"])) if outcomes else ()
    ends = {e.id: e.status_value for e in found_ends}
    paused = set(scheduler.paused())
    found = [s for s in (_schedule(doc, ends, paused) for doc in docs) if s is not None]
    return sorted(found, key=lambda s: (s.next_start is not None, s.next_start or 0.0, s.id))


def interval_text(seconds: int, reference: Any = "end") -> str:
    """An interval in words: ``"every 1h 30m"``; measured from each run's start: ``"every 1h 30m from each
    start"``; -1 (the next run at once): ``"again at once after each run"``."""
    if seconds < 0:
        return "again at once after each run"
    parts: list[str] = []
    left = seconds
    for unit, length in _UNITS:
        if left >= length:
            parts.append(f"{left // length}{unit}")
            left %= length
    text = "every " + " ".join(parts or ["0s"])
    return f"{text} from each start" if reference == "start" else text


def iso_utc(moment: float | None) -> str | None:
    """Unix seconds as ISO 8601 in UTC, to the millisecond (times are kept to the millisecond); None for None or
    for a time no datetime can hold (a stored value beyond the year 9999)."""
    if moment is None:
        return None
    try:
        return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):
        return None


def _schedule(doc: Mapping[str, Any], ends: Mapping[Any, Any], paused: Iterable[str]) -> Schedule | None:
    job = JobView(doc)
    job_id, status = job.id_value, job.status_value
    if not isinstance(job_id, ObjectId) or type(status) is not int or status not in _UNFINISHED:
        return None
    options = job.options
    cron, interval = options.get(o.CRON), options.get(o.INTERVAL)
    kind: Kind
    if isinstance(cron, str) and cron:
        kind, expression = "cron", cron
        zone = options.get(o.TIMEZONE)
        tz: str | None = zone if isinstance(zone, str) and zone else "UTC"
    elif type(interval) is int and interval != 0:
        kind, expression, tz = "interval", interval_text(interval, options.get(o.INTERVAL_REFERENCE)), None
    else:
        return None
    job_class = job.class_value
    job_class = job_class if isinstance(job_class, str) else repr(job_class)
    limit_key = options.get(o.LIMIT_KEY)
    keys = {EVERY_JOB, job_class, *([limit_key] if isinstance(limit_key, str) and limit_key else [])}
    outcome = job.outcome_value
    ran = isinstance(outcome, ObjectId) and outcome != NO_WORKER  # NO_WORKER doubles as "no event yet"
    last = ends.get(outcome) if ran else None  # an event evicted from a capped collection: status unknown
    run = job.run_value
    return Schedule(
        id=job_id,
        job_class=job_class,
        kind=kind,
        expression=expression,
        timezone=tz,
        next_start=_next_start(JobStatus(status), options.get(o.AT), job.created_value),
        last_status=JobStatus(last) if type(last) is int and last in _ENDED else None,
        last_end=_seconds(job.ended_value) if ran else None,
        runs=run - 1 if type(run) is int and run >= 1 else 0,
        paused=not keys.isdisjoint(paused),
        status=JobStatus(status),
    )


_UNFINISHED = frozenset(int(s) for s in JobStatus if not s.is_terminal)
_ENDED = frozenset(int(s) for s in JobStatus if s.is_terminal)


def _next_start(status: JobStatus, at: Any, created: Any) -> float | None:
    if status == JobStatus.PROCESSING:
        return None
    number = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) and at > 0 else None
    if number is not None and number <= o.MAX_TIMESTAMP:
        return number
    # Due at once since it was added (``at`` 0): due since then.
    return _seconds(created) if status == JobStatus.WAITING and number is None else None


def _seconds(moment: Any) -> float | None:
    """A stored time as unix seconds; None when unset (the fixed-size placeholder) or no datetime."""
    if not isinstance(moment, datetime) or moment == UNSET_TIME:
        return None
    return moment.timestamp() if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc).timestamp()
