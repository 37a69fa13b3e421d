"""The faults a chaos seed injects: kills, stops, SIGTERMs, server failpoints and outages, cancels."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

from bson import ObjectId

from chaos.config import FAILPOINT_COMMANDS, FAULT_SECONDS, NODE_AFTER_WORKER_KILL, ORPHANED_TIMEOUT, OUTAGE_COMMANDS
from chaos.processes import _is_worker, _workers
from chaos.runlog import Execution, NodeState, Spec
from taskscheduler import JobStatus
from taskscheduler.errors import InvalidArgumentError


class Faults:
    """The fault actions of :class:`~chaos.harness.Harness` (mixed into it: they act on its nodes, jobs and
    server through its state)."""

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
        recent = self._lost_a_worker_lately()
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

    def _lost_a_worker_lately(self) -> set[str | None]:
        """Labels of the nodes one of whose workers the harness SIGKILLed within NODE_AFTER_WORKER_KILL."""
        now = time.monotonic()
        return {self._node_of_pid(pid) for pid, at in self.killed_pids.items() if now - at < NODE_AFTER_WORKER_KILL}

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
        if x.child_last is None or node is None:
            return True
        # Up, and the worker is its current manager's: a worker left by a killed node whose label was restarted
        # meanwhile (its manager died with that node) has no manager to end its job's processes.
        return node.state == "up" and x.pid in _workers(node.node.pid)

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
        # The node's death takes its manager with it (the kernel's parent-death signal): as in _kill_node, never
        # within NODE_AFTER_WORKER_KILL of killing one of its workers (both in one instant: a documented limit).
        recent = self._lost_a_worker_lately()
        if node is not None and node.state == "up" and node.label not in recent and self.rng.random() < 0.5:
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
        if group:
            # Its manager paused in the instant after one of its workers was SIGKILLed leaves that worker's job
            # processes to run out (the documented limit of a worker killed while its manager is paused): as for
            # _kill_node, not within NODE_AFTER_WORKER_KILL of such a kill.
            recent = self._lost_a_worker_lately()
            candidates = [n for n in candidates if n.label not in recent]
            if not candidates:
                return False
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
