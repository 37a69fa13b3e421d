"""Randomized fault harness ("chaos"): real queue nodes, a seeded schedule of faults, invariants checked after.

Each seed starts 2-3 queue nodes (``orphaned_timeout`` 2 s, 2-3 workers each), adds a mix of
``sample_jobs:ChaosJob`` jobs (plain, always failing with retries, recurring ones that cancel themselves or are
canceled by the test after some runs, jobs that sleep past their timeout, long jobs canceled while running) and,
for :data:`FAULT_SECONDS`, injects faults drawn from the seed: SIGKILL of a node's process group and a restart,
SIGTERM of a node and a restart, SIGKILL of single worker processes, SIGSTOP of a node's queue process past
``orphaned_timeout`` (its manager and workers keep running) then SIGCONT, ``failCommand`` failpoints that make
the server close connections for a moment, and cancels. Then the faults stop, every node is stopped gracefully
(SIGTERM) while jobs run, fresh nodes take over, the system settles (polling with deadlines), the nodes stop
gracefully again, and the run log the jobs wrote (one line per start, tick and end of every execution, see
``ChaosJob``) and the job and event collections are checked against SPEC sections 2 and 4:

- every job ended in a status the SPEC allows for its kind (FAILED only by its own error or a third orphaning,
  CANCELED only when canceled); a node stopped with SIGTERM leaves no job PROCESSING (and exits 0), no node exits
  by itself, and no node process is left once the nodes stop;
- each run of a job has exactly one end event, run numbers are contiguous, ``Process.runs()`` lists exactly those
  events, the job's ``run`` and ``outcome`` agree with them;
- no retry lost or doubled: a job that always fails ran exactly retry + 1 runs unless canceled; runs follow each
  other only after FAILED/TIMEOUT (retry) or for recurring jobs;
- the events of each run tell a history the SPEC allows: attempts (claims) one after the other, each closed by a
  release before the next claim, the last one by the run's end; the next run announced once, by the end of the
  previous one;
- every execution in the log is recorded as an attempt of its run (PROCESSING event of its worker), and every run
  recorded DONE or FAILED by a job's own error was really executed to that end by that worker;
- no job ran on two workers at overlapping times (one execution logged activity after another one had started),
  except for at most one heartbeat (+ slack) when the first one ran on a node that was SIGSTOPped (SPEC 4: a
  stalled node fences its own jobs).

``make test`` runs seeds 0-4; ``make chaos`` runs 50 (``--chaos-seeds N``, or a list/range such as ``3,17`` or
``10-19``). A failure names its seed: rerun it alone with ``--chaos-seeds SEED-SEED``.
"""

from __future__ import annotations

import heapq
import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest
from bson import ObjectId
from pymongo import MongoClient

from helpers import Node, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.errors import InvalidArgumentError

JOB = "sample_jobs:ChaosJob"
ORPHANED_TIMEOUT = 2.0
#: How long faults are injected; then the system settles within SETTLE_SECONDS.
FAULT_SECONDS = 12.0
SETTLE_SECONDS = 45.0
#: Overlap of activity below this is scheduling noise (one clock, time.monotonic(), for every process).
OVERLAP_SLACK = 0.02
#: Longest overlap tolerated when the first execution ran on a SIGSTOPped node: one heartbeat, plus slack.
STALL_OVERLAP = ORPHANED_TIMEOUT / 4 + 0.5
#: Commands a failpoint closes the connection on (never the handshake: the outage is of the data path).
FAILPOINT_COMMANDS = (
    ("find", "aggregate", "getMore", "insert", "update", "findAndModify", "delete"),
    ("update", "findAndModify"),
    ("insert", "delete"),
    ("find", "aggregate", "getMore"),
)
FAULT_KINDS = ("kill_node", "term_node", "kill_worker", "stop_node", "failpoint", "cancel")
ORPHANED_ERROR = "taskscheduler.errors.OrphanedJobError"
TIMEOUT_ERROR = "taskscheduler.errors.JobTimeoutError"
RELEASED_ERROR = "taskscheduler.errors.JobReleasedError"
RECURRING = ("interval", "open")


def parse_seeds(value: str) -> list[int]:
    """``"5"``: seeds 0-4; ``"3,17"``: those; ``"10-19"``: that range (inclusive)."""
    value = str(value).strip()
    if value.isdigit():
        return list(range(int(value)))
    seeds: list[int] = []
    for part in value.split(","):
        low, _, high = part.strip().partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "chaos_seed" in metafunc.fixturenames:
        metafunc.parametrize("chaos_seed", parse_seeds(metafunc.config.getoption("--chaos-seeds")))


# -- what the harness knows ---------------------------------------------------------------------------------------


@dataclass
class Spec:
    """A job the harness added, and what the SPEC lets it end as."""

    kind: str  # plain, retry, interval, open, timeout, cancel
    data: dict[str, Any]
    options: dict[str, Any]
    id: ObjectId | None = None
    open_runs: int = 0  # open: the test cancels it once this many runs ended
    cancel_after: float = 0.0  # cancel: the test cancels it this long after an execution started

    @property
    def retry(self) -> int:
        return int(self.options.get("retry", 0))

    @property
    def fails(self) -> bool:
        """Every run fails (its own error, or its timeout)."""
        return self.kind in ("retry", "timeout")


@dataclass
class Execution:
    """One execution of ChaosJob.start() in a worker process, from the run log."""

    token: str
    job: str
    worker: str
    node: str
    pid: int
    start: float
    last: float
    run: int | None = None
    end: float | None = None
    outcome: str | None = None

    @property
    def stop(self) -> float:
        """Its last activity: its end, or the last line of one that was killed. Between two lines a ChaosJob only
        sleeps, so two executions overlap when one wrote a line after the other started (the blind spot of a
        killed one is at most one ChaosJob.TICK)."""
        return self.end if self.end is not None else self.last

    def describe(self, t0: float) -> str:
        run = "?" if self.run is None else self.run
        end = f"{self.end - t0:.2f}" if self.end is not None else f"(killed; last seen {self.last - t0:.2f})"
        return (
            f"exec {self.token} run {run} worker ..{self.worker[-6:]} node {self.node} pid {self.pid} "
            f"{self.start - t0:.2f} -> {end} {self.outcome or ''}"
        )


