"""The storage model, and the only module that talks to pymongo.

Two collections: jobs (one document per job) and events (one document per status change, carrying error details
and results). Both are capped by default. A capped collection rejects any update that changes a document's BSON
size on a real MongoDB, so a job document is written whole at insert and every later update only rewrites
fixed-size fields with values of the same BSON type: ``status`` (int32), ``started``/``ended``/``alive``
(datetimes, :data:`~taskscheduler.constants.UNSET_TIME` while unset), ``worker`` (ObjectId,
:data:`~taskscheduler.constants.NO_WORKER` while unowned), ``progress`` (double) and ``orphaned`` (int32).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import bson
from bson import CodecOptions, ObjectId
from pymongo import ASCENDING, DESCENDING, IndexModel, MongoClient
from pymongo.change_stream import ChangeStream
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from .constants import NO_WORKER, JobStatus
from .errors import InvalidArgumentError, QueueFullError, ServerUnavailableError

logger = logging.getLogger("taskscheduler.store")

#: Largest BSON document MongoDB accepts.
MAX_DOCUMENT_SIZE = 16 * 1024 * 1024
#: Seconds a cached figure of the capped job collection's used bytes is trusted while far from full.
ROOM_CACHE_SECONDS = 1.0
#: Up to this many job ids, a change stream filters them on the server; above, the client filters.
MAX_SERVER_ID_FILTER = 50
#: Ids per ``$in`` when reading many jobs by id: some servers match a long ``$in`` against every candidate.
ID_BATCH = 100
#: Server-side wait of one change-stream getMore; bounds how late a poll notices its own deadline.
STREAM_AWAIT_MS = 200

Document = dict[str, Any]


def connect(uri: str, database: str, timeout_ms: int = 10_000) -> Database[Document]:
    """A new client (one per process: never share a MongoClient across fork) and its database."""
    try:
        client: MongoClient[Document] = MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, tz_aware=True)
    except PyMongoError as exc:
        raise InvalidArgumentError(f"invalid MongoDB URI {uri!r}: {exc}") from exc
    return client[database]


def utcnow() -> datetime:
    """Now, as an aware UTC datetime truncated to BSON's millisecond precision."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def encoded_size(value: Any) -> int:
    """BSON size of ``{"v": value}``; InvalidArgumentError when it cannot be stored."""
    try:
        return len(bson.encode({"v": value}))
    except (bson.errors.InvalidDocument, OverflowError, TypeError) as exc:
        raise InvalidArgumentError(f"value cannot be stored in MongoDB (not BSON-encodable): {exc}") from exc


