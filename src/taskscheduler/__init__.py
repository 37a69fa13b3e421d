"""mongodb-task-scheduler: parallel jobs across processes and machines, with MongoDB as the only infrastructure."""

from __future__ import annotations

from . import errors, events
from .client.asynchronous import AsyncProcess, AsyncScheduler
from .client.job import AbstractJob, JobInterface, current_job
from .client.process import Process
from .client.scheduler import Scheduler
from .constants import VERSION, JobStatus
from .node.factory import DefaultWorkerFactory, WorkerFactory
from .node.manager import WorkerManager
from .node.queue import Queue
from .node.worker import Worker

__version__ = VERSION

# The option names, also at package level (the same strings as the Scheduler.OPTION_* attributes).
OPTION_AT = Scheduler.OPTION_AT
OPTION_INTERVAL = Scheduler.OPTION_INTERVAL
OPTION_INTERVAL_REFERENCE = Scheduler.OPTION_INTERVAL_REFERENCE
OPTION_RETRY = Scheduler.OPTION_RETRY
OPTION_RETRY_INTERVAL = Scheduler.OPTION_RETRY_INTERVAL
OPTION_FORCE_SPAWN = Scheduler.OPTION_FORCE_SPAWN
OPTION_TIMEOUT = Scheduler.OPTION_TIMEOUT
OPTION_ID = Scheduler.OPTION_ID
OPTION_IGNORE_DATA = Scheduler.OPTION_IGNORE_DATA
OPTION_CRON = Scheduler.OPTION_CRON
OPTION_TIMEZONE = Scheduler.OPTION_TIMEZONE
OPTION_RETRY_BACKOFF = Scheduler.OPTION_RETRY_BACKOFF
OPTION_RETRY_MAX_INTERVAL = Scheduler.OPTION_RETRY_MAX_INTERVAL
OPTION_RETRY_JITTER = Scheduler.OPTION_RETRY_JITTER
OPTION_PRIORITY = Scheduler.OPTION_PRIORITY
OPTION_THROW_EXCEPTION = Scheduler.OPTION_THROW_EXCEPTION
OPTION_JOB_QUEUE = Scheduler.OPTION_JOB_QUEUE
OPTION_JOB_QUEUE_SIZE = Scheduler.OPTION_JOB_QUEUE_SIZE
OPTION_EVENT_QUEUE = Scheduler.OPTION_EVENT_QUEUE
OPTION_EVENT_QUEUE_SIZE = Scheduler.OPTION_EVENT_QUEUE_SIZE
OPTION_DEFAULT_AT = Scheduler.OPTION_DEFAULT_AT
OPTION_DEFAULT_INTERVAL = Scheduler.OPTION_DEFAULT_INTERVAL
OPTION_DEFAULT_INTERVAL_REFERENCE = Scheduler.OPTION_DEFAULT_INTERVAL_REFERENCE
OPTION_DEFAULT_RETRY = Scheduler.OPTION_DEFAULT_RETRY
OPTION_DEFAULT_RETRY_INTERVAL = Scheduler.OPTION_DEFAULT_RETRY_INTERVAL
OPTION_DEFAULT_TIMEOUT = Scheduler.OPTION_DEFAULT_TIMEOUT
OPTION_JOB_RETENTION = Scheduler.OPTION_JOB_RETENTION
OPTION_PROGRESS_RATE_LIMIT = Scheduler.OPTION_PROGRESS_RATE_LIMIT

__all__ = [
    "AbstractJob",
    "AsyncProcess",
    "AsyncScheduler",
    "DefaultWorkerFactory",
    "JobInterface",
    "JobStatus",
    "OPTION_AT",
    "OPTION_CRON",
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
    "OPTION_PRIORITY",
    "OPTION_PROGRESS_RATE_LIMIT",
    "OPTION_RETRY",
    "OPTION_RETRY_BACKOFF",
    "OPTION_RETRY_INTERVAL",
    "OPTION_RETRY_JITTER",
    "OPTION_RETRY_MAX_INTERVAL",
    "OPTION_THROW_EXCEPTION",
    "OPTION_TIMEOUT",
    "OPTION_TIMEZONE",
    "Process",
    "Queue",
    "Scheduler",
    "Worker",
    "WorkerFactory",
    "WorkerManager",
    "__version__",
    "current_job",
    "errors",
    "events",
]
