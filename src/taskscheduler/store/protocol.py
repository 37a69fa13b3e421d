"""The storage seam: the verbs the lifecycle (which decides every state change) asks of a store.

:class:`~taskscheduler.store.mongo.Store` implements it on MongoDB. Another store (a test double that records,
a different database) implements these and nothing else of the library changes: the lifecycle builds no query
or update itself, it says which fields it expects and which it sets (:meth:`JobStore.change`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from bson import ObjectId

from ..clock import ServerClock
from .records import EventRecord, JobFields

Document = dict[str, Any]


class JobStore(Protocol):
    """What the lifecycle needs of a store. Every write of a job is conditional; every read returns plain
    documents (the fields SPEC 2 names); a store that cannot reach its server raises ServerUnavailableError."""

    #: The server's clock: every time the library decides or stores is read from it.
    clock: ServerClock

    @property
    def capped(self) -> bool:
        """Whether no update may change a stored job's size (a capped collection)."""

    def server_time(self, timeout: float | None = None) -> datetime: ...

    def bounded(self, seconds: float) -> AbstractContextManager[None]:
        """Every command inside takes at most ``seconds`` in all; past it, ServerUnavailableError."""

    # -- jobs ------------------------------------------------------------------------------------------------------

    def reserve_job(self, doc: Document) -> int:
        """Room for a job (QueueFullError when there is none); its size, for insert_job or unreserve_job."""

    def unreserve_job(self, size: int) -> None: ...

    def insert_job(self, doc: Document, reserved: int | None = None) -> None: ...

    def find_job(self, job_id: Any) -> Document | None: ...

    def find_active(self, job_class: str, key: str | None) -> list[Document]: ...

    def children(self, parent_id: ObjectId, active_only: bool = False) -> list[Document]: ...

    def mark_parent(self, parent_id: ObjectId) -> None:
        """Note on a job that a child of it is about to be stored."""

    def has_children(self, parent_id: Any) -> bool:
        """Whether any job names ``parent_id`` as its parent."""

    def change(self, job_id: ObjectId, expect: JobFields, sets: JobFields) -> bool:
        """Set ``sets`` if every field of ``expect`` has its value, in one atomic write; True when it did."""

    def claim(self, job: Mapping[str, Any] | ObjectId, worker: ObjectId, lease: float) -> Document | None:
        """WAITING -> PROCESSING for ``worker`` with a lease on the server's clock; None when it lost."""

    def heartbeat(self, owners: Mapping[ObjectId, ObjectId]) -> dict[ObjectId, Document | None]:
        """Renew leases (job -> worker); the jobs no longer owned so, as they are now (None: gone)."""

    def orphans(self, now: datetime) -> list[Document]:
        """Running jobs whose lease ended before ``now`` on the server's clock."""

    def job_states(self, job_ids: Iterable[ObjectId]) -> dict[Any, Document]:
        """Status and schedule of these jobs, by id (a missing one left out)."""

    def dependents(self, job_id: ObjectId) -> list[Document]:
        """Unfinished jobs that depend on this one."""

    # -- flow control (SPEC 8) ------------------------------------------------------------------------------------

    def flow_controls(self) -> list[Document]: ...

    def set_pause(self, key: str) -> None: ...

    def remove_pause(self, key: str) -> bool: ...

    def set_limit(self, key: str, concurrency: int | None, rate: Mapping[str, Any] | None) -> None: ...

    def remove_limit(self, key: str) -> bool: ...

    def count_running_runs(self, key: str) -> int: ...

    def take_slot(self, key: str, job_id: ObjectId, worker: ObjectId) -> bool:
        """A slot of the limit on ``key`` for this run if the limit allows a start now; True when it holds one."""

    def free_slots(self, keys: Iterable[str], job_id: ObjectId, worker: ObjectId | None = None) -> None: ...

    def limit_holders(self, key: str) -> list[Document]: ...

    def drop_holders(self, key: str, holders: Iterable[Mapping[str, Any]]) -> None: ...

    def claims_of_run(self, job_id: ObjectId, run: int) -> list[tuple[Any, Any]]:
        """(worker, time) of every recorded claim of a run."""

    def waiting_under(self, key: str | None) -> int:
        """WAITING jobs whose class or limit_key is ``key`` (None: all)."""

    def due_jobs(self, now: float) -> Iterator[tuple[Any, str]]:
        """(id, class) of the due jobs (WAITING, or POSTPONED with ``at`` <= ``now``), lazily."""

    def unsettled_cancels(self, now: datetime) -> list[Document]:
        """Jobs canceled while running, their worker's lease ended before ``now``, that nobody settled yet."""

    def set_progress(self, job_id: ObjectId, progress: float, owner: ObjectId | None, wait: float | None) -> bool: ...

    # -- add_job_once keys -------------------------------------------------------------------------------------------

    def once_holder(self, key: str) -> Document | None: ...

    def take_once(self, key: str, job_id: ObjectId, holder: ObjectId | None, since: datetime | None = None) -> bool: ...

    def confirm_once(self, key: str, job_id: ObjectId) -> bool: ...

    def release_once(self, key: str, job_id: ObjectId) -> None: ...

    # -- events ------------------------------------------------------------------------------------------------------

    def insert_events(self, events: list[EventRecord]) -> list[ObjectId]:
        """Write events; one whose id is stored already (a retry) is skipped. The ids this call wrote."""

    def delete_events(self, ids: Iterable[ObjectId]) -> None: ...

    def delete_unrecorded_events(self, job_id: ObjectId, run: int, worker: ObjectId, keep: Any) -> int: ...

    def find_event(self, event_id: ObjectId) -> Document | None: ...

    def job_events(self, job_id: ObjectId) -> list[Document]: ...

    def unvouched_sweeps(self, job_id: ObjectId, run: int, before: datetime | None = None) -> set[ObjectId]: ...

    def vouch(self, job_id: ObjectId, run: int, worker: ObjectId) -> int: ...
