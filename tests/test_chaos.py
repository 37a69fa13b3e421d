"""Randomized fault harness ("chaos"): real queue nodes, a seeded schedule of faults, invariants checked after.

Each seed starts 2-3 queue nodes (``orphaned_timeout`` 2 s, 2-3 workers each), adds a mix of
``sample_jobs:ChaosJob`` jobs (plain, always failing with retries, recurring ones that cancel themselves or are
canceled by the test after some runs, jobs that sleep past their timeout, long jobs canceled while running, jobs
due a few seconds after they are added, jobs whose code starts subprocesses, some in a session of their own) and,
for :data:`FAULT_SECONDS`, injects faults drawn from the seed, each kind at least once:

- ``kill_node``: SIGKILL of a node's process group, and a restart; ``term_node``: SIGTERM of a node, and a
  restart; ``kill_worker``: SIGKILL of a single worker process;
- ``stop_node``: SIGSTOP of a node's queue process past ``orphaned_timeout`` (its manager and workers keep
  running), then SIGCONT; ``group_stop``: the same for the node's whole process group (Ctrl-Z, a frozen
  container: the node and its manager stop, the workers, each in a process group of its own, keep running);
- ``failpoint``: ``failCommand`` failpoints that make the server close connections for a moment; ``outages``:
  2-4 outages of the whole data path in a row, each longer than ``orphaned_timeout``;
- ``kill_worker_children``: SIGKILL of the worker alone, or of the node process alone, while the job's
  subprocesses run;
- ``term_during_end``: SIGTERM of a node while one of its workers is between its job's return and the recording
  of its end (nodes run with the test-only failpoint ``worker.returned=sleep:0.3@0.3`` so that such moments last);
- ``cancel``: cancels of running or waiting jobs;
- node configurations drawn per node: ``claim_pause``, workers that stop themselves right after their claim is
  written, before their manager hears of it (failpoint ``worker.claimed=stop:S@0.15``, S shorter or longer than
  the lease; counted when the harness sees a stopped worker); ``skew``: one node of the seed runs with its clock
  120 s behind or ahead (Debian's libfaketime; the server never is, and ``time.monotonic()`` stays real).

Then the faults stop, every node is stopped gracefully (SIGTERM) while jobs run, fresh nodes take over, the
system settles (polling with deadlines), the nodes stop gracefully again, and the run log the jobs wrote (one line
per start, tick and end of every execution and every tick of its subprocesses, see ``ChaosJob``), the job and
event collections and the job collection's change stream are checked against SPEC sections 2 and 4:

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
- no job ran on two workers at overlapping times (one execution, its subprocesses included, logged activity after
  another one had started), except for at most one heartbeat (+ slack), the stall window, when the first one ran
  on a node that was SIGSTOPped (queue process or whole group) or its worker was stopped (SPEC 4: a stalled node
  fences its own jobs);
- no job code ran after the lease it ran under expired on the server: each attempt's lease (its claim and the
  last expiry its node wrote) is read from the job collection's change stream, and no activity of the execution
  (worker or subprocess) is logged after it (SPEC 4: every process that runs a job's code fences itself);
- no subprocess of a job outlived its worker by more than the stall window when the harness killed the worker or
  its node (SPEC 4: a worker that dies takes its job's processes with it);
- no run ran again after its code had returned, unless its worker died before the end was recorded or an outage
  kept it from recording (SPEC 4: a graceful stop never kills a run whose code has returned);
- no run started before it was due on the server's clock: a job added with ``at`` not before it, a retry or
  interval run not before the end of the previous run plus its delay (SPEC 4: schedules use the server's clock);
- a job ended FAILED by a third orphaning only when three attempts of that run lost their process to a SIGKILL
  (SPEC 4: orphanings count dead processes only).

:func:`test_chaos_room` (same seeds) attacks the room ledger of a small capped job collection (SPEC 5): long-lived
producers, one-shot producers (``taskscheduler add``, and fresh schedulers by the hundred) and ``flush()`` from
another process; its change stream shows that no unfinished job is ever evicted and no finished job deleted while
the collection is less than half full.

``make test`` runs seeds 0-4; ``make chaos`` runs 50 (``--chaos-seeds N``, or a list/range such as ``3,17`` or
``10-19``). A failure names its seed: rerun it alone with ``--chaos-seeds SEED-SEED``.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bson
import psutil
import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.database import Database

from helpers import Node, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import MAX_ORPHANINGS
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.ops.embedded import EmbeddedServer

JOB = "sample_jobs:ChaosJob"
ORPHANED_TIMEOUT = 2.0
#: How long faults are injected; then the system settles within SETTLE_SECONDS.
FAULT_SECONDS = 15.0
SETTLE_SECONDS = 45.0
#: Overlap of activity below this is scheduling noise (one clock, time.monotonic(), for every process).
OVERLAP_SLACK = 0.02
#: Event times are stamped (on the server's clock, as each process reads it) when a change is prepared, before it is
#: written: a claim is stamped before it is sent and may take up to its bound (store.CLAIM_SECONDS, a quarter of
#: the lease when less) to be written, so the release that let it in may carry a later stamp by that much.
STAMP_SLACK = min(1.0, ORPHANED_TIMEOUT / 4) + 0.05
#: See Harness._kill_node.
NODE_AFTER_WORKER_KILL = 1.0
#: A graceful stop that reaches a job's code in the instant it returns may still end it (the last statement of
#: start() and its return to the worker are not one instant); the stop's grace (fencing.STOP_RETURN_SECONDS),
#: the watchdog's period and the manager's outside kill (manager.STOP_GRACE_SECONDS) bound when that can happen.
STOP_RETURN_RACE = 1.2
#: The stall window: the longest overlap tolerated when the first execution ran on a SIGSTOPped node (or its worker
#: was stopped): one heartbeat, plus slack.
STALL_OVERLAP = ORPHANED_TIMEOUT / 4 + 0.5
#: Activity logged this little after a lease's end on the server is clock noise (the server keeps milliseconds).
LEASE_SLACK = 0.1
#: A run that starts this little before it is due is clock noise (a node reads the server's clock over the wire).
EARLY_SLACK = 0.1
#: How long a job's subprocess may outlive its worker killed by the harness: the stall window.
CHILD_SLACK = STALL_OVERLAP
#: Commands a failpoint closes the connection on (never the handshake: the outage is of the data path).
FAILPOINT_COMMANDS = (
    ("find", "aggregate", "getMore", "insert", "update", "findAndModify", "delete"),
    ("update", "findAndModify"),
    ("insert", "delete"),
    ("find", "aggregate", "getMore"),
)
#: An outage of the whole data path (the ``outages`` fault).
OUTAGE_COMMANDS = FAILPOINT_COMMANDS[0]
FAULT_KINDS = (
    "kill_node",
    "term_node",
    "kill_worker",
    "stop_node",
    "failpoint",
    "cancel",
    "group_stop",
    "kill_worker_children",
    "outages",
    "term_during_end",
)
#: Weights of the faults drawn beyond one of each kind (one series of outages per seed is enough).
FAULT_WEIGHTS = (2, 1, 3, 1, 2, 2, 1, 2, 0, 1)
#: Faults that are a node's configuration, counted when they happen (claim pauses) or once per node (skew).
NODE_FAULTS = ("claim_pause", "skew")
#: Test-only failpoints (taskscheduler.failpoints) that make the moments term_during_end and claim_pause aim at.
RETURNED_FAILPOINT = "worker.returned=sleep:0.3@0.3"
CLAIM_PAUSE_CHANCE = 0.15
#: Debian's libfaketime (package faketime); the skewed node's clock is this many seconds off.
FAKETIME_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
CLOCK_SKEW = 120
#: A node's log line for each worker it forks.
SPAWNED = re.compile(r"worker ([0-9a-f]{24}) spawned \(pid (\d+)\)")
#: sitecustomize.py of the skewed node. libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC=1 (needed: faking the
#: monotonic clock too makes every threading wait with a timeout hang) fails clock_nanosleep(CLOCK_MONOTONIC,
#: TIMER_ABSTIME), which time.sleep() uses since Python 3.11, with EINVAL (libfaketime issue 426): sleep in
#: select() instead, on the same real monotonic clock.
SLEEP_WORKAROUND = '''"""time.sleep() that works under libfaketime 0.9.10 (FAKETIME_DONT_FAKE_MONOTONIC=1)."""
import select
import time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        select.select([], [], [], left)


time.sleep = _sleep
'''
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

    kind: str  # plain, retry, interval, open, timeout, cancel, children, delayed
    data: dict[str, Any]
    options: dict[str, Any]
    id: ObjectId | None = None
    open_runs: int = 0  # open: the test cancels it once this many runs ended
    cancel_after: float = 0.0  # cancel: the test cancels it this long after an execution started
    delay: float = 0.0  # delayed: added with ``at`` this many seconds after the add (server clock)

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
    children: list[int] = field(default_factory=list)  # pids of the subprocesses its job started
    child_last: float | None = None  # the last activity of one of them

    @property
    def stop(self) -> float:
        """Its last activity, its subprocesses' included: its end, or the last line of one that was killed. Between
        two lines a ChaosJob only sleeps, so two executions overlap when one wrote a line after the other started
        (the blind spot of a killed one is at most one ChaosJob.TICK)."""
        return max(self.last, self.end if self.end is not None else self.last)

    def describe(self, t0: float) -> str:
        run = "?" if self.run is None else self.run
        end = f"{self.end - t0:.2f}" if self.end is not None else f"(killed; last seen {self.last - t0:.2f})"
        children = f" children {self.children} last {self.child_last - t0:.2f}" if self.child_last else ""
        return (
            f"exec {self.token} run {run} worker ..{self.worker[-6:]} node {self.node} pid {self.pid} "
            f"{self.start - t0:.2f} -> {end} {self.outcome or ''}{children}"
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
            execution.end = float(f[2])
            execution.last = max(execution.last, execution.end)
            execution.outcome = f[3]
        elif kind == "K":
            execution.children.append(int(f[2]))
        elif kind == "C":
            at = float(f[3])
            execution.last = max(execution.last, at)
            execution.child_last = max(execution.child_last or at, at)
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
    group: bool = False  # the current stop is of its whole process group
    env: dict[str, str] = field(default_factory=dict)  # what it was started with (failpoints, clock)
    workers: dict[str, int] = field(default_factory=dict)  # worker id -> pid, from its log
    log_offset: int = 0

    def serving(self) -> bool:
        """Whether it has set up its signal handling and serves (SIGTERM before that just kills the interpreter)."""
        self.ready = self.ready or "queue node serving" in self.node.output()
        return self.ready

    def stalled_during(self, start: float, stop: float) -> bool:
        return _during(self.stops, start, stop)

    def scan(self) -> dict[str, int]:
        """The workers it forked so far (its log names each), read on from where the last scan stopped."""
        try:
            with open(self.node.log, "rb") as log:
                log.seek(self.log_offset)
                chunk = log.read()
        except OSError:
            return self.workers
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.log_offset += len(complete)
        for match in SPAWNED.finditer(complete.decode(errors="replace")):
            self.workers[match[1]] = int(match[2])
        return self.workers


def _during(intervals: Iterable[list[float]], start: float, stop: float) -> bool:
    """Whether one of the [begin, end] intervals (end 0: not ended) meets [start, stop]."""
    return any(t0 <= stop and (t1 if t1 else float("inf")) >= start for t0, t1 in intervals)


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
        #: Where the job collection's change stream starts for the lease check (see lease_history).
        self.start_op = client[db_name].command("ping")["operationTime"]
        self.nodes: list[NodeState] = []
        self.size = self.rng.choice((2, 3))
        #: One node of the seed runs with a skewed clock (when libfaketime is installed: .ci/run installs it).
        self.skew = self.rng.choice((-CLOCK_SKEW, CLOCK_SKEW, 0))
        self.skewed = f"n{self.rng.randrange(self.size)}" if self.skew else None
        self.site_dir = tmp_path / "faketime-site"
        if self.skewed and not FAKETIME_LIBRARY.exists():
            if os.environ.get("CI"):
                pytest.fail(f"{FAKETIME_LIBRARY} is missing (Debian package faketime): the clock skew fault needs it")
            self.skewed = None
        if self.skewed:
            self.site_dir.mkdir()
            (self.site_dir / "sitecustomize.py").write_text(SLEEP_WORKAROUND)
        self.killed_pids: dict[int, float] = {}  # worker pid -> when the harness SIGKILLed it
        self.node_stops: dict[str, float] = {}  # node -> when the harness sent it SIGTERM
        self.killed_workers: dict[str, float] = {}  # the same by worker id
        self.node_deaths: dict[str, float] = {}  # node -> when it died (SIGKILL by the harness, or by itself)
        self.worker_stops: dict[int, list[list[float]]] = {}  # worker pid -> [stopped, continued] (claim pauses)
        self._gone: set[int] = set()  # worker pids that exited
        self._procs: dict[int, psutil.Process] = {}
        self._watched = 0.0
        self.outages: list[list[float]] = []  # [failpoint on, off] monotonic times
        self.retry_in = {"term_during_end": 0.05}  # faults that wait for a short moment look for it often
        self.leases_checked = 0  # executions whose lease was found in the change stream (judge)
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
                self.later(self.retry_in.get(name, retry_in), name, action)

    def note(self, text: str) -> None:
        self.timeline.append(f"{self.now():6.2f} {text}")

    # -- nodes -----------------------------------------------------------------------------------------------------

    def start_node(self) -> NodeState:
        label = f"n{len(self.nodes)}"
        env = self.node_env(label)
        saved = {name: os.environ.get(name) for name in env}
        for name, value in env.items():  # inherited by the node and its workers (not by the harness's own children)
            self.monkeypatch.setenv(name, value)
        try:
            children = str(self.rng.choice((2, 3)))
            node = self._start_node("--max-children", children, orphaned_timeout=ORPHANED_TIMEOUT)
        finally:
            for name, old in saved.items():
                if old is None:
                    self.monkeypatch.delenv(name, raising=False)
                else:
                    self.monkeypatch.setenv(name, old)
        state = NodeState(label, node, env=env)
        self.nodes.append(state)
        faults = [env["TASKSCHEDULER_FAILPOINTS"]] if env["TASKSCHEDULER_FAILPOINTS"] else []
        if "FAKETIME" in env:
            faults.append(f"clock {env['FAKETIME']}")
            self.faults["skew"] += 1
        self.note(f"start {label} pid {node.pid} {' '.join(faults)}".rstrip())
        return state

    def node_env(self, label: str) -> dict[str, str]:
        """What a node runs under: its label (the run log names it), the failpoints drawn for it, and a skewed
        clock for the seed's skewed node."""
        rng = self.rng
        points = []
        if rng.random() < 0.5:
            points.append(RETURNED_FAILPOINT)
        short, long = rng.uniform(0.4, 1.2), rng.uniform(ORPHANED_TIMEOUT + 0.4, ORPHANED_TIMEOUT + 1.2)
        if rng.random() < 0.5:  # a pause the lease survives, or one it does not
            points.append(f"worker.claimed=stop:{rng.choice((short, long)):.2f}@{CLAIM_PAUSE_CHANCE}")
        env = {"CHAOS_NODE": label, "TASKSCHEDULER_FAILPOINTS": ";".join(points)}
        if label == self.skewed:
            env.update(
                LD_PRELOAD=str(FAKETIME_LIBRARY),
                FAKETIME=f"{self.skew:+d}s",
                FAKETIME_DONT_FAKE_MONOTONIC="1",  # the run log's clock stays comparable
                PYTHONPATH=os.pathsep.join([str(self.site_dir), os.environ.get("PYTHONPATH", "")]),
            )
        return env

    def node(self, label: str) -> NodeState | None:
        return next((n for n in self.nodes if n.label == label), None)

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
                self.node_deaths.setdefault(n.label, time.monotonic())
                self.violations.append(
                    f"node {n.label} exited by itself with code {n.node.proc.returncode}:\n{tail(n.node.output())}"
                )
                self.later(0.5, "restart", self.restart)  # go on with the seed

    def watch_workers(self, every: float = 0.1) -> None:
        """Workers stopped in their tracks (the worker.claimed failpoint stops one for a while) are counted as
        claim pauses and remembered as stalls of the executions they run next."""
        now = time.monotonic()
        if now - self._watched < every:
            return
        self._watched = now
        for n in self.nodes:
            if n.state not in ("up", "stopped"):
                continue
            for worker, pid in n.scan().items():
                if pid in self._gone:
                    continue
                try:
                    proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                    stopped = proc.status() == psutil.STATUS_STOPPED
                except psutil.Error:
                    self._gone.add(pid)
                    continue
                stops = self.worker_stops.setdefault(pid, [])
                if stopped and (not stops or stops[-1][1]):
                    stops.append([now, 0.0])
                    self.faults["claim_pause"] += 1
                    self.note(f"worker ..{worker[-6:]} (pid {pid}) of {n.label} stopped itself")
                elif not stopped and stops and not stops[-1][1]:
                    stops[-1][1] = now
                    self.note(f"worker ..{worker[-6:]} (pid {pid}) of {n.label} continues")

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
        # A worker and its manager SIGKILLed in the same instant leave the job's other processes to run out: no
        # process of ours is left to end them (a documented limit, docs/concepts.md "The stall window"). So a
        # node is never killed within NODE_AFTER_WORKER_KILL of one of its workers.
        now = time.monotonic()
        recent = {self._node_of_pid(pid) for pid, at in self.killed_pids.items() if now - at < NODE_AFTER_WORKER_KILL}
        candidates = [n for n in self.up() if n.label not in recent]
        if not candidates:
            return False
        victim = self.rng.choice(candidates)
        victim.node.kill_group()
        victim.state = "killed"
        self.node_deaths[victim.label] = time.monotonic()
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

    def _manager_can_act(self, x: Execution) -> bool:
        """Whether the manager of the worker running ``x`` could end its job's processes were the worker killed
        now. One that is paused or dead cannot, and then no process of ours is left to end them (a documented
        limit, docs/concepts.md "The stall window"): a job with subprocesses is not killed then."""
        node = self.node(x.node)
        return x.child_last is None or node is None or node.state == "up"

    def _kill_worker(self) -> bool:
        busy = [e for e in self.log.active() if _is_worker(e.pid, self.db_name) and self._manager_can_act(e)]
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
        self.killed(pid)
        self.note(f"SIGKILL {what}")
        return True

    def _node_of_pid(self, pid: int) -> str | None:
        for n in self.nodes:
            if pid in n.scan().values():
                return n.label
        return None

    def killed(self, pid: int) -> None:
        """Remember that the harness SIGKILLed worker ``pid`` now (its id: the last worker a node forked so)."""
        now = self.killed_pids[pid] = time.monotonic()
        for n in self.nodes:
            ids = [worker for worker, known in n.scan().items() if known == pid]
            if ids:
                self.killed_workers[ids[-1]] = now

    def _kill_worker_children(self) -> bool:
        """SIGKILL of the worker alone, or of the node process alone, while the job's subprocesses run: they must
        die with it (SPEC 4), whether in the worker's process group or in a session of their own."""
        busy = [
            x
            for x in self.log.active()
            if x.child_last is not None and _is_worker(x.pid, self.db_name) and self._manager_can_act(x)
        ]
        if not busy:
            return False
        victim = self.rng.choice(busy)
        node = self.node(victim.node)
        if node is not None and node.state == "up" and self.rng.random() < 0.5:
            os.kill(node.node.pid, signal.SIGKILL)
            node.node.proc.wait(10)
            node.state = "killed"
            self.node_deaths[node.label] = time.monotonic()
            self.note(f"SIGKILL node process of {node.label} alone; its worker pid {victim.pid} runs {victim.job} "
                      f"with subprocesses {victim.children}")
            self.later(self.rng.uniform(0.0, 1.0), "restart", self.restart)
            return True
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.killed(victim.pid)
        self.note(f"SIGKILL worker pid {victim.pid} alone of {victim.node}, running {victim.job} with "
                  f"subprocesses {victim.children}")
        return True

    def _term_during_end(self) -> bool:
        """SIGTERM of a node while one of its workers is between its job's return and the recording of its end:
        the graceful stop must let that end be recorded, not run the job again (SPEC 4)."""
        if self.failpoint_on:
            return False
        now = time.monotonic()
        for x in list(self.log.read().values()):
            node = self.node(x.node)
            if x.end is None or now - x.end > 0.25 or node is None or node.state != "up" or not node.serving():
                continue
            doc = self.scheduler.store.find_job(ObjectId(x.job)) or {}
            if doc.get("status") != JobStatus.PROCESSING or str(doc.get("worker")) != x.worker:
                continue  # recorded already
            self.note(
                f"SIGTERM {node.label} {now - x.end:.2f} s after execution {x.token} of {x.job} returned, its end "
                f"unrecorded: exit {self.terminate(node)}"
            )
            self.later(self.rng.uniform(0.0, 0.5), "restart", self.restart)
            return True
        return False

    def _stop_node(self, group: bool = False) -> bool:
        candidates = self.up()
        if len(candidates) < 2 or any(n.state == "stopped" for n in self.nodes):
            return False  # one stalled node at a time, and another one to take its jobs over
        busy = {x.node for x in self.log.active()}
        victim = self.rng.choice([n for n in candidates if n.label in busy] or candidates)  # one that runs jobs
        if group:
            os.killpg(victim.node.pid, signal.SIGSTOP)  # its group: the node and its manager, not its workers
        else:
            os.kill(victim.node.pid, signal.SIGSTOP)
        victim.state = "stopped"
        victim.group = group
        victim.stops.append([time.monotonic(), 0.0])
        pause = ORPHANED_TIMEOUT + self.rng.uniform(0.3, 1.5)
        what = "process group" if group else "queue process only"
        self.note(f"SIGSTOP {victim.label} ({what}) for {pause:.2f} s")
        self.later(pause, "SIGCONT", lambda: self._cont(victim))
        return True

    def _group_stop(self) -> bool:
        return self._stop_node(group=True)

    def _cont(self, victim: NodeState) -> bool:
        if victim.state == "stopped":
            with contextlib.suppress(ProcessLookupError):
                if victim.group:
                    os.killpg(victim.node.pid, signal.SIGCONT)
                else:
                    os.kill(victim.node.pid, signal.SIGCONT)
            victim.state = "up"
            victim.stops[-1][1] = time.monotonic()
            self.note(f"SIGCONT {victim.label}")
        return True

    def _failpoint(self) -> bool:
        if self.failpoint_on:
            return False
        self.outage(list(self.rng.choice(FAILPOINT_COMMANDS)), self.rng.uniform(0.3, 1.2))
        return True

    def _outages(self) -> bool:
        """Outages of the whole data path in a row, each longer than orphaned_timeout, no process dead: no job may
        be lost to them (SPEC 4: orphanings count dead processes only)."""
        if self.failpoint_on:
            return False
        count = self.rng.choice((2, 3, 4))
        self.note(f"{count} outages in a row, each longer than orphaned_timeout")
        self._next_outage(count)
        return True

    def _next_outage(self, left: int) -> None:
        duration = ORPHANED_TIMEOUT + self.rng.uniform(0.2, 0.6)
        self.outage(list(OUTAGE_COMMANDS), duration)

        def again() -> bool:
            if self.now() > FAULT_SECONDS:
                return True  # the fault phase is over
            if self.failpoint_on:
                return False
            self.faults["outages"] += 1
            self._next_outage(left - 1)
            return True

        if left > 1:
            self.later(duration + self.rng.uniform(0.3, 0.8), "outage", again)

    def outage(self, commands: list[str], duration: float) -> None:
        """The server closes the connection on ``commands`` for ``duration`` seconds."""
        self.client.admin.command(
            "configureFailPoint",
            "failCommand",
            mode="alwaysOn",
            data={"failCommands": commands, "closeConnection": True},
        )
        self.failpoint_on = True
        self.outages.append([time.monotonic(), 0.0])
        self.note(f"failpoint closeConnection on {','.join(commands)} for {duration:.2f} s")
        self.later(duration, "failpoint off", self.failpoint_off)

    def failpoint_off(self) -> bool:
        if self.failpoint_on:
            self.client.admin.command("configureFailPoint", "failCommand", mode="off")
            self.failpoint_on = False
            self.outages[-1][1] = time.monotonic()
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
            data = {"seconds": 3.0}
            if rng.random() < 0.5:  # the node kills it at its timeout: its subprocess must die too
                data.update(children=[rng.random() < 0.5], child_seconds=3.0)
            plans.append(("timeout", data, {"timeout": 1, "retry": rng.randint(0, 1), "retry_interval": 0}))
        for _ in range(2):
            plans.append(("cancel", {"seconds": 30.0}, {}))
        for _ in range(rng.randint(2, 3)):
            seconds = rng.uniform(1.5, 3.0)
            children = rng.choice(([False], [True], [False, True]))
            plans.append(("children", {"seconds": seconds, "children": children, "child_seconds": seconds}, {}))
        for _ in range(rng.randint(1, 2)):
            plans.append(("delayed", {"seconds": rng.uniform(0.1, 0.5)}, {}))
        rng.shuffle(plans)
        for i, (kind, data, options) in enumerate(plans):
            spec = Spec(kind, dict(data, log=log), options)
            spec.open_runs = rng.randint(2, 3) if kind == "open" else 0
            spec.cancel_after = rng.uniform(0.3, 2.5) if kind == "cancel" else 0.0
            spec.delay = rng.uniform(1.0, 4.0) if kind == "delayed" else 0.0
            self.specs.append(spec)
            when = 0.0 if i < len(plans) // 2 else rng.uniform(0.5, FAULT_SECONDS * 0.75)
            self.later(when, "add job", lambda spec=spec: self.add(spec))

    def add(self, spec: Spec) -> bool:
        if self.failpoint_on:
            return False
        if spec.delay:  # this machine's clock is the server's (one machine): `at` is on the server's clock
            spec.options["at"] = round(time.time() + spec.delay, 3)
        spec.id = self.scheduler.add_job(JOB, spec.data, spec.options).id
        return True

    def plan_faults(self) -> None:
        kinds = list(FAULT_KINDS) + ["kill_worker"]  # each kind at least once, then a random mix
        kinds += self.rng.choices(FAULT_KINDS, weights=FAULT_WEIGHTS, k=self.rng.randint(2, 5))
        for kind in kinds:
            # A series of outages takes most of the fault phase: it starts early, so that it ends within it.
            latest = 3.0 if kind == "outages" else FAULT_SECONDS - 0.5
            self.later(self.rng.uniform(0.8, latest), kind, self.fault(kind))

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
            self.watch_workers()
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
            self.watch_workers()
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
        self.node_stops.setdefault(n.label, time.monotonic())
        try:
            code: int | None = n.node.stop(signal.SIGTERM, timeout=20)
        except subprocess.TimeoutExpired:
            n.node.kill_group()
            code = None
        if code != 0:
            self.violations.append(f"node {n.label} exited {code} on SIGTERM:\n{tail(n.node.output())}")
        return code

    def cleanup(self) -> None:
        """Whatever happened: no failpoint left on, no node left stopped (the fixture then stops them), no job
        subprocess left running."""
        try:
            self.failpoint_off()
        finally:
            for n in self.nodes:
                self._cont(n)
            for proc in _chaos_children(self.log.path):
                with contextlib.suppress(psutil.Error):
                    proc.kill()

    # -- what the checks need to know ---------------------------------------------------------------------------

    def worker_deaths(self) -> dict[str, float]:
        """Worker id -> when its process died (monotonic): SIGKILLed by the harness, alone or with its node (a
        worker dies with its manager), or its node died by itself (then: when the harness saw that)."""
        found = {}
        for n in self.nodes:
            for worker in n.scan():
                died = [t for t in (self.killed_workers.get(worker), self.node_deaths.get(n.label)) if t is not None]
                if died:
                    found[worker] = min(died)
        return found

    def deaths(self) -> dict[str, float]:
        """Execution token -> when the harness killed its worker (or its node) while it ran."""
        found = {}
        for x in self.log.read().values():
            died = self.killed_pids.get(x.pid)
            if died is None or died < x.start:
                died = self.node_deaths.get(x.node)
            if died is not None and died >= x.start and (x.end is None or x.end > died):
                found[x.token] = died
        return found


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


