"""Prepared state changes of one job, written idempotently: events with fixed ids first, then one conditional
update of the job document that marks it with the change (``change``). Recording one again after an outage
writes nothing twice; a change that lost (another worker or node owns the job now) withdraws its events.

The lifecycle (:mod:`taskscheduler.core.lifecycle`) decides which change to make; a change only records it.
"""

from __future__ import annotations

import contextlib
import hashlib
import traceback
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from bson import ObjectId

from ..constants import NO_WORKER, UNSET_TIME, JobStatus
from ..errors import InvalidArgumentError, JobReleasedError, ServerUnavailableError, TaskSchedulerError
from ..store import MAX_JOB_SIZE, JobStore, encoded_size, utcnow
from ..store.records import EventRecord, JobFields, JobRecord, error_doc
from ..store.views import JobView, run_number
from .flow import keys_of
from .runs import next_start

#: Longest stored error message and traceback (characters): an error is recorded whatever its size.
MAX_ERROR_TEXT = 64 * 1024


#: Largest result stored with a run; a larger one is stored as None (room for the rest of the event document).
#: Below the job limit: an event stays under 16 MB in any change stream that carries it.
MAX_RESULT_SIZE = MAX_JOB_SIZE - 256 * 1024


class ChildrenAdded(Exception):
    """A run's DONE end was not written because a child job was added to the job meanwhile (its add marks the
    parent first): the end must look at the children (SPEC 4: a child that ended FAILED or TIMEOUT by the time the
    parent's ``start()`` returned fails the parent). Nothing of the end is left written."""


class Recorder(Protocol):
    """What a change needs of the lifecycle that prepared it."""

    store: JobStore

    @property
    def logger(self) -> Any: ...

    def emit(self, status: int, job: JobRecord | Mapping[str, Any]) -> None: ...

    def vouch(self, job_id: ObjectId, run: int, worker: ObjectId, stored: Mapping[str, Any]) -> None: ...

    def cancel_children(self, parent_id: ObjectId) -> None: ...

    def settle_cancel(self, doc: Mapping[str, Any]) -> None: ...

    def cancel_dependents(self, job_id: ObjectId, status: JobStatus) -> None: ...


