"""The room ledger scenario (SPEC 5): producers, one-shot producers and flush() on a small capped collection, and
the check of its change stream."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import ObjectId
from pymongo.database import Database

from taskscheduler import JobStatus, Scheduler
from taskscheduler.errors import InvalidArgumentError

# -- the room ledger under flush() and one-shot producers (SPEC 5) ------------------------------------------------

#: The job collection of test_chaos_room: its room chunk (1/1024 of the cap) is 8 KiB, so that a long-lived
#: producer holds a credit of up to 13 small jobs, and big jobs fill it in a few dozen adds.
ROOM_CAP = 8 * 1024 * 1024
ROOM_OPTIONS = {
    "job_queue": "chaos.room",
    "job_queue_size": ROOM_CAP,
    "event_queue": "chaos.room.events",
    "event_queue_size": 16 * 1024 * 1024,
}
#: Paddings of the filler's jobs: the biggest until the collection is full, then smaller ones into the gap.
FILL_PADS = (256 * 1024, 32 * 1024, 4 * 1024, 0)
#: Small jobs (590 bytes) a room chunk holds.
JOBS_PER_CHUNK = 13
#: A producer (or flusher) process, driven by lines on stdin, each answered by what it did and "ok":
#: ``add N PAD`` (its own scheduler, stops at QueueFullError), ``fill PAD...`` (each until full), ``oneshots N``
#: (a fresh scheduler per job, as a `taskscheduler add` per job has), ``flush``. It answers ``A id began returned``
#: per job added, ``F began returned message`` for QueueFullError, ``X ...`` for another error, ``L began returned``
#: for a flush (times: time.monotonic(), one clock for every process of the machine).
ROOM_PRODUCER = r'''
import faulthandler, json, sys, time
from pymongo import MongoClient
from taskscheduler import Scheduler
from taskscheduler.errors import QueueFullError

uri, name, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
db = MongoClient(uri, tz_aware=True)[name]
mine = Scheduler(db, options=options)


def add(scheduler, pad):
    began = time.monotonic()
    try:
        job = scheduler.add_job("sample_jobs:Noop", {"pad": "x" * pad})
    except QueueFullError as exc:
        print("F", began, time.monotonic(), str(exc).replace("\n", " "), flush=True)
        return False
    except Exception as exc:  # reported by the test: add_job raises QueueFullError when there is no room
        print("X", began, time.monotonic(), repr(exc).replace("\n", " ")[:300], flush=True)
        return False
    print("A", job.id, began, time.monotonic(), flush=True)
    return True


def run(command, args):
    if command == "add":
        for _ in range(int(args[0])):
            if not add(mine, int(args[1])):
                break
    elif command == "fill":
        for pad in args:
            # Room for twice what the whole collection holds of these jobs is already a finding (finished jobs
            # deleted to make room free at most the cap): say so at once rather than add thousands of big jobs.
            most = min(FILL_MOST, 2 * options["job_queue_size"] // (int(pad) + 600) + 16)
            for _ in range(most):
                if not add(mine, int(pad)):
                    break
            else:
                print("X fill: still room after", most, "jobs of", pad, "bytes", flush=True)
    elif command == "oneshots":
        for _ in range(int(args[0])):
            add(Scheduler(db, options=options), 0)
    elif command == "flush":
        began = time.monotonic()
        mine.flush()
        print("L", began, time.monotonic(), flush=True)


FILL_MOST = 4000  # far more small jobs than the collection holds: an endless fill is a finding, not a hang
for line in sys.stdin:
    command, *args = line.split()
    # A command stuck for a minute prints where it is stuck (stderr reaches the test's output).
    faulthandler.dump_traceback_later(60, exit=False)
    try:
        run(command, args)
    except Exception as exc:  # reported by the test, with what the command was
        print("X", command, repr(exc).replace("\n", " ")[:300], flush=True)
    faulthandler.cancel_dump_traceback_later()
    print("ok", flush=True)
'''


class RoomProcess:
    """One producer (or flusher) process of test_chaos_room."""

    def __init__(self, command: list[str]) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self) -> list[list[str]]:
        """What it did for the last line sent (it always ends with "ok"; the test's timeout bounds the wait)."""
        assert self.proc.stdout is not None
        lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"room producer exited with {self.proc.wait()}")
            if line.strip() == "ok":
                return lines
            lines.append(line.split(maxsplit=4))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@dataclass