def _chaos_children(log: Path) -> list[psutil.Process]:
    """Subprocesses of ChaosJob executions that log to ``log`` and still run."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info.get("cmdline") or []
        if "chaos-child" in cmdline and str(log) in cmdline and proc.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


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
        "children": {JobStatus.DONE},
        "delayed": {JobStatus.DONE},
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
        if (attempt["time"] - closing["time"]).total_seconds() > STAMP_SLACK:
            j.problems.append(f"run {run}: attempt of ..{str(attempt['worker'])[-6:]} closed before it started")
        if i + 1 < len(attempts) and (closing["time"] - attempts[i + 1]["time"]).total_seconds() > STAMP_SLACK:
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


def check_overlaps(
    j: Judged, nodes: dict[str, NodeState], worker_stops: Mapping[int, list[list[float]]] | None = None
) -> None:
    """No job ran on two workers at overlapping times, subprocesses included (but for the stall window when the
    first one's node, or its worker, was stopped: its fencing delay)."""
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
            # A worker stopped right after its claim (the claim pause) is stalled before its execution starts.
            paused = _during((worker_stops or {}).get(a.pid, []), a.start - 1.0, a.stop)
            if node is not None and node.stalled_during(a.start, a.stop) and overlap <= STALL_OVERLAP:
                j.tolerated.append(text + f" (node {a.node} was SIGSTOPped)")
            elif paused and overlap <= STALL_OVERLAP:
                j.tolerated.append(text + f" (worker pid {a.pid} was stopped)")
            else:
                j.problems.append(text)


@dataclass
class Lease:
    """One attempt's hold on a run, from the job collection's change stream (server clock, unix seconds): when it
    was claimed, and the last expiry its node wrote while the attempt owned the run."""

    run: int
    claimed: float
    expires: float
    ended: float | None = None  # when the attempt stopped owning the run (ended, released, taken over)


def lease_history(changes: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[Lease]]:
    """(job, worker) -> the leases its attempts held, replayed from change events (inserts carry the document,
    updates the fields they changed)."""
    leases: dict[tuple[str, str], list[Lease]] = defaultdict(list)
    docs: dict[Any, dict[str, Any]] = {}
    holding: dict[Any, tuple[tuple[str, int], Lease]] = {}
    for change in changes:
        key = (change.get("documentKey") or {}).get("_id")
        op = change["operationType"]
        if op in ("insert", "replace") and change.get("fullDocument") is not None:
            doc = dict(change["fullDocument"])
        elif op == "update":
            doc = dict(docs.get(key, {}))
            doc.update((change.get("updateDescription") or {}).get("updatedFields") or {})
        else:
            docs.pop(key, None)
            if key in holding:
                holding.pop(key)[1].ended = _timestamp(change["wallTime"]) if "wallTime" in change else None
            continue
        docs[key] = doc
        wall = change.get("wallTime")
        when = _timestamp(wall) if isinstance(wall, datetime) else float(change["clusterTime"].time)
        held = holding.get(key)
        owned = doc.get("status") == JobStatus.PROCESSING and isinstance(doc.get("expires"), datetime)
        owner = (str(doc.get("worker")), int(doc.get("run", 1)))
        if held is not None and (not owned or held[0] != owner):
            held[1].ended = when
            holding.pop(key)
            held = None
        if not owned:
            continue
        if held is None:  # a claim
            lease = Lease(owner[1], when, _timestamp(doc["expires"]))
            leases[(str(key), owner[0])].append(lease)
            holding[key] = (owner, lease)
        else:  # a renewal (or another change while it is held)
            held[1].expires = _timestamp(doc["expires"])
    return leases


def _timestamp(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def read_changes(db: Database[dict[str, Any]], collection: str, start: Any) -> list[dict[str, Any]]:
    """Every change of ``collection`` since the operation time ``start``."""
    changes = []
    with db.watch([{"$match": {"ns.coll": collection}}], start_at_operation_time=start, max_await_time_ms=100) as cs:
        empty = 0
        while empty < 2:
            change = cs.try_next()
            if change is None:
                empty += 1
                continue
            empty = 0
            changes.append(change)
    return changes


def check_leases(j: Judged, leases: Mapping[tuple[str, str], list[Lease]], offset: float) -> int:
    """No activity of a job's code (its worker or its subprocesses) after the lease it ran under expired on the
    server. ``offset``: server (wall) clock minus the run log's monotonic clock. Returns the executions checked."""
    checked = 0
    for x in j.executions:
        held = [
            lease
            for lease in leases.get((str(j.spec.id), x.worker), ())
            if x.run in (None, lease.run) and lease.claimed <= x.start + offset + LEASE_SLACK
        ]
        if not held:
            continue  # no claim seen for it: check_executions reports an execution no attempt explains
        lease = max(held, key=lambda lease: lease.claimed)
        checked += 1
        late = x.stop + offset - lease.expires
        if late > LEASE_SLACK:
            j.problems.append(
                f"execution {x.token} (run {x.run}, node {x.node}, worker ..{x.worker[-6:]}) was active {late:.2f} s "
                "after its lease expired on the server"
                + (" (its subprocess)" if x.child_last is not None and x.child_last + offset > lease.expires else "")
            )
    return checked


def check_children(j: Judged, deaths: Mapping[str, float]) -> None:
    """A job's subprocesses die with its worker: none logs activity later than the stall window after the
    harness killed the worker or its node (``deaths``: execution token -> when)."""
    for x in j.executions:
        died = deaths.get(x.token)
        if died is not None and x.child_last is not None and x.child_last > died + CHILD_SLACK:
            j.problems.append(
                f"a subprocess of execution {x.token} (node {x.node}, worker pid {x.pid}) ran on "
                f"{x.child_last - died:.2f} s after the worker was killed"
            )


def check_doubled_runs(
    j: Judged, deaths: Mapping[str, float], outages: list[list[float]], stops: Mapping[str, float] | None = None
) -> None:
    """A run whose code returned is not run again, unless its worker died before the end was recorded or an
    outage kept the end from being recorded (then the run is not known to have ended). ``deaths``: worker id ->
    when the harness saw its process die (run log clock)."""
    for a in j.executions:
        if a.end is None or a.run is None:
            continue
        again = [b for b in j.executions if b.run == a.run and b.token != a.token and b.start > a.end]
        if not again:
            continue
        b = min(again, key=lambda x: x.start)
        if deaths.get(a.worker, float("inf")) <= b.start or _during(outages, a.end, b.start):
            continue
        stop = (stops or {}).get(a.node)
        if stop is not None and stop <= a.end <= stop + STOP_RETURN_RACE:
            j.tolerated.append(
                f"run {a.run} ran again after execution {a.token} returned '{a.outcome}' {a.end - stop:.2f} s into "
                f"its node's graceful stop (a stop may end code in the instant it returns)"
            )
            continue
        j.problems.append(
            f"run {a.run} ran again (execution {b.token} on node {b.node}) {b.start - a.end:.2f} s after execution "
            f"{a.token} on node {a.node} had returned '{a.outcome}', though its worker did not die"
        )


def _delay(spec: Spec, status: JobStatus) -> float:
    """The least time between a run's end with ``status`` and the next run's start (no jitter is asked)."""
    if status in (JobStatus.FAILED, JobStatus.TIMEOUT) and spec.retry:
        return float(spec.options.get("retry_interval", 0))
    return float(max(int(spec.options.get("interval", 0)), 0))


def check_early_runs(j: Judged, offset: float) -> None:
    """No run starts before it is due on the server's clock: run 1 not before the job's ``at``, a next run not
    before the end of the run before (the return of the execution that ended it) plus its delay."""
    starts: dict[int, float] = {}
    for x in j.executions:
        if x.run is not None:
            starts[x.run] = min(starts.get(x.run, x.start), x.start)
    at = j.spec.options.get("at")
    if at and 1 in starts and starts[1] + offset < float(at) - EARLY_SLACK:
        j.problems.append(f"run 1 started {float(at) - starts[1] - offset:.2f} s before its time (at)")
    ends = {int(e["run"]): e for e in j.ends()}
    for run, first in sorted(starts.items()):
        previous = ends.get(run - 1)
        if previous is None:
            continue
        ending = [x.stop for x in j.executions if x.run == run - 1 and x.worker == str(previous.get("worker"))]
        if not ending:
            continue
        status = JobStatus(previous["status"])
        due = max(ending) + _delay(j.spec, status)
        if first < due - EARLY_SLACK:
            j.problems.append(
                f"run {run} started {due - first:.2f} s before it was due (run {run - 1} ended {status.name}, "
                f"the next run {_delay(j.spec, status):.0f} s later)"
            )


def check_orphanings(j: Judged, deaths: Mapping[str, float], leases: Mapping[tuple[str, str], list[Lease]]) -> None:
    """A run ends FAILED by orphaning only when MAX_ORPHANINGS of its attempts lost their process while they owned
    the run (SPEC 4: orphanings count dead processes only; a run put back after an outage or a pause is not
    counted). ``deaths``: worker id -> when its process died, on the server's clock."""

    def died_holding(attempt: Mapping[str, Any]) -> bool:
        worker = str(attempt.get("worker"))
        if worker not in deaths:
            return False
        held = [lease for lease in leases.get((str(j.spec.id), worker), ()) if lease.run == attempt["run"]]
        # Dead before its hold on the run ended (the node that sees the death needs a moment to put it back).
        return not held or any(lease.ended is None or deaths[worker] <= lease.ended + 0.5 for lease in held)

    for e in j.ends():
        if _error_class(e) != ORPHANED_ERROR:
            continue
        attempts = [a for a in j.events if a["status"] == JobStatus.PROCESSING and a["run"] == e["run"]]
        died = [a for a in attempts if died_holding(a)]
        if len(died) < MAX_ORPHANINGS:
            j.problems.append(
                f"run {e['run']} ended FAILED as orphaned, but only {len(died)} of its {len(attempts)} attempts "
                "lost their process"
            )


def judge(h: Harness) -> list[Judged]:
    executions: dict[str, list[Execution]] = defaultdict(list)
    for x in h.log.read().values():
        executions[x.job].append(x)
    nodes = {n.label: n for n in h.nodes}
    leases = lease_history(read_changes(h.client[h.db_name], h.scheduler.store.job_queue, h.start_op))
    worker_deaths, deaths, offset = h.worker_deaths(), h.deaths(), h.t0_wall - h.t0
    deaths_on_server = {worker: died + offset for worker, died in worker_deaths.items()}
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
        check_overlaps(j, nodes, h.worker_stops)
        h.leases_checked += check_leases(j, leases, offset)
        check_children(j, deaths)
        check_doubled_runs(j, worker_deaths, h.outages, h.node_stops)
        check_early_runs(j, offset)
        check_orphanings(j, deaths_on_server, leases)
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
    faults = " ".join(f"{k}={h.faults[k]}" for k in FAULT_KINDS + NODE_FAULTS)
    if h.skewed:
        faults += f" (clock {h.skew:+d} s on {h.skewed})"
    return (
        f"chaos seed {h.seed}: {len(h.nodes)} nodes started | faults {faults} | {len(judged)} jobs "
        f"{dict(statuses)} | {executions} executions ({h.leases_checked} with their lease), {runs} runs, "
        f"{releases} releases, {tolerated} tolerated | "
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
    text = report(h, judged, head)
    (tmp_path / "chaos-report.txt").write_text(text)  # also of a seed that passes: what its faults did
    if h.violations or any(j.problems for j in judged):
        pytest.fail(f"{text}\n(this report: {tmp_path / 'chaos-report.txt'})", pytrace=False)


# -- the room ledger under flush() and one-shot producers (SPEC 5) ------------------------------------------------

#: The job collection of test_chaos_room: its room chunk (1/1024 of the cap) is 8 KiB, so that a long-lived
#: producer holds a credit of up to 13 small jobs, and big jobs fill it in a few dozen adds.
ROOM_CAP = 8 * 1024 * 1024
ROOM_OPTIONS = {
    "job_queue": "chaos.room",
    "job_queue_size": ROOM_CAP,
    "event_queue": "chaos.room.events",
    "event_queue_size": 16 * 1024 * 1024,
}
#: Paddings of the filler's jobs: the biggest until the collection is full, then smaller ones into the gap.
FILL_PADS = (256 * 1024, 32 * 1024, 4 * 1024, 0)
#: Small jobs (590 bytes) a room chunk holds.
JOBS_PER_CHUNK = 13
#: A producer (or flusher) process, driven by lines on stdin, each answered by what it did and "ok":
#: ``add N PAD`` (its own scheduler, stops at QueueFullError), ``fill PAD...`` (each until full), ``oneshots N``
#: (a fresh scheduler per job, as a `taskscheduler add` per job has), ``flush``. It answers ``A id began returned``
#: per job added, ``F began returned message`` for QueueFullError, ``X ...`` for another error, ``L began returned``
#: for a flush (times: time.monotonic(), one clock for every process of the machine).
ROOM_PRODUCER = r'''
import faulthandler, json, sys, time
from pymongo import MongoClient
from taskscheduler import Scheduler
from taskscheduler.errors import QueueFullError

uri, name, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
db = MongoClient(uri, tz_aware=True)[name]
mine = Scheduler(db, options=options)


def add(scheduler, pad):
    began = time.monotonic()
    try:
        job = scheduler.add_job("sample_jobs:Noop", {"pad": "x" * pad})
    except QueueFullError as exc:
        print("F", began, time.monotonic(), str(exc).replace("\n", " "), flush=True)
        return False
    except Exception as exc:  # reported by the test: add_job raises QueueFullError when there is no room
        print("X", began, time.monotonic(), repr(exc).replace("\n", " ")[:300], flush=True)
        return False
    print("A", job.id, began, time.monotonic(), flush=True)
    return True


def run(command, args):
    if command == "add":
        for _ in range(int(args[0])):
            if not add(mine, int(args[1])):
                break
    elif command == "fill":
        for pad in args:
            for _ in range(FILL_MOST):
                if not add(mine, int(pad)):
                    break
            else:
                print("X fill: still room after", FILL_MOST, "jobs of", pad, "bytes", flush=True)
    elif command == "oneshots":
        for _ in range(int(args[0])):
            add(Scheduler(db, options=options), 0)
    elif command == "flush":
        began = time.monotonic()
        mine.flush()
        print("L", began, time.monotonic(), flush=True)


FILL_MOST = 4000  # far more small jobs than the collection holds: an endless fill is a finding, not a hang
for line in sys.stdin:
    command, *args = line.split()
    # A command stuck for a minute prints where it is stuck (stderr reaches the test's output).
    faulthandler.dump_traceback_later(60, exit=False)
    try:
        run(command, args)
    except Exception as exc:  # reported by the test, with what the command was
        print("X", command, repr(exc).replace("\n", " ")[:300], flush=True)
    faulthandler.cancel_dump_traceback_later()
    print("ok", flush=True)
'''


class RoomProcess:
    """One producer (or flusher) process of test_chaos_room."""

    def __init__(self, command: list[str]) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self) -> list[list[str]]:
        """What it did for the last line sent (it always ends with "ok"; the test's timeout bounds the wait)."""
        assert self.proc.stdout is not None
        lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"room producer exited with {self.proc.wait()}")
            if line.strip() == "ok":
                return lines
            lines.append(line.split(maxsplit=4))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@dataclass
class Room:
    """What the producers of test_chaos_room said they did."""

    added: dict[str, tuple[float, float]] = field(default_factory=dict)  # job id -> add began, returned
    flushes: list[tuple[float, float]] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)  # canceled by the test: they may make room
    full: int = 0  # QueueFullError answers
    errors: list[str] = field(default_factory=list)

    def take(self, lines: Iterable[list[str]]) -> None:
        for f in lines:
            if f[0] == "A":
                self.added[f[1]] = (float(f[2]), float(f[3]))
            elif f[0] == "L":
                self.flushes.append((float(f[1]), float(f[2])))
            elif f[0] == "F":
                self.full += 1
            else:
                self.errors.append(" ".join(f))

    def kept(self) -> set[str]:
        """Jobs that must still be stored: added after every flush ended (one that met the add, or came after
        it, may have dropped it), and not finished by the test."""
        last = max((end for _, end in self.flushes), default=float("-inf"))
        return {job for job, (began, _) in self.added.items() if began > last} - self.finished


