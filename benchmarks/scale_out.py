"""Benchmark 11: what a job costs as queue nodes are added (issue 22), and the model that extrapolates it.

``scale_out`` starts N queue nodes of one worker each on one database and adds no-op jobs at a pace the cluster
keeps up with (one every 20 ms: the cost of a job, not of a backlog), then the same nodes get a burst (all added at
once: a saturated cluster). For each, server commands per job by kind (``serverStatus`` opcounters, every client
counted: producer, nodes, managers, workers) and, for the paced jobs, add->start p50/p99 (the stored start against
the time of the add, as ``run.latency`` measures it) and the server's CPU per job.

``scale_out_benchmark`` runs it with 1, 2, 4 and 8 nodes, each on a fresh embedded server, and prints one summary
line. Targets (issue 22): updates per job at most 2.1 at every node count (a job's claim and its end, and not one
losing claim per extra node), add->start p50 with 8 nodes no worse than with 1 plus 5 ms; the getMore growth per
node is reported. With ``detail`` (``run.py --only scale``) it also prints the measured table, the per-command
server costs (``command_costs``), the model's fit, its prediction for 10, 100 and 1,000 nodes and its check against
the measured points (benchmarks/scaling_model.py; docs/scaling.md explains the figures).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psutil
from bson import ObjectId
from pymongo import MongoClient
from scaling_model import KINDS, PREDICT_FOR, Costs, Model, check  # benchmarks/ is the script's folder

from taskscheduler import JobStatus, Process, Scheduler
from taskscheduler.node.nodeproc import spawn_node, stop_node
from taskscheduler.node.queue import ROUTED
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import connect

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
NOOP = "benchmarks.jobs:Noop"
#: One worker per node: a node with a busy worker should not take part in a claim (issue 22).
NODE_FLAGS = ("--pm", "static", "--min-children", "1", "--max-children", "1")
NODE_COUNTS = (1, 2, 4, 8)
#: Paced jobs per node count, and the pause between two adds: 50 jobs/s, which one node with one worker keeps up
#: with on a shared 2-core machine (a no-op job holds its worker well under 20 ms), so no job waits for a worker.
JOBS = 200
PACE_SECONDS = 0.02
#: Jobs of the burst figure, added at once after the paced ones.
BURST = 100
#: Idle window that measures the cluster's background (registry writes, lease renewals, empty stream reads): one
#: heartbeat period at the default orphaned_timeout (30 s / 6), so every node's registry write falls in it.
IDLE_SECONDS = 5.0
#: Targets (issue 22).
MAX_UPDATES_PER_JOB = 2.1
MAX_P50_GROWTH_MS = 5.0


# -- one node count ---------------------------------------------------------------------------------------------


def scale_out(
    uri: str,
    nodes: int,
    jobs: int = JOBS,
    burst: int = BURST,
    pace: float = PACE_SECONDS,
    database: str | None = None,
    idle_seconds: float = IDLE_SECONDS,
) -> dict[str, float]:
    """Commands per job by kind, add->start p50/p99 (ms) and server CPU per job (ms) of ``jobs`` paced no-op jobs
    through ``nodes`` idle nodes of one worker each; ``burst_*``: the same for ``burst`` jobs added at once;
    ``idle_*``: the cluster's background per second. The database is dropped after."""
    database = database or f"scale_out_{nodes}"
    scheduler = Scheduler(connect(uri, database))
    client = scheduler.db.client
    server = server_process(client)
    # benchmarks.jobs from this checkout; the rest of PYTHONPATH kept, so that nodes run the code the producer
    # imports (PYTHONPATH=/some/checkout/src measures that checkout).
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    procs = [spawn_node(uri, database, ["benchmarks.jobs"], NODE_FLAGS, env={"PYTHONPATH": path}) for _ in range(nodes)]
    try:
        _wait_registered(scheduler, procs)
        warm_workers = _warm_up(scheduler, nodes)
        time.sleep(1.0)  # the warm-up's aftermath (ends recorded, every stream read to its end) is over
        with _Meter(client, server) as idle:
            time.sleep(idle_seconds)
        paced = _paced(scheduler, server, jobs, pace)
        bursted = _burst(scheduler, server, burst)
    finally:
        _stop_all(procs)
        client.drop_database(database)
        client.close()
    out = dict(paced)
    out.update({f"burst_{key}": value for key, value in bursted.items()})
    out.update({f"idle_{kind}": count / idle.seconds for kind, count in idle.counts.items()})
    out["idle_server_ms"] = idle.server_ms / idle.seconds
    out["warm_workers"] = float(warm_workers)
    return out


