"""What the harness knows of a seed: the jobs it added (Spec), the executions their run log tells (RunLog,
Execution), the nodes it started and what happened to them (NodeState)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bson import ObjectId

from chaos.config import SPAWNED
from helpers import Node
from taskscheduler import JobStatus

# -- what the harness knows ---------------------------------------------------------------------------------------


@dataclass
class Spec:
    """A job the harness added, and what the SPEC lets it end as."""

    kind: str  # plain, retry, interval, open, timeout, cancel, children, delayed, limited, dependent
    data: dict[str, Any]
    options: dict[str, Any]
    id: ObjectId | None = None
    open_runs: int = 0  # open: the test cancels it once this many runs ended
    cancel_after: float = 0.0  # cancel: the test cancels it this long after an execution started
    delay: float = 0.0  # delayed: added with ``at`` this many seconds after the add (server clock)
    #: dependent: the specs it may depend on (those added by then, when it is added), and those it does
    depends_on: list[Spec] = field(default_factory=list)

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