def describe_error(exc: BaseException) -> dict[str, str]:
    """The stored form of an exception: class, message and traceback text (truncated to fit)."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return fit_error(error_doc(name, str(exc), "".join(traceback.format_exception(cls, exc, exc.__traceback__))))


def library_error(cls: type[TaskSchedulerError], message: str) -> dict[str, str]:
    """An error the library records itself (timeout, orphaned, released), named by its class in errors.py."""
    return error_doc(f"{cls.__module__}.{cls.__qualname__}", message, "")


def fit_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """An error whose texts fit in an event document: long ones keep their start and end."""
    fitted = dict(error)
    for key in ("message", "traceback"):
        text = fitted.get(key)
        if isinstance(text, str) and len(text) > MAX_ERROR_TEXT:
            half = MAX_ERROR_TEXT // 2
            fitted[key] = f"{text[:half]}\n... [{len(text) - MAX_ERROR_TEXT} characters cut] ...\n{text[-half:]}"
    return fitted


def processing_event_id(job_id: ObjectId, run: int, worker: ObjectId, started: datetime | None = None) -> ObjectId:
    """The id of a claim's PROCESSING event: the same whoever writes it (the worker or, after a kill, its node),
    and another for each claim (its ``started``, in ms): a worker may claim a run again after it was released."""
    millis = int(started.timestamp() * 1000) if isinstance(started, datetime) and started != UNSET_TIME else 0
    return derived_id(job_id, run, worker.binary + millis.to_bytes(8, "big", signed=True))


def derived_id(job_id: ObjectId, run: int, salt: bytes) -> ObjectId:
    """An event id derived from what it records, so that every writer of that record writes the same one."""
    digest = hashlib.sha1(job_id.binary + run.to_bytes(8, "big", signed=True) + salt).digest()
    return ObjectId(digest[:12])


def owned_by(worker: ObjectId, run: int | None = None, expires: datetime | None = None) -> JobFields:
    """What a job is while ``worker`` owns it: PROCESSING (in that run, with that lease end)."""
    expect = JobFields(status=int(JobStatus.PROCESSING), worker=worker)
    if run is not None:
        expect = expect.evolve(run=run)
    if expires is not None:
        expect = expect.evolve(expires=expires)
    return expect


def new_event(
    job: JobRecord,
    status: int,
    worker: ObjectId | None = None,
    *,
    error: Mapping[str, Any] | None = None,
    result: Any = None,
    has_result: bool = False,
    time: datetime | None = None,
    started: datetime | None = None,
    event_id: ObjectId | None = None,
    end: ObjectId | None = None,
    sweep: datetime | None = None,
) -> EventRecord:
    """An event of ``job`` in its current run (not written). ``started``: a run's start, for the event that
    records its end; ``sweep``: the lease end of a run another node put back (a release that counts as an
    orphaning until its owner vouches)."""
    at = time or utcnow()
    return EventRecord(
        id=event_id or ObjectId(),
        job=job.id,
        job_class=job.job_class,
        run=job.run,
        status=int(status),
        time=at,
        worker=worker,
        started=started,
        ended=at if started is not None else None,
        error=dict(error) if error is not None else None,
        result=result,
        has_result=has_result,
        end=end,
        sweep_expires=sweep,
    )


class Change:
    """A prepared state change of one job: events with fixed ids, then one conditional update. ``record()`` may
    be called again after an outage: it writes nothing twice and announces the change once."""

    def __init__(self, life: Recorder, job: JobRecord, worker: ObjectId) -> None:
        self.life = life
        self.job = job
        self.worker = worker
        self.run = job.run
        self.events: list[EventRecord] = []
        self.when = JobFields()
        self.fields = JobFields()
        self.recorded = False
        self.uncertain = False  # an attempt failed without an answer: it may have been written
        self.attempted = False  # an attempt was made (then the next one looks at the job first)
        #: Written by the run's owner, alive: if the run was swept first, the sweep was no death (vouched for).
        self.vouches = False
        #: Its event ids are derived from the run: every node racing to make this very change writes the same
        #: events, one update wins, and the others find it written (announced by the winner only).
        self.shared = False

    @property
    def marker(self) -> ObjectId:
        return self.events[-1].id

    def record(self) -> bool:
        """Write it; True when it is written (now or by an earlier attempt), False when the job was lost."""
        if self.recorded:
            return True
        store, job = self.life.store, self.job
        if self.attempted and not self.shared:
            # Again after an outage: when the run was put back or taken over meanwhile (a sweep withdrew what we
            # wrote), our events must not be written again: a process that died right after would leave them.
            stored = store.find_job(job.id) or {}
            if JobView(stored).change_value != self.marker and self._lost_at_our_run(stored):
                return self._lost(stored)
        self.attempted = True
        store.insert_events(self.events)
        fields = self.fields.evolve(change=self.marker)
        try:
            written = store.change(job.id, self.when, fields)
        except ServerUnavailableError:
            self.uncertain = True  # written or not: only the job document can tell, later
            raise
        if not written:
            stored = store.find_job(job.id) or {}
            if JobView(stored).change_value != self.marker:
                if self._children_added(stored):
                    store.delete_events([e.id for e in self.events[1:]])
                    raise ChildrenAdded(f"job {job.id} run {self.run}: a child job was added while it ran")
                return self._lost(stored)
            if self.shared and not self.uncertain:
                self.recorded = True  # another node made this very change first, and announced it
                return True
        self.recorded = True
        self.announce()
        return True

    def _children_added(self, stored: Mapping[str, Any]) -> bool:
        """Whether the write missed only because the job, still ours at this run, gained a child meanwhile."""
        now = JobView(stored)
        return bool(
            self.when.children is False
            and now.children_value is True
            and now.run_value == self.run
            and now.status_value == JobStatus.PROCESSING
            and now.worker_value == self.worker
        )

    def _lost_at_our_run(self, stored: Mapping[str, Any]) -> bool:
        """Whether the job, as stored, is still at this run but no longer this worker's (put back, taken over)."""
        now = JobView(stored)
        if run_number(now.run_or(-1)) != self.run:  # (a run that is no number: not ours, SPEC 2)
            return False  # gone, or moved on: an earlier attempt of ours may be what moved it
        return bool(now.status_value != JobStatus.PROCESSING or now.worker_value != self.worker)

    def _lost(self, stored: Mapping[str, Any]) -> bool:
        """Not ours now. Unless an earlier attempt (or, for a shared change, another writer) may have written it and
        the job has moved on since (then its run number has moved on too), we lost it: withdraw what we wrote about
        it. Another worker's claim of the run after ours was prepared proves that no attempt of ours was written
        (the run was not ours to end any more), however far the job moved on. Returns False."""
        store, job, now = self.life.store, self.job, JobView(stored)
        moved_on = run_number(now.run_or(self.run)) != self.run
        if not (self.uncertain or self.shared) or not moved_on or self._superseded():
            store.delete_events([e.id for e in self.events[1:]])
        self.life.logger.warning(
            f"job {job.id} ({job.job_class!r}) run {self.run} was taken over before its change was "
            "recorded; nothing written",
            extra={"job_id": job.id, "job_class": job.job_class, "worker": self.worker},
        )
        if self.vouches:
            self.life.vouch(job.id, self.run, self.worker, stored)
        if now.status_value == JobStatus.CANCELED and now.worker_value == self.worker:
            self.life.settle_cancel(stored)  # canceled under us: the run is ours to settle
        return False

    def _superseded(self) -> bool:
        """Whether another worker claimed this run after this change was prepared (its events' time)."""
        prepared = self.events[-1].time
        if prepared is None:
            return False
        claims = self.life.store.claims_of_run(self.job.id, self.run)
        return any(w != self.worker and isinstance(t, datetime) and t > prepared for w, t in claims)

    def announce(self) -> None:
        """Log and emit the change (once it is written)."""

    def outcome(self) -> ObjectId | None:
        """The job's recorded outcome once this change is written (the id of the last ended run's event)."""
        return self.job.outcome

    def processing_event(self) -> EventRecord:
        started = self.job.started
        event_id = processing_event_id(self.job.id, self.run, self.worker, started)
        return new_event(self.job, JobStatus.PROCESSING, self.worker, time=started or UNSET_TIME, event_id=event_id)


