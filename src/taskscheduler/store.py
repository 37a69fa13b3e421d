"""The storage model, and the only module that talks to pymongo.

Two collections: jobs (one document per job) and events (one document per status change, carrying error details
and results). Both are capped by default. A capped collection rejects any update that changes a document's BSON
size on a real MongoDB, so a job document is written whole at insert and every later update only rewrites
fixed-size fields with values of the same BSON type: ``status`` (int32), ``started``/``ended``/``alive``
(datetimes, :data:`~taskscheduler.constants.UNSET_TIME` while unset), ``worker`` (ObjectId,
:data:`~taskscheduler.constants.NO_WORKER` while unowned), ``progress`` (double) and ``orphaned`` (int32).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import bson
import pymongo
from bson import CodecOptions, ObjectId
from bson.raw_bson import RawBSONDocument
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

from .clock import ServerClock
from .constants import NODE_REGISTRY, JobStatus
from .errors import (
    ConfigurationError,
    DuplicateJobError,
    InvalidArgumentError,
    QueueFullError,
    ServerUnavailableError,
    TaskSchedulerError,
)
from .redact import redact_uri, scrub

logger = logging.getLogger("taskscheduler.store")

#: Largest BSON document MongoDB accepts.
MAX_DOCUMENT_SIZE = 16 * 1024 * 1024
#: Largest job document stored: 15 MB, that is 15 * 1024 * 1024 bytes. A change event carries the whole job
#: document (inserts, and updates read with ``updateLookup``) plus fields of its own, and MongoDB fails a change
#: stream whose event exceeds 16 MB, again at every resume: one larger job would stop every node. Checked before
#: anything is written (add_job, add_job_once, requeue); event results are bounded below it too.
MAX_JOB_SIZE = 15 * 1024 * 1024
#: Oldest MongoDB served: deletes from capped collections (the room ledger frees finished jobs) need 5.0.7.
MIN_SERVER_VERSION = (5, 0, 7)
#: Reservations tried (each after freeing room) before a busy, full job collection is reported full.
ROOM_ATTEMPTS = 50
#: Most bytes of the room ledger a producer reserves at once (1/1024 of the cap when smaller). Its first
#: reservation is its job's size, each later one a whole chunk: one that adds a single job (a ``taskscheduler
#: add``) holds no room it does not use, a busy one writes the ledger once per many jobs from its second job on.
ROOM_CHUNK_BYTES = 64 * 1024
#: How long room a producer reserved ahead (a grant, on the server's clock) stays counted for it: a producer
#: killed holding some gives it back to the first reconciliation after this.
ROOM_GRANT_SECONDS = 300.0
#: A producer stops spending a grant this long before it ends, on its own monotonic clock counted from before it
#: asked: the time an insert it starts (or a renewal) has to reach the server.
ROOM_GRANT_MARGIN_SECONDS = 120.0
#: Bytes a reconciled room ledger allows for reservations in flight (or 1/64 of the cap if more, 1/8 at most).
RECONCILE_MARGIN_BYTES = 64 * 1024
#: A lone reservation of at most this share of that margin is recorded in no grant (see ``Store._take``).
ROOM_UNRECORDED_SHARE = 16
#: Longest a process's exit waits for the server to take back room it reserved and did not use.
ROOM_EXIT_SECONDS = 2.0
#: Finished jobs looked at per attempt to make room in a full capped job collection.
ROOM_FREE_BATCH = 100
#: Up to this many job ids, a change stream filters them on the server; above, the client filters.
MAX_SERVER_ID_FILTER = 50
#: Ids per ``$in`` when reading many jobs by id: some servers match a long ``$in`` against every candidate.
ID_BATCH = 100
#: Server-side wait of one change-stream getMore; bounds how late a poll notices its own deadline.
STREAM_AWAIT_MS = 200
#: Longest a claim may take (a quarter of the lease when that is less): a claim's ``started`` is stamped before it
#: is sent, so a claim that waited out an outage must fail rather than record a start from before the outage.
CLAIM_SECONDS = 1.0

Document = dict[str, Any]


def connect(uri: str, database: str, timeout_ms: int = 10_000) -> Database[Document]:
    """A new client (one per process: never share a MongoClient across fork) and its database."""
    if not isinstance(database, str) or not database or any(c in database for c in '/\\. "$\0') or len(database) > 63:
        raise InvalidArgumentError(f'invalid database name {database!r}: 1 to 63 characters, none of / \\ . space " $')
    try:
        client: MongoClient[Document] = MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, tz_aware=True)
    except (PyMongoError, ValueError, TypeError, OSError) as exc:
        # pymongo raises ValueError for a bad host or port, OSError for an unreadable TLS file. The driver's
        # error is not chained: no message or traceback may show the URI's password.
        raise InvalidArgumentError(
            f"invalid MongoDB URI {redact_uri(uri)!r}: {scrub(_first_line(exc), uri)}"
        ) from None
    return client[database]


def sync_twin(db: Any) -> Database[Document]:
    """The synchronous twin of a ``pymongo.asynchronous.database.AsyncDatabase``: a new MongoClient with the
    async client's own settings (hosts, credentials, TLS, timeouts...) and the same database options."""
    try:
        from pymongo.asynchronous.database import AsyncDatabase
    except ImportError:  # pragma: no cover - pymongo < 4.13
        raise ConfigurationError("AsyncScheduler needs pymongo >= 4.13 (its AsyncMongoClient)") from None
    if not isinstance(db, AsyncDatabase):
        raise InvalidArgumentError(f"db must be a pymongo AsyncDatabase, got {type(db).__name__}")
    settings = getattr(db.client, "_init_kwargs", None)
    if not isinstance(settings, dict):  # pragma: no cover - a pymongo that no longer keeps them
        raise ConfigurationError("cannot read the AsyncMongoClient's settings; build AsyncScheduler on pymongo 4.13+")
    client: MongoClient[Document] = MongoClient(**{**settings, "connect": False})
    return client.get_database(
        db.name,
        codec_options=db.codec_options,
        read_preference=db.read_preference,
        write_concern=db.write_concern,
        read_concern=db.read_concern,
    )


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
    """A job-document filter rewritten for change events (``status`` -> ``fullDocument.status``), operators and
    ``$expr`` field paths (``"$status"`` -> ``"$fullDocument.status"``) included."""
    out: dict[str, Any] = {}
    for key, value in query.items():
        if key in ("$and", "$or", "$nor") and isinstance(value, list):
            out[key] = [with_prefix(v, prefix) if isinstance(v, Mapping) else v for v in value]
        elif key == "$expr":
            out[key] = _prefix_paths(value, prefix)
        elif key.startswith("$"):
            out[key] = value
        else:
            out[f"{prefix}{key}"] = value
    return out


