"""One error hierarchy. Each class's docstring says when it is raised and is its default message."""

from __future__ import annotations

from typing import Any, Protocol


class _Handle(Protocol):
    """A job's handle (a Process) as an error shows it."""

    @property
    def id(self) -> Any: ...


class TaskSchedulerError(Exception):
    """Base class of every error raised by taskscheduler."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidArgumentError(TaskSchedulerError, ValueError):
    """Raised when an option, argument or value is invalid; nothing is written."""


class DuplicateJobError(InvalidArgumentError):
    """Raised when a job with the given id (option ``id``) exists already; nothing is written."""


class JobNotFoundError(TaskSchedulerError, LookupError):
    """Raised when no job has the given id."""


class InvalidJobError(TaskSchedulerError):
    """Raised when a job class cannot be imported or does not implement JobInterface, or a stored job document
    does not match the job schema (recorded as a malformed job's error, naming the field)."""


class ChildJobFailedError(TaskSchedulerError):
    """Recorded as a parent job's error when one of its children ended FAILED or TIMEOUT."""


class JobTimeoutError(TaskSchedulerError):
    """Recorded as a job's error when it ran past its ``timeout`` and its worker process was killed."""


class DependencyFailedError(TaskSchedulerError):
    """Recorded on a job canceled because a job it depends on ended FAILED, TIMEOUT or CANCELED for good."""


class OrphanedJobError(TaskSchedulerError):
    """Recorded as a job's error when it was orphaned too often (its worker or node died, again and again)."""


class LeaseUnconfirmedError(TaskSchedulerError):
    """Recorded for a run its worker had to stop although its lease held: the job kept the Python interpreter busy
    in one call (a C call that does not release the GIL) for so long that the worker could not confirm its lease
    in time. Raise ``orphaned_timeout`` above the longest such call, or release the GIL in it."""


class JobReleasedError(TaskSchedulerError):
    """Recorded with a run that was interrupted and put back to WAITING (node stopped, worker died, lease lost)."""


class QueueFullError(TaskSchedulerError):
    """Raised when the capped job collection has no room without evicting an unfinished job."""


class JobFailedError(TaskSchedulerError):
    """Raised by wait_for with OPTION_THROW_EXCEPTION when a job ended FAILED."""

    def __init__(self, process: _Handle, error: dict[str, Any] | None) -> None:
        self.process = process
        self.error = error
        detail = f"{error.get('class')}: {error.get('message')}" if error else "no error recorded"
        super().__init__(f"job {process.id} failed: {detail}")


class WaitTimeoutError(TaskSchedulerError, TimeoutError):
    """Raised when wait_for or listen did not finish within its timeout."""


class SpawnForkError(TaskSchedulerError, RuntimeError):
    """Raised when a worker manager or worker process could not be forked."""


class SchedulerClosedError(TaskSchedulerError, RuntimeError):
    """Raised by an AsyncScheduler after close(): by its calls, and by the waits and listens close() ended."""


class ConfigurationError(TaskSchedulerError):
    """Raised when the MongoDB deployment cannot serve: not a replica set, or older than the supported floor."""


class MissingExtraError(ConfigurationError):
    """Raised when a feature needs an optional extra that is not installed; the message names the pip install."""


class EmbeddedServerError(TaskSchedulerError):
    """Raised when the embedded server is not installed, cannot use its port, or does not start."""


class ServerUnavailableError(TaskSchedulerError, ConnectionError):
    """Raised when the MongoDB server cannot be reached."""