def check_room(changes: Iterable[Mapping[str, Any]], cap: int) -> list[str]:
    """From a capped job collection's change stream: no unfinished job is deleted (evicted to make room), and no
    finished job is deleted while the collection is less than half full (its documents' sizes replayed)."""
    sizes: dict[Any, int] = {}
    statuses: dict[Any, int] = {}
    held = 0
    problems = []
    for change in changes:
        op = change["operationType"]
        key = (change.get("documentKey") or {}).get("_id")
        if op == "insert":
            doc = change["fullDocument"]
            sizes[key] = len(bson.encode(doc))
            statuses[key] = int(doc.get("status", 0))
            held += sizes[key]
        elif op in ("update", "replace"):
            fields = (change.get("updateDescription") or {}).get("updatedFields") or change.get("fullDocument") or {}
            if "status" in fields and key in statuses:
                statuses[key] = int(fields["status"])
        elif op == "delete" and key in sizes:
            status = JobStatus(statuses.pop(key))
            if status < JobStatus.DONE:
                problems.append(f"unfinished job {key} ({status.name}) deleted at {held / cap:.0%} full")
            elif held < cap / 2:
                problems.append(f"finished job {key} ({status.name}) deleted at {held / cap:.0%} full, below half")
            held -= sizes.pop(key)
        elif op in ("drop", "dropDatabase", "invalidate"):
            sizes.clear()
            statuses.clear()
            held = 0
    return problems


