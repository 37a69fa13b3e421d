"""Typed, frozen records of what is stored: a job (:class:`JobRecord`) and one recorded status change of it
(:class:`EventRecord`). The library decides on records; documents are their stored form.

A record is read from a document that passed the checks of :mod:`taskscheduler.store.schema` (a malformed one raises
InvalidJobError naming the field, SPEC 2), and written back with :meth:`JobRecord.to_doc`. Unset times, the
unset worker and unset event ids are ``None`` here; in a document they are fixed-size sentinels
(:data:`~taskscheduler.constants.UNSET_TIME`, :data:`~taskscheduler.constants.NO_WORKER`), because an update
of a capped collection must not change a document's size.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, TypedDict

from bson import ObjectId

from .. import options as o
from ..constants import NO_WORKER, UNSET_TIME, JobStatus
from ..errors import InvalidJobError
from .schema import job_ref, problem, status_label, status_problem, stored_status

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11 on; annotations only (not evaluated)

#: The unset value of ``outcome`` and ``change`` (an event id) in a document.
NO_EVENT = NO_WORKER


def _time(value: Any) -> datetime | None:
    return value if isinstance(value, datetime) and value != UNSET_TIME else None


def _id(value: Any) -> ObjectId | None:
    return value if isinstance(value, ObjectId) and value != NO_WORKER else None


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _count(value: Any, default: int) -> int:
    return value if type(value) is int else default


def parent_of(data: Any) -> ObjectId | None:
    """The parent's id a job's data names (``data.parent``), if any."""
    parent = data.get("parent") if isinstance(data, Mapping) else None
    return parent if isinstance(parent, ObjectId) else None


@dataclass(frozen=True)
class JobRecord:
    """One job: what it runs, where its current run stands, and the bookkeeping of its runs (SPEC 2)."""

    id: ObjectId
    job_class: str
    status: JobStatus
    #: The current run's number (1 for the first); the last run's once the job has ended.
    run: int = 1
    data: Any = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    created: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    #: The lease of the current run, on the server's clock: renewed at ``alive``, ends at ``expires``.
    alive: datetime | None = None
    expires: datetime | None = None
    lease: float = 0.0
    worker: ObjectId | None = None
    progress: float = 0.0
    #: Deaths of the current run's owners its nodes saw (SPEC 4, orphanings).
    orphaned: int = 0
    #: Failed runs in a row (retry backoff).
    failures: int = 0
    #: The event of the last ended run.
    outcome: ObjectId | None = None
    #: The first event of the last change written (its mark: a retried change knows it was written).
    change: ObjectId | None = None
    #: Fingerprint of class and data (add_job_once), and the add_job_once key the job holds, if any.
    key: str | None = None
    once: str | None = None
    #: A child job added by a run of its parent: that run's number (a later run of the parent does not inherit
    #: the child's failure).
    parent_run: int | None = None
    #: Whether a child job was ever added to this job (set, before the child is stored, by the child's add): a run
    #: of a job that never had one ends without a look at its children. None: stored before the flag existed (look).
    children: bool | None = False

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], *, capped: bool = False, checked: bool = False) -> JobRecord:
        """The record of a stored job; InvalidJobError naming the field when it cannot run (SPEC 2). ``capped``:
        judged as in a capped collection (every field an update writes must be stored with its type).
        ``checked``: the caller has just run that check on this document (it is not run twice on a hot path)."""
        found = None if checked else problem(doc, capped=capped)
        if found is not None:
            raise InvalidJobError(f"job {job_ref(doc.get('_id'))} is malformed: {found}")
        options = doc.get("options")
        key, once = doc.get("key"), doc.get("once")
        return cls(
            id=doc["_id"],
            job_class=doc["class"],
            status=JobStatus(doc["status"]),
            run=_count(doc.get("run"), 1),
            data=doc.get("data"),
            options=MappingProxyType(dict(options) if isinstance(options, Mapping) else {}),
            created=_time(doc.get("created")),
            started=_time(doc.get("started")),
            ended=_time(doc.get("ended")),
            alive=_time(doc.get("alive")),
            expires=_time(doc.get("expires")),
            lease=_number(doc.get("lease"), 0.0),
            worker=_id(doc.get("worker")),
            progress=_number(doc.get("progress"), 0.0),
            orphaned=_count(doc.get("orphaned"), 0),
            failures=_count(doc.get("failures"), 0),
            outcome=_id(doc.get("outcome")),
            change=_id(doc.get("change")),
            key=key if isinstance(key, str) else None,
            once=once if isinstance(once, str) else None,
            parent_run=doc.get("parent_run") if type(doc.get("parent_run")) is int else None,
            children=doc.get("children") if type(doc.get("children")) is bool else None,
        )

    def to_doc(self) -> dict[str, Any]:
        """The stored form: every field an update may write is present with its final BSON type."""
        doc: dict[str, Any] = {
            "_id": self.id,
            "class": self.job_class,
            "status": int(self.status),
            "run": int(self.run),
            "created": self.created or UNSET_TIME,
            "started": self.started or UNSET_TIME,
            "ended": self.ended or UNSET_TIME,
            "alive": self.alive or UNSET_TIME,
            "expires": self.expires or UNSET_TIME,
            "lease": float(self.lease),
            "worker": self.worker or NO_WORKER,
            "progress": float(self.progress),
            "orphaned": int(self.orphaned),
            "failures": int(self.failures),
            "outcome": self.outcome or NO_EVENT,
            "change": self.change or NO_EVENT,
        }
        if self.key is not None:
            doc["key"] = self.key
        doc["data"] = self.data
        doc["options"] = dict(self.options)
        if self.once is not None:
            doc["once"] = self.once
        if self.parent_run is not None:
            doc["parent_run"] = self.parent_run
        if self.children is not None:
            doc["children"] = self.children
        return doc

    def evolve(self, **changes: Any) -> JobRecord:
        """A copy with ``changes`` (the record itself never changes)."""
        if "options" in changes:
            changes["options"] = MappingProxyType(dict(changes["options"]))
        return dataclasses.replace(self, **changes)

    def option(self, name: str, default: Any = None) -> Any:
        """A stored job option (``options.<name>``)."""
        return self.options.get(name, default)

    @property
    def retry(self) -> int:
        return _count(self.options.get(o.RETRY), 0)

    @property
    def parent(self) -> ObjectId | None:
        """For a child job (one added by a run of another): its parent's id, stored as ``data.parent``."""
        return parent_of(self.data)

    @property
    def at(self) -> float:
        """When the current run may start (unix seconds on the server's clock; 0: at once)."""
        return _number(self.options.get(o.AT), 0.0)


