"""Throughput of this code against another revision, interleaved, on the same machine in one run.

    python benchmarks/compare.py --base e06a7c2 --rounds 5 --size 300

A shared 2-core machine drifts by more than the changes we measure: one run of each side tells nothing. This
script checks the base revision out into a temporary worktree and measures both sides in alternation (A B, then
B A, ...), each measurement on a fresh embedded server, and prints the medians: the raw loop of the server (as in
run.py), the library's jobs/s, their ratio, and the client CPU per job (the queue node, its manager and workers;
the server excluded), which is the steadiest of the three. Both sides run under this interpreter (the same
dependencies); each imports its own ``taskscheduler`` from its own ``src``. Only the public API and the
``taskscheduler queue`` command are used, so any revision since the first round can be a side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
JOB_MODULE = "compare_jobs"
JOB_SOURCE = """
from taskscheduler import AbstractJob


class Noop(AbstractJob):
    def start(self):
        return None
"""


def measure(tree: Path, size: int, jobs_dir: Path) -> dict[str, float]:
    """One measurement of ``tree`` in a process of its own (its ``taskscheduler`` imported from its ``src``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(jobs_dir)])}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", str(size)],
        env=env,
        cwd=str(tree / "src"),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring {tree} failed:\n{out.stderr[-4000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _measure_here(size: int) -> dict[str, float]:
    """Runs in the side's process: a fresh embedded server, the raw loop, then one node with two workers."""
    import psutil

    from taskscheduler import JobStatus, Scheduler
    from taskscheduler.constants import DEFAULT_JOB_QUEUE_SIZE

    try:
        from taskscheduler.ops.embedded import EmbeddedServer
    except ImportError:  # before the layout of issue 18
        from taskscheduler.embedded import EmbeddedServer  # type: ignore[import-not-found,no-redef]
    from pymongo import MongoClient

    with EmbeddedServer(port=0, data_dir=":memory:") as server:
        uri = server.uri + "&retryWrites=false"
        client: MongoClient[dict[str, Any]] = MongoClient(uri)
        raw_db = client["raw"]
        raw_db.create_collection("raw", capped=True, size=DEFAULT_JOB_QUEUE_SIZE)
        col = raw_db["raw"]
        started = time.perf_counter()
        ids = [
            col.insert_one({"status": 0, "worker": None, "progress": 0.0, "data": None}).inserted_id
            for _ in range(size)
        ]
        for job_id in ids:
            col.find_one_and_update({"_id": job_id, "status": 0}, {"$set": {"status": 2}})
            col.update_one({"_id": job_id, "status": 2}, {"$set": {"status": 3, "progress": 100.0}})
        raw = size / (time.perf_counter() - started)

        env = {**os.environ, "TASKSCHEDULER_MONGODB_URI": uri}
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskscheduler",
                "queue",
                "--database",
                "lib",
                "--import",
                JOB_MODULE,
                "--pm",
                "static",
                "--min-children",
                "2",
                "--max-children",
                "2",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            scheduler = Scheduler(client["lib"])
            warm = scheduler.add_job(f"{JOB_MODULE}:Noop").wait(timeout=120)
            assert warm.status == JobStatus.DONE, warm.status
            tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
            cpu_before = sum(sum(p.cpu_times()[:2]) for p in tree)
            started = time.perf_counter()
            jobs = [scheduler.add_job(f"{JOB_MODULE}:Noop") for _ in range(size)]
            scheduler.wait_for(jobs, timeout=600)
            elapsed = time.perf_counter() - started
            tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
            cpu_after = sum(sum(p.cpu_times()[:2]) for p in tree)
            assert all(p.status == JobStatus.DONE for p in jobs)
        finally:
            node.terminate()
            node.wait(timeout=60)
    return {"raw": raw, "library": size / elapsed, "node_cpu_ms": (cpu_after - cpu_before) * 1000 / size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD~1", help="the revision to compare this working tree against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--measure", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure_here(args.measure)))
        return 0
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        base = Path(tmp) / "base"
        jobs_dir = Path(tmp) / "jobs"
        jobs_dir.mkdir()
        (jobs_dir / f"{JOB_MODULE}.py").write_text(JOB_SOURCE)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base],
            check=True,
            capture_output=True,
        )
        try:
            sides = {"this": ROOT, args.base: base}
            found: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
            for i in range(args.rounds):
                order = list(sides) if i % 2 == 0 else list(reversed(sides))
                for name in order:
                    m = measure(sides[name], args.size, jobs_dir)
                    found[name].append(m)
                    print(
                        f"round {i + 1} {name}: raw {m['raw']:.0f}, library {m['library']:.1f} jobs/s, "
                        f"ratio {m['library'] / m['raw']:.3f}, node CPU {m['node_cpu_ms']:.2f} ms/job",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    for name, ms in found.items():
        print(
            f"median {name}: raw {statistics.median(m['raw'] for m in ms):.0f}, library "
            f"{statistics.median(m['library'] for m in ms):.1f} jobs/s, ratio "
            f"{statistics.median(m['library'] / m['raw'] for m in ms):.3f}, node CPU "
            f"{statistics.median(m['node_cpu_ms'] for m in ms):.2f} ms/job (N={args.size}, {args.rounds} rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
