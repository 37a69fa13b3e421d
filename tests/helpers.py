"""Helpers the tests share: polling with a deadline, a queue node run as a subprocess, the BSON size guard.

(Fixtures live in conftest.py; what tests import by name lives here.)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson
import psutil
from bson import ObjectId
from prometheus_client.parser import text_string_to_metric_families
from pymongo import monitoring
from pymongo.database import Database

from taskscheduler import DefaultWorkerFactory, JobStatus, Scheduler
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


def wait_for_peers(nodes: list[Node], others: int | None = None, timeout: float = 30.0) -> None:
    """Until each node has read the registry and sees ``others`` live nodes besides itself (default: the other
    ``nodes``), by its DEBUG log line: a wait on the fact, not on the heartbeat's pace."""
    want = len(nodes) - 1 if others is None else others

    def seen() -> bool:
        counts = [re.findall(r"live nodes besides this one: (\d+)", node.output()) for node in nodes]
        return all(found and int(found[-1]) == want for found in counts)

    wait_until(seen, timeout, what=f"every node to see {want} other live node(s)")


def stop_nodes(nodes: list[Node], timeout: float = 15.0) -> None:
    """Stop every node still running at a test's end: SIGTERM to all of them first, then wait for each (a node takes
    up to a second to stop, its stream reader's await, so one after the other cost a second per node); a node that
    outlives ``timeout`` loses its whole process group."""
    running = [node for node in nodes if node.proc.poll() is None]
    for node in running:
        with contextlib.suppress(ProcessLookupError):
            node.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for node in running:
        try:
            node.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.kill_group()


#: The collection SizeGuard.verify() writes its marker to (in the test's database, dropped with it).
MARKER_COLLECTION = "sizeguard.marker"


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
        # A marker written now closes the history to read: the stream delivers changes in the order they were
        # written, so once the marker comes every change of the job collection before it has come too (waiting
        # for empty batches instead cost two await periods per test and could stop before a slow change).
        marker = self.db[MARKER_COLLECTION].insert_one({}).inserted_id
        deadline = time.monotonic() + 30
        with self.db.watch(
            [{"$match": {"ns.coll": {"$in": [self.collection, MARKER_COLLECTION]}}}],
            start_at_operation_time=self.start,
            full_document_before_change="whenAvailable",
            max_await_time_ms=100,
        ) as stream:
            while True:
                change = stream.try_next()
                if change is None:
                    if not stream.alive:  # invalidated: the test dropped the database, nothing more to read
                        break
                    assert time.monotonic() < deadline, "the size guard's marker never came through the stream"
                    continue
                op = change["operationType"]
                key = change.get("documentKey", {}).get("_id")
                if change.get("ns", {}).get("coll") == MARKER_COLLECTION:
                    if key == marker:
                        break
                    continue  # the marker of an earlier verify()
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


def worker_factory(uri: str, database: str) -> DefaultWorkerFactory:
    """The factory of a node that serves the ``sample_jobs`` module (nothing is forked until a worker is needed)."""
    return DefaultWorkerFactory(uri, database, imports=["sample_jobs"])


def claim(
    scheduler: Scheduler, job_id: ObjectId, worker: ObjectId | None = None, *, lease: float = 30.0
) -> tuple[dict[str, Any], ObjectId]:
    """Claim the job's current run for ``worker`` (a new id by default), as a worker does; it must succeed."""
    worker = worker or ObjectId()
    doc = scheduler.lifecycle.claim(job_id, worker, lease)
    assert doc is not None and doc["worker"] == worker and doc["status"] == JobStatus.PROCESSING
    return doc, worker


def live_children(pid: int) -> list[psutil.Process]:
    """The running children of a process; one that exits while they are listed is not one (no NoSuchProcess)."""
    found = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    found.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie or a reaped pid does not)."""
    try:
        return bool(psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD))
    except psutil.Error:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- metrics -----------------------------------------------------------------------------------------------------

#: A scrape: (name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of the metrics endpoint on 127.0.0.1:``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_when_up(port: int, node: Node) -> dict[Any, float]:
    """The first scrape of the node's endpoint once it answers (the node must stay up meanwhile)."""

    def up() -> dict[Any, float] | None:
        assert node.proc.poll() is None, node.output()
        try:
            return scrape(port)
        except OSError:
            return None

    found: dict[Any, float] = wait_until(up, timeout=20, what="the metrics endpoint")
    return found


def metrics_node(start_node: Callable[..., Node], workers: int) -> tuple[Node, int, Samples]:
    """A queue node with a static pool of ``workers`` and metrics on a free port: (node, port, its first scrape)."""
    port = free_port()
    pool = ["--pm", "static", "--min-children", str(workers), "--max-children", str(workers)]
    node = start_node("--metrics-port", str(port), *pool)
    return node, port, scrape_when_up(port, node)


# -- the commands a client sends -----------------------------------------------------------------------------------