@dataclass(frozen=True)
class EventRecord:
    """One recorded status change of a job: a claim (PROCESSING), a run's end (with its error or result), a
    release, a due or requeued run (WAITING/POSTPONED)."""

    id: ObjectId
    job: ObjectId
    job_class: str | None
    run: int
    status: int
    time: datetime | None
    worker: ObjectId | None = None
    started: datetime | None = None
    ended: datetime | None = None
    error: Mapping[str, Any] | None = None
    result: Any = None
    has_result: bool = False
    #: Written by the end of a run (the id of that end's event): withdrawn if that end is never recorded.
    end: ObjectId | None = None
    #: For a run another node put back: the lease end it swept, and whether its owner vouched it lived on.
    sweep_expires: datetime | None = None
    sweep_back: bool = False

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> EventRecord:
        sweep = doc.get("sweep")
        error = doc.get("error")
        job_class = doc.get("class")
        return cls(
            id=doc["_id"],
            job=doc.get("job"),  # type: ignore[arg-type]  # any stored _id
            job_class=job_class if isinstance(job_class, str) else None,
            run=_count(doc.get("run"), 0),
            status=_count(doc.get("status"), -1),
            time=_time(doc.get("time")),
            worker=doc.get("worker") if isinstance(doc.get("worker"), ObjectId) else None,
            started=_time(doc.get("started")),
            ended=_time(doc.get("ended")),
            error=dict(error) if isinstance(error, Mapping) else None,
            result=doc.get("result"),
            has_result="result" in doc,
            end=doc.get("end") if isinstance(doc.get("end"), ObjectId) else None,
            sweep_expires=_time(sweep.get("expires")) if isinstance(sweep, Mapping) else None,
            sweep_back=bool(sweep.get("back")) if isinstance(sweep, Mapping) else False,
        )

    def to_doc(self) -> dict[str, Any]:
        """The stored form (the fields an event has: see :meth:`taskscheduler.store.JobStore.event`)."""
        doc: dict[str, Any] = {
            "_id": self.id,
            "job": self.job,
            "class": self.job_class,
            "run": self.run,
            "status": self.status,
            "time": self.time,
            "worker": self.worker,
        }
        if self.started is not None:
            doc["started"] = self.started
            doc["ended"] = self.ended if self.ended is not None else self.time
        if self.end is not None:
            doc["end"] = self.end
        if self.sweep_expires is not None:
            doc["sweep"] = {"expires": self.sweep_expires, "back": self.sweep_back}
        if self.error is not None:
            doc["error"] = dict(self.error)
        if self.has_result:
            doc["result"] = self.result
        return doc


