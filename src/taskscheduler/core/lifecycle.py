"""The one owner of job state changes: add, claim, the end of a run (and the next run), release, cancel, requeue.

A job keeps one document and one id for its whole life. Every change of its status is one conditional update
of that document (:meth:`Store.transition`), so a run's end and the next run that follows it are one atomic
write: no kill, pause or outage can lose the next run or make a second one.

A change that records details (an error, a result, the reason of a release) writes its event documents first,
with ids fixed when the change is prepared, and marks the job document with the id of its first event
(``change``). Recording it again after an outage is therefore safe: the events are not written twice, and a
transition that finds its own mark already in place knows that its earlier attempt succeeded. A transition that
lost (another worker or node owns the job now) withdraws its events.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Mapping
from datetime import datetime
from typing import Any

from bson import ObjectId

from .. import options as o
from ..constants import DEFAULT_ORPHANED_TIMEOUT, MAX_ORPHANINGS, NO_WORKER, UNSET_TIME, JobStatus, KillReason
from ..errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidJobError,
    JobNotFoundError,
    OrphanedJobError,
    ServerUnavailableError,
    TaskSchedulerError,
)
from ..events import Emitter, change_key
from ..recurrence import next_cron_time
from ..store import JobStore, StatusChange, encoded_size, fingerprint, job_size
from ..store.records import EventRecord, JobFields, JobRecord, parent_of
from ..store.schema import end_problem, job_ref, problem, status_problem
from ..store.views import EventView, JobView
from .changes import (
    Change,
    Release,
    RunEnd,
    derived_id,
    library_error,
    new_event,
)
from .dependencies import check_new, depends_on, failure_of, verdicts
from .kills import AfterKill
from .once import add_once, fresh_holder, once_holder
from .runs import counted_run_ends

#: Stored in ``outcome`` and ``change`` while unset (fixed-size fields, see :mod:`taskscheduler.store.mongo.documents`).
NO_EVENT = NO_WORKER
#: How often a cancel decides again when the job changed under it (a busy job settles in a few).
CANCEL_ATTEMPTS = 100
#: Leases a run held for its orphaning verdict waits for the owners of its sweeps to vouch (see release_orphan).
SWEEP_CONFIRM_LEASES = 2.0

Document = dict[str, Any]


class Lifecycle:
    """Every state change of a job, used alike by the client API, queue nodes and workers."""

    def __init__(
        self, store: JobStore, emitter: Emitter, logger: logging.Logger, present: Callable[[Document], object]
    ) -> None:
        self.store = store
        self.emitter = emitter
        self.logger = logger
        #: What an event carries for a job (the Scheduler's Process handle of it).
        self.present = present

    def process(self, job: JobRecord | Mapping[str, Any]) -> object:
        return self.present(job.to_doc() if isinstance(job, JobRecord) else dict(job))

    def emit(self, status: int, job: JobRecord | Mapping[str, Any]) -> None:
        if isinstance(job, JobRecord):
            shown: JobRecord | Mapping[str, Any] = job.evolve(status=JobStatus(status))
        else:
            shown = dict(job, **JobFields(status=int(status)))
        self.emitter.emit_status(status, self.process(shown), _change_of(shown))

    def job(self, job: JobRecord | Mapping[str, Any]) -> JobRecord:
        """The record of a job given as one or as its stored document (InvalidJobError when malformed)."""
        return job if isinstance(job, JobRecord) else JobRecord.from_doc(job)

    def observe(self, change: StatusChange, doc: Mapping[str, Any], emitter: Emitter) -> None:
        """Emit on ``emitter`` what a change seen in a change stream means: a run's end, when the same update
        scheduled the next run (its outcome is read from its event), then the status it set."""
        if change.ended_run is not None and emitter.wants_status():
            event = self.store.find_event(change.ended_run)
            if event is not None and status_problem(event) is None:  # (a hostile end event tells no end: SPEC 2)
                seen = EventView(event)
                ended = dict(
                    doc,
                    **JobFields(
                        status=int(seen.status_as_stored),
                        run=seen.run_value,
                        worker=seen.worker_value,
                        outcome=change.ended_run,
                        ended=seen.time_value,
                    ),
                )
                emitter.emit_status(int(seen.status_as_stored), self.process(ended), _change_of(ended))
        emitter.emit_status(change.status, self.process(dict(doc, **JobFields(status=change.status))), _change_of(doc))

    # -- adding ----------------------------------------------------------------------------------------------------

    def prepare(
        self,
        path: str,
        data: Any,
        given: Mapping[str, Any],
        defaults: Mapping[str, Any],
        known: frozenset[ObjectId] = frozenset(),
    ) -> Document:
        """A new job document of the job class at ``path`` (``module:QualName``), validated; nothing is written.
        ``known``: ids of jobs added in the same call (a chain), which ``depends_on`` may name before they exist."""
        opts = o.job_options(given, defaults)
        chosen = opts.pop(o.ID, None)
        job_id = chosen or ObjectId()
        encoded_size(data)
        if chosen is not None:
            awaited_by = [JobView(doc).id_value for doc in self.store.dependents(chosen)]
            if awaited_by:  # e.g. a finished job's id, after retention removed it: others would wait for the new one
                raise InvalidArgumentError(
                    f"option id: {len(awaited_by)} unfinished job(s) depend on job {chosen} (e.g. {awaited_by[0]}); "
                    "a new job under that id would stand in for the one they wait for (and may close a cycle)"
                )
        if opts[o.DEPENDS_ON]:
            check_new(self.store, opts[o.DEPENDS_ON], known)
        opts[o.AT] = float(opts[o.AT])  # always a double: the next run's time is written into it in place
        clock = self.store.clock  # the server's: a producer whose clock is off neither delays nor hastens a job
        if opts[o.CRON]:  # the first match from the given time (or from now) on
            opts[o.AT] = next_cron_time(opts[o.CRON], opts[o.TIMEZONE], max(opts[o.AT], clock.time()) - 0.001)
        now = clock.now()
        status = JobStatus.POSTPONED if opts[o.AT] > 0 and not clock.reached(opts[o.AT]) else JobStatus.WAITING
        # Every field a later update writes is stored from the start, with its final BSON type (JobRecord.to_doc).
        job = JobRecord(job_id, path, status, data=data, options=opts, created=now, key=fingerprint(path, data))
        if chosen is not None and self.store.has_children(chosen):
            job = job.evolve(children=True)  # children were added naming this id before it was stored: look
        return job.to_doc()

    def add(self, doc: Document, reserved: int | None = None) -> Document:
        job = JobView(doc)  # prepared: it fits
        parent = parent_of(job.data)
        if parent is not None:
            # After the checks that may refuse the add (its size, room), before the child is stored: the parent's
            # end then looks at its children.
            size = self.store.reserve_job(doc) if reserved is None else reserved
            try:
                self.store.mark_parent(parent)
            except BaseException:
                self.store.unreserve_job(size)
                raise
            reserved = size
        self.store.insert_job(doc, reserved)
        self.logger.debug("added job", extra={"job_id": job.id, "job_class": job.class_value})
        self.emitter.emit_status(job.status_as_stored, self.process(doc), _change_of(doc))
        self.cancel_if_blocked_for_good(doc)
        return doc

    def cancel_if_blocked_for_good(self, doc: Document) -> bool:
        """Cancel a job one of whose dependencies has ended FAILED, TIMEOUT or CANCELED (SPEC 8), naming it; True
        when it did. (Looked at after the job is stored: a dependency failing meanwhile finds it, see
        :meth:`cancel_dependents`.)"""
        verdict = verdicts(self.store, [doc]).get(JobView(doc).id)
        if verdict is None or verdict.failed is None:
            return False
        with contextlib.suppress(InvalidArgumentError):  # it ended meanwhile
            return self.cancel(doc, error=failure_of(*verdict.failed))
        return False

    def cancel_dependents(self, job_id: ObjectId, status: JobStatus) -> None:
        """The job ended ``status`` for good: cancel the unfinished jobs that depend on it, and theirs in turn,
        each with an error naming the dependency that failed it."""
        pending: list[tuple[ObjectId, JobStatus]] = [(job_id, status)]
        while pending:
            failed, how = pending.pop()
            for doc in self.store.dependents(failed):
                try:
                    if self.cancel(doc, error=failure_of(failed, how), cascade=False):
                        pending.append((JobView(doc).id, JobStatus.CANCELED))
                except TaskSchedulerError as exc:  # ended meanwhile, or malformed: the others go on
                    culprit = JobView(doc).ref
                    self.logger.warning("cannot cancel job %s depending on %s: %s", culprit, failed, exc)

    def add_once(self, doc: Document, requested: Mapping[str, Any], data: Any) -> Document:
        """Add ``doc`` unless an active job of its class (and data) has the same options; replace one that
        differs; concurrent callers leave exactly one active job (see :mod:`taskscheduler.core.once`). Returns the
        job kept: ``doc`` as added, or the active job found with the same options."""
        return add_once(self, doc, requested, data)

    # -- reading ---------------------------------------------------------------------------------------------------

    def load(self, job_id: ObjectId) -> Document:
        doc = self.store.find_job(job_id)
        if doc is None:
            raise JobNotFoundError(f"job {job_id} was not found")
        return doc

    def outcome(self, doc: Mapping[str, Any]) -> Document | None:
        """The event of the job's last ended run (with its error or result), if a run ended."""
        event_id = JobView(doc).outcome_value
        if not isinstance(event_id, ObjectId) or event_id == NO_EVENT:
            return None
        return self.store.find_event(event_id)

    def blocked_by(self, doc: Mapping[str, Any]) -> list[ObjectId]:
        """The jobs ``doc`` depends on that have not ended DONE (yet), in the order given."""
        verdict = verdicts(self.store, [doc]).get(JobView(doc).id_value)
        if verdict is None:
            return []
        return [*verdict.waiting_for, *([verdict.failed[0]] if verdict.failed is not None else [])]

    def runs(self, doc: Mapping[str, Any]) -> list[Document]:
        """Every ended run of a job, oldest first: one event per run number."""
        job = JobView(doc)
        return counted_run_ends(self.store.job_events(job.id), job.outcome_value)

    # -- operator actions ------------------------------------------------------------------------------------------

    def cancel(self, doc: Document, error: Mapping[str, Any] | None = None, cascade: bool = True) -> bool:
        """Cancel a job for good: a waiting one never runs, a running one is killed by its node. ``error``: what
        the CANCELED event records as the reason. Its unfinished children are canceled too, and (``cascade``) the
        jobs depending on it. True when this call canceled it, False when it was CANCELED already."""
        for _ in range(CANCEL_ATTEMPTS):
            job = JobView(doc)
            found = end_problem(doc, capped=self.store.capped)
            if found is not None:  # SPEC 2: refused, nothing written (a node ends it FAILED, or it is skipped)
                raise InvalidArgumentError(f"job {job.ref} cannot be canceled: it is malformed ({found})")
            status = JobStatus(job.status_as_stored)
            if status == JobStatus.CANCELED:
                return False
            if status.is_terminal:
                raise InvalidArgumentError(
                    f"job {job.id} has already ended with status {status.name}; "
                    "only unfinished jobs can be canceled"
                )
            now = self.store.clock.now()
            event_id = _cancel_event_id(doc, status)
            running = status == JobStatus.PROCESSING
            fields = JobFields(status=int(JobStatus.CANCELED), ended=now, outcome=event_id, change=event_id)
            if not running:
                # Only a canceled run keeps its lease end: until someone settles it (see settle_cancel), its
                # worker may have written an end it never recorded. A released run's old lease end is no lease.
                fields = fields.evolve(expires=UNSET_TIME)
            # As read, and only the fields of the types a write compares (a hostile ``run`` is left out, as a
            # malformed job's end leaves it out: it never matches, and the cancel would look again for ever).
            when = JobFields(status=int(status))
            if job.run_int is not None:
                when = when.evolve(run=job.run_int)
            elif isinstance(job.change_value, ObjectId):
                when = when.evolve(change=job.change_value)
            worker = job.worker_value if running else None
            started = job.started_value if running else None
            event = _raw_event(doc, JobStatus.CANCELED, worker, now, event_id, started=started, error=error)
            self.store.insert_events([event])
            if self._transition_or_withdraw(job.id, when, fields, event_id, shared=True):
                doc.update(fields)
                self.logger.info(
                    f"job {job.id} ({job.class_value!r}) canceled",
                    extra={"job_id": job.id, "job_class": job.class_value},
                )
                self.emit(JobStatus.CANCELED, doc)
                self.cancel_children(job.id)
                if cascade:
                    self.cancel_dependents(job.id, JobStatus.CANCELED)
                return True
            doc = self.load(job.id)  # it changed meanwhile: decide again on its new status
            if JobView(doc).change_value != event_id:  # (else another cancel of the same state recorded this event)
                self.store.delete_events([event_id])
        raise TaskSchedulerError(f"job {JobView(doc).ref}: cancel gave up, the job kept changing under it")

    def cancel_children(self, parent_id: ObjectId) -> None:
        """Cancel the unfinished children (``data.parent``) of a job."""
        for child in self.store.children(parent_id, active_only=True):
            try:
                self.cancel(child)
            except (ServerUnavailableError, ConfigurationError):
                raise
            except InvalidArgumentError:
                pass  # it finished meanwhile, or it is malformed (a node ends it)
            except Exception as exc:  # anyone may write a child: one that cannot be canceled keeps no other running
                self.logger.warning("cannot cancel child %s of job %s: %r", JobView(child).ref, parent_id, exc)

    def reject(self, doc: Mapping[str, Any], found: str) -> bool:
        """End a malformed job document FAILED with an InvalidJobError naming ``found`` (SPEC 2), in one
        conditional update as every change: only while it still has the status (and mark) it was read with.
        True when this call ended it. A document that cannot take the write (see :func:`schema.end_problem`) is
        left as it is: False, and the caller skips it."""
        if end_problem(doc, capped=self.store.capped) is not None:
            return False
        job = JobView(doc)
        job_id, change, run = job.id, job.change_value, job.run_int
        # Read as it was; fixed fields only, so the update compares values of the types it was checked for.
        expect = JobFields(status=job.status_as_stored)
        if isinstance(change, ObjectId):
            expect = expect.evolve(change=change)
        if run is not None:
            expect = expect.evolve(run=run)
        # The same event id for every node that meets this document in this state: retries write it once.
        salt = b"malformed" + (change.binary if isinstance(change, ObjectId) else b"")
        event_id = derived_id(job_id, run or 1, salt) if isinstance(job_id, ObjectId) else ObjectId()
        now = self.store.clock.now()
        error = library_error(InvalidJobError, f"job {job_ref(job_id)} is malformed: {found}")
        self.store.insert_events([_raw_event(doc, JobStatus.FAILED, None, now, event_id, run=run or 1, error=error)])
        fields = JobFields(status=int(JobStatus.FAILED), ended=now, outcome=event_id, change=event_id)
        if not self._transition_or_withdraw(job_id, expect, fields, event_id):
            # Another node may have ended it first, with the same event: that event stays.
            if JobView(self.store.find_job(job_id) or {}).change_value != event_id:
                self.store.delete_events([event_id])
            return False
        self.logger.warning(
            "job %s is malformed and ended FAILED: %s",
            job_ref(job_id),
            found,
            extra={"job_id": job_id, "problem": found},
        )
        if isinstance(job_id, ObjectId):
            self.cancel_dependents(job_id, JobStatus.FAILED)
        return True

    def requeue(self, doc: Document) -> Document:
        """A FAILED, TIMEOUT or CANCELED job back to WAITING: same id, next run number."""
        ended = JobView(doc)
        found = problem(doc, capped=self.store.capped)
        if found is not None:  # SPEC 2: it could not run again (a node would end it FAILED once more)
            raise InvalidArgumentError(f"job {ended.ref} cannot be requeued: it is malformed ({found})")
        status = JobStatus(ended.status_as_stored)
        if status not in (JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED):
            raise InvalidArgumentError(
                f"job {ended.id} is {status.name}; only FAILED, TIMEOUT or CANCELED jobs can be requeued"
            )
        worker, expires = ended.worker_value, ended.expires_value
        if status == JobStatus.CANCELED and worker not in (None, NO_WORKER) and isinstance(expires, datetime):
            # Canceled while it ran: until its node has seen the worker die (or the lease ran out), another worker
            # must not start it.
            if self.store.server_time() < expires:
                raise InvalidArgumentError(
                    f"job {ended.id} was canceled while running and its worker is still being stopped; "
                    "requeue it again in a few seconds"
                )
            self.settle_cancel(doc)  # its node died with it: what its worker left of the run goes first
        job_size(doc)  # a job stored over the limit (by an older version) would stop change streams once active
        job = JobRecord.from_doc(doc, checked=True)  # checked on entry
        if job.once is not None:
            self._hold_key_for_requeue(job.id, job.once)
        run = job.run + 1
        event_id = ObjectId()
        options = dict(job.options, at=0.0)
        requeued = job.evolve(status=JobStatus.WAITING, run=run, worker=None, progress=0.0, orphaned=0, failures=0)
        requeued = requeued.evolve(options=options, change=event_id)
        event = new_event(requeued, JobStatus.WAITING, time=self.store.clock.now(), event_id=event_id)
        self.store.insert_events([event])
        fields = JobFields(
            status=int(JobStatus.WAITING),
            run=run,
            worker=NO_WORKER,
            progress=0.0,
            orphaned=0,
            failures=0,
            at=0.0,
            change=event_id,
        )
        moved = self._transition_or_withdraw(job.id, JobFields(status=int(status), run=run - 1), fields, event_id)
        if not moved:
            self.store.delete_events([event_id])
            if job.once is not None:
                self.store.confirm_once(job.once, job.id)  # it holds its key as before
            raise InvalidArgumentError(f"job {job.id} changed while being requeued; try again")
        if job.once is not None and not self.store.confirm_once(job.once, job.id):
            # Paused past ONCE_PENDING_SECONDS between the two writes: an add_job_once call took the key over and
            # its job stays; this one goes again.
            with contextlib.suppress(InvalidArgumentError):
                self.cancel(self.load(job.id))
            raise InvalidArgumentError(f"job {job.id}: an add_job_once call took its key while it was requeued")
        self.logger.info(
            f"job {job.id} ({job.job_class!r}) requeued for run {run}",
            extra={"job_id": job.id, "job_class": job.job_class, "run": run},
        )
        self.emit(JobStatus.WAITING, requeued)
        again = requeued.to_doc()
        if depends_on(again):  # its dependencies are looked at again: one that failed for good cancels it again
            self.cancel_if_blocked_for_good(again)
        return again

    def _transition_or_withdraw(
        self,
        job_id: ObjectId,
        when: JobFields,
        fields: JobFields,
        event_id: ObjectId,
        shared: bool = False,
    ) -> bool:
        """A transition whose event is written already: on an error without an answer, the job's mark tells
        whether it was written; the event of one that was not is withdrawn (best effort during an outage).
        ``shared``: the event's id is derived from the state it changes, so another caller making the same change
        may still record it: withdrawn only once the job has left that state."""
        try:
            return self.store.change(job_id, when, fields)
        except ServerUnavailableError:
            with contextlib.suppress(ServerUnavailableError):
                stored = self.store.find_job(job_id) or {}
                left = when.unmet_in(stored)
                if JobView(stored).change_value != event_id and (left or not shared):
                    self.store.delete_events([event_id])
            raise

    def _hold_key_for_requeue(self, job_id: ObjectId, key: str) -> None:
        """Before a requeued add_job_once job is active again, it holds its key as pending (renewed, so that a
        caller who read the old hold cannot take it over); concurrent add_job_once calls wait for it and then
        compare with the requeued job. Refused while another active job holds the key."""
        holder = once_holder(self.store, key)
        held_by = holder.job if holder else None
        if held_by is not None and held_by != job_id:
            other = self.store.find_job(held_by)
            pending = other is None and holder is not None and not holder.inserted and fresh_holder(holder, self.store)
            if (other is not None and JobView(other).unfinished) or pending:
                raise InvalidArgumentError(
                    f"job {job_id} cannot be requeued: an active job with the same add_job_once key exists"
                )
        if not self.store.take_once(key, job_id, held_by, holder.since if holder else None):
            raise InvalidArgumentError(f"job {job_id}: its add_job_once key changed hands meanwhile; try again")

    # -- the run ---------------------------------------------------------------------------------------------------

    def claim(self, job: Mapping[str, Any] | ObjectId, worker: ObjectId, lease: float) -> Document | None:
        """This run of ``job`` (a document, or an id for its current run): WAITING -> PROCESSING, owned by
        ``worker`` with a lease of ``lease`` seconds on the server's clock. None when another worker had it
        first, or the job has moved on to another run."""
        doc = self.store.claim(job, worker, lease)
        if doc is not None:
            claimed = JobView(doc)
            run = claimed.run_value
            self.logger.info(
                f"claimed job {claimed.id} ({claimed.class_value!r}) run {run}",
                extra={"job_id": claimed.id, "job_class": claimed.class_value, "worker": worker, "run": run},
            )
            self.emit(JobStatus.PROCESSING, doc)
        return doc

    def unpostpone(self, doc: Mapping[str, Any]) -> EventRecord | None:
        """POSTPONED -> WAITING once its time has come (this run only); of all nodes racing, one wins. Returns the
        winner's WAITING event, for :meth:`record_due` (None when another node won)."""
        # Its event first, then the status (a node that dies between the two leaves the event, never a WAITING
        # run without one). The event's id is derived from the run, the same for every node and attempt: of many
        # nodes racing, the losers' inserts change nothing, and the winner's status names it (``change``). A node
        # that loses to a cancel withdraws the event it wrote itself (never the winner's, which it did not write).
        # Read as routed: a job of a class this node does not run was checked for its routing fields only.
        worker = JobView(doc).worker_value  # missing: None, no worker as NO_WORKER
        if isinstance(worker, ObjectId) and worker != NO_WORKER:
            return self._verdict(doc)  # a run held after a sweep
        return self._due(doc, JobFields())

    def record_due(self, doc: Mapping[str, Any], event: EventRecord) -> None:
        """Write the WAITING event of a job :meth:`unpostpone` moved (again after an outage: written once)."""
        self.store.insert_events([event])
        self.emit(JobStatus.WAITING, dict(doc, **JobFields(change=event.id)))

    def heartbeat(self, owners: Mapping[ObjectId, tuple[ObjectId, int]]) -> set[ObjectId]:
        """Renew the leases of running jobs (job -> (worker, run)); returns the jobs no longer owned by their
        worker, which must stop at once. Only a run its own worker ended as the job's last (it keeps ``worker``)
        is left out: any other change may mean another worker runs the job now, and killing a worker that has
        just recorded its end (before its manager heard of it) costs nothing but a fork."""
        held = self.store.heartbeat({job: worker for job, (worker, _) in owners.items()})
        return {job for job, doc in held.items() if doc is None or JobView(doc).worker_value != owners[job][0]}

    def orphans(self) -> list[Document]:
        """Running jobs whose lease has ended on the server's clock (their node stopped renewing it)."""
        return self.store.orphans(self.store.server_time())

    def end(
        self,
        doc: JobRecord | Mapping[str, Any],
        worker: ObjectId,
        status: JobStatus,
        *,
        error: Mapping[str, Any] | None = None,
        result: Any = None,
        has_result: bool = False,
        expires: datetime | None = None,
    ) -> RunEnd:
        job = self.job(doc)
        change = RunEnd(self, job, worker, status, error=error, result=result, has_result=has_result, expires=expires)
        change.vouches = True  # written by the run's worker, or by its node after a timeout: both live on
        return change

    # -- orphanings: SPEC 4 counts dead processes only -------------------------------------------------------------
    #
    # A job's orphanings in a run are the deaths its own nodes saw (a worker or manager died: stored in
    # ``orphaned``) plus the sweeps of the run whose owner never vouched for them. A sweep is a release by another
    # node, of a run whose lease ran out: at that moment nobody can tell a dead owner from one that is cut off or
    # paused, so the sweep stores no count, only its event (``sweep``). An owner that lives on finds out by
    # itself: its node records the end of the run it fenced (or stopped, or timed out), or its worker the run's
    # end, and finds the run put back by someone else; it then vouches for the sweep (``sweep.back``), which no
    # longer counts. An owner that died never does. The MAX_ORPHANINGS-th orphaning ends the run FAILED. An
    # orphaning that would be the MAX_ORPHANINGS-th were every unvouched sweep a death holds the run (POSTPONED,
    # naming the worker) until every owner had time to vouch: then its verdict fails the run or puts it back, and a
    # job whose nodes keep dying with it never runs more than MAX_ORPHANINGS times in a run.

    def release(
        self,
        doc: JobRecord | Mapping[str, Any],
        worker: ObjectId,
        *,
        orphaned: bool,
        reason: str,
        expires: datetime | None = None,
    ) -> Change:
        """Put a job its worker can no longer run back to WAITING (same id and run), conditional on ownership.
        ``orphaned``: its node saw the worker (or the manager) die; the death is stored in ``orphaned`` and, with
        the run's unvouched sweeps, the :data:`MAX_ORPHANINGS`-th orphaning ends the run FAILED instead. A release
        that is not ``orphaned`` (a stop, a node that fenced itself) counts nothing."""
        job = self.job(doc)
        deaths = job.orphaned
        if not orphaned:
            change = Release(self, job, worker, deaths, reason, expires)
            change.vouches = True  # its node lives on: a sweep that beat it was no death
            return change
        if deaths + 1 >= MAX_ORPHANINGS:  # deaths its nodes saw are certain: no verdict to wait for
            return self._orphaned(job, worker, deaths + 1, deaths + 1, reason, expires, None)
        if self._third_if_dead(job, worker, deaths + 1):
            return Release(self, job, worker, deaths + 1, reason, expires, hold=self._verdict_delay(job))
        return Release(self, job, worker, deaths + 1, reason, expires)

    def _third_if_dead(self, job: JobRecord, worker: ObjectId, deaths: int) -> bool:
        """Whether the run reaches MAX_ORPHANINGS should every sweep whose owner has not vouched yet be a death
        (``deaths``: the ones its nodes saw, this orphaning included)."""
        return deaths + len(self.store.unvouched_sweeps(job.id, job.run) - {worker}) >= MAX_ORPHANINGS

    def release_orphan(self, doc: JobRecord | Mapping[str, Any], reason: str) -> Change:
        """A sweep: put back a run whose lease ran out on the server (``doc`` as :meth:`orphans` found it), from
        any node. It stores no count: its event records the sweep, which counts until the owner vouches for it."""
        job = self.job(doc)
        worker, expires = job.worker, job.expires  # no lease end stored (a hostile write): put back all the same
        if worker is None:
            raise InvalidJobError(f"job {job.id} is not running under a worker: there is no run to put back")
        deaths = job.orphaned
        # This sweep is no death yet (its owner may be only paused or cut off, SPEC 4), nor is any earlier one its
        # owner has not vouched for yet, however old: a sweep fails a run only in a verdict, once every owner had
        # time to vouch. (The same worker swept before in this run: an attempt of this sweep whose outcome was
        # unknown, or one the owner's renewal undid. A worker dies once.)
        if self._third_if_dead(job, worker, deaths + 1):
            # Were every unvouched sweep a death, this one would be the third: the run must not go again before
            # the verdict. Held POSTPONED (naming the worker) until every owner had time to vouch; then
            # :meth:`unpostpone` fails the run or puts it back.
            return Release(self, job, worker, deaths, reason, expires, expires, hold=self._verdict_delay(job))
        return Release(self, job, worker, deaths, reason, expires, expires)

    def _verdict_delay(self, job: JobRecord) -> float:
        """How long a held run waits for its owner: until its sweep is old enough to count (plus a second)."""
        seconds = job.lease if job.lease > 0 else float(DEFAULT_ORPHANED_TIMEOUT)
        return SWEEP_CONFIRM_LEASES * seconds + 1.0

    def _verdict(self, doc: Mapping[str, Any]) -> EventRecord | None:
        """A run held after a sweep that would be its third orphaning, now due: FAILED if its owner never vouched
        (a death), else WAITING as any due run (letting go of the worker). Every node may race to decide: the
        verdict's events have derived ids, one update wins."""
        held = JobView(doc)
        job_id, run, worker = held.id, int(held.run_or(1)), held.worker_value  # an ObjectId: see unpostpone
        stored = self.store.find_job(job_id)
        now = JobView(stored) if stored is not None else None
        if now is None or (now.status_value, now.run_value, now.worker_value) != (
            JobStatus.POSTPONED,
            run,
            worker,
        ):
            return None  # decided, canceled or changed meanwhile
        job = JobRecord.from_doc(now.doc)
        # Every sweep of the run is at least as old as the one that held it: all had time to be vouched for.
        count = job.orphaned + len(self.store.unvouched_sweeps(job.id, job.run))
        if count >= MAX_ORPHANINGS:
            error = library_error(OrphanedJobError, f"job orphaned {count} times; last: {self._held_for(job)}")
            end = RunEnd(self, job.evolve(orphaned=count), worker, JobStatus.FAILED, error=error, salt=b"verdict")
            end.when = JobFields(status=int(JobStatus.POSTPONED), run=run, worker=worker)
            end.shared = True
            end.record()
            return None
        return self._due(now.doc, JobFields(worker=NO_WORKER), b"due after " + worker.binary)

    def _held_for(self, job: JobRecord) -> str:
        """Why the run was held: the reason its hold recorded (the last orphaning)."""
        events = [EventView(e) for e in self.store.job_events(job.id)]
        holds = [
            e
            for e in events
            if e.run_value == job.run and e.status_value == JobStatus.POSTPONED and isinstance(e.error_value, dict)
        ]
        message = holds[-1].message if holds else None
        return message if isinstance(message, str) else "its node stopped renewing the lease"

    def _due(self, doc: Mapping[str, Any], sets: JobFields, salt: bytes = b"due") -> EventRecord | None:
        """POSTPONED -> WAITING for this run (also setting ``sets``); see :meth:`unpostpone`. ``salt``: what makes
        this move's event id differ from another's of the same run (a retry's due run, then a held one's)."""
        due = JobView(doc)
        job_id, run = due.id, int(due.run_or(1))
        when = JobFields(status=int(JobStatus.POSTPONED), run=run)
        if due.has_worker:  # a run held for a verdict names its worker: a due run of the same number never moves it
            when = when.evolve(worker=due.worker_value)
        event_id = derived_id(job_id, run, salt)
        event = _raw_event(doc, JobStatus.WAITING, None, self.store.clock.now(), event_id)
        written = self.store.insert_events([event])
        fields = JobFields(status=int(JobStatus.WAITING), change=event_id).joined(sets)
        if not self.store.change(job_id, when, fields):
            stored = JobView(self.store.find_job(job_id) or {})
            if stored.change_value != event_id or stored.run_value != run:
                if written and stored.run_value == run:  # this run never became WAITING (canceled, say)
                    self.store.delete_events(written)
                return None
        return event

    def _orphaned(
        self,
        job: JobRecord,
        worker: ObjectId,
        deaths: int,
        count: int,
        reason: str,
        expires: datetime | None,
        sweep: datetime | None,
    ) -> Change:
        """The run's ``count``-th orphaning: FAILED at :data:`MAX_ORPHANINGS`, else back to WAITING with the
        ``deaths`` its nodes saw stored (and, for a sweep, the lease end it swept in its event)."""
        if count >= MAX_ORPHANINGS:
            error = library_error(OrphanedJobError, f"job orphaned {count} times; last: {reason}")
            return RunEnd(self, job.evolve(orphaned=count), worker, JobStatus.FAILED, error=error, expires=expires)
        return Release(self, job, worker, deaths, reason, expires, sweep)

    def vouch(self, job_id: ObjectId, run: int, worker: ObjectId, stored: Mapping[str, Any]) -> None:
        """``worker``'s claim of ``run`` was put back by someone else while its owner (the worker, or its node)
        lived on: its sweep was no death. Only while the job is still at that run and not ended (``stored``),
        when a sweep can still count: a run that was canceled or ended needs no write."""
        live = (JobStatus.WAITING, JobStatus.POSTPONED, JobStatus.PROCESSING)  # POSTPONED: held for a verdict
        if int(JobView(stored).run_or(0)) == run and JobView(stored).status_value in live:
            if self.store.vouch(job_id, run, worker):
                self.logger.info(
                    f"job {job_id} run {run}: its owner lives on, so its earlier sweep is no orphaning",
                    extra={"job_id": job_id, "run": run, "worker": worker},
                )

    def settle_cancel(self, doc: Mapping[str, Any]) -> None:
        """Settle a run canceled while its worker ran it (``doc`` as stored, CANCELED): the worker is stopped,
        dead, or lost its end to the cancel. Whatever end it wrote of the run but never recorded (it died between
        the two writes) is withdrawn, the run's start is recorded, and the job lets go of the worker and its lease
        end. Written by whoever learns first (the worker, its node, or any node's sweep once the lease ran out),
        each step idempotent."""
        job = JobView(doc)
        job_id, worker, run, expires = job.id_value, job.worker_value, job.run_int, job.expires_value
        if job.status_value != JobStatus.CANCELED or not isinstance(job_id, ObjectId):
            return
        if isinstance(worker, ObjectId) and worker != NO_WORKER and run is not None:
            self.store.delete_unrecorded_events(job_id, run, worker, job.outcome_value)
            with contextlib.suppress(InvalidJobError):  # a malformed start is no start to record
                record = JobRecord.from_doc(doc)
                self.store.insert_events([Change(self, record, worker).processing_event()])
        # Conditional on what was read: a hostile ``worker`` is kept (a write must not change the document's size),
        # and the lease end alone takes the job out of the sweep's sight.
        expect = JobFields(status=int(JobStatus.CANCELED), worker=worker)
        sets = JobFields(expires=UNSET_TIME)
        let_go = NO_WORKER if isinstance(worker, ObjectId) else worker
        if isinstance(worker, ObjectId):
            sets = sets.evolve(worker=let_go)
        if isinstance(expires, datetime):
            expect = expect.evolve(expires=expires)
        if expires != UNSET_TIME or let_go != worker:
            self.store.change(job_id, expect, sets)

    def after_kill(
        self, job_id: ObjectId, worker: ObjectId, run: int, reason: KillReason, timeout: int, detail: str = ""
    ) -> AfterKill:
        """What to record for ``run`` of a job whose ``worker`` ended (``reason``; ``detail`` says how a worker
        that died died) before it recorded the run's end."""
        return AfterKill(self, job_id, worker, run, KillReason(reason), timeout, detail)

    # -- progress --------------------------------------------------------------------------------------------------

    def progress(self, job_id: ObjectId, progress: float, owner: ObjectId | None, wait: float | None) -> bool:
        """Store progress. Inside a worker (``owner`` set) an outage never reaches the job: the write is dropped
        with a warning (the run goes on, and its end is recorded once the server is back)."""
        try:
            return self.store.set_progress(job_id, progress, owner, wait)
        except ServerUnavailableError as exc:
            if owner is None:
                raise
            self.logger.warning(
                f"progress of job {job_id} not stored (MongoDB unreachable): {exc}",
                extra={"job_id": job_id, "progress": progress},
            )
            return True