class Room:
    """What the producers of test_chaos_room said they did."""

    added: dict[str, tuple[float, float]] = field(default_factory=dict)  # job id -> add began, returned
    flushes: list[tuple[float, float]] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)  # canceled by the test: they may make room
    full: int = 0  # QueueFullError answers
    errors: list[str] = field(default_factory=list)

    def take(self, lines: Iterable[list[str]]) -> None:
        for f in lines:
            if f[0] == "A":
                self.added[f[1]] = (float(f[2]), float(f[3]))
            elif f[0] == "L":
                self.flushes.append((float(f[1]), float(f[2])))
            elif f[0] == "F":
                self.full += 1
            else:
                self.errors.append(" ".join(f))

    def kept(self) -> set[str]:
        """Jobs that must still be stored: added after every flush ended (one that met the add, or came after
        it, may have dropped it), and not finished by the test."""
        last = max((end for _, end in self.flushes), default=float("-inf"))
        return {job for job, (began, _) in self.added.items() if began > last} - self.finished


def check_room(changes: Iterable[Mapping[str, Any]], cap: int) -> list[str]:
    """From a capped job collection's change stream: no unfinished job is deleted (evicted to make room), and no
    finished job is deleted while the collection is less than half full (its documents' sizes replayed)."""
    sizes: dict[Any, int] = {}
    statuses: dict[Any, int] = {}
    held = 0
    problems = []
    for change in changes:
        op = change["operationType"]
        key = (change.get("documentKey") or {}).get("_id")
        if op == "insert":
            doc = change["fullDocument"]
            sizes[key] = len(bson.encode(doc))
            statuses[key] = int(doc.get("status", 0))
            held += sizes[key]
        elif op in ("update", "replace"):
            fields = (change.get("updateDescription") or {}).get("updatedFields") or change.get("fullDocument") or {}
            if "status" in fields and key in statuses:
                statuses[key] = int(fields["status"])
        elif op == "delete" and key in sizes:
            status = JobStatus(statuses.pop(key))
            if status < JobStatus.DONE:
                problems.append(f"unfinished job {key} ({status.name}) deleted at {held / cap:.0%} full")
            elif held < cap / 2:
                problems.append(f"finished job {key} ({status.name}) deleted at {held / cap:.0%} full, below half")
            held -= sizes.pop(key)
        elif op in ("drop", "dropDatabase", "invalidate"):
            sizes.clear()
            statuses.clear()
            held = 0
    return problems