class JobFieldValues(TypedDict, total=False):
    """The fields of a job a conditional write compares (``expect``) or sets, or a copy of a read document shows
    changed (an event's view of a change), by their names in :class:`JobFields`.
    Each is given as stored: the unset worker, times and event ids as their sentinels (NO_WORKER, UNSET_TIME,
    NO_EVENT), never None, so that a write never changes a document's size; an expectation may hold whatever
    was read (a hostile ``worker``, a missing field as None)."""

    status: int
    run: int
    worker: Any
    created: datetime
    ended: datetime
    expires: Any
    outcome: ObjectId
    change: Any
    progress: float
    orphaned: int
    failures: int
    children: bool
    #: ``options.at`` and ``options.retry``: when the next run may start, and the retries left.
    at: float
    retry: int


#: JobFields names whose stored field has another name (the others are stored under their own).
_STORED_NAMES = {"at": f"options.{o.AT}", "retry": f"options.{o.RETRY}"}


class JobFields(dict[str, Any]):
    """Some fields of a job, each with its value as stored (see :class:`JobFieldValues`): what a conditional
    write expects to find, or what it sets (:meth:`taskscheduler.store.JobStore.change`). Only the fields given
    are compared or written, in the order given (a later :meth:`evolve` keeps a field's place, as a dict does).

    Built from typed keywords, held by the stored names (``options.at`` for ``at``): a read-only dict, so that
    what the store is asked to write reads as plain fields to the store and to a test that looks at it."""

    def __init__(self, **values: Unpack[JobFieldValues]) -> None:
        super().__init__((_STORED_NAMES.get(name, name), value) for name, value in values.items())

    def evolve(self, **values: Unpack[JobFieldValues]) -> JobFields:
        """These fields with ``values`` set too (a field given already keeps its place and takes the new value)."""
        return self.joined(JobFields(**values))

    def joined(self, other: JobFields) -> JobFields:
        """These fields and then ``other``'s (a field in both keeps its place here and takes ``other``'s value)."""
        joined = JobFields()
        dict.update(joined, self)
        dict.update(joined, other)
        return joined

    @property
    def children(self) -> Any:
        """The ``children`` flag given, None when it is not."""
        return self.get("children")

    def unmet_in(self, doc: Mapping[str, Any]) -> bool:
        """Whether some field of ``doc`` (a stored job, read anew) has another value than the one given here."""
        return any(doc.get(name) != value for name, value in self.items())

    def __reduce__(self) -> tuple[Any, ...]:
        return _job_fields, (tuple(self.items()),)  # a copy or pickle is built as evolve builds one

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("JobFields are read-only: use evolve() or joined()")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = __ior__ = _read_only


def _job_fields(items: tuple[tuple[str, Any], ...]) -> JobFields:
    fields = JobFields()
    dict.update(fields, items)
    return fields


def error_doc(error_class: str, message: str, traceback: str) -> dict[str, str]:
    """The stored form of an error an event records (a run's failure, a release's reason)."""
    return {"class": error_class, "message": message, "traceback": traceback}


