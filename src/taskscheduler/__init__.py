"""mongodb-task-scheduler: parallel jobs across processes and machines, with MongoDB as the only infrastructure."""

from __future__ import annotations

from . import errors, events
from .constants import JobStatus
from .factory import DefaultWorkerFactory, WorkerFactory
from .job import AbstractJob, JobInterface
from .manager import WorkerManager
from .options import (
    AT as OPTION_AT,
)
from .options import (
    DEFAULT_AT as OPTION_DEFAULT_AT,
)
from .options import (
    DEFAULT_INTERVAL as OPTION_DEFAULT_INTERVAL,
)
from .options import (
    DEFAULT_INTERVAL_REFERENCE as OPTION_DEFAULT_INTERVAL_REFERENCE,
)
from .options import (
    DEFAULT_RETRY as OPTION_DEFAULT_RETRY,
)
from .options import (
    DEFAULT_RETRY_INTERVAL as OPTION_DEFAULT_RETRY_INTERVAL,
)
from .options import (
    DEFAULT_TIMEOUT as OPTION_DEFAULT_TIMEOUT,
)
from .options import (
    EVENT_QUEUE as OPTION_EVENT_QUEUE,
)
from .options import (
    EVENT_QUEUE_SIZE as OPTION_EVENT_QUEUE_SIZE,
)
from .options import (
    FORCE_SPAWN as OPTION_FORCE_SPAWN,
)
from .options import (
    ID as OPTION_ID,
)
from .options import (
    IGNORE_DATA as OPTION_IGNORE_DATA,
)
from .options import (
    INTERVAL as OPTION_INTERVAL,
)
from .options import (
    INTERVAL_REFERENCE as OPTION_INTERVAL_REFERENCE,
)
from .options import (
    JOB_QUEUE as OPTION_JOB_QUEUE,
)
from .options import (
    JOB_QUEUE_SIZE as OPTION_JOB_QUEUE_SIZE,
)
from .options import (
    JOB_RETENTION as OPTION_JOB_RETENTION,
)
from .options import (
    PROGRESS_RATE_LIMIT as OPTION_PROGRESS_RATE_LIMIT,
)
from .options import (
    RETRY as OPTION_RETRY,
)
from .options import (
    RETRY_INTERVAL as OPTION_RETRY_INTERVAL,
)
from .options import (
    TIMEOUT as OPTION_TIMEOUT,
)
from .process import Process
from .queue import Queue
from .scheduler import Scheduler
from .worker import Worker

#: wait_for() flag: raise JobFailedError when a job ends FAILED.
OPTION_THROW_EXCEPTION = Scheduler.OPTION_THROW_EXCEPTION

__version__ = "0.1.0"

__all__ = [
    "AbstractJob",
    "DefaultWorkerFactory",
    "JobInterface",
    "JobStatus",
    "OPTION_AT",
    "OPTION_DEFAULT_AT",
    "OPTION_DEFAULT_INTERVAL",
    "OPTION_DEFAULT_INTERVAL_REFERENCE",
    "OPTION_DEFAULT_RETRY",
    "OPTION_DEFAULT_RETRY_INTERVAL",
    "OPTION_DEFAULT_TIMEOUT",
    "OPTION_EVENT_QUEUE",
    "OPTION_EVENT_QUEUE_SIZE",
    "OPTION_FORCE_SPAWN",
    "OPTION_ID",
    "OPTION_IGNORE_DATA",
    "OPTION_INTERVAL",
    "OPTION_INTERVAL_REFERENCE",
    "OPTION_JOB_QUEUE",
    "OPTION_JOB_QUEUE_SIZE",
    "OPTION_JOB_RETENTION",
    "OPTION_PROGRESS_RATE_LIMIT",
    "OPTION_RETRY",
    "OPTION_RETRY_INTERVAL",
    "OPTION_THROW_EXCEPTION",
    "OPTION_TIMEOUT",
    "Process",
    "Queue",
    "Scheduler",
    "Worker",
    "WorkerFactory",
    "WorkerManager",
    "__version__",
    "errors",
    "events",
]
