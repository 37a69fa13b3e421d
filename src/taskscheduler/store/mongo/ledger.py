"""The room ledger of a capped job collection: no insert ever makes the server evict an unfinished job."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import pymongo
from bson import CodecOptions, ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from ...constants import JobStatus
from ...errors import QueueFullError, TaskSchedulerError
from .connection import server_errors
from .deployment import Deployment
from .documents import SERVER_NOW, Document, job_size, literal

logger = logging.getLogger("taskscheduler.store")

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
_PRODUCERS: weakref.WeakSet[RoomLedger] = weakref.WeakSet()


@atexit.register
def _give_back_at_exit() -> None:
    for store in list(_PRODUCERS):
        with contextlib.suppress(Exception):  # never fail an exit
            store.give_back(ROOM_EXIT_SECONDS)



class RoomLedger(Deployment):
    """Reserving room before an insert, giving back what a producer did not use, freeing finished jobs."""

    def _start(self) -> None:
        super()._start()
        self._chunk = 0  # most bytes reserved at once (see _reserve)
        self._unrecorded = 0  # largest lone reservation recorded in no grant (see _take)
        self._producer = _Producer()  # the room this producer reserved

    def _sized(self, cap: int) -> None:
        self._chunk = min(ROOM_CHUNK_BYTES, cap // 1024)
        self._unrecorded = _reconcile_margin(cap) // ROOM_UNRECORDED_SHARE

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
            with server_errors():
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
        with server_errors():
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
            with server_errors():
                self.room.update_one({"_id": producer.grant}, [{"$set": stage}], upsert=True)
            producer.granted = cover
            _PRODUCERS.add(self)
        elif producer.granted:
            with server_errors():
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
                with server_errors():
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
                    with server_errors():
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
        with server_errors():
            held = int(self.db.command("collStats", self.job_queue).get("size", 0))
        corrected = held + granted + _reconcile_margin(limit)
        if corrected >= counted:
            return _Reconciled(held, granted, False)
        with server_errors():
            done = self.room.update_one({"_id": "used", "bytes": counted}, {"$set": {"bytes": corrected}})
        if done.modified_count:
            logger.warning(f"room ledger of {self.job_queue!r} corrected from {counted} to {corrected} bytes")
        return _Reconciled(held, granted, True)

    def _granted(self) -> int:
        """Bytes of the grants not yet expired on the server's clock (served by the ``expires_ttl`` index)."""
        now = self.server_time()
        with server_errors():
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
        with server_errors():
            used = int(self.db.command("collStats", self.job_queue).get("size", 0)) + granted
            with contextlib.suppress(DuplicateKeyError):
                self.room.update_one({"_id": "used"}, {"$setOnInsert": {"bytes": used}}, upsert=True)

    def _free(self, needed: int) -> bool:
        """Delete finished jobs until ``needed`` bytes are free; False when there are not enough of them."""
        raw = self.jobs.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
        finished = {"status": {"$in": [int(s) for s in JobStatus if s.is_terminal]}}
        freed = 0
        with server_errors():
            for doc in raw.find(finished).limit(ROOM_FREE_BATCH):
                size = len(doc.raw)
                if self.jobs.delete_one({"_id": doc["_id"], **finished}).deleted_count == 1:
                    self.room.update_one({"_id": "used"}, {"$inc": {"bytes": -size}})
                    freed += size
                if freed >= needed:
                    return True
        return freed > 0