def _prefix_paths(expr: Any, prefix: str) -> Any:
    """Field paths of an aggregation expression moved under ``prefix`` (variables such as ``$$NOW`` kept)."""
    if isinstance(expr, str) and expr.startswith("$") and not expr.startswith("$$"):
        return f"${prefix}{expr[1:]}"
    if isinstance(expr, Mapping):
        if "$literal" in expr:
            return expr
        return {k: _prefix_paths(v, prefix) for k, v in expr.items()}
    if isinstance(expr, (list, tuple)):
        return [_prefix_paths(v, prefix) for v in expr]
    return expr


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


def literal(value: Any) -> Document:
    """An aggregation expression that is exactly ``value`` (never read as a field path or operator)."""
    return {"$literal": value}


#: Server-side expression of "now" on the server's clock (leases never use a client's clock).
SERVER_NOW = "$$NOW"


def lease_end(seconds: float | None = None) -> Document:
    """Server-side expression: the server's now plus a lease (``seconds``, or the job's stored ``lease``)."""
    length: Any = float(seconds) * 1000.0 if seconds is not None else {"$multiply": ["$lease", 1000.0]}
    return {"$add": [SERVER_NOW, length]}


def fields_equal(expect: Mapping[str, Any]) -> Document:
    """Expression: every field has the given value."""
    return {"$and": [{"$eq": [f"${name}", literal(value)]} for name, value in expect.items()]}


def shard_keys(job_queue: str, event_queue: str) -> dict[str, dict[str, Any]]:
    """The documented shard key of each collection a sharded cluster may shard (``job_queue_size=0`` and
    ``event_queue_size=0``; capped collections cannot be sharded). Every write of a job is addressed by its
    ``_id``, every read of its events by ``job``, so these keep each to one shard; no unique index but ``_id``
    exists on them (add_job_once keys have a collection of their own, keyed by ``_id``). Events of one job share
    a shard, so the ``_id`` uniqueness that makes their writes idempotent holds there."""
    return {
        job_queue: {"_id": "hashed"},
        event_queue: {"job": "hashed"},
        f"{job_queue}.once": {"_id": "hashed"},
    }


@dataclass
class _Producer:
    """The room one producer (a Store, in one process) reserved in the ledger of a capped job collection."""

    pid: int = field(default_factory=os.getpid)
    lock: threading.Lock = field(default_factory=threading.Lock)  # threads share a Scheduler (AsyncScheduler's)
    grant: ObjectId = field(default_factory=ObjectId)  # the _id of its grant in the room collection
    credit: int = 0  # reserved, not yet spent; spendable until ``until``
    until: float = 0.0  # on the monotonic clock
    granted: int = 0  # bytes its grant says (0: it has none)
    pending: int = 0  # spent on jobs not inserted yet, covered by the grant
    bare: int = 0  # reserved for jobs not inserted yet, in no grant (while it has none: see Store._take)
    last: int = 0  # its last reservation (the next one is twice as large)

    @property
    def covered(self) -> int:
        """What its grant must cover: room it may spend and jobs in flight."""
        return self.credit + self.pending + self.bare


@dataclass(frozen=True)
class _Reconciled:
    held: int  # bytes the job collection holds
    granted: int  # bytes of unexpired grants
    corrected: bool  # the ledger changed meanwhile (corrected, or moved by another producer)


