"""Worker: runs jobs inside one forked process, owning each through an atomic claim."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any, Protocol

from bson import ObjectId
from pymongo.database import Database

from . import lifecycle
from .constants import JobStatus
from .errors import ChildJobFailedError, InvalidArgumentError, InvalidJobError, ServerUnavailableError
from .job import JobInterface, load_job_class
from .process import Process
from .scheduler import Scheduler
from .store import is_encodable, utcnow

#: Attempts at recording a job's end while MongoDB is unreachable (about 6 s in all).
RECORD_ATTEMPTS = 6
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
    ) -> None:
        if not isinstance(worker_id, ObjectId):
            raise InvalidArgumentError(f"worker_id must be a bson.ObjectId, got {worker_id!r}")
        if not isinstance(scheduler, Scheduler):
            raise InvalidArgumentError(f"scheduler must be a taskscheduler.Scheduler, got {type(scheduler).__name__}")
        if container is not None and not callable(getattr(container, "get", None)):
            raise InvalidArgumentError("container must have a get(cls) method")
        self.id = worker_id
        self.scheduler = scheduler
        self.db = db
        self.logger = logger or logging.getLogger("taskscheduler.worker")
        self.container = container
        scheduler._owner = worker_id

    # -- entry points ----------------------------------------------------------------------------------------------

    def process_one(self, job_id: ObjectId) -> Process:
        """Claim and run one job in this process (no hard timeout here: that is the manager's job)."""
        doc = self.scheduler._load(job_id)
        self.run(doc)
        return self.scheduler.get_job(doc["_id"])

    def serve(self, connection: Connection, job: Mapping[str, Any] | None = None) -> None:
        """The worker process's loop: run what the manager sends until told to exit (one job if ``job``)."""
        if job is not None:
            self.run(job, connection)
            return
        while True:
            try:
                kind, payload = connection.recv()
            except (EOFError, OSError):
                return
            if kind == "exit":
                return
            if kind == "run":
                self.run(payload, connection)

    def run(self, job: Mapping[str, Any], connection: Connection | None = None) -> bool:
        """Claim ``job`` and run it; False when another worker had it first (or it may not run)."""
        doc = dict(job)
        if not self._parent_allows(doc) or not self.scheduler._store.claim(doc["_id"], self.id, utcnow()):
            _send(connection, ("lost", doc["_id"]))
            return False
        started = utcnow()
        doc.update(status=int(JobStatus.PROCESSING), worker=self.id, started=started, alive=started, progress=0.0)
        timeout = int((doc.get("options") or {}).get("timeout", 0))
        _send(connection, ("claimed", doc["_id"], timeout))
        self.logger.info("claimed job", extra={"job_id": doc["_id"], "worker": self.id, "job_class": doc["class"]})
        self.scheduler._emitter.emit_status(JobStatus.PROCESSING, Process(dict(doc), self.scheduler))
        try:
            self._execute(doc)
        finally:
            _send(connection, ("finished", doc["_id"]))
        return True

    # -- steps -----------------------------------------------------------------------------------------------------

    def _parent_allows(self, doc: dict[str, Any]) -> bool:
        """A child whose parent ended FAILED, CANCELED or TIMEOUT is CANCELED instead of run."""
        data = doc.get("data")
        parent_id = data.get("parent") if isinstance(data, Mapping) else None
        if not isinstance(parent_id, ObjectId):
            return True
        parent = self.scheduler._store.find_job(parent_id)
        if parent is None or parent.get("status") not in PARENT_ENDED_BADLY:
            return True
        try:
            self.scheduler._cancel_document(doc)
        except InvalidArgumentError:
            pass  # it ended meanwhile
        return False

    def _execute(self, doc: dict[str, Any]) -> None:
        try:
            instance = self._instantiate(doc)
            result = instance.start()
            self._check_children(doc)
        except (Exception, SystemExit) as exc:  # sys.exit() in a job fails the job, not the worker
            self.logger.error("job failed", extra={"job_id": doc["_id"], "error": repr(exc)}, exc_info=True)
            end = lifecycle.RunEnd(self.scheduler, doc, self.id, JobStatus.FAILED, error=lifecycle.describe_error(exc))
            self._record(end.record)
            return
        has_result = result is not None and is_encodable(result)
        if result is not None and not has_result:
            self.logger.warning(
                "job result is not BSON-encodable and is not stored",
                extra={"job_id": doc["_id"], "result_type": type(result).__name__},
            )
        stored = result if has_result else None
        self._record(
            lifecycle.RunEnd(self.scheduler, doc, self.id, JobStatus.DONE, result=stored, has_result=has_result).record
        )

    def _record(self, write: Callable[[], bool]) -> None:
        """Record a job's end, riding out a short MongoDB outage (the job's work is done: keep it)."""
        for attempt in range(RECORD_ATTEMPTS):
            try:
                write()
                return
            except ServerUnavailableError:
                if attempt == RECORD_ATTEMPTS - 1:
                    raise
                self.logger.warning("cannot record job end yet; retrying", extra={"attempt": attempt + 1})
                time.sleep(min(2.0, 0.2 * 2**attempt))

    def _instantiate(self, doc: Mapping[str, Any]) -> JobInterface:
        cls = load_job_class(str(doc.get("class")))
        instance = self.container.get(cls) if self.container is not None else cls()
        if not isinstance(instance, JobInterface):
            raise InvalidJobError(f"job class {doc.get('class')!r} does not implement taskscheduler.JobInterface")
        instance.data = doc.get("data")
        instance.id = doc["_id"]
        instance.scheduler = self.scheduler
        return instance

    def _check_children(self, doc: Mapping[str, Any]) -> None:
        for child in self.scheduler._store.children(doc["_id"]):
            status = JobStatus(child["status"])
            if status in (JobStatus.FAILED, JobStatus.TIMEOUT):
                raise ChildJobFailedError(f"child job {child['_id']} ended {status.name}")


def _send(connection: Connection | None, message: tuple[Any, ...]) -> None:
    if connection is None:
        return
    try:
        connection.send(message)
    except (OSError, ValueError):
        pass  # the manager is gone; our writes stay conditional on ownership, so nothing is corrupted