class RunLog:
    """The run log, read incrementally (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.executions: dict[str, Execution] = {}
        self.malformed: list[str] = []

    def read(self) -> dict[str, Execution]:
        if not self.path.exists():
            return self.executions
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                self._line(line.split())
            except (ValueError, IndexError, KeyError):
                self.malformed.append(line)
        return self.executions

    def _line(self, f: list[str]) -> None:
        kind, token = f[0], f[1]
        if kind == "S":
            start = float(f[7])
            self.executions[token] = Execution(token, f[2], f[3], f[4], int(f[5]), start, start)
            return
        execution = self.executions[token]
        if kind == "R":
            execution.run, execution.last = int(f[2]), max(execution.last, float(f[3]))
        elif kind == "T":
            execution.last = max(execution.last, float(f[2]))
        elif kind == "E":
            execution.end = execution.last = float(f[2])
            execution.outcome = f[3]
        else:
            raise ValueError(kind)

    def active(self) -> list[Execution]:
        return [e for e in self.read().values() if e.end is None]


@dataclass
class NodeState:
    label: str
    node: Node
    state: str = "up"  # up, stopped (SIGSTOP), killed (SIGKILL), terminated (SIGTERM), died (by itself)
    stops: list[list[float]] = field(default_factory=list)  # [SIGSTOP, SIGCONT] monotonic times
    ready: bool = False

    def serving(self) -> bool:
        """Whether it has set up its signal handling and serves (SIGTERM before that just kills the interpreter)."""
        self.ready = self.ready or "queue node serving" in self.node.output()
        return self.ready

    def stalled_during(self, start: float, stop: float) -> bool:
        return any(t0 <= stop and (t1 if t1 else float("inf")) >= start for t0, t1 in self.stops)


# -- the driver ---------------------------------------------------------------------------------------------------


class Harness:
    """Runs one seed: nodes, jobs, faults, a graceful stop of every node, settling; :func:`judge` checks after."""

    def __init__(
        self,
        seed: int,
        scheduler: Scheduler,
        client: MongoClient[dict[str, Any]],
        start_node: Callable[..., Node],
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        db_name: str,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.scheduler = scheduler
        self.client = client
        self._start_node = start_node
        self.monkeypatch = monkeypatch
        self.db_name = db_name
        self.log = RunLog(tmp_path / "runs.log")
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.nodes: list[NodeState] = []
        self.size = self.rng.choice((2, 3))
        self.specs: list[Spec] = []
        self.canceled: dict[ObjectId, str] = {}  # job -> why the test canceled it
        self.faults: Counter[str] = Counter()
        self.timeline: list[str] = []
        self.violations: list[str] = []
        self.failpoint_on = False
        self._todo: list[tuple[float, int, str, Callable[[], bool]]] = []
        self._seq = 0
        self.timings: dict[str, float] = {}

    # -- scheduling of actions -----------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def later(self, delay: float, name: str, action: Callable[[], bool]) -> None:
        """Run ``action`` in ``delay`` seconds; one that returns False (cannot be done now) is tried again."""
        self._seq += 1
        heapq.heappush(self._todo, (self.now() + delay, self._seq, name, action))

    def run_due(self, retry_in: float = 0.3) -> None:
        while self._todo and self._todo[0][0] <= self.now():
            _, _, name, action = heapq.heappop(self._todo)
            if not action():
                self.later(retry_in, name, action)

    def note(self, text: str) -> None:
        self.timeline.append(f"{self.now():6.2f} {text}")

    # -- nodes -----------------------------------------------------------------------------------------------------

    def start_node(self) -> NodeState:
        label = f"n{len(self.nodes)}"
        self.monkeypatch.setenv("CHAOS_NODE", label)  # inherited by the node's workers: the run log names it
        node = self._start_node("--max-children", str(self.rng.choice((2, 3))), orphaned_timeout=ORPHANED_TIMEOUT)
        state = NodeState(label, node)
        self.nodes.append(state)
        self.note(f"start {label} pid {node.pid}")
        return state

    def up(self) -> list[NodeState]:
        return [n for n in self.nodes if n.state == "up"]

    def restart(self) -> bool:
        if self.failpoint_on:
            return False  # a node starting during an outage may refuse to start (exit 1), as the CLI should
        if len([n for n in self.nodes if n.state in ("up", "stopped")]) < self.size:
            self.start_node()
        return True

    def watch_nodes(self) -> None:
        """A node that exits without being told to is a failure (its log says why)."""
        for n in self.nodes:
            if n.state in ("up", "stopped") and n.node.proc.poll() is not None:
                n.state = "died"
                self.violations.append(
                    f"node {n.label} exited by itself with code {n.node.proc.returncode}:\n{tail(n.node.output())}"
                )
                self.later(0.5, "restart", self.restart)  # go on with the seed

    # -- faults ----------------------------------------------------------------------------------------------------

    def fault(self, kind: str) -> Callable[[], bool]:
        def inject() -> bool:
            if self.now() > FAULT_SECONDS:
                return True  # too late: the fault phase is over
            done = getattr(self, f"_{kind}")()
            if done:
                self.faults[kind] += 1
            return bool(done)

        return inject

    def _kill_node(self) -> bool:
        candidates = self.up()
        if not candidates:
            return False
        victim = self.rng.choice(candidates)
        victim.node.kill_group()
        victim.state = "killed"
        self.note(f"SIGKILL group of {victim.label}")
        self.later(self.rng.uniform(0.0, 1.0), "restart", self.restart)
        return True

    def _term_node(self) -> bool:
        candidates = [n for n in self.up() if n.serving()]
        if not candidates or self.failpoint_on:
            return False  # a graceful stop needs the server to put its jobs back
        victim = self.rng.choice(candidates)
        self.note(f"SIGTERM {victim.label}: exit {self.terminate(victim)}")
        self.later(self.rng.uniform(0.0, 0.5), "restart", self.restart)
        return True

    def _kill_worker(self) -> bool:
        busy = [e for e in self.log.active() if _is_worker(e.pid, self.db_name)]
        if busy and self.rng.random() < 0.8:
            victim = self.rng.choice(busy)
            pid, what = victim.pid, f"worker pid {victim.pid} of {victim.node} running {victim.job}"
        else:
            idle = [p for n in self.up() for p in _workers(n.node.pid)]
            if not idle:
                return False
            pid = self.rng.choice(idle)
            what = f"worker pid {pid}"
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.note(f"SIGKILL {what}")
        return True

    def _stop_node(self) -> bool:
        candidates = self.up()
        if len(candidates) < 2 or any(n.state == "stopped" for n in self.nodes):
            return False  # one stalled node at a time, and another one to take its jobs over
        victim = self.rng.choice(candidates)
        os.kill(victim.node.pid, signal.SIGSTOP)
        victim.state = "stopped"
        victim.stops.append([time.monotonic(), 0.0])
        pause = ORPHANED_TIMEOUT + self.rng.uniform(0.2, 1.5)
        self.note(f"SIGSTOP {victim.label} (queue process only) for {pause:.2f} s")
        self.later(pause, "SIGCONT", lambda: self._cont(victim))
        return True

    def _cont(self, victim: NodeState) -> bool:
        if victim.state == "stopped":
            os.kill(victim.node.pid, signal.SIGCONT)
            victim.state = "up"
            victim.stops[-1][1] = time.monotonic()
            self.note(f"SIGCONT {victim.label}")
        return True

    def _failpoint(self) -> bool:
        if self.failpoint_on:
            return False
        commands = list(self.rng.choice(FAILPOINT_COMMANDS))
        duration = self.rng.uniform(0.3, 1.2)
        self.client.admin.command(
            "configureFailPoint",
            "failCommand",
            mode="alwaysOn",
            data={"failCommands": commands, "closeConnection": True},
        )
        self.failpoint_on = True
        self.note(f"failpoint closeConnection on {','.join(commands)} for {duration:.2f} s")
        self.later(duration, "failpoint off", self.failpoint_off)
        return True

    def failpoint_off(self) -> bool:
        if self.failpoint_on:
            self.client.admin.command("configureFailPoint", "failCommand", mode="off")
            self.failpoint_on = False
            self.note("failpoint off")
        return True

    def _cancel(self) -> bool:
        if self.failpoint_on:
            return False
        candidates = [s for s in self.specs if s.id is not None and s.id not in self.canceled and s.kind != "cancel"]
        if not candidates:
            return False
        return self.cancel(self.rng.choice(candidates), "random cancel")

    def cancel(self, spec: Spec, why: str) -> bool:
        assert spec.id is not None
        try:
            self.scheduler.cancel_job(spec.id)
        except InvalidArgumentError:
            self.note(f"cancel {spec.kind} {spec.id}: already ended")
            return True
        self.canceled[spec.id] = why
        self.note(f"cancel {spec.kind} {spec.id} ({why})")
        return True

    # -- jobs ------------------------------------------------------------------------------------------------------

    def plan_jobs(self) -> None:
        rng, log = self.rng, str(self.log.path)
        plans: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        for _ in range(rng.randint(4, 6)):
            plans.append(("plain", {"seconds": rng.uniform(0.2, 1.5)}, {}))
        for _ in range(rng.randint(2, 3)):
            retry = {"retry": rng.randint(1, 3), "retry_interval": rng.choice((0, 1))}
            plans.append(("retry", {"seconds": rng.uniform(0.1, 0.6), "fail": True}, retry))
        for _ in range(2):
            data = {"seconds": rng.uniform(0.1, 0.5), "cancel_at": rng.randint(2, 4)}
            plans.append(("interval", data, {"interval": rng.choice((-1, 1))}))
        plans.append(("open", {"seconds": rng.uniform(0.1, 0.4)}, {"interval": 1}))
        for _ in range(rng.randint(1, 2)):
            plans.append(("timeout", {"seconds": 3.0}, {"timeout": 1, "retry": rng.randint(0, 1), "retry_interval": 0}))
        for _ in range(2):
            plans.append(("cancel", {"seconds": 30.0}, {}))
        rng.shuffle(plans)
        for i, (kind, data, options) in enumerate(plans):
            spec = Spec(kind, dict(data, log=log), options)
            spec.open_runs = rng.randint(2, 3) if kind == "open" else 0
            spec.cancel_after = rng.uniform(0.3, 2.5) if kind == "cancel" else 0.0
            self.specs.append(spec)
            when = 0.0 if i < len(plans) // 2 else rng.uniform(0.5, FAULT_SECONDS * 0.75)
            self.later(when, "add job", lambda spec=spec: self.add(spec))

    def add(self, spec: Spec) -> bool:
        if self.failpoint_on:
            return False
        spec.id = self.scheduler.add_job(JOB, spec.data, spec.options).id
        return True

    def plan_faults(self) -> None:
        kinds = list(FAULT_KINDS) + ["kill_worker"]  # each kind at least once, then a random mix
        kinds += self.rng.choices(FAULT_KINDS, weights=(2, 1, 3, 1, 2, 2), k=self.rng.randint(2, 5))
        for kind in kinds:
            self.later(self.rng.uniform(0.8, FAULT_SECONDS - 0.5), kind, self.fault(kind))

    def cancel_due(self) -> None:
        """The test's own cancels: long jobs a while after they started running, open recurring jobs after some
        runs (each as soon as the server can be reached)."""
        if self.failpoint_on:
            return
        running = {e.job: e for e in self.log.active()}
        for spec in self.specs:
            if spec.id is None or spec.id in self.canceled:
                continue
            if spec.kind == "cancel":
                execution = running.get(str(spec.id))
                if execution is not None and time.monotonic() - execution.start >= spec.cancel_after:
                    self.cancel(spec, "canceled while running")
            elif spec.kind == "open":
                doc = self.scheduler.store.find_job(spec.id)
                if doc is not None and int(doc["run"]) > spec.open_runs:
                    self.cancel(spec, f"recurring job canceled after {spec.open_runs} runs")

    # -- phases ----------------------------------------------------------------------------------------------------

    def drive(self) -> None:
        for _ in range(self.size):
            self.start_node()
        self.plan_jobs()
        self.plan_faults()
        while self.now() < FAULT_SECONDS:
            self.run_due()
            self.cancel_due()
            self.watch_nodes()
            time.sleep(0.05)  # the driver's pace: faults are due at their times
        self.timings["faults"] = self.now()

    def stop_all(self) -> None:
        """No more faults. While jobs run, SIGTERM every node: each puts its running jobs back to WAITING (SPEC 4),
        so none may stay PROCESSING on their workers. Then fresh nodes take over."""
        started = self.now()
        self.failpoint_off()
        for n in self.nodes:
            self._cont(n)
        todo, self._todo = sorted(t for t in self._todo if t[2] in ("add job", "restart")), []
        for _, _, _, action in todo:  # the server is reachable again: each of them can be done now
            assert action()
        late = [Spec("plain", {"seconds": 3.0, "log": str(self.log.path)}, {}) for _ in range(2)]
        for spec in late:  # work in flight when the nodes stop
            self.specs.append(spec)
            self.add(spec)
        try:
            wait_until(lambda: {str(s.id) for s in late} <= {e.job for e in self.log.active()}, 10, what="late jobs")
        except AssertionError:
            self.note("late jobs not all running before the graceful stop")
        self.terminate_all()
        self.check_put_back({n.label for n in self.nodes if n.state == "terminated"})
        for _ in range(self.size):
            self.start_node()
        self.timings["stop all"] = self.now() - started

    def check_put_back(self, stopped: set[str]) -> None:
        owners = {e.worker: e.node for e in self.log.read().values()}
        for job in self.scheduler.store.jobs.find({"status": int(JobStatus.PROCESSING)}):
            node = owners.get(str(job["worker"]))
            if node in stopped:
                self.violations.append(
                    f"job {job['_id']} left PROCESSING (worker ..{str(job['worker'])[-6:]}) by node {node}, "
                    "which was stopped gracefully (SIGTERM)"
                )

    def settle(self) -> None:
        """Wait (with a deadline) until every job has ended; then stop the nodes gracefully."""
        for spec in self.specs:
            if spec.kind == "cancel" and spec.id not in self.canceled:
                self.cancel(spec, "canceled at settling")
        started = self.now()
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            self.run_due()  # restarts of nodes that died
            self.cancel_due()
            self.watch_nodes()
            if not self.unfinished():
                break
            time.sleep(0.1)
        self.timings["settle"] = self.now() - started
        for job in self.unfinished():
            self.violations.append(
                f"job {job['_id']} ({self.spec(job['_id']).kind}) still {JobStatus(job['status']).name} "
                f"(run {job['run']}) {SETTLE_SECONDS:.0f} s after the faults stopped"
            )
        self.stop_nodes()

    def unfinished(self) -> list[dict[str, Any]]:
        ids = [s.id for s in self.specs]
        return list(self.scheduler.store.jobs.find({"_id": {"$in": ids}, "status": {"$lt": int(JobStatus.DONE)}}))

    def spec(self, job_id: Any) -> Spec:
        return next(s for s in self.specs if str(s.id) == str(job_id))

    def stop_nodes(self) -> None:
        started = self.now()
        self.terminate_all()
        self.timings["stop"] = self.now() - started
        try:
            wait_until(lambda: not _node_processes(self.db_name), 5, what="the nodes' processes to exit")
        except AssertionError:
            pass
        for proc in _node_processes(self.db_name):
            self.violations.append(f"process {proc.pid} of a queue node still runs after every node stopped")
            proc.kill()
        processing = list(self.scheduler.store.jobs.find({"status": int(JobStatus.PROCESSING)}))
        for job in processing:
            self.violations.append(f"job {job['_id']} left PROCESSING after every node stopped")

    def terminate_all(self) -> None:
        """SIGTERM to every live node, once each one serves."""
        self.watch_nodes()
        try:
            wait_until(lambda: all(n.serving() for n in self.up()), 20, what="every node to serve")
        except AssertionError:
            self.note("not every node serves: " + ", ".join(n.label for n in self.up() if not n.serving()))
        for n in self.up():
            self.note(f"SIGTERM {n.label} (stop every node): exit {self.terminate(n)}")

    def terminate(self, n: NodeState) -> int | None:
        """A graceful stop (SIGTERM): the node puts its running jobs back and exits 0 in time."""
        n.state = "terminated"
        try:
            code: int | None = n.node.stop(signal.SIGTERM, timeout=20)
        except subprocess.TimeoutExpired:
            n.node.kill_group()
            code = None
        if code != 0:
            self.violations.append(f"node {n.label} exited {code} on SIGTERM:\n{tail(n.node.output())}")
        return code

    def cleanup(self) -> None:
        """Whatever happened: no failpoint left on, no node left stopped (the fixture then stops them)."""
        try:
            self.failpoint_off()
        finally:
            for n in self.nodes:
                if n.state == "stopped":
                    os.kill(n.node.pid, signal.SIGCONT)
                    n.state = "up"


# -- processes ----------------------------------------------------------------------------------------------------


def _node_processes(db_name: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info.get("cmdline") or []
        if db_name in cmdline and "queue" in cmdline and proc.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _workers(node_pid: int) -> list[int]:
    """Worker processes of a node: the children of its manager (the node's only child)."""
    try:
        return [w.pid for m in psutil.Process(node_pid).children() for w in m.children()]
    except psutil.Error:
        return []


def _is_worker(pid: int, db_name: str) -> bool:
    try:
        proc = psutil.Process(pid)
        return db_name in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tail(text: str, lines: int = 25) -> str:
    """The last lines of a node's log, without the driver's DEBUG chatter."""
    kept = [line for line in text.splitlines() if " pymongo." not in line]
    return "\n".join("    " + line[:300] for line in kept[-lines:])


# -- the invariants -----------------------------------------------------------------------------------------------


@dataclass
class Judged:
    """What the checks found for one job."""

    spec: Spec
    doc: dict[str, Any]
    events: list[dict[str, Any]]
    executions: list[Execution]
    problems: list[str] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)

    def ends(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["status"] >= JobStatus.DONE]


