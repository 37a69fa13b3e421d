"""How a job leaves PROCESSING: finishing it, and the retry and interval runs that follow; orphans and resets.

Every write here is conditional on the writer's view of ownership (status PROCESSING and ``worker`` = the id that
ran it), so a worker or node that lost a job can never overwrite what its new owner wrote. For FAILED, DONE and
TIMEOUT the event document (error or result) is written first and withdrawn if the status write loses, so a
reader who sees the final status always finds its error or result.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bson import ObjectId

from . import options as o
from .constants import MAX_ORPHANINGS, NO_WORKER, JobStatus
from .errors import TaskSchedulerError
from .process import Process
from .store import OnceConflict, Store, utcnow

if TYPE_CHECKING:
    from .scheduler import Scheduler


def describe_error(exc: BaseException) -> dict[str, str]:
    """The stored form of an exception: class, message and traceback text."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return {
        "class": name,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }


def finish(
    scheduler: Scheduler,
    doc: Mapping[str, Any],
    worker: ObjectId,
    status: JobStatus,
    *,
    error: Mapping[str, Any] | None = None,
    result: Any = None,
    has_result: bool = False,
) -> bool:
    """Record the end of a run owned by ``worker``; cancel its children or add its next run.

    The next run (retry or interval) is inserted before the final status is written, so whoever sees the job
    finished also finds its next run; it is withdrawn if this worker turns out to have lost the job.
    """
    store = scheduler._store
    now = utcnow()
    # One write for the run's two events (its PROCESSING and how it ended): capped writes are the costly ones.
    events = [run_event(doc, worker), store.event(doc, status, worker, error, result, has_result, now)]
    event_id = store.insert_events(events)[-1]
    next_doc = next_run(scheduler, doc, status)
    early = next_doc is not None and "once" not in next_doc  # a once-key may exist only once while active
    if early and next_doc is not None and not _insert_quietly(scheduler, next_doc, announce=False):
        early, next_doc = False, None
    owned = {"status": int(JobStatus.PROCESSING), "worker": worker}
    if not store.set_status(doc["_id"], status, owned, {"ended": now, "progress": 100.0}):
        store.delete_event(event_id)
        if early and next_doc is not None:
            store.delete_job(next_doc["_id"])
        scheduler.logger.warning("lost ownership of job before recording it", extra={"job_id": doc["_id"]})
        return False
    final = dict(doc, status=int(status), ended=now, progress=100.0, worker=worker)
    scheduler.logger.info(
        "job ended", extra={"job_id": doc["_id"], "status": status.name, "worker": worker, "job_class": doc["class"]}
    )
    scheduler._emitter.emit_status(status, Process(final, scheduler))
    if status in (JobStatus.TIMEOUT, JobStatus.CANCELED):
        scheduler.cancel_children(doc["_id"])
    if next_doc is not None:
        if early:
            scheduler._emitter.emit_status(next_doc["status"], Process(next_doc, scheduler))
        else:
            _insert_quietly(scheduler, next_doc, announce=True)
    return True


def next_run(scheduler: Scheduler, doc: Mapping[str, Any], status: JobStatus) -> dict[str, Any] | None:
    """The next run of a finished job, prepared but not stored: a retry after FAILED/TIMEOUT, else the next
    interval run (measured from the end, the start, or for a timeout from now)."""
    opts = dict(doc.get("options") or {})
    now = time.time()
    retry = int(opts.get(o.RETRY, 0))
    if status in (JobStatus.FAILED, JobStatus.TIMEOUT) and retry != 0:
        opts[o.RETRY] = retry - 1 if retry > 0 else retry
        opts[o.AT] = int(now) + int(opts.get(o.RETRY_INTERVAL, 0))
    elif status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT):
        interval = int(opts.get(o.INTERVAL, 0))
        if interval > 0:
            started = doc.get("started")
            from_start = opts.get(o.INTERVAL_REFERENCE) == "start" and status != JobStatus.TIMEOUT
            reference = started.timestamp() if from_start and isinstance(started, datetime) else now
            opts[o.AT] = int(reference) + interval
        elif interval == -1:
            opts[o.AT] = 0
        else:
            return None
    else:
        return None
    prepared = scheduler._prepare(doc["class"], doc.get("data"), opts)
    if "once" in doc:
        prepared["once"] = doc["once"]
    return prepared


def _insert_quietly(scheduler: Scheduler, doc: dict[str, Any], announce: bool) -> bool:
    """Store a next run (its event first, like every insert); a failure is logged, never raised."""
    try:
        if announce:
            scheduler._insert(doc)
        else:
            scheduler._store.insert_job(doc)
        return True
    except OnceConflict:
        scheduler.logger.info("next run not added: add_job_once added one meanwhile", extra={"job_id": doc["_id"]})
    except TaskSchedulerError as exc:
        scheduler.logger.error("next run could not be added", extra={"job_id": doc["_id"], "error": str(exc)})
    return False


def release(scheduler: Scheduler, doc: Mapping[str, Any], worker: ObjectId, *, orphaned: bool, reason: str) -> bool:
    """Put a job its worker can no longer run back to WAITING (same id), conditional on ownership.

    ``orphaned`` counts the release; the :data:`MAX_ORPHANINGS`-th one ends the job FAILED instead.
    """
    count = int(doc.get("orphaned", 0)) + (1 if orphaned else 0)
    if orphaned and count >= MAX_ORPHANINGS:
        error = {"class": "OrphanedJobError", "message": f"job orphaned {count} times; last: {reason}", "traceback": ""}
        return finish(scheduler, dict(doc, orphaned=count), worker, JobStatus.FAILED, error=error)
    store = scheduler._store
    expect: dict[str, Any] = {"status": int(JobStatus.PROCESSING), "worker": worker}
    if orphaned and "alive" in doc:
        expect["alive"] = doc["alive"]  # a heartbeat since the check means it is not orphaned
    if not store.set_status(doc["_id"], JobStatus.WAITING, expect, {"worker": NO_WORKER, "orphaned": count}):
        return False
    reset = dict(doc, status=int(JobStatus.WAITING), worker=NO_WORKER, orphaned=count)
    note = {"class": "JobReleased", "message": reason, "traceback": ""}
    store.insert_events([run_event(doc, worker), store.event(reset, JobStatus.WAITING, worker, note)])
    scheduler.logger.warning("job put back to waiting", extra={"job_id": doc["_id"], "reason": reason})
    scheduler._emitter.emit_status(JobStatus.WAITING, Process(reset, scheduler))
    return True


def run_event(doc: Mapping[str, Any], worker: ObjectId) -> dict[str, Any]:
    """The PROCESSING event of a run, written when the run ends (timed at its start)."""
    started = doc.get("started")
    return Store.event(doc, JobStatus.PROCESSING, worker, time=started if isinstance(started, datetime) else None)


def unpostpone(scheduler: Scheduler, doc: Mapping[str, Any]) -> bool:
    """POSTPONED -> WAITING once its time has come; of all nodes racing, exactly one wins."""
    store = scheduler._store
    if not store.set_status(doc["_id"], JobStatus.WAITING, {"status": int(JobStatus.POSTPONED)}):
        return False
    store.insert_event(doc, JobStatus.WAITING)
    return True
