"""Change streams of the job collection: status changes (nodes, watchers) and activity (dashboards)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bson import ObjectId
from pymongo.change_stream import ChangeStream
from pymongo.errors import OperationFailure, PyMongoError

from ...constants import NODE_REGISTRY, JobStatus
from ...errors import InvalidArgumentError, ServerUnavailableError
from .connection import first_line, server_errors
from .deployment import Deployment
from .documents import Document, with_prefix

logger = logging.getLogger("taskscheduler.store")

#: Up to this many job ids, a change stream filters them on the server; above, the client filters.
MAX_SERVER_ID_FILTER = 50
#: The status of a change that moved a job to its next run but kept its status (see Feeds.status_feed).
STATUS_UNKNOWN = -1
#: Server-side wait of one change-stream getMore; bounds how late a poll notices its own deadline.
STREAM_AWAIT_MS = 200


@dataclass(frozen=True)
class StatusChange:
    """One status change seen on the job collection: the status it was set to, the run number when the change
    carried it, and the document (as looked up, when looked up)."""

    job_id: ObjectId
    status: int
    document: Document | None
    run: int | None = None
    #: Set when the change ended a run and scheduled the next: the id of the event that recorded the ended run.
    ended_run: ObjectId | None = None
    #: What the change itself says of the fields that tell changes apart (``run``, ``started``, ``change``).
    fields: Document = field(default_factory=dict)


class Feeds(Deployment):
    """Opening change streams."""

    def status_feed(
        self,
        ids: list[ObjectId] | None = None,
        query: Mapping[str, Any] | None = None,
        lookup: bool = True,
        statuses: tuple[int, ...] | None = None,
        flow: bool = False,
        await_ms: int = STREAM_AWAIT_MS,
        peers: bool = False,
    ) -> StatusFeed:
        """Status changes of jobs (every insert; updates only to ``statuses`` when given). ``lookup=False``
        skips fetching the document of each update (cheaper: then only inserts carry a document). ``flow``: also
        count changes of the flow controls (pauses, limits) in ``flow_changes``, in order with the jobs', and pass on
        a move to the next run that kept the status (a run held for its orphaning verdict, POSTPONED, whose retry
        is POSTPONED too) as a change of status :data:`STATUS_UNKNOWN`: read the job to know it. ``await_ms``:
        longest the server holds a read of the stream open while nothing changes (it answers at once when
        something does): a reader on a thread of its own can wait long and cost an idle process next to nothing.
        ``peers``: also count nodes joining or leaving the registry in ``peer_changes`` (a node reads it again)."""
        self.check_deployment()
        return StatusFeed(self, ids, query, lookup or bool(query), statuses, flow, await_ms, peers)

    def activity_feed(self) -> ActivityFeed:
        """Inserts, status changes and progress moves of every job, each with its document (the dashboard)."""
        self.check_deployment()
        return ActivityFeed(self, None, None, True)


class StatusFeed:
    """Status changes of jobs, from a change stream that survives dropped connections and ``flush()``.

    It watches the database (filtered to the job collection), so dropping the collection does not invalidate it.
    ``status`` is taken from the update itself, so it is the status at the time of the change even though the
    rest of the document comes from ``updateLookup`` (as it is when the server looks it up).
    """

    def __init__(
        self,
        store: Deployment,
        ids: list[ObjectId] | None,
        query: Mapping[str, Any] | None,
        lookup: bool,
        statuses: tuple[int, ...] | None = None,
        flow: bool = False,
        await_ms: int = STREAM_AWAIT_MS,
        peers: bool = False,
    ) -> None:
        self.store = store
        self.lookup = lookup
        self.await_ms = await_ms
        changed: Any = {"$exists": True} if statuses is None else {"$in": [int(x) for x in statuses]}
        match: Document = {
            "ns.coll": store.job_queue,
            "$or": [
                {"operationType": {"$in": ["insert", "replace"]}},
                {"operationType": "update", "updateDescription.updatedFields.status": changed},
            ],
        }
        #: Changes of the flow controls seen so far (with ``flow``): a poll returns at each one, before any job
        #: change that came after it, so the caller can read the controls again in order.
        self.flow_changes = 0
        self.flow_collection = f"{store.job_queue}.flow" if flow else None
        if flow:
            kept_status: Document = {
                "ns.coll": store.job_queue,
                "operationType": "update",
                "updateDescription.updatedFields.run": {"$exists": True},
            }
            match = {"$or": [match, kept_status, {"ns.coll": self.flow_collection}]}
        #: Nodes that joined or left the registry so far (with ``peers``; its refreshes are not changes).
        self.peer_changes = 0
        self.peers_collection = NODE_REGISTRY if peers else None
        if peers:
            joined_or_left = {"ns.coll": NODE_REGISTRY, "operationType": {"$in": ["insert", "delete"]}}
            match = {"$or": [match, joined_or_left]}
        if ids is not None and len(ids) <= MAX_SERVER_ID_FILTER:
            match["documentKey._id"] = {"$in": list(ids)}  # a long $in costs the server on every change: filter here
        self.ids = frozenset(ids) if ids is not None else None
        self.pipeline: list[Document] = [
            {"$match": match},
            {
                "$set": {
                    "fullDocument.status": {
                        "$ifNull": ["$updateDescription.updatedFields.status", "$fullDocument.status"]
                    },
                    # What tells this change from others of the job, from the change itself where it carries
                    # it (a late lookup shows a later state): see events.change_key.
                    **{
                        f"fullDocument.{name}": {
                            "$ifNull": [f"$updateDescription.updatedFields.{name}", f"$fullDocument.{name}"]
                        }
                        for name in ("run", "started", "change")
                    },
                }
            },
        ]
        if query:
            self.pipeline.append({"$match": with_prefix(query, "fullDocument.")})
        self.token: Mapping[str, Any] | None = None
        #: Incremented when the stream had to restart without its resume token (changes may have been missed).
        self.gaps = 0
        self._stream: ChangeStream[Document] | None = None
        self._lost = False  # broken without a token to resume from: the next open counts a gap
        try:
            self._open()
        except ServerUnavailableError as exc:  # the first poll opens it again
            self._recover(exc)
        except OperationFailure as exc:
            if query:
                raise InvalidArgumentError(f"invalid job query {dict(query)!r}: {first_line(exc)}") from exc
            raise

    def _open(self) -> None:
        with server_errors():
            self._stream = self.store.db.watch(
                self.pipeline,
                full_document="updateLookup" if self.lookup else None,
                resume_after=self.token,
                max_await_time_ms=self.await_ms,
            )
        # A token from the start, so that even a stream that breaks before its first change resumes where it was.
        self.token = self._stream.resume_token or self.token
        if self._lost:  # it broke with no token to resume from: what happened meanwhile is unknown
            self._lost = False
            self.gaps += 1

    def poll(self, timeout: float) -> StatusChange | None:
        """The next status change, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        backoff = 0.05
        while True:
            try:
                if self._stream is None or not self._stream.alive:
                    self._open()
                assert self._stream is not None
                change = self._stream.try_next()
                self.token = self._stream.resume_token
                backoff = 0.05
            except (PyMongoError, ServerUnavailableError) as exc:
                self._recover(exc)
                change = None
                time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, 1.0)
            collection = (change.get("ns") or {}).get("coll") if change is not None else None
            if collection is not None and collection == self.flow_collection:
                self.flow_changes += 1
                return None
            if collection is not None and collection == self.peers_collection:
                self.peer_changes += 1
                return None
            parsed = _parse_change(change) if change is not None else None
            if parsed is not None and (self.ids is None or parsed.job_id in self.ids):
                return parsed
            if time.monotonic() >= deadline:  # also when busy with changes the caller does not want
                return None

    def _recover(self, exc: Exception) -> None:
        logger.warning("change stream interrupted, reopening", extra={"error": str(exc)})
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except PyMongoError:
                pass
        if isinstance(exc, OperationFailure) and exc.code in (260, 280, 286):  # the token can no longer resume
            self.token = None
        if self.token is None:
            self._lost = True

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except PyMongoError:
                pass
            self._stream = None

    def __enter__(self) -> StatusFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActivityFeed(StatusFeed):
    """A :class:`StatusFeed` that also sees progress writes (a dashboard's live progress bars): each change comes
    with its document, looked up by the server. Only dashboards open one; queue nodes never do."""

    def _open(self) -> None:
        changed = [{f"updateDescription.updatedFields.{name}": {"$exists": True}} for name in ("status", "progress")]
        self.pipeline = [
            {
                "$match": {
                    "ns.coll": self.store.job_queue,
                    "$or": [
                        {"operationType": {"$in": ["insert", "replace"]}},
                        {"operationType": "update", "$or": changed},
                    ],
                }
            },
            {
                "$set": {
                    f"fullDocument.{name}": {
                        "$ifNull": [f"$updateDescription.updatedFields.{name}", f"$fullDocument.{name}"]
                    }
                    for name in ("status", "progress")
                }
            },
        ]
        super()._open()


