"""add_job_once: one active job per class (and data) among concurrent callers, without a unique index.

The key (class and data fingerprint, or class alone with ``ignore_data``) is held by one job at a time in a small
collection keyed by the key itself, so the guarantee needs no unique index on the job collection (which a sharded
job collection could not have). A caller takes the key from the job it saw holding it, in one conditional write:
of racing callers one wins, the others look again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from bson import ObjectId

from .. import options as o
from ..errors import InvalidArgumentError, TaskSchedulerError
from ..store import JobStore, fingerprint, same_value
from ..store.records import JobFields, holding_once
from ..store.schema import problem
from ..store.views import JobView, OnceHolder

#: How often add_job_once looks again when concurrent callers keep replacing each other's job.
ONCE_ATTEMPTS = 400
#: Seconds a caller that took an add_job_once key may take to insert its job before others take the key over.
ONCE_PENDING_SECONDS = 30.0

Document = dict[str, Any]


class Adder(Protocol):
    """What add_job_once needs of the lifecycle."""

    store: JobStore

    def add(self, doc: Document, reserved: int | None = None) -> Document: ...

    def cancel(self, doc: Document, error: Mapping[str, Any] | None = None, cascade: bool = True) -> bool: ...

    def load(self, job_id: ObjectId) -> Document: ...


def add_once(life: Adder, doc: Document, requested: Mapping[str, Any], data: Any) -> Document:
    """The job kept: ``doc`` as added, or the active job found with the same options."""
    new = JobView(doc)  # prepared: it fits
    ignore_data = bool(new.options[o.IGNORE_DATA])
    key = fingerprint(new.class_value) if ignore_data else new.key_value
    holding_once(doc, key)
    # Room first: a full collection must fail this call before it cancels the job it would replace.
    stamped = dict(doc, **JobFields(created=life.store.clock.now()))
    reservation = _Reservation(life.store, life.store.reserve_job(stamped))
    with reservation:
        return _add_once(life, doc, requested, data, key, ignore_data, reservation)


def _add_once(
    life: Adder,
    doc: Document,
    requested: Mapping[str, Any],
    data: Any,
    key: str,
    ignore_data: bool,
    reservation: _Reservation,
) -> Document:
    new = JobView(doc)
    pending_since: float | None = None
    for attempt in range(ONCE_ATTEMPTS):
        holder = once_holder(life.store, key)
        held_by = holder.job if holder else None
        since = holder.since if holder else None
        current = life.store.find_job(held_by) if held_by is not None else None
        settling = current is None or not JobView(current).unfinished  # being inserted, requeued (or malformed)
        if held_by is not None and settling and holder and not holder.inserted:
            # Its caller is inserting (or requeuing) it, or died doing so: wait to compare, then take over.
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since < ONCE_PENDING_SECONDS and fresh_holder(holder, life.store):
                time.sleep(min(0.2, 0.01 * (attempt + 1)))
                continue
        candidates = [current] if current is not None else []
        if holder is None:  # jobs of an older version hold no key: look for them by class and data
            candidates = life.store.find_active(new.class_value, None if ignore_data else new.key_value)
        # A malformed document (SPEC 2) is no job to compare with: a node ends it.
        active = [c for c in candidates if JobView(c).unfinished]
        active = [c for c in active if problem(c, capped=life.store.capped) is None]
        same = next((c for c in active if not _changed(c, requested, data, ignore_data)), None)
        if same is not None:
            if holder is None and not life.store.take_once(key, JobView(same).id, None):
                continue
            return dict(same)
        for found in active:
            with contextlib.suppress(InvalidArgumentError):  # it ended meanwhile: fine
                life.cancel(found)
        if not life.store.take_once(key, new.id, held_by, since):
            continue  # someone else took it first (or requeued its job): compare with theirs
        try:
            added = life.add(dict(doc, **JobFields(created=life.store.clock.now())), reservation.spend())
        except BaseException:
            life.store.release_once(key, new.id)
            raise
        if life.store.confirm_once(key, new.id):
            return added
        # We were too slow (paused past ONCE_PENDING_SECONDS): the key is someone else's now; ours goes.
        with contextlib.suppress(InvalidArgumentError):
            life.cancel(life.load(new.id))
    raise TaskSchedulerError(f"add_job_once gave up after {ONCE_ATTEMPTS} attempts: concurrent callers disagree")


class _Reservation:
    """Room reserved for a job add_job_once may insert: given back unless an insert took it over."""

    def __init__(self, store: JobStore, size: int) -> None:
        self.store = store
        self.size = size
        self.spent = False

    def spend(self) -> int:
        self.spent = True  # from here the store owns the bytes (it keeps them when an insert's outcome is unknown)
        return self.size

    def __enter__(self) -> _Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.spent:
            self.store.unreserve_job(self.size)


def once_holder(store: JobStore, key: str) -> OnceHolder | None:
    """Who holds an add_job_once key, if anyone."""
    found = store.once_holder(key)
    return OnceHolder.from_doc(found) if found is not None else None


def fresh_holder(holder: OnceHolder, store: JobStore) -> bool:
    """Whether a key was taken less than ONCE_PENDING_SECONDS ago, on the server's clock."""
    since = holder.since
    return isinstance(since, datetime) and (store.server_time() - since).total_seconds() < ONCE_PENDING_SECONDS


def _changed(existing: Mapping[str, Any], requested: Mapping[str, Any], data: Any, ignore_data: bool) -> bool:
    job = JobView(existing)
    stored = job.options  # it fits: its options are a document, or missing (none)
    for name, value in requested.items():
        if name == o.ID:
            if job.id != value:
                return True
        elif name == o.AT and stored.get(o.CRON):
            continue  # a cron job keeps its next match in "at", never the time it was asked to start from
        elif name not in stored or not same_value(stored[name], value):
            return True
    return ignore_data and not same_value(job.data, data)