class RoomChaos:
    """Drives test_chaos_room: rounds of adds, one-shot producers, finishing, a flush, adds, a fill to the brim."""

    def __init__(self, seed: int, uri: str, db: Database[dict[str, Any]]) -> None:
        self.rng = random.Random(seed)
        self.uri, self.db = uri, db
        self.scheduler = Scheduler(db, options=ROOM_OPTIONS)
        self.scheduler.store.ensure()
        command = [sys.executable, "-c", ROOM_PRODUCER, uri, db.name, json.dumps(ROOM_OPTIONS)]
        self.producers = [RoomProcess(command) for _ in range(self.rng.randint(2, 4))]
        self.flusher, self.filler = RoomProcess(command), RoomProcess(command)
        self.oneshots = self.rng.choice((0, 100, 200, 600))  # 600 one-shot producers reserve over half the cap
        self.bursts = [RoomProcess(command) for _ in range(2 if self.oneshots else 0)]
        self.room = Room()
        self.steps: list[str] = []
        self.missing: set[str] = set()

    def batch(self, workers: list[RoomProcess], lines: list[str]) -> None:
        for worker, line in zip(workers, lines, strict=True):
            worker.send(line)
        for worker in workers:
            self.room.take(worker.answer())

    def adds(self) -> list[str]:
        return [f"add {self.rng.randint(1, 13)} 0" for _ in self.producers]

    def present(self) -> set[str]:
        return {str(d["_id"]) for d in self.scheduler.store.jobs.find({}, {"_id": 1})}

    def credit_round(self) -> None:
        """Producers hold room they reserved; a flush from another process (while they add, or between their
        adds); they spend what they reserved before it; then the collection is filled to the last byte (SPEC 5:
        room reserved before a flush is not room after it)."""
        added = [self.rng.randint(1, JOBS_PER_CHUNK - 1) for _ in self.producers]
        self.batch(self.producers, [f"add {n} 0" for n in added])
        if self.rng.random() < 0.5:  # the flush, and another producer's add at the same time or just after it
            self.batch([self.flusher, self.filler], ["flush", "add 1 0"])
        else:
            self.batch([self.flusher], ["flush"])
            self.batch([self.filler], ["add 1 0"])
        # Within what each has left of its chunk: spent from the reservation made before the flush.
        self.batch(self.producers, [f"add {self.rng.randint(1, JOBS_PER_CHUNK - n)} 0" for n in added])
        self.fill("credit")

    def leak_round(self) -> None:
        """After a flush: producers add, one-shot producers (`taskscheduler add`, fresh schedulers by the hundred)
        come and go, some jobs finish, then the collection is filled to the last byte (SPEC 5: room a short-lived
        producer reserved is not lost for good, no finished job is deleted below half full)."""
        self.batch([self.flusher], ["flush"])
        self.batch(self.producers, [f"add {self.rng.randint(1, 2 * JOBS_PER_CHUNK)} 0" for _ in self.producers])
        cli = [_cli_add(self.uri, self.db.name) for _ in range(self.rng.randint(1, 3))]
        if self.oneshots:
            self.batch(self.bursts, [f"oneshots {self.oneshots // len(self.bursts)}"] * len(self.bursts))
        for proc, began in cli:
            out, err = proc.communicate(timeout=60)
            if proc.returncode == 0:
                self.room.added[out.strip()] = (began, time.monotonic())
            elif err.startswith("Error: job collection"):  # QueueFullError: said in one line, exit 2
                self.room.full += 1
            else:
                self.room.errors.append(f"taskscheduler add exited {proc.returncode}: {err.strip()}")
        self.finish()
        self.fill("leak")

    def fill(self, name: str) -> None:
        self.batch([self.filler], ["fill " + " ".join(map(str, FILL_PADS))])
        present = self.present()
        self.missing |= self.room.kept() - present
        self.steps.append(f"{name} round: {len(present)} jobs stored, {self.room.full} QueueFullError so far")

    def finish(self) -> None:
        """A third of the stored jobs end (canceled): finished jobs that room may be made of."""
        stored = sorted(self.room.kept() & self.present())
        for job in self.rng.sample(stored, k=len(stored) // 3):
            with contextlib.suppress(InvalidArgumentError):
                self.scheduler.cancel_job(ObjectId(job))
            self.room.finished.add(job)

    def close(self) -> None:
        for worker in [*self.producers, self.flusher, self.filler, *self.bursts]:
            worker.close()


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_chaos_room(
    chaos_seed: int,
    server: EmbeddedServer,
    db: Database[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Long-lived producers, one-shot producers and flush() from another process fill a small capped job
    collection again and again: no unfinished job is lost to eviction, no finished one deleted below half full."""
    started = time.monotonic()
    start = db.command("ping")["operationTime"]
    chaos = RoomChaos(chaos_seed, server.uri, db)
    try:
        chaos.credit_round()
        chaos.leak_round()
    finally:
        chaos.close()
    room = chaos.room
    problems = check_room(read_changes(db, str(ROOM_OPTIONS["job_queue"]), start), ROOM_CAP)
    problems += [f"job {job} missing: added after the last flush, never finished" for job in sorted(chaos.missing)]
    problems += room.errors
    head = (
        f"chaos room seed {chaos_seed}: {len(chaos.producers)} producers, {chaos.oneshots} one-shot schedulers, "
        f"{len(room.added)} jobs added, {len(room.flushes)} flushes, {room.full} QueueFullError, "
        f"{len(room.finished)} finished by the test | {time.monotonic() - started:.1f} s"
    )
    with capsys.disabled():
        print("\n" + head)
    if problems:
        pytest.fail("\n".join([head, *chaos.steps, "violations:", *(f"  {p}" for p in problems)]), pytrace=False)


def _cli_add(uri: str, database: str) -> tuple[subprocess.Popen[str], float]:
    """A one-shot producer: `taskscheduler add` of one job into the room test's collection."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in ROOM_OPTIONS.items()]
    command = [sys.executable, "-m", "taskscheduler", "add", f"--mongodb-uri={uri}", f"--database={database}"]
    command += [*flags, "--no-import-check", '--data={"pad": ""}', "sample_jobs:Noop"]
    began = time.monotonic()
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), began


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


def test_run_log_counts_a_subprocess_activity_as_its_execution_activity(tmp_path: Path) -> None:
    w1, w2 = ObjectId(), ObjectId()
    log = tmp_path / "runs.log"
    log.write_text(
        f"S a job {w1} n0 10 9 100.0\nR a 1 100.1\nK a 11 1\nC a 11 100.2\nT a 100.3\nC a 11 101.5\n"
        f"S b job {w2} n1 20 19 101.0\nR b 1 101.1\nE b 101.2 ok\n"
    )
    executions = RunLog(log).read()
    a = executions["a"]
    assert a.children == [11] and a.child_last == 101.5 and a.stop == 101.5 and a.end is None
    j = Judged(Spec("plain", {}, {}, ObjectId()), {}, [], list(executions.values()))
    check_overlaps(j, {})
    assert any("overlap by 0.20 s" in p for p in j.problems)  # the subprocess ran on after "b" started


def _change(op: str, job: ObjectId, at: float, **fields: Any) -> dict[str, Any]:
    """A change event of the job collection at ``at`` (seconds after 1_700_000_000, server clock)."""
    change: dict[str, Any] = {"operationType": op, "documentKey": {"_id": job}, "wallTime": _when(at)}
    if op == "insert":
        change["fullDocument"] = dict(fields, _id=job)
    elif op == "update":
        change["updateDescription"] = {"updatedFields": fields}
    return change


def _when(at: float) -> datetime:
    return datetime.fromtimestamp(1_700_000_000 + at, timezone.utc)


def test_checks_catch_job_code_running_after_its_lease_expired() -> None:
    job, w1, w2 = ObjectId(), ObjectId(), ObjectId()
    changes = [
        _change("insert", job, 0.0, status=int(JobStatus.WAITING), worker=None, run=1, expires=_when(0)),
        _change("update", job, 1.0, status=int(JobStatus.PROCESSING), worker=w1, expires=_when(3.0)),
        _change("update", job, 1.5, expires=_when(3.5)),  # renewed
        _change("update", job, 5.0, status=int(JobStatus.WAITING), worker=None),  # swept after it expired
        _change("update", job, 5.1, status=int(JobStatus.PROCESSING), worker=w2, expires=_when(7.1)),
        _change("update", job, 6.0, status=int(JobStatus.DONE)),
    ]
    leases = lease_history(changes)
    assert [(lease.run, lease.claimed, lease.expires, lease.ended) for lease in leases[(str(job), str(w1))]] == [
        (1, 1_700_000_001.0, 1_700_000_003.5, 1_700_000_005.0)
    ]
    offset = 1_700_000_000.0  # the run log's clock here: seconds after 1_700_000_000
    runs = _runs(("a", w1, 1, 1.1, None, None), ("b", w2, 1, 5.2, 5.9, "ok"))
    runs[0].last = 3.45  # fenced itself in time
    j = Judged(Spec("plain", {}, {}, job), {}, [], runs)
    check_leases(j, leases, offset)
    assert j.problems == []
    runs[0].last, runs[0].child_last = 4.0, 4.0  # its subprocess ran on 0.5 s past the lease
    check_leases(j, leases, offset)
    assert len(j.problems) == 1 and "0.50 s after its lease expired on the server (its subprocess)" in j.problems[0]


def test_checks_catch_a_subprocess_outliving_its_killed_worker() -> None:
    w1 = ObjectId()
    runs = _runs(("a", w1, 1, 0.0, None, None))
    runs[0].last = runs[0].child_last = 2.0 + CHILD_SLACK - 0.1
    j = Judged(Spec("children", {}, {}, ObjectId()), {}, [], runs)
    check_children(j, {"a": 2.0})
    assert j.problems == []
    runs[0].last = runs[0].child_last = 2.0 + CHILD_SLACK + 0.5
    check_children(j, {"a": 2.0})
    assert any("ran on" in p and "after the worker was killed" in p for p in j.problems)


def test_checks_catch_a_run_that_ran_again_after_its_code_returned() -> None:
    w1, w2 = ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.0, 1.0, "ok"), ("b", w2, 1, 3.0, 4.0, "ok"))
    j = Judged(Spec("plain", {}, {}, ObjectId()), {}, [], runs)
    check_doubled_runs(j, {str(w1): 1.5}, [])  # its worker died before recording the end: allowed
    check_doubled_runs(j, {}, [[2.0, 2.5]])  # an outage kept it from recording the end: allowed
    assert j.problems == []
    check_doubled_runs(j, {str(w1): 3.5}, [[0.0, 0.5]])  # its worker died after the run ran again
    assert any("run 1 ran again" in p for p in j.problems)
    j.problems.clear()
    node = runs[0].node
    check_doubled_runs(j, {}, [], {node: 0.5})  # its node's stop reached the code in the instant it returned
    assert j.problems == [] and any("graceful stop" in t for t in j.tolerated)
    check_doubled_runs(j, {}, [], {node: 1.0 - STOP_RETURN_RACE - 0.5})  # a stop long before: no excuse
    assert any("run 1 ran again" in p for p in j.problems)


