"""Helpers the tests share: polling with a deadline, a queue node run as a subprocess, the BSON size guard.

(Fixtures live in conftest.py; what tests import by name lives here.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson
from bson import ObjectId
from pymongo.database import Database

from taskscheduler import DefaultWorkerFactory, Scheduler
from taskscheduler.constants import JobStatus
from taskscheduler.store.records import JobRecord

#: The tests directory (on sys.path for the job modules the tests' queue nodes import).
TESTS_DIR = Path(__file__).resolve().parent


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


class Node:
    """A queue node run as `taskscheduler queue` in its own process group."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill_group(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class SizeGuard:
    """Proves SPEC 5: no update of a job document changes its BSON size (real MongoDB rejects it when capped).

    Pre-images are enabled on the job collection; at the end every update's pre-image, and every document still
    stored, must have the size the document had when it was inserted.
    """

    def __init__(self, db: Database[dict[str, Any]], collection: str) -> None:
        self.db = db
        self.collection = collection
        Scheduler(db).store.ensure()
        db.command("collMod", collection, changeStreamPreAndPostImages={"enabled": True})
        self.start = db.command("ping")["operationTime"]
        self.checked_updates = 0

    def verify(self) -> None:
        sizes: dict[Any, int] = {}
        problems: list[str] = []
        with self.db.watch(
            [{"$match": {"ns.coll": self.collection}}],
            start_at_operation_time=self.start,
            full_document_before_change="whenAvailable",
            max_await_time_ms=100,
        ) as stream:
            empty = 0
            while empty < 2:
                change = stream.try_next()
                if change is None:
                    empty += 1
                    continue
                empty = 0
                op = change["operationType"]
                key = change.get("documentKey", {}).get("_id")
                if op == "insert":
                    sizes[key] = len(bson.encode(change["fullDocument"]))
                elif op == "update" and change.get("fullDocumentBeforeChange") and key in sizes:
                    self.checked_updates += 1
                    before = len(bson.encode(change["fullDocumentBeforeChange"]))
                    if before != sizes[key]:
                        problems.append(f"{key}: {sizes[key]} bytes at insert, {before} before an update")
                elif op in ("drop", "invalidate"):
                    sizes.clear()
        for doc in self.db[self.collection].find({"_id": {"$in": list(sizes)}}):
            size = len(bson.encode(doc))
            if size != sizes[doc["_id"]]:
                problems.append(f"{doc['_id']}: {sizes[doc['_id']]} bytes at insert, {size} now")
        assert not problems, "job document sizes changed:\n" + "\n".join(problems)


class IdleWorkerFactory(DefaultWorkerFactory):
    """Builds workers that only wait on their pipe (manager tests: no MongoDB needed)."""

    def __init__(self) -> None:
        super().__init__("mongodb://127.0.0.1:1/?directConnection=true", "x")

    def build_worker(self, worker_id: ObjectId) -> Any:
        class Idle:
            def serve(self, connection: Any, job: Any = None, slot: Any = None) -> None:
                connection.recv()

        return Idle()


def as_record(doc: dict[str, Any]) -> JobRecord:
    """The record of a job document, or of the few fields of one a test names (the others as add_job stores
    them): what the lifecycle's policies read."""
    full = {"class": "sample_jobs:Noop", "status": int(JobStatus.PROCESSING), **doc}
    if not isinstance(full.get("_id"), ObjectId):
        full["_id"] = ObjectId()
    return JobRecord.from_doc(full)
