"""Benchmark 9: the same N no-op jobs through this library (one queue node, two workers, MongoDB) and through RQ
(two ``rq worker`` processes, Redis), one after the other on this machine: jobs/s and client CPU per job for a
batch of N added at once, and add->done p50/p99 of LATENCY_JOBS jobs added one at a time (each once the one before
is done: a job's own latency, not its wait behind a batch).

Client CPU is every process but the servers (``mongod``/SecantusDB, ``redis-server``), from psutil: the queue node
with its manager and workers (RQ: the two workers with the work horses they fork per job, counted when reaped), plus
the producer's CPU while it adds the jobs. Waiting for the results is not counted on either side (each waits its
own way). Skipped, with the reason, when ``redis-server`` or the ``rq`` package is missing (`rq` is in the dev
extra; Debian's ``redis-server``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from taskscheduler import JobStatus, Scheduler
from taskscheduler.node.nodeproc import spawn_node, stop_node
from taskscheduler.store import connect

ROOT = Path(__file__).resolve().parent.parent
NOOP = "benchmarks.jobs:Noop"
#: Jobs of the throughput and CPU figures, added at once.
N = 300
#: Jobs of the latency figure, one after the other.
LATENCY_JOBS = 40


def missing() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    try:
        import redis  # noqa: F401
        import rq  # noqa: F401
    except ImportError:
        return "the rq package is not installed (pip install -e '.[dev]')"
    return None


def tree_cpu(root: psutil.Process) -> float:
    """CPU seconds of ``root`` and every process below it, reaped children included."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def _own(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def role_cpu(node: psutil.Process) -> dict[str, float]:
    """CPU seconds of a queue node's process by role: the node itself, its worker manager, and the workers (every
    process below the manager, with the workers it has reaped)."""
    roles = {"node": 0.0, "manager": 0.0, "workers": 0.0}
    with contextlib.suppress(psutil.Error):
        roles["node"] = _own(node)
        for manager in node.children():
            roles["manager"] += _own(manager)
            reaped = manager.cpu_times()
            roles["workers"] += reaped.children_user + reaped.children_system
            roles["workers"] += sum(tree_cpu(worker) for worker in manager.children())
    return roles


def own_cpu() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def library(uri: str, n: int) -> dict[str, float]:
    database = "versus_rq"
    scheduler = Scheduler(connect(uri, database))
    flags = ["--pm", "static", "--min-children", "2", "--max-children", "2"]
    node = spawn_node(uri, database, ["benchmarks.jobs"], flags, env={"PYTHONPATH": str(ROOT)})
    try:
        warm = [scheduler.add_job(NOOP) for _ in range(4)]
        scheduler.wait_for(warm, timeout=60)
        tree = psutil.Process(node.pid)
        before_tree, before_own, before_roles = tree_cpu(tree), own_cpu(), role_cpu(tree)
        started = time.time()
        jobs = [scheduler.add_job(NOOP) for _ in range(n)]
        producer = own_cpu() - before_own
        scheduler.wait_for(jobs, timeout=600)
        elapsed = time.time() - started
        workers = tree_cpu(tree) - before_tree
        roles = {role: spent - before_roles[role] for role, spent in role_cpu(tree).items()}
        assert all(p.status == JobStatus.DONE for p in jobs)
        latencies = []
        for _ in range(LATENCY_JOBS):
            added = time.time()
            job = scheduler.add_job(NOOP).wait(timeout=60)
            assert job.ended is not None
            latencies.append((job.ended.timestamp() - added) * 1000)
    finally:
        stop_node(node)
        scheduler._db.client.drop_database(database)
    figures = _figures(n, elapsed, latencies, producer, workers)
    figures.update({f"{role}_ms": spent * 1000 / n for role, spent in roles.items()})
    return figures


def with_rq(redis_url: str, n: int, simple: bool = False) -> dict[str, float]:
    """RQ's figures; ``simple``: its SimpleWorker, which runs jobs in the worker process (no fork per job)."""
    import redis
    from rq import Queue

    connection = redis.Redis.from_url(redis_url)
    queue = Queue("bench", connection=connection)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rq.cli", "worker", "--url", redis_url, "--quiet", "bench"]
    if simple:
        cmd += ["--worker-class", "rq.worker.SimpleWorker"]
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        warm = [queue.enqueue("benchmarks.jobs.noop") for _ in range(4)]
        _wait_rq(warm, 60)
        trees = [psutil.Process(w.pid) for w in workers]
        before_tree, before_own = sum(tree_cpu(t) for t in trees), own_cpu()
        started = time.time()
        jobs = [queue.enqueue("benchmarks.jobs.noop") for _ in range(n)]
        producer = own_cpu() - before_own
        _wait_rq(jobs, 600)
        elapsed = time.time() - started
        spent = sum(tree_cpu(t) for t in trees) - before_tree
        latencies = []
        for _ in range(LATENCY_JOBS):
            job = queue.enqueue("benchmarks.jobs.noop")
            _wait_rq([job], 60)
            job.refresh()
            assert job.ended_at is not None and job.enqueued_at is not None
            latencies.append((job.ended_at - job.enqueued_at).total_seconds() * 1000)
    finally:
        for worker in workers:
            worker.kill()  # a warm shutdown can wait for a work horse; nothing of theirs is measured any more
        for worker in workers:
            worker.wait(30)
    return _figures(n, elapsed, latencies, producer, spent)


def _wait_rq(jobs: list[Any], timeout: float) -> None:
    from rq.job import Job

    connection = jobs[0].connection
    deadline = time.monotonic() + timeout
    ids = [job.id for job in jobs]
    while True:
        statuses = [job.get_status() for job in Job.fetch_many(ids, connection=connection) if job is not None]
        if all(status == "finished" for status in statuses) and len(statuses) == len(ids):
            return
        if any(status == "failed" for status in statuses):
            raise RuntimeError("an RQ job failed")
        if time.monotonic() > deadline:
            raise TimeoutError("RQ jobs unfinished")
        time.sleep(0.005 if len(ids) == 1 else 0.05)


def _figures(n: int, elapsed: float, latencies: list[float], producer: float, workers: float) -> dict[str, float]:
    ordered = sorted(latencies)

    def pct(p: int) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {
        "rate": n / elapsed,
        "p50": pct(50),
        "p99": pct(99),
        "cpu_ms": (producer + workers) * 1000 / n,
        "producer_ms": producer * 1000 / n,
        "workers_ms": workers * 1000 / n,
    }


def side_by_side(uri: str, n: int = N) -> dict[str, dict[str, float]]:
    ours = library(uri, n)
    with redis_server() as redis_url:
        theirs = with_rq(redis_url, n)
    with redis_server() as redis_url:
        simple = with_rq(redis_url, n, simple=True)
    return {"library": ours, "rq": theirs, "rq_simple": simple}