def test_checks_catch_runs_started_before_they_were_due() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.1, None, None), ("b", w2, 1, 1.6, 1.9, "fail"), ("c", w3, 2, 3.2, 3.4, "fail"))
    j = _judge("retry", {"retry": 1, "retry_interval": 1}, _retry_history(w1, w2, w3), runs)
    check_early_runs(j, 0.0)
    assert j.problems == []  # run 2 started 1.3 s after run 1's code returned (retry_interval 1)
    runs[2].start = 2.5
    check_early_runs(j, 0.0)
    assert any("run 2 started 0.40 s before it was due" in p for p in j.problems)
    delayed = Judged(Spec("delayed", {}, {"at": 105.0}, ObjectId()), {}, [], _runs(("d", w1, 1, 4.0, 4.2, "ok")))
    check_early_runs(delayed, 100.0)
    assert any("run 1 started 1.00 s before its time" in p for p in delayed.problems)


def test_checks_catch_a_job_orphaned_without_dead_processes() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    events = [_event(1, JobStatus.PROCESSING, w, at) for w, at in ((w1, 0.0), (w2, 3.0), (w3, 6.0))]
    events += [_event(1, JobStatus.WAITING, w, at, RELEASED_ERROR) for w, at in ((w1, 2.5), (w2, 5.5))]
    events.append(_event(1, JobStatus.FAILED, w3, 8.5, ORPHANED_ERROR))
    job = ObjectId()
    j = Judged(Spec("plain", {}, {}, job), {}, events, [])
    leases = {(str(job), str(w)): [Lease(1, at, at + 2.0, at + 2.5)] for w, at in ((w1, 0.0), (w2, 3.0), (w3, 6.0))}
    check_orphanings(j, {str(w1): 1.0, str(w2): 4.0, str(w3): 7.0}, leases)
    assert j.problems == []
    check_orphanings(j, {str(w1): 1.0, str(w2): 9.0}, leases)  # w2 died after its attempt was put back
    assert any("only 1 of its 3 attempts lost their process" in p for p in j.problems)


