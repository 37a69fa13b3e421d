"""Benchmarks (``make bench``): each prints one summary line; the run exits non-zero when a target is missed.

Targets are ratios or counts measured side by side in one run, never absolute times (shared 2-core machines).
1 throughput ratio, 2 latency, 3 round trips per job, 4 scale with a deep queue, 5 process cost per pm mode,
6 a priority job behind a queued backlog, 7 AsyncScheduler against Scheduler, 8 flow control (dependencies and
limits: what a dependent or limited job costs, how soon a dependent starts, how busy a limit keeps its slots),
9 side by side with RQ on Redis (benchmarks/versus_rq.py), 10 what an idle node, manager and worker cost,
11 scale-out: commands per job and add->start latency with 1, 2, 4 and 8 nodes, and the model extrapolating them
(benchmarks/scale_out.py, benchmarks/scaling_model.py; docs/scaling.md).
Results go to docs/performance.md (with docs/performance.png).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import DEFAULT_JOB_QUEUE_SIZE
from taskscheduler.node.nodeproc import spawn_node, stop_node
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import connect

ROOT = Path(__file__).resolve().parent.parent
NOOP = "benchmarks.jobs:Noop"
NAP = "benchmarks.jobs:Nap"
SECOND = "benchmarks.jobs:Second"
#: Queue depth of the capped figure of the scale benchmark (capped writes cost O(documents) on the test server).
CAPPED_SCALE = 300

T = TypeVar("T")


#: Flags every benchmark's queue node gets on top of its own (``--metrics-port``: measure with metrics on).
NODE_FLAGS: list[str] = []


def start_node(uri: str, database: str, *args: str) -> subprocess.Popen[bytes]:
    return spawn_node(uri, database, ["benchmarks.jobs"], [*args, *NODE_FLAGS], env={"PYTHONPATH": str(ROOT)})


@contextlib.contextmanager
def serving(uri: str, database: str, *node_args: str) -> Iterator[tuple[subprocess.Popen[bytes], Scheduler]]:
    """A queue node on ``database`` and a Scheduler for it, warmed up with one job; the database is dropped
    after."""
    node = start_node(uri, database, *node_args)
    scheduler = Scheduler(connect(uri, database))
    try:
        warm = scheduler.add_job(NOOP).wait(timeout=60)
        assert warm.status == JobStatus.DONE
        yield node, scheduler
    finally:
        stop_node(node)
        scheduler._db.client.drop_database(database)


def raw_rate(uri: str, n: int) -> float:
    """The server's limit for the same work: N inserts, then for each an atomic claim (``find_one_and_update`` by
    id and status) and a final update, on a capped collection of the default size.

    The inserts come first because that is what the library run does (``add_job`` N times, then the node works
    through them): claims and final updates then run against a collection holding the same N documents, as the
    library's do. Interleaving insert, claim and finish per document would measure a collection of N/2 documents
    on average, and on a server whose capped writes cost O(documents) that is a different workload.
    """
    db = connect(uri, f"raw_{n}")
    db.drop_collection("raw")
    db.create_collection("raw", capped=True, size=DEFAULT_JOB_QUEUE_SIZE)
    col = db["raw"]
    started = time.perf_counter()
    ids = [col.insert_one({"status": 0, "worker": None, "progress": 0.0, "data": None}).inserted_id for _ in range(n)]
    for job_id in ids:
        claimed = col.find_one_and_update({"_id": job_id, "status": 0}, {"$set": {"status": 2}})
        assert claimed is not None
        col.update_one({"_id": job_id, "status": 2}, {"$set": {"status": 3, "progress": 100.0}})
    elapsed = time.perf_counter() - started
    db.client.drop_database(f"raw_{n}")
    return n / elapsed


def library_rate(uri: str, n: int) -> float:
    with serving(uri, f"lib_{n}", "--pm", "static", "--min-children", "2", "--max-children", "2") as (_, scheduler):
        started = time.perf_counter()
        jobs = [scheduler.add_job(NOOP) for _ in range(n)]
        scheduler.wait_for(jobs, timeout=600)
        elapsed = time.perf_counter() - started
        assert all(p.status == JobStatus.DONE for p in jobs)
    return n / elapsed


def latency(uri: str, count: int = 50) -> dict[str, float]:
    ping_ms: list[float] = []
    to_start: list[float] = []
    to_wait: list[float] = []
    with serving(uri, "latency", "--pm", "dynamic", "--min-children", "2", "--max-children", "2") as (_, scheduler):
        for _ in range(count):
            t0 = time.perf_counter()
            scheduler._db.command("ping")
            ping_ms.append((time.perf_counter() - t0) * 1000)
            added_at = time.time()
            t1 = time.perf_counter()
            p = scheduler.add_job(NOOP)
            p.wait(timeout=60)
            to_wait.append((time.perf_counter() - t1) * 1000)
            assert p.started is not None
            to_start.append((p.started.timestamp() - added_at) * 1000)
    return {
        "rtt": statistics.median(ping_ms),
        "start_p50": _pct(to_start, 50),
        "start_p99": _pct(to_start, 99),
        "wait_p50": _pct(to_wait, 50),
        "wait_p99": _pct(to_wait, 99),
    }


def priority_latency(uri: str, backlog: int = 1000) -> dict[str, float]:
    """Start latency of a priority-90 job added behind ``backlog`` queued priority -90 jobs on a node with one
    worker (each job 50 ms): it should start once the running job ends (target: one run time + 100 ms)."""
    with serving(uri, "priority", "--pm", "static", "--min-children", "1", "--max-children", "1") as (_, scheduler):
        low = [scheduler.add_job(NAP, None, priority=-90) for _ in range(backlog)]
        # Let the node read the whole burst from its change stream first: measured is the backlog's effect,
        # not the stream's lag behind a burst of inserts.
        while sum(1 for _ in scheduler.get_jobs({"status": int(JobStatus.WAITING)})) >= backlog:
            time.sleep(0.05)
        time.sleep(2.0)
        samples, runs, over = [], [], []
        for _ in range(5):
            added_at = time.time()
            urgent = scheduler.add_job(NAP, None, priority=90).wait(timeout=60)
            assert urgent.started is not None
            waited = (urgent.started.timestamp() - added_at) * 1000
            # The job the urgent one had to wait for: the low one that ended last before it started. Its run
            # (claim to recorded end) is the most the urgent job may wait, plus 100 ms.
            before = max(
                (
                    p
                    for p in scheduler.get_jobs({"status": int(JobStatus.DONE), "options.priority": -90})
                    if p.ended is not None and p.ended <= urgent.started
                ),
                key=lambda p: p.ended,
            )
            assert before.started is not None and before.ended is not None
            run_ms = (before.ended - before.started).total_seconds() * 1000
            samples.append(waited)
            runs.append(run_ms)
            over.append(waited - run_ms)
        waiting = sum(1 for _ in scheduler.get_jobs({"status": int(JobStatus.WAITING)}))
    assert waiting > backlog / 2, "the backlog drained before the urgent jobs came: measure with a deeper one"
    del low
    return {
        "p50": _pct(samples, 50),
        "max": max(samples),
        "run_p50": _pct(runs, 50),
        "over_max": max(over),
        "waiting": float(waiting),
    }


def async_latency(uri: str, count: int = 40) -> dict[str, float]:
    """add -> done (wait returns) p50 through Scheduler and through AsyncScheduler, alternating, on one node."""
    import asyncio

    from pymongo import AsyncMongoClient

    from taskscheduler import AsyncScheduler

    database = "asynclatency"
    sync_ms: list[float] = []
    async_ms: list[float] = []

    async def run(scheduler: Scheduler) -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
        async with AsyncScheduler(client[database]) as aio:
            for _ in range(count):
                t0 = time.perf_counter()
                scheduler.add_job(NOOP).wait(timeout=60)
                sync_ms.append((time.perf_counter() - t0) * 1000)
                t1 = time.perf_counter()
                p = await aio.add_job(NOOP)
                await p.wait(timeout=60)
                async_ms.append((time.perf_counter() - t1) * 1000)
        await client.close()

    with serving(uri, database, "--pm", "static", "--min-children", "2", "--max-children", "2") as (_, scheduler):
        asyncio.run(run(scheduler))
    return {"sync_p50": _pct(sync_ms, 50), "async_p50": _pct(async_ms, 50)}


def round_trips(uri: str, n: int = 100) -> dict[str, float]:
    with serving(uri, "roundtrips", "--pm", "static", "--min-children", "2", "--max-children", "2") as (_, scheduler):
        admin = scheduler._db.client.admin
        time.sleep(1)
        before = admin.command("serverStatus")["opcounters"]
        jobs = [scheduler.add_job(NOOP) for _ in range(n)]
        scheduler.wait_for(jobs, timeout=600)
        after = admin.command("serverStatus")["opcounters"]
    delta = {k: after[k] - before[k] for k in after}
    writes_reads = sum(delta[k] for k in ("insert", "query", "update", "delete"))
    return {
        "per_job": writes_reads / n,
        "getmore_per_job": delta["getmore"] / n,
        "commands_per_job": delta["command"] / n,
        **{k: v / n for k, v in delta.items()},
    }


def flow_costs(uri: str, n: int = 60) -> dict[str, float]:
    """Server commands per job (inserts, queries, updates, deletes; getMores apart) for plain jobs while limits
    and pauses exist on other keys, for jobs under a limit that never fills, and for dependent jobs (each job
    depends on the one added before it, which is DONE or about to be)."""

    def counted(scheduler: Scheduler, add: Callable[[], list[Any]]) -> dict[str, float]:
        admin = scheduler._db.client.admin
        before = admin.command("serverStatus")["opcounters"]
        jobs = add()
        scheduler.wait_for(jobs, timeout=600)
        assert all(p.status == JobStatus.DONE for p in jobs)
        after = admin.command("serverStatus")["opcounters"]
        delta = {k: after[k] - before[k] for k in after}
        return {
            "per_job": sum(delta[k] for k in ("insert", "query", "update", "delete")) / len(jobs),
            "getmore": delta["getmore"] / len(jobs),
        }

    out: dict[str, float] = {}
    with serving(uri, "flowcost", "--pm", "static", "--min-children", "2", "--max-children", "2") as (_, scheduler):
        scheduler.set_limit("some.other:Job", concurrency=1)
        scheduler.pause("another.key")
        time.sleep(1)  # the node has read the controls
        plain = counted(scheduler, lambda: [scheduler.add_job(NOOP) for _ in range(n)])
        scheduler.set_limit("bench", concurrency=1000)
        limited = counted(scheduler, lambda: [scheduler.add_job(NOOP, limit_key="bench") for _ in range(n)])

        def chain() -> list[Any]:
            jobs = [scheduler.add_job(NOOP)]
            for _ in range(n - 1):
                jobs.append(scheduler.add_job(NOOP, depends_on=[jobs[-1]]))
            return jobs

        dependent = counted(scheduler, chain)
    for name, figures in (("plain", plain), ("limited", limited), ("dependent", dependent)):
        out[name] = figures["per_job"]
        out[f"{name}_getmore"] = figures["getmore"]
    return out


def dependent_latency(uri: str, count: int = 40) -> dict[str, float]:
    """Seconds from a dependency's recorded end to its dependent's recorded start (both on the server clock), one
    node with a free worker: the dependent is added while its dependency still waits or runs."""
    gaps: list[float] = []
    with serving(uri, "dependents", "--pm", "static", "--min-children", "2", "--max-children", "2") as (_, scheduler):
        for _ in range(count):
            first = scheduler.add_job(NAP)
            second = scheduler.add_job(NOOP, depends_on=[first])
            scheduler.wait_for([first, second], timeout=60)
            assert first.ended is not None and second.started is not None
            gaps.append((second.started - first.ended).total_seconds())
    return {"p50": _pct(gaps, 50), "p99": _pct(gaps, 99), "max": max(gaps)}


def limited_throughput(uri: str, concurrency: int = 3, jobs: int = 12) -> dict[str, float]:
    """Jobs/s of 1 s jobs under ``concurrency`` on two nodes of two workers each (more workers than slots), from
    the first start to the last end; the target is ``concurrency`` per second."""
    database = "limited"
    scheduler = Scheduler(connect(uri, database))
    scheduler.set_limit("bench", concurrency=concurrency)
    flags = ("--pm", "static", "--min-children", "2", "--max-children", "2")
    nodes = [start_node(uri, database, *flags) for _ in range(2)]
    try:
        warm = [scheduler.add_job(NOOP) for _ in range(4)]
        scheduler.wait_for(warm, timeout=60)
        batch = [scheduler.add_job(SECOND, limit_key="bench") for _ in range(jobs)]
        scheduler.wait_for(batch, timeout=300)
        spans = [(p.started, p.ended) for p in batch]
    finally:
        for node in nodes:
            stop_node(node)
        scheduler._db.client.drop_database(database)
    assert all(start is not None and end is not None for start, end in spans)
    first = min(start for start, _ in spans if start is not None)
    last = max(end for _, end in spans if end is not None)
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # type: ignore[type-var]
    busy = most = 0
    for _, step in edges:
        busy += step
        most = max(most, busy)
    return {"rate": jobs / (last - first).total_seconds(), "most_at_once": most, "concurrency": concurrency}


def idle_cost(uri: str, seconds: float = 10.0) -> dict[str, float]:
    """CPU milliseconds per second of an idle queue node's main process, its manager and each of its workers
    (static pool of two), over ``seconds`` after a warm-up job."""
    import psutil

    with serving(uri, "idle", "--pm", "static", "--min-children", "2", "--max-children", "2") as (node, _):
        time.sleep(2.0)  # the warm-up job's aftermath is over
        root = psutil.Process(node.pid)
        managers = root.children()
        workers = [w for m in managers for w in m.children()]

        def cpu(proc: psutil.Process) -> float:
            """CPU seconds of every thread, to the nanosecond (psutil counts 10 ms ticks)."""
            total = 0
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    total += int((task / "schedstat").read_text().split()[0])
            return total / 1e9

        roles = {"node": [root], "manager": managers, "worker": workers}
        before = {role: [cpu(p) for p in procs] for role, procs in roles.items()}
        time.sleep(seconds)
        after = {role: [cpu(p) for p in procs] for role, procs in roles.items()}
    # The busiest process of each role, in ms of CPU per second.
    return {
        role: max((a - b for a, b in zip(after[role], before[role], strict=True)), default=0.0) * 1000 / seconds
        for role in roles
    }


def scale_rate(uri: str, queued: int, capped: bool) -> float:
    """Jobs/s when ``queued`` jobs wait before the node starts (first claim to last DONE)."""
    database = f"scale_{queued}_{int(capped)}"
    sizes = {} if capped else {"job_queue_size": 0, "event_queue_size": 0}
    flags = [] if capped else ["--job-queue-size", "0", "--event-queue-size", "0"]
    scheduler = Scheduler(connect(uri, database), options=sizes)
    jobs = [scheduler.add_job(NOOP) for _ in range(queued)]
    node = start_node(uri, database, "--pm", "static", "--min-children", "2", "--max-children", "2", *flags)
    try:
        scheduler.wait_for(jobs, timeout=1800)
        docs = list(scheduler.store.jobs.find({}, {"started": 1, "ended": 1}))
    finally:
        stop_node(node)
        scheduler._db.client.drop_database(database)
    first = min(d["started"] for d in docs)
    last = max(d["ended"] for d in docs)
    return queued / max(1e-6, (last - first).total_seconds())


def process_cost(uri: str, n: int = 120) -> dict[str, tuple[float, float]]:
    """No-op jobs/s and mean unique memory (MiB) of a worker process, per pm mode."""
    out: dict[str, tuple[float, float]] = {}
    for pm in ("ondemand", "dynamic", "static"):
        memory: list[float] = []
        done = threading.Event()
        with serving(uri, f"pm_{pm}", "--pm", pm, "--min-children", "2", "--max-children", "2") as (node, scheduler):
            sampler = threading.Thread(target=_sample_worker_memory, args=(node.pid, done, memory))
            sampler.start()
            try:
                started = time.perf_counter()
                jobs = [scheduler.add_job(NAP) for _ in range(n)]
                scheduler.wait_for(jobs, timeout=300)
                rate = n / (time.perf_counter() - started)
            finally:
                done.set()
        out[pm] = (rate, statistics.mean(memory) if memory else 0.0)
    return out


def _sample_worker_memory(node_pid: int, done: threading.Event, out: list[float]) -> None:
    """Unique memory (MiB) of each worker process of a node, every 20 ms until ``done``."""
    import psutil

    while not done.wait(0.02):
        try:
            managers = psutil.Process(node_pid).children()
        except psutil.Error:
            return
        for manager in managers:
            for worker in manager.children():
                try:
                    out.append(worker.memory_full_info().uss / 2**20)
                except psutil.Error:
                    pass


def _pct(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


@contextlib.contextmanager
def fresh_server(uri: str | None) -> Iterator[str]:
    """The URI every client of one benchmark uses: ``uri`` when given (a real deployment), else a fresh
    embedded server's.

    Retryable writes are off for raw and library clients alike on the embedded server: SecantusDB keeps up to
    10,000 retryable-write records and scans (past the cap: sorts) all of them on every write, so each write
    would get slower with the writes before it; real MongoDB keeps one record per session. With retryable
    writes on, that server cost would dominate every figure below.
    """
    if uri is not None:
        yield uri
        return
    with EmbeddedServer(port=0, data_dir=":memory:") as server:
        yield server.uri + "&retryWrites=false"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="300,2000")
    parser.add_argument("--scale", default="10000,1000", help="deep,shallow queue for the scale benchmark")
    parser.add_argument(
        "--mongodb-uri",
        default=None,
        help="measure this deployment (e.g. a replica set) instead of fresh embedded servers; its databases "
        "raw_*, lib_*, latency, roundtrips, scale_* and pm_* are dropped after use",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="start the queue nodes with their Prometheus endpoint on this port (0: off), to compare costs",
    )
    parser.add_argument("--only", default=None, choices=["flow", "rq", "idle", "scale"], help="run only this benchmark")
    args = parser.parse_args()
    if args.metrics_port:
        NODE_FLAGS.extend(["--metrics-port", str(args.metrics_port)])
    uri = args.mongodb_uri
    failed = False
    results: dict[str, Any] = {}
    if args.only == "flow":
        return 1 if flow_benchmarks(uri, results) else 0
    if args.only == "rq":
        return 1 if rq_benchmark(uri, results) else 0
    import scale_out  # benchmark 11; benchmarks/ is this script's folder

    if args.only == "scale":  # with its tables, the model's fit, prediction and check
        return 1 if scale_out.scale_out_benchmark(uri, results, detail=True) else 0
    if args.only == "idle":
        idle = measure(uri, idle_cost)
        return 1 if summary(f"idle: {idle}", max(idle.values()) <= 0.5) else 0
    for n in [int(x) for x in args.sizes.split(",")]:
        raw = measure(uri, raw_rate, n)
        lib = measure(uri, library_rate, n)
        results[f"throughput_{n}"] = (raw, lib)
        failed |= summary(
            f"throughput N={n}: raw {raw:.0f} jobs/s, library {lib:.0f} jobs/s, ratio {lib / raw:.2f} (target >= 0.5)",
            lib >= 0.5 * raw,
        )
    lat = results["latency"] = measure(uri, latency)
    failed |= summary(
        f"latency: add->start p50 {lat['start_p50']:.1f} ms p99 {lat['start_p99']:.1f} ms, add->wait_for "
        f"p50 {lat['wait_p50']:.1f} ms p99 {lat['wait_p99']:.1f} ms, rtt {lat['rtt']:.2f} ms "
        f"(target p50 <= 20 ms + rtt, p99 <= 100 ms)",
        lat["start_p50"] <= 20 + lat["rtt"] and lat["start_p99"] <= 100,
    )
    prio = results["priority"] = measure(uri, priority_latency)
    failed |= summary(
        f"priority: a priority-90 job behind {prio['waiting']:.0f} queued priority -90 jobs (one worker; a low "
        f"job's run, claim to recorded end, p50 {prio['run_p50']:.0f} ms) started after p50 {prio['p50']:.0f} ms, "
        f"max {prio['max']:.0f} ms: at most {prio['over_max']:.0f} ms more than the run it waited for "
        f"(target <= 100 ms)",
        prio["over_max"] <= 100,
    )
    aio = results["asyncio"] = measure(uri, async_latency)
    summary(f"asyncio: add->done p50 AsyncScheduler {aio['async_p50']:.1f} ms, Scheduler {aio['sync_p50']:.1f} ms")
    rt = results["round_trips"] = measure(uri, round_trips)
    failed |= summary(
        f"round trips: {rt['per_job']:.2f} reads/writes per job (insert {rt['insert']:.2f}, query "
        f"{rt['query']:.2f}, update {rt['update']:.2f}, delete {rt['delete']:.2f}); change-stream getMore "
        f"{rt['getmore_per_job']:.2f}, other commands {rt['commands_per_job']:.2f} per job (target <= 6)",
        rt["per_job"] <= 6,
    )
    big, small = (int(x) for x in args.scale.split(","))
    plain = {q: measure(uri, scale_rate, q, False) for q in (small, big)}
    capped_small = measure(uri, scale_rate, CAPPED_SCALE, True)
    results["scale"] = (plain, capped_small)
    failed |= summary(
        f"scale: capped {capped_small:.0f} jobs/s with {CAPPED_SCALE} queued; job_queue_size=0: {plain[small]:.0f} "
        f"jobs/s with {small} queued, {plain[big]:.0f} jobs/s with {big} queued, ratio "
        f"{plain[big] / plain[small]:.2f} (target >= 0.8)",
        plain[big] >= 0.8 * plain[small],
    )
    failed |= flow_benchmarks(uri, results)
    failed |= rq_benchmark(uri, results)
    failed |= scale_out.scale_out_benchmark(uri, results)
    idle = results["idle"] = measure(uri, idle_cost)
    failed |= summary(
        f"idle: node {idle['node']:.2f} ms/s, manager {idle['manager']:.2f} ms/s, worker {idle['worker']:.2f} ms/s "
        f"of CPU (target <= 0.5 each)",
        max(idle.values()) <= 0.5,
    )
    cost = results["pm"] = measure(uri, process_cost)
    summary("process cost: " + ", ".join(f"{pm} {r:.1f} jobs/s {m:.1f} MiB/worker" for pm, (r, m) in cost.items()))
    write_report(results)
    return 1 if failed else 0


def flow_benchmarks(uri: str | None, results: dict[str, Any]) -> bool:
    """Benchmark 8 (flow control); True when a target was missed."""
    flow = results["flow"] = measure(uri, flow_costs)
    dep = results["dependents"] = measure(uri, dependent_latency)
    lim = results["limited"] = measure(uri, limited_throughput)
    rt = results.get("round_trips")
    return summary(
        f"flow control: reads/writes per job: plain {flow['plain']:.2f} (with limits and pauses on other keys), "
        f"limited {flow['limited']:.2f}, dependent {flow['dependent']:.2f}; a dependent started "
        f"p50 {dep['p50'] * 1000:.0f} ms, p99 {dep['p99'] * 1000:.0f} ms after its dependency ended (target p99 "
        f"<= 1 s); 1 s jobs under concurrency={lim['concurrency']:.0f} on 2 nodes: {lim['rate']:.2f} jobs/s, at most "
        f"{lim['most_at_once']:.0f} at once (target >= {0.85 * lim['concurrency']:.2f} jobs/s, never more than "
        f"{lim['concurrency']:.0f}; plain jobs no dearer than the round-trips benchmark's)",
        dep["p99"] <= 1.0
        and lim["rate"] >= 0.85 * lim["concurrency"]
        and lim["most_at_once"] <= lim["concurrency"]
        and (rt is None or flow["plain"] <= rt["per_job"] + 0.05),
    )


def rq_benchmark(uri: str | None, results: dict[str, Any]) -> bool:
    """Benchmark 9 (side by side with RQ); True when a target was missed. Skipped with the reason when Redis or
    RQ is missing."""
    import versus_rq  # benchmarks/ is this script's folder

    reason = versus_rq.missing()
    if reason is not None:
        summary(f"versus RQ: skipped ({reason})")
        return False
    both = results["versus_rq"] = measure(uri, versus_rq.side_by_side)
    ours, rq = both["library"], both["rq"]
    return summary(
        f"versus RQ ({versus_rq.N} no-op jobs, 2 workers each): library {ours['rate']:.0f} jobs/s, "
        f"{ours['cpu_ms']:.2f} ms client CPU per job (producer {ours['producer_ms']:.2f}, node "
        f"{ours['node_ms']:.2f}, manager {ours['manager_ms']:.2f}, workers {ours['workers_ms']:.2f}), add->done "
        f"p50 {ours['p50']:.1f} ms p99 {ours['p99']:.1f} ms; RQ "
        f"{rq['rate']:.0f} jobs/s, {rq['cpu_ms']:.2f} ms per job (producer {rq['producer_ms']:.2f}, workers "
        f"{rq['workers_ms']:.2f}), p50 {rq['p50']:.1f} ms p99 {rq['p99']:.1f} ms; RQ SimpleWorker (no fork per "
        f"job) {both['rq_simple']['rate']:.0f} jobs/s, {both['rq_simple']['cpu_ms']:.2f} ms per job, p50 "
        f"{both['rq_simple']['p50']:.1f} ms (targets: CPU per job <= a third of RQ's, p50 <= RQ's)",
        ours["cpu_ms"] * 3 <= rq["cpu_ms"] and ours["p50"] <= rq["p50"],
    )


def measure(uri: str | None, benchmark: Callable[..., T], *args: Any) -> T:
    """Run one benchmark against ``uri``, or against a fresh embedded server: the test server slows down as its
    oplog grows, and one benchmark's leftovers must not weigh on the next."""
    with fresh_server(uri) as target:
        return benchmark(target, *args)


