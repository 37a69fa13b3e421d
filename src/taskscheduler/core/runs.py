"""The runs of a job: which run follows an ended one (retry, cron, interval), and which recorded end of each run
counted."""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from .. import options as o
from ..constants import JobStatus
from ..errors import InvalidArgumentError
from ..recurrence import next_cron_time, retry_delay
from ..store.records import JobRecord
from ..store.views import EventView

Document = dict[str, Any]

#: Statuses an ended run can have.
RUN_END_STATUSES = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.TIMEOUT)


def counted_run_ends(events: list[Document], outcome: Any) -> list[Document]:
    """One end event per run number, oldest run first, from a job's events (oldest first; the run ends of any
    range of runs, with the events that announced the runs after them).

    The end that counted is the one the job's outcome names, or the one whose next run was announced: an end
    written by a worker that then died before recording it can only linger if it was written late."""
    views = [EventView(e) for e in events]
    # Our ids are ObjectIds; anything else stored there (a document, an array: SPEC 2) announces nothing.
    announced = {
        e.end_value
        for e in views
        if e.status_value in (JobStatus.WAITING, JobStatus.POSTPONED) and isinstance(e.end_value, ObjectId)
    }

    def weight(event: EventView) -> tuple[bool, bool]:
        return event.id == outcome, isinstance(event.id, ObjectId) and event.id in announced

    by_run: dict[int, int] = {}  # run number -> index of its end in events
    for index, event in enumerate(views):  # oldest first: among equals, the later end of a run number counted
        if event.status_value not in RUN_END_STATUSES:
            continue
        run = event.run_number
        if run is None:  # no run number at all: no run of the job to list it under
            continue
        if run not in by_run or weight(event) >= weight(views[by_run[run]]):
            by_run[run] = index
    return [events[by_run[run]] for run in sorted(by_run)]


def next_start(job: JobRecord, status: JobStatus, now: float) -> tuple[JobStatus, float, int] | None:
    """The run that follows an ended one: a retry after FAILED/TIMEOUT (its delay growing by ``retry_backoff``
    with each failure in a row), else the next cron match after now, else the next interval run (measured from
    the end, the start, or for a timeout from now). Returns (status, at, retry left), or None.

    ``now`` is when the run ended, on the server's clock (unix seconds): a next run due by then is WAITING, a
    later one POSTPONED (its node starts it when the server's clock reaches its time)."""
    opts = job.options
    retry = int(opts.get(o.RETRY, 0))
    if status in (JobStatus.FAILED, JobStatus.TIMEOUT) and retry != 0:
        at = now + retry_delay(dict(opts), job.failures + 1)
        retry = retry - 1 if retry > 0 else retry
    elif status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT) and opts.get(o.CRON):
        # After the match that just ran, too: a worker whose clock is behind the server's may end the 12:00 run
        # "before" 12:00, and that match must not run again.
        after = max(now, job.at)
        try:
            at = next_cron_time(str(opts[o.CRON]), str(opts.get(o.TIMEZONE) or "UTC"), after)
        except InvalidArgumentError:
            return None  # a stored schedule with no next match (never validated): the job ends with this run
    elif status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT):
        interval = int(opts.get(o.INTERVAL, 0))
        if interval > 0:
            from_start = opts.get(o.INTERVAL_REFERENCE) == "start" and status != JobStatus.TIMEOUT
            reference = job.started.timestamp() if from_start and job.started is not None else now
            at = reference + interval
        elif interval == -1:
            at = 0.0
        else:
            return None
    else:
        return None
    at = round(float(at), 3)
    return (JobStatus.POSTPONED if at > now else JobStatus.WAITING), at, retry
