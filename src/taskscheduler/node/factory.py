"""WorkerFactory: builds the manager and the workers inside their freshly forked processes."""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from bson import ObjectId

from .. import options as o
from ..client.scheduler import Scheduler
from ..errors import InvalidArgumentError
from ..store import connect
from .manager import WorkerManager
from .worker import Worker


class WorkerFactory(ABC):
    """Implement both methods; each runs in a new child process and must open its own MongoClient there."""

    @abstractmethod
    def build_worker(self, worker_id: ObjectId) -> Worker:
        """Build the Worker of a freshly forked worker process."""

    @abstractmethod
    def build_manager(self) -> WorkerManager:
        """Build the WorkerManager of a freshly forked manager process."""


class DefaultWorkerFactory(WorkerFactory):
    """A factory that connects to ``mongodb_uri``/``database`` in each child and imports the job modules."""

    def __init__(
        self,
        mongodb_uri: str,
        database: str,
        scheduler_options: Mapping[str, Any] | None = None,
        manager_options: Mapping[str, Any] | None = None,
        imports: Iterable[str] = (),
    ) -> None:
        if not isinstance(mongodb_uri, str) or not mongodb_uri:
            raise InvalidArgumentError(f"mongodb_uri must be a MongoDB URI string, got {mongodb_uri!r}")
        if not isinstance(database, str) or not database:
            raise InvalidArgumentError(f"database must be a database name, got {database!r}")
        self.mongodb_uri = mongodb_uri
        self.database = database
        self.scheduler_options = dict(o.validate(scheduler_options, o.SCHEDULER_OPTIONS, "scheduler"))
        self.manager_options = o.manager_options(manager_options)
        self.imports = o.module_names("imports", list(imports))
        self.logger = logging.getLogger("taskscheduler")

    def import_modules(self) -> None:
        """Import the configured job modules (the manager does it once, so forked workers inherit them)."""
        for name in self.imports:
            importlib.import_module(name)

    def build_worker(self, worker_id: ObjectId) -> Worker:
        self.import_modules()
        db = connect(self.mongodb_uri, self.database)
        scheduler = Scheduler(db, self.logger, self.scheduler_options)
        return Worker(worker_id, scheduler, db, self.logger, job_modules=self.imports)

    def build_manager(self) -> WorkerManager:
        self.import_modules()
        return WorkerManager(self, self.logger, self.manager_options)
