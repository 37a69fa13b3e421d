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
from .errors import QueueFullError
from .process import Process
from .store import DuplicateJobError, OnceConflict, Store, utcnow

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


class RunEnd:
    """The end of one run, prepared once so that recording it can be retried after an outage.

    The run's two events (its PROCESSING and how it ended) go in one write: capped writes are the costly ones.
    The next run (retry or interval) is inserted before the final status, so whoever sees the job finished also
    finds its next run; both are withdrawn if this worker turns out to have lost the job. Every id is fixed here,
    so a retried ``record()`` never writes an event or a next run twice.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        doc: Mapping[str, Any],
        worker: ObjectId,
        status: JobStatus,
        *,
        error: Mapping[str, Any] | None = None,
        result: Any = None,
        has_result: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.doc = doc
        self.worker = worker
        self.status = status
        self.now = utcnow()
        store = scheduler._store
        self.events = [run_event(doc, worker), store.event(doc, status, worker, error, result, has_result, self.now)]
        self.next_doc = next_run(scheduler, doc, status)
        # A once-key may exist only once while active: such a next run waits for the final status.
        self.early = self.next_doc is not None and "once" not in self.next_doc
        self._next_stored = False

    def record(self) -> bool:
        scheduler, store, doc = self.scheduler, self.scheduler._store, self.doc
        store.insert_events(self.events)
        if self.early and self.next_doc is not None and not self._next_stored:
            self._next_stored = _insert_next(scheduler, self.next_doc, announce=False)
        owned = {"status": int(JobStatus.PROCESSING), "worker": self.worker}
        if not store.set_status(doc["_id"], self.status, owned, {"ended": self.now, "progress": 100.0}):
            stored = store.find_job(doc["_id"]) or {}
            mine = (int(self.status), self.now, self.worker)
            if (stored.get("status"), stored.get("ended"), stored.get("worker")) == mine:
                return True  # an earlier attempt wrote it before the connection dropped
            store.delete_event(self.events[-1]["_id"])
            if self._next_stored and self.next_doc is not None:
                store.delete_job(self.next_doc["_id"])
            scheduler.logger.warning("lost ownership of job before recording it", extra={"job_id": doc["_id"]})
            return False
        final = dict(doc, status=int(self.status), ended=self.now, progress=100.0, worker=self.worker)
        scheduler.logger.info(
            "job ended",
            extra={"job_id": doc["_id"], "status": self.status.name, "worker": self.worker, "job_class": doc["class"]},
        )
        scheduler._emitter.emit_status(self.status, Process(final, scheduler))
        if self.status in (JobStatus.TIMEOUT, JobStatus.CANCELED):
            scheduler.cancel_children(doc["_id"])
        if self.next_doc is not None:
            if self._next_stored:
                scheduler._emitter.emit_status(self.next_doc["status"], Process(self.next_doc, scheduler))
            elif not self.early:
                _insert_next(scheduler, self.next_doc, announce=True)
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


def _insert_next(scheduler: Scheduler, doc: dict[str, Any], announce: bool) -> bool:
    """Store a next run; True when it is stored (also by an earlier attempt). An outage propagates."""
    try:
        if announce:
            scheduler._insert(doc)
        else:
            scheduler._store.insert_job(doc)
    except DuplicateJobError:
        return True  # stored by an earlier attempt whose answer was lost
    except OnceConflict:
        scheduler.logger.info("next run not added: add_job_once added one meanwhile", extra={"job_id": doc["_id"]})
        return False
    except QueueFullError as exc:
        scheduler.logger.error("next run could not be added", extra={"job_id": doc["_id"], "error": str(exc)})
        return False
    return True


def release(scheduler: Scheduler, doc: Mapping[str, Any], worker: ObjectId, *, orphaned: bool, reason: str) -> bool:
    """Put a job its worker can no longer run back to WAITING (same id), conditional on ownership.

    ``orphaned`` counts the release; the :data:`MAX_ORPHANINGS`-th one ends the job FAILED instead.
    """
    count = int(doc.get("orphaned", 0)) + (1 if orphaned else 0)
    if orphaned and count >= MAX_ORPHANINGS:
        error = {"class": "OrphanedJobError", "message": f"job orphaned {count} times; last: {reason}", "traceback": ""}
        return RunEnd(scheduler, dict(doc, orphaned=count), worker, JobStatus.FAILED, error=error).record()
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