def _error_class(event: dict[str, Any]) -> str | None:
    error = event.get("error")
    return error.get("class") if isinstance(error, dict) else None


def _seconds(value: Any, t0_wall: float) -> str:
    return f"{value.timestamp() - t0_wall:.3f}" if isinstance(value, datetime) else "-"


def _kind_of(event: dict[str, Any]) -> str:
    """PROCESSING (an attempt), end, release (back to WAITING), entry (next run announced by the previous run's
    end), unpostpone (POSTPONED -> WAITING when due)."""
    status = event["status"]
    if status == JobStatus.PROCESSING:
        return "attempt"
    if status >= JobStatus.DONE:
        return "end"
    if event.get("error"):
        return "release" if status == JobStatus.WAITING else "unknown"
    if event.get("worker") is not None:
        return "entry"
    return "unpostpone" if status == JobStatus.WAITING else "unknown"


def check_final(j: Judged, canceled: dict[ObjectId, str]) -> None:
    """The job ended as the SPEC allows for its kind."""
    status = JobStatus(j.doc["status"])
    ends = j.ends()
    last_error = _error_class(ends[-1]) if ends else None
    by_test = j.spec.id in canceled
    if not status.is_terminal:
        return  # reported by the settling deadline
    allowed = {
        "plain": {JobStatus.DONE},
        "retry": {JobStatus.FAILED},
        "timeout": {JobStatus.TIMEOUT},
        "interval": {JobStatus.CANCELED},
        "open": set(),
        "cancel": set(),
    }[j.spec.kind]
    if status == JobStatus.CANCELED and by_test:
        return
    if status == JobStatus.FAILED and last_error == ORPHANED_ERROR:
        return  # orphaned a third time (SPEC 4): any job may end so
    if status not in allowed:
        why = f"canceled by the test: {canceled[j.spec.id]}" if by_test else "not canceled by the test"
        j.problems.append(f"ended {status.name} (last error {last_error}), not allowed for a {j.spec.kind} job ({why})")
    if j.spec.kind == "retry" and status == JobStatus.FAILED and last_error not in ("ValueError", ORPHANED_ERROR):
        j.problems.append(f"ended FAILED by {last_error}, not by its own error")