def summary(line: str, ok: bool | None = None) -> bool:
    """Print a benchmark's summary line, with its verdict when it has a target; True when the target was missed."""
    print(line if ok is None else f"{line} {'OK' if ok else 'MISSED'}", flush=True)
    return ok is False


def write_report(results: dict[str, Any]) -> None:
    """Plot the throughput figures next to docs/performance.md (which embeds the image)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels, raw, lib = [], [], []
    for key, value in results.items():
        if key.startswith("throughput_"):
            labels.append(f"N={key.split('_')[1]}")
            raw.append(value[0])
            lib.append(value[1])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(labels))
    axes[0].bar([x - 0.2 for x in xs], raw, width=0.4, label="raw insert+claim+finish")
    axes[0].bar([x + 0.2 for x in xs], lib, width=0.4, label="library, 1 node, 2 workers")
    axes[0].set_xticks(list(xs), labels)
    axes[0].set_ylabel("jobs/s (capped collections, test server)")
    axes[0].legend()
    pm = results.get("pm", {})
    axes[1].bar(list(pm), [v[0] for v in pm.values()])
    axes[1].set_ylabel("jobs/s (50 ms jobs, 2 workers)")
    axes[1].set_title("pm modes")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "performance.png", dpi=90)


if __name__ == "__main__":
    sys.exit(main())
