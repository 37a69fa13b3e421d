"""The slots of cluster-wide limits (SPEC 8) a worker takes for a run before it claims the job, and gives back
after the run."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId

from ..constants import JobStatus
from ..errors import ServerUnavailableError
from ..store import JobStore
from ..store.entries import SlotHolder
from ..store.views import JobView

#: How long a slot is kept for a job that is WAITING: its claim may be on its way (a claim is one write, bounded by
#: a second), or its run was put back (orphaned, stopped) and the slot is a leftover, which it is after this.
CLAIM_GRACE_SECONDS = 5.0


class Slots:
    def __init__(self, store: JobStore, worker: ObjectId, logger: logging.Logger) -> None:
        self.store = store
        self.worker = worker
        self.logger = logger

    def take(self, job_id: ObjectId, keys: Iterable[str]) -> bool:
        """A slot of each limit, or none: False when one of them is full (those taken are given back)."""
        taken: list[str] = []
        for key in keys:
            if not self._take(key, job_id):
                self.give_back(job_id, taken)
                return False
            taken.append(key)
        return True

    def give_back(self, job_id: ObjectId, keys: Iterable[str]) -> None:
        """Best effort: a slot not given back is dropped by the next worker that finds its limit full."""
        keys = list(keys)
        if not keys:
            return
        try:
            self.store.free_slots(keys, job_id, self.worker)
        except ServerUnavailableError as exc:
            self.logger.warning(f"could not give back the limit slots of job {job_id} ({exc}); they free themselves")

    def _take(self, key: str, job_id: ObjectId) -> bool:
        if self.store.take_slot(key, job_id, self.worker):
            return True
        # Full. Holders whose run is over (it ended, was put back, or runs under another worker now) hold nothing:
        # a run whose process died frees its slot when the run is orphaned.
        holders = self.store.limit_holders(key)
        jobs = [job for h in holders if isinstance(job := _job_of(h), ObjectId)]
        states = self.store.job_states(jobs)
        now = self.store.clock.now()
        stale = [h for h in holders if _stale(h, states.get(_job_of(h)) if isinstance(h, Mapping) else None, now)]
        if not stale:
            return False
        self.store.drop_holders(key, stale)
        return self.store.take_slot(key, job_id, self.worker)


def _job_of(holder: Any) -> Any:
    """The job of a holder as stored, None for a holder that is no document (a hostile entry)."""
    return SlotHolder(holder).job if isinstance(holder, Mapping) else None


def _stale(holder: Any, state: Mapping[str, Any] | None, now: datetime) -> bool:
    if not isinstance(holder, Mapping):
        return True  # no holder this library wrote: it holds nothing
    held = SlotHolder(holder)
    if not isinstance(held.job, ObjectId) or not isinstance(held.worker, ObjectId):
        return True
    if state is None:
        return True
    job = JobView(state)
    status = job.status_value
    if status == JobStatus.PROCESSING:
        return bool(job.worker_value != held.worker)
    if status == JobStatus.WAITING:  # its claim may be on its way
        since = held.since
        return not isinstance(since, datetime) or since < now - timedelta(seconds=CLAIM_GRACE_SECONDS)
    return True