def check_run_ends(j: Judged, api_runs: list[dict[str, Any]]) -> None:
    """Exactly one end event per run, run numbers 1..K contiguous; Process.runs(), run and outcome agree."""
    ends = j.ends()
    per_run = Counter(int(e["run"]) for e in ends)
    doubled = sorted(r for r, n in per_run.items() if n > 1)
    if doubled:
        j.problems.append(f"runs {doubled} have more than one end event")
    terminal = JobStatus(j.doc["status"]).is_terminal
    last = int(j.doc["run"]) if terminal else int(j.doc["run"]) - 1
    if sorted(per_run) != list(range(1, last + 1)):
        j.problems.append(f"end events of runs {sorted(per_run)}, expected 1..{last} (job run {j.doc['run']})")
    if any(int(e["run"]) > int(j.doc["run"]) for e in j.events):
        j.problems.append(f"events of runs after the job's run {j.doc['run']}")
    if [e["_id"] for e in api_runs] != [e["_id"] for e in sorted(ends, key=lambda e: e["run"])]:
        j.problems.append(
            f"Process.runs() lists {[(e['run'], e['status']) for e in api_runs]}, "
            f"the events {[(e['run'], e['status']) for e in ends]}"
        )
    if terminal and ends and j.doc.get("outcome") != max(ends, key=lambda e: e["run"])["_id"]:
        j.problems.append("the job's outcome is not the end event of its last run")


