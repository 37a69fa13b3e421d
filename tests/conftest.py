"""Test harness: one real SecantusDB server per session (a subprocess: tests fork), one database per test."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from helpers import TESTS_DIR, Node, Recorder, SizeGuard, stop_nodes
from taskscheduler import Scheduler
from taskscheduler.constants import DEFAULT_JOB_QUEUE
from taskscheduler.node.nodeproc import spawn_node
from taskscheduler.ops.embedded import EmbeddedServer

# GNU readline (imported by pytest's debugging plugin) writes COLUMNS and LINES (80x24) into the environment, behind
# os.environ's back, and pytest-xdist's workers inherit them: a CLI command a test runs would take them for the
# width of its tables. A test that wants a width sets COLUMNS itself.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)
    os.unsetenv(_name)


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


@pytest.fixture
def size_guard(db: Database[dict[str, Any]]) -> Iterator[SizeGuard]:
    guard = SizeGuard(db, DEFAULT_JOB_QUEUE)
    yield guard
    guard.verify()


@pytest.fixture
def scheduler(db: Database[dict[str, Any]], size_guard: SizeGuard) -> Scheduler:
    return Scheduler(db)


@pytest.fixture
def new_scheduler(db: Database[dict[str, Any]]) -> Callable[..., Scheduler]:
    """Makes another Scheduler on the test's database: another process's client, or one with options of its own
    (``new_scheduler({"job_queue_size": 8192})``, ``new_scheduler(emitter=namespace)``). Without the size guard of
    the ``scheduler`` fixture."""

    def make(options: dict[str, Any] | None = None, **kw: Any) -> Scheduler:
        return Scheduler(db, options=options, **kw)

    return make


@pytest.fixture
def recorded(server: EmbeddedServer, db_name: str) -> Iterator[tuple[Database[dict[str, Any]], Recorder]]:
    """The test's database reached through a client of its own that records every command it sends."""
    recorder = Recorder()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[recorder])
    try:
        yield client[db_name], recorder
    finally:
        client.drop_database(db_name)
        client.close()


@pytest.fixture
def start_node(server: EmbeddedServer, db_name: str, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(
        *args: str,
        orphaned_timeout: float = 2.0,
        modules: tuple[str, ...] = ("sample_jobs",),
        env: dict[str, str] | None = None,
    ) -> Node:
        log = tmp_path / f"node{len(nodes)}.log"
        pythonpath = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
        proc = spawn_node(
            server.uri,
            db_name,
            list(modules),
            ["--orphaned-timeout", str(orphaned_timeout), *args],
            log=str(log),
            env={"PYTHONPATH": pythonpath, **(env or {})},
            log_level="DEBUG",
        )
        node = Node(proc, log)
        nodes.append(node)
        return node

    yield start
    stop_nodes(nodes)


def pytest_addoption(parser: pytest.Parser) -> None:
    # Three seeds in the normal suite (25-30 s each for test_chaos): every seed injects every fault kind, and seeds
    # 0-2 between them run each node configuration the harness draws (3 nodes with a clock 120 s ahead, 2 with no
    # skew, 2 with a clock 120 s behind); seeds 3 and 4 repeated two of those. `make chaos` runs 50.
    parser.addoption(
        "--chaos-seeds",
        default="3",
        help="seeds of tests/chaos/test_chaos.py: a count N (0..N-1, default 3), or a list/range ('3,17', '10-19')",
    )
