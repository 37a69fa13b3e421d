"""The driver of a chaos seed: it starts nodes, adds the jobs, injects the faults (:class:`~chaos.faults.Faults`)
then stops, settles and stops the nodes again, keeping what the checks need to know."""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from bson import ObjectId
from pymongo import MongoClient

from chaos.config import (
    CLAIM_BUDGET,
    CLAIM_PAUSE_CHANCE,
    CLAIM_SLACK,
    CLOCK_SKEW,
    FAKETIME_LIBRARY,
    FAULT_KINDS,
    FAULT_SECONDS,
    FAULT_WEIGHTS,
    JOB,
    LIMIT,
    LIMIT_KEY,
    ORPHANED_TIMEOUT,
    RETURNED_FAILPOINT,
    SETTLE_SECONDS,
    SLEEP_WORKAROUND,
)
from chaos.faults import Faults
from chaos.processes import _chaos_children, _node_processes, tail
from chaos.runlog import NodeState, RunLog, Spec
from helpers import Node, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import UNSET_TIME

# -- the driver ---------------------------------------------------------------------------------------------------


class Harness(Faults):
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
        self.claims = (0, 0, 0)  # claims won and lost by the nodes that stopped gracefully, and how many said

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

    # -- jobs ------------------------------------------------------------------------------------------------------

    def plan_jobs(self) -> None:
        rng, log = self.rng, str(self.log.path)
        plans = self.plan_kinds()
        dependencies = ("plain", "retry", "timeout", "cancel", "children", "delayed", "limited")
        first_half = (len(plans) - 3) // 2
        for i, (kind, data, options) in enumerate(plans):
            spec = Spec(kind, dict(data, log=log), options)
            if kind == "dependent":  # after 1-2 of the jobs added at once (SPEC 8)
                earlier = [s for s in self.specs[:first_half] if s.kind in dependencies]
                spec.depends_on = rng.sample(earlier, min(len(earlier), rng.randint(1, 2)))
            spec.open_runs = rng.randint(2, 3) if kind == "open" else 0
            spec.cancel_after = rng.uniform(0.3, 2.5) if kind == "cancel" else 0.0
            spec.delay = rng.uniform(1.0, 4.0) if kind == "delayed" else 0.0
            self.specs.append(spec)
            when = 0.0 if i < first_half else rng.uniform(0.5, FAULT_SECONDS * 0.75)
            self.later(when, "add job", lambda spec=spec: self.add(spec))

    def plan_kinds(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """The jobs of a seed: (kind, data, options) each, shuffled; the dependents last (they follow others)."""
        rng = self.rng
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
        for _ in range(rng.randint(3, 4)):  # at most LIMIT at once, cluster-wide (SPEC 8)
            plans.append(("limited", {"seconds": rng.uniform(0.3, 1.0)}, {"limit_key": LIMIT_KEY}))
        rng.shuffle(plans)
        plans += [("dependent", {"seconds": rng.uniform(0.1, 0.4)}, {}) for _ in range(3)]
        return plans

    def add(self, spec: Spec) -> bool:
        if self.failpoint_on:
            return False
        if spec.delay:  # this machine's clock is the server's (one machine): `at` is on the server's clock
            spec.options["at"] = round(time.time() + spec.delay, 3)
        if spec.kind == "dependent":  # the jobs it may depend on that were added by now (all, in a seed's plan)
            spec.depends_on = [s for s in spec.depends_on if s.id is not None]
            spec.options["depends_on"] = [s.id for s in spec.depends_on]
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
        self.scheduler.set_limit(LIMIT_KEY, concurrency=LIMIT)
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
            state = JobStatus(job["status"]).name
            if job["status"] == JobStatus.CANCELED:
                state = f"CANCELED with its worker ..{str(job['worker'])[-6:]} unsettled"
            self.violations.append(
                f"job {job['_id']} ({self.spec(job['_id']).kind}) still {state} "
                f"(run {job['run']}) {SETTLE_SECONDS:.0f} s after the faults stopped"
            )
        self.stop_nodes()

    def unfinished(self) -> list[dict[str, Any]]:
        ids = [s.id for s in self.specs]
        # A job canceled while it ran keeps its lease end until its run is settled (its worker's unrecorded end
        # withdrawn): by the worker, its node, or a sweep once the lease ran out.
        unsettled = {"status": int(JobStatus.CANCELED), "expires": {"$gt": UNSET_TIME}}
        query = {"_id": {"$in": ids}, "$or": [{"status": {"$lt": int(JobStatus.DONE)}}, unsettled]}
        return list(self.scheduler.store.jobs.find(query))

    def spec(self, job_id: Any) -> Spec:
        return next(s for s in self.specs if str(s.id) == str(job_id))

    def stop_nodes(self) -> None:
        started = self.now()
        self.terminate_all()
        self.timings["stop"] = self.now() - started
        self.check_claims()
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

    def check_claims(self) -> None:
        """Claim attempts stay near one per job whatever the faults (issue 22): each job is claimed first by its
        preferred node alone. A node that stopped gracefully logs its claims won and lost; a killed one says
        nothing, so what is counted is what the nodes alive at the end did, faults included."""
        won = lost = said = 0
        for n in self.nodes:
            found = re.findall(r"claims won (\d+), lost (\d+)", n.node.output())
            if found:
                said += 1
                won += int(found[-1][0])
                lost += int(found[-1][1])
        self.claims = (won, lost, said)
        if lost > CLAIM_SLACK + CLAIM_BUDGET * won:
            self.violations.append(
                f"claim attempts over budget: {lost} lost against {won} won by the {said} nodes that said "
                f"(budget {CLAIM_SLACK} + {CLAIM_BUDGET:g} per claim won)"
            )

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