def _wait_registered(scheduler: Scheduler, procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """Until every node is in the registry (it opens its change stream right after registering)."""
    deadline = time.monotonic() + timeout
    while len(scheduler.store.live_nodes()) < len(procs):
        dead = [p.pid for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"queue node(s) {dead} exited before registering")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(scheduler.store.live_nodes())} of {len(procs)} nodes registered")
        time.sleep(0.05)


def _warm_up(scheduler: Scheduler, nodes: int, rounds: int = 10) -> int:
    """Rounds of ``nodes`` jobs added at once until every node's worker has run one (its worker started, its
    stream open) or ``rounds`` ran out; returns how many workers ran one."""
    seen: set[Any] = set()
    for _ in range(rounds):
        batch = [scheduler.add_job(NOOP) for _ in range(nodes)]
        scheduler.wait_for(batch, timeout=60)
        seen.update(p.worker for p in batch)
        if len(seen) >= nodes:
            break
    return len(seen)


def _paced(scheduler: Scheduler, server: psutil.Process | None, jobs: int, pace: float) -> dict[str, float]:
    """``jobs`` no-op jobs, one every ``pace`` seconds on a fixed schedule (after a late add the next ones follow
    at once until it is caught up; ``pace_ms`` reports the pace kept overall)."""
    added_at: list[float] = []
    batch: list[Process] = []
    with _Meter(scheduler.db.client, server) as meter:
        first = time.perf_counter()
        for i in range(jobs):
            delay = first + i * pace - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            added_at.append(time.time())
            batch.append(scheduler.add_job(NOOP))
        last = time.perf_counter()
        scheduler.wait_for(batch, timeout=300)
    _check_done(batch)
    to_start = [(p.started.timestamp() - at) * 1000 for p, at in zip(batch, added_at, strict=True) if p.started]
    return {
        **{kind: count / jobs for kind, count in meter.counts.items()},
        "start_p50": pct(to_start, 50),
        "start_p99": pct(to_start, 99),
        "server_ms": meter.server_ms / jobs,
        # The pace the producer kept (it falls behind when the machine is busy): what the figures were measured at.
        "pace_ms": (last - first) * 1000 / max(1, jobs - 1),
        "workers_used": float(len({p.worker for p in batch})),
    }


def _burst(scheduler: Scheduler, server: psutil.Process | None, jobs: int) -> dict[str, float]:
    with _Meter(scheduler.db.client, server) as meter:
        batch = [scheduler.add_job(NOOP) for _ in range(jobs)]
        scheduler.wait_for(batch, timeout=300)
    _check_done(batch)
    return {
        **{kind: count / jobs for kind, count in meter.counts.items()},
        "server_ms": meter.server_ms / jobs,
        "rate": jobs / meter.seconds,
    }


def _check_done(batch: list[Process]) -> None:
    wrong = [p.id for p in batch if p.status != JobStatus.DONE]
    if wrong:
        raise RuntimeError(f"{len(wrong)} job(s) did not end DONE, e.g. {wrong[0]}")


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every node first, then wait for each: a node takes up to a second to stop, one after the other
    would cost that per node."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        stop_node(proc)


# -- measuring the server ---------------------------------------------------------------------------------------


