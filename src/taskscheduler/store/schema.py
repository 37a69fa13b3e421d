"""What a stored job document must look like to be routed and run, said as the field that is wrong.

Anyone who can write the job collection can store anything in it. A document that does not match (a class that
is not a string, a missing field, an ``at`` that is not a number, an unknown status) must never stop a node, a
worker or an operator's view (SPEC 2, "Malformed documents never stop a node"): nodes end it FAILED with an
``InvalidJobError`` naming the field (:meth:`Lifecycle.reject`), or skip it when that write is impossible, and
views show it as malformed. These checks are pure: no I/O, no import of job code.

In a capped collection an update must not change a document's BSON size (SPEC 5): the fields a claim or a run's
end writes must be there already, with exactly the BSON type written into them, or the write is refused.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from bson import ObjectId

from .. import options as o
from ..constants import NO_WORKER, JobStatus
from ..errors import InvalidArgumentError, InvalidJobError

#: What views show for a status that is not a JobStatus.
MALFORMED = "malformed"

_STATUSES = frozenset(int(s) for s in JobStatus)
_INT32 = (-(2**31), 2**31 - 1)


def _int32(value: Any) -> bool:
    # pymongo decodes a BSON int32 as int and an int64 as bson.Int64 (an int subclass): the type tells them apart.
    return type(value) is int and _INT32[0] <= value <= _INT32[1]


def _double(value: Any) -> bool:
    return type(value) is float


#: Fields a claim, a heartbeat or a run's end rewrites in place, with the check of the BSON type written into
#: them and what the check means. In a capped collection they must all be there.
FIXED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "run": (lambda v: _int32(v) and v >= 1, "a run number (int32 >= 1)"),
    "created": (lambda v: isinstance(v, datetime), "a date"),
    "started": (lambda v: isinstance(v, datetime), "a date"),
    "ended": (lambda v: isinstance(v, datetime), "a date"),
    "alive": (lambda v: isinstance(v, datetime), "a date"),
    "expires": (lambda v: isinstance(v, datetime), "a date"),
    "lease": (lambda v: _double(v) and math.isfinite(v), "a double"),
    "worker": (lambda v: isinstance(v, ObjectId), "an ObjectId"),
    "progress": (lambda v: _double(v) and math.isfinite(v), "a double"),
    "orphaned": (lambda v: _int32(v) and v >= 0, "a count (int32 >= 0)"),
    "failures": (lambda v: _int32(v) and v >= 0, "a count (int32 >= 0)"),
    "outcome": (lambda v: isinstance(v, ObjectId), "an ObjectId"),
    "change": (lambda v: isinstance(v, ObjectId), "an ObjectId"),
}
#: What ending a job FAILED writes besides ``status`` (see :meth:`Lifecycle.reject`).
REJECT_WRITES = ("ended", "outcome", "change")
#: Job options whose stored value the worker and the end of a run read, checked as add_job checks them. ``cron``
#: and ``timezone`` are read leniently when a run ends (a stored schedule is never parsed again here).
_CHECKED_OPTIONS = (
    o.INTERVAL,
    o.INTERVAL_REFERENCE,
    o.RETRY,
    o.RETRY_INTERVAL,
    o.FORCE_SPAWN,
    o.TIMEOUT,
    o.IGNORE_DATA,
    o.RETRY_BACKOFF,
    o.RETRY_MAX_INTERVAL,
    o.RETRY_JITTER,
    o.PRIORITY,
    o.DEPENDS_ON,
    o.LIMIT_KEY,
)

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 4
_repr.maxlevel = 2


def shown(value: Any) -> str:
    """A stored value in a message: short, one line, control characters escaped (``repr`` of a prefix)."""
    return f"{_repr.repr(value)} ({type(value).__name__})"


def job_ref(job_id: Any) -> str:
    """A stored job id in a message or log line: an ObjectId's hex, anything else short and escaped (an ``_id``
    may be any BSON value, a string with a newline too)."""
    return str(job_id) if isinstance(job_id, ObjectId) else _repr.repr(job_id)


def _field(name: str, doc: Mapping[str, Any], expected: str, within: str = "") -> str:
    if name not in doc:
        return f"field {within + name!r} is missing"
    return f"field {within + name!r} is {shown(doc[name])}, not {expected}"


def status_problem(doc: Mapping[str, Any]) -> str | None:
    """Why the document's ``status`` is no JobStatus stored as an int32, or None."""
    status = doc.get("status")
    if type(status) is int and status in _STATUSES:
        return None
    return _field("status", doc, "a job status (0-6)")