def is_encodable(value: Any) -> bool:
    try:
        encoded_size(value)
    except InvalidArgumentError:
        return False
    return True


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return [[str(k), _canonical(v)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def fingerprint(*parts: Any) -> str:
    """A hash of values that ignores the key order of documents (for add_job_once)."""
    return hashlib.sha1(bson.encode({"v": _canonical(list(parts))})).hexdigest()


def same_value(a: Any, b: Any) -> bool:
    """Equality of stored values, ignoring document key order."""
    return bool(_canonical(a) == _canonical(b))


def with_prefix(query: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A job-document filter rewritten for change events (``status`` -> ``fullDocument.status``)."""
    out: dict[str, Any] = {}
    for key, value in query.items():
        if key in ("$and", "$or", "$nor") and isinstance(value, list):
            out[key] = [with_prefix(v, prefix) for v in value]
        elif key.startswith("$"):
            out[key] = value
        else:
            out[f"{prefix}{key}"] = value
    return out


class DuplicateJobError(InvalidArgumentError):
    """A job with this id exists already."""


class OnceConflict(Exception):
    """An active job with the same add_job_once key exists already (raised by the unique ``once`` index)."""


@dataclass(frozen=True)
class StatusChange:
    """One status change seen on the job collection: the status it was set to, and the document."""

    job_id: ObjectId
    status: int
    document: Document | None


class Store:
    """Collections, indexes and every read and write of jobs and events."""

    def __init__(
        self,
        db: Database[Document],
        *,
        job_queue: str,
        job_queue_size: int,
        event_queue: str,
        event_queue_size: int,
        job_retention: int,
    ) -> None:
        # Aware UTC datetimes whatever the caller's client was configured with.
        self.db: Database[Document] = db.with_options(codec_options=CodecOptions(tz_aware=True, tzinfo=timezone.utc))
        self.job_queue = job_queue
        self.job_queue_size = job_queue_size
        self.event_queue = event_queue
        self.event_queue_size = event_queue_size
        self.job_retention = job_retention
        self.jobs = self.db.get_collection(job_queue)
        self.events = self.db.get_collection(event_queue)
        self._ready = False
        self._used: tuple[float, int] | None = None  # (monotonic time, used bytes) of the capped job collection

    # -- collections and indexes -------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create both collections and their named indexes (idempotent, once per Store)."""
        if self._ready:
            return
        self._create(self.job_queue, self.job_queue_size)
        self._create(self.event_queue, self.event_queue_size)
        job_indexes = [
            IndexModel([("status", ASCENDING), ("alive", ASCENDING)], name="status_alive"),
            IndexModel([("class", ASCENDING), ("status", ASCENDING)], name="class_status"),
            IndexModel([("class", ASCENDING), ("key", ASCENDING), ("status", ASCENDING)], name="class_key_status"),
            IndexModel([("data.parent", ASCENDING), ("status", ASCENDING)], name="parent_status"),
            # At most one active job per add_job_once key: what makes add_job_once race-free.
            IndexModel(
                [("once", ASCENDING)],
                name="once_active",
                unique=True,
                partialFilterExpression={"once": {"$exists": True}, "status": {"$lt": int(JobStatus.DONE)}},
            ),
        ]
        if not self.job_queue_size:
            job_indexes.append(
                IndexModel(
                    [("ended", ASCENDING)],
                    name="ended_ttl",
                    expireAfterSeconds=self.job_retention,
                    partialFilterExpression={"status": {"$gte": int(JobStatus.DONE)}},
                )
            )
        event_indexes = [IndexModel([("job", ASCENDING), ("status", ASCENDING), ("worker", ASCENDING)], name="job")]
        if not self.event_queue_size:
            event_indexes.append(
                IndexModel([("time", ASCENDING)], name="time_ttl", expireAfterSeconds=self.job_retention)
            )
        with _server_errors():
            self.jobs.create_indexes(job_indexes)
            self.events.create_indexes(event_indexes)
        self._ready = True

    def _create(self, name: str, size: int) -> None:
        try:
            with _server_errors():
                if size:
                    self.db.create_collection(name, capped=True, size=size)
                else:
                    self.db.create_collection(name)
        except (CollectionInvalid, OperationFailure) as exc:
            if "already exists" not in str(exc) and getattr(exc, "code", None) != 48:
                raise

    def flush(self) -> None:
        """Drop jobs and events, then create them again so running queue nodes keep a valid collection."""
        with _server_errors():
            self.jobs.drop()
            self.events.drop()
        self._ready = False
        self._used = None
        self.ensure()

    def ping(self) -> None:
        with _server_errors():
            self.db.client.admin.command("ping")

    # -- jobs ------------------------------------------------------------------------------------------------------

    def insert_job(self, doc: Document) -> None:
        """Insert a new job. QueueFullError rather than evicting an unfinished job; nothing written on error."""
        size = len(_encode_document(doc))
        if size > MAX_DOCUMENT_SIZE:
            raise InvalidArgumentError(f"job document is {size} bytes, over MongoDB's limit of {MAX_DOCUMENT_SIZE}")
        self.ensure()
        self._check_room(size)
        try:
            with _server_errors():
                self.jobs.insert_one(doc)
        except DuplicateKeyError as exc:
            if "once" in ((exc.details or {}).get("keyPattern") or {}) or "once_active" in str(exc):
                raise OnceConflict(str(exc)) from exc
            raise DuplicateJobError(f"a job with id {doc['_id']} already exists") from exc
        if self._used is not None:
            self._used = (self._used[0], self._used[1] + size)

    def _check_room(self, size: int) -> None:
        if not self.job_queue_size:
            return
        limit = self.job_queue_size
        now = time.monotonic()
        cached = self._used
        near = cached is not None and cached[1] + size > limit // 2
        if cached is None or near or now - cached[0] > ROOM_CACHE_SECONDS:
            with _server_errors():
                stats = self.db.command("collStats", self.job_queue)
            cached = self._used = (now, int(stats.get("size", 0)))
        overflow = cached[1] + size - limit
        if overflow <= 0:
            return
        # Inserting evicts the oldest documents (natural order) until the new one fits: all must be finished.
        freed = 0
        pipeline: list[Document] = [
            {"$project": {"status": 1, "size": {"$bsonSize": "$$ROOT"}}},
        ]
        with _server_errors():
            for doc in self.jobs.aggregate(pipeline):
                if doc.get("status", 0) < JobStatus.DONE:
                    raise QueueFullError(
                        f"job collection {self.job_queue!r} is full ({cached[1]} of {limit} bytes): adding a "
                        f"{size} byte job would evict unfinished job {doc['_id']}; raise job_queue_size"
                    )
                freed += int(doc["size"])
                if freed >= overflow:
                    return
        raise QueueFullError(f"a {size} byte job does not fit in job collection {self.job_queue!r} of {limit} bytes")

    def delete_job(self, job_id: ObjectId) -> None:
        """Withdraw a job nobody has seen run (a next run whose predecessor's end was not recorded)."""
        with _server_errors():
            self.jobs.delete_one({"_id": job_id, "status": {"$in": [int(JobStatus.WAITING), int(JobStatus.POSTPONED)]}})

    def find_job(self, job_id: Any) -> Document | None:
        with _server_errors():
            return self.jobs.find_one({"_id": job_id})

    def find_by_ids(self, ids: Iterable[ObjectId]) -> Iterator[Document]:
        """The jobs with these ids (unknown ids are left out), read ``ID_BATCH`` ids per query."""
        wanted = list(ids)
        for start in range(0, len(wanted), ID_BATCH):
            with _server_errors():
                yield from self.jobs.find({"_id": {"$in": wanted[start : start + ID_BATCH]}})

    def find_jobs(self, query: Mapping[str, Any]) -> Iterator[Document]:
        try:
            with _server_errors():
                cursor = self.jobs.find(dict(query))
                yield from cursor
        except OperationFailure as exc:
            raise InvalidArgumentError(f"invalid job query {dict(query)!r}: {exc}") from exc

    def find_active(self, job_class: str, key: str | None) -> list[Document]:
        """Active jobs of a class (and a data fingerprint), for add_job_once."""
        query: Document = {"class": job_class, "status": {"$lt": int(JobStatus.DONE)}}
        if key is not None:
            query["key"] = key
        with _server_errors():
            return list(self.jobs.find(query))

    def children(self, parent_id: ObjectId, active_only: bool = False) -> list[Document]:
        query: Document = {"data.parent": parent_id}
        if active_only:
            query["status"] = {"$lt": int(JobStatus.DONE)}
        with _server_errors():
            return list(self.jobs.find(query))

    def set_status(
        self, job_id: ObjectId, status: int, expect: Mapping[str, Any], fields: Mapping[str, Any] | None = None
    ) -> bool:
        """Set ``status`` (and fixed-size ``fields``) if the job still has the values in ``expect``; True when it
        did. ``status`` must differ from the expected one: "changed nothing" is how a lost race shows.

        The update is addressed by ``_id`` alone and checks ``expect`` inside an update pipeline. A filter of
        ``_id`` plus ``status`` lets a planner take its candidates from the status index (every job in that
        status) instead of the primary key; some servers do, and then each claim costs O(waiting jobs). A job
        that no longer matches is left untouched: nothing modified, nothing written to the oplog.
        """
        update: Document = {"status": int(status)}
        if fields:
            update.update(fields)
        matches = {"$and": [{"$eq": [f"${name}", {"$literal": value}]} for name, value in expect.items()]}
        stage = {name: {"$cond": [matches, {"$literal": value}, f"${name}"]} for name, value in update.items()}
        with _server_errors():
            result = self.jobs.update_one({"_id": job_id}, [{"$set": stage}])
        return result.modified_count == 1

    def claim(self, job_id: ObjectId, worker: ObjectId, now: datetime) -> bool:
        """The atomic claim: WAITING and unowned -> PROCESSING owned by ``worker``. One round trip."""
        return self.set_status(
            job_id,
            JobStatus.PROCESSING,
            {"status": int(JobStatus.WAITING)},
            {"worker": worker, "started": now, "alive": now, "progress": 0.0},
        )

    def heartbeat(self, owners: Mapping[ObjectId, ObjectId], now: datetime) -> int:
        """Refresh ``alive`` of running jobs (job id -> owning worker); returns how many are still owned."""
        if not owners:
            return 0
        with _server_errors():
            result = self.jobs.update_many(
                {
                    "_id": {"$in": list(owners)},
                    "status": int(JobStatus.PROCESSING),
                    "worker": {"$in": list(set(owners.values()))},
                },
                {"$set": {"alive": now}},
            )
        return result.modified_count

    def set_progress(self, job_id: ObjectId, progress: float | None, now: datetime, owner: ObjectId | None) -> bool:
        expect: Document
        if owner is not None:
            expect = {"status": int(JobStatus.PROCESSING), "worker": owner}
        else:
            expect = {"status": {"$lt": int(JobStatus.DONE)}}
        update: Document = {"alive": now}
        if progress is not None:
            update["progress"] = float(progress)
        with _server_errors():
            result = self.jobs.update_one({"_id": job_id, **expect}, {"$set": update})
        return result.matched_count == 1

    def orphans(self, alive_before: datetime) -> list[Document]:
        with _server_errors():
            return list(self.jobs.find({"status": int(JobStatus.PROCESSING), "alive": {"$lt": alive_before}}))

    def scan(self, statuses: tuple[int, ...]) -> Iterator[Document]:
        """Jobs in the given statuses, oldest first (queue start-up and resync)."""
        with _server_errors():
            yield from self.jobs.find({"status": {"$in": [int(s) for s in statuses]}}).sort("_id", ASCENDING)

    # -- events ----------------------------------------------------------------------------------------------------

    @staticmethod
    def event(
        job: Mapping[str, Any],
        status: int,
        worker: ObjectId | None = None,
        error: Mapping[str, Any] | None = None,
        result: Any = None,
        has_result: bool = False,
        time: datetime | None = None,
    ) -> Document:
        """An event document: one status change of a job (with its error or result)."""
        event: Document = {
            "_id": ObjectId(),
            "job": job["_id"],
            "class": job.get("class"),
            "status": int(status),
            "time": time or utcnow(),
            "worker": worker,
        }
        if error is not None:
            event["error"] = dict(error)
        if has_result:
            event["result"] = result
        return event

    def insert_events(self, events: list[Document]) -> list[ObjectId]:
        """Insert events in one round trip; events whose ``_id`` is stored already (a retry) are skipped."""
        self.ensure()
        try:
            with _server_errors():
                self.events.insert_many(events, ordered=False)
        except BulkWriteError as exc:
            if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])):
                raise
        return [ObjectId(e["_id"]) for e in events]

    def insert_event(self, job: Mapping[str, Any], status: int, worker: ObjectId | None = None) -> ObjectId:
        return self.insert_events([self.event(job, status, worker)])[0]

    def delete_event(self, event_id: ObjectId) -> None:
        with _server_errors():
            self.events.delete_one({"_id": event_id})

    def last_event(self, job_id: ObjectId, status: int, worker: ObjectId | None = None) -> Document | None:
        query: Document = {"job": job_id, "status": int(status)}
        if worker is not None and worker != NO_WORKER:
            query["worker"] = worker
        with _server_errors():
            return self.events.find_one(query, sort=[("time", DESCENDING), ("_id", DESCENDING)])

    def job_events(self, job_id: ObjectId) -> list[Document]:
        with _server_errors():
            return list(self.events.find({"job": job_id}).sort([("time", ASCENDING), ("_id", ASCENDING)]))

    # -- change streams --------------------------------------------------------------------------------------------

    def status_feed(
        self,
        ids: list[ObjectId] | None = None,
        query: Mapping[str, Any] | None = None,
        lookup: bool = True,
        statuses: tuple[int, ...] | None = None,
    ) -> StatusFeed:
        """Status changes of jobs (every insert; updates only to ``statuses`` when given). ``lookup=False``
        skips fetching the document of each update (cheaper: then only inserts carry a document)."""
        return StatusFeed(self, ids, query, lookup or bool(query), statuses)