#: The numbers a status change may carry.
_STATUS_VALUES = frozenset(int(s) for s in JobStatus)


def _parse_change(change: Mapping[str, Any]) -> StatusChange | None:
    if change.get("operationType") not in ("insert", "update", "replace"):
        return None
    key = change.get("documentKey") or {}
    doc = change.get("fullDocument")
    status = doc.get("status") if isinstance(doc, Mapping) else None
    # A status that is no JobStatus number (a malformed document, SPEC 2) is nobody's change to act on: skipped,
    # never raised into a node's or a watcher's loop.
    updated = (change.get("updateDescription") or {}).get("updatedFields") or {}
    if status is None and change.get("operationType") == "update" and type(updated.get("run")) is int:
        key = change.get("documentKey") or {}
        return (
            StatusChange(job_id=key["_id"], status=STATUS_UNKNOWN, document=None, run=updated["run"])
            if "_id" in key
            else None
        )
    if isinstance(status, bool) or not isinstance(status, (int, float)) or status not in _STATUS_VALUES:
        return None
    if "_id" not in key:
        return None
    document = dict(doc) if isinstance(doc, Mapping) and "_id" in doc else None
    run = doc.get("run") if isinstance(doc, Mapping) else None
    updated = (change.get("updateDescription") or {}).get("updatedFields") or {}
    outcome = updated.get("outcome")
    ended_run = outcome if isinstance(outcome, ObjectId) and status < JobStatus.PROCESSING else None
    known = {name: doc[name] for name in ("run", "started", "change") if isinstance(doc, Mapping) and name in doc}
    return StatusChange(
        job_id=key["_id"],
        status=int(status),
        document=document,
        run=run if isinstance(run, int) else None,
        ended_run=ended_run,
        fields=known,
    )
