"""Process: the handle of one job, as returned by the Scheduler (not an OS process: those are "child"/"pid")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from bson import ObjectId

from ..constants import JobStatus
from ..core.lifecycle import Lifecycle
from ..store.records import EventRecord
from ..store.schema import problem
from ..store.views import JobView


class Source(Protocol):
    """What a Process asks of the Scheduler it came from."""

    @property
    def OPTION_THROW_EXCEPTION(self) -> int: ...  # noqa: N802 - the Scheduler's constant
    lifecycle: Lifecycle

    def wait_for(self, processes: Iterable[Process], options: int = 0, timeout: float | None = None) -> None: ...

_UNLOADED = object()


def plain(value: Any) -> Any:
    """A stored value as plain JSON: ObjectIds as strings, datetimes as ISO 8601, bytes as hex."""
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # Decimal128, Regex, Timestamp...: their text


class Process:
    """A read-only view of a stored job, with ``refresh()``, ``wait()`` and ``to_dict()``."""

    def __init__(self, document: dict[str, Any], scheduler: Source) -> None:
        self._doc = document
        self._job = JobView(document)  # any stored job, malformed ones too: each field read leniently
        self._scheduler = scheduler
        self._outcome: EventRecord | None | object = _UNLOADED

    def __repr__(self) -> str:
        return f"<Process {self._job.id_value} {self.job_class} {self._job.label.upper()}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Process) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def id(self) -> ObjectId:
        job_id: ObjectId = self._job.id
        return job_id

    @property
    def job_class(self) -> str:
        return self._job.job_class

    @property
    def data(self) -> Any:
        return self._job.data

    @property
    def options(self) -> dict[str, Any]:
        return self._job.options

    @property
    def status(self) -> JobStatus:
        """The job's status; ``errors.InvalidJobError`` (naming the field) when the stored one is no status."""
        return self._job.status

    @property
    def progress(self) -> float:
        return self._job.progress

    @property
    def worker(self) -> ObjectId | None:
        worker: ObjectId | None = self._job.worker
        return worker

    @property
    def created(self) -> datetime | None:
        return self._job.created

    @property
    def started(self) -> datetime | None:
        return self._job.started

    @property
    def ended(self) -> datetime | None:
        return self._job.ended

    @property
    def run(self) -> int:
        """The current run's number (1 for the first), or the last run's when the job has ended."""
        return self._job.run

    @property
    def malformed(self) -> str | None:
        """What makes the stored document unfit to run, naming the field (SPEC 2), or None; judged as in a capped
        collection, which every document this library writes fits. A queue node ends such a job FAILED when it
        meets it, unless the document cannot even take that write."""
        return problem(self._doc, capped=True)

    @property
    def error(self) -> dict[str, Any] | None:
        """The error of the last ended run (FAILED, TIMEOUT, orphaned): ``class``, ``message``, ``traceback``."""
        event = self._event()
        error = event.error if event else None
        return dict(error) if error else None

    @property
    def result(self) -> Any:
        """What ``start()`` returned in the last ended run (``None`` when it could not be stored)."""
        event = self._event()
        return event.result if event else None

    def _event(self) -> EventRecord | None:
        if self._outcome is _UNLOADED:
            event = self._scheduler.lifecycle.outcome(self._doc)
            self._outcome = EventRecord.from_doc(event) if event is not None else None
        return self._outcome  # type: ignore[return-value]

    @property
    def blocked_by(self) -> list[ObjectId]:
        """The jobs this one depends on (option ``depends_on``) that have not ended DONE, in the order given; read
        from MongoDB at each access. Empty once it may start (or for a job without dependencies)."""
        return self._scheduler.lifecycle.blocked_by(self._doc)

    def runs(self) -> list[dict[str, Any]]:
        """Every ended run, oldest first: ``run``, ``status``, ``worker``, ``started``, ``ended`` and ``error``
        or ``result``."""
        return self._scheduler.lifecycle.runs(self._doc)

    def refresh(self) -> Process:
        """Reload the job from MongoDB (JobNotFoundError if it is gone)."""
        self.refresh_from(self._scheduler.lifecycle.load(self.id))
        return self

    def wait(self, timeout: float | None = None, throw: bool = False) -> Process:
        """Block until the job has finished; with ``throw``, JobFailedError if it FAILED."""
        options = self._scheduler.OPTION_THROW_EXCEPTION if throw else 0
        self._scheduler.wait_for([self], options, timeout=timeout)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The job as plain JSON-ready values: ids as strings, times as ISO 8601, unset ones as ``None``."""
        # The stored status number stays (upstream's toArray); its name beside it, as `show --json` and the
        # dashboard give it, so that JSON read by people says DONE rather than 3.
        plain_doc: dict[str, Any] = plain(self._job.shown())
        return plain_doc

    def document(self) -> dict[str, Any]:
        """The stored job as this handle last read it (a copy; ``to_dict()`` gives it as plain JSON)."""
        return dict(self._doc)

    def refresh_from(self, document: dict[str, Any]) -> None:
        """Show ``document``, the job as it was read anew (the Scheduler does so while it waits for it)."""
        job = JobView(document)
        if not job.same_end(self._job):
            self._outcome = _UNLOADED
        self._doc, self._job = document, job
