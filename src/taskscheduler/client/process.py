"""Process: the handle of one job, as returned by the Scheduler (not an OS process: those are "child"/"pid")."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from bson import ObjectId

from ..constants import NO_WORKER, UNSET_TIME, JobStatus
from ..core.lifecycle import Lifecycle
from ..store.schema import problem, status_label, stored_status


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


def _time(value: Any) -> datetime | None:
    if not isinstance(value, datetime) or value == UNSET_TIME:
        return None
    return value


class Process:
    """A read-only view of a stored job, with ``refresh()``, ``wait()`` and ``to_dict()``."""

    def __init__(self, document: dict[str, Any], scheduler: Source) -> None:
        self._doc = document
        self._scheduler = scheduler
        self._outcome: Any = _UNLOADED

    def __repr__(self) -> str:
        return f"<Process {self._doc.get('_id')} {self.job_class} {status_label(self._doc.get('status')).upper()}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Process) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def id(self) -> ObjectId:
        job_id: ObjectId = self._doc["_id"]
        return job_id

    @property
    def job_class(self) -> str:
        return str(self._doc.get("class", ""))

    @property
    def data(self) -> Any:
        return self._doc.get("data")

    @property
    def options(self) -> dict[str, Any]:
        options = self._doc.get("options")
        return dict(options) if isinstance(options, Mapping) else {}

    @property
    def status(self) -> JobStatus:
        """The job's status; ``errors.InvalidJobError`` (naming the field) when the stored one is no status."""
        return stored_status(self._doc)

    @property
    def progress(self) -> float:
        progress = self._doc.get("progress", 0.0)
        return float(progress) if isinstance(progress, (int, float)) and not isinstance(progress, bool) else 0.0

    @property
    def worker(self) -> ObjectId | None:
        worker = self._doc.get("worker")
        return None if worker is None or worker == NO_WORKER else worker

    @property
    def created(self) -> datetime | None:
        return _time(self._doc.get("created"))

    @property
    def started(self) -> datetime | None:
        return _time(self._doc.get("started"))

    @property
    def ended(self) -> datetime | None:
        return _time(self._doc.get("ended"))

    @property
    def run(self) -> int:
        """The current run's number (1 for the first), or the last run's when the job has ended."""
        run = self._doc.get("run", 1)
        return int(run) if isinstance(run, int) and not isinstance(run, bool) else 1

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
        error = event.get("error") if event else None
        return dict(error) if isinstance(error, Mapping) and error else None

    @property
    def result(self) -> Any:
        """What ``start()`` returned in the last ended run (``None`` when it could not be stored)."""
        event = self._event()
        return event.get("result") if event else None

    def _event(self) -> dict[str, Any] | None:
        if self._outcome is _UNLOADED:
            self._outcome = self._scheduler.lifecycle.outcome(self._doc)
        return self._outcome  # type: ignore[no-any-return]

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
        doc = copy.deepcopy(self._doc)
        for field in ("started", "ended", "alive", "expires"):
            if field in doc:
                doc[field] = _time(doc.get(field))
        doc["worker"] = self.worker
        for field in ("outcome", "change"):
            if doc.get(field) == NO_WORKER:
                doc[field] = None
        # The stored number stays (upstream's toArray); its name beside it, as `show --json` and the dashboard
        # give it, so that JSON read by people says DONE rather than 3.
        doc["status_name"] = status.name if (status := _status_or_none(doc.get("status"))) is not None else None
        plain_doc: dict[str, Any] = plain(doc)
        return plain_doc

    def document(self) -> dict[str, Any]:
        """The stored job as this handle last read it (a copy; ``to_dict()`` gives it as plain JSON)."""
        return dict(self._doc)

    def refresh_from(self, document: dict[str, Any]) -> None:
        """Show ``document``, the job as it was read anew (the Scheduler does so while it waits for it)."""
        if document.get("outcome") != self._doc.get("outcome") or document.get("status") != self._doc.get("status"):
            self._outcome = _UNLOADED
        self._doc = document


def _status_or_none(value: Any) -> JobStatus | None:
    """The JobStatus of a stored status number, or None for anything else (a malformed document)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    try:
        return JobStatus(value)
    except ValueError:
        return None
