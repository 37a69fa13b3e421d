"""Reads and conditional writes of job documents: insert, claim, transitions, heartbeats, progress."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from ...constants import UNSET_TIME, JobStatus
from ...errors import DuplicateJobError, InvalidArgumentError, ServerUnavailableError
from ..records import JobFields
from ..schema import due
from .connection import first_line, server_errors
from .documents import SERVER_NOW, Document, fields_equal, lease_end, literal
from .ledger import RoomLedger

#: Up to this many job ids, a change stream filters them on the server; above, the client filters.
MAX_SERVER_ID_FILTER = 50
#: Ids per ``$in`` when reading many jobs by id: some servers match a long ``$in`` against every candidate.
ID_BATCH = 100
#: Longest a claim may take (a quarter of the lease when that is less): a claim's ``started`` is stamped before it
#: is sent, so a claim that waited out an outage must fail rather than record a start from before the outage.
CLAIM_SECONDS = 1.0


class JobWrites(RoomLedger):
    """Every read and write of job documents."""

    def insert_job(self, doc: Document, reserved: int | None = None) -> None:
        """Insert a new job. QueueFullError rather than evicting an unfinished job; nothing written on error.
        ``reserved``: the bytes ``reserve_job`` reserved for it already."""
        size = self.reserve_job(doc) if reserved is None else reserved
        try:
            with server_errors():
                self.jobs.insert_one(doc)
        except DuplicateKeyError as exc:
            self._unreserve(size)
            raise DuplicateJobError(f"a job with id {doc['_id']} already exists") from exc
        except BaseException:
            # Unknown whether the job was written: keeping the reservation errs on the safe side (a few bytes too
            # many, never an eviction); see _reconcile.
            self._landed(size)
            raise
        self._landed(size)

    def find_job(self, job_id: Any) -> Document | None:
        with server_errors():
            return self.jobs.find_one({"_id": job_id})

    def find_by_ids(self, ids: Iterable[ObjectId]) -> Iterator[Document]:
        """The jobs with these ids (unknown ids are left out), read ``ID_BATCH`` ids per query."""
        wanted = list(ids)
        for start in range(0, len(wanted), ID_BATCH):
            with server_errors():
                yield from self.jobs.find({"_id": {"$in": wanted[start : start + ID_BATCH]}})

    def find_jobs(self, query: Mapping[str, Any]) -> Iterator[Document]:
        try:
            with server_errors():
                cursor = self.jobs.find(dict(query))
                yield from cursor
        except OperationFailure as exc:
            raise InvalidArgumentError(f"invalid job query {dict(query)!r}: {exc}") from exc

    def newest_jobs(self, query: Mapping[str, Any], limit: int) -> list[Document]:
        """The newest ``limit`` jobs matching ``query`` (newest first: ids grow with time)."""
        with server_errors():
            return list(self.jobs.find(dict(query)).sort("_id", DESCENDING).limit(limit))

    def count_jobs(self, query: Mapping[str, Any]) -> int:
        with server_errors():
            return int(self.jobs.count_documents(dict(query)))

    def find_active(self, job_class: str, key: str | None) -> list[Document]:
        """Active jobs of a class (and a data fingerprint), for add_job_once."""
        query: Document = {"class": job_class, "status": {"$lt": int(JobStatus.DONE)}}
        if key is not None:
            query["key"] = key
        with server_errors():
            return list(self.jobs.find(query))

    def children(self, parent_id: ObjectId, active_only: bool = False) -> list[Document]:
        query: Document = {"data.parent": parent_id}
        if active_only:
            query["status"] = {"$lt": int(JobStatus.DONE)}
        with server_errors():
            return list(self.jobs.find(query))

    def job_states(self, job_ids: Iterable[ObjectId]) -> dict[Any, Document]:
        """What the dependencies and limits rules read of these jobs (status, worker and schedule), by id; a missing
        one is left out."""
        fields = {"status": 1, "run": 1, "worker": 1, "options.interval": 1, "options.cron": 1, "options.at": 1}
        with server_errors():
            return {doc["_id"]: doc for doc in self.jobs.find({"_id": {"$in": list(job_ids)}}, fields)}

    def dependents(self, job_id: ObjectId) -> list[Document]:
        """Unfinished jobs that depend on this one (served by the ``depends_on_status`` index)."""
        query = {"options.depends_on": job_id, "status": {"$lt": int(JobStatus.DONE)}}
        with server_errors():
            return list(self.jobs.find(query))

    def transition(self, job_id: ObjectId, when: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
        """Set ``fields`` (aggregation expressions: wrap plain values in :func:`literal`) if the job matches the
        expression ``when``; True when it did. ``fields`` must change something: "changed nothing" is how a lost
        race shows.

        The update is addressed by ``_id`` alone and checks ``when`` inside an update pipeline. A filter of
        ``_id`` plus ``status`` lets a planner take its candidates from the status index (every job in that
        status) instead of the primary key; some servers do, and then each claim costs O(waiting jobs). A job
        that no longer matches is left untouched: nothing modified, nothing written to the oplog.
        """
        stage = {name: {"$cond": [when, value, f"${name}"]} for name, value in fields.items()}
        with server_errors():
            result = self.jobs.update_one({"_id": job_id}, [{"$set": stage}])
        return result.modified_count == 1

    def mark_parent(self, parent_id: ObjectId) -> None:
        """Note on a job that a child of it is about to be stored (``children``: false -> true, the same size):
        the end of its run then looks at its children. A job stored without the flag, or with anything but false
        (an array holding false too: ``$expr``, not the array rule of a plain match), is left as it is."""
        with server_errors():
            self.jobs.update_one(
                {"_id": parent_id, "$expr": {"$eq": ["$children", False]}}, {"$set": {"children": True}}
            )

    def has_children(self, parent_id: Any) -> bool:
        """Whether any job names ``parent_id`` as its parent (``data.parent``; served by an index)."""
        with server_errors():
            return self.jobs.find_one({"data.parent": parent_id}, {"_id": 1}) is not None

    def change(self, job_id: ObjectId, expect: JobFields, sets: JobFields) -> bool:
        """Set the fields ``sets`` to their values if every field of ``expect`` has its value; True when it did.
        The domain's one conditional write of a job: a claim, a run's end (and the next run), a release, a cancel,
        a requeue. ``sets`` must change something: "changed nothing" is how a lost race shows."""
        return self.transition(job_id, fields_equal(expect), {name: literal(value) for name, value in sets.items()})

    def claim(self, job: Mapping[str, Any] | ObjectId, worker: ObjectId, lease: float) -> Document | None:
        """The atomic claim, in one round trip: this run of the job, WAITING -> PROCESSING owned by ``worker``,
        with a lease on the server's clock (``alive``, ``expires``). Returns the claimed document (the given one
        with what the claim wrote; ``alive``/``expires`` stay the server's), or None when another worker had it
        first or the run has moved on. (An update, not findAndModify: some servers run the latter far slower.)"""
        doc = job if isinstance(job, Mapping) else self.find_job(job)  # by id: its current run
        if doc is None:
            return None
        # An interval measured from the start counts from it. The claim is bounded in time, so that the stamp is
        # never much older than the write (a claim that waits out an outage fails, and is handed over again).
        started = self.clock.now()
        when = fields_equal({"status": int(JobStatus.WAITING), "run": doc.get("run", 1)})
        fields = {
            "status": literal(int(JobStatus.PROCESSING)),
            "worker": literal(worker),
            "started": literal(started),
            "alive": SERVER_NOW,
            "expires": lease_end(lease),
            "lease": literal(float(lease)),
            "progress": literal(0.0),
        }
        with self.bounded(min(CLAIM_SECONDS, max(0.25, lease / 4))):
            applied = self.transition(doc["_id"], when, fields)
        if not applied:
            return None
        claimed = dict(doc, status=int(JobStatus.PROCESSING), worker=worker, started=started)
        claimed.update(lease=float(lease), progress=0.0)
        return claimed

    def heartbeat(self, owners: Mapping[ObjectId, ObjectId]) -> dict[ObjectId, Document | None]:
        """Renew the leases of running jobs (job id -> owning worker) on the server's clock, each for its own
        recorded lease. Returns the jobs no longer PROCESSING under that worker, with their status, worker and
        run (None when the job is gone)."""
        if not owners:
            return {}
        query = {"_id": {"$in": list(owners)}, "status": int(JobStatus.PROCESSING)}
        with server_errors():
            result = self.jobs.update_many(
                dict(query, worker={"$in": list(set(owners.values()))}),
                [{"$set": {"alive": SERVER_NOW, "expires": lease_end()}}],
            )
            if result.matched_count == len(owners):
                return {}
            found = {
                d["_id"]: d
                for d in self.jobs.find({"_id": {"$in": list(owners)}}, {"status": 1, "worker": 1, "run": 1})
            }
        return {
            job: found.get(job)
            for job, worker in owners.items()
            if (found.get(job) or {}).get("status") != JobStatus.PROCESSING or found[job].get("worker") != worker
        }

    def set_progress(self, job_id: ObjectId, progress: float, owner: ObjectId | None, wait: float | None) -> bool:
        """Store progress; with ``owner`` only while that worker owns the job. ``wait`` bounds the call (seconds).
        ServerUnavailableError for any failure: progress that was not stored is only late, never an error."""
        expect: Document
        if owner is not None:
            expect = {"status": int(JobStatus.PROCESSING), "worker": owner}
        else:
            expect = {"status": {"$lt": int(JobStatus.DONE)}}
        try:
            with server_errors(), pymongo.timeout(wait):
                result = self.jobs.update_one({"_id": job_id, **expect}, {"$set": {"progress": float(progress)}})
        except PyMongoError as exc:
            raise ServerUnavailableError(f"progress not stored: {first_line(exc)}") from exc
        return result.matched_count == 1

    def orphans(self, now: datetime) -> list[Document]:
        """PROCESSING jobs whose lease ended before ``now`` (the server's time)."""
        with server_errors():
            return list(self.jobs.find({"status": int(JobStatus.PROCESSING), "expires": {"$lt": now}}))

    def due_jobs(self, now: float) -> Iterator[tuple[Any, str]]:
        """(id, class) of every due job: WAITING, or POSTPONED with its ``at`` (seconds since the epoch, on the
        server's clock) not after ``now``; lazily, so that a caller looking for one stops at the first. A job
        without a class name, or postponed without a number in ``at``, is no job a node could start."""
        query = {"status": {"$in": [int(JobStatus.WAITING), int(JobStatus.POSTPONED)]}}
        with server_errors():
            for doc in self.jobs.find(query, {"class": 1, "status": 1, "options.at": 1}):
                if due(doc, now) and isinstance(doc.get("class"), str):
                    yield doc["_id"], doc["class"]

    def unsettled_cancels(self, now: datetime) -> list[Document]:
        """Jobs canceled while running whose worker's lease ended before ``now`` (the server's time) and which
        nobody settled: a cancel of a running job keeps its lease end, and settling it stores UNSET_TIME."""
        with server_errors():
            return list(
                self.jobs.find({"status": int(JobStatus.CANCELED), "expires": {"$gt": UNSET_TIME, "$lt": now}})
            )

    def scan(self, statuses: tuple[int, ...]) -> Iterator[Document]:
        """Jobs in the given statuses (queue start-up and resync). Unsorted: the worker manager orders them by
        priority in memory, so no index has to follow every status write for their order."""
        with server_errors():
            yield from self.jobs.find({"status": {"$in": [int(s) for s in statuses]}})

    def jobs_of_workers(self, workers: Iterable[ObjectId]) -> list[Document]:
        """PROCESSING jobs owned by any of these workers."""
        with server_errors():
            return list(self.jobs.find({"status": int(JobStatus.PROCESSING), "worker": {"$in": list(workers)}}))

