"""The collections of one job queue: the deployment check, creating them and their indexes, the server's clock."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pymongo
from bson import CodecOptions
from pymongo import ASCENDING, IndexModel
from pymongo.database import Database
from pymongo.errors import CollectionInvalid, OperationFailure, PyMongoError

from ...clock import ServerClock
from ...constants import NODE_REGISTRY, JobStatus
from ...errors import ConfigurationError, ServerUnavailableError
from .connection import first_line, server_errors
from .documents import Document, utcnow

#: Oldest MongoDB served: deletes from capped collections (the room ledger frees finished jobs) need 5.0.7.
MIN_SERVER_VERSION = (5, 0, 7)


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


#: Longest an attempt of :meth:`Deployment.wait_until_ready` may take (server selection would take its own 30 s),
#: and the least when less time is left.
WAIT_ATTEMPT_SECONDS = (2.0, 0.5)
#: Pause between two attempts of :meth:`Deployment.wait_until_ready`.
WAIT_PAUSE_SECONDS = 1.0
#: How often :meth:`Deployment.wait_until_ready` says again what it is waiting for.
WAIT_REPORT_SECONDS = 10.0


@dataclass(frozen=True)
class _Problem:
    """Why a deployment cannot serve: what to say, whether waiting may cure it, whether the server answered."""

    message: str
    passing: bool = False
    reachable: bool = True


def deployment_problem(hello: Mapping[str, Any], version: str, where: str, *, primary: bool) -> _Problem | None:
    """Judge a server's ``hello`` reply and version (pure). A member started with ``--replSet`` that nobody
    initiated yet says ``isreplicaset`` without a ``setName``; one whose set has no primary yet has a
    ``setName`` but is not ``isWritablePrimary``: both pass with time. A server that is no replica set never
    becomes one, nor does an old one become new."""
    sharded = hello.get("msg") == "isdbgrid"
    if not sharded and not hello.get("setName"):
        if hello.get("isreplicaset"):
            return _Problem(
                f"MongoDB at {where} is a replica set member whose set is not initiated yet (rs.initiate())",
                passing=True,
            )
        return _Problem(
            f"MongoDB at {where} is not a replica set, and change streams need one "
            "(a single member is fine: start mongod with --replSet rs0, then run rs.initiate() once)"
        )
    found = tuple(int(part) for part in (version.split("-")[0].split(".") + ["0", "0"])[:3] if part.isdigit())
    if found < MIN_SERVER_VERSION:
        floor = ".".join(map(str, MIN_SERVER_VERSION))
        return _Problem(f"MongoDB at {where} is version {version}; taskscheduler needs {floor} or newer")
    if primary and not sharded and not (hello.get("isWritablePrimary") or hello.get("ismaster")):
        return _Problem(
            f"MongoDB at {where} is a member of replica set {hello.get('setName')!r} with no primary yet",
            passing=True,
        )
    return None


class Deployment:
    """The collections, their creation and indexes, and the server's clock; the other parts of the store build
    on it."""

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
        #: The server's clock, for every time this process decides or stores (schedules never use ours).
        self.clock = ServerClock(self.server_time)
        self._start()

    def _start(self) -> None:
        """Set up what a part of the store keeps per instance (the room ledger, its producer's state)."""

    # -- collections and indexes -------------------------------------------------------------------------------

    def check_deployment(self) -> None:
        """ConfigurationError unless the server is a replica set (or a sharded cluster) of a supported version:
        change streams need one, and an answer up front beats a failure deep inside later."""
        if self._checked:
            return
        found = self._deployment_problem(primary=False)
        if found is not None:
            raise ConfigurationError(found.message)
        self._checked = True

    def wait_until_ready(self, seconds: float, waiting: Callable[[str], None]) -> None:
        """:meth:`check_deployment`, tried again for up to ``seconds`` while waiting may cure what it finds, and
        until a primary can take writes: the server does not answer yet, its member was started as a replica set
        that nobody initiated yet, or the set has not elected a primary yet. That is how a deployment comes up
        (a container's MongoDB and its queue nodes start together; ``rs.initiate()`` runs a moment later).

        ``waiting(reason)`` is told what it waits for when that changes, and every :data:`WAIT_REPORT_SECONDS`.
        What waiting cannot cure (not a replica set at all, a server too old, access refused) raises at once, as
        :meth:`check_deployment` does. Past ``seconds``: ServerUnavailableError (still unreachable) or
        ConfigurationError (up, but not serving), naming the last reason and the time waited."""
        deadline = time.monotonic() + seconds
        said, said_at = "", 0.0
        while True:
            left = deadline - time.monotonic()
            try:
                longest, least = WAIT_ATTEMPT_SECONDS
                with pymongo.timeout(max(min(left, longest), least)):
                    found = self._deployment_problem(primary=True)
            except ServerUnavailableError as exc:
                found = _Problem(first_line(exc), passing=True, reachable=False)
            except PyMongoError as exc:
                if not getattr(exc, "timeout", False):
                    raise
                found = _Problem(f"cannot reach MongoDB: {first_line(exc)}", passing=True, reachable=False)
            if found is None:
                self._checked = True
                return
            if not found.passing:
                raise ConfigurationError(found.message)
            left = deadline - time.monotonic()
            if left <= 0:
                gave_up = f"{found.message} (waited {seconds:g} s for it to come up)"
                raise (ConfigurationError if found.reachable else ServerUnavailableError)(gave_up)
            now = time.monotonic()
            if found.message != said or now - said_at >= WAIT_REPORT_SECONDS:
                waiting(f"waiting for MongoDB: {found.message}; giving up in {left:.0f} s")
                said, said_at = found.message, now
            time.sleep(min(WAIT_PAUSE_SECONDS, left))

    def _deployment_problem(self, *, primary: bool) -> _Problem | None:
        """What keeps the deployment from serving us (None: nothing), from its ``hello`` and version.
        ``primary``: a member that cannot take writes yet counts too (what a queue node needs)."""
        with server_errors():
            hello = self.db.command("hello")
            version = str(self.db.client.server_info().get("version", "0"))
        where = ", ".join(f"{host}:{port}" for host, port in self.db.client.nodes) or "the server"
        return deployment_problem(hello, version, where, primary=primary)

    def ensure(self) -> None:
        """Create both collections and their named indexes (idempotent, once per Store)."""
        if self._ready:
            return
        self.check_deployment()
        self._create(self.job_queue, self.job_queue_size)
        self._create(self.event_queue, self.event_queue_size)
        # A flush in another process drops the collection and creates it again: read between the two, it is missing
        # (or a writer's insert made it an ordinary one for a moment). A producer configured capped then counts its
        # room as capped all the same: taken for uncapped, it would never reserve room again, and once the flush
        # had created the collection capped its adds would make the server evict unfinished jobs.
        self._cap = self._capped_size(self.job_queue) or self.job_queue_size
        self._sized(self._cap)
        job_indexes = [
            IndexModel([("status", ASCENDING), ("expires", ASCENDING)], name="status_expires"),
            IndexModel([("class", ASCENDING), ("status", ASCENDING)], name="class_status"),
            IndexModel([("class", ASCENDING), ("key", ASCENDING), ("status", ASCENDING)], name="class_key_status"),
            IndexModel([("data.parent", ASCENDING), ("status", ASCENDING)], name="parent_status"),
            # The jobs depending on a job (SPEC 8), to cancel when it fails (a job without any: one key, [])
            IndexModel([("options.depends_on", ASCENDING), ("status", ASCENDING)], name="depends_on_status"),
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
        else:  # the dashboard's trends read the run ends of a window of time (the TTL index serves them otherwise)
            event_indexes.append(IndexModel([("time", ASCENDING)], name="time"))
        with server_errors():
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

    def _sized(self, cap: int) -> None:
        """The job collection's real cap is known (the room ledger sizes its reservations by it)."""

    def _capped_size(self, name: str) -> int:
        """The bytes a capped collection holds before it evicts (0 when not capped), as created: whatever this
        producer's own ``job_queue_size`` says, the collection's real cap is what eviction follows."""
        with server_errors():
            found = list(self.db.list_collections(filter={"name": name}))
        options = found[0].get("options", {}) if found else {}
        return int(options.get("size", 0)) if options.get("capped") else 0

    def _create(self, name: str, size: int) -> None:
        try:
            with server_errors():
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
            raise ServerUnavailableError(f"MongoDB did not answer within {seconds:g} s: {first_line(exc)}") from exc

    def server_time(self, timeout: float | None = None) -> datetime:
        """The server's clock (what leases are measured on), read now; ``timeout`` bounds the call (seconds).
        :attr:`clock` gives it without a command."""
        with server_errors(), contextlib.ExitStack() as bounded:
            if timeout is not None:
                bounded.enter_context(pymongo.timeout(timeout))
            try:
                reply = self.db.command("hello")
            except PyMongoError as exc:
                if timeout is None or not exc.timeout:
                    raise
                raise ServerUnavailableError(f"MongoDB did not answer in time: {first_line(exc)}") from exc
        now = reply.get("localTime")
        if not isinstance(now, datetime):
            return utcnow()
        return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)  # command() decodes naive UTC
