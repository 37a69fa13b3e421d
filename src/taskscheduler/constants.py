"""Job statuses, stored field values and every default, each documented where it is defined."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum, IntEnum

from bson import ObjectId

#: The library's version (the distribution's, in pyproject.toml).
VERSION = "0.1.0"


class KillReason(str, Enum):
    """Why a worker process was ended; decides what its node records for the job it ran."""

    TIMEOUT = "timeout"  # the job's timeout passed: TIMEOUT, then retry/interval rules
    CANCEL = "cancel"  # the job was canceled: the canceler recorded CANCELED
    STOP = "stop"  # the queue node stops: the job goes back to WAITING
    SHRINK = "shrink"  # an idle worker of a dynamic pool is no longer needed
    LOST = "lost"  # the lease could not be renewed or is held by someone else: never run a job twice
    STARVED = "starved"  # its kernel timer ended it while its lease held: the job kept the interpreter too long
    DIED = "died"  # nobody ended it: it crashed or was killed from outside
    MANAGER_DIED = "manager died"  # its worker manager died, and the node ended what was left of its workers

    @property
    def survived(self) -> bool:
        """Whether the node that ended the worker lives on: then a sweep that put the run back was no death."""
        return self in (KillReason.TIMEOUT, KillReason.STOP, KillReason.LOST, KillReason.CANCEL, KillReason.STARVED)


class JobStatus(IntEnum):
    """Status of a job; the integer is what MongoDB stores. ``status >= DONE`` means finished."""

    WAITING = 0
    POSTPONED = 1
    PROCESSING = 2
    DONE = 3
    FAILED = 4
    CANCELED = 5
    TIMEOUT = 6

    @property
    def is_terminal(self) -> bool:
        return self >= JobStatus.DONE

    def __str__(self) -> str:
        """Its name (``"DONE"``): a printed status reads as a word. Stored and compared, it is the integer."""
        return self.name

    def __format__(self, spec: str) -> str:
        return self.name.__format__(spec) if not spec or spec[-1] not in "bcdoxXn" else int(self).__format__(spec)


#: Statuses of a job that has not finished (upstream ``PENDING_JOBS``).
ACTIVE_STATUSES: tuple[int, ...] = (JobStatus.WAITING, JobStatus.POSTPONED, JobStatus.PROCESSING)
#: Statuses that end a job.
TERMINAL_STATUSES: tuple[int, ...] = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.TIMEOUT)

#: Stored in ``started``/``ended`` while unset. A capped collection forbids updates that change a document's
#: size, so the field holds a datetime from insert on; :class:`~taskscheduler.Process` shows it as ``None``.
UNSET_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: Stored in ``worker`` while no worker owns the job (same reason as :data:`UNSET_TIME`).
NO_WORKER = ObjectId("000000000000000000000000")

#: MongoDB the CLI and the examples use when no URI is given (a local server, straight to the node).
DEFAULT_MONGODB_URI = "mongodb://127.0.0.1:27017/?directConnection=true"
#: Database the CLI uses when none is given.
DEFAULT_DATABASE = "taskscheduler"

#: The node registry: one document per live queue node (ordinary collection, expired by TTL).
NODE_REGISTRY = "taskscheduler.nodes"
#: A node's registry entry expires after this many of its leases without a refresh.
NODE_EXPIRY_LEASES = 3

#: Default job collection.
DEFAULT_JOB_QUEUE = "taskscheduler.jobs"
#: Default size in bytes of the capped job collection (0 makes it an ordinary collection).
DEFAULT_JOB_QUEUE_SIZE = 100_000_000
#: Default event collection (one document per status change).
DEFAULT_EVENT_QUEUE = "taskscheduler.events"
#: Default size in bytes of the capped event collection (0 makes it an ordinary collection).
DEFAULT_EVENT_QUEUE_SIZE = 500_000_000
#: Seconds a finished job (and its events) is kept when the collection is not capped (TTL index).
DEFAULT_JOB_RETENTION = 604_800
#: Minimum milliseconds between two progress writes of one job from one process.
DEFAULT_PROGRESS_RATE_LIMIT = 500

#: Job option defaults (the scheduler's ``default_*`` options start from these).
DEFAULT_AT = 0
DEFAULT_INTERVAL = 0
DEFAULT_INTERVAL_REFERENCE = "end"
DEFAULT_RETRY = 0
DEFAULT_RETRY_INTERVAL = 300
DEFAULT_TIMEOUT = 0
DEFAULT_CRON = ""
DEFAULT_TIMEZONE = "UTC"
DEFAULT_RETRY_BACKOFF = 1.0
DEFAULT_RETRY_MAX_INTERVAL = 3600
DEFAULT_PRIORITY = 0

#: Seconds without a heartbeat after which a PROCESSING job is orphaned.
DEFAULT_ORPHANED_TIMEOUT = 30
#: The orphaning that ends a job FAILED instead of resetting it to WAITING.
MAX_ORPHANINGS = 3
#: The address a node's metrics endpoint listens on (``queue --metrics-host``): this machine only, unless told.
DEFAULT_METRICS_HOST = "127.0.0.1"

#: Worker manager defaults.
DEFAULT_PM = "dynamic"
DEFAULT_MIN_CHILDREN = 1
DEFAULT_MAX_CHILDREN = 2
#: Seconds an extra worker of a ``dynamic`` pool may stay idle before it is stopped (shrink back to min).
DYNAMIC_IDLE_SECONDS = 5.0
#: Seconds a worker (and its process group) gets after SIGTERM before it is killed with SIGKILL.
KILL_GRACE_SECONDS = 0.5
