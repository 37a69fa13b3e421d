"""WorkerManager: forks and supervises the workers of one queue node; it never touches MongoDB itself.

It runs in its own process (forked by the Queue), receives job documents over a pipe, hands each to an idle
worker (or forks one, by ``pm``), enforces hard timeouts and cancels by killing a worker's whole process group,
and reports every claim, end and death back to the queue node, which records them in MongoDB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol, runtime_checkable

from bson import ObjectId

from .. import options as o
from ..constants import DYNAMIC_IDLE_SECONDS
from ..errors import InvalidArgumentError, SpawnForkError
from . import forking
from .backlog import Backlog
from .fencing import LeaseSlot, lease_clock
from .protocol import (
    CancelJob,
    Capacity,
    Claimed,
    DropJob,
    Ending,
    Exit,
    Fence,
    Finished,
    JobClaimed,
    JobFinished,
    JobHeldBack,
    JobKilled,
    JobNotClaimed,
    KillJob,
    KillReason,
    RunJob,
    Stop,
    WorkerExited,
    WorkerSpawned,
)
from .worker import Worker


@runtime_checkable
class WorkerBuilder(Protocol):
    """What a manager asks of its worker factory (a :class:`taskscheduler.WorkerFactory`): a Worker for each
    freshly forked worker process."""

    def build_worker(self, worker_id: ObjectId) -> Worker: ...

#: Longest the manager sleeps before looking at timers again.
TICK_SECONDS = 0.25
#: Longest the manager sleeps when it has nothing to time: no job, nothing to spawn, shrink or send.
IDLE_WAIT_SECONDS = 5.0
#: Longest the manager sleeps while reports wait for room in the pipe to the node.
OUTBOX_TICK_SECONDS = 0.01
#: Seconds to wait before forking again after a worker could not start.
SPAWN_BACKOFF_SECONDS = 1.0
#: On a stop, seconds a worker whose job's code still runs has to stop itself (its watchdog sees the request)
#: before the manager kills it from outside. A worker whose job's code has returned is never killed by a stop.
STOP_GRACE_SECONDS = 1.0


@dataclass
class _WorkerProc:
    """One worker process as the manager sees it."""

    id: ObjectId
    pid: int
    conn: Connection
    slot: LeaseSlot  # shared with the worker: the fence it enforces on itself, and stop requests
    dedicated: bool  # force_spawn or ondemand: runs one job, then exits
    forced: bool = False  # force_spawn: not counted against max_children
    job: ObjectId | None = None
    task: RunJob | None = None  # the job handed over, until it ends (put back if the worker dies first)
    claimed: bool = False
    run: int = 0
    deadline: float | None = None  # the job's timeout
    fence: float = 0.0  # the lease of its job runs this long on our side: the claim's, then each renewal's
    timeout: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    kill_reason: KillReason | None = None  # why the manager ended it
    ending: bool = False  # the job's code returned; only its end is being recorded


class WorkerManager:
    """Process manager of a queue node: ``pm`` dynamic, static or ondemand, between min and max children."""

    OPTION_PM = o.PM
    OPTION_MIN_CHILDREN = o.MIN_CHILDREN
    OPTION_MAX_CHILDREN = o.MAX_CHILDREN
    PM_DYNAMIC = o.PM_DYNAMIC
    PM_STATIC = o.PM_STATIC
    PM_ONDEMAND = o.PM_ONDEMAND

    def __init__(
        self,
        worker_factory: WorkerBuilder,
        logger: logging.Logger | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(worker_factory, WorkerBuilder):
            raise InvalidArgumentError(
                f"worker_factory must be a taskscheduler.WorkerFactory, got {type(worker_factory).__name__}"
            )
        self.factory = worker_factory
        self.logger = logger or logging.getLogger("taskscheduler.manager")
        self.options = o.manager_options(options)
        self._workers: dict[int, _WorkerProc] = {}
        self._pending = Backlog()
        self._forced: deque[RunJob] = deque()  # force_spawn jobs waiting for a fork to succeed
        self._queue: Connection | None = None
        self._outbox: deque[Any] = deque()  # reports waiting for room in the pipe
        self._stopping = False
        self._spawn_blocked_until = 0.0
        #: Set by process(), which runs in a process of the manager's own: only then are children of this process that
        #: are not workers a dead worker's leftovers (never kill or reap other children of a caller's process).
        self._own_process = False
        self._received = 0  # RunJob messages received so far
        self._capacity: Capacity | None = None  # as last reported
        self._wake_r: socket.socket | None = None  # signals wake the loop through this pair (set in process())
        self._wake_w: socket.socket | None = None

    def set_options(self, options: Mapping[str, Any]) -> WorkerManager:
        merged = dict(self.options)
        merged.update(options)
        self.options = o.manager_options(merged)
        return self

    def get_options(self) -> dict[str, Any]:
        return dict(self.options)

    def count(self) -> int:
        """Live worker processes (force_spawn ones included)."""
        return len(self._workers)

    # -- main loop -------------------------------------------------------------------------------------------------

    def process(self, connection: Connection) -> None:
        """Serve the queue node on ``connection`` until it says stop, goes away, or SIGTERM/SIGINT arrives."""
        self._queue = connection
        forking.become_subreaper()  # a dead worker's job processes come to us, to be ended
        self._own_process = True  # every other child of this process is a worker's leftover
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        try:
            while not self._stopping:
                self._reap()
                self._read_queue()  # every fence the node sent while we were paused, before judging by them
                self._enforce_deadlines()  # then: after a pause, fence before anything else
                self._keep_minimum()
                self._spawn_forced()
                self._dispatch()
                self._shrink()
                self._report_capacity()
                self._flush_reports()
                conns = [c.conn for c in self._workers.values() if not c.conn.closed]
                ready = wait([connection, self._wake_r, *conns], self._wait_time())
                for handle in ready:
                    self._receive(handle)
        finally:
            self._stop_all()

    def _wait_time(self) -> float:
        """How long the loop may wait for a message, a worker's exit or a signal (each wakes it at once) before a
        timer of its own is due. Idle (no job anywhere in it, nothing to spawn, shrink or send), that is
        IDLE_WAIT_SECONDS: an idle manager costs next to no CPU."""
        if self._outbox:
            return OUTBOX_TICK_SECONDS
        if self._pending or self._forced or any(p.job is not None or p.kill_reason for p in self._workers.values()):
            return TICK_SECONDS  # deadlines, fences and kills are looked at every tick
        if self.options[o.PM] != o.PM_ONDEMAND and self._pool_size() < self.options[o.MIN_CHILDREN]:
            return TICK_SECONDS  # a spawn to try again after its backoff
        if self.options[o.PM] == o.PM_DYNAMIC and self._pool_size() > self.options[o.MIN_CHILDREN]:
            return TICK_SECONDS  # idle workers to let go of in time
        return IDLE_WAIT_SECONDS

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _read_queue(self) -> None:
        """Everything the node has sent so far (without waiting)."""
        queue = self._queue
        while queue is not None and not queue.closed and not self._stopping:
            try:
                if not queue.poll():
                    return
            except (EOFError, OSError):
                return
            self._receive(queue)

    def _receive(self, handle: Any) -> None:
        if handle is self._wake_r and self._wake_r is not None:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
            return
        if handle is self._queue and self._queue is not None:
            try:
                message = self._queue.recv()
            except (EOFError, OSError):
                self.logger.error("queue node went away; stopping workers")
                self._stopping = True
                return
            self._on_queue_message(message)
            return
        proc = next((c for c in self._workers.values() if c.conn is handle), None)
        if proc is None:
            return
        try:
            message = handle.recv()
        except (EOFError, OSError):
            self._forget_connection(proc)
            return
        self._on_worker_message(proc, message)

    def _on_queue_message(self, message: Any) -> None:
        match message:
            case RunJob():
                self._received += 1
                self._add(message)
            case DropJob(job_id=job_id):
                self._pending.discard(job_id)
            case CancelJob(job_id=job_id):
                self._pending.discard(job_id)
                self._kill_job(job_id, KillReason.CANCEL)
            case KillJob(job_id=job_id, worker_id=worker_id, reason=reason, run=run):
                self._kill_job(job_id, reason, worker_id, run)
            case Fence(deadline=deadline, renewed=renewed):
                pairs = set(renewed)
                for proc in self._workers.values():
                    if (proc.job, proc.id) in pairs and proc.claimed:
                        proc.fence = max(proc.fence, deadline)
                        proc.slot.set_fence(proc.fence)
            case Stop():
                self._stopping = True

    def _kill_job(
        self, job_id: ObjectId, reason: KillReason, worker_id: ObjectId | None = None, run: int | None = None
    ) -> None:
        for proc in list(self._workers.values()):
            if proc.job == job_id:
                self._drain(proc)  # an Ending it sent already must be heard before a kill is decided
            # A run whose code has returned is never killed: its end is being recorded, conditional on owning the
            # job, and a worker that loses withdraws what it wrote (killed midway, it could not).
            if proc.job != job_id or not proc.claimed or proc.kill_reason is not None or proc.ending:
                continue
            if worker_id in (None, proc.id) and run in (None, proc.run):
                self.logger.warning(f"killing the worker of job {job_id}: {reason.value}", extra={"pid": proc.pid})
                self._kill(proc, reason)

    def _on_worker_message(self, proc: _WorkerProc, message: Any) -> None:
        match message:
            case Claimed(job_id=job_id, timeout=timeout, run=run, claimed_at=claimed_at):
                proc.job, proc.claimed, proc.timeout, proc.run = job_id, True, timeout, run
                now = time.monotonic()
                proc.deadline = now + timeout if timeout > 0 else None
                # From the claim's moment, not this message's: a claim reported late has no more lease left.
                clock = lease_clock()
                proc.fence = min(clock, claimed_at or clock) + (proc.task.lease if proc.task else 0.0) / 2
                proc.slot.set_fence(proc.fence)
                job_class = proc.task.job.job_class if proc.task else ""
                self._report(JobClaimed(job_id, proc.id, run, job_class, claimed_at or clock))
            case Ending():
                proc.ending = True  # start() returned: what is left is recording it, which needs no fence
            case Finished(job_id=job_id, claimed=claimed, status=status, unsettled=unsettled, held_back=held_back):
                if claimed and proc.claimed:
                    self._report(JobFinished(job_id, proc.id, status))
                elif unsettled and proc.task is not None and not self._stopping:
                    self._add(proc.task)  # MongoDB could not be reached: it may still be WAITING, try again
                elif held_back:
                    self._report(JobHeldBack(job_id))  # no slot under a limit: the node holds it
                elif not unsettled:
                    self._report(JobNotClaimed(job_id))
                proc.job, proc.task, proc.claimed, proc.deadline = None, None, False, None
                proc.ending = False
                proc.idle_since = time.monotonic()

    # -- jobs ------------------------------------------------------------------------------------------------------

    def _add(self, task: RunJob) -> None:
        # Even when a worker still runs this job: a WAITING job is the next run (or a released one), and a claim
        # decides who runs it. Dropping it here could leave it waiting until the next scan.
        if task.job.force_spawn:
            self._forced.append(task)  # its own worker, whatever max_children says
            self._spawn_forced()
            return
        self._pending.add(task)

    def _spawn_forced(self) -> None:
        """Fork a worker for each force_spawn job; one that cannot be forked now is kept and tried again."""
        while self._forced and not self._stopping:
            if self._spawn(self._forced[0]) is None:
                return
            self._forced.popleft()

    def _dispatch(self) -> None:
        while self._pending and not self._stopping:
            idle = next(
                (c for c in self._workers.values() if c.job is None and not c.dedicated and not c.kill_reason), None
            )
            if idle is not None:
                task = self._pending.pop()
                idle.job, idle.task = task.job.id, task
                try:
                    idle.conn.send(task)
                except (OSError, ValueError):
                    self._pending.put_back(task)
                    idle.job, idle.task = None, None
                    self._forget_connection(idle)
                continue
            pm = self.options[o.PM]
            if pm == o.PM_STATIC or self._pool_size() >= self.options[o.MAX_CHILDREN]:
                return
            if pm == o.PM_ONDEMAND:
                task = self._pending.pop()
                if self._spawn(task, dedicated=True) is None:
                    self._pending.put_back(task)
                    return
            elif self._spawn() is None:
                return

    def free(self) -> int:
        """How many more jobs this manager could start now: workers it has or may fork, less those busy and the
        jobs it holds for them (force_spawn jobs have workers of their own and count for nothing)."""
        pm = self.options[o.PM]
        size = self.options[o.MIN_CHILDREN] if pm == o.PM_STATIC else self.options[o.MAX_CHILDREN]
        busy = sum(
            1
            for c in self._workers.values()
            if not c.forced and not c.kill_reason and (c.job is not None or c.dedicated)
        )
        return max(0, int(size) - busy - len(self._pending))

    def _report_capacity(self) -> None:
        """Tell the node when what it may still hand over has changed: a node hands a job it is not the first to
        claim (see peers.py) only to a free worker."""
        capacity = Capacity(self.free(), self._received)
        if capacity != self._capacity and not self._stopping:
            self._capacity = capacity
            self._report(capacity)

    def _pool_size(self) -> int:
        return sum(1 for c in self._workers.values() if not c.kill_reason and not c.forced)

    def _keep_minimum(self) -> None:
        if self._stopping or self.options[o.PM] == o.PM_ONDEMAND:
            return
        while self._pool_size() < self.options[o.MIN_CHILDREN]:
            if self._spawn() is None:
                return

    def _shrink(self) -> None:
        if self.options[o.PM] != o.PM_DYNAMIC:
            return
        now = time.monotonic()
        spare = self._pool_size() - self.options[o.MIN_CHILDREN]
        for proc in list(self._workers.values()):
            if spare <= 0:
                return
            if proc.job is None and not proc.dedicated and not proc.kill_reason:
                if now - proc.idle_since >= DYNAMIC_IDLE_SECONDS:
                    proc.kill_reason = KillReason.SHRINK
                    with contextlib.suppress(OSError, ValueError):
                        proc.conn.send(Exit())
                    spare -= 1

    def _enforce_deadlines(self) -> None:
        """Kill workers past their job's timeout, and those whose lease the node could not renew in time."""
        now, clock = time.monotonic(), lease_clock()
        for proc in list(self._workers.values()):
            if proc.kill_reason is not None or not proc.claimed or proc.ending:
                continue
            due = (proc.deadline is not None and now >= proc.deadline) or clock >= proc.fence
            if due:
                self._drain(proc)  # an Ending it sent already must be heard before a kill is decided
                if proc.ending or proc.kill_reason is not None or not proc.claimed:
                    continue
            if proc.deadline is not None and now >= proc.deadline:
                self.logger.warning(
                    f"job {proc.job} timed out after {proc.timeout} s; killing its worker (pid {proc.pid})",
                    extra={"job_id": proc.job, "pid": proc.pid},
                )
                self._kill(proc, KillReason.TIMEOUT)
            elif clock >= proc.fence:
                self.logger.error(
                    "lease of a running job not renewed in time (MongoDB or the queue node unresponsive); "
                    "killing its worker so that no other node runs it beside us",
                    extra={"job_id": proc.job, "pid": proc.pid},
                )
                self._kill(proc, KillReason.LOST)

    # -- processes -------------------------------------------------------------------------------------------------

    def _spawn(self, job: RunJob | None = None, dedicated: bool = False) -> _WorkerProc | None:
        if time.monotonic() < self._spawn_blocked_until:
            return None
        worker_id = ObjectId()
        parent_end, child_end = Pipe()
        slot = LeaseSlot()
        others: list[object] = [c.conn for c in self._workers.values()] + [parent_end]
        others += [c.slot for c in self._workers.values()]
        others += [h for h in (self._queue, self._wake_r, self._wake_w) if h is not None]
        factory = self.factory

        def run() -> int:
            forking.reset_signals()
            # Ctrl-C and a stop are the manager's to carry out (systemd sends SIGTERM to every process of the unit):
            # it never kills a run whose code has returned. Handlers, not SIG_IGN, which the job's programs would
            # inherit; the worker's own (Worker.serve) also notes a SIGTERM.
            signal.signal(signal.SIGINT, lambda *_: None)
            signal.signal(signal.SIGTERM, lambda *_: None)
            # What its job starts and leaves behind (daemons) stays below the worker, and dies with it.
            forking.become_subreaper()
            worker = factory.build_worker(worker_id)
            worker.serve(child_end, job, slot)
            return 0

        try:
            # No parent-death signal: a worker whose manager dies ends its job's processes with itself (fencing).
            pid = forking.fork(run, close=others, new_group=True, parent_death=False)
        except SpawnForkError as exc:
            self.logger.error("cannot spawn worker", extra={"error": str(exc)})
            self._spawn_blocked_until = time.monotonic() + SPAWN_BACKOFF_SECONDS
            parent_end.close()
            child_end.close()
            slot.close()
            return None
        child_end.close()
        proc = _WorkerProc(worker_id, pid, parent_end, slot, dedicated=dedicated or job is not None)
        if job is not None:
            proc.job, proc.task = job.job.id, job
            proc.forced = job.job.force_spawn
        self._workers[pid] = proc
        self.logger.info(f"worker {worker_id} spawned (pid {pid})", extra={"worker": worker_id, "pid": pid})
        self._report(WorkerSpawned(worker_id, pid))
        return proc

    def _kill(self, proc: _WorkerProc, reason: KillReason) -> None:
        proc.kill_reason = reason
        proc.deadline = None
        forking.kill_tree(proc.pid, signal.SIGKILL)

    def _reap(self) -> None:
        # Workers, and in a process of our own what a dead worker's job left behind (we are its subreaper).
        if not (self._workers or self._own_process):
            return
        for pid, status in forking.exited():  # the next child is reaped only when asked for
            proc = self._workers.pop(pid, None)
            if proc is not None:
                self._drain(proc)
                self._on_exit(proc, forking.exit_signal(status), status)
            if not (self._workers or self._own_process):
                return  # in a caller's process: never reap its other children

    def _drain(self, proc: _WorkerProc) -> None:
        """Read what a worker has sent so far, without waiting: what a dead one said before it died (its claim,
        most of all), or the Ending a live one sent before it began recording its end (so that no kill meets a
        run whose code returned: the worker sends Ending before it writes anything about the end)."""
        while not proc.conn.closed:
            try:
                if not proc.conn.poll():
                    return
                message = proc.conn.recv()
            except (EOFError, OSError):
                return
            self._on_worker_message(proc, message)

    def _on_exit(self, proc: _WorkerProc, sig: int | None, status: int) -> None:
        proc.conn.close()
        # What its job started dies with it: what is left in its group, and what became ours (we are a subreaper).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self._own_process:
            forking.kill_strays(self._workers)
        self._report(WorkerExited(proc.id, proc.pid, sig))
        if proc.kill_reason is None and self._stopping and sig == signal.SIGTERM:
            proc.kill_reason = KillReason.STOP  # a whole-group SIGTERM (systemd's stop) reached it first
        self_stopped = proc.slot.self_stopped()
        if proc.kill_reason is None and proc.claimed and not proc.ending:
            clock, timer = lease_clock(), proc.slot.timer()
            if clock >= proc.fence or self_stopped:
                proc.kill_reason = KillReason.LOST  # it fenced itself: its lease was not renewed in time
            elif sig == signal.SIGKILL and timer and clock >= timer - 0.05:
                proc.kill_reason = KillReason.STARVED  # its timer fired while its lease held: it could not look
        timer = proc.slot.timer()
        proc.slot.close()
        # Its timer (armed only around a claim) ended it before it told us of a claim: paused past its lease in
        # between. The claim may be written: its node puts it back as a lease it lost, not as a death.
        # So did its own fence when it found, right after a claim, that the lease may have run out (it was paused).
        unreported = proc.task is not None and not proc.claimed and sig == signal.SIGKILL and bool(timer)
        unreported = unreported and (lease_clock() >= timer - 0.05 or self_stopped)
        if proc.claimed and proc.job is not None:
            reason = proc.kill_reason or KillReason.DIED
            self._report(JobKilled(proc.job, proc.id, proc.run, reason, sig, proc.timeout))
        elif proc.task is not None and proc.kill_reason not in (KillReason.CANCEL, KillReason.STOP):
            if unreported:
                proc.kill_reason = KillReason.LOST
                self._report(JobKilled(proc.task.job.id, proc.id, proc.task.job.run, KillReason.LOST, sig, 0))
            # Handed over but never claimed (or the claim was not written): still WAITING, and no change event will
            # announce it again.
            if proc.task.job.force_spawn:
                self._forced.appendleft(proc.task)
            else:
                self._pending.put_back(proc.task)
        if proc.kill_reason is None and status != 0 and not proc.claimed:
            self.logger.error("worker exited unexpectedly", extra={"pid": proc.pid, "status": status})
            self._spawn_blocked_until = time.monotonic() + SPAWN_BACKOFF_SECONDS

    def _forget_connection(self, proc: _WorkerProc) -> None:
        """The worker's end of the pipe closed: it is exiting; the reaper reports the rest."""
        with contextlib.suppress(OSError):
            proc.conn.close()

    def _report(self, message: Any) -> None:
        if self._queue is None:
            return
        self._outbox.append(message)
        self._flush_reports()

    def _flush_reports(self, block: bool = False) -> None:
        """Send queued reports while the pipe has room. The node may be busy sending us a backlog of jobs: if
        both sides blocked sending to each other, neither would ever read again."""
        conn = self._queue
        while self._outbox and conn is not None:
            if not block and not forking.writable(conn):
                return
            try:
                conn.send(self._outbox[0])
            except (OSError, ValueError):
                self._stopping = True
                self._outbox.clear()
                return
            self._outbox.popleft()

    def _stop_all(self) -> None:
        """Stop every worker and report the jobs they were running. A worker whose job's code has returned records
        its end first (it is never killed by a stop: its run must not run again); the others stop themselves at
        once (their watchdog, atomically with the job's return) or are killed after STOP_GRACE_SECONDS. The node
        bounds the whole stop."""
        for proc in list(self._workers.values()):
            self._drain(proc)  # who has ended already
        for proc in self._workers.values():
            proc.slot.request_stop()
            with contextlib.suppress(OSError, ValueError):
                proc.conn.send(Exit())
            if proc.claimed and not proc.ending and proc.kill_reason is None:
                proc.kill_reason = KillReason.STOP
        grace = time.monotonic() + STOP_GRACE_SECONDS
        while self._workers:
            self._reap()
            for proc in list(self._workers.values()):
                self._drain(proc)
                if time.monotonic() >= grace and not proc.ending:
                    if proc.kill_reason not in (KillReason.TIMEOUT, KillReason.CANCEL, KillReason.LOST):
                        proc.kill_reason = KillReason.STOP
                    forking.kill_tree(proc.pid, signal.SIGKILL)
            if self._workers:
                self._flush_reports()
                time.sleep(0.01)
        self._flush_reports(block=True)  # the node reads until we exit
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
