"""The dashboard's bounds (SPEC 7 "Hardening"): a request's filters reach MongoDB bounded whatever the query
string holds, an over-long query string is refused before anything is read, and live streams (open pages) and
connections are capped, a refused page getting 503 until a place frees."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from bson import ObjectId
from pymongo import MongoClient, monitoring
from starlette.testclient import TestClient

from helpers import TESTS_DIR, index_names, wait_until
from taskscheduler import JobStatus, Scheduler, Worker
from taskscheduler.ops.dashboard import REQUEST_ROOM, bind
from taskscheduler.ops.dashboard.app import MAX_CLASS_FILTER, MAX_QUERY_BYTES, create_app
from taskscheduler.ops.embedded import EmbeddedServer


class JobQueries(monitoring.CommandListener):
    """The filters of every read of the job collection (find, and count_documents' aggregate)."""

    def __init__(self) -> None:
        self.filters: list[Any] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = event.command
        if event.command_name == "find" and command["find"].endswith("jobs"):
            self.filters.append(command.get("filter"))
        elif event.command_name == "aggregate" and str(command["aggregate"]).endswith("jobs"):
            self.filters.append(command.get("pipeline"))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def in_lists(value: Any) -> list[list[Any]]:
    """Every ``$in`` list anywhere in a filter or pipeline."""
    if isinstance(value, dict):
        found = [v for k, v in value.items() if k == "$in" and isinstance(v, list)]
        return found + [x for v in value.values() for x in in_lists(v)]
    if isinstance(value, list):
        return [x for v in value for x in in_lists(v)]
    return []


@pytest.fixture
def watched(server: EmbeddedServer, db_name: str, scheduler: Scheduler) -> Iterator[tuple[Scheduler, JobQueries]]:
    """A Scheduler on the test's database whose reads are recorded."""
    listener = JobQueries()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[listener])
    yield Scheduler(client[db_name]), listener
    client.close()


def test_each_status_reaches_the_server_once_however_often_it_is_named(
    watched: tuple[Scheduler, JobQueries], scheduler: Scheduler
) -> None:
    observed, queries = watched
    done = scheduler.add_job("sample_jobs:Noop")
    Worker(ObjectId(), scheduler, scheduler._db).process_one(done.id)
    waiting = scheduler.add_job("sample_jobs:Noop")
    query = "status=" + ",".join(["done"] * 250 + ["WAITING", "waiting", "nonsense"] * 20)
    assert len(query) <= MAX_QUERY_BYTES
    with TestClient(create_app(observed)) as web:
        queries.filters.clear()
        reply = web.get(f"/api/jobs?{query}")
    assert reply.status_code == 200, reply.text
    assert [row["id"] for row in reply.json()["jobs"]] == [str(waiting.id), str(done.id)]
    lists = [found for f in queries.filters for found in in_lists(f)]
    assert lists, "the table's reads were not seen"
    assert all(found == [int(JobStatus.WAITING), int(JobStatus.DONE)] for found in lists), lists


def test_an_overlong_query_string_is_refused_before_anything_is_read(
    watched: tuple[Scheduler, JobQueries],
) -> None:
    observed, queries = watched
    with TestClient(create_app(observed)) as web:
        queries.filters.clear()
        query = "status=" + ",".join(["done"] * 3000)
        too_long = web.get(f"/api/jobs?{query}")
        assert too_long.status_code == 414
        assert too_long.json()["error"] == f"query string too long ({len(query)} bytes, at most {MAX_QUERY_BYTES})"
        assert queries.filters == []
        long_class = web.get("/api/jobs", params={"class": "m:" + "A" * MAX_CLASS_FILTER})
        assert long_class.status_code == 400
        assert "class filter too long" in long_class.json()["error"] and queries.filters == []
        assert web.get("/api/jobs", params={"class": "m:A", "limit": "9" * 50}).status_code == 200  # clamped


@pytest.fixture
def capped_url(scheduler: Scheduler) -> Iterator[str]:
    """The dashboard with two live streams at most, served by a real uvicorn in a thread of this process."""
    sock = bind("127.0.0.1", 0)
    app = create_app(scheduler, max_streams=2)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="uvicorn to start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    app.state.feed.end_streams()
    server.should_exit = True
    thread.join(10)
    sock.close()