class RoomChaos:
    """Drives test_chaos_room: rounds of adds, one-shot producers, finishing, a flush, adds, a fill to the brim."""

    def __init__(self, seed: int, uri: str, db: Database[dict[str, Any]]) -> None:
        self.rng = random.Random(seed)
        self.uri, self.db = uri, db
        self.scheduler = Scheduler(db, options=ROOM_OPTIONS)
        self.scheduler.store.ensure()
        command = [sys.executable, "-c", ROOM_PRODUCER, uri, db.name, json.dumps(ROOM_OPTIONS)]
        self.producers = [RoomProcess(command) for _ in range(self.rng.randint(2, 4))]
        self.flusher, self.filler = RoomProcess(command), RoomProcess(command)
        # One-shot producers, each a Scheduler of its own that adds one job (as `taskscheduler add` does): each
        # reserves its job's exact size. Every insert costs the test server a scan of the capped collection.
        self.oneshots = self.rng.choice((0, 100, 200, 300))
        self.bursts = [RoomProcess(command) for _ in range(2 if self.oneshots else 0)]
        self.room = Room()
        self.steps: list[str] = []
        self.missing: set[str] = set()

    def batch(self, workers: list[RoomProcess], lines: list[str]) -> None:
        began = time.monotonic()
        for worker, line in zip(workers, lines, strict=True):
            worker.send(line)
        for worker in workers:
            self.room.take(worker.answer())
        # How long each step took (a slow server shows here, in the report of a seed that ran out of time too).
        self.steps.append(f"  {time.monotonic() - began:6.1f} s  {lines[0].split()[0]} x{len(lines)}")
        print(self.steps[-1], flush=True)  # shown by pytest when the seed runs out of time

    def adds(self) -> list[str]:
        return [f"add {self.rng.randint(1, 13)} 0" for _ in self.producers]

    def present(self) -> set[str]:
        return {str(d["_id"]) for d in self.scheduler.store.jobs.find({}, {"_id": 1})}

    def credit_round(self) -> None:
        """Producers hold room they reserved; a flush from another process (while they add, or between their
        adds); they spend what they reserved before it; then the collection is filled to the last byte (SPEC 5:
        room reserved before a flush is not room after it)."""
        added = [self.rng.randint(1, JOBS_PER_CHUNK - 1) for _ in self.producers]
        self.batch(self.producers, [f"add {n} 0" for n in added])
        if self.rng.random() < 0.5:  # the flush, and another producer's add at the same time or just after it
            self.batch([self.flusher, self.filler], ["flush", "add 1 0"])
        else:
            self.batch([self.flusher], ["flush"])
            self.batch([self.filler], ["add 1 0"])
        # Within what each has left of its chunk: spent from the reservation made before the flush.
        self.batch(self.producers, [f"add {self.rng.randint(1, JOBS_PER_CHUNK - n)} 0" for n in added])
        self.fill("credit")

    def leak_round(self) -> None:
        """After a flush: producers add, one-shot producers (`taskscheduler add`, fresh schedulers by the hundred)
        come and go, some jobs finish, then the collection is filled to the last byte (SPEC 5: room a short-lived
        producer reserved is not lost for good, no finished job is deleted below half full)."""
        self.batch([self.flusher], ["flush"])
        self.batch(self.producers, [f"add {self.rng.randint(1, 2 * JOBS_PER_CHUNK)} 0" for _ in self.producers])
        cli = [_cli_add(self.uri, self.db.name) for _ in range(self.rng.randint(1, 3))]
        if self.oneshots:
            self.batch(self.bursts, [f"oneshots {self.oneshots // len(self.bursts)}"] * len(self.bursts))
        for proc, began in cli:
            out, err = proc.communicate(timeout=60)
            if proc.returncode == 0:
                self.room.added[out.strip()] = (began, time.monotonic())
            elif err.startswith("Error: job collection"):  # QueueFullError: said in one line, exit 2
                self.room.full += 1
            else:
                self.room.errors.append(f"taskscheduler add exited {proc.returncode}: {err.strip()}")
        self.finish()
        self.fill("leak")

    def fill(self, name: str) -> None:
        self.batch([self.filler], ["fill " + " ".join(map(str, FILL_PADS))])
        present = self.present()
        self.missing |= self.room.kept() - present
        self.steps.append(f"{name} round: {len(present)} jobs stored, {self.room.full} QueueFullError so far")

    def finish(self) -> None:
        """A third of the stored jobs end (canceled): finished jobs that room may be made of."""
        stored = sorted(self.room.kept() & self.present())
        for job in self.rng.sample(stored, k=len(stored) // 3):
            with contextlib.suppress(InvalidArgumentError):
                self.scheduler.cancel_job(ObjectId(job))
            self.room.finished.add(job)

    def close(self) -> None:
        for worker in [*self.producers, self.flusher, self.filler, *self.bursts]:
            worker.close()



def _cli_add(uri: str, database: str) -> tuple[subprocess.Popen[str], float]:
    """A one-shot producer: `taskscheduler add` of one job into the room test's collection."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in ROOM_OPTIONS.items()]
    command = [sys.executable, "-m", "taskscheduler", "add", f"--mongodb-uri={uri}", f"--database={database}"]
    command += [*flags, "--no-import-check", '--data={"pad": ""}', "sample_jobs:Noop"]
    began = time.monotonic()
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), began