class Recorder(monitoring.CommandListener):
    """Records every command a client starts: (name, command)."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def index_names(plan: Any) -> set[str]:
    """Every index a query plan reads (by name)."""
    if isinstance(plan, dict):
        found = {plan["indexName"]} if plan.get("stage") == "IXSCAN" and "indexName" in plan else set()
        return found.union(*(index_names(v) for v in plan.values()))
    if isinstance(plan, list):
        return set().union(*(index_names(v) for v in plan))
    return set()


def _uses_index(plan: Any) -> bool:
    if isinstance(plan, dict):
        if plan.get("stage") in ("IXSCAN", "IDHACK", "EXPRESS_IXSCAN", "EXPRESS_IDHACK"):
            return True
        return any(_uses_index(v) for v in plan.values())
    if isinstance(plan, list):
        return any(_uses_index(v) for v in plan)
    return False


def _by_id(query: dict[str, Any]) -> bool:
    # Real MongoDB serves an _id equality through the _id index (IDHACK) whatever else the filter holds; the
    # test server's planner reports a scan for {_id, status} (or the room ledger's {_id: "used", bytes}), so
    # that shape is accepted as indexed here.
    value = query.get("_id")
    return isinstance(value, (ObjectId, str)) or (isinstance(value, dict) and "$in" in value)


def unindexed(db: Any, commands: list[tuple[str, dict[str, Any]]]) -> tuple[int, list[tuple[str, Any]]]:
    """How many queries the commands issued, and those the server's planner serves without an index."""
    queries: list[tuple[str, dict[str, Any]]] = []
    sorts: dict[int, Any] = {}  # query number -> its sort
    for name, cmd in commands:
        if name == "find":
            if cmd.get("sort"):
                sorts[len(queries)] = cmd["sort"]
            queries.append((cmd["find"], cmd.get("filter", {})))
        elif name == "update":
            queries += [(cmd["update"], u["q"]) for u in cmd["updates"]]
        elif name == "delete":
            queries += [(cmd["delete"], d["q"]) for d in cmd["deletes"]]
    found = []
    for i, (coll, query) in enumerate(queries):
        if _by_id(query) and i not in sorts:
            continue
        find: dict[str, Any] = {"find": coll, "filter": query}
        if i in sorts:
            find["sort"] = sorts[i]
        plan = db.command("explain", find)["queryPlanner"]["winningPlan"]
        # A sorted query is planned with its sort, as the library sends it (the test server sorts in memory
        # whatever the indexes, so only the filter's index is checked).
        if not _uses_index(plan):
            found.append((coll, find))
    return len(queries), found


def as_record(doc: dict[str, Any]) -> JobRecord:
    """The record of a job document, or of the few fields of one a test names (the others as add_job stores
    them): what the lifecycle's policies read."""
    full = {"class": "sample_jobs:Noop", "status": int(JobStatus.PROCESSING), "worker": ObjectId(), **doc}
    if not isinstance(full.get("_id"), ObjectId):
        full["_id"] = ObjectId()
    return JobRecord.from_doc(full)


#: The console script of the venv running the tests (what a user's shell finds on PATH).
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("taskscheduler"))


def in_a_terminal(*args: str, columns: int, env: dict[str, str]) -> str:
    """What the console script prints to a terminal ``columns`` wide (a pty, as a user's shell gives it), with
    colours and cursor moves taken out; it must exit 0 within 30 s."""
    import fcntl
    import pty
    import re
    import select
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        os.environ.update(env, COLUMNS=str(columns))
        os.execv(CONSOLE_SCRIPT, [CONSOLE_SCRIPT, *args])
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the child is gone: EIO on Linux
                    break
                if not chunk:
                    break
                seen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, seen
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode())


def start_delay(scheduler: Any, job_id: Any) -> float:
    """Seconds from a job's creation to its start, both on the server's clock."""
    record = scheduler.get_job(job_id)
    assert record.created is not None and record.started is not None, record
    return float((record.started - record.created).total_seconds())


def cli_in_process(*args: str) -> tuple[Any, str]:
    """``taskscheduler ARGS`` in this process: (exit code, or the exception that escaped; stdout and stderr)."""
    import contextlib
    import gc
    import io
    import warnings

    from taskscheduler.cli.commands import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main(list(args))
    except SystemExit as exc:
        return exc.code, out.getvalue()
    except Exception as exc:  # a traceback for the operator: what SPEC 3 rules out
        return exc, out.getvalue()
    finally:
        with warnings.catch_warnings():  # a client left to the collector here, not in a later test
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    return None, out.getvalue()


def id_preferring(node: Any, ids: list[Any], job_class: str = "sample_jobs:Noop") -> Any:
    """A new job id whose preferred node among ``ids`` (registry ids of nodes all serving sample_jobs) is
    ``node``, as the nodes compute it."""
    from datetime import datetime

    from bson import ObjectId

    from taskscheduler.node.peers import Peers

    peers = Peers(node, ["sample_jobs"])
    now = datetime.now()
    peers.update([{"_id": i, "modules": ["sample_jobs"], "alive": now, "lease": 30.0} for i in ids], now, 1.0)
    while True:
        job_id = ObjectId()
        if peers.rank(job_id, job_class) == 0:
            return job_id
