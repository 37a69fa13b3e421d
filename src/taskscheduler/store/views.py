"""Views of stored documents that may be malformed: a job (:class:`JobView`), an event (:class:`EventView`) and
the holder of an add_job_once key (:class:`OnceHolder`), as read, whether they fit or not.

Anyone can write to MongoDB (SPEC 2): a handle, a view or a worker looking at a job it does not run reads
whatever is stored, and a malformed document never stops it. Each view reads its fields leniently and never
raises (but where a property says so); what fits the schema and is about to run is read as a
:class:`~taskscheduler.store.records.JobRecord` instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, overload

from .. import options as o
from ..constants import NO_WORKER, JobStatus
from .records import NO_EVENT, stored_number, stored_time
from .schema import job_ref, status_label, status_problem, stored_status


def run_number(value: Any) -> int | None:
    """A run number read from an event, as it always was (``int()`` of an int, a bool or a finite float); None
    for anything else (text, null, NaN, a document...), which a run listing skips (SPEC 2: it never stops one)."""
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return int(value)
    return None

class _Viewed(Protocol):
    @property
    def doc(self) -> Mapping[str, Any]: ...


class Stored:
    """A field of the viewed document as stored: any value, None when it is missing (the reader checks it)."""

    def __init__(self, name: str, doc: str | None = None) -> None:
        self.name = name
        self.__doc__ = doc

    @overload
    def __get__(self, view: None, owner: type) -> Stored: ...

    @overload
    def __get__(self, view: _Viewed, owner: type) -> Any: ...

    def __get__(self, view: _Viewed | None, owner: type) -> Any:
        return self if view is None else view.doc.get(self.name)


@dataclass(frozen=True)
class OnceHolder:
    """Who holds an add_job_once key, each field as stored (anyone may have written it): the holding job's id,
    since when (the server's time) and whether that job is stored (False while its caller inserts it)."""

    job: Any
    since: Any
    inserted: Any

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> OnceHolder:
        return cls(job=doc.get("job"), since=doc.get("since"), inserted=doc.get("inserted"))


@dataclass(frozen=True)
class EventView:
    """A stored event as read, whether it fits or not: each field as stored (None when missing), but
    :attr:`status_as_stored`."""

    doc: Mapping[str, Any]

    @property
    def id(self) -> Any:
        """The stored ``_id`` (any value); KeyError when there is none."""
        return self.doc["_id"]

    @property
    def status_as_stored(self) -> Any:
        """The stored status: any value; KeyError when there is none."""
        return self.doc["status"]

    status_value = Stored("status")
    run_value = Stored("run")

    def run_or(self, missing: Any) -> Any:
        """The run number as stored (any value), ``missing`` when there is none."""
        return self.doc.get("run", missing)

    @property
    def run_number(self) -> int | None:
        """The run number as a listing of runs reads it (see :func:`run_number`); 0 when there is none."""
        return run_number(self.doc.get("run", 0))

    started_value = Stored("started", "A run end's start of that run as stored, None when missing.")
    ended_value = Stored("ended", "A run end's time as stored, None when missing.")
    end_value = Stored(
        "end",
        "A WAITING or POSTPONED event's mark of the run end that announced it (an event id), None when missing.",
    )

    @property
    def has_result(self) -> bool:
        """Whether the event stores a result at all (even a null one)."""
        return "result" in self.doc

    result_value = Stored("result")

    def run_fields(self) -> dict[str, Any]:
        """The run number, worker and error of a run's end, as stored, those the event has."""
        return {name: self.doc.get(name) for name in ("run", "worker", "error") if name in self.doc}

    worker_value = Stored("worker")
    time_value = Stored("time")
    error_value = Stored("error")

    @property
    def message(self) -> Any:
        """The stored error's message (any value), None when there is none or the error is no dict."""
        error = self.doc.get("error")
        return error.get("message") if isinstance(error, dict) else None


@dataclass(frozen=True)
class JobView:
    """A stored job as read, whether it fits the schema or not: a handle shows any job, and a worker looks at
    jobs it does not run (a parent, its children, its own job read anew), which anyone may have written (SPEC 2:
    a malformed document never stops a reader). Each property reads its field leniently and never raises, but
    ``id`` and ``status``; values compared with what was read elsewhere are given as stored (``*_value``). A job
    about to run is read as a :class:`JobRecord` instead."""

    doc: Mapping[str, Any]

    @property
    def id(self) -> Any:
        """The stored ``_id``: any BSON value (an ObjectId in a job that fits); KeyError when there is none."""
        return self.doc["_id"]

    id_value = Stored("_id", "The stored ``_id``, None when there is none.")

    @property
    def has_id(self) -> bool:
        """Whether the document has an ``_id`` field at all (even a null one)."""
        return "_id" in self.doc

    @property
    def ref(self) -> str:
        """The id as messages and log lines show it (see :func:`~taskscheduler.store.schema.job_ref`)."""
        return job_ref(self.doc.get("_id"))

    @property
    def job_class(self) -> str:
        return str(self.doc.get("class", ""))

    class_value = Stored("class", "The class as stored (any value, None when missing).")

    @property
    def status(self) -> JobStatus:
        """The status; InvalidJobError naming the field when the stored one is none."""
        return stored_status(self.doc)

    status_value = Stored("status", "The status as stored (compared as stored: any value, None when missing).")

    @property
    def status_as_stored(self) -> Any:
        """The stored status: any value; KeyError when there is none (as :attr:`id`)."""
        return self.doc["status"]

    @property
    def known_status(self) -> JobStatus | None:
        """The status when the stored one is a JobStatus stored as an int32, else None."""
        return JobStatus(self.doc["status"]) if status_problem(self.doc) is None else None

    @property
    def unfinished(self) -> bool:
        """Whether the job may still run: a known status before DONE (a malformed one never runs: a node ends it
        or never picks it up)."""
        status = self.known_status
        return status is not None and status < JobStatus.DONE

    @property
    def label(self) -> str:
        """The status as views name it (``"waiting"``..., or ``"malformed"``)."""
        return status_label(self.doc.get("status"))

    @property
    def run(self) -> int:
        """The current run's number (1 for the first), or the last run's when the job has ended; 1 when the stored
        one is no integer."""
        run = self.doc.get("run", 1)
        return int(run) if isinstance(run, int) and not isinstance(run, bool) else 1

    run_value = Stored("run", "The run number as stored (any value), None when missing.")

    def run_or(self, missing: Any) -> Any:
        """The run number as stored (any value), ``missing`` when there is none."""
        return self.doc.get("run", missing)

    @property
    def run_int(self) -> int | None:
        """The run number when it is stored as a plain int (``type is int``: no bool, no bson Int64), else None:
        the only run a write compares with or derives an id from."""
        run = self.doc.get("run")
        return run if type(run) is int else None

    data = Stored("data")
    key_value = Stored(
        "key",
        "The fingerprint of class and data as stored (see :func:`~taskscheduler.store.fingerprint`).",
    )

    @property
    def options(self) -> dict[str, Any]:
        """A copy of the stored options (empty when they are no document)."""
        options = self.doc.get("options")
        return dict(options) if isinstance(options, Mapping) else {}

    @property
    def progress(self) -> float:
        return stored_number(self.doc.get("progress", 0.0), 0.0)

    @property
    def force_spawn(self) -> bool:
        """Whether the job asks for a worker of its own (option ``force_spawn``)."""
        options = self.doc.get("options")
        return isinstance(options, Mapping) and bool(options.get(o.FORCE_SPAWN))

    @property
    def worker(self) -> Any:
        """The worker running or last running it, as stored (an ObjectId in a job that fits); None when unset."""
        worker = self.doc.get("worker")
        return None if worker is None or worker == NO_WORKER else worker

    worker_value = Stored("worker", "The worker as stored (NO_WORKER while unset; any value), None when missing.")

    @property
    def has_worker(self) -> bool:
        """Whether the document has a ``worker`` field at all."""
        return "worker" in self.doc

    started_value = Stored(
        "started",
        "The start of the current run as stored (UNSET_TIME while unset; any value), None when missing.",
    )
    expires_value = Stored("expires", "The lease end as stored (UNSET_TIME while unset; any value), None when missing.")
    outcome_value = Stored(
        "outcome",
        "The event of the last ended run as stored (NO_EVENT while unset; any value), None when missing.",
    )
    change_value = Stored(
        "change",
        "The mark of the last change written as stored (NO_EVENT while unset; any value), None when missing.",
    )
    children_value = Stored("children", "The ``children`` flag as stored (any value), None when missing.")
    created_value = Stored("created", "When the job was added, as stored (any value), None when missing.")
    ended_value = Stored(
        "ended",
        "The end of the last run as stored (UNSET_TIME while unset; any value), None when missing.",
    )

    @property
    def created(self) -> datetime | None:
        return stored_time(self.doc.get("created"))

    @property
    def started(self) -> datetime | None:
        return stored_time(self.doc.get("started"))

    @property
    def ended(self) -> datetime | None:
        return stored_time(self.doc.get("ended"))

    def same_run(self, other: JobView) -> bool:
        """Whether both read the same stored run number (compared as stored, a missing one as None)."""
        return bool(self.doc.get("run") == other.doc.get("run"))

    def same_end(self, other: JobView) -> bool:
        """Whether both read the same status and the same end of the last run (its outcome event), as stored."""
        return bool(
            self.doc.get("outcome") == other.doc.get("outcome") and self.doc.get("status") == other.doc.get("status")
        )

    def added_by_run(self, run: int) -> bool:
        """For a child job: whether run ``run`` of its parent added it (a child stored without that number counts
        as added by any run)."""
        return bool(self.doc.get("parent_run", run) == run)

    def shown(self) -> dict[str, Any]:
        """A deep copy of the document as views show it: unset times, worker and event ids as None, and beside the
        stored status number its name (``status_name``; None when it is no status)."""
        doc = copy.deepcopy(dict(self.doc))
        for name in ("started", "ended", "alive", "expires"):
            if name in doc:
                doc[name] = stored_time(doc.get(name))
        doc["worker"] = self.worker
        for name in ("outcome", "change"):
            if doc.get(name) == NO_EVENT:
                doc[name] = None
        doc["status_name"] = status.name if (status := _status_or_none(doc.get("status"))) is not None else None
        return doc


def _status_or_none(value: Any) -> JobStatus | None:
    """The JobStatus of a stored status number, or None for anything else (a malformed document)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    try:
        return JobStatus(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class ErrorView:
    """A stored error (a failed run's, a release's reason: see :func:`~taskscheduler.store.records.error_doc`),
    each field as stored (any value, None when missing)."""

    doc: Mapping[str, Any]

    error_class = Stored("class")
    message = Stored("message")

    @property
    def message_as_stored(self) -> Any:
        """The message; KeyError when the error has none."""
        return self.doc["message"]

    traceback = Stored("traceback")