def check_retries(j: Judged, canceled: dict[ObjectId, str]) -> None:
    """No retry lost or doubled; a next run only after a failure (retry) or for a recurring job. Counted in runs
    (a run with two end events is reported by check_run_ends)."""
    ends = list({int(e["run"]): e for e in sorted(j.ends(), key=lambda e: (e["run"], e["time"]))}.values())
    if not ends:
        return
    statuses = [JobStatus(e["status"]) for e in ends]
    failed = (JobStatus.FAILED, JobStatus.TIMEOUT)
    if j.spec.kind in RECURRING:
        if JobStatus.CANCELED in statuses[:-1]:
            j.problems.append(f"a run followed a CANCELED run: {[s.name for s in statuses]}")
        cancel_at = j.spec.data.get("cancel_at")
        if cancel_at and j.spec.id not in canceled and len(ends) < int(cancel_at):
            j.problems.append(f"ended after {len(ends)} runs; it cancels itself in run {cancel_at} only")
        if j.spec.kind == "open" and j.spec.id in canceled and "after" in canceled[j.spec.id]:
            if len(ends) < j.spec.open_runs + 1:
                j.problems.append(f"canceled after {j.spec.open_runs} runs, but has only {len(ends)} ends")
        return
    if any(s not in failed for s in statuses[:-1]):
        j.problems.append(f"a run followed a run that needs none: {[s.name for s in statuses]}")
    if len(ends) > j.spec.retry + 1:
        j.problems.append(f"{len(ends)} runs with retry {j.spec.retry}: a retry was doubled")
    if statuses[-1] in failed and len(ends) != j.spec.retry + 1:
        j.problems.append(f"ended {statuses[-1].name} after {len(ends)} runs with retry {j.spec.retry}: retry lost")
    if j.spec.fails and JobStatus.DONE in statuses:
        j.problems.append("a job that always fails has a DONE run")


