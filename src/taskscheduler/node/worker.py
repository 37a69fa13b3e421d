"""Worker: runs jobs inside one forked process, owning each through an atomic claim."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from multiprocessing.connection import Connection
from typing import Any, Protocol

from bson import ObjectId
from bson.errors import InvalidDocument
from pymongo.database import Database
from pymongo.errors import PyMongoError

from .. import failpoints
from .. import options as o
from ..client.job import (
    FunctionJob,
    JobInterface,
    load_job_class,
    reset_current_job,
    serves,
    set_current_job,
)
from ..client.process import Process
from ..client.scheduler import Scheduler
from ..constants import DEFAULT_ORPHANED_TIMEOUT, JobStatus
from ..core.changes import Change, ChildrenAdded, RunEnd, describe_error
from ..core.dependencies import verdicts
from ..errors import ChildJobFailedError, InvalidArgumentError, InvalidJobError, ServerUnavailableError
from ..store.records import JobRecord, RunContext
from ..store.schema import problem
from ..store.views import JobView
from . import forking
from .fencing import LeaseSlot, SelfFence, lease_clock
from .protocol import DATA_LEFT_OUT, Claimed, Ending, Exit, Finished, RunJob
from .slots import Slots

#: Seconds a worker keeps trying to record a run's end while MongoDB is unreachable. (If its node cannot renew
#: the lease meanwhile, the node kills it first: the job then runs again elsewhere.)
RECORD_PATIENCE_SECONDS = 600.0
#: Reads that look whether a claim whose answer was lost was written.
CLAIM_CHECKS = 4
#: Seconds after a SIGTERM during which a job's failure may be the stop's doing (systemd signals every process of
#: the unit, the job's own programs too): the worker waits this long for its manager's stop before recording it.
TERMINATED_FAILURE_SECONDS = 3.0
#: Statuses of a parent that cancel its waiting children instead of running them.
PARENT_ENDED_BADLY = (JobStatus.FAILED, JobStatus.CANCELED, JobStatus.TIMEOUT)


class Container(Protocol):
    """What a worker needs of a dependency-injection container (PSR-11 analogue)."""

    def get(self, cls: type) -> Any: ...


class Worker:
    """Claims and runs jobs; built by a WorkerFactory inside its own freshly forked process."""

    def __init__(
        self,
        worker_id: ObjectId,
        scheduler: Scheduler,
        db: Database[dict[str, Any]],
        logger: logging.Logger | None = None,
        container: Container | None = None,
        job_modules: Iterable[str] | None = None,
    ) -> None:
        if not isinstance(worker_id, ObjectId):
            raise InvalidArgumentError(f"worker_id must be a bson.ObjectId, got {worker_id!r}")
        if not isinstance(scheduler, Scheduler):
            raise InvalidArgumentError(f"scheduler must be a taskscheduler.Scheduler, got {type(scheduler).__name__}")
        if container is not None and not callable(getattr(container, "get", None)):
            raise InvalidArgumentError("container must have a get(cls) method")
        self.id = worker_id
        self.scheduler = scheduler
        self.life = scheduler.lifecycle
        self.db = db
        self.logger = logger or logging.getLogger("taskscheduler.worker")
        self.container = container
        #: The allow-list: job code is imported from these modules (and their submodules) only; None: any.
        self.job_modules = None if job_modules is None else tuple(job_modules)
        self._connection: Connection | None = None  # to the manager, while a job runs
        self._fence: SelfFence | None = None  # under a manager: stops the job before its lease can run out
        self._terminated_at: float | None = None  # when a SIGTERM last reached this worker (lease_clock)
        self._ended: int | None = None  # the status this worker recorded for its run's end (node metrics)
        self.slots = Slots(self.life.store, worker_id, self.logger)  # of the limits its runs are under (SPEC 8)

    # -- entry points ----------------------------------------------------------------------------------------------

    def process_one(self, job_id: ObjectId, lease: float = DEFAULT_ORPHANED_TIMEOUT) -> Process:
        """Claim and run one job in this process (no hard timeout and no lease renewal: those are a node's)."""
        doc = self.life.load(job_id)
        self.run(doc, lease=lease)
        return self.scheduler.get_job(JobView(doc).id)

    def serve(self, connection: Connection, job: RunJob | None = None, slot: LeaseSlot | None = None) -> None:
        """The worker process's loop: run what the manager sends until told to exit (one job if ``job``). With the
        ``slot`` its manager shares, the worker fences itself (see :mod:`taskscheduler.node.fencing`)."""
        if slot is not None:
            lease = job.lease if job is not None else DEFAULT_ORPHANED_TIMEOUT
            self._fence = SelfFence(slot, lease)
            signal.signal(signal.SIGTERM, self._on_terminate)  # the stop itself is the manager's to carry out
        try:
            if job is not None:
                self.run(job.doc, connection, job.lease, job.limits)
                return
            while self._fence is None or not self._fence.stop_requested():
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    return
                match message:
                    case Exit():
                        return
                    case RunJob(doc=doc, lease=lease, limits=limits):
                        self.run(doc, connection, lease, limits)
        finally:
            self.scheduler.close()  # room its jobs reserved for child jobs and did not use (the process _exits)

    def run(
        self,
        job: Mapping[str, Any],
        connection: Connection | None = None,
        lease: float = DEFAULT_ORPHANED_TIMEOUT,
        limits: tuple[str, ...] = (),
    ) -> bool:
        """Claim ``job`` and run it; False when another worker had it first (or it may not run). ``limits``: the
        keys under a limit whose slots the run must hold (taken before the claim, given back after the run)."""
        doc = self._whole(dict(job), connection)
        if doc is None:
            return False
        job_record = self._fit(doc, connection)
        if job_record is None or not self._admitted(job_record, doc, connection, limits):
            return False
        failpoints.hit("worker.admitted")  # (tests: a pause or a limit written while a claim is under way)
        fence = self._fence if connection is not None else None
        # Armed before the claim is sent: from here on this process dies before the lease it may win can expire,
        # unless its manager moves the fence on (the node renewed the lease) or the job's code has returned.
        claimed_at = fence.arm(lease) if fence is not None else lease_clock()
        try:
            claimed = self._claim(doc, job_record, lease) if self._parent_allows(job_record, doc) else None
        except ServerUnavailableError:  # the claim's outcome is unknown: hand it over again later
            claimed, unsettled = None, True
        else:
            unsettled = False
        if claimed is None:
            if fence is not None:
                fence.end()
            self.slots.give_back(job_record.id, limits)
            _send(connection, Finished(job_record.id, False, unsettled=unsettled))
            return False
        failpoints.hit("worker.claimed")
        if fence is not None and not fence.holds():  # paused or cut off since the claim: never start it now
            fence.stop_now("the job was claimed, but its lease may have run out before its code could start")
        # Checked before the claim (_fit); the claim wrote its own fields, with their types.
        record = JobRecord.from_doc(claimed, checked=True)
        timeout = int(record.option(o.TIMEOUT, 0))
        _send(connection, Claimed(record.id, timeout, record.run, claimed_at))
        if fence is not None:
            fence.watch()
        self._connection = connection
        self._ended = None
        try:
            self._execute(record)
        finally:
            self._connection = None
            self.slots.give_back(record.id, limits)
            _send(connection, Finished(record.id, True, self._ended))
            if fence is not None:
                self._reap_orphans()
        return True

    # -- steps -----------------------------------------------------------------------------------------------------

    def _admitted(
        self, job: JobRecord, doc: Mapping[str, Any], connection: Connection | None, limits: tuple[str, ...]
    ) -> bool:
        """Whether this worker may try to claim the job (``doc`` as read, fit to run: see :meth:`_fit`): it lies in
        the allow-list, no stop is under way, and the run holds a slot of every limit it is under (SPEC 8). When
        not, the manager is told."""
        if self.job_modules is not None and not serves(job.job_class, self.job_modules):
            self.logger.warning(
                f"not running job {job.id}: class {job.job_class!r} is outside this node's allowed modules",
                extra={"job_id": job.id, "job_class": job.job_class},
            )
            _send(connection, Finished(job.id, False))
            return False
        fence = self._fence if connection is not None else None
        if fence is not None and fence.stop_requested():
            _send(connection, Finished(job.id, False))
            return False
        try:
            if not self._dependencies_done(job, doc) or (limits and not self.slots.take(job.id, limits)):
                _send(connection, Finished(job.id, False, held_back=True))
                return False
        except ServerUnavailableError:
            _send(connection, Finished(job.id, False, unsettled=True))
            return False
        return True

    def _whole(self, doc: dict[str, Any], connection: Connection | None) -> dict[str, Any] | None:
        """The job to claim: as handed over, or, when its large data was left out, as it is stored now (None when
        it can no longer be claimed, after telling the manager)."""
        if not doc.pop(DATA_LEFT_OUT, False):
            return doc
        handed = JobView(doc)  # not checked yet: the stored one is, next (_fit)
        try:
            stored = self.life.store.find_job(handed.id)
        except ServerUnavailableError:
            _send(connection, Finished(handed.id, False, unsettled=True))
            return None
        now = JobView(stored) if stored is not None else None
        if now is None or now.status_value != JobStatus.WAITING or not now.same_run(handed):
            _send(connection, Finished(handed.id, False))
            return None
        return stored

    def _fit(self, doc: dict[str, Any], connection: Connection | None) -> JobRecord | None:
        """The job's record when its document fits the schema (SPEC 2); a malformed one is ended FAILED naming the
        field (or skipped when it cannot take that write), never run, and never the end of this worker: None."""
        try:
            found = problem(doc, capped=self.life.store.capped)
            if found is not None and not self.life.reject(doc, found):
                self.logger.warning("not running malformed job %s: %s", JobView(doc).ref, found)
        except ServerUnavailableError:
            _send(connection, Finished(JobView(doc).id, False, unsettled=True))
            return None
        if found is not None:
            _send(connection, Finished(JobView(doc).id, False))
            return None
        return JobRecord.from_doc(doc, checked=True)  # checked just above

    def _dependencies_done(self, job: JobRecord, doc: Mapping[str, Any]) -> bool:
        """Whether every job this one depends on has ended DONE (SPEC 8): the node hands such a job over only then;
        this looks once more, for a hand-over that went wrong (one read, for jobs with dependencies only)."""
        verdict = verdicts(self.life.store, [doc]).get(job.id)
        return verdict is None or verdict.ready

    def _claim(self, doc: Mapping[str, Any], job: JobRecord, lease: float) -> dict[str, Any] | None:
        """Claim the run ``doc`` (``job`` as read) is of: the claimed document, None when another worker had it
        first; ServerUnavailableError when whether the claim was written cannot be told."""
        try:
            return self.life.claim(doc, self.id, lease)
        except ServerUnavailableError:
            pass
        # The claim's answer was lost: it may or may not be written. Look, while the server lets us.
        for attempt in range(CLAIM_CHECKS):
            time.sleep(0.2 * 2**attempt)
            try:
                stored = self.life.store.find_job(job.id)
            except ServerUnavailableError:
                continue
            if stored is None:
                return None
            now = JobView(stored)  # anyone may have written it meanwhile
            if now.status_value == JobStatus.PROCESSING and now.worker == self.id:
                return stored
            if now.status_value == JobStatus.WAITING:
                raise ServerUnavailableError(f"the claim of job {job.id} was not written")  # try again later
            return None
        # Still unknown. If it was written, the lease runs out and the job is put back; if not, it is still WAITING.
        raise ServerUnavailableError(f"cannot tell whether the claim of job {job.id} was written")

    def _parent_allows(self, job: JobRecord, doc: dict[str, Any]) -> bool:
        """A child whose parent ended FAILED, CANCELED or TIMEOUT is CANCELED instead of run (``doc``: ``job`` as
        read, which the cancel is conditional on)."""
        parent_id = job.parent
        if parent_id is None:
            return True
        parent = self.life.store.find_job(parent_id)
        if parent is None or JobView(parent).status_value not in PARENT_ENDED_BADLY:  # a parent may be malformed
            return True
        try:
            self.life.cancel(doc)
        except InvalidArgumentError:
            pass  # it ended meanwhile
        return False

    def _execute(self, job: JobRecord) -> None:
        token = None
        try:
            instance = self._instantiate(job)
            token = set_current_job(instance)
            result = _run_to_completion(instance.start())
        except BaseException as exc:  # sys.exit() or any other exit from start() fails the run, not the worker
            self._await_stop_after_terminate()
            self._returned(job)
            self._failed(job, exc, exc_info=True)
            return
        finally:
            if token is not None:
                reset_current_job(token)
        self._returned(job)  # from here on, no fence or timeout: the work is done
        try:
            self._done(job, result)
        except ChildJobFailedError as exc:
            self._failed(job.evolve(children=True), exc, exc_info=False)

    def _done(self, job: JobRecord, result: Any) -> None:
        """Record a run whose code returned: DONE, unless a child of this run ended FAILED or TIMEOUT meanwhile
        (ChildJobFailedError). The children are looked at only when the job ever had one: a job that had none is
        ended DONE on condition that it still has none (ChildrenAdded: one came meanwhile, look now)."""
        if job.children is not False:
            self._look_at_children(job)
        try:
            self._record(self.life.end(job, self.id, JobStatus.DONE, result=result, has_result=result is not None))
        except ChildrenAdded:
            job = job.evolve(children=True)
            self._look_at_children(job)
            self._record(self.life.end(job, self.id, JobStatus.DONE, result=result, has_result=result is not None))

    def _look_at_children(self, job: JobRecord) -> None:
        """ChildJobFailedError when a child of this run ended FAILED or TIMEOUT. The library's own read: an outage
        here is ridden out, never the job's failure."""
        self._patiently(lambda: self._check_children(job))

    def _on_terminate(self, signum: int, frame: object) -> None:
        self._terminated_at = lease_clock()

    def _await_stop_after_terminate(self) -> None:
        """A job that failed right after a SIGTERM may have failed because of it (its programs got it too): when
        its node is stopping, the run is put back like any other a stop interrupts, not recorded FAILED."""
        fence = self._fence
        if fence is None or self._terminated_at is None:
            return
        deadline = self._terminated_at + TERMINATED_FAILURE_SECONDS
        while lease_clock() < deadline:
            if fence.stop_requested():
                fence.stop_now("its queue node stops (the job failed after the stop's SIGTERM)")
            time.sleep(0.02)

    def _reap_orphans(self) -> None:
        """Reap what ended below this worker (it is a subreaper): daemons a job left, now exited."""
        for _ in forking.exited():
            pass

    def _returned(self, job: JobRecord) -> None:
        """The job's code returned: what is left is recording its end, which no fence, timeout or stop may kill."""
        if self._fence is not None and self._connection is not None:
            self._fence.end()
        _send(self._connection, Ending(job.id))
        failpoints.hit("worker.returned")

    def _failed(self, job: JobRecord, exc: BaseException, exc_info: bool) -> None:
        self.logger.error(
            f"job {job.id} ({job.job_class!r}) run {job.run} failed: {exc!r}",
            extra={"job_id": job.id, "job_class": job.job_class, "error": repr(exc)},
            exc_info=exc_info,
        )
        self._record(self.life.end(job, self.id, JobStatus.FAILED, error=describe_error(exc)))

    def _patiently(self, step: Callable[[], None]) -> None:
        """Run a step that reads or writes MongoDB, trying again while the server is unreachable."""
        deadline = time.monotonic() + RECORD_PATIENCE_SECONDS
        attempt = 0
        while True:
            try:
                step()
                return
            except ServerUnavailableError:
                if time.monotonic() > deadline:
                    raise
                attempt += 1
                self.logger.warning(f"MongoDB unreachable; trying again (attempt {attempt})")
                time.sleep(min(2.0, 0.1 * 2**attempt))

    def _record(self, change: Change) -> None:
        """Record a run's end, riding out a MongoDB outage: the job's work is done, so keep it. The same prepared
        change is written each time, so a retry never records it twice."""
        deadline = time.monotonic() + RECORD_PATIENCE_SECONDS
        attempt = 0
        while True:
            try:
                if change.record() and isinstance(change, RunEnd):
                    self._ended = int(change.status)
                return
            except ServerUnavailableError:
                if time.monotonic() > deadline:
                    raise
                attempt += 1
                self.logger.warning(
                    f"cannot record the end of job {change.job.id} yet (MongoDB unreachable); retrying",
                    extra={"attempt": attempt},
                )
                time.sleep(min(2.0, 0.1 * 2**attempt))
            except (PyMongoError, InvalidDocument) as exc:  # the server refused it: record that, not nothing
                if not isinstance(change, RunEnd) or change.fallback:
                    raise
                self.logger.exception("cannot record job end; recording the failure to record it instead")
                error = describe_error(exc)
                error["message"] = f"the run's outcome could not be stored: {error['message']}"
                change = self.life.end(change.job, self.id, JobStatus.FAILED, error=error)
                change.fallback = True

    def _instantiate(self, job: JobRecord) -> JobInterface:
        target = load_job_class(job.job_class, self.job_modules)
        if not isinstance(target, type):
            instance: Any = FunctionJob(target)
        else:
            instance = self.container.get(target) if self.container is not None else target()
        if not isinstance(instance, JobInterface):
            raise InvalidJobError(f"job class {job.job_class!r} does not implement taskscheduler.JobInterface")
        instance.data = job.data
        instance.id = job.id
        instance.scheduler = self.scheduler.for_run(RunContext(self.id, job.id, job.run))
        return instance

    def _check_children(self, job: JobRecord) -> None:
        run = job.run
        for doc in self.life.store.children(job.id):
            child = JobView(doc)  # anyone may write a child: a malformed one is no failure of this run
            if not child.added_by_run(run):
                continue  # a child of an earlier run: its outcome was that run's
            status = child.known_status
            if status is not None and status in (JobStatus.FAILED, JobStatus.TIMEOUT):
                raise ChildJobFailedError(f"child job {child.id} ended {status.name}")


def _run_to_completion(result: Any) -> Any:
    """A coroutine (an ``async def start``) runs to its end in an event loop of this worker's own; a timeout or
    cancel kills the worker process, loop and all, as it kills a sync job."""
    if inspect.isawaitable(result):
        return asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _send(connection: Connection | None, message: Claimed | Ending | Finished) -> None:
    if connection is None:
        return
    try:
        connection.send(message)
    except (OSError, ValueError):
        pass  # the manager is gone; our writes stay conditional on ownership, so nothing is corrupted