class RunEnd(Change):
    """The end of one run: its terminal status, or, when a retry or the next interval run follows, straight to
    POSTPONED/WAITING for that run (same document, ``run`` + 1). One atomic update either way."""

    def __init__(
        self,
        life: Recorder,
        job: JobRecord,
        worker: ObjectId,
        status: JobStatus,
        *,
        error: Mapping[str, Any] | None = None,
        result: Any = None,
        has_result: bool = False,
        expires: datetime | None = None,
        salt: bytes | None = None,
    ) -> None:
        super().__init__(life, job, worker)
        self.status = status
        self.fallback = False  # set when this records that the real outcome could not be stored
        # The server's clock: a worker whose clock is off neither hastens nor delays the next run.
        self.now = now = life.store.clock.now()
        if has_result and not _fits(result):
            life.logger.warning(
                f"job {job.id} ({job.job_class!r}): result is too large or not BSON-encodable and is not stored",
                extra={"job_id": job.id},
            )
            result, has_result = None, True
        # ``salt``: a shared change (see Change.shared), its event ids derived from the run and the salt.
        end_id = derived_id(job.id, self.run, salt) if salt is not None else ObjectId()
        end = new_event(
            job,
            status,
            worker,
            error=fit_error(error) if error is not None else None,
            result=result,
            has_result=has_result,
            time=now,
            started=job.started,
            event_id=end_id,
            end=end_id,
        )
        self.events = [self.processing_event(), end]
        self.when = owned_by(worker, self.run, expires)
        if status == JobStatus.DONE and job.children is False:
            # No child was ever added (a child's add marks its parent before it is stored): DONE is written only
            # while that holds, so no child can have failed unseen, and a job without children costs no look at
            # them. Else ChildrenAdded, and the worker looks.
            self.when = self.when.evolve(children=False)
        self.fields = JobFields(status=int(status), ended=now, orphaned=job.orphaned, outcome=end_id)
        # A run that did not end DONE keeps the progress it stored, so that operators see how far it got (SPEC 7;
        # upstream set 100 at every end).
        progress = 100.0 if status == JobStatus.DONE else job.progress
        if status == JobStatus.DONE:
            self.fields = self.fields.evolve(progress=100.0)
        self.ended = job.evolve(status=status, ended=now, progress=progress, outcome=end_id)
        self.following: JobRecord | None = None
        follow = next_start(job, status, now.timestamp())
        if follow is not None:
            next_status, at, retry = follow
            failures = job.failures + 1 if status != JobStatus.DONE else 0
            options = dict(job.options, at=at, retry=retry)
            self.following = self.ended.evolve(
                status=next_status, run=self.run + 1, worker=None, progress=0.0, orphaned=0, failures=failures
            ).evolve(options=options)
            self.fields = self.fields.evolve(
                status=int(next_status),
                run=self.run + 1,
                worker=NO_WORKER,
                progress=0.0,
                orphaned=0,
                failures=failures,
                at=at,
                retry=retry,
            )
            follow_id = derived_id(job.id, self.run, salt + b"+1") if salt is not None else None
            self.events.append(
                new_event(self.following, next_status, worker, time=now, end=end_id, event_id=follow_id)
            )

    def outcome(self) -> ObjectId | None:
        return self.ended.outcome

    def announce(self) -> None:
        job, life, following = self.job, self.life, self.following
        follows = f", run {self.run + 1} {following.status.name}" if following is not None else ""
        life.logger.info(
            f"job {job.id} ({job.job_class!r}) run {self.run} ended {self.status.name}{follows}",
            extra={
                "job_id": job.id,
                "job_class": job.job_class,
                "status": self.status.name,
                "run": self.run,
                "worker": self.worker,
                "next_run": int(following.status) if following is not None else None,
            },
        )
        life.emit(self.status, self.ended.evolve(worker=self.worker, change=self.marker))
        if self.status == JobStatus.TIMEOUT:
            life.cancel_children(job.id)
        if following is not None:
            life.emit(following.status, following.evolve(change=self.marker))
        elif self.status in (JobStatus.FAILED, JobStatus.TIMEOUT):  # for good: the jobs depending on it never run
            life.cancel_dependents(job.id, self.status)