def check_errors(j: Judged) -> None:
    """Each recorded failure is one the job can have: its own error, its timeout, a third orphaning."""
    own = {"retry": {"ValueError"}, "interval": {"RuntimeError"}}.get(j.spec.kind, set())
    for e in j.ends():
        status, error = JobStatus(e["status"]), _error_class(e)
        if status == JobStatus.FAILED and error not in own | {ORPHANED_ERROR}:
            j.problems.append(f"run {e['run']} FAILED with {error}: {(e.get('error') or {}).get('message')}")
        if status == JobStatus.TIMEOUT and (j.spec.kind != "timeout" or error != TIMEOUT_ERROR):
            j.problems.append(f"run {e['run']} ended TIMEOUT ({error})")
        if status == JobStatus.DONE and j.spec.fails:
            j.problems.append(f"run {e['run']} ended DONE")


def check_history(j: Judged) -> None:
    """Per run: attempts one after the other, each closed (release) before the next claim, the last one closed by
    the run's end; the run announced once by the previous run's end; no event of an unknown shape."""
    by_run: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in j.events:
        by_run[int(e["run"])].append(e)
    ends = {int(e["run"]): e for e in j.ends()}
    for run, events in sorted(by_run.items()):
        kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            kinds[_kind_of(e)].append(e)
        if kinds["unknown"]:
            j.problems.append(f"run {run}: events of no known kind {[(e['status'], e.get('worker')) for e in events]}")
        _check_entry(j, run, kinds, ends.get(run - 1))
        _check_attempts(j, run, kinds)


def _check_entry(j: Judged, run: int, kinds: dict[str, list[dict[str, Any]]], previous: dict[str, Any] | None) -> None:
    entries, unpostpones = kinds["entry"], kinds["unpostpone"]
    if run == 1:
        if entries:
            j.problems.append("run 1 has a next-run event")
    elif len(entries) != 1:
        j.problems.append(f"run {run} announced {len(entries)} times by a previous run's end")
    elif previous is None or entries[0]["worker"] != previous.get("worker") or entries[0]["time"] != previous["time"]:
        j.problems.append(f"run {run} announced by something else than the end of run {run - 1}")
    if len(unpostpones) > 1:
        j.problems.append(f"run {run} moved from POSTPONED to WAITING {len(unpostpones)} times")
    postponed = bool(entries) and entries[0]["status"] == JobStatus.POSTPONED
    if postponed and kinds["attempt"] and not unpostpones:
        j.problems.append(f"run {run} was claimed while POSTPONED (no WAITING event before its claim)")


def _check_attempts(j: Judged, run: int, kinds: dict[str, list[dict[str, Any]]]) -> None:
    attempts = sorted(kinds["attempt"], key=lambda e: e["time"])
    # A worker may claim a run again after it was released: each attempt is closed by that worker's first
    # release after it.
    pending_releases: dict[Any, list[dict[str, Any]]] = {}
    for e in sorted(kinds["release"], key=lambda e: e["time"]):
        pending_releases.setdefault(e["worker"], []).append(e)
    end = kinds["end"][0] if kinds["end"] else None
    workers = {a["worker"] for a in attempts}
    for e in kinds["release"]:
        if e["worker"] not in workers:
            j.problems.append(f"run {run}: release of worker ..{str(e['worker'])[-6:]} that has no attempt")
    if end is not None and end.get("worker") is not None and end["worker"] not in workers:
        note = f"run {run}: end {JobStatus(end['status']).name} by worker ..{str(end['worker'])[-6:]} has no attempt"
        (j.tolerated if end["status"] == JobStatus.CANCELED else j.problems).append(note)
    for i, attempt in enumerate(attempts):
        mine = pending_releases.get(attempt["worker"]) or []
        closing = mine.pop(0) if mine else None
        if closing is None and end is not None and end.get("worker") == attempt["worker"]:
            closing = end
        if closing is None:
            if i < len(attempts) - 1 or end is not None:
                j.problems.append(
                    f"run {run}: attempt of worker ..{str(attempt['worker'])[-6:]} never released nor ended, "
                    "yet the run went on"
                )
            continue
        if closing["time"] < attempt["time"]:
            j.problems.append(f"run {run}: attempt of ..{str(attempt['worker'])[-6:]} closed before it started")
        if i + 1 < len(attempts) and closing["time"] > attempts[i + 1]["time"]:
            j.problems.append(
                f"run {run}: worker ..{str(attempts[i + 1]['worker'])[-6:]} claimed the job before "
                f"..{str(attempt['worker'])[-6:]}'s attempt was closed"
            )
    if end is not None and any(a["time"] > end["time"] for a in attempts):
        j.problems.append(f"run {run}: an attempt started after the run ended")


def check_executions(j: Judged) -> None:
    """The run log and the events tell the same story."""
    # An attempt is recorded by its PROCESSING event; one canceled while running also by the CANCELED event
    # (worker and start of the run), which is all that remains of it when its node died before recording it.
    attempts = {(int(e["run"]), str(e["worker"])) for e in j.events if e["status"] == JobStatus.PROCESSING}
    attempts |= {(int(e["run"]), str(e["worker"])) for e in j.events if e["status"] == JobStatus.CANCELED}
    attempt_workers = {w for _, w in attempts}
    for x in j.executions:
        recorded = (x.run, x.worker) in attempts if x.run is not None else x.worker in attempt_workers
        if not recorded:
            j.problems.append(f"execution {x.token} (run {x.run}, worker ..{x.worker[-6:]}) has no PROCESSING event")
    for e in j.ends():
        worker = str(e.get("worker"))
        needs = {JobStatus.DONE: "ok", JobStatus.FAILED: "fail" if _error_class(e) == "ValueError" else None}
        outcome = needs.get(JobStatus(e["status"]))
        if outcome is None:
            continue
        if not any(x.worker == worker and x.run in (None, e["run"]) and x.outcome == outcome for x in j.executions):
            j.problems.append(
                f"run {e['run']} recorded {JobStatus(e['status']).name} by worker ..{worker[-6:]}, "
                f"but no execution of that worker ended '{outcome}'"
            )
    check_retry_count(j)


