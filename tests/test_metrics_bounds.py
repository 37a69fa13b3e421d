"""Metrics that stored data cannot grow (SPEC 7 "Hardening"): runs and the waiting gauges are labelled by the
classes the node serves, every other class name under ``other``; the endpoint listens on 127.0.0.1 unless told
(``queue --metrics-host``) and serves any number of connections from one thread, closing slow ones."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest
from bson import ObjectId
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sample_jobs  # noqa: F401  (loaded: its classes are ones this process serves)
from helpers import Node, metrics_node, sample, scrape, wait_until
from taskscheduler import JobStatus, Queue, Scheduler
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.node import metrics as m
from taskscheduler.node.factory import DefaultWorkerFactory
from taskscheduler.node.metrics import NodeMetrics
from taskscheduler.ops.embedded import EmbeddedServer
from test_metrics import _cli

NOOP = "sample_jobs:Noop"
DONE, FAILED = int(JobStatus.DONE), int(JobStatus.FAILED)


def class_labels(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {value for _, labels in samples for key, value in labels if key == "class"}


def parsed(node_metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(node_metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def node_metrics(
    modules: Iterable[str] = ("sample_jobs",), rows: Callable[[], Iterable[Mapping[str, Any]]] = list, **kw: Any
) -> NodeMetrics:
    return NodeMetrics(0, lambda: (0, 0), lambda: 0.0, rows, modules=modules, **kw)


def run(metrics: NodeMetrics, job_class: str, status: int) -> None:
    job = ObjectId()
    metrics.run_started(job, job_class)
    metrics.run_ended(job, status)


def test_runs_of_classes_the_node_does_not_serve_count_under_other() -> None:
    metrics = node_metrics()
    run(metrics, NOOP, DONE)
    for name in [f"sample_jobs:Made{i}" for i in range(300)] + [
        "sample_jobs.nothing:Job",  # no such module loaded
        "sample_jobs:AbstractJob",  # in the module, but defined elsewhere (taskscheduler.job)
        "sample_jobs:_hidden",
        "elsewhere:Job",  # outside the allow-list
    ]:
        run(metrics, name, FAILED)
    for _ in range(2):  # even runs that ended DONE give so long a name no label
        run(metrics, "sample_jobs:" + "A" * 1000, DONE)
    samples = parsed(metrics)
    assert class_labels(samples) == {NOOP, "other"}
    assert sample(samples, "taskscheduler_runs_started_total", **{"class": "other"}) == 306
    assert sample(samples, "taskscheduler_runs_ended_total", **{"class": "other", "status": "failed"}) == 304
    assert sample(samples, "taskscheduler_run_duration_seconds_count", **{"class": NOOP}) == 1


def test_labels_are_capped_and_a_class_whose_run_ended_done_gets_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "MAX_CLASS_LABELS", 2)
    capped = node_metrics()
    for name in (NOOP, "sample_jobs:Echo", "sample_jobs:Fail", NOOP):
        run(capped, name, DONE)
    samples = parsed(capped)
    assert class_labels(samples) == {NOOP, "sample_jobs:Echo", "other"}
    assert sample(samples, "taskscheduler_runs_started_total", **{"class": NOOP}) == 2
    # A class of the allow-list this process never loaded (only the worker did) gets its label once a run of it
    # ended DONE on the node; one whose runs fail never does.
    learning = node_metrics(modules=("sample_jobs", "unloaded"))
    for status in (DONE, DONE):
        run(learning, "unloaded.jobs:Job", status)
    for status in (FAILED, FAILED):
        run(learning, "unloaded.jobs:Broken", status)
    samples = parsed(learning)
    assert sample(samples, "taskscheduler_runs_started_total", **{"class": "unloaded.jobs:Job"}) == 1
    assert sample(samples, "taskscheduler_runs_started_total", **{"class": "other"}) == 3


def test_waiting_gauges_sum_classes_without_a_label_under_other() -> None:
    rows: list[dict[str, Any]] = [{"class": NOOP, "status": 0, "count": 2}, {"class": NOOP, "status": 1, "count": 1}]
    rows += [{"class": f"sample_jobs:Made{i}", "status": 0, "count": 1} for i in range(500)]
    rows += [{"class": "elsewhere:Job", "status": 1, "count": 4}]
    rows += [{"class": 5, "status": 0, "count": 1}, {"status": 0, "count": 1}]  # malformed documents' classes
    rows += [{"class": NOOP, "status": 99, "count": 1}, {"class": NOOP, "status": 0, "count": "x"}]  # not counts
    metrics = node_metrics(rows=lambda: rows)
    parsed(metrics)  # a scrape: the node's loop counts only while someone looks
    metrics.refresh()
    samples = parsed(metrics)
    gauges = {labels: v for (name, labels), v in samples.items() if name == "taskscheduler_jobs"}
    assert gauges == {
        (("class", NOOP), ("status", "waiting")): 2,
        (("class", NOOP), ("status", "postponed")): 1,
        (("class", "other"), ("status", "waiting")): 502,
        (("class", "other"), ("status", "postponed")): 4,
    }


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[NodeMetrics, int]]:
    monkeypatch.setattr(m, "SCRAPE_TIMEOUT_SECONDS", 0.5, raising=False)
    metrics = NodeMetrics(0, lambda: (0, 0), lambda: 0.0, list, host="127.0.0.1")
    metrics.serve()
    assert metrics.listener is not None
    yield metrics, int(metrics.listener.getsockname()[1])
    metrics.close()


def half_open(port: int) -> socket.socket:
    """A connection that starts a request and never finishes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection (unanswered) before the socket's timeout."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:  # closed with our unread request in its buffer
        return True


