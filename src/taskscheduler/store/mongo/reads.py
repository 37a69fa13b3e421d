"""What operators, metrics and the dashboard ask: reads only, each served by an index."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING

from ...constants import ACTIVE_STATUSES, JobStatus
from ..history import in_order
from ..views import run_number
from .connection import server_errors
from .deployment import Deployment
from .documents import Document


class OperatorReads(Deployment):
    """Counts and listings for operators (CLI, metrics, dashboard)."""

    def job_counts(self) -> list[Document]:
        """How many jobs there are per class and status: ``{"class", "status", "count"}`` each."""
        pipeline: list[Document] = [
            {"$group": {"_id": {"class": "$class", "status": "$status"}, "count": {"$sum": 1}}},
        ]
        with server_errors():
            return [
                # A group key leaves out a field the documents lack (a malformed job): None, never a KeyError.
                {"class": d["_id"].get("class"), "status": d["_id"].get("status"), "count": d["count"]}
                for d in self.jobs.aggregate(pipeline)
            ]

    def oldest_waiting(self) -> Document | None:
        with server_errors():
            return self.jobs.find_one({"status": int(JobStatus.WAITING)}, sort=[("_id", ASCENDING)])

    def waiting_classes(self) -> list[str]:
        with server_errors():
            return sorted(str(c) for c in self.jobs.distinct("class", {"status": int(JobStatus.WAITING)}))

    def run_end_counts(self, since: datetime, recent: datetime) -> list[Document]:
        """How many runs ended since ``since``, and since ``recent`` (later), per status: ``{"status", "count",
        "recent"}`` each. Found by the events' ``time`` (the ``time`` index of a capped event collection,
        ``time_ttl`` of an expiring one), never by their ids: the ids of shared run ends and cancels are derived
        from what they record (``core.changes.derived_id``), so their first bytes are no time. Grouped on the
        server: an hour of a busy cluster's events never comes to the client."""
        ends = [int(s) for s in JobStatus if s.is_terminal]
        pipeline: list[Document] = [
            # The window alone first: what the index serves; the statuses are filtered on what it found.
            {"$match": {"time": {"$gte": since}}},
            {"$match": {"status": {"$in": ends}}},
            {
                "$group": {
                    "_id": "$status",
                    "count": {"$sum": 1},
                    "recent": {"$sum": {"$cond": [{"$gte": ["$time", recent]}, 1, 0]}},
                }
            },
        ]
        with server_errors():
            return [
                {"status": d["_id"], "count": int(d["count"]), "recent": int(d["recent"])}
                for d in self.events.aggregate(pipeline)
            ]

    def waiting_under(self, key: str | None) -> int:
        """WAITING jobs whose class or ``limit_key`` is ``key`` (None: every WAITING job); served by the
        ``status_expires`` index, filtered there."""
        query: Document = {"status": int(JobStatus.WAITING)}
        if key is not None:
            query["$or"] = [{"class": key}, {"options.limit_key": key}]
        with server_errors():
            return self.jobs.count_documents(query)

    def waiting_counts(self) -> list[Document]:
        """Waiting and postponed jobs per class: ``{"class", "status", "count"}`` each (a node's metrics).
        The match is served by the ``status_expires`` index; only jobs not yet run are grouped. A status stored
        as another number type (0.0, a long, a decimal) is no status (a malformed job, SPEC 2): not counted (left
        out here: a ``$type`` in the match would cost some planners the index)."""
        pipeline: list[Document] = [
            {"$match": {"status": {"$in": [int(JobStatus.WAITING), int(JobStatus.POSTPONED)]}}},
            {"$group": {"_id": {"class": "$class", "status": "$status"}, "count": {"$sum": 1}}},
        ]
        with server_errors():
            return [
                # A group key leaves out a field the documents lack (a malformed job): None, never a KeyError.
                {"class": d["_id"].get("class"), "status": d["_id"].get("status"), "count": d["count"]}
                for d in self.jobs.aggregate(pipeline)
                if type(d["_id"].get("status")) is int
            ]

    def status_counts(self) -> dict[int, int]:
        """Jobs per status, every status present (the dashboard). One count per status, each answered from the
        ``status_expires`` index alone, where one grouping would read every document."""
        with server_errors():
            return {int(s): int(self.jobs.count_documents({"status": int(s)})) for s in JobStatus}

    def recent_run_events(self, job_id: ObjectId, limit: int) -> tuple[list[Document], int]:
        """The events of a job's newest ``limit`` ended runs, oldest first (with the next-run announcements that
        tell which end of a run counted), and how many runs of the job ended (a job page). Both are served by the
        ``job_run`` index: the run numbers are read newest first and only until ``limit`` of them are found."""
        ends = [int(s) for s in JobStatus if s.is_terminal]
        ended = {"job": job_id, "status": {"$in": ends}}
        runs: list[int] = []
        with server_errors():
            cursor = self.events.find(ended, {"run": 1}).sort("run", DESCENDING).batch_size(max(limit, 1) + 1)
            try:
                for event in cursor:
                    run = run_number(event.get("run", 0))
                    if run is None:  # SPEC 2: a run end with no run number is listed under none, never fatal
                        continue
                    if not runs or run != runs[-1]:
                        if len(runs) == limit:
                            break
                        runs.append(run)
            finally:
                cursor.close()
            if not runs:
                return [], 0
            events = in_order(
                list(
                    self.events.find({"job": job_id, "run": {"$gte": runs[-1]}}).sort(
                        [("run", ASCENDING), ("time", ASCENDING)]
                    )
                )
            )
            total = len(runs)
            if len(runs) == limit:  # maybe more: count the distinct run numbers on the server
                counted = list(
                    self.events.aggregate([{"$match": ended}, {"$group": {"_id": "$run"}}, {"$count": "runs"}])
                )
                total = int(counted[0]["runs"]) if counted else total
        return events, total

    def recurring_jobs(self) -> list[Document]:
        """Unfinished jobs that repeat (``options.interval`` not 0, or a ``options.cron`` expression): the
        schedules (SPEC 7), in no particular order, with only the fields a schedule shows. Served by the
        ``status_expires`` index (unfinished statuses); the repeat test is made here, as :meth:`due_jobs` makes
        its own, so the query stays one every planner serves from the index and no stored value (an
        ``interval`` of ``"10"``) can hide a job from it or break it: the caller decides on each document. It
        reads the unfinished jobs' few projected fields, never a finished job's: for an operator's look, not for
        a loop."""
        query: Document = {"status": {"$in": [int(s) for s in ACTIVE_STATUSES]}}
        fields = {
            "class": 1,
            "status": 1,
            "run": 1,
            "created": 1,
            "started": 1,
            "ended": 1,
            "outcome": 1,
            "options.at": 1,
            "options.interval": 1,
            "options.interval_reference": 1,
            "options.cron": 1,
            "options.timezone": 1,
            "options.limit_key": 1,
        }
        with server_errors():
            return [doc for doc in self.jobs.find(query, fields) if _repeats(doc.get("options"))]

    def events_by_ids(self, ids: list[ObjectId], fields: list[str]) -> list[Document]:
        """The events with these ids (unknown ones left out), only ``fields`` of each, read 100 ids per query
        through the ``_id`` index (a schedule's last run end, named by its job's ``outcome``)."""
        found: list[Document] = []
        projection = {name: 1 for name in fields}
        for start in range(0, len(ids), 100):
            with server_errors():
                found += self.events.find({"_id": {"$in": ids[start : start + 100]}}, projection)
        return found


def _repeats(options: Any) -> bool:
    """Whether stored options name a repeat: an ``interval`` other than 0, or a ``cron`` other than ``""``,
    whatever their types (a malformed one is the caller's to judge)."""
    if not isinstance(options, Mapping):
        return False
    interval, cron = options.get("interval", 0), options.get("cron", "")
    return bool(interval != 0 or cron not in ("", None))