def check_retry_count(j: Judged) -> None:
    """A job that always fails, ended FAILED by its own errors: its runs that failed in the log are 1..retry+1."""
    ends = j.ends()
    if j.spec.kind != "retry" or j.doc.get("status") != JobStatus.FAILED:
        return
    if any(_error_class(e) != "ValueError" for e in ends):
        return  # canceled, or orphaned: some runs never got to fail
    expected = set(range(1, j.spec.retry + 2))
    failed = [x.run for x in j.executions if x.outcome == "fail"]
    known = {r for r in failed if r is not None}
    unknown = len(failed) - len([r for r in failed if r is not None])  # run number not readable (outage)
    if not known <= expected or len(expected - known) > unknown:
        j.problems.append(f"failed in the log in runs {sorted(known)} (+{unknown} unknown), not {sorted(expected)}")


def check_overlaps(j: Judged, nodes: dict[str, NodeState]) -> None:
    """No job ran on two workers at overlapping times (but for a stalled node's fencing delay)."""
    executions = sorted(j.executions, key=lambda x: x.start)
    for i, a in enumerate(executions):
        for b in executions[i + 1 :]:
            overlap = min(a.stop, b.stop) - b.start
            if b.worker == a.worker or overlap <= OVERLAP_SLACK:
                continue
            text = (
                f"executions {a.token} (node {a.node}, worker ..{a.worker[-6:]}) and {b.token} (node {b.node}, "
                f"worker ..{b.worker[-6:]}) overlap by {overlap:.2f} s"
            )
            node = nodes.get(a.node)
            if node is not None and node.stalled_during(a.start, a.stop) and overlap <= STALL_OVERLAP:
                j.tolerated.append(text + f" (node {a.node} was SIGSTOPped)")
            else:
                j.problems.append(text)


def judge(h: Harness) -> list[Judged]:
    executions: dict[str, list[Execution]] = defaultdict(list)
    for x in h.log.read().values():
        executions[x.job].append(x)
    nodes = {n.label: n for n in h.nodes}
    judged = []
    for spec in h.specs:
        if spec.id is None:
            continue
        process = h.scheduler.get_job(spec.id)
        doc = h.scheduler.store.find_job(spec.id) or {}
        events = list(h.scheduler.store.events.find({"job": spec.id}))
        events.sort(key=lambda e: (e["run"], e["time"], e["status"] != JobStatus.PROCESSING))
        j = Judged(spec, doc, events, executions.pop(str(spec.id), []))
        check_final(j, h.canceled)
        check_run_ends(j, process.runs())
        check_retries(j, h.canceled)
        check_errors(j)
        check_history(j)
        check_executions(j)
        check_overlaps(j, nodes)
        judged.append(j)
    for job, stray in executions.items():
        h.violations.append(f"{len(stray)} executions of job {job} that the test never added")
    return judged


# -- reporting ----------------------------------------------------------------------------------------------------


def history(j: Judged, h: Harness) -> str:
    lines = [f"  job {j.spec.id} {j.spec.kind} data={_short(j.spec.data)} options={j.spec.options}"]
    status = JobStatus(j.doc.get("status", 0)).name
    lines.append(f"    final {status} run {j.doc.get('run')} orphaned {j.doc.get('orphaned')}")
    for e in j.events:
        error = e.get("error") or {}
        lines.append(
            f"    event run {e['run']} {JobStatus(e['status']).name:<10} worker ..{str(e.get('worker'))[-6:]} "
            f"at {_seconds(e['time'], h.t0_wall)} {error.get('class', '')} {str(error.get('message', ''))[:80]}"
        )
    for x in sorted(j.executions, key=lambda x: x.start):
        lines.append("    " + x.describe(h.t0))
    return "\n".join(lines)


def _short(data: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in data.items() if k != "log"}


def summary(h: Harness, judged: list[Judged]) -> str:
    statuses = Counter(JobStatus(j.doc.get("status", 0)).name for j in judged)
    executions = sum(len(j.executions) for j in judged)
    runs = sum(len(j.ends()) for j in judged)
    releases = sum(1 for j in judged for e in j.events if _kind_of(e) == "release")
    tolerated = sum(len(j.tolerated) for j in judged)
    faults = " ".join(f"{k}={h.faults[k]}" for k in FAULT_KINDS)
    return (
        f"chaos seed {h.seed}: {len(h.nodes)} nodes started | faults {faults} | {len(judged)} jobs "
        f"{dict(statuses)} | {executions} executions, {runs} runs, {releases} releases, {tolerated} tolerated | "
        f"faults {h.timings.get('faults', 0):.1f} s, stop all {h.timings.get('stop all', 0):.1f} s, "
        f"settle {h.timings.get('settle', 0):.1f} s, stop {h.timings.get('stop', 0):.1f} s, total {h.now():.1f} s"
    )


def report(h: Harness, judged: list[Judged], head: str) -> str:
    parts = [head, "violations:"]
    parts += [f"  {v}" for v in h.violations]
    for j in judged:
        parts += [f"  job {j.spec.id} ({j.spec.kind}): {p}" for p in j.problems]
    parts.append("tolerated:")
    parts += [f"  job {j.spec.id}: {t}" for j in judged for t in j.tolerated]
    parts.append("histories of the jobs concerned (times in s from the start):")
    parts += [history(j, h) for j in judged if j.problems or j.tolerated]
    parts.append("fault timeline:")
    parts += [f"  {line}" for line in h.timeline]
    for n in h.nodes:
        parts.append(f"node {n.label} ({n.state}) log tail:\n{tail(n.node.output())}")
    parts.append(f"rerun: .venv/bin/python -m pytest tests/test_chaos.py --chaos-seeds {h.seed}-{h.seed}")
    return "\n".join(parts)


#: What the node logs say about the mechanisms the faults exercised (counted for the summary).
LOG_MARKS = {
    "fenced": "lease of a running job not renewed in time",
    "lost": "is no longer ours",
    "timed out": "timed out after",
    "released": "put back to waiting",
    "step failures": "queue node step failed",
}


def _log_marks(nodes: Iterable[NodeState]) -> str:
    logs = [n.node.output() for n in nodes]
    return ", ".join(f"{name} {sum(log.count(mark) for log in logs)}" for name, mark in LOG_MARKS.items())