def _reconcile_margin(limit: int) -> int:
    return min(max(RECONCILE_MARGIN_BYTES, limit // 64), limit // 8)


#: Stores that were granted room, to give back what they did not use when the process exits.
_PRODUCERS: weakref.WeakSet[Store] = weakref.WeakSet()


@atexit.register
def _give_back_at_exit() -> None:
    for store in list(_PRODUCERS):
        with contextlib.suppress(Exception):  # never fail an exit
            store.give_back(ROOM_EXIT_SECONDS)


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
        #: The room ledger of a capped job collection: ``{_id: "used", bytes}``, the bytes its documents use and
        #: producers reserved, and one grant ``{_id, bytes, expires}`` per producer holding room (see _reserve).
        self.room = self.db.get_collection(f"{job_queue}.room")
        self.nodes = self.db.get_collection(NODE_REGISTRY)
        #: add_job_once keys: ``{_id: key, job: the job holding it}``, at most one active job per key.
        self.once = self.db.get_collection(f"{job_queue}.once")
        self._ready = False
        self._checked = False
        self._cap = job_queue_size  # the job collection's real cap, read by ensure()
        self._chunk = 0  # most bytes reserved at once (see _reserve)
        self._unrecorded = 0  # largest lone reservation recorded in no grant (see _take)
        self._producer = _Producer()  # the room this producer reserved
        #: The server's clock, for every time this process decides or stores (schedules never use ours).
        self.clock = ServerClock(self.server_time)

    # -- collections and indexes -------------------------------------------------------------------------------

    def check_deployment(self) -> None:
        """ConfigurationError unless the server is a replica set (or a sharded cluster) of a supported version:
        change streams need one, and an answer up front beats a failure deep inside later."""
        if self._checked:
            return
        with _server_errors():
            hello = self.db.command("hello")
            version = str(self.db.client.server_info().get("version", "0"))
        where = ", ".join(f"{host}:{port}" for host, port in self.db.client.nodes) or "the server"
        if hello.get("msg") != "isdbgrid" and not hello.get("setName"):
            raise ConfigurationError(
                f"MongoDB at {where} is not a replica set, and change streams need one "
                "(a single member is fine: start mongod with --replSet rs0, then run rs.initiate() once)"
            )
        found = tuple(int(part) for part in (version.split("-")[0].split(".") + ["0", "0"])[:3] if part.isdigit())
        if found < MIN_SERVER_VERSION:
            floor = ".".join(map(str, MIN_SERVER_VERSION))
            raise ConfigurationError(f"MongoDB at {where} is version {version}; taskscheduler needs {floor} or newer")
        self._checked = True

    def ensure(self) -> None:
        """Create both collections and their named indexes (idempotent, once per Store)."""
        if self._ready:
            return
        self.check_deployment()
        self._create(self.job_queue, self.job_queue_size)
        self._create(self.event_queue, self.event_queue_size)
        self._cap = self._capped_size(self.job_queue)
        self._chunk = min(ROOM_CHUNK_BYTES, self._cap // 1024)
        self._unrecorded = _reconcile_margin(self._cap) // ROOM_UNRECORDED_SHARE
        job_indexes = [
            IndexModel([("status", ASCENDING), ("expires", ASCENDING)], name="status_expires"),
            IndexModel([("class", ASCENDING), ("status", ASCENDING)], name="class_status"),

            IndexModel([("class", ASCENDING), ("key", ASCENDING), ("status", ASCENDING)], name="class_key_status"),
            IndexModel([("data.parent", ASCENDING), ("status", ASCENDING)], name="parent_status"),
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
        event_indexes = [IndexModel([("job", ASCENDING), ("run", ASCENDING)], name="job_run")]
        if not self.event_queue_size:
            event_indexes.append(
                IndexModel([("time", ASCENDING)], name="time_ttl", expireAfterSeconds=self.job_retention)
            )
        with _server_errors():
            # A unique index must start with the shard key, so add_job_once keys live in their own collection
            # (keyed by _id); the unique index an older version created goes.
            with contextlib.suppress(OperationFailure):
                self.jobs.drop_index("once_active")
            self.jobs.create_indexes(job_indexes)
            self.events.create_indexes(event_indexes)
            self.nodes.create_indexes([IndexModel([("expires", ASCENDING)], name="expires_ttl", expireAfterSeconds=0)])
            if self._cap:  # grants: reconciliations sum the unexpired ones, the server deletes the others
                self.room.create_indexes(
                    [IndexModel([("expires", ASCENDING)], name="expires_ttl", expireAfterSeconds=0)]
                )
        self._ready = True

    def _capped_size(self, name: str) -> int:
        """The bytes a capped collection holds before it evicts (0 when not capped), as created: whatever this
        producer's own ``job_queue_size`` says, the collection's real cap is what eviction follows."""
        with _server_errors():
            found = list(self.db.list_collections(filter={"name": name}))
        options = found[0].get("options", {}) if found else {}
        return int(options.get("size", 0)) if options.get("capped") else 0

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

    @property
    def capped(self) -> bool:
        """Whether the job collection is capped, as it was created (so no update may change a document's size)."""
        self.ensure()
        return self._cap > 0

    def close(self) -> None:
        """Give back the room this producer reserved and did not use, then close the client this store's database
        belongs to (its owner is done with it)."""
        self.give_back(ROOM_EXIT_SECONDS)  # bounded: this may run from a finalizer
        self.db.client.close()

    def flush(self) -> None:
        """Drop jobs and events, then create them again so running queue nodes keep a valid collection.

        A node or worker writing in the moment between the drop and the create makes the server create the
        collection itself, as an ordinary one (neither capped nor expiring): such a collection is dropped and
        created again, as configured.

        The room ledger stays: producers in other processes may still spend room they reserved before the flush,
        and their grants keep it counted. The dropped jobs' bytes are given back by reconciling the ledger with
        the new, empty collection (see _reconcile).
        """
        for _ in range(5):
            with _server_errors():
                self.jobs.drop()
                self.events.drop()
                self.once.drop()
            self._ready = False
            self.ensure()
            if (not self.job_queue_size or self._capped_size(self.job_queue)) and (
                not self.event_queue_size or self._capped_size(self.event_queue)
            ):
                break
        else:
            raise ConfigurationError("flush: the job or event collection keeps being created uncapped by writers")
        for _ in range(ROOM_ATTEMPTS):  # until no producer's reservation races the correction
            with _server_errors():
                ledger = self.room.find_one({"_id": "used"})
            if not self._cap or ledger is None or not self._reconcile(int(ledger["bytes"]), self._cap).corrected:
                return

    @contextlib.contextmanager
    def bounded(self, seconds: float) -> Iterator[None]:
        """Every command inside takes at most ``seconds`` in all (retries included); past it,
        ServerUnavailableError: whether the last one was written is unknown, as for a lost connection."""
        try:
            with pymongo.timeout(seconds):
                yield
        except PyMongoError as exc:
            if not getattr(exc, "timeout", False):
                raise
            raise ServerUnavailableError(f"MongoDB did not answer within {seconds:g} s: {_first_line(exc)}") from exc

    def server_time(self, timeout: float | None = None) -> datetime:
        """The server's clock (what leases are measured on), read now; ``timeout`` bounds the call (seconds).
        :attr:`clock` gives it without a command."""
        with _server_errors(), contextlib.ExitStack() as bounded:
            if timeout is not None:
                bounded.enter_context(pymongo.timeout(timeout))
            try:
                reply = self.db.command("hello")
            except PyMongoError as exc:
                if timeout is None or not exc.timeout:
                    raise
                raise ServerUnavailableError(f"MongoDB did not answer in time: {_first_line(exc)}") from exc
        now = reply.get("localTime")
        if not isinstance(now, datetime):
            return utcnow()
        return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)  # command() decodes naive UTC

    # -- jobs ------------------------------------------------------------------------------------------------------

    def insert_job(self, doc: Document, reserved: int | None = None) -> None:
        """Insert a new job. QueueFullError rather than evicting an unfinished job; nothing written on error.
        ``reserved``: the bytes ``reserve_job`` reserved for it already."""
        size = self.reserve_job(doc) if reserved is None else reserved
        try:
            with _server_errors():
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

    def reserve_job(self, doc: Document) -> int:
        """Room for ``doc`` in the job collection (QueueFullError when there is none); returns its size, to hand
        to ``insert_job`` or give back with ``unreserve_job``. Lets a caller know there is room before it acts
        (add_job_once cancels the job it replaces only then)."""
        size = job_size(doc)
        self.ensure()
        self._reserve(size)
        return size

    def unreserve_job(self, size: int) -> None:
        self._unreserve(size)

    # The ledger: a capped collection evicts its oldest documents once the next insert does not fit, and with one
    # document per job for its whole life the oldest may be a recurring job that never ends. So every insert
    # first reserves its bytes in the ledger document with a conditional $inc (atomic with any number of
    # producers): while the ledger stays within the cap, the server never evicts anything.
    #
    # A producer (a Store in one process) reserves ahead and spends what it reserved on its next jobs without a
    # ledger write: its first reservation is its job's size, each later one twice the one before, up to a chunk.
    # Room reserved ahead is first recorded as the producer's grant, ``{_id, bytes, expires}`` in the same
    # collection, ``expires`` on the server's clock; the producer spends it only until ROOM_GRANT_MARGIN_SECONDS
    # before then on its own monotonic clock, counted from before it asked. Unspent room is given back when the
    # producer is done (close(), or its process's exit), and a killed producer's by reconciliation once its grant
    # has expired: when the ledger says full, it is set to what the collection holds plus the unexpired grants
    # plus a margin for reservations in flight (see _reconcile), so room a live producer holds is never taken
    # from it, and room nobody holds is never lost for good. flush() keeps the ledger and reconciles it.
    #
    # Why no unfinished job is evicted: at every moment the ledger counts at least the bytes the collection
    # holds, plus the room each producer may still spend (counted since its $inc, and covered by its grant from
    # before that $inc until the producer stops spending it), plus the jobs reserved but not yet inserted (in a
    # grant, or at most a lone job of 1/ROOM_UNRECORDED_SHARE of the margin per producer, which the margin
    # covers). Inserts move bytes from reserved to held; frees delete first and give back after (a free in flight
    # is also within the margin); a reconciliation reads the grants before the collection (a job leaves its
    # grant only after it was inserted) and sets the ledger only if nobody changed it meanwhile; a kill leaves
    # bytes counted, never uncounted. The one assumption is time: a producer's insert reaches the server within
    # ROOM_GRANT_MARGIN_SECONDS of its decision to spend (a producer paused for longer may find its room taken).
    #
    # Only when reconciling does not help are finished jobs deleted to make room, and only while the collection
    # holds at least half of its cap (each freed byte is given back by the producer whose delete removed it);
    # otherwise the job is refused with QueueFullError saying what jobs hold and what producers reserved.

    def _reserve(self, size: int) -> None:
        limit = self._cap
        if not limit:
            return
        producer = self._current()
        with producer.lock:
            if time.monotonic() >= producer.until and producer.credit:
                # Past its grant: counted until a reconciliation gives it back. A producer this slow to spend
                # starts again from its job's size.
                producer.credit = producer.last = 0
            if producer.credit >= size:  # room this producer reserved already
                producer.credit -= size
                producer.pending += size
                return
            self._reserve_more(producer, size, limit)

    def _reserve_more(self, producer: _Producer, size: int, limit: int) -> None:
        for _ in range(ROOM_ATTEMPTS):
            # After the first reservation (the job's own size: a one-shot producer holds nothing it does not use),
            # a whole chunk while there is room (one ledger write per many jobs), the job's own size near full.
            grow = self._chunk if producer.last else 0
            if any(self._take(producer, size, want, limit) for want in sorted({max(size, grow), size}, reverse=True)):
                return
            # No room: the grant goes back to what it still covers.
            self._record(producer, producer.covered if producer.granted else 0)
            with _server_errors():
                ledger = self.room.find_one({"_id": "used"})
            if ledger is None:
                self._open_ledger()
                continue
            if size > limit:
                raise QueueFullError(f"a {size} byte job does not fit in job collection {self.job_queue!r} at all")
            counted = int(ledger["bytes"])
            if counted + size <= limit:
                continue  # there is room: our reservation raced the ledger's creation (or a release); try again
            room = self._reconcile(counted, limit)
            if room.corrected:
                continue
            half = room.held * 2 >= limit  # below half full, deleting finished jobs is no answer
            if half and self._free(counted + size - limit):
                continue
            why = "no finished job is left to delete" if half else "finished jobs are deleted only from half full"
            raise QueueFullError(
                f"job collection {self.job_queue!r} has no room for a {size} byte job: jobs hold {room.held} bytes "
                f"and producers reserved {max(0, counted - room.held)} bytes more, of a {limit} byte cap "
                f"(unexpired grants of producers: {room.granted} bytes); {why}: raise job_queue_size"
            )
        raise QueueFullError(f"job collection {self.job_queue!r} has no room for a {size} byte job (busy producers)")

    def _take(self, producer: _Producer, size: int, want: int, limit: int) -> bool:
        """Reserve ``want`` bytes for a ``size`` byte job (the rest for later jobs). Recorded in the producer's
        grant first, with what it holds already (its grant then says all it may still spend), unless it is a lone
        job small enough for the reconciliation margin to cover while it is in flight (a one-shot producer's)."""
        cover = producer.covered + want
        recorded = cover > size or size > self._unrecorded
        asked = time.monotonic()  # before the grant's expiry is set on the server
        self._record(producer, cover if recorded else 0)
        with _server_errors():
            done = self.room.update_one({"_id": "used", "bytes": {"$lte": limit - want}}, {"$inc": {"bytes": want}})
        if done.modified_count != 1:
            return False
        producer.last = want
        if recorded:
            producer.until = asked + ROOM_GRANT_SECONDS - ROOM_GRANT_MARGIN_SECONDS
            producer.credit += want - size
            producer.pending += producer.bare + size
            producer.bare = 0
        else:
            producer.bare += size
        return True

    def _record(self, producer: _Producer, cover: int) -> None:
        """Make the producer's grant say ``cover`` bytes, expiring ROOM_GRANT_SECONDS from now on the server's
        clock (no grant at all for 0)."""
        if cover > 0:
            stage = {"bytes": literal(cover), "expires": {"$add": [SERVER_NOW, ROOM_GRANT_SECONDS * 1000.0]}}
            with _server_errors():
                self.room.update_one({"_id": producer.grant}, [{"$set": stage}], upsert=True)
            producer.granted = cover
            _PRODUCERS.add(self)
        elif producer.granted:
            with _server_errors():
                self.room.delete_one({"_id": producer.grant})
            producer.granted = 0

    def _landed(self, size: int) -> None:
        """An insert of a reserved job is over (written, or unknown): its bytes are the collection's now."""
        if not self._cap:
            return
        producer = self._current()
        with producer.lock:
            if producer.bare:
                producer.bare = max(0, producer.bare - size)
            else:
                producer.pending = max(0, producer.pending - size)

    def _unreserve(self, size: int) -> None:
        """A reserved job will not be inserted: its room is kept for this producer's next job while its grant
        covers it, else given back to the ledger."""
        if not self._cap:
            return
        producer = self._current()
        with producer.lock:
            if producer.bare:  # reserved in no grant (so are all this producer's jobs in flight)
                producer.bare = max(0, producer.bare - size)
                with _server_errors():
                    self.room.update_one({"_id": "used", "bytes": {"$gte": size}}, {"$inc": {"bytes": -size}})
                return
            producer.pending = max(0, producer.pending - size)
            if time.monotonic() < producer.until:
                producer.credit += size

    def give_back(self, timeout: float | None = None) -> None:
        """Give back the room this producer reserved and did not use (its owner is done adding jobs; a process's
        exit does it too). Never raises: room it cannot give back stays counted until a reconciliation (after its
        grant has expired). ``timeout`` bounds the wait (seconds)."""
        producer = self._producer
        if not self._cap or producer.pid != os.getpid():  # a forked child holds none of its parent's room
            return
        if not producer.lock.acquire(timeout=-1 if timeout is None else timeout):
            return
        try:
            give = producer.credit if time.monotonic() < producer.until else 0
            producer.credit, producer.until, producer.last = 0, 0.0, 0
            with contextlib.ExitStack() as bounded, contextlib.suppress(PyMongoError, TaskSchedulerError):
                if timeout is not None:
                    bounded.enter_context(pymongo.timeout(timeout))
                if give:  # the ledger first, then the grant (a reconciliation between counts it twice, not never)
                    with _server_errors():
                        self.room.update_one({"_id": "used", "bytes": {"$gte": give}}, {"$inc": {"bytes": -give}})
                self._record(producer, producer.covered if producer.granted else 0)
        finally:
            producer.lock.release()

    def _current(self) -> _Producer:
        if self._producer.pid != os.getpid():  # a forked child: the room reserved is the parent's to spend
            self._producer = _Producer()
        return self._producer

    def _reconcile(self, counted: int, limit: int) -> _Reconciled:
        """Give back bytes the ledger counts but neither the collection nor any producer holds (a producer that
        died between its reservation and its insert, or whose insert failed unseen; room a killed producer was
        granted and can no longer spend; the jobs a flush dropped): the ledger becomes what the collection holds,
        plus the unexpired grants, plus a margin for reservations in flight recorded in no grant.
        ``corrected``: the ledger changed (by this call, or by another producer meanwhile), look again."""
        granted = self._granted()  # before the collection: a job leaves its grant only once inserted
        with _server_errors():
            held = int(self.db.command("collStats", self.job_queue).get("size", 0))
        corrected = held + granted + _reconcile_margin(limit)
        if corrected >= counted:
            return _Reconciled(held, granted, False)
        with _server_errors():
            done = self.room.update_one({"_id": "used", "bytes": counted}, {"$set": {"bytes": corrected}})
        if done.modified_count:
            logger.warning(f"room ledger of {self.job_queue!r} corrected from {counted} to {corrected} bytes")
        return _Reconciled(held, granted, True)

    def _granted(self) -> int:
        """Bytes of the grants not yet expired on the server's clock (served by the ``expires_ttl`` index)."""
        now = self.server_time()
        with _server_errors():
            found = list(
                self.room.aggregate(
                    [{"$match": {"expires": {"$gt": now}}}, {"$group": {"_id": None, "bytes": {"$sum": "$bytes"}}}]
                )
            )
        return int(found[0]["bytes"]) if found else 0

    def _open_ledger(self) -> None:
        """Start the ledger from what the collection holds and the grants say (a collection created by an
        older version)."""
        granted = self._granted()
        with _server_errors():
            used = int(self.db.command("collStats", self.job_queue).get("size", 0)) + granted
            with contextlib.suppress(DuplicateKeyError):
                self.room.update_one({"_id": "used"}, {"$setOnInsert": {"bytes": used}}, upsert=True)

    def _free(self, needed: int) -> bool:
        """Delete finished jobs until ``needed`` bytes are free; False when there are not enough of them."""
        raw = self.jobs.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
        finished = {"status": {"$in": [int(s) for s in JobStatus if s.is_terminal]}}
        freed = 0
        with _server_errors():
            for doc in raw.find(finished).limit(ROOM_FREE_BATCH):
                size = len(doc.raw)
                if self.jobs.delete_one({"_id": doc["_id"], **finished}).deleted_count == 1:
                    self.room.update_one({"_id": "used"}, {"$inc": {"bytes": -size}})
                    freed += size
                if freed >= needed:
                    return True
        return freed > 0

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

    def newest_jobs(self, query: Mapping[str, Any], limit: int) -> list[Document]:
        """The newest ``limit`` jobs matching ``query`` (newest first: ids grow with time)."""
        with _server_errors():
            return list(self.jobs.find(dict(query)).sort("_id", DESCENDING).limit(limit))

    def count_jobs(self, query: Mapping[str, Any]) -> int:
        with _server_errors():
            return int(self.jobs.count_documents(dict(query)))

    def once_holder(self, key: str) -> Document | None:
        """Who holds an add_job_once key: ``{_id: key, job, since}``, or None."""
        with _server_errors():
            return self.once.find_one({"_id": key})

    def take_once(
        self, key: str, job_id: ObjectId, holder: ObjectId | None, since: datetime | None = None
    ) -> bool:
        """Make ``job_id`` hold ``key`` if ``holder`` still holds it (None: nobody) and, with ``since``, still
        since then (so a caller acts on the hold it read, not one renewed meanwhile, as a requeue renews it); of
        racing callers one wins. ``since`` is the server's time, so a producer's clock never decides when a key
        counts as abandoned."""
        stage = {"job": literal(job_id), "since": SERVER_NOW, "inserted": literal(False)}
        query: Document = {"_id": key, "job": holder}
        if since is not None:
            query["since"] = since
        with _server_errors():
            try:
                done = self.once.update_one(query, [{"$set": stage}], upsert=holder is None)
            except DuplicateKeyError:
                return False  # someone holds it now
        return done.modified_count == 1 or done.upserted_id is not None

    def confirm_once(self, key: str, job_id: ObjectId) -> bool:
        """The job holding ``key`` is stored; False when someone took the key over meanwhile."""
        with _server_errors():
            done = self.once.update_one({"_id": key, "job": job_id}, {"$set": {"inserted": True}})
        return done.matched_count == 1

    def release_once(self, key: str, job_id: ObjectId) -> None:
        with _server_errors():
            self.once.delete_one({"_id": key, "job": job_id})

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
        with _server_errors():
            result = self.jobs.update_one({"_id": job_id}, [{"$set": stage}])
        return result.modified_count == 1

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
        with _server_errors():
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
        """Store progress; with ``owner`` only while that worker owns the job. ``wait`` bounds the call (seconds)."""
        expect: Document
        if owner is not None:
            expect = {"status": int(JobStatus.PROCESSING), "worker": owner}
        else:
            expect = {"status": {"$lt": int(JobStatus.DONE)}}
        with _server_errors(), pymongo.timeout(wait):
            result = self.jobs.update_one({"_id": job_id, **expect}, {"$set": {"progress": float(progress)}})
        return result.matched_count == 1

    def orphans(self, now: datetime) -> list[Document]:
        """PROCESSING jobs whose lease ended before ``now`` (the server's time)."""
        with _server_errors():
            return list(self.jobs.find({"status": int(JobStatus.PROCESSING), "expires": {"$lt": now}}))

    def scan(self, statuses: tuple[int, ...]) -> Iterator[Document]:
        """Jobs in the given statuses (queue start-up and resync). Unsorted: the worker manager orders them by
        priority in memory, so no index has to follow every status write for their order."""
        with _server_errors():
            yield from self.jobs.find({"status": {"$in": [int(s) for s in statuses]}})

    # -- the node registry -----------------------------------------------------------------------------------------

    def register_node(self, node_id: ObjectId, facts: Mapping[str, Any], lifetime: float) -> None:
        """Write (or refresh) a queue node's registry entry, alive on the server's clock for ``lifetime`` s."""
        stage = {**{name: literal(value) for name, value in facts.items()}, "alive": SERVER_NOW}
        stage["expires"] = lease_end(lifetime)
        with _server_errors():
            self.nodes.update_one({"_id": node_id}, [{"$set": stage}], upsert=True)

    def unregister_node(self, node_id: ObjectId) -> None:
        with _server_errors():
            self.nodes.delete_one({"_id": node_id})

    def jobs_of_workers(self, workers: Iterable[ObjectId]) -> list[Document]:
        """PROCESSING jobs owned by any of these workers."""
        with _server_errors():
            return list(self.jobs.find({"status": int(JobStatus.PROCESSING), "worker": {"$in": list(workers)}}))

    def live_nodes(self) -> list[Document]:
        """Registry entries not yet expired on the server's clock (TTL deletes them only every minute)."""
        now = self.server_time()
        with _server_errors():
            return list(self.nodes.find({"expires": {"$gt": now}}).sort("started", ASCENDING))

    # -- what an operator asks -------------------------------------------------------------------------------------

    def job_counts(self) -> list[Document]:
        """How many jobs there are per class and status: ``{"class", "status", "count"}`` each."""
        pipeline: list[Document] = [
            {"$group": {"_id": {"class": "$class", "status": "$status"}, "count": {"$sum": 1}}},
        ]
        with _server_errors():
            return [
                # A group key leaves out a field the documents lack (a malformed job): None, never a KeyError.
                {"class": d["_id"].get("class"), "status": d["_id"].get("status"), "count": d["count"]}
                for d in self.jobs.aggregate(pipeline)
            ]

    def oldest_waiting(self) -> Document | None:
        with _server_errors():
            return self.jobs.find_one({"status": int(JobStatus.WAITING)}, sort=[("_id", ASCENDING)])

    def waiting_classes(self) -> list[str]:
        with _server_errors():
            return sorted(str(c) for c in self.jobs.distinct("class", {"status": int(JobStatus.WAITING)}))

    def run_ends_since(self, since: datetime) -> list[Document]:
        """Events of runs that ended since ``since`` (found by their ids, which start with their time)."""
        ends = [int(s) for s in JobStatus if s.is_terminal]
        with _server_errors():
            return list(
                self.events.find(
                    {"_id": {"$gte": ObjectId.from_datetime(since)}, "status": {"$in": ends}},
                    {"status": 1, "time": 1, "class": 1},
                )
            )

    # -- events ----------------------------------------------------------------------------------------------------

    @staticmethod
    def event(
        job: Mapping[str, Any],
        status: int,
        worker: ObjectId | None = None,
        *,
        error: Mapping[str, Any] | None = None,
        result: Any = None,
        has_result: bool = False,
        time: datetime | None = None,
        started: datetime | None = None,
        event_id: ObjectId | None = None,
        end: ObjectId | None = None,
        sweep: datetime | None = None,
    ) -> Document:
        """An event document: one status change of a job (with its error or result). ``sweep``: the lease end
        of a run another node put back (a release that counts as an orphaning until its owner vouches)."""
        event: Document = {
            "_id": event_id or ObjectId(),
            "job": job["_id"],
            "class": job.get("class"),
            "run": int(job.get("run", 1)),
            "status": int(status),
            "time": time or utcnow(),
            "worker": worker,
        }
        if started is not None:
            event["started"] = started
            event["ended"] = event["time"]
        if end is not None:
            event["end"] = end  # written by the end of a run: withdrawn if that end is never recorded
        if sweep is not None:
            event["sweep"] = {"expires": sweep, "back": False}  # "back" becomes True in place (same size)
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

    def delete_events(self, ids: Iterable[ObjectId]) -> None:
        with _server_errors():
            self.events.delete_many({"_id": {"$in": list(ids)}})

    def delete_unrecorded_events(self, job_id: ObjectId, run: int, worker: ObjectId, keep: Any) -> int:
        """Withdraw what a worker wrote about ending ``run`` that was never recorded: its end events of that run
        (other than ``keep``, the job's recorded outcome) and the next-run events written with them. Looked up
        by the job's index, then deleted by id. Returns how many were withdrawn."""
        ends = (JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED)
        with _server_errors():
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
        with _server_errors():
            return self.events.find_one({"_id": event_id})

    def job_events(self, job_id: ObjectId) -> list[Document]:
        """Every event of a job, oldest first."""
        with _server_errors():
            return list(self.events.find({"job": job_id}).sort([("run", ASCENDING), ("time", ASCENDING)]))

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
        with _server_errors():
            return self.events.update_many({"_id": {"$in": ids}}, {"$set": {"sweep.back": True}}).modified_count

    def _sweeps(self, job_id: ObjectId, run: int) -> list[Document]:
        # The few events of one run, by the job's index alone, filtered here: some planners (the test server's)
        # scan the collection for a filter with a field the index lacks.
        with _server_errors():
            found = self.events.find({"job": job_id, "run": run}, {"worker": 1, "sweep": 1, "time": 1})
            return [e for e in found if isinstance(e.get("sweep"), dict)]

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
        self.check_deployment()
        return StatusFeed(self, ids, query, lookup or bool(query), statuses)

    # -- metrics and the dashboard (issue 12): reads only, each served by an index -------------------------------

    def waiting_counts(self) -> list[Document]:
        """Waiting and postponed jobs per class: ``{"class", "status", "count"}`` each (a node's metrics).
        The match is served by the ``status_expires`` index; only jobs not yet run are grouped. A status stored
        as another number type (0.0, a long, a decimal) is no status (a malformed job, SPEC 2): not counted (left
        out here: a ``$type`` in the match would cost some planners the index)."""
        pipeline: list[Document] = [
            {"$match": {"status": {"$in": [int(JobStatus.WAITING), int(JobStatus.POSTPONED)]}}},
            {"$group": {"_id": {"class": "$class", "status": "$status"}, "count": {"$sum": 1}}},
        ]
        with _server_errors():
            return [
                # A group key leaves out a field the documents lack (a malformed job): None, never a KeyError.
                {"class": d["_id"].get("class"), "status": d["_id"].get("status"), "count": d["count"]}
                for d in self.jobs.aggregate(pipeline)
                if type(d["_id"].get("status")) is int
            ]

    def status_counts(self) -> dict[int, int]:
        """Jobs per status, every status present (the dashboard). One count per status, each answered from the
        ``status_expires`` index alone, where one grouping would read every document."""
        with _server_errors():
            return {int(s): int(self.jobs.count_documents({"status": int(s)})) for s in JobStatus}

    def recent_run_events(self, job_id: ObjectId, limit: int) -> tuple[list[Document], int]:
        """The events of a job's newest ``limit`` ended runs, oldest first (with the next-run announcements that
        tell which end of a run counted), and how many runs of the job ended (a job page). Both are served by the
        ``job_run`` index: the run numbers are read newest first and only until ``limit`` of them are found."""
        ends = [int(s) for s in JobStatus if s.is_terminal]
        ended = {"job": job_id, "status": {"$in": ends}}
        runs: list[int] = []
        with _server_errors():
            cursor = self.events.find(ended, {"run": 1}).sort("run", DESCENDING).batch_size(max(limit, 1) + 1)
            try:
                for event in cursor:
                    run = int(event.get("run", 0))
                    if not runs or run != runs[-1]:
                        if len(runs) == limit:
                            break
                        runs.append(run)
            finally:
                cursor.close()
            if not runs:
                return [], 0
            events = list(
                self.events.find({"job": job_id, "run": {"$gte": runs[-1]}}).sort(
                    [("run", ASCENDING), ("time", ASCENDING)]
                )
            )
            total = len(runs)
            if len(runs) == limit:  # maybe more: count the distinct run numbers on the server
                counted = list(
                    self.events.aggregate([{"$match": ended}, {"$group": {"_id": "$run"}}, {"$count": "runs"}])
                )
                total = int(counted[0]["runs"]) if counted else total
        return events, total

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
                    },
                    # What tells this change from others of the job, from the change itself where it carries
                    # it (a late lookup shows a later state): see events._change_key.
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
                raise InvalidArgumentError(f"invalid job query {dict(query)!r}: {_first_line(exc)}") from exc
            raise

    def _open(self) -> None:
        with _server_errors():
            self._stream = self.store.db.watch(
                self.pipeline,
                full_document="updateLookup" if self.lookup else None,
                resume_after=self.token,
                max_await_time_ms=STREAM_AWAIT_MS,
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
        changed = [
            {f"updateDescription.updatedFields.{name}": {"$exists": True}} for name in ("status", "progress")
        ]
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


def job_size(doc: Mapping[str, Any]) -> int:
    """The BSON size of a job document; InvalidArgumentError (naming the size and the limit) over
    :data:`MAX_JOB_SIZE`, before anything is written."""
    size = len(_encode_document(doc))
    if size > MAX_JOB_SIZE:
        raise InvalidArgumentError(
            f"job {doc.get('_id')} is {size} bytes as stored, over the job limit of {MAX_JOB_SIZE} bytes (15 MB: "
            "a change event carries the whole job, and MongoDB fails events over 16 MB); "
            "pass large payloads by reference (docs/jobs.md, Large payloads)"
        )
    return size


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
        raise ServerUnavailableError(f"cannot reach MongoDB: {_first_line(exc)}") from exc
    except OperationFailure as exc:
        if exc.code in (13, 18):  # Unauthorized, AuthenticationFailed: the deployment will not serve us
            raise ConfigurationError(
                f"MongoDB refused access: {_first_line(exc)} (check the URI's credentials)"
            ) from exc
        raise


def _first_line(exc: BaseException) -> str:
    """The useful start of a driver message (without its topology description, which runs over lines)."""
    text = str(exc).split(", Timeout:")[0].split(" (configured timeouts")[0]
    return text.splitlines()[0] if text else type(exc).__name__