def test_checks_tolerate_the_stall_window_of_a_stopped_worker_only() -> None:
    w1, w2 = ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.1, None, None), ("b", w2, 1, 0.5, 1.9, "ok"))
    runs[0].last = 0.8
    j = Judged(Spec("plain", {}, {}, ObjectId()), {}, [], runs)
    check_overlaps(j, {}, {1: [[-1.0, 0.05]]})  # its worker was stopped right before it ran (a claim pause)
    assert j.problems == [] and len(j.tolerated) == 1
    runs[0].last = 0.5 + STALL_OVERLAP + 0.2
    check_overlaps(j, {}, {1: [[-1.0, 0.05]]})
    assert len(j.problems) == 1


def test_room_check_catches_evictions_and_finished_jobs_deleted_below_half_full() -> None:
    doc = {"status": int(JobStatus.WAITING), "pad": "x" * 100}
    size = len(bson.encode(dict(doc, _id=ObjectId())))
    a, b, c, d = ObjectId(), ObjectId(), ObjectId(), ObjectId()
    allowed = [
        _change("insert", a, 0, **doc),
        _change("insert", b, 0, **doc),
        _change("update", a, 0, status=int(JobStatus.CANCELED)),
        _change("delete", a, 0),  # finished, collection full: room may be made of it
    ]
    assert check_room(allowed, 2 * size) == []
    below_half = [
        *allowed[:2],
        _change("insert", c, 0, **doc),
        _change("insert", d, 0, **doc),
        _change("update", a, 0, status=int(JobStatus.DONE)),
        _change("delete", a, 0),  # at 4 of 10 sizes: below half
        {"operationType": "drop"},
        _change("insert", b, 0, **doc),
        _change("delete", b, 0),  # evicted while WAITING
    ]
    problems = check_room(below_half, 10 * size)
    assert problems == [
        f"finished job {a} (DONE) deleted at 40% full, below half",
        f"unfinished job {b} (WAITING) deleted at 10% full",
    ]
