"""What a node records for a job whose worker died (or was killed) before the worker recorded the run's end."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from bson import ObjectId

from ..constants import JobStatus, KillReason
from ..errors import JobTimeoutError, LeaseUnconfirmedError
from ..store import JobStore
from ..store.records import JobRecord
from ..store.schema import problem
from ..store.views import JobView
from .changes import Change, library_error

#: Seconds after a worker's death its last writes may still reach the server (sent before it died).
LATE_WRITE_SECONDS = 2.0


class Recorder(Protocol):
    """What recording a killed worker's run needs of the lifecycle."""

    store: JobStore

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
    ) -> Change: ...

    def release(
        self,
        doc: JobRecord | Mapping[str, Any],
        worker: ObjectId,
        *,
        orphaned: bool,
        reason: str,
        expires: datetime | None = None,
    ) -> Change: ...

    def reject(self, doc: Mapping[str, Any], found: str) -> bool: ...

    def vouch(self, job_id: ObjectId, run: int, worker: ObjectId, stored: Mapping[str, Any]) -> None: ...

    def settle_cancel(self, doc: Mapping[str, Any]) -> None: ...


class AfterKill:
    """What a node records for a job whose worker it saw die before the worker recorded the job's end.

    Prepared on first use and kept, so that a retry after an outage records the same change. A dead worker may
    have written the events of an end it never recorded: those are withdrawn first.
    """

    def __init__(
        self,
        life: Recorder,
        job_id: ObjectId,
        worker: ObjectId,
        run: int,
        reason: KillReason,
        timeout: int,
        detail: str,
    ) -> None:
        self.life = life
        self.job_id = job_id
        self.worker = worker
        self.run = run
        self.reason = reason
        self.detail = detail
        self.timeout = timeout
        self.change: Change | None = None
        self.done = False
        self.keep: Any = None  # the run's recorded end, once we recorded it
        #: A write the worker sent just before it died may reach the server after our first look: look again then.
        self.sweep_again_at = time.monotonic() + LATE_WRITE_SECONDS

    def sweep(self) -> None:
        """Withdraw the dead worker's unrecorded end of its run (again, for a write that arrived late)."""
        if self.keep is not None:
            self.life.store.delete_unrecorded_events(self.job_id, self.run, self.worker, self.keep)
            return
        doc = self.life.store.find_job(self.job_id)
        if doc is not None:
            self._withdraw_unrecorded(doc)

    def _withdraw_unrecorded(self, doc: Mapping[str, Any]) -> None:
        # Only while the job is still at that run: then its recorded end, if any, is the job's outcome, and every
        # other end the dead worker wrote for it was never recorded. Once the job has moved on, an end of the run
        # cannot be told from its recorded one here, and nothing is withdrawn.
        job = JobView(doc)
        if job.run_or(1) == self.run:
            self.life.store.delete_unrecorded_events(self.job_id, self.run, self.worker, job.outcome_value)

    def record(self) -> None:
        if self.done:
            return
        store = self.life.store
        if self.change is None:
            doc = store.find_job(self.job_id)
            if doc is None or JobView(doc).run_or(1) != self.run:
                self.done = True  # gone, or the run's end was recorded (by the worker itself): nothing to add
                return
            if JobView(doc).status_value != JobStatus.PROCESSING or JobView(doc).worker_value != self.worker:
                self._someone_else_recorded(doc)
                self.done = True
                return
            found = problem(doc, capped=store.capped)
            if found is not None:  # made malformed while it ran (SPEC 2): ended FAILED (or left), never stuck here
                self.life.reject(doc, found)
                self.done = True
                return
            self.change = self._prepare(JobRecord.from_doc(doc, checked=True))  # checked just above
        # Withdrawn only after our own record won: an end the worker sent just before it died may still land
        # first, and then it is the run's end and stays. Once ours won, any other end of the run is not.
        if self.change.record():
            self.keep = self.change.outcome()
            store.delete_unrecorded_events(self.job_id, self.run, self.worker, self.keep)
        self.done = True

    def _someone_else_recorded(self, doc: Mapping[str, Any]) -> None:
        self._withdraw_unrecorded(doc)  # someone else recorded how the run went
        if self.reason.survived:  # we live on: if a sweep put the run back, it was no death
            self.life.vouch(self.job_id, self.run, self.worker, doc)
        if JobView(doc).status_value == JobStatus.CANCELED and JobView(doc).worker_value == self.worker:
            # The canceler recorded CANCELED while our worker ran it. (Canceled while another worker held the run,
            # the run is that worker's to settle, not ours.)
            self.life.settle_cancel(doc)

    def _prepare(self, job: JobRecord) -> Change:
        life, worker = self.life, self.worker
        match self.reason:
            case KillReason.TIMEOUT:
                message = f"job exceeded its timeout of {self.timeout} s and was killed"
                return life.end(job, worker, JobStatus.TIMEOUT, error=library_error(JobTimeoutError, message))
            case KillReason.STOP:
                return life.release(job, worker, orphaned=False, reason="queue node stopped")
            case KillReason.LOST:
                return life.release(job, worker, orphaned=False, reason="lease not renewed in time (node fenced)")
            case KillReason.STARVED:
                message = (
                    "the job kept the Python interpreter busy in one call for so long that its worker could not "
                    "confirm its lease in time, and had to stop it; raise orphaned_timeout above the longest such call"
                )
                return life.end(job, worker, JobStatus.FAILED, error=library_error(LeaseUnconfirmedError, message))
            case KillReason.MANAGER_DIED:
                return life.release(job, worker, orphaned=True, reason=self.detail or "worker manager died")
            case _:  # it died (or, for CANCEL and SHRINK, was never meant to be running this run): a death
                return life.release(job, worker, orphaned=True, reason=self.detail or "worker process died")