# -- the test -----------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(FAULT_SECONDS + SETTLE_SECONDS + 90)
def test_chaos(
    chaos_seed: int,
    scheduler: Scheduler,
    client: MongoClient[dict[str, Any]],
    start_node: Callable[..., Node],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    db_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = Harness(chaos_seed, scheduler, client, start_node, monkeypatch, tmp_path, db_name)
    try:
        h.drive()
        h.stop_all()
        h.settle()
    finally:
        h.cleanup()
    judged = judge(h)
    head = summary(h, judged) + f" | node logs: {_log_marks(h.nodes)}"
    with capsys.disabled():
        print("\n" + head)
    failed = bool(h.violations) or any(j.problems for j in judged)
    if failed:
        text = report(h, judged, head)
        (tmp_path / "chaos-report.txt").write_text(text)
        pytest.fail(f"{text}\n(this report: {tmp_path / 'chaos-report.txt'})", pytrace=False)


# -- the checks themselves, on made-up histories (no server) ------------------------------------------------------


def _event(run: int, status: JobStatus, worker: ObjectId | None, at: float, error: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"_id": ObjectId(), "run": run, "status": int(status), "worker": worker}
    event["time"] = datetime.fromtimestamp(1_700_000_000 + at, timezone.utc)
    if error:
        event["error"] = {"class": error, "message": "", "traceback": ""}
    return event


def _judge(kind: str, options: dict[str, Any], events: list[dict[str, Any]], runs: list[Execution]) -> Judged:
    ends = [e for e in events if e["status"] >= JobStatus.DONE]
    last = max(ends, key=lambda e: e["run"])
    doc = {"status": last["status"], "run": last["run"], "outcome": last["_id"]}
    j = Judged(Spec(kind, {}, options, ObjectId()), doc, events, runs)
    check_final(j, {})
    check_run_ends(j, sorted(ends, key=lambda e: e["run"]))
    check_retries(j, {})
    check_errors(j)
    check_history(j)
    check_executions(j)
    return j


def _retry_history(w1: ObjectId, w2: ObjectId, w3: ObjectId) -> list[dict[str, Any]]:
    """retry=1, always failing; run 1 first ran on w1, whose worker died (released), then failed on w2."""
    return [
        _event(1, JobStatus.PROCESSING, w1, 0.0),
        _event(1, JobStatus.WAITING, w1, 1.0, RELEASED_ERROR),
        _event(1, JobStatus.PROCESSING, w2, 1.5),
        _event(1, JobStatus.FAILED, w2, 2.0, "ValueError"),
        _event(2, JobStatus.POSTPONED, w2, 2.0),
        _event(2, JobStatus.WAITING, None, 3.0),
        _event(2, JobStatus.PROCESSING, w3, 3.1),
        _event(2, JobStatus.FAILED, w3, 3.5, "ValueError"),
    ]


def _runs(*rows: tuple[str, ObjectId, int, float, float | None, str | None]) -> list[Execution]:
    return [
        Execution(token, "job", str(worker), "n0", 1, start, end or start, run, end, outcome)
        for token, worker, run, start, end, outcome in rows
    ]


def test_checks_accept_a_history_the_spec_allows() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.1, None, None), ("b", w2, 1, 1.6, 1.9, "fail"), ("c", w3, 2, 3.2, 3.4, "fail"))
    j = _judge("retry", {"retry": 1}, _retry_history(w1, w2, w3), runs)
    check_retry_count(j)
    check_overlaps(j, {})
    assert j.problems == [] and j.tolerated == []


def test_checks_catch_lost_and_doubled_retries() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    lost = _judge("retry", {"retry": 2}, _retry_history(w1, w2, w3), [])
    assert any("retry lost" in p for p in lost.problems)
    doubled = _retry_history(w1, w2, w3) + [_event(2, JobStatus.FAILED, w3, 3.6, "ValueError")]
    assert any("more than one end event" in p for p in _judge("retry", {"retry": 1}, doubled, []).problems)


def test_checks_catch_histories_the_spec_forbids() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    unreleased = [e for e in _retry_history(w1, w2, w3) if e["status"] != JobStatus.WAITING or e["worker"] is None]
    problems = _judge("retry", {"retry": 1}, unreleased, []).problems
    assert any("never released nor ended" in p for p in problems)
    twice = _retry_history(w1, w2, w3) + [_event(2, JobStatus.POSTPONED, w1, 1.2)]
    assert any("announced 2 times" in p for p in _judge("retry", {"retry": 1}, twice, []).problems)
    unpostponed = [e for e in _retry_history(w1, w2, w3) if not (e["status"] == JobStatus.WAITING and e["run"] == 2)]
    assert any("claimed while POSTPONED" in p for p in _judge("retry", {"retry": 1}, unpostponed, []).problems)
    missing = _judge("retry", {"retry": 1}, _retry_history(w1, w2, w3), _runs(("x", ObjectId(), 1, 0.5, 0.7, "ok")))
    assert any("has no PROCESSING event" in p for p in missing.problems)
    outage = [_event(1, JobStatus.PROCESSING, w1, 0.0), _event(1, JobStatus.FAILED, w1, 1.0, "ServerUnavailableError")]
    assert any("FAILED with ServerUnavailableError" in p for p in _judge("plain", {}, outage, []).problems)


def test_checks_catch_overlapping_executions_but_a_stalled_nodes_fencing_delay() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.1, None, None), ("b", w2, 1, 0.5, 1.9, "fail"), ("c", w3, 2, 3.2, 3.4, "fail"))
    runs[0].last = 1.2  # "a" still ran 0.8 s after "b" started
    j = _judge("retry", {"retry": 1}, _retry_history(w1, w2, w3), runs)
    check_overlaps(j, {})
    assert any("overlap by 0.70 s" in p for p in j.problems)
    stalled = NodeState("n0", Node(None, Path("/dev/null")), stops=[[0.0, 2.0]])  # type: ignore[arg-type]
    runs[0].last = 0.8
    j = _judge("retry", {"retry": 1}, _retry_history(w1, w2, w3), runs)
    check_overlaps(j, {"n0": stalled})
    assert j.problems == [] and len(j.tolerated) == 1
