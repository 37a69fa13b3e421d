"""The typed messages between a queue node, its worker manager and the workers (over ``multiprocessing`` pipes).

One NamedTuple per message, dispatched with ``match``. Who sends what:

- node -> manager: :class:`RunJob`, :class:`DropJob`, :class:`CancelJob`, :class:`KillJob`, :class:`Fence`,
  :class:`Stop`
- manager -> worker: :class:`RunJob`, :class:`Exit`
- worker -> manager: :class:`Claimed`, :class:`Ending`, :class:`Finished`
- manager -> node: :class:`WorkerSpawned`, :class:`WorkerExited`, :class:`JobClaimed`, :class:`JobFinished`,
  :class:`JobKilled`
"""

from __future__ import annotations

from typing import Any, NamedTuple

import bson
from bson import ObjectId

from ..constants import KillReason
from ..store.views import JobView

__all__ = ["KillReason"]  # re-exported: messages carry it

#: A job whose data encodes larger than this is handed over without it (the worker reads the job when it claims
#: it): a backlog of large jobs must not fill a manager's memory, nor large pickles its pipes.
INLINE_DATA_BYTES = 64 * 1024
#: Marks a hand-over document whose ``data`` was left out.
DATA_LEFT_OUT = "data_left_out"


def handed_over(doc: dict[str, Any]) -> dict[str, Any]:
    """What travels in a :class:`RunJob`: the job document, without its data when that is large."""
    data = doc.get("data")
    if data is None or isinstance(data, (bool, int, float)):
        return doc
    try:
        size = len(bson.encode({"data": data}))
    except Exception:  # not encodable here: the worker reads what is stored
        size = INLINE_DATA_BYTES + 1
    if size <= INLINE_DATA_BYTES:
        return doc
    slim = {name: value for name, value in doc.items() if name != "data"}
    slim[DATA_LEFT_OUT] = True
    return slim


class RunJob(NamedTuple):
    """Run this job (node -> manager, manager -> worker). ``lease`` is the node's orphaned_timeout in seconds;
    ``limits``: the keys under a limit (SPEC 8) whose slots the worker takes before it claims the job."""

    doc: dict[str, Any]
    lease: float
    limits: tuple[str, ...] = ()

    @property
    def job(self) -> JobView:
        """The job handed over, read leniently (a malformed one still takes its place in a backlog)."""
        return JobView(self.doc)


class DropJob(NamedTuple):
    """Forget a job handed over earlier: it is no longer WAITING."""

    job_id: ObjectId


class CancelJob(NamedTuple):
    """The job was canceled: forget it, and kill its worker if one runs it."""

    job_id: ObjectId


class KillJob(NamedTuple):
    """Kill this worker if it still runs this job (its heartbeat found the job owned by someone else)."""

    job_id: ObjectId
    worker_id: ObjectId
    reason: KillReason
    #: The run the heartbeat renewed for it: a worker that has moved on to the job's next run is not killed.
    run: int | None = None


class Fence(NamedTuple):
    """The node renewed the leases of these (job, worker) pairs: they may go on until ``deadline``
    (:func:`taskscheduler.node.fencing.lease_clock`, which all processes of one machine share). Past it, or past half
    a lease from its claim for a job no renewal named yet, the manager kills a running job, so no other node can
    ever run it beside ours (self-fencing)."""

    deadline: float
    renewed: tuple[tuple[ObjectId, ObjectId], ...] = ()


class Stop(NamedTuple):
    """Stop every worker and exit."""


class Exit(NamedTuple):
    """A worker leaves its loop and exits (shrinking a pool)."""


class Claimed(NamedTuple):
    """A worker owns the job now (its claim was written)."""

    job_id: ObjectId
    timeout: int
    run: int
    #: :func:`~taskscheduler.node.fencing.lease_clock` right before the claim was sent: its lease holds a lease from
    #: then, so the manager's first fence is half a lease from this moment, however late this message arrives.
    claimed_at: float = 0.0


class Ending(NamedTuple):
    """The job's code has returned: only recording its end is left (never fenced or timed out from here on)."""

    job_id: ObjectId


class Finished(NamedTuple):
    """A worker is done with a job: its end is recorded, or it could not claim it."""

    job_id: ObjectId
    claimed: bool
    #: The status the run ended in, as recorded by this worker (None: it recorded no end; metrics only).
    status: int | None = None
    #: Not claimed because MongoDB could not be reached (or could not say whether the claim was written): the job
    #: may still be WAITING, and no change event will announce it again, so the manager hands it over again.
    unsettled: bool = False
    #: Not claimed because a limit it runs under had no slot: the node holds it until one frees.
    held_back: bool = False


class WorkerSpawned(NamedTuple):
    worker_id: ObjectId
    pid: int


class WorkerExited(NamedTuple):
    worker_id: ObjectId
    pid: int
    signal: int | None


class JobClaimed(NamedTuple):
    job_id: ObjectId
    worker_id: ObjectId
    run: int
    #: The job's class (the node's metrics label runs by it).
    job_class: str = ""
    #: When the claim was sent (``lease_clock()``): a late report of an older claim never replaces a newer one.
    claimed_at: float = 0.0


class JobHeldBack(NamedTuple):
    """A worker could not take a slot of a limit the job runs under: the node holds the job until one frees."""

    job_id: ObjectId


class JobNotClaimed(NamedTuple):
    """A worker did not claim a job handed to it: another worker had it first, or it may not run (its parent ended,
    its dependencies or data say no). Counted by the node (claims lost) and forgotten by it."""

    job_id: ObjectId


class Capacity(NamedTuple):
    """How many more jobs the manager could start now (idle workers and room to fork, less the jobs it holds),
    as of the ``received``-th RunJob it got: the node counts the ones sent since as taken. Sent when it changes."""

    free: int
    received: int


class JobFinished(NamedTuple):
    """The worker recorded the job's end itself (or lost it): nothing for the node to record."""

    job_id: ObjectId
    worker_id: ObjectId
    #: The status the worker recorded for the run's end (None when it recorded none: the run was lost).
    status: int | None = None


class JobKilled(NamedTuple):
    """The worker running this job is dead before it recorded the job's end: the node records it."""

    job_id: ObjectId
    worker_id: ObjectId
    run: int
    reason: KillReason
    signal: int | None
    timeout: int