def test_half_open_connections_cost_no_thread_and_are_closed(endpoint: tuple[NodeMetrics, int]) -> None:
    _, port = endpoint
    threads = threading.active_count()
    held = [half_open(port) for _ in range(20)]
    try:
        assert sample(scrape(port), "taskscheduler_workers_busy") == 0  # answered after all 20 were accepted
        assert threading.active_count() == threads
        held += [half_open(port) for _ in range(60)]  # beyond MAX_SCRAPE_CONNECTIONS: closed at once
        assert all(closed_by_server(sock) for sock in held)  # the slow ones after their deadline
        assert threading.active_count() == threads
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=5) as reply:
            pytest.fail(f"not found expected, got {reply.status}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    finally:
        for sock in held:
            sock.close()
    assert "taskscheduler_workers_idle" in {name for name, _ in scrape(port)}


def test_metrics_host_defaults_to_localhost_and_is_validated(scheduler: Scheduler) -> None:
    factory = DefaultWorkerFactory("mongodb://127.0.0.1:1", "x", imports=["sample_jobs"])
    node = Queue(scheduler, scheduler._db, factory, options={"metrics_port": 9100})
    assert node.get_options()["metrics_host"] == "127.0.0.1" and node.metrics is not None
    assert node.metrics.host == "127.0.0.1"
    anywhere = Queue(scheduler, scheduler._db, factory, options={"metrics_port": 9100, "metrics_host": "0.0.0.0"})
    assert anywhere.metrics is not None and anywhere.metrics.host == "0.0.0.0"
    for bad in ("", "a host", "[::1]", 5, None, "x\n"):
        with pytest.raises(InvalidArgumentError, match="metrics_host"):
            Queue(scheduler, scheduler._db, factory, options={"metrics_port": 9100, "metrics_host": bad})


def test_cli_rejects_a_bad_metrics_host_in_one_line(server: EmbeddedServer, db_name: str) -> None:
    out = _cli(server, db_name, "queue", "--import", "sample_jobs", "--metrics-port", "9", "--metrics-host", "a b")
    assert out.returncode == 2, out.stderr
    assert "metrics_host" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def this_machines_address() -> str | None:
    """An address of this machine other than loopback (None: it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("192.0.2.1", 9))  # a documentation network: only the route is looked up
        except OSError:
            return None
        address = str(udp.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.e2e
def test_a_node_labels_made_up_classes_other_and_listens_on_localhost(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    node, port, _ = metrics_node(start_node, workers=1)
    made_up = [scheduler.add_job(f"sample_jobs:Made{i}") for i in range(15)]
    noop = scheduler.add_job(NOOP)
    for i in range(5):
        scheduler.add_job(f"elsewhere:Job{i}")  # served by no node: they wait
    scheduler.wait_for([*made_up, noop], timeout=60)
    assert {p.refresh().status for p in made_up} == {JobStatus.FAILED}

    def counted() -> dict[Any, float] | None:
        samples = scrape(port)
        ended = sum(v for (name, _), v in samples.items() if name == "taskscheduler_runs_ended_total")
        waiting = sample(samples, "taskscheduler_jobs", **{"class": "other", "status": "waiting"})
        return samples if ended == 16 and waiting == 5 else None

    samples = wait_until(counted, timeout=20, what="16 ended runs and 5 waiting jobs")
    assert class_labels(samples) == {NOOP, "other"}
    assert sample(samples, "taskscheduler_runs_ended_total", **{"class": "other", "status": "failed"}) == 15
    address = this_machines_address()
    if address is not None:  # bound to 127.0.0.1 by default: not reachable from the network
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=5).close()
    assert node.stop() == 0
