"""The room ledger of a capped job collection (SPEC section 5): no unfinished job is ever evicted, across flush()
and with short-lived producers; room a producer reserved and did not use is never lost for good; no finished job
is deleted to make room while the collection is less than half full."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import AutoReconnect

from helpers import TESTS_DIR, claim
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import DEFAULT_JOB_QUEUE
from taskscheduler.errors import QueueFullError, ServerUnavailableError
from taskscheduler.ops.embedded import EmbeddedServer

NOOP = "sample_jobs:Noop"
PAD = {"pad": "p" * 400}

#: A producer in another process: adds ``before`` jobs (so it holds unspent room), says "ready", then on "fill"
#: adds jobs until the collection is full, printing each id; exits without closing anything.
PRODUCER = """
import sys
from pymongo import MongoClient
from taskscheduler import Scheduler
from taskscheduler.errors import QueueFullError

uri, name, cap, chunk, before = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
client = MongoClient(uri)
scheduler = Scheduler(client[name], options={"job_queue_size": cap})
scheduler.store.ensure()
if chunk:
    scheduler.store._chunk = chunk
for _ in range(before):
    scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 400})
print("ready", flush=True)
if sys.stdin.readline().strip() == "fill":
    for _ in range(10_000):
        try:
            print(scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 400}).id, flush=True)
        except QueueFullError:
            break