def _raw_event(
    doc: Mapping[str, Any],
    status: JobStatus,
    worker: Any,
    time: datetime,
    event_id: ObjectId,
    *,
    started: Any = None,
    error: Mapping[str, Any] | None = None,
    run: int | None = None,
) -> EventRecord:
    """An event of a stored job that may be malformed (a cancel, or the end of a malformed job: SPEC 2), from
    the fields such an end reads; the others may hold anything. ``run``: the run it records (default: the stored
    one when it is an int, else 1)."""
    job = JobView(doc)
    job_class, stored_run = job.class_value, job.run_int
    begun = started if isinstance(started, datetime) else None
    if run is None:
        run = stored_run if stored_run is not None else 1
    return EventRecord(
        id=event_id,
        job=job.id,
        job_class=job_class if isinstance(job_class, str) else None,
        run=run,
        status=int(status),
        time=time,
        worker=worker if isinstance(worker, ObjectId) else None,
        started=begun,
        ended=time if begun is not None else None,
        error=dict(error) if error is not None else None,
    )


def _cancel_event_id(doc: Mapping[str, Any], status: JobStatus) -> ObjectId:
    """The CANCELED event's id, derived from the state a cancel changes (its run, status and mark): two cancels of
    the same state (a node and a producer, say) write one event, and one of them records it; an event left by a
    cancel cut off by an outage is the one the next cancel records, never a second end of the run."""
    job = JobView(doc)
    job_id, run, mark = job.id_value, job.run_int, job.change_value
    if not isinstance(job_id, ObjectId):
        return ObjectId()
    salt = b"cancel" + bytes([int(status)]) + (mark.binary if isinstance(mark, ObjectId) else b"")
    return derived_id(job_id, run if run is not None else 1, salt)


def _change_of(job: JobRecord | Mapping[str, Any]) -> Hashable | None:
    """What tells this change of the job from its others (events.change_key), alike from a record and from a
    stored document; None for a document without an id (always fired)."""
    if isinstance(job, JobRecord):
        return change_key(job.id, job.run, job.started, job.change)
    view = JobView(job)
    if not view.has_id:
        return None
    started, mark = view.started_value, view.change_value
    started = None if started == UNSET_TIME else started
    key = change_key(view.id, view.run_or(1), started, None if mark == NO_EVENT else mark)
    try:
        hash(key)
    except TypeError:  # a hostile document (a list where an id or a run belongs): its changes are always fired
        return None
    return key