class Release(Change):
    """A run that did not end (its worker or node died, stopped, or lost the lease) goes back to WAITING.
    ``sweep``: the lease end of a run another node put back (recorded in the event; see :meth:`Lifecycle.release`)."""

    def __init__(
        self,
        life: Recorder,
        job: JobRecord,
        worker: ObjectId,
        count: int,
        reason: str,
        expires: datetime | None,
        sweep: datetime | None = None,
        hold: float | None = None,
    ) -> None:
        super().__init__(life, job, worker)
        self.reason = reason
        self.hold = hold
        now = life.store.clock.now()  # the server's: a node whose clock is off stamps its releases right
        if hold is None:
            self.released = job.evolve(status=JobStatus.WAITING, worker=None, orphaned=count, progress=0.0)
            self.fields = JobFields(status=int(JobStatus.WAITING), worker=NO_WORKER, orphaned=count, progress=0.0)
        else:
            # Held for a verdict (see Lifecycle.release_orphan): POSTPONED until ``hold`` (seconds since the epoch,
            # on the server's clock), still naming the worker whose owner may vouch meanwhile.
            at = now.timestamp() + hold
            held = job.evolve(status=JobStatus.POSTPONED, orphaned=count, progress=0.0)
            self.released = held.evolve(options=dict(job.options, at=at))
            self.fields = JobFields(status=int(JobStatus.POSTPONED), orphaned=count, progress=0.0, at=at)
        note = library_error(JobReleasedError, reason)
        released = new_event(self.released, self.released.status, worker, time=now, error=note, sweep=sweep)
        self.events = [self.processing_event(), released]
        self.when = owned_by(worker, self.run, expires)

    def announce(self) -> None:
        job = self.job
        # The worker that lost the run may have written the events of an end it never recorded (it died, or was
        # fenced, between the two writes): they are not the run's end.
        self.life.store.delete_unrecorded_events(job.id, self.run, self.worker, job.outcome)
        # Its slots of the limits it ran under are free now (SPEC 8: a dead run's slot comes back when the run is
        # orphaned); best effort: the next worker that finds a limit full drops a slot whose run is over.
        with contextlib.suppress(ServerUnavailableError):
            self.life.store.free_slots(keys_of(job.to_doc()), job.id, self.worker)
        held = "" if self.hold is None else f" (held {self.hold:.0f} s: its third orphaning if its owner is dead)"
        self.life.logger.warning(
            f"job {job.id} ({job.job_class!r}) put back to {self.released.status.name.lower()}: {self.reason}{held}",
            extra={"job_id": job.id, "job_class": job.job_class, "reason": self.reason},
        )
        self.life.emit(self.released.status, self.released.evolve(change=self.marker))


def _fits(result: Any) -> bool:
    try:
        return encoded_size(result) <= MAX_RESULT_SIZE
    except InvalidArgumentError:
        return False