class StatusFeed:
    """Status changes of jobs, from a change stream that survives dropped connections and ``flush()``.

    It watches the database (filtered to the job collection), so dropping the collection does not invalidate it.
    ``status`` is taken from the update itself, so it is the status at the time of the change even though the
    rest of the document comes from ``updateLookup`` (as it is when the server looks it up).
    """

    def __init__(
        self,
        store: Store,
        ids: list[ObjectId] | None,
        query: Mapping[str, Any] | None,
        lookup: bool,
        statuses: tuple[int, ...] | None = None,
    ) -> None:
        self.store = store
        self.lookup = lookup
        changed: Any = {"$exists": True} if statuses is None else {"$in": [int(x) for x in statuses]}
        match: Document = {
            "ns.coll": store.job_queue,
            "$or": [
                {"operationType": {"$in": ["insert", "replace"]}},
                {"operationType": "update", "updateDescription.updatedFields.status": changed},
            ],
        }
        if ids is not None and len(ids) <= MAX_SERVER_ID_FILTER:
            match["documentKey._id"] = {"$in": list(ids)}  # a long $in costs the server on every change: filter here
        self.ids = frozenset(ids) if ids is not None else None
        self.pipeline: list[Document] = [
            {"$match": match},
            {
                "$set": {
                    "fullDocument.status": {
                        "$ifNull": ["$updateDescription.updatedFields.status", "$fullDocument.status"]
                    }
                }
            },
        ]
        if query:
            self.pipeline.append({"$match": with_prefix(query, "fullDocument.")})
        self.token: Mapping[str, Any] | None = None
        #: Incremented when the stream had to restart without its resume token (changes may have been missed).
        self.gaps = 0
        self._stream: ChangeStream[Document] | None = None
        self._open()

    def _open(self) -> None:
        with _server_errors():
            self._stream = self.store.db.watch(
                self.pipeline,
                full_document="updateLookup" if self.lookup else None,
                resume_after=self.token,
                max_await_time_ms=STREAM_AWAIT_MS,
            )

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
            self.gaps += 1

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


def _parse_change(change: Mapping[str, Any]) -> StatusChange | None:
    if change.get("operationType") not in ("insert", "update", "replace"):
        return None
    key = change.get("documentKey") or {}
    doc = change.get("fullDocument")
    status = doc.get("status") if isinstance(doc, Mapping) else None
    if status is None or "_id" not in key:
        return None
    document = dict(doc) if isinstance(doc, Mapping) and "_id" in doc else None
    return StatusChange(job_id=key["_id"], status=int(status), document=document)


def _encode_document(doc: Mapping[str, Any]) -> bytes:
    try:
        return bson.encode(doc)
    except (bson.errors.InvalidDocument, OverflowError, TypeError) as exc:
        raise InvalidArgumentError(f"job data cannot be stored in MongoDB (not BSON-encodable): {exc}") from exc


@contextlib.contextmanager
def _server_errors() -> Iterator[None]:
    """Turns 'cannot reach the server' into ServerUnavailableError; other driver errors pass through."""
    try:
        yield
    except (ServerSelectionTimeoutError, ConnectionFailure) as exc:
        raise ServerUnavailableError(f"cannot reach MongoDB: {exc}") from exc
