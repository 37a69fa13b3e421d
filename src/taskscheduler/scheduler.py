"""Scheduler: the client API that spools, queries, cancels and waits for jobs."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from blinker import Namespace
from bson import ObjectId
from pymongo.database import Database

from . import options as o
from .constants import NO_WORKER, UNSET_TIME, JobStatus
from .errors import (
    InvalidArgumentError,
    JobFailedError,
    JobNotFoundError,
    TaskSchedulerError,
    WaitTimeoutError,
)
from .events import Emitter, Handler
from .job import class_path
from .process import Process
from .store import OnceConflict, Store, encoded_size, fingerprint, same_value, utcnow

#: How often add_job_once retries when concurrent callers keep replacing each other's job.
ONCE_ATTEMPTS = 20
#: Longest a single change-stream poll waits before wait_for/listen look at their deadline again.
POLL_SECONDS = 1.0


class Scheduler:
    """Spools jobs into MongoDB and manages them; any number of processes may use their own instance."""

    OPTION_AT = o.AT
    OPTION_INTERVAL = o.INTERVAL
    OPTION_INTERVAL_REFERENCE = o.INTERVAL_REFERENCE
    OPTION_RETRY = o.RETRY
    OPTION_RETRY_INTERVAL = o.RETRY_INTERVAL
    OPTION_FORCE_SPAWN = o.FORCE_SPAWN
    OPTION_TIMEOUT = o.TIMEOUT
    OPTION_ID = o.ID
    OPTION_IGNORE_DATA = o.IGNORE_DATA
    OPTION_THROW_EXCEPTION = 1
    OPTION_JOB_QUEUE = o.JOB_QUEUE
    OPTION_JOB_QUEUE_SIZE = o.JOB_QUEUE_SIZE
    OPTION_EVENT_QUEUE = o.EVENT_QUEUE
    OPTION_EVENT_QUEUE_SIZE = o.EVENT_QUEUE_SIZE
    OPTION_DEFAULT_AT = o.DEFAULT_AT
    OPTION_DEFAULT_INTERVAL = o.DEFAULT_INTERVAL
    OPTION_DEFAULT_INTERVAL_REFERENCE = o.DEFAULT_INTERVAL_REFERENCE
    OPTION_DEFAULT_RETRY = o.DEFAULT_RETRY
    OPTION_DEFAULT_RETRY_INTERVAL = o.DEFAULT_RETRY_INTERVAL
    OPTION_DEFAULT_TIMEOUT = o.DEFAULT_TIMEOUT
    OPTION_JOB_RETENTION = o.JOB_RETENTION
    OPTION_PROGRESS_RATE_LIMIT = o.PROGRESS_RATE_LIMIT

    def __init__(
        self,
        db: Database[dict[str, Any]],
        logger: logging.Logger | None = None,
        options: Mapping[str, Any] | None = None,
        emitter: Namespace | None = None,
    ) -> None:
        if not isinstance(db, Database):
            raise InvalidArgumentError(f"db must be a pymongo.database.Database, got {type(db).__name__}")
        self._db = db
        self.logger = logger or logging.getLogger("taskscheduler")
        self._emitter = Emitter(emitter)
        self._options: dict[str, Any] = dict(o.SCHEDULER_DEFAULTS)
        self._options.update(o.validate(options, o.SCHEDULER_OPTIONS, "scheduler"))
        self._store = self._build_store()
        self._progress_writes: dict[ObjectId, float] = {}
        #: Set inside a worker: progress writes then require that this worker still owns the job.
        self._owner: ObjectId | None = None

    def _build_store(self) -> Store:
        return Store(
            self._db,
            job_queue=self._options[o.JOB_QUEUE],
            job_queue_size=self._options[o.JOB_QUEUE_SIZE],
            event_queue=self._options[o.EVENT_QUEUE],
            event_queue_size=self._options[o.EVENT_QUEUE_SIZE],
            job_retention=self._options[o.JOB_RETENTION],
        )

    # -- options ---------------------------------------------------------------------------------------------------

    def set_options(self, options: Mapping[str, Any]) -> Scheduler:
        """Change scheduler options; changed defaults apply to jobs added from now on."""
        self._options.update(o.validate(options, o.SCHEDULER_OPTIONS, "scheduler"))
        self._store = self._build_store()
        return self

    def get_options(self) -> dict[str, Any]:
        return dict(self._options)

    def on(self, event: str, handler: Handler) -> Scheduler:
        """Call ``handler(event_name, process)`` for status events seen by this instance (see docs/events.md)."""
        self._emitter.on(event, handler)
        return self

    # -- adding jobs -----------------------------------------------------------------------------------------------

    def add_job(
        self, job_class: type | str, data: Any = None, options: Mapping[str, Any] | None = None, **kw: Any
    ) -> Process:
        """Spool a job; returns its Process. Nothing is written when any argument is invalid."""
        doc = self._prepare(job_class, data, _merge(options, kw))
        return self._insert(doc)

    def add_job_once(
        self, job_class: type | str, data: Any = None, options: Mapping[str, Any] | None = None, **kw: Any
    ) -> Process:
        """Spool a job unless an active job of the same class (and data) exists with the same options.

        An existing one whose submitted options differ (or, with ``ignore_data``, whose data differs) is
        canceled and replaced. Concurrent calls leave exactly one active job.
        """
        requested = _merge(options, kw)
        doc = self._prepare(job_class, data, requested)
        checked = o.validate(requested, o.JOB_OPTIONS, "job")
        ignore_data = bool(doc["options"][o.IGNORE_DATA])
        doc["once"] = fingerprint(doc["class"]) if ignore_data else doc["key"]
        for _ in range(ONCE_ATTEMPTS):
            existing = self._store.find_active(doc["class"], None if ignore_data else doc["key"])
            for found in existing:
                if not _changed(found, checked, data, ignore_data):
                    return Process(found, self)
            for found in existing:
                self._cancel_document(found)
            try:
                return self._insert(dict(doc, created=utcnow()))
            except OnceConflict:
                continue  # a concurrent caller inserted first: compare with theirs
        raise TaskSchedulerError(f"add_job_once gave up after {ONCE_ATTEMPTS} attempts: concurrent callers disagree")

    def _prepare(self, job_class: type | str, data: Any, given: Mapping[str, Any]) -> dict[str, Any]:
        opts = o.job_options(given, self._options)
        job_id = opts.pop(o.ID, None) or ObjectId()
        path = class_path(job_class)
        encoded_size(data)
        now = utcnow()
        status = JobStatus.POSTPONED if opts[o.AT] and opts[o.AT] > time.time() else JobStatus.WAITING
        return {
            "_id": job_id,
            "class": path,
            "status": int(status),
            "created": now,
            "started": UNSET_TIME,
            "ended": UNSET_TIME,
            "alive": now,
            "worker": NO_WORKER,
            "progress": 0.0,
            "orphaned": 0,
            "key": fingerprint(path, data),
            "data": data,
            "options": opts,
        }

    def _insert(self, doc: dict[str, Any]) -> Process:
        # The job document itself records its creation: events start with its first status change.
        self._store.insert_job(doc)
        process = Process(doc, self)
        self.logger.debug("added job", extra={"job_id": doc["_id"], "job_class": doc["class"]})
        self._emitter.emit_status(doc["status"], process)
        return process

    # -- reading jobs ----------------------------------------------------------------------------------------------

    def get_job(self, job_id: ObjectId) -> Process:
        """The job with this id; JobNotFoundError if there is none."""
        return Process(self._load(job_id), self)

    def get_jobs(self, query: Mapping[str, Any] | None = None) -> Iterator[Process]:
        """Jobs matching a MongoDB filter on the job document (default: WAITING, POSTPONED, PROCESSING)."""
        if query is None or (isinstance(query, Mapping) and not query):
            query = {"status": {"$in": [int(JobStatus.WAITING), int(JobStatus.POSTPONED), int(JobStatus.PROCESSING)]}}
        if not isinstance(query, Mapping):
            raise InvalidArgumentError(f"query must be a mapping (a MongoDB filter), got {type(query).__name__}")
        for doc in self._store.find_jobs(query):
            yield Process(doc, self)

    def _load(self, job_id: Any) -> dict[str, Any]:
        job_id = _object_id(job_id)
        doc = self._store.find_job(job_id)
        if doc is None:
            raise JobNotFoundError(f"job {job_id} was not found")
        return doc

    def _outcome(self, doc: Mapping[str, Any]) -> dict[str, Any] | None:
        """The event that recorded how a finished job ended (error or result)."""
        return self._store.last_event(doc["_id"], doc["status"], doc.get("worker"))

    # -- cancel and flush ------------------------------------------------------------------------------------------

    def cancel_job(self, job_id: ObjectId) -> None:
        """Cancel a job: a waiting one never runs, a running one is killed; its unfinished children too."""
        self._cancel_document(self._load(job_id))

    def _cancel_document(self, doc: dict[str, Any]) -> None:
        while True:
            status = JobStatus(doc["status"])
            if status == JobStatus.CANCELED:
                return
            if status.is_terminal:
                raise InvalidArgumentError(
                    f"job {doc['_id']} has already ended with status {status.name}; "
                    "only unfinished jobs can be canceled"
                )
            now = utcnow()
            if self._store.set_status(doc["_id"], JobStatus.CANCELED, {"status": int(status)}, {"ended": now}):
                doc.update(status=int(JobStatus.CANCELED), ended=now)
                self._store.insert_event(doc, JobStatus.CANCELED)
                self._emitter.emit_status(JobStatus.CANCELED, Process(doc, self))
                self.cancel_children(doc["_id"])
                return
            doc = self._load(doc["_id"])  # it changed meanwhile: decide again on its new status

    def cancel_children(self, parent_id: ObjectId) -> None:
        """Cancel the unfinished children (``data.parent``) of a job."""
        for child in self._store.children(parent_id, active_only=True):
            try:
                self._cancel_document(child)
            except InvalidArgumentError:
                pass  # it finished meanwhile

    def flush(self) -> None:
        """Drop all jobs and events. Running queue nodes keep working and pick up jobs added afterwards."""
        self._store.flush()
        self._progress_writes.clear()

    # -- progress --------------------------------------------------------------------------------------------------

    def update_progress(self, job_id: ObjectId, progress: float | None = None) -> None:
        """Store a job's progress (0..100) and mark it alive; ``None`` only marks it alive. Rate limited."""
        if progress is not None and (
            isinstance(progress, bool)
            or not isinstance(progress, (int, float))
            or not math.isfinite(progress)
            or not 0 <= progress <= 100
        ):
            raise InvalidArgumentError(f"progress must be a number from 0 to 100, got {progress!r}")
        job_id = _object_id(job_id)
        now = time.monotonic()
        limit = self._options[o.PROGRESS_RATE_LIMIT] / 1000
        last = self._progress_writes.get(job_id)
        if limit and last is not None and now - last < limit and progress != 100:
            return
        value = round(float(progress), 2) if progress is not None else None
        if not self._store.set_progress(job_id, value, utcnow(), self._owner) and self._owner is None:
            self._load(job_id)  # JobNotFoundError for an unknown id; a finished job is left as it is
        if len(self._progress_writes) > 10_000:
            self._progress_writes = {k: t for k, t in self._progress_writes.items() if now - t < limit}
        self._progress_writes[job_id] = now

    # -- waiting ---------------------------------------------------------------------------------------------------

    def wait_for(self, processes: Iterable[Process], options: int = 0, timeout: float | None = None) -> None:
        """Block until every listed job has finished, updating the Process objects in place.

        With ``options & OPTION_THROW_EXCEPTION``, raise JobFailedError as soon as one ended FAILED.
        WaitTimeoutError after ``timeout`` seconds.
        """
        by_id = _group_by_id(processes)
        if isinstance(options, bool) or not isinstance(options, int):
            raise InvalidArgumentError(f"options must be an int bit mask, got {options!r}")
        deadline = _deadline(timeout)
        throw = bool(options & self.OPTION_THROW_EXCEPTION)
        if not by_id:
            return
        pending = set(by_id)
        # Watch first, then read: a change between the two is seen at least once, never missed.
        # Without listeners only the end of each job matters: the server sends nothing else.
        ends = None if self._emitter.wants_status() else tuple(int(s) for s in JobStatus if s.is_terminal)
        with self._store.status_feed(ids=list(by_id), lookup=False, statuses=ends) as feed:
            found = {doc["_id"]: doc for doc in self._store.find_by_ids(by_id)}
            missing = [str(i) for i in by_id if i not in found]
            if missing:
                raise JobNotFoundError(f"job {', '.join(missing)} was not found")
            for job_id, doc in found.items():
                self._settle(by_id[job_id], doc, pending, throw)
            seen_changes = bool(pending)
            while pending:
                change = feed.poll(
                    _poll_time(deadline, lambda: f"{len(pending)} of {len(by_id)} job(s) unfinished after {timeout} s")
                )
                if change is None or change.job_id not in by_id:
                    continue
                doc = dict(change.document or by_id[change.job_id][0]._doc)
                doc["status"] = change.status
                if throw and change.status == JobStatus.FAILED:
                    doc = self._store.find_job(change.job_id) or doc  # JobFailedError carries the final job
                self._emitter.emit_status(change.status, Process(dict(doc), self))
                self._settle(by_id[change.job_id], doc, pending, throw)
        if seen_changes:  # changes carried only statuses: read the final documents once, for all jobs together
            self._refresh_all(by_id)

    def _refresh_all(self, by_id: Mapping[ObjectId, list[Process]]) -> None:
        for doc in self._store.find_by_ids(by_id):
            for p in by_id[doc["_id"]]:
                p._replace(doc)

    def _settle(self, procs: list[Process], doc: dict[str, Any], pending: set[ObjectId], throw: bool) -> None:
        if procs[0].id not in pending:
            return  # already finished: a late, older change must not move it back
        for p in procs:
            p._replace(doc)
        status = JobStatus(doc["status"])
        if status.is_terminal:
            pending.discard(doc["_id"])
            if throw and status == JobStatus.FAILED:
                raise JobFailedError(procs[0], procs[0].error)

    def listen(
        self, callback: Callable[[Process], Any], query: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> None:
        """Call ``callback(process)`` once per status change of a job matching ``query`` (a job filter),
        until it returns True. WaitTimeoutError after ``timeout`` seconds."""
        if not callable(callback):
            raise InvalidArgumentError(f"callback must be callable, got {callback!r}")
        if query is not None and not isinstance(query, Mapping):
            raise InvalidArgumentError(f"query must be a mapping (a MongoDB filter), got {type(query).__name__}")
        deadline = _deadline(timeout)
        with self._store.status_feed(query=query) as feed:
            while True:
                change = feed.poll(_poll_time(deadline, lambda: f"listen() got no final answer within {timeout} s"))
                if change is None or change.document is None:
                    continue
                process = Process(change.document, self)
                self._emitter.emit_status(change.status, process)
                if callback(process) is True:
                    return


def _group_by_id(processes: Iterable[Process]) -> dict[ObjectId, list[Process]]:
    procs = list(processes) if not isinstance(processes, Process) else [processes]
    by_id: dict[ObjectId, list[Process]] = {}
    for p in procs:
        if not isinstance(p, Process):
            raise InvalidArgumentError(f"wait_for() requires Process objects, got {type(p).__name__}")
        by_id.setdefault(p.id, []).append(p)
    return by_id


def _merge(options: Mapping[str, Any] | None, kw: Mapping[str, Any]) -> dict[str, Any]:
    if options is not None and not isinstance(options, Mapping):
        raise InvalidArgumentError(f"options must be a mapping, got {type(options).__name__}")
    merged = dict(options or {})
    merged.update(kw)
    return merged


def _changed(existing: Mapping[str, Any], requested: Mapping[str, Any], data: Any, ignore_data: bool) -> bool:
    stored = existing.get("options") or {}
    for name, value in requested.items():
        if name == o.ID:
            if existing["_id"] != value:
                return True
        elif name not in stored or not same_value(stored[name], value):
            return True
    return ignore_data and not same_value(existing.get("data"), data)


def _object_id(job_id: Any) -> ObjectId:
    if isinstance(job_id, ObjectId):
        return job_id
    if isinstance(job_id, str) and ObjectId.is_valid(job_id):
        return ObjectId(job_id)
    raise InvalidArgumentError(f"job id must be a bson.ObjectId (or its 24 hex digits), got {job_id!r}")


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise InvalidArgumentError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    return time.monotonic() + timeout


def _poll_time(deadline: float | None, describe: Callable[[], str]) -> float:
    if deadline is None:
        return POLL_SECONDS
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise WaitTimeoutError(describe())
    return min(remaining, POLL_SECONDS)
