"""Scheduler: the client API that spools, queries, cancels and waits for jobs."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from blinker import Namespace
from bson import ObjectId
from pymongo.database import Database

from .. import options as o
from ..constants import JobStatus
from ..core.flow import Controls, checked_concurrency, checked_key, parse_rate
from ..core.lifecycle import Lifecycle
from ..errors import (
    DuplicateJobError,
    InvalidArgumentError,
    JobFailedError,
    JobNotFoundError,
    TaskSchedulerError,
    WaitTimeoutError,
)
from ..events import Emitter, Handler
from ..store import Store, jobs_filter
from ..store.records import RunContext, added_by_run, parent_of
from ..store.schema import stored_status
from ..store.views import JobView
from .job import class_path
from .process import Process

#: Longest a single change-stream poll waits before wait_for/listen look at their deadline again.
POLL_SECONDS = 1.0
#: Longest a worker's progress write may wait for the server; during an outage it is dropped, never raised.
PROGRESS_WAIT_SECONDS = 2.0


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
    OPTION_CRON = o.CRON
    OPTION_TIMEZONE = o.TIMEZONE
    OPTION_RETRY_BACKOFF = o.RETRY_BACKOFF
    OPTION_RETRY_MAX_INTERVAL = o.RETRY_MAX_INTERVAL
    OPTION_RETRY_JITTER = o.RETRY_JITTER
    OPTION_PRIORITY = o.PRIORITY
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
    OPTION_ORPHANED_RATE_LIMIT = o.ORPHANED_RATE_LIMIT  # upstream's, accepted and ignored (DeprecationWarning)

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
        #: The one owner of job state changes; queue nodes and workers use it through their Scheduler.
        present = lambda doc: Process(doc, self)  # noqa: E731 - the events' payload of a job
        self.lifecycle = Lifecycle(self._build_store(), self._emitter, self.logger, present=present)
        self._progress_writes: dict[ObjectId, float] = {}
        #: Inside a worker, the run this scheduler serves (see :meth:`for_run`); None everywhere else.
        self._run: RunContext | None = None

    def _build_store(self) -> Store:
        return Store(
            self._db,
            job_queue=self._options[o.JOB_QUEUE],
            job_queue_size=self._options[o.JOB_QUEUE_SIZE],
            event_queue=self._options[o.EVENT_QUEUE],
            event_queue_size=self._options[o.EVENT_QUEUE_SIZE],
            job_retention=self._options[o.JOB_RETENTION],
        )

    def for_run(self, run: RunContext) -> Scheduler:
        """This scheduler as the code of one run uses it inside its worker (the same store, options and events):
        its progress writes require that the run's worker still owns the job, and the child jobs it adds belong
        to that run (a later run of the parent does not inherit their failure)."""
        view = copy.copy(self)
        view._run = run
        return view

    @property
    def owner(self) -> ObjectId | None:
        """The worker whose run this scheduler serves (:meth:`for_run`), or None."""
        return self._run.worker if self._run is not None else None

    @property
    def db(self) -> Database[dict[str, Any]]:
        """The database this scheduler was built on (a queue node on this scheduler uses it too)."""
        return self._db

    @property
    def store(self) -> Store:
        """Where jobs and events are kept (the only object that talks to pymongo)."""
        # The one this Scheduler built and gave its lifecycle (set_options, also through a for_run view, replaces it).
        return cast(Store, self.lifecycle.store)

    @property
    def emitter(self) -> Emitter:
        return self._emitter

    # -- options ---------------------------------------------------------------------------------------------------

    def set_options(self, options: Mapping[str, Any]) -> Scheduler:
        """Change scheduler options; changed defaults apply to jobs added from now on."""
        self._options.update(o.validate(options, o.SCHEDULER_OPTIONS, "scheduler"))
        self.store.give_back()  # room the replaced store reserved ahead would be lost with it
        self.lifecycle.store = self._build_store()
        return self

    def get_options(self) -> dict[str, Any]:
        return dict(self._options)

    def on(self, event: str, handler: Handler) -> Scheduler:
        """Call ``handler(event_name, process)`` for status events seen by this instance (see docs/events.md)."""
        self._emitter.on(event, handler)
        return self

    # -- adding jobs -----------------------------------------------------------------------------------------------

    def add_job(
        self,
        job_class: type | Callable[..., Any] | str,
        data: Any = None,
        options: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> Process:
        """Spool a job; returns its Process. Nothing is written when any argument is invalid."""
        doc = self.lifecycle.prepare(class_path(job_class), data, _merge(options, kw), self._options)
        return Process(self.lifecycle.add(self._mark_child(doc)), self)

    def add_job_once(
        self,
        job_class: type | Callable[..., Any] | str,
        data: Any = None,
        options: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> Process:
        """Spool a job unless an active job of the same class (and data) exists with the same options.

        An existing one whose submitted options differ (or, with ``ignore_data``, whose data differs) is
        canceled and replaced. Concurrent calls leave exactly one active job.
        """
        requested = _merge(options, kw)
        doc = self._mark_child(self.lifecycle.prepare(class_path(job_class), data, requested, self._options))
        return Process(self.lifecycle.add_once(doc, o.validate(requested, o.JOB_OPTIONS, "job"), data), self)

    def add_chain(self, steps: Iterable[Sequence[Any]]) -> list[Process]:
        """Spool jobs that run one after the other: ``steps`` are ``(job_class, data)`` or ``(job_class, data,
        options)``; each job depends on the one before it (besides its own ``depends_on``), so a failure cancels
        the rest. Every step is checked before anything is written. Returns the jobs in order."""
        if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
            raise InvalidArgumentError("steps must be a list of (job_class, data) or (job_class, data, options)")
        docs: list[dict[str, Any]] = []
        known: frozenset[ObjectId] = frozenset()
        for number, step in enumerate(steps, 1):
            if isinstance(step, (str, bytes)) or not isinstance(step, Sequence) or len(step) not in (2, 3):
                raise InvalidArgumentError(
                    f"step {number} must be (job_class, data) or (job_class, data, options), got {step!r}"
                )
            options = dict(step[2]) if len(step) == 3 and step[2] is not None else {}
            if len(step) == 3 and step[2] is not None and not isinstance(step[2], Mapping):
                raise InvalidArgumentError(f"step {number}: options must be a mapping, got {step[2]!r}")
            if docs:
                own = options.get(o.DEPENDS_ON) or []
                if isinstance(own, (list, tuple)):
                    options[o.DEPENDS_ON] = [JobView(docs[-1]).id, *own]
            doc = self.lifecycle.prepare(class_path(step[0]), step[1], options, self._options, known)
            docs.append(self._mark_child(doc))
            known = known | {JobView(doc).id}
        if not docs:
            raise InvalidArgumentError("a chain needs at least one step")
        ids = [JobView(doc).id for doc in docs]
        taken = [job_id for job_id in ids if ids.count(job_id) > 1] or list(self.store.job_states(ids))
        if taken:
            raise DuplicateJobError(f"a chain step's id {taken[0]} is taken (option id): nothing was added")
        added: list[Process] = []
        try:
            for doc in docs:
                added.append(Process(self.lifecycle.add(doc), self))
        except BaseException:
            # A step that could not be added (a full queue, an outage): the steps before it would wait for it for
            # ever, so they are canceled (best effort), and the error goes to the caller.
            for process in added:
                with contextlib.suppress(TaskSchedulerError):
                    self.lifecycle.cancel(self.lifecycle.load(process.id))
            raise
        return added

    def _mark_child(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A child added by the run of its parent that this (worker's) Scheduler runs belongs to that run: a
        later run of the parent (a retry, an interval run) does not inherit its failure."""
        run = self._run
        if run is not None and run.job is not None and parent_of(JobView(doc).data) == run.job:
            added_by_run(doc, run.run)
        return doc

    # -- reading jobs ----------------------------------------------------------------------------------------------

    def get_job(self, job_id: ObjectId) -> Process:
        """The job with this id; JobNotFoundError if there is none."""
        return Process(self.lifecycle.load(_object_id(job_id)), self)

    def get_jobs(self, query: Mapping[str, Any] | None = None) -> Iterator[Process]:
        """Jobs matching a MongoDB filter on the job document. ``None`` (the default) means the unfinished ones
        (WAITING, POSTPONED, PROCESSING); any filter, ``{}`` (every job) included, is used as given."""
        if query is None:
            query = jobs_filter([JobStatus.WAITING, JobStatus.POSTPONED, JobStatus.PROCESSING])
        if not isinstance(query, Mapping):
            raise InvalidArgumentError(f"query must be a mapping (a MongoDB filter), got {type(query).__name__}")
        for doc in self.store.find_jobs(query):
            yield Process(doc, self)

    # -- cancel, requeue and flush ---------------------------------------------------------------------------------

    def cancel_job(self, job_id: ObjectId) -> None:
        """Cancel a job for good: a waiting one never runs, a running one is killed, no further run follows;
        its unfinished children are canceled too."""
        self.lifecycle.cancel(self.lifecycle.load(_object_id(job_id)))

    def requeue_job(self, job_id: ObjectId) -> Process:
        """Run a FAILED, TIMEOUT or CANCELED job again: back to WAITING with the same id and the next run number."""
        return Process(self.lifecycle.requeue(self.lifecycle.load(_object_id(job_id))), self)

    # -- flow control (SPEC 8) -------------------------------------------------------------------------------------

    def set_limit(self, key: str, concurrency: int | None = None, rate: str | None = None) -> None:
        """Limit the runs under ``key`` (a class "module:QualName", or a ``limit_key``) in the whole cluster: at
        most ``concurrency`` at once, at most ``rate`` ("N/s", "N/m" or "N/h") starts in any such interval. Setting
        it again changes it; the runs holding its slots keep them."""
        key = checked_key(key)
        limit, per = checked_concurrency(concurrency), parse_rate(rate)
        if limit is None and per is None:
            raise InvalidArgumentError("set_limit needs concurrency, rate or both (remove_limit removes one)")
        self.store.set_limit(key, limit, per)
        self.store.count_running_runs(key)  # runs already going hold a slot each (given back as the run ends)

    def remove_limit(self, key: str) -> None:
        """No limit on ``key`` any more (nothing happens when there was none)."""
        self.store.remove_limit(checked_key(key))

    def limits(self) -> dict[str, dict[str, Any]]:
        """Every limit: ``{key: {"concurrency": N or None, "rate": "N/m" or None}}``."""
        return Controls.from_docs(self.store.flow_controls()).described()

    def pause(self, key: str) -> None:
        """Start no new run under ``key`` (a class, a ``limit_key``, or ``"*"`` for every job) anywhere in the
        cluster until :meth:`resume`; running runs finish. Due jobs wait; a recurring job's missed matches run once
        after the resume."""
        self.store.set_pause(checked_key(key, pause=True))

    def resume(self, key: str) -> None:
        """Undo :meth:`pause` of ``key``: its due jobs start within a second (nothing happens when not paused)."""
        self.store.remove_pause(checked_key(key, pause=True))

    def paused(self) -> list[str]:
        """The paused keys."""
        return sorted(Controls.from_docs(self.store.flow_controls()).paused)

    def flush(self) -> None:
        """Drop all jobs and events. Running queue nodes keep working and pick up jobs added afterwards."""
        self.store.flush()
        self._progress_writes.clear()

    def close(self) -> None:
        """Give back the room this Scheduler reserved ahead in a capped job collection and did not use: call it
        when done adding jobs (a process's exit does it too). The database's client stays open (it is the
        caller's) and the Scheduler stays usable. Never raises."""
        self.store.give_back()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- progress --------------------------------------------------------------------------------------------------

    def update_progress(self, job_id: ObjectId, progress: float | None = None) -> None:
        """Store a job's progress (0..100); ``None`` keeps the stored progress. Rate limited per job by
        ``progress_rate_limit`` ms: the first call and the final 100 always write."""
        if progress is not None and (
            isinstance(progress, bool)
            or not isinstance(progress, (int, float))
            or not math.isfinite(progress)
            or not 0 <= progress <= 100
        ):
            raise InvalidArgumentError(f"progress must be a number from 0 to 100, got {progress!r}")
        job_id = _object_id(job_id)
        if progress is None:
            if self.owner is None:
                self.lifecycle.load(job_id)  # JobNotFoundError for an unknown id
            return
        now = time.monotonic()
        limit = self._options[o.PROGRESS_RATE_LIMIT] / 1000
        last = self._progress_writes.get(job_id)
        if limit and last is not None and now - last < limit and progress != 100:
            return
        wait = PROGRESS_WAIT_SECONDS if self.owner is not None else None
        if not self.lifecycle.progress(job_id, round(float(progress), 2), self.owner, wait) and self.owner is None:
            self.lifecycle.load(job_id)  # JobNotFoundError for an unknown id; a finished job is left as it is
        if len(self._progress_writes) > 10_000:
            self._progress_writes = {k: t for k, t in self._progress_writes.items() if now - t < limit}
        self._progress_writes[job_id] = now

    # -- waiting ---------------------------------------------------------------------------------------------------

    def wait_for(
        self,
        processes: Iterable[Process],
        options: int = 0,
        timeout: float | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        """Block until every listed job has finished, updating the Process objects in place. A recurring job
        (interval or cron) counts as finished once the run its Process shows has ended (it then shows that run's
        outcome).

        With ``options & OPTION_THROW_EXCEPTION``, raise JobFailedError as soon as one ended FAILED for good.
        WaitTimeoutError after ``timeout`` seconds. Setting ``stop`` (from another thread) ends the wait early,
        within a second, without an error: how AsyncScheduler frees the thread of a cancelled wait.
        """
        by_id = _group_by_id(processes)
        if isinstance(options, bool) or not isinstance(options, int):
            raise InvalidArgumentError(f"options must be an int bit mask, got {options!r}")
        deadline = _deadline(timeout)
        if not by_id:
            return
        wait = _Wait(by_id, bool(options & self.OPTION_THROW_EXCEPTION))
        # Watch first, then read: a change between the two is seen at least once, never missed. Without
        # listeners the server sends no claims (PROCESSING): only what can end a job or one of its runs.
        listening = self._emitter.wants_status()
        wanted = None if listening else tuple(int(s) for s in JobStatus if s != JobStatus.PROCESSING)
        with self.store.status_feed(ids=list(by_id), lookup=False, statuses=wanted) as feed:
            gaps = feed.gaps
            self._read_pending(wait, list(by_id))
            seen_changes = bool(wait.pending)
            while wait.pending:
                if stop is not None and stop.is_set():
                    return
                change = feed.poll(
                    _poll_time(
                        deadline, lambda: f"{len(wait.pending)} of {len(by_id)} job(s) unfinished after {timeout} s"
                    )
                )
                if feed.gaps != gaps:  # the stream restarted without its resume token: changes may be lost
                    gaps = feed.gaps
                    self._read_pending(wait, list(wait.pending))
                    continue
                if change is None or change.job_id not in by_id:
                    continue
                doc = dict(change.document or by_id[change.job_id][0].document())
                doc.update(change.fields, status=change.status)
                if listening:
                    self.lifecycle.observe(change, doc, self._emitter)
                if wait.throw and change.status == JobStatus.FAILED:
                    doc = self.store.find_job(change.job_id) or doc  # JobFailedError carries the final job
                wait.settle(doc)
        if seen_changes:  # changes carried only statuses: read the final documents once, for all jobs together
            for doc in self.store.find_by_ids(by_id):
                for p in by_id[JobView(doc).id]:
                    p.refresh_from(doc)

    def _read_pending(self, wait: _Wait, ids: list[ObjectId]) -> None:
        found = {JobView(doc).id: doc for doc in self.store.find_by_ids(ids)}
        missing = [str(i) for i in ids if i not in found]
        if missing:
            raise JobNotFoundError(f"job {', '.join(missing)} was not found")
        for doc in found.values():
            wait.settle(doc)

    def listen(
        self,
        callback: Callable[[Process], Any],
        query: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        """Call ``callback(process)`` once per status change of a job matching ``query`` (a job filter, as for
        ``get_jobs``), until it returns True. WaitTimeoutError after ``timeout`` seconds; setting ``stop`` ends
        it early without an error."""
        if not callable(callback):
            raise InvalidArgumentError(f"callback must be callable, got {callback!r}")
        if query is not None and not isinstance(query, Mapping):
            raise InvalidArgumentError(f"query must be a mapping (a MongoDB filter), got {type(query).__name__}")
        deadline = _deadline(timeout)
        with self.store.status_feed(query=query) as feed:
            while stop is None or not stop.is_set():
                change = feed.poll(_poll_time(deadline, lambda: f"listen() got no final answer within {timeout} s"))
                if change is None or change.document is None:
                    continue
                process = Process(change.document, self)
                self.lifecycle.observe(change, change.document, self._emitter)
                if callback(process) is True:
                    return


class _Wait:
    """The jobs a wait_for call still waits for, and what counts as finished for each."""

    def __init__(self, by_id: Mapping[ObjectId, list[Process]], throw: bool) -> None:
        self.by_id = by_id
        self.throw = throw
        self.pending = set(by_id)
        #: A recurring job is finished for this wait once its run number passes the one its Process showed.
        self.run = {job_id: min(p.run for p in procs) for job_id, procs in by_id.items()}

    def settle(self, doc: dict[str, Any]) -> None:
        job_id = JobView(doc).id
        if job_id not in self.pending:
            return  # already finished: a late, older change must not move it back
        procs = self.by_id[job_id]
        for p in procs:
            p.refresh_from(doc)
        status = stored_status(doc)  # a malformed one: InvalidJobError naming the field
        process = procs[0]  # read through its robust accessors: a job ended FAILED as malformed settles too
        recurring = bool(process.options.get(o.INTERVAL) or process.options.get(o.CRON))
        if status.is_terminal or (recurring and process.run > self.run[job_id]):
            self.pending.discard(job_id)
            if self.throw and status == JobStatus.FAILED:
                raise JobFailedError(procs[0], procs[0].error)


def _group_by_id(processes: Iterable[Process]) -> dict[ObjectId, list[Process]]:
    procs: list[Any]
    if isinstance(processes, Process):
        procs = [processes]
    elif isinstance(processes, Iterable) and not isinstance(processes, (str, bytes, Mapping)):
        procs = list(processes)
    else:
        raise InvalidArgumentError(f"wait_for() requires Process objects, got {type(processes).__name__}")
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