print("done", flush=True)
"""


def producer(db: Database[dict[str, Any]], cap: int, chunk: int = 0) -> Scheduler:
    """A Scheduler on a capped collection of ``cap`` bytes; ``chunk`` scales its largest reservation to the small
    cap a test uses (the default is 1/1024 of the cap, too small to hold room worth testing)."""
    scheduler = Scheduler(db, options={"job_queue_size": cap})
    scheduler.store.ensure()
    if chunk:
        scheduler.store._chunk = chunk
    return scheduler


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))


CLI = [sys.executable, "-m", "taskscheduler"]


def cli_env(server: EmbeddedServer, db_name: str, cap: int) -> dict[str, str]:
    return dict(
        env(),
        TASKSCHEDULER_MONGODB_URI=server.uri,
        TASKSCHEDULER_DATABASE=db_name,
        TASKSCHEDULER_JOB_QUEUE_SIZE=str(cap),
    )


def spawn(server: EmbeddedServer, db_name: str, cap: int, chunk: int, before: int) -> subprocess.Popen[str]:
    args = [server.uri, db_name, str(cap), str(chunk), str(before)]
    return subprocess.Popen(
        [sys.executable, "-c", PRODUCER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env(),
    )


def ledger(db: Database[dict[str, Any]]) -> int:
    found = db[f"{DEFAULT_JOB_QUEUE}.room"].find_one({"_id": "used"})
    return int(found["bytes"]) if found else 0


def held(db: Database[dict[str, Any]]) -> int:
    return int(db.command("collStats", DEFAULT_JOB_QUEUE)["size"])


def fill(producers: list[Scheduler]) -> list[ObjectId]:
    """Every producer adds jobs, in turn, until each is refused."""
    added: list[ObjectId] = []
    active = list(producers)
    while active:
        for scheduler in list(active):
            try:
                added.append(scheduler.add_job(NOOP, PAD).id)
            except QueueFullError:
                active.remove(scheduler)
    return added


def missing(db: Database[dict[str, Any]], added: list[ObjectId]) -> list[ObjectId]:
    waiting = {d["_id"] for d in db[DEFAULT_JOB_QUEUE].find({"status": int(JobStatus.WAITING)}, {"_id": 1})}
    return [job for job in added if job not in waiting]


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_room_producers_hold_across_another_flush_never_evicts_an_unfinished_job(
    server: EmbeddedServer, db: Database[dict[str, Any]], db_name: str, children: list[subprocess.Popen[str]]
) -> None:
    cap, chunk = 256 * 1024, 16 * 1024
    # Producers in this process and in two others hold room they reserved and have not used yet.
    local = [producer(db, cap, chunk) for _ in range(6)]
    for scheduler in local:
        for _ in range(12):
            scheduler.add_job(NOOP, PAD)
    children.extend(spawn(server, db_name, cap, chunk, 12) for _ in range(2))
    assert [proc.stdout.readline().strip() for proc in children if proc.stdout] == ["ready", "ready"]
    assert ledger(db) > held(db)  # unspent room is counted

    # An operator flushes, from another process.
    flushed = subprocess.run(
        [*CLI, "flush", "--yes"], env=cli_env(server, db_name, cap), capture_output=True, text=True, timeout=60
    )
    assert flushed.returncode == 0, flushed.stderr

    added: list[ObjectId] = []
    for proc in children:  # the other processes fill the collection...
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("fill\n")
        proc.stdin.flush()
        lines = [line.strip() for line in iter(proc.stdout.readline, "")]
        assert lines[-1] == "done"
        added.extend(ObjectId(line) for line in lines[:-1])
    added.extend(fill(local))  # ...then these spend what they held from before the flush
    lost = missing(db, added)
    assert not lost, f"{len(lost)} of {len(added)} WAITING jobs added after the flush were evicted"
    assert held(db) > cap // 2  # the room was there to fill: the flush gave it back


def test_reconciling_the_ledger_counts_the_room_other_producers_hold(db: Database[dict[str, Any]]) -> None:
    cap, chunk = 256 * 1024, 16 * 1024
    holders = [producer(db, cap, chunk) for _ in range(8)]
    added = [scheduler.add_job(NOOP, PAD).id for scheduler in holders for _ in range(20)]
    # A producer killed between its reservation and its insert left the ledger counting room nothing holds: the
    # next producer to find it full reconciles it with the collection.
    db[f"{DEFAULT_JOB_QUEUE}.room"].update_one({"_id": "used"}, {"$set": {"bytes": cap}})
    added += fill([producer(db, cap, chunk), *holders])  # the holders spend their room after the reconciliation
    lost = missing(db, added)
    assert not lost, f"{len(lost)} of {len(added)} WAITING jobs were evicted"


def one_shot(db: Database[dict[str, Any]], cap: int) -> None:
    Scheduler(db, options={"job_queue_size": cap}).add_job(NOOP, PAD)  # and dropped, never closed


def test_short_lived_producers_leave_the_ledger_counting_only_what_jobs_hold(
    server: EmbeddedServer, db: Database[dict[str, Any]], db_name: str
) -> None:
    cap = 4 * 1024 * 1024
    for _ in range(170):
        one_shot(db, cap)
    # Real short-lived processes: a `taskscheduler add` per job, and scripts that add one job and exit.
    add = [*CLI, "add", NOOP, "--data", '{"pad": "' + "p" * 400 + '"}']
    script = (
        "import sys; from pymongo import MongoClient; from taskscheduler import Scheduler; "
        f"Scheduler(MongoClient(sys.argv[1])[sys.argv[2]], options={{'job_queue_size': {cap}}})"
        f".add_job({NOOP!r}, {PAD!r})"
    )
    procs = [subprocess.Popen(add, env=cli_env(server, db_name, cap), stdout=subprocess.DEVNULL) for _ in range(20)]
    procs += [subprocess.Popen([sys.executable, "-c", script, server.uri, db_name], env=env()) for _ in range(10)]
    assert [proc.wait(60) for proc in procs] == [0] * len(procs)
    assert db[DEFAULT_JOB_QUEUE].count_documents({}) == 200
    assert ledger(db) <= held(db) + 4096, f"200 one-shot producers hold {ledger(db) - held(db)} bytes of room"


def test_finished_jobs_stay_while_the_collection_is_less_than_half_full(db: Database[dict[str, Any]]) -> None:
    cap = 256 * 1024
    scheduler = producer(db, cap)
    done = [scheduler.add_job(NOOP, PAD).id for _ in range(40)]
    db[DEFAULT_JOB_QUEUE].update_many({}, {"$set": {"status": int(JobStatus.DONE)}})
    # Room counted but held by no one (producers killed between reserving and inserting, or before a release).
    db[f"{DEFAULT_JOB_QUEUE}.room"].update_one({"_id": "used"}, {"$set": {"bytes": cap - 100}})
    p = scheduler.add_job(NOOP, PAD)
    assert scheduler.get_job(p.id).status == JobStatus.WAITING
    assert db[DEFAULT_JOB_QUEUE].count_documents({"_id": {"$in": done}}) == 40  # none deleted at 10 % full
    assert ledger(db) < cap // 2


def test_queue_full_says_what_jobs_hold_and_what_producers_reserved(db: Database[dict[str, Any]]) -> None:
    cap = 256 * 1024
    scheduler = producer(db, cap)
    done = [scheduler.add_job(NOOP, PAD).id for _ in range(40)]
    db[DEFAULT_JOB_QUEUE].update_many({}, {"$set": {"status": int(JobStatus.DONE)}})
    # Producers that reserved room for big jobs and were killed before inserting them.
    for pad in ("b" * 20_000, PAD["pad"]):
        with pytest.raises(QueueFullError):
            for _ in range(100):
                producer(db, cap).store.reserve_job({"_id": ObjectId(), "class": NOOP, "data": {"pad": pad}})
    jobs = held(db)
    with pytest.raises(QueueFullError) as refused:
        scheduler.add_job(NOOP, PAD)
    message = str(refused.value)
    assert f"jobs hold {jobs} bytes" in message and f"of a {cap} byte cap" in message, message
    reserved = ledger(db) - jobs
    assert reserved > cap // 2 and f"producers reserved {reserved} bytes" in message, message
    assert db[DEFAULT_JOB_QUEUE].count_documents({"_id": {"$in": done}}) == 40  # none deleted at 10 % full
    # Their room is not lost for good: once their grants have expired, reconciling gives it back.
    long_ago = datetime(2000, 1, 1, tzinfo=timezone.utc)
    db[f"{DEFAULT_JOB_QUEUE}.room"].update_many({"expires": {"$exists": True}}, {"$set": {"expires": long_ago}})
    p = scheduler.add_job(NOOP, PAD)
    assert scheduler.get_job(p.id).status == JobStatus.WAITING
    assert db[DEFAULT_JOB_QUEUE].count_documents({"_id": {"$in": done}}) == 40


def test_a_producer_gives_back_unspent_room_when_closed_and_at_exit(
    server: EmbeddedServer, db: Database[dict[str, Any]], db_name: str, children: list[subprocess.Popen[str]]
) -> None:
    cap, chunk = 256 * 1024, 16 * 1024
    scheduler = producer(db, cap, chunk)
    for _ in range(10):
        scheduler.add_job(NOOP, PAD)
    assert ledger(db) > held(db)
    scheduler.close()
    assert ledger(db) == held(db)
    scheduler.add_job(NOOP, PAD)  # a closed Scheduler still works; it reserves again
    scheduler.close()
    assert ledger(db) == held(db)
    # Another process that ends without closing anything gives its room back at exit.
    children.append(spawn(server, db_name, cap, chunk, 10))
    proc = children[-1]
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    assert ledger(db) > held(db)
    proc.stdin.write("exit\n")
    proc.stdin.flush()
    assert proc.wait(30) == 0
    assert ledger(db) == held(db)


def test_the_ledger_limit_is_the_collections_real_cap_whatever_a_producer_is_configured_with(
    db: Database[dict[str, Any]], new_scheduler: Callable[..., Scheduler],
) -> None:
    """SPEC 5: a producer configured larger than the capped collection gets no unfinished job evicted."""
    new_scheduler({"job_queue_size": 8192}).store.ensure()  # how the collection was first created
    producer = new_scheduler({"job_queue_size": 1_000_000})
    added: list[ObjectId] = []
    for _ in range(40):
        try:
            added.append(producer.add_job("sample_jobs:Noop", {"pad": "x" * 400}).id)
        except QueueFullError:
            break
    stored = {d["_id"] for d in db[DEFAULT_JOB_QUEUE].find({}, {"_id": 1})}
    lost = [job for job in added if job not in stored]
    assert len(lost) == 0, f"{len(lost)} of {len(added)} WAITING jobs add_job returned were evicted by later inserts"


def test_finished_jobs_make_room_for_a_job_larger_than_one_batch_of_them(
    db: Database[dict[str, Any]], new_scheduler: Callable[..., Scheduler]
) -> None:
    """SPEC 5: QueueFullError only when there is no room; a collection full of finished jobs takes a large new job."""
    scheduler = new_scheduler({"job_queue_size": 400_000})
    with pytest.raises(QueueFullError):
        for _ in range(2000):
            scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 100})
    # They all ran and finished (a status write keeps the size).
    db[DEFAULT_JOB_QUEUE].update_many({}, {"$set": {"status": int(JobStatus.DONE)}})
    big = scheduler.add_job("sample_jobs:Noop", {"pad": "b" * 150_000})  # 38 % of the collection, all finished
    assert scheduler.get_job(big.id).status == JobStatus.WAITING


def test_inserts_that_failed_in_an_outage_leave_room_for_new_jobs(
    db: Database[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, new_scheduler: Callable[..., Scheduler]
) -> None:
    """SPEC 5: room reserved by inserts that never reached the server is not lost: an empty collection takes a job."""
    scheduler = new_scheduler({"job_queue_size": 20_000})
    jobs = scheduler.store.jobs

    def outage(doc: Any, *args: Any, **kw: Any) -> None:
        raise AutoReconnect("connection closed")  # the insert never reached the server

    monkeypatch.setattr(jobs, "insert_one", outage)
    for _ in range(60):
        with contextlib.suppress(ServerUnavailableError, QueueFullError):
            scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 200})
    monkeypatch.undo()
    assert db[DEFAULT_JOB_QUEUE].count_documents({}) == 0
    # The outage is over and the collection is empty: there is room for any job.
    scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 200})  # QueueFullError: "full (19459 of 20000 bytes used...)"


def _produce(uri: str, name: str, attempts: int, out: Any) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(uri, tz_aware=True)
    scheduler = Scheduler(client[name], options={"job_queue_size": 40_000})
    added = []
    for _ in range(attempts):
        try:
            added.append(str(scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 500}).id))
        except QueueFullError:
            pass
    out.send(added)
    client.close()


def test_concurrent_producers_never_evict_an_unfinished_job(
    server: EmbeddedServer, db: Database[dict[str, Any]], db_name: str, new_scheduler: Callable[..., Scheduler]
) -> None:
    """QueueFullError is decided with the insert: concurrent producers near a full collection evict no job."""
    new_scheduler({"job_queue_size": 40_000}).store.ensure()
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for _ in range(4):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_produce, args=(server.uri, db_name, 40, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    added = [job_id for pipe in pipes for job_id in pipe.recv()]
    for proc in procs:
        proc.join(30)
    stored = {str(d["_id"]) for d in db["taskscheduler.jobs"].find({}, {"_id": 1})}
    assert 0 < len(added) < 160  # it filled up
    assert stored == set(added)  # every job a producer was told was added is still there


def test_a_retry_needs_no_room_in_a_full_collection(new_scheduler: Callable[..., Scheduler]) -> None:
    """A next run is the same document: it takes no room, and is never dropped from a full collection."""
    scheduler = new_scheduler({"job_queue_size": 8_000})
    p = scheduler.add_job("sample_jobs:Fail", "x", retry=1, retry_interval=0)
    with pytest.raises(QueueFullError):
        for _ in range(100):
            scheduler.add_job("sample_jobs:Noop", {"pad": "p" * 200})
    before = scheduler.store.jobs.count_documents({})
    doc, worker = claim(scheduler, p.id)
    assert scheduler.lifecycle.end(doc, worker, JobStatus.FAILED, error={"class": "E", "message": "m"}).record()
    assert scheduler.store.jobs.count_documents({}) == before
    retried = scheduler.get_job(p.id)
    assert retried.status == JobStatus.WAITING and retried.run == 2


def test_a_producer_whose_first_look_overlaps_a_flush_still_reserves_room(
    db: Database[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 5: a flush in another process drops the job collection and creates it again. A producer whose first
    ensure() read the collection's options in between found none, took the collection for an uncapped one and
    never reserved room again: its adds were never refused, and the server evicted unfinished jobs to make room
    for them (test_chaos_room hung on it, its filler adding thousands of jobs)."""
    cap = 64 * 1024
    Scheduler(db, options={"job_queue_size": cap}).add_job(NOOP, PAD)  # the collection exists, capped
    late = Scheduler(db, options={"job_queue_size": cap})
    read_options = late.store._capped_size
    raced = []

    def flush_lands_here(name: str) -> int:
        if name == late.store.job_queue and not raced:  # the flush's drop, before this read; its create after
            raced.append(name)
            db.drop_collection(name)
            size = read_options(name)
            db.create_collection(name, capped=True, size=cap)
            return size
        return read_options(name)

    monkeypatch.setattr(late.store, "_capped_size", flush_lands_here)
    added = []
    with pytest.raises(QueueFullError):
        for _ in range(4 * cap // 400):
            added.append(late.add_job(NOOP, PAD).id)
    assert raced
    stored = {d["_id"] for d in db[DEFAULT_JOB_QUEUE].find({}, {"_id": 1})}
    assert [job for job in added if job not in stored] == []  # no unfinished job evicted
