"""Event documents: one per status change of a job, with its error or result; sweeps and their vouching."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING
from pymongo.errors import BulkWriteError

from ...constants import JobStatus
from ..history import in_order
from ..records import EventRecord
from .connection import server_errors
from .deployment import Deployment
from .documents import Document


class EventLog(Deployment):
    """Writing and reading the events of jobs."""

    def insert_events(self, events: list[EventRecord]) -> list[ObjectId]:
        """Insert events in one round trip; events whose ``_id`` is stored already (a retry, or another node's
        write of an event with the same derived id) are skipped. Returns the ids this call wrote."""
        self.ensure()
        stored: set[int] = set()
        try:
            with server_errors():
                self.events.insert_many([event.to_doc() for event in events], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors):
                raise
            stored = {int(e.get("index", -1)) for e in errors}
        return [event.id for index, event in enumerate(events) if index not in stored]

    def delete_events(self, ids: Iterable[ObjectId]) -> None:
        with server_errors():
            self.events.delete_many({"_id": {"$in": list(ids)}})

    def delete_unrecorded_events(self, job_id: ObjectId, run: int, worker: ObjectId, keep: Any) -> int:
        """Withdraw what a worker wrote about ending ``run`` that was never recorded: its end events of that run
        (other than ``keep``, the job's recorded outcome) and the next-run events written with them. Looked up
        by the job's index, then deleted by id. Returns how many were withdrawn."""
        ends = (JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED)
        with server_errors():
            found = list(
                self.events.find(
                    {"job": job_id, "run": {"$in": [run, run + 1]}}, {"worker": 1, "end": 1, "status": 1, "run": 1}
                )
            )
            unrecorded = {
                e["_id"]
                for e in found
                if e.get("run") == run and e.get("worker") == worker and e.get("status") in ends and e["_id"] != keep
            }
            stale = [e["_id"] for e in found if e["_id"] in unrecorded or e.get("end") in unrecorded]
            if stale:
                self.events.delete_many({"_id": {"$in": stale}})
        return len(stale)

    def find_event(self, event_id: ObjectId) -> Document | None:
        with server_errors():
            return self.events.find_one({"_id": event_id})

    def job_events(self, job_id: ObjectId) -> list[Document]:
        """Every event of a job, oldest first (see :mod:`taskscheduler.store.history` for what "first" means when
        two processes' stamps disagree)."""
        with server_errors():
            return in_order(list(self.events.find({"job": job_id}).sort([("run", ASCENDING), ("time", ASCENDING)])))

    def claims_of_run(self, job_id: ObjectId, run: int) -> list[tuple[Any, Any]]:
        """(worker, time) of every recorded claim (PROCESSING event) of a run (by the job's index)."""
        with server_errors():
            found = self.events.find({"job": job_id, "run": run}, {"worker": 1, "status": 1, "time": 1})
            return [(e.get("worker"), e.get("time")) for e in found if e.get("status") == JobStatus.PROCESSING]

    # -- sweeps: runs another node put back when their lease ran out (issue 16) -------------------------------------

    def unvouched_sweeps(self, job_id: ObjectId, run: int, before: datetime | None = None) -> set[ObjectId]:
        """The workers whose claims of a run were swept (``before`` a time, when given) and whose owner has not
        shown that it outlived the sweep. A worker counts once, however many events name it (attempts of a sweep
        whose outcome was unknown)."""
        return {
            e["worker"]
            for e in self._sweeps(job_id, run)
            if not e["sweep"].get("back")
            and (before is None or not isinstance(e.get("time"), datetime) or e["time"] <= before)
        }

    def vouch(self, job_id: ObjectId, run: int, worker: ObjectId) -> int:
        """The owner of a run (``worker``, or its node for it) lives on after losing it: mark the sweeps of its
        claims of that run as no death. A bool set in place: the event keeps its size (capped collection)."""
        ids = [e["_id"] for e in self._sweeps(job_id, run) if e["worker"] == worker and not e["sweep"].get("back")]
        if not ids:
            return 0
        with server_errors():
            return self.events.update_many({"_id": {"$in": ids}}, {"$set": {"sweep.back": True}}).modified_count

    def _sweeps(self, job_id: ObjectId, run: int) -> list[Document]:
        # The few events of one run, by the job's index alone, filtered here: some planners (the test server's)
        # scan the collection for a filter with a field the index lacks.
        with server_errors():
            found = self.events.find({"job": job_id, "run": run}, {"worker": 1, "sweep": 1, "time": 1})
            return [e for e in found if isinstance(e.get("sweep"), dict)]