def holding_once(doc: MutableMapping[str, Any], key: str) -> None:
    """Note in a new job's document the add_job_once key it holds (``once``; its last field)."""
    doc["once"] = key


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
    def status_as_stored(self) -> Any:
        """The stored status: any value; KeyError when there is none."""
        return self.doc["status"]

    @property
    def status_value(self) -> Any:
        return self.doc.get("status")

    @property
    def run_value(self) -> Any:
        return self.doc.get("run")

    @property
    def worker_value(self) -> Any:
        return self.doc.get("worker")

    @property
    def time_value(self) -> Any:
        return self.doc.get("time")

    @property
    def error_value(self) -> Any:
        return self.doc.get("error")

    @property
    def message(self) -> Any:
        """The stored error's message (any value), None when there is none or the error is no dict."""
        error = self.doc.get("error")
        return error.get("message") if isinstance(error, dict) else None


@dataclass(frozen=True)
class RunContext:
    """The run a job's code belongs to, inside its worker: the worker (its progress writes require that it still
    owns the job) and the job and run number (the child jobs it adds belong to that run)."""

    worker: ObjectId
    job: ObjectId | None = None
    run: int = 1


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

    @property
    def id_value(self) -> Any:
        """The stored ``_id``, None when there is none."""
        return self.doc.get("_id")

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

    @property
    def class_value(self) -> Any:
        """The class as stored (any value, None when missing)."""
        return self.doc.get("class")

    @property
    def status(self) -> JobStatus:
        """The status; InvalidJobError naming the field when the stored one is none."""
        return stored_status(self.doc)

    @property
    def status_value(self) -> Any:
        """The status as stored (compared as stored: any value, None when missing)."""
        return self.doc.get("status")

    @property
    def status_as_stored(self) -> Any:
        """The stored status: any value; KeyError when there is none (as :attr:`id`)."""
        return self.doc["status"]

    @property
    def known_status(self) -> JobStatus | None:
        """The status when the stored one is a JobStatus stored as an int32, else None."""
        return JobStatus(self.doc["status"]) if status_problem(self.doc) is None else None

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

    @property
    def run_value(self) -> Any:
        """The run number as stored (any value), None when missing."""
        return self.doc.get("run")

    def run_or(self, missing: Any) -> Any:
        """The run number as stored (any value), ``missing`` when there is none."""
        return self.doc.get("run", missing)

    @property
    def run_int(self) -> int | None:
        """The run number when it is stored as a plain int (``type is int``: no bool, no bson Int64), else None:
        the only run a write compares with or derives an id from."""
        run = self.doc.get("run")
        return run if type(run) is int else None

    @property
    def data(self) -> Any:
        return self.doc.get("data")

    @property
    def key_value(self) -> Any:
        """The fingerprint of class and data as stored (see :func:`~taskscheduler.store.fingerprint`)."""
        return self.doc.get("key")

    @property
    def options(self) -> dict[str, Any]:
        """A copy of the stored options (empty when they are no document)."""
        options = self.doc.get("options")
        return dict(options) if isinstance(options, Mapping) else {}

    @property
    def progress(self) -> float:
        return _number(self.doc.get("progress", 0.0), 0.0)

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

    @property
    def worker_value(self) -> Any:
        """The worker as stored (NO_WORKER while unset; any value), None when missing."""
        return self.doc.get("worker")

    @property
    def has_worker(self) -> bool:
        """Whether the document has a ``worker`` field at all."""
        return "worker" in self.doc

    @property
    def started_value(self) -> Any:
        """The start of the current run as stored (UNSET_TIME while unset; any value), None when missing."""
        return self.doc.get("started")

    @property
    def expires_value(self) -> Any:
        """The lease end as stored (UNSET_TIME while unset; any value), None when missing."""
        return self.doc.get("expires")

    @property
    def outcome_value(self) -> Any:
        """The event of the last ended run as stored (NO_EVENT while unset; any value), None when missing."""
        return self.doc.get("outcome")

    @property
    def change_value(self) -> Any:
        """The mark of the last change written as stored (NO_EVENT while unset; any value), None when missing."""
        return self.doc.get("change")

    @property
    def children_value(self) -> Any:
        """The ``children`` flag as stored (any value), None when missing."""
        return self.doc.get("children")

    @property
    def created(self) -> datetime | None:
        return _time(self.doc.get("created"))

    @property
    def started(self) -> datetime | None:
        return _time(self.doc.get("started"))

    @property
    def ended(self) -> datetime | None:
        return _time(self.doc.get("ended"))

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
                doc[name] = _time(doc.get(name))
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