def open_stream(url: str) -> socket.socket:
    """A page's live stream, read until it is subscribed (its ``ready`` event)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET /api/stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    seen = b""
    while b"event: ready" not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen
    return sock


def test_live_streams_beyond_the_cap_get_503_until_one_closes(capped_url: str) -> None:
    first, second = open_stream(capped_url), open_stream(capped_url)
    try:
        with httpx2.stream("GET", f"{capped_url}/api/stream", timeout=10) as refused:
            assert refused.status_code == 503
            assert json.loads(refused.read()) == {"error": "too many live streams open (2); try again later"}
            assert int(refused.headers["retry-after"]) > 0
        assert httpx2.get(f"{capped_url}/api/summary", timeout=10).status_code == 200  # other requests go on
        first.close()

        def a_place_is_free() -> bool:
            with httpx2.stream("GET", f"{capped_url}/api/stream", timeout=10) as reply:
                return reply.status_code == 200

        wait_until(a_place_is_free, timeout=10, interval=0.1, what="the closed stream's place")
    finally:
        first.close()
        second.close()


def test_cli_max_streams_and_the_servers_connection_limit(
    server: EmbeddedServer, db_name: str, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    log = (tmp_path / "dashboard.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskscheduler", "dashboard", "--port", str(port), "--max-streams", "1",
         "--mongodb-uri", server.uri, "--database", db_name],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    idle: list[socket.socket] = []
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                return httpx2.get(f"{url}/api/config", timeout=2).status_code == 200
            except httpx2.TransportError:
                return False

        wait_until(up, timeout=20, what="the dashboard")
        stream = open_stream(url)
        idle.append(stream)
        with httpx2.stream("GET", f"{url}/api/stream", timeout=10) as refused:
            assert refused.status_code == 503  # --max-streams 1
        # Connections beyond the streams' and REQUEST_ROOM's are answered 503 at once, not queued.
        idle += [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(REQUEST_ROOM)]
        wait_until(lambda: httpx2.get(f"{url}/api/config", timeout=10).status_code == 503, what="503 beyond")
        for sock in idle[1:]:
            sock.close()
        wait_until(lambda: httpx2.get(f"{url}/api/config", timeout=10).status_code == 200, what="room again")
    finally:
        for sock in idle:
            sock.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) in (0, 130), (tmp_path / "dashboard.log").read_text()  # 130: stopped by Ctrl-C
        log.close()


class EventReads(monitoring.CommandListener):
    """The pipelines of every aggregation of the event collection."""

    def __init__(self) -> None:
        self.pipelines: list[tuple[str, list[Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "aggregate" and str(event.command["aggregate"]).endswith("events"):
            self.pipelines.append((str(event.command["aggregate"]), list(event.command["pipeline"])))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.mark.parametrize(
    ("options", "index"), [({}, "time"), ({"event_queue_size": 0, "job_queue_size": 0}, "time_ttl")]
)
def test_trends_are_grouped_on_the_server_through_the_time_index(
    server: EmbeddedServer, db_name: str, db: Any, options: dict[str, Any], index: str
) -> None:
    listener = EventReads()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[listener])
    try:
        observed = Scheduler(client[db_name], options=options)
        for _ in range(3):
            job = observed.add_job("sample_jobs:Fail")
            Worker(ObjectId(), observed, observed._db).process_one(job.id)
        with TestClient(create_app(observed)) as web:
            listener.pipelines.clear()
            trends = web.get("/api/trends").json()
        assert sum(m["failed"] for m in trends["minutes"]) == 3
        (collection, pipeline), *_ = [p for p in listener.pipelines if "$facet" in str(p[1])]
        first = pipeline[0]["$match"]
        assert list(first) == ["time"]  # the window alone: what the index serves
        assert pipeline[-1].keys() == {"$facet"}  # grouped on the server: one document comes back
        plan = db.command("explain", {"aggregate": collection, "pipeline": [pipeline[0]], "cursor": {}})
        assert index in index_names(plan), plan
    finally:
        client.close()


def test_error_lines_of_the_table_are_read_in_one_query_cut_on_the_server(
    server: EmbeddedServer, db_name: str, scheduler: Scheduler
) -> None:
    listener = EventReads()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[listener])
    try:
        observed = Scheduler(client[db_name])
        for _ in range(4):
            job = scheduler.add_job("sample_jobs:Fail", {"pad": "y" * 70_000})  # a message of 70 KB
            Worker(ObjectId(), scheduler, scheduler._db).process_one(job.id)
        with TestClient(create_app(observed)) as web:
            listener.pipelines.clear()
            reply = web.get("/api/jobs")
        rows = reply.json()["jobs"]
        assert len(rows) == 4 and all(r["error_line"].startswith("ValueError: boom") for r in rows)
        assert len(reply.content) < 8_000  # four 70 KB messages never reach the page
        reads = [p for _, p in listener.pipelines]
        assert len(reads) == 1 and "$substrCP" in str(reads[0])
    finally:
        client.close()


def test_a_bulk_requeue_stops_at_an_outage_instead_of_trying_every_job(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 7 Hardening, "a bounded request never stalls the server": bulk requeue went on to the next job after
    any TaskSchedulerError, ServerUnavailableError included, so during an outage one request waited out the
    driver's server selection once per job (500 jobs x 30 s: four hours of a server thread) before answering."""
    from taskscheduler.errors import ServerUnavailableError
    from taskscheduler.testing import run_jobs

    for n in range(5):
        scheduler.add_job("sample_jobs:Fail", {"n": n})
    run_jobs(scheduler)
    tried: list[ObjectId] = []

    def unreachable(job_id: ObjectId) -> Any:
        tried.append(job_id)
        raise ServerUnavailableError("cannot reach MongoDB: timed out")

    monkeypatch.setattr(scheduler, "requeue_job", unreachable)
    with TestClient(create_app(scheduler)) as web:
        reply = web.post("/api/bulk/requeue", params={"expected": "5"}, headers={"X-Taskscheduler-Action": "1"})
    assert len(tried) == 1
    assert reply.status_code == 503
    assert "cannot reach MongoDB" in reply.json()["error"] and "0 of 5" in reply.json()["error"]
