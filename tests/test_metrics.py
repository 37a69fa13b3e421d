"""Prometheus metrics of a queue node (SPEC 7): a real node, scraped over HTTP while its jobs run (and while its
manager dies)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import TESTS_DIR, Node, live_children, metrics_node, sample, scrape, wait_until
from taskscheduler import Queue, Scheduler
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.node.factory import DefaultWorkerFactory
from taskscheduler.node.metrics import status_label
from taskscheduler.ops.embedded import EmbeddedServer

NOOP, FAIL = "sample_jobs:Noop", "sample_jobs:Fail"


@pytest.mark.e2e
def test_counters_move_by_exactly_the_runs_that_happened(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    node, port, before = metrics_node(start_node, workers=2)
    assert sample(before, "taskscheduler_runs_started_total", **{"class": NOOP}) == 0
    wait_until(lambda: sample(scrape(port), "taskscheduler_workers_idle") == 2, what="two idle workers")

    done = [scheduler.add_job(NOOP) for _ in range(4)]
    failed = scheduler.add_job(FAIL, {"n": 1})
    scheduler.wait_for([*done, failed], timeout=30)
    assert failed.refresh().status.name == "FAILED"

    def ended() -> dict[Any, float] | None:
        samples = scrape(port)
        total = sum(v for (name, _), v in samples.items() if name == "taskscheduler_runs_ended_total")
        return samples if total >= 5 else None  # the manager's reports reach the node just after the writes

    after = wait_until(ended, what="five ended runs")
    assert sample(after, "taskscheduler_runs_started_total", **{"class": NOOP}) == 4
    assert sample(after, "taskscheduler_runs_started_total", **{"class": FAIL}) == 1
    assert sample(after, "taskscheduler_runs_ended_total", **{"class": NOOP, "status": "done"}) == 4
    assert sample(after, "taskscheduler_runs_ended_total", **{"class": FAIL, "status": "failed"}) == 1
    ended_total = sum(v for (name, _), v in after.items() if name == "taskscheduler_runs_ended_total")
    assert ended_total == 5  # nothing else: no other status, no other class
    assert sample(after, "taskscheduler_run_duration_seconds_count", **{"class": NOOP}) == 4
    assert sample(after, "taskscheduler_run_duration_seconds_count", **{"class": FAIL}) == 1
    assert 0 < sample(after, "taskscheduler_run_duration_seconds_sum", **{"class": NOOP}) < 30
    assert not any("job" in dict(labels) or "id" in dict(labels) for _, labels in after)  # never a job id
    assert sample(after, "taskscheduler_workers_busy") + sample(after, "taskscheduler_workers_idle") == 2
    assert 0 <= sample(after, "taskscheduler_heartbeat_lag_seconds") < 2.0  # a 2 s lease: a beat every 1/3 s

    # Gauges of the cluster's backlog: counted by the node's loop while it is scraped.
    scheduler.add_job(NOOP, options={"at": time.time() + 3600})
    scheduler.add_job("other_module:Job", options={"at": 0})  # a class no node serves: it waits, as "other"
    wait_until(
        lambda: sample(scrape(port), "taskscheduler_jobs", **{"class": NOOP, "status": "postponed"}) == 1
        and sample(scrape(port), "taskscheduler_jobs", **{"class": "other", "status": "waiting"}) == 1,
        timeout=15,
        what="the waiting and postponed gauges",
    )
    assert node.stop() == 0


def test_ended_status_labels() -> None:
    assert [status_label(s) for s in (None, 0, 3, 4, 5, 6)] == [
        "released",
        "released",
        "done",
        "failed",
        "canceled",
        "timeout",
    ]


@pytest.mark.parametrize("bad", [-1, 65536, "9100", True, 1.5])
def test_bad_metrics_port_is_rejected(scheduler: Scheduler, bad: Any) -> None:
    factory = DefaultWorkerFactory("mongodb://127.0.0.1:1", "x", imports=["sample_jobs"])
    with pytest.raises(InvalidArgumentError, match="metrics_port"):
        Queue(scheduler, scheduler._db, factory, options={"metrics_port": bad})


@pytest.mark.parametrize("off", [0, None])
def test_metrics_port_zero_or_none_is_off(scheduler: Scheduler, off: Any) -> None:
    factory = DefaultWorkerFactory("mongodb://127.0.0.1:1", "x", imports=["sample_jobs"])
    node = Queue(scheduler, scheduler._db, factory, options={"metrics_port": off})
    assert node.metrics is None and node.get_options()["metrics_port"] is None


def _cli(server: EmbeddedServer, db_name: str, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(TESTS_DIR)) if p))
    return subprocess.run(
        [sys.executable, "-m", "taskscheduler", *args, "--mongodb-uri", server.uri, "--database", db_name],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_cli_rejects_a_bad_metrics_port(server: EmbeddedServer, db_name: str, port: str) -> None:
    out = _cli(server, db_name, "queue", "--import", "sample_jobs", "--metrics-port", port)
    assert out.returncode == 2 and "--metrics-port" in out.stderr and "Traceback" not in out.stderr


def test_cli_names_the_install_when_prometheus_client_is_missing(
    server: EmbeddedServer, db_name: str, tmp_path: Path
) -> None:
    (tmp_path / "prometheus_client.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'prometheus_client'\", name='prometheus_client')\n"
    )
    out = _cli(server, db_name, "queue", "--import", "sample_jobs", "--metrics-port", "9", pythonpath=str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert 'pip install "mongodb-task-scheduler[metrics]"' in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_one_line_and_exit_1(server: EmbeddedServer, db_name: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _cli(server, db_name, "queue", "--import", "sample_jobs", "--metrics-port", str(port))
    assert out.returncode == 1, out.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def _kill_manager(node: Node) -> None:
    import psutil

    (manager,) = psutil.Process(node.pid).children()
    manager.kill()
    wait_until(
        lambda: [c.pid for c in live_children(node.pid)]
        not in ([], [manager.pid]),
        20,
        what="a new manager",
    )


def _settle(read: Callable[[], Any], ok: Callable[[Any], bool], seconds: float) -> Any:
    """The last value read within ``seconds`` (early when ``ok``)."""
    deadline = time.monotonic() + seconds
    value = read()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = read()
    return value


@pytest.mark.e2e
def test_manager_death_counts_the_interrupted_run_as_ended(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 7: a run interrupted by its manager's death counts as ended (released), so counters move by the runs."""
    node, port, _ = metrics_node(start_node, workers=1)
    wait_until(lambda: sample(scrape(port), "taskscheduler_workers_idle") == 1, 20, what="an idle worker")
    cls = "sample_jobs:Sleep"
    job = scheduler.add_job(cls, {"seconds": 2})
    wait_until(lambda: sample(scrape(port), "taskscheduler_runs_started_total", **{"class": cls}) == 1, 20)
    _kill_manager(node)
    assert job.wait(timeout=40).status.name == "DONE"

    def counts() -> tuple[float, float, float]:
        s = scrape(port)
        ended = sum(v for (name, labels), v in s.items() if name == "taskscheduler_runs_ended_total")
        return (
            sample(s, "taskscheduler_runs_started_total", **{"class": cls}),
            ended,
            sample(s, "taskscheduler_runs_ended_total", **{"class": cls, "status": "released"}),
        )

    started, ended, released = _settle(counts, lambda v: v == (2, 2, 1), 10)
    assert (started, ended, released) == (2, 2, 1), (
        f"{started} runs started, {ended} ended ({released} released): the interrupted run is never counted"
    )
    assert node.stop() == 0