def server_process(client: MongoClient[dict[str, Any]]) -> psutil.Process | None:
    """The server's process when it runs on this machine and we may read it (the embedded server: our child),
    found by the pid ``serverStatus`` names and checked by the port it listens on; else None (CPU not measured)."""
    pid = client.admin.command("serverStatus").get("pid")
    address = client.address
    if not isinstance(pid, int) or address is None:
        return None
    try:
        proc = psutil.Process(pid)
        ports = {c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    except (psutil.Error, OSError):
        return None
    return proc if address[1] in ports else None


def cpu_ms(proc: psutil.Process | None) -> float:
    """CPU milliseconds of every thread of ``proc`` so far, to the nanosecond where Linux tells it (psutil counts
    10 ms ticks, too coarse for a loop of a few hundred commands); 0 without a process."""
    if proc is None:
        return 0.0
    total = 0
    try:
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e6
    except OSError:
        times = proc.cpu_times()
        return float(times.user + times.system) * 1000


class _Meter:
    """Opcounters, server CPU and wall time spent inside a ``with`` block."""

    def __init__(self, client: MongoClient[dict[str, Any]], server: psutil.Process | None) -> None:
        self.admin = client.admin
        self.server = server
        self.counts: dict[str, float] = {}
        self.server_ms = 0.0
        self.seconds = 0.0

    def _opcounters(self) -> dict[str, int]:
        found = self.admin.command("serverStatus")["opcounters"]
        return {kind: int(found.get(kind, 0)) for kind in KINDS}

    def __enter__(self) -> _Meter:
        self._before = self._opcounters()
        self._cpu = cpu_ms(self.server)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
        self.server_ms = cpu_ms(self.server) - self._cpu
        after = self._opcounters()
        # serverStatus itself: one command before, one after, not the measured work's.
        self.counts = {kind: float(after[kind] - self._before[kind]) for kind in KINDS}
        self.counts["command"] = max(0.0, self.counts["command"] - 1)


# -- per-command costs ------------------------------------------------------------------------------------------


def command_costs(uri: str, fill: int = 100, repeat: int = 150) -> dict[str, float]:
    """Server CPU milliseconds per command of each kind the model prices (``rtt_*``: the median round trip seen by
    the client, which is what is left when the server's CPU cannot be read), against a job collection of the
    default capped size holding ``fill`` real jobs and growing by ``2 * repeat`` copies of them (about as many
    documents as a scale-out run leaves): an insert, the library's claim (a conditional update pipeline by
    ``_id``) won and lost, a run's end, a ``findOneAndUpdate`` claim (Agenda's), a find by ``_id``, a delete by
    ``_id``, a ``ping``, and a getMore of a node's change stream returning one change."""
    database = "scale_out_costs"
    scheduler = Scheduler(connect(uri, database))
    client = scheduler.db.client
    server = server_process(client)
    store = scheduler.store
    jobs = store.jobs
    try:
        for _ in range(fill):
            scheduler.add_job(NOOP)
        template = jobs.find_one({})
        assert template is not None

        def fresh() -> dict[str, Any]:
            return dict(template, _id=ObjectId(), status=int(JobStatus.WAITING))

        out: dict[str, float] = {}
        # A node's stream as the node opens it (no listeners: routed statuses, no lookup), opened before the
        # inserts it will read; one change per getMore.
        with store.status_feed(lookup=False, statuses=tuple(int(s) for s in ROUTED), flow=True) as feed:
            pipeline = feed.pipeline
        docs = [fresh() for _ in range(repeat)]
        with scheduler.db.watch(pipeline, max_await_time_ms=1000) as stream:
            # Each insert read at once, as a node reads a paced job: one change per getMore (a batch size of one
            # does not do it: pymongo asks for two per getMore then).
            inserts, reads = _Timing(server), _Timing(server)
            with _Meter(client, server) as meter:
                seen = 0
                for doc in docs:
                    inserts(partial(jobs.insert_one, doc))
                    seen += reads(stream.try_next) is not None
            inserts.record(out, "insert")
            getmores = max(1.0, meter.counts["getmore"])
            reads.record(out, "getmore", getmores)
            out["changes_per_getmore"] = seen / getmores
        worker = ObjectId()
        _cost(out, "claim", server, lambda d: store.claim(d, worker, 30.0), docs)
        _cost(out, "lost_claim", server, lambda d: store.claim(d, worker, 30.0), docs)  # the same runs again
        ended = datetime.now(timezone.utc)
        expect = {"status": int(JobStatus.PROCESSING), "worker": worker}
        sets = {"status": int(JobStatus.DONE), "progress": 100.0, "ended": ended}
        _cost(out, "end", server, lambda d: store.change(d["_id"], expect, sets), docs)
        _cost(out, "query", server, lambda d: jobs.find_one({"_id": d["_id"]}), docs)
        more = [fresh() for _ in range(repeat)]
        jobs.insert_many(more)
        claim = {"$set": {"status": int(JobStatus.PROCESSING), "worker": worker}}
        _cost(
            out,
            "find_and_modify",
            server,
            lambda d: jobs.find_one_and_update({"_id": d["_id"], "status": 0}, claim),
            more,
        )
        plain = scheduler.db["scaleout_plain"]
        plain.insert_many([{"_id": d["_id"]} for d in docs])
        _cost(out, "delete", server, lambda d: plain.delete_one({"_id": d["_id"]}), docs)
        _cost(out, "command", server, lambda _: client.admin.command("ping"), docs)
        out["server_cpu"] = 1.0 if server is not None else 0.0
        out["documents"] = float(jobs.estimated_document_count())
        return out
    finally:
        client.drop_database(database)
        client.close()


class _Timing:
    """Round trips and server CPU of the commands it is called with, one by one."""

    def __init__(self, server: psutil.Process | None) -> None:
        self.server = server
        self.walls: list[float] = []
        self.cpu = 0.0

    def __call__(self, command: Callable[[], T]) -> T:
        cpu = cpu_ms(self.server)
        started = time.perf_counter()
        result = command()
        self.walls.append((time.perf_counter() - started) * 1000)
        self.cpu += cpu_ms(self.server) - cpu
        return result

    def record(self, out: dict[str, float], name: str, commands: float | None = None) -> None:
        """``out[name]``: server CPU ms per command (``commands``: how many the calls sent; the median round trip
        when the server's CPU is out of reach); ``out["rtt_" + name]``: the median round trip of a call."""
        out[f"rtt_{name}"] = statistics.median(self.walls)
        per = self.cpu / (commands or len(self.walls))
        out[name] = per if self.server is not None else out[f"rtt_{name}"]


def _cost(
    out: dict[str, float],
    name: str,
    server: psutil.Process | None,
    command: Callable[[dict[str, Any]], object],
    docs: list[dict[str, Any]],
) -> None:
    """``command`` once per document, recorded as ``name`` (see :meth:`_Timing.record`)."""
    timing = _Timing(server)
    for doc in docs:
        timing(partial(command, doc))
    timing.record(out, name)


def model_costs(costs: Mapping[str, float]) -> Costs:
    """The model's price of each opcounters kind: an update is a claim or an end (their mean), the updates beyond
    a job's own are losing claims; a command is priced as a ping (they are hellos, serverStatus, index and
    collection commands: few per job)."""
    return Costs(
        per_kind={
            "insert": costs["insert"],
            "query": costs["query"],
            "update": (costs["claim"] + costs["end"]) / 2,
            "delete": costs["delete"],
            "getmore": costs["getmore"],
            "command": costs["command"],
        },
        lost_claim=costs["lost_claim"],
    )


# -- the benchmark ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_server(uri: str | None) -> Iterator[str]:
    """``uri``, or a fresh embedded server's with retryable writes off: run.fresh_server's reasons (SecantusDB scans
    all its retryable-write records on every write), repeated here so the module imports nothing of run.py."""
    if uri is not None:
        yield uri
        return
    with EmbeddedServer(port=0, data_dir=":memory:") as server:
        yield server.uri + "&retryWrites=false"


def scale_out_benchmark(uri: str | None, results: dict[str, Any], detail: bool = False) -> bool:
    """Benchmark 11 with 1, 2, 4 and 8 nodes, each on a fresh server; True when a target was missed. ``detail``:
    print the measured table, the per-command costs, the model's fit, prediction and check first."""
    measured: dict[int, dict[str, float]] = {}
    for nodes in NODE_COUNTS:
        with fresh_server(uri) as target:
            measured[nodes] = scale_out(target, nodes)
    results["scale_out"] = measured
    model = Model.fit(measured)
    if detail:
        with fresh_server(uri) as target:
            costs = results["scale_out_costs"] = command_costs(target)
        model = Model.fit(measured, model_costs(costs))
        for line in report(measured, costs, model):
            print(line, flush=True)
    first, last = measured[NODE_COUNTS[0]], measured[NODE_COUNTS[-1]]
    ok = (
        all(m["update"] <= MAX_UPDATES_PER_JOB for m in measured.values())
        and last["start_p50"] <= first["start_p50"] + MAX_P50_GROWTH_MS
    )

    def row(key: str, fmt: str = ".2f") -> str:
        return "/".join(f"{measured[n][key]:{fmt}}" for n in NODE_COUNTS)

    counts = "/".join(str(n) for n in NODE_COUNTS)
    line = (
        f"scale-out ({counts} nodes of one worker; {JOBS} no-op jobs one every {PACE_SECONDS * 1000:.0f} ms): per job "
        f"update {row('update')}, insert {row('insert')}, query {row('query')}, getMore {row('getmore', '.1f')} "
        f"(+{model.lines['getmore'].slope:.2f} per node), add->start p50 {row('start_p50', '.1f')} ms, p99 "
        f"{row('start_p99', '.1f')} ms; a burst of {BURST}: update {row('burst_update')}, getMore "
        f"{row('burst_getmore', '.1f')} per job (targets: update <= {MAX_UPDATES_PER_JOB} at every count, p50 with "
        f"{NODE_COUNTS[-1]} nodes <= with {NODE_COUNTS[0]} + {MAX_P50_GROWTH_MS:.0f} ms)"
    )
    print(f"{line} {'OK' if ok else 'MISSED'}", flush=True)
    return not ok


def report(measured: Mapping[int, Mapping[str, float]], costs: Mapping[str, float], model: Model) -> list[str]:
    """The detail of ``--only scale``, as Markdown tables (docs/scaling.md takes them as they are)."""
    head = " | ".join(KINDS)
    lines = [
        f"scale-out, measured per paced job ({JOBS} jobs, one every {PACE_SECONDS * 1000:.0f} ms; serverStatus "
        "opcounters, every client counted):",
        f"| nodes | {head} | add->start p50 ms | p99 ms | server CPU ms/job | kept pace ms | workers used | "
        "burst update | burst getmore | burst jobs/s |",
        "|---" * (len(KINDS) + 10) + "|",
    ]
    for n, m in sorted(measured.items()):
        lines.append(
            f"| {n} | "
            + " | ".join(f"{m[k]:.2f}" for k in KINDS)
            + f" | {m['start_p50']:.1f} | {m['start_p99']:.1f} | {m['server_ms']:.2f} | {m['pace_ms']:.1f} | "
            f"{m['workers_used']:.0f} | {m['burst_update']:.2f} | {m['burst_getmore']:.2f} | {m['burst_rate']:.0f} |"
        )
    lines += [
        f"background of the idle cluster over {IDLE_SECONDS:.0f} s, per second:",
        f"| nodes | {head} | server CPU ms/s |",
        "|---" * (len(KINDS) + 2) + "|",
    ]
    for n, m in sorted(measured.items()):
        lines.append(
            f"| {n} | " + " | ".join(f"{m[f'idle_{k}']:.1f}" for k in KINDS) + f" | {m['idle_server_ms']:.1f} |"
        )
    what = "server CPU" if costs.get("server_cpu") else "round trip (server CPU out of reach)"
    lines += [
        f"per-command cost, ms ({what}; round trip beside it), {costs['documents']:.0f} jobs in the collection:",
        "| command | server ms | round trip ms |",
        "|---|---|---|",
    ]
    for name in ("insert", "claim", "lost_claim", "end", "find_and_modify", "query", "delete", "getmore", "command"):
        lines.append(f"| {name} | {costs[name]:.3f} | {costs[f'rtt_{name}']:.3f} |")
    lines.append(f"(getMore of the cost loop: {costs['changes_per_getmore']:.2f} changes per getMore)")
    lines += ["fit, commands per job = intercept + slope x nodes:", "| kind | intercept | per node |", "|---|---|---|"]
    for kind in KINDS:
        lines.append(f"| {kind} | {model.lines[kind].intercept:.2f} | {model.lines[kind].slope:+.3f} |")
    lines += [
        "prediction per job:",
        f"| nodes | {head} | all commands | server CPU ms |",
        "|---" * (len(KINDS) + 3) + "|",
    ]
    for n in (*sorted(measured), *PREDICT_FOR):
        predicted = model.commands(n)
        lines.append(
            f"| {n} | "
            + " | ".join(f"{predicted[k]:.2f}" for k in KINDS)
            + f" | {sum(predicted.values()):.1f} | {model.server_ms(n):.2f} |"
        )
    server = {n: m["server_ms"] for n, m in measured.items()} if costs.get("server_cpu") else None
    verdict = check(measured, model.costs, server)
    lines.append(
        "model check: all commands per job, in sample "
        + ", ".join(f"{n} nodes {e:+.1%}" for n, e in verdict.in_sample.items())
        + f"; {verdict.holdout_nodes} nodes predicted from the others {verdict.holdout:+.1%}"
    )
    if verdict.server:
        lines.append(
            "model check: server CPU per job (model against the server's CPU over the paced run, background "
            "included) " + ", ".join(f"{n} nodes {e:+.1%}" for n, e in verdict.server.items())
        )
    return lines


def pct(values: list[float], percentile: int) -> float:
    """The nearest-rank percentile, as run.py's ``_pct``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(percentile / 100 * (len(ordered) - 1))))]
