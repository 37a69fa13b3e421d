"""Typed, frozen records of what is stored: a job (:class:`JobRecord`) and one recorded status change of it
(:class:`EventRecord`). The library decides on records; documents are their stored form.

A record is read from a document that passed the checks of :mod:`taskscheduler.store.schema` (a malformed one raises
InvalidJobError naming the field, SPEC 2), and written back with :meth:`JobRecord.to_doc`. Unset times, the
unset worker and unset event ids are ``None`` here; in a document they are fixed-size sentinels
(:data:`~taskscheduler.constants.UNSET_TIME`, :data:`~taskscheduler.constants.NO_WORKER`), because an update
of a capped collection must not change a document's size.
"""

from __future__ import annotations

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
from .schema import job_ref, problem

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11 on; annotations only (not evaluated)

#: The unset value of ``outcome`` and ``change`` (an event id) in a document.
NO_EVENT = NO_WORKER


def stored_time(value: Any) -> datetime | None:
    """A stored time, None for the unset one (UNSET_TIME) or anything that is no datetime."""
    return value if isinstance(value, datetime) and value != UNSET_TIME else None


def _id(value: Any) -> ObjectId | None:
    return value if isinstance(value, ObjectId) and value != NO_WORKER else None


def stored_number(value: Any, default: float) -> float:
    """A stored number (int or float, never a bool) as a float, ``default`` for anything else."""
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
            created=stored_time(doc.get("created")),
            started=stored_time(doc.get("started")),
            ended=stored_time(doc.get("ended")),
            alive=stored_time(doc.get("alive")),
            expires=stored_time(doc.get("expires")),
            lease=stored_number(doc.get("lease"), 0.0),
            worker=_id(doc.get("worker")),
            progress=stored_number(doc.get("progress"), 0.0),
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
        return stored_number(self.options.get(o.AT), 0.0)


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
            time=stored_time(doc.get("time")),
            worker=doc.get("worker") if isinstance(doc.get("worker"), ObjectId) else None,
            started=stored_time(doc.get("started")),
            ended=stored_time(doc.get("ended")),
            error=dict(error) if isinstance(error, Mapping) else None,
            result=doc.get("result"),
            has_result="result" in doc,
            end=doc.get("end") if isinstance(doc.get("end"), ObjectId) else None,
            sweep_expires=stored_time(sweep.get("expires")) if isinstance(sweep, Mapping) else None,
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


def added_by_run(doc: MutableMapping[str, Any], run: int) -> None:
    """Note in a new child job's document the run of its parent that added it (``parent_run``)."""
    doc["parent_run"] = run


def holding_once(doc: MutableMapping[str, Any], key: str) -> None:
    """Note in a new job's document the add_job_once key it holds (``once``; its last field)."""
    doc["once"] = key


@dataclass(frozen=True)
class RunContext:
    """The run a job's code belongs to, inside its worker: the worker (its progress writes require that it still
    owns the job) and the job and run number (the child jobs it adds belong to that run)."""

    worker: ObjectId
    job: ObjectId | None = None
    run: int = 1
