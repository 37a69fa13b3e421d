"""Test harness: one real SecantusDB server per session (a subprocess: tests fork), one database per test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bson
import pytest
from pymongo import MongoClient
from pymongo.database import Database

from taskscheduler import Scheduler
from taskscheduler.constants import DEFAULT_JOB_QUEUE
from taskscheduler.embedded import EmbeddedServer
from taskscheduler.nodeproc import spawn_node

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    data = tmp_path_factory.mktemp("secantus")
    srv = EmbeddedServer(port=0, data_dir=str(data), test_commands=True, log_path=str(data / "server.log"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server: EmbeddedServer) -> Iterator[MongoClient[dict[str, Any]]]:
    c: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, serverSelectionTimeoutMS=10_000)
    yield c
    c.close()


@pytest.fixture
def db_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^A-Za-z0-9]", "_", request.node.name)[:40]
    return f"t_{base}_{uuid.uuid4().hex[:6]}"


@pytest.fixture
def db(client: MongoClient[dict[str, Any]], db_name: str) -> Iterator[Database[dict[str, Any]]]:
    yield client[db_name]
    client.drop_database(db_name)


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


@pytest.fixture
def size_guard(db: Database[dict[str, Any]]) -> Iterator[SizeGuard]:
    guard = SizeGuard(db, DEFAULT_JOB_QUEUE)
    yield guard
    guard.verify()


@pytest.fixture
def scheduler(db: Database[dict[str, Any]], size_guard: SizeGuard) -> Scheduler:
    return Scheduler(db)


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


@pytest.fixture
def start_node(server: EmbeddedServer, db_name: str, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(*args: str, orphaned_timeout: float = 2.0) -> Node:
        log = tmp_path / f"node{len(nodes)}.log"
        pythonpath = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
        proc = spawn_node(
            server.uri,
            db_name,
            ["sample_jobs"],
            ["--orphaned-timeout", str(orphaned_timeout), *args],
            log=str(log),
            env={"PYTHONPATH": pythonpath},
            log_level="DEBUG",
        )
        node = Node(proc, log)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        if node.proc.poll() is None:
            try:
                node.stop(timeout=15)
            except subprocess.TimeoutExpired:
                node.kill_group()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-seeds",
        default="5",
        help="seeds of tests/test_chaos.py: a count N (seeds 0..N-1, default 5), or a list/range ('3,17', '10-19')",
    )