def stored_status(doc: Mapping[str, Any]) -> JobStatus:
    """The document's status; InvalidJobError naming the field when it is none."""
    problem = status_problem(doc)
    if problem is not None:
        raise InvalidJobError(f"job {job_ref(doc.get('_id'))} is malformed: {problem}")
    return JobStatus(doc["status"])


def start_time(doc: Mapping[str, Any]) -> float | None:
    """A stored job's ``at`` (seconds since the epoch, on the server's clock), or None when it holds no number:
    such a POSTPONED job is never due, whoever reads it (a node, burst mode, ``run_jobs``)."""
    options = doc.get("options")
    at = options.get(o.AT) if isinstance(options, Mapping) else None
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None


def due(doc: Mapping[str, Any], now: float) -> bool:
    """Whether a stored job may start at ``now``: WAITING, or POSTPONED with its time come."""
    status = doc.get("status")
    if status == JobStatus.WAITING:
        return True
    at = start_time(doc)
    return status == JobStatus.POSTPONED and at is not None and at <= now


def status_label(status: Any) -> str:
    """A stored status as views name it: ``"waiting"``..., or :data:`MALFORMED`."""
    return JobStatus(status).name.lower() if type(status) is int and status in _STATUSES else MALFORMED


def problem(doc: Mapping[str, Any], *, capped: bool, run: bool = True) -> str | None:
    """The first thing that keeps a job document from being routed (``run=False``: what every node needs to put
    it in its place, whatever its class), or routed and run (``run=True``: what a worker needs to claim it, run
    it and record its end), naming the field and its value; None when it fits. ``capped``: the collection is
    capped, so every field an update writes must be stored already with its exact type."""
    if not isinstance(doc.get("_id"), ObjectId):
        return _field("_id", doc, "an ObjectId")
    job_class = doc.get("class")
    if not isinstance(job_class, str) or not job_class.strip():
        return _field("class", doc, "a 'module:QualName' string")
    found = status_problem(doc)
    if found is not None:
        return found
    names = tuple(FIXED) if run else ("run", "change")  # unpostponing writes the status and its mark
    for name in names:
        check, expected = FIXED[name]
        if (capped or name in doc) and not check(doc.get(name)):
            return _field(name, doc, expected)
    if run and doc["status"] == JobStatus.PROCESSING and doc.get("worker", NO_WORKER) == NO_WORKER:
        return _field("worker", doc, "the ObjectId of the worker running it")  # every write about a run names it
    options = doc.get("options")
    if options is None and not capped and "options" not in doc:
        return None
    if not isinstance(options, Mapping):
        return _field("options", doc, "a document of job options")
    return _options_problem(options, capped=capped, run=run)


def _options_problem(options: Mapping[str, Any], *, capped: bool, run: bool) -> str | None:
    at: Any = options.get(o.AT)
    if capped or o.AT in options:
        # A double in place: the next run's time is written into it. Also a number a node can order by.
        number = not isinstance(at, bool) and isinstance(at, (int, float))
        if not number or not math.isfinite(at) or not 0 <= at <= o.MAX_TIMESTAMP or (capped and not _double(at)):
            return _field(o.AT, options, "unix seconds (a double)", "options.")
    if not run:
        return None
    if (capped or o.RETRY in options) and not _int32(options.get(o.RETRY)):
        return _field(o.RETRY, options, "an int32 (counted down in place)", "options.")
    for name in _CHECKED_OPTIONS:
        if name in options:
            try:
                o.JOB_OPTIONS[name](name, options[name])
            except InvalidArgumentError as exc:  # its message holds the value's repr: kept short
                message = str(exc).splitlines()[0]
                return f"field 'options.{name}': {message if len(message) <= 160 else message[:157] + '...'}"
    for name in (o.CRON, o.TIMEZONE):
        if name in options and not isinstance(options[name], str):
            return _field(name, options, "a string", "options.")
    return None


def end_problem(doc: Mapping[str, Any], *, capped: bool) -> str | None:
    """What keeps a job document from taking the write that ends it (FAILED, or CANCELED: ``status``, ``ended``,
    ``outcome``, ``change``), naming the field; None when it can. In a capped collection every field that write
    sets must be stored with its type already, or a real MongoDB refuses it (then the document is skipped)."""
    if "_id" not in doc:
        return "field '_id' is missing"
    found = status_problem(doc)
    if found is not None or not capped:
        return found
    for name in REJECT_WRITES:
        check, expected = FIXED[name]
        if not check(doc.get(name)):
            return _field(name, doc, expected)
    return None
