"""Queue: a queue node. It watches the job collection and feeds its forked WorkerManager over a pipe.

The node is the only process of the three that writes on behalf of its workers after they die or are killed:
it records timeouts, puts interrupted and orphaned jobs back to WAITING, renews its running jobs' leases (a
:class:`~taskscheduler.node.heartbeat.Heartbeat` thread beside the loop), and moves POSTPONED jobs to WAITING when
their time has come.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

from blinker import Namespace
from bson import ObjectId
from pymongo.database import Database

from .. import options as o
from ..client.job import serves
from ..client.scheduler import Scheduler
from ..constants import NODE_EXPIRY_LEASES, VERSION, JobStatus
from ..core.dependencies import depends_on
from ..core.flow import EVERY_JOB, Controls, keys_of
from ..core.kills import AfterKill
from ..errors import InvalidArgumentError, ServerUnavailableError, SpawnForkError
from ..events import WORKER_KILL, WORKER_SPAWN, Emitter, Handler
from ..store import STATUS_UNKNOWN, StatusChange, utcnow
from ..store.records import EventRecord, JobRecord
from ..store.schema import due, end_problem, job_ref, problem
from ..store.views import JobView
from . import forking
from .backlog import start_order
from .blocked import Blocked
from .deferred import Deferred
from .factory import WorkerFactory
from .heartbeat import Heartbeat, period_of
from .inbox import Inbox
from .metrics import NodeMetrics
from .peers import Peers, delay
from .protocol import (
    CancelJob,
    Capacity,
    DropJob,
    JobClaimed,
    JobFinished,
    JobHeldBack,
    JobKilled,
    JobNotClaimed,
    KillReason,
    RunJob,
    Stop,
    WorkerExited,
    WorkerSpawned,
    handed_over,
)
from .wakeups import READ_SECONDS, Kind, Wakeups

#: Statuses a node's change stream needs when nobody listens to its status events: what to run, what to run
#: later, what to kill, and claims (so that a job another node took leaves this node's queue and its deferred jobs
#: at once, instead of costing a free worker a failed claim later).
ROUTED = (JobStatus.WAITING, JobStatus.POSTPONED, JobStatus.CANCELED, JobStatus.PROCESSING)

#: How the node records the run of a worker it killed (metrics; the others are put back to WAITING).
KILLED_STATUS = {
    KillReason.TIMEOUT: int(JobStatus.TIMEOUT),
    KillReason.CANCEL: int(JobStatus.CANCELED),
    KillReason.STARVED: int(JobStatus.FAILED),
}

#: Seconds the node waits for its manager to stop its workers on SIGTERM/SIGINT.
STOP_SECONDS = 8.0
#: Manager restarts allowed within :data:`RESTART_WINDOW` seconds before the node gives up (exit non-zero).
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Pause after a failed round of the node's loop (e.g. MongoDB unreachable) before the next one.
ERROR_BACKOFF_SECONDS = 0.5
#: Workers that exited lately, whose unreported claims a stopping node still looks for.
EXITED_WORKERS_KEPT = 100
#: Longest the node's loop sleeps while it has something to look at again soon (held or blocked jobs, ends to
#: record, burst mode, metrics): what comes in (changes, reports) wakes it at once whatever it waits for.
TICK_SECONDS = 0.2
#: Longest an idle node's loop sleeps (bounded by its timers): changes, reports and signals wake it at once.
IDLE_WAIT_SECONDS = 2.0
#: Wake-ups handled in one round of the loop before its other steps run.
WAKEUPS_PER_ROUND = 100
#: Other live nodes a node's DEBUG line names when the set it sees changes (it counts them all).
PEERS_NAMED = 10
#: How often a node in burst mode looks whether any job of its modules is still due or running.
BURST_CHECK_SECONDS = 0.25
#: Looks in a row that must find nothing before a node in burst mode stops (a claim's report may be on its way).
BURST_QUIET_LOOKS = 2
#: Seconds between two looks at jobs held back by a full limit, each sending one job per limit to try its slots.
PROBE_SECONDS = 1.0
#: Fields of the registry entries a node reads to know its peers (see peers.py).
PEER_FIELDS = ("_id", "modules", "alive", "lease")
#: Malformed jobs a node remembers having logged as skipped (each is logged once while remembered).
SKIPPED_KEPT = 10_000


class Queue:
    """A queue node: ``process()`` blocks, running jobs through a forked WorkerManager until SIGTERM/SIGINT."""

    OPTION_ORPHANED_TIMEOUT = o.ORPHANED_TIMEOUT

    def __init__(
        self,
        scheduler: Scheduler,
        db: Database[dict[str, Any]],
        worker_factory: WorkerFactory,
        logger: logging.Logger | None = None,
        emitter: Namespace | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(scheduler, Scheduler):
            raise InvalidArgumentError(f"scheduler must be a taskscheduler.Scheduler, got {type(scheduler).__name__}")
        if not isinstance(worker_factory, WorkerFactory):
            raise InvalidArgumentError(
                f"worker_factory must be a taskscheduler.WorkerFactory, got {type(worker_factory).__name__}"
            )
        self.scheduler = scheduler
        self.db = db
        self.factory = worker_factory
        self.logger = logger or logging.getLogger("taskscheduler.queue")
        self._emitter = Emitter(emitter)
        self.options: dict[str, Any] = dict(o.QUEUE_DEFAULTS)
        self.options.update(o.validate(options, o.QUEUE_OPTIONS, "queue"))
        #: The allow-list: this node claims only jobs whose class lies in these modules (or submodules).
        self.job_modules: tuple[str, ...] = tuple(
            self.options[o.JOB_MODULES] or getattr(worker_factory, "imports", ())
        )
        if not self.job_modules:
            raise InvalidArgumentError(
                "a queue node needs the modules its jobs come from: --import MODULE, "
                "DefaultWorkerFactory(imports=[...]) or the queue option job_modules"
            )
        self._stopping = False
        self._manager_pid: int | None = None
        self._conn: Connection | None = None
        self.life = scheduler.lifecycle
        self.store = scheduler.store
        self._running: dict[ObjectId, ObjectId] = {}  # job -> worker, for jobs this node's workers claimed
        self._runs: dict[ObjectId, int] = {}  # job -> the run number its worker claimed
        self._claimed_at: dict[ObjectId, float] = {}  # job -> when that claim was sent (fencing.lease_clock())
        self._ignored_claims: set[tuple[ObjectId, float]] = set()  # late reports of older claims
        #: Guards the bookkeeping above, kept by the inbox thread as reports arrive (see inbox.py).
        self._state_lock = threading.Lock()
        self._inbox: Inbox | None = None
        self._stuck_manager_killed = False  # we killed an unresponsive manager: its runs' release is not counted
        self._worker_pids: dict[ObjectId, int] = {}
        self._postponed: list[tuple[float, ObjectId, int]] = []  # (at, job, run): runs to move to WAITING
        self._postponed_docs: dict[tuple[ObjectId, int], dict[str, Any]] = {}
        self._due_events: list[tuple[dict[str, Any], EventRecord]] = []  # see _release_due
        self._restarts: list[float] = []
        self._unrecorded: list[AfterKill] = []  # ends of killed workers' jobs, to record
        self._late_sweeps: list[AfterKill] = []  # recorded ones, to look at once more
        self._all_workers: set[ObjectId] = set()  # the workers of this node's manager that live
        self._exited_workers: deque[ObjectId] = deque(maxlen=EXITED_WORKERS_KEPT)
        self._skipped: dict[str, None] = {}  # malformed jobs logged as skipped, oldest first
        self._quiet_looks = 0  # burst mode: looks in a row that found nothing to do
        self._blocked = Blocked(self.life)  # waiting jobs of ours whose dependencies have not all ended DONE
        self._controls = Controls()  # pauses and limits (SPEC 8), as last read
        self._flow_marks = 0  # changes of the flow controls the stream has shown so far
        self._flow_seen = -1  # self._flow_marks when the controls were last read
        self._need_scan = True  # at start, and after the stream restarted without its resume token
        self._wakeups: Wakeups | None = None
        self._flow_released = -1  # ... when the held jobs were last looked at
        self._held: dict[ObjectId, dict[str, Any]] = {}  # due jobs of ours a pause or a full limit holds back
        self._next_probe = 0.0
        self._room: dict[str, int] = {}  # per limit: hand-overs left before it is full, as this node counts
        self._heartbeat: Heartbeat | None = None
        #: This node's id in the registry (``taskscheduler.nodes``).
        self.id = ObjectId()
        self._peers = Peers(self.id, self.job_modules)  # the live nodes, as the registry last showed them
        self._deferred = Deferred()  # waiting jobs of ours whose preferred node is another one, for a while
        self._handed: set[ObjectId] = set()  # jobs sent to the manager that it may still hold (not yet tried)
        self._free: int | None = None  # what the manager said it could still start (None: not yet said) ...
        self._received = 0  # ... once it had received this many RunJob messages
        self._sent = 0  # RunJob messages sent to this manager
        #: Claims this node's workers won and lost (a lost one: another worker had the job first).
        self.claims_won = 0
        self.claims_lost = 0
        self._started = utcnow()
        self._send_lock = threading.Lock()  # the heartbeat thread sends too
        self._fork_lock = threading.Lock()  # no fork while the heartbeat thread is inside pymongo (see Wakeups too)
        self.exit_code = 0
        #: The Prometheus endpoint (option metrics_port), built now so a missing extra fails before any work.
        self.metrics: NodeMetrics | None = None
        if self.options[o.METRICS_PORT]:
            self.metrics = NodeMetrics(
                int(self.options[o.METRICS_PORT]),
                self._worker_counts,
                self._heartbeat_age,
                self.store.waiting_counts,
                host=str(self.options[o.METRICS_HOST]),
                modules=self.job_modules,
            )

    def on(self, event: str, handler: Handler) -> Queue:
        """``handler(event_name, payload)`` for every status change in the cluster and this node's worker events."""
        self._emitter.on(event, handler)
        return self

    def set_options(self, options: Mapping[str, Any]) -> Queue:
        self.options.update(o.validate(options, o.QUEUE_OPTIONS, "queue"))
        return self

    def get_options(self) -> dict[str, Any]:
        return dict(self.options)

    # -- main loop -------------------------------------------------------------------------------------------------

    def process(self) -> None:
        """Run the node until SIGTERM/SIGINT (then stop gracefully: interrupted jobs go back to WAITING)."""
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._patiently(self.store.ensure)
            if self.metrics is not None:
                self.metrics.serve()
            servers = ", ".join(f"{host}:{port}" for host, port in sorted(self.db.client.nodes)) or "MongoDB"
            self.logger.info(
                f"queue node serving {servers} database {self.db.name} for modules {', '.join(self.job_modules)} "
                f"(orphaned timeout {self.options[o.ORPHANED_TIMEOUT]:g} s)"
            )
            self._start_manager()
            # Opened before the scan, so nothing added in between is missed. Documents of updates are looked up
            # only when someone listens to this node's status events: the change stream is the costly part.
            # Without listeners, only the changes in ROUTED are sent, without the documents of updates.
            listening = self._emitter.wants_status()
            routed = None if listening else tuple(int(s) for s in ROUTED)
            lease = float(self.options[o.ORPHANED_TIMEOUT])
            self._step(self._register)  # during an outage: logged, and the heartbeat registers the node later
            self._step(self._read_peers)  # before the first scan: who each waiting job prefers
            self._heartbeat = Heartbeat(
                self.life, lease, self._owners, self._send_nowait, self.logger, self._fork_lock, self._register
            ).start()
            await_ms = int(READ_SECONDS * 1000)
            feed = self.store.status_feed(
                lookup=listening, statuses=routed, flow=True, await_ms=await_ms, peers=True
            )
            self._wakeups = Wakeups(feed).start()  # its reader closes the feed when it ends
            try:
                timers = _Timers(lease)
                while not self._stopping:
                    self._iterate(timers)
            finally:
                # Neither the workers nor the node's exit wait for the reader's read in progress (up to
                # READ_SECONDS): a job whose code returns meanwhile must not be stopped after all, and a stopping
                # node has nothing more to read. The reader ends after that read (a daemon thread: or with us).
                self._wakeups.halt()
                self._stop_manager()
        finally:
            # The heartbeat goes on while the manager stops: runs whose code has returned keep their leases while
            # they record their ends.
            self._stop_manager()
            if self._heartbeat is not None:
                self._heartbeat.stop()
            self._unregister()
            if self.metrics is not None:
                self.metrics.close()
            self.logger.info(
                f"queue node stopped (claims won {self.claims_won}, lost {self.claims_lost})",
                extra={"claims_won": self.claims_won, "claims_lost": self.claims_lost},
            )
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _iterate(self, timers: _Timers) -> None:
        """One round of the node's loop: it sleeps until something comes or a timer is due, then handles it. Each
        step fails alone: one that cannot reach MongoDB is logged and tried again next round, and skips nothing
        else."""
        failed = False
        if self._need_scan:  # at start, and whenever the stream restarted without its resume token
            self._flow_seen = -1  # changes of the flow controls may have been missed too
            if self._step(self._read_flow) and self._step(self._scan):
                self._need_scan = False
            else:
                failed = True
        steps = (
            lambda: self._take_wakeups(timers),
            self._read_flow,  # one that failed in the round before
            self._read_manager,
            self._record_kills,
            self._release_due,
            self._unblock,
            self._release_held,
            self._release_deferred,
        )
        for step in steps:
            failed = not self._step(step) or failed
        now = time.monotonic()
        if now >= timers.peers:
            timers.peers = now + timers.peers_every
            failed = not self._step(self._read_peers) or failed
        if now >= timers.orphans:
            timers.orphans = now + timers.orphans_every
            failed = not self._step(self._reschedule_orphans) or failed
        failed = not self._step(self._check_manager) or failed
        if self.options[o.BURST] and now >= timers.burst:
            timers.burst = now + BURST_CHECK_SECONDS
            failed = not self._step(self._end_burst) or failed
        if self.metrics is not None:
            failed = not self._step(self.metrics.refresh) or failed
        if failed:
            time.sleep(ERROR_BACKOFF_SECONDS)

    def _take_wakeups(self, timers: _Timers) -> None:
        """Sleep until the stream or the manager has something for us, or until the next timer; then handle what
        the stream has shown, in its order: the controls are read again at each change of them, before any job
        change that came after it (a job added after a pause is routed after it)."""
        assert self._wakeups is not None
        item = self._wakeups.next(self._wait_time(timers))
        for _ in range(WAKEUPS_PER_ROUND):
            if item is None:
                return
            if item.kind is Kind.GAP:
                self._need_scan = True  # the next round looks at what is stored first, then goes on
                return
            if item.kind is Kind.FLOW:
                self._flow_marks += 1
                self._read_flow()
            elif item.kind is Kind.PEERS:
                self._read_peers()
            elif item.kind is Kind.CHANGE and item.change is not None:
                self._on_change(item.change)
            item = self._wakeups.next(0)

    def _wait_time(self, timers: _Timers) -> float:
        """How long the loop may sleep: until its next timer, and no longer than TICK_SECONDS while it has
        something to look at again on its own (what comes in wakes it at once in any case)."""
        if self._stopping or self._need_scan:
            return 0.0
        busy = bool(
            self._held
            or self._blocked.jobs
            or self._unrecorded
            or self._late_sweeps
            or self._due_events
            or self._flow_seen != self._flow_marks
            or self._manager_pid is None
            or self.options[o.BURST]
            or self.metrics is not None
        )
        wait = TICK_SECONDS if busy else IDLE_WAIT_SECONDS
        now = time.monotonic()
        ripe = self._deferred.next_ripe(now)  # (a ripe one waits for a free worker: a report wakes us)
        if ripe is not None:
            wait = min(wait, ripe - now)
        return max(0.0, min(wait, self._next_due(), timers.orphans - now, timers.peers - now))

    def _wake(self) -> None:
        wakeups = self._wakeups
        if wakeups is not None:
            wakeups.wake()

    def _patiently(self, step: Callable[[], None]) -> None:
        """A start-up step, tried again while the server drops connections (for at most one lease)."""
        deadline = time.monotonic() + float(self.options[o.ORPHANED_TIMEOUT])
        while True:
            try:
                step()
                return
            except ServerUnavailableError as exc:
                if time.monotonic() > deadline or self._stopping:
                    raise
                self.logger.warning("MongoDB unreachable at start; retrying: %s", _first_line(exc))
                time.sleep(ERROR_BACKOFF_SECONDS)

    def _step(self, step: Callable[[], None]) -> bool:
        try:
            step()
        except ServerUnavailableError as exc:
            self.logger.warning("MongoDB unreachable; retrying: %s", _first_line(exc))
            return False
        except Exception:  # a daemon outlives one bad step: log it, go on with the others
            self.logger.exception("queue node step failed; retrying")
            return False
        return True

    def _end_burst(self) -> None:
        """Burst mode (SPEC 9): stop as on SIGTERM once no job of this node's modules is due (a postponed one not
        yet due does not count) and none runs here, in BURST_QUIET_LOOKS looks in a row."""
        with self._state_lock:
            busy = bool(self._running)
            workers = list(self._all_workers)
        busy = busy or bool(self._unrecorded or self._due_events)
        # A worker's claim is in the database before its report reaches us: ask the database too.
        busy = busy or bool(self.store.jobs_of_workers(workers))
        if not busy:
            now = self._now()
            due = (job for job, cls in self.store.due_jobs(now) if serves(cls, self.job_modules))
            busy = any(self._may_start(job, now) for job in due)
        self._quiet_looks = 0 if busy else self._quiet_looks + 1
        if self._quiet_looks >= BURST_QUIET_LOOKS:
            self.logger.info("burst mode: no job of this node's modules is due or running; stopping")
            self._stopping = True

    def _may_start(self, job_id: Any, now: float) -> bool:
        """Whether a due job of ours can still start without a pause lifted (burst mode): a skipped malformed job
        never does; a paused one not before a resume; one that waits for other jobs only when one of those is due
        or running (a dependency postponed to later keeps nobody busy). A dependency held here for its own
        dependencies counts as its own due job does, not once more: a cycle of them (stored by hand) keeps
        nobody busy, while the job at the root of a chain is looked at itself."""
        if job_ref(job_id) in self._skipped:
            return False
        held = self._held.get(job_id)
        if held is not None and self._controls.is_paused(held):
            return False
        blocked = self._blocked.jobs.get(job_id)
        if blocked is None:
            return True
        for dependency, state in self.store.job_states(depends_on(blocked)).items():
            if dependency in self._blocked.jobs:
                continue
            if JobView(state).status_value == JobStatus.PROCESSING or due(state, now):
                return True
        return False

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.logger.info("stopping queue node", extra={"signal": signum})
        self._stopping = True
        self._wake()  # the loop may sleep for a while: a SimpleQueue may be fed from a signal handler

    def _register(self) -> None:
        """This node's entry in the registry (``taskscheduler info``, health checks, the dashboard)."""
        busy = {worker: job for job, worker in list(self._running.items())}
        workers = [{"_id": w, "pid": pid, "job": busy.get(w)} for w, pid in list(self._worker_pids.items())]
        facts = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self._started,
            "modules": list(self.job_modules),
            "version": VERSION,
            "database": self.db.name,
            "lease": float(self.options[o.ORPHANED_TIMEOUT]),
            "workers": workers,
        }
        self.store.register_node(self.id, facts, NODE_EXPIRY_LEASES * float(self.options[o.ORPHANED_TIMEOUT]))

    def _read_peers(self) -> None:
        """Read the live nodes again (once a heartbeat period, and when one joins or leaves): who a job prefers.
        The loop reads them, never the heartbeat thread: a slow read must not delay a renewal."""
        lease = float(self.options[o.ORPHANED_TIMEOUT])
        before = {peer.id for peer in self._peers.others}
        self._peers.update(self.store.node_entries(PEER_FIELDS), self.store.clock.now(), period_of(lease))
        seen = {peer.id for peer in self._peers.others}
        if seen != before:  # an operator (and a test) can tell which nodes this one shares jobs with
            # The registry is anyone's to write (SPEC 2): name a few, never thousands, in one line.
            named = sorted(map(str, seen))
            more = f", {len(named) - PEERS_NAMED} more" if len(named) > PEERS_NAMED else ""
            self.logger.debug(f"live nodes besides this one: {len(seen)} ({', '.join(named[:PEERS_NAMED])}{more})")

    def _unregister(self) -> None:
        try:
            self.store.unregister_node(self.id)
        except Exception as exc:  # it expires by itself
            self.logger.warning(f"could not remove this node from the registry: {exc}")

    def _owners(self) -> dict[ObjectId, tuple[ObjectId, int]]:
        """The jobs our workers run: job -> (worker, run). Read by the heartbeat thread. A worker that is dead
        (its manager, paused or hung, has not reported it yet) has its lease renewed no more: its job must run
        again elsewhere once the lease ends, not wait for that manager."""
        with self._state_lock:
            running, runs, pids = list(self._running.items()), dict(self._runs), dict(self._worker_pids)
        return {
            job: (worker, runs.get(job, 1))
            for job, worker in running
            if worker not in pids or forking.running(pids[worker])
        }

    # -- change stream ---------------------------------------------------------------------------------------------

    def _scan(self) -> None:
        for doc in self.store.scan((JobStatus.WAITING, JobStatus.POSTPONED)):
            if self._fit(doc):  # checked first: the query matches any number equal to a status (0.0, Int64(1)...)
                self._route(JobView(doc).id, JobView(doc).status_value, doc)

    def _on_change(self, change: StatusChange) -> None:
        doc = change.document
        if change.status == STATUS_UNKNOWN:  # moved to its next run, its status kept: as it is now
            doc = self.store.find_job(change.job_id)
            status = JobView(doc).status_value if doc is not None else None
            if doc is None or type(status) is not int:
                return
            self._route(change.job_id, status, doc)
            return
        if doc is not None:
            self.life.observe(change, doc, self._emitter)
        self._route(change.job_id, change.status, doc)

    def _route(self, job_id: ObjectId, status: int, doc: dict[str, Any] | None) -> None:
        if status != JobStatus.WAITING:
            self._blocked.drop(job_id)  # claimed elsewhere, canceled, or postponed again
            self._held.pop(job_id, None)
            self._deferred.drop(job_id)
        if status == JobStatus.WAITING:
            doc = doc or self.store.find_job(job_id)  # released or due: fetch what the worker needs
            if doc is None or JobView(doc).status_value != JobStatus.WAITING or not self._fit(doc):
                return
            # A job of a module we do not serve waits for a node that does (nodes split work by module).
            if not serves(JobView(doc).class_value, self.job_modules):
                return
            if depends_on(doc):
                self._held.pop(job_id, None)
                self._blocked.hold(doc)  # handed over once its dependencies have ended DONE (see _unblock)
                return
            self._hand_over(doc)
        elif status == JobStatus.POSTPONED:
            doc = doc or self.store.find_job(job_id)  # a next run: its time is in the document
            if doc is None or JobView(doc).status_value != JobStatus.POSTPONED or not self._fit(doc):
                return
            record = JobRecord.from_doc(doc, checked=True)  # (it fits)
            heapq.heappush(self._postponed, (record.at, job_id, record.run))
            self._postponed_docs[(job_id, record.run)] = handed_over(doc)  # held until due: slim
        elif status == JobStatus.CANCELED:
            self._blocked.ended(job_id)  # a dependent held here ends too, now
            self._handed.discard(job_id)
            self._send(CancelJob(job_id))
        elif job_id in self._handed:  # only a job we handed over can be in the manager's hands, waiting
            self._handed.discard(job_id)
            self._send(DropJob(job_id))

    def _hold(self, doc: dict[str, Any]) -> None:
        """Hold a due job back: a job with dependencies as one that waits for them (it is handed over only once
        they are DONE, whatever held it), any other until no pause or limit holds it back."""
        job_id = JobView(doc).id
        if depends_on(doc):
            self._held.pop(job_id, None)
            self._blocked.hold(doc)
        else:
            self._held[job_id] = doc

    def _hand_over(self, doc: dict[str, Any], ripe: bool = False) -> None:
        """Send a due job of ours to the manager, unless another node is the first to claim it (then it waits
        among the deferred jobs: see peers.py), or a pause or a full limit holds it back (SPEC 8). ``ripe``: a
        deferred job whose delay has passed, for a free worker of ours."""
        if not ripe:
            if self._defer(doc):
                return
            self._hand_over_before(doc)
        limits: tuple[str, ...] = ()
        if not self._controls.empty:
            if self._controls.is_paused(doc) or self._full(doc):
                self._held[JobView(doc).id] = doc
                return
            limits = self._controls.limited(doc)
            self._spend(limits)
        self._run(doc, limits)

    def _run(self, doc: dict[str, Any], limits: tuple[str, ...]) -> None:
        job_id = JobView(doc).id
        self._deferred.drop(job_id)
        self._handed.add(job_id)
        self._sent += 1
        self._send(RunJob(handed_over(doc), float(self.options[o.ORPHANED_TIMEOUT]), limits))

    def _defer(self, doc: dict[str, Any]) -> bool:
        """Leave a job to the node it prefers for the delay of this node's rank (False: this node is the first).
        A force_spawn job, which gets a worker of its own, goes once its delay is over whatever our workers do."""
        job = JobView(doc)
        rank = self._peers.rank(job.id, job.job_class)
        if rank == 0:
            return False
        self._deferred.add(doc, time.monotonic() + delay(rank), counted=not job.force_spawn)
        return True

    def _hand_over_before(self, doc: dict[str, Any]) -> None:
        """Before a job of ours goes to a free worker, the deferred jobs of a higher priority go (SPEC: a node starts
        higher priorities first), even before their delay is over: a job must not wait behind a lower one because
        the node it prefers is busy."""
        free = self._free_workers()
        if free > 0 and self._deferred:
            for earlier in self._deferred.take_before(start_order(doc), free):
                self._hand_over(earlier, ripe=True)

    def _free_workers(self) -> int:
        """Jobs the manager could start now, less those sent since it last said so."""
        if self._free is None:
            return 0
        return self._free - (self._sent - self._received)

    def _release_deferred(self) -> None:
        """Hand the deferred jobs whose delay has passed (still waiting: a claim elsewhere drops them) to the free
        workers of this node. A node with no free worker takes no part in the race for other nodes' jobs."""
        if not self._deferred:
            return
        # (a force_spawn job goes once ripe whatever the count: it gets a worker of its own)
        for doc in self._deferred.take(time.monotonic(), max(0, self._free_workers())):
            self._hand_over(doc, ripe=True)

    def _full(self, doc: Mapping[str, Any]) -> list[str]:
        """The limits of ``doc`` with no room left for another hand-over: the room the last read of the controls
        showed (read again at each change, and once a second), less what this node handed over since."""
        full = []
        for key in self._controls.limited(doc):
            if key not in self._room:
                self._room[key] = self._controls.limits[key].room(self.store.clock.now())
            if self._room[key] <= 0:
                full.append(key)
        return full

    def _spend(self, limits: tuple[str, ...]) -> None:
        for key in limits:
            self._room[key] = self._room.get(key, 1) - 1

    def _read_flow(self) -> None:
        """Read the pauses and limits again when one changed (or at start). Jobs of a newly paused key that were
        handed over already are taken back from the manager."""
        if self._flow_marks == self._flow_seen:
            return
        seen = self._flow_marks
        controls = Controls.from_docs(self.store.flow_controls())
        newly = (controls.paused - self._controls.paused) | (set(controls.limits) - set(self._controls.limits))
        self._controls, self._flow_seen = controls, seen
        self._room.clear()
        if newly:  # handed over without knowing: taken back, and handed over again as the controls say
            every = EVERY_JOB in newly
            for doc in self.store.scan((JobStatus.WAITING,)):
                job_id = JobView(doc).id_value
                if not isinstance(job_id, ObjectId) or job_id in self._held or job_id in self._blocked.jobs:
                    continue  # (a blocked one was never handed over: it meets the controls once released)
                if job_id in self._deferred:
                    continue  # (nor a deferred one)
                if not every and not newly.intersection(keys_of(doc)):
                    continue
                self._handed.discard(job_id)
                self._send(DropJob(job_id))  # the manager forgets it if it holds it: not started now
                if serves(JobView(doc).class_value, self.job_modules) and self._fit(doc):
                    self._hold(doc)

    def _release_held(self) -> None:
        """Hand over the held jobs no pause or limit holds back any more, in the order a node starts jobs. Once a
        second, a job of each full limit goes too: its worker drops the limit's slots whose runs are over (a run
        whose process died frees its slot when the run is orphaned) and takes one, or the job comes back."""
        if not self._held:
            return
        now_clock = time.monotonic()
        probe = now_clock >= self._next_probe
        if not probe and self._flow_released == self._flow_seen:
            return
        self._flow_released = self._flow_seen
        if probe:
            self._next_probe = now_clock + PROBE_SECONDS
            self._room.clear()  # a rate's window slides on with no change to read: count again
        probed: set[str] = set()
        for doc in sorted(self._held.values(), key=start_order):
            if self._controls.is_paused(doc):
                continue
            full = self._full(doc)
            if full and not (probe and full[0] not in probed):
                continue
            probed.update(full)  # a probe: its worker drops the slots of runs that are over, or it comes back
            del self._held[JobView(doc).id]
            if not full and self._defer(doc):  # (a probe goes from every node that holds one, as before)
                continue
            limits = self._controls.limited(doc)
            self._spend(limits)
            self._run(doc, limits)

    def _fit(self, doc: dict[str, Any]) -> bool:
        """Whether a WAITING or POSTPONED document can be routed (SPEC 2). Every node checks what it needs to put
        a job in its place; the nodes that serve its class also what a worker needs to run it. A malformed one is
        ended FAILED, naming the field, or skipped when it cannot take that write; it never stops the node."""
        served = serves(JobView(doc).class_value, self.job_modules)
        found = problem(doc, capped=self.store.capped, run=served)
        if found is None:
            return True
        self._malformed(doc, found)
        return False

    def _malformed(self, doc: dict[str, Any], found: str) -> None:
        blocked = end_problem(doc, capped=self.store.capped)
        if blocked is None:
            self.life.reject(doc, found)  # False when another node ended it first, or it changed meanwhile
            return
        key = JobView(doc).ref  # any BSON value but an array, hashable or not
        if key not in self._skipped:  # logged once per node (a scan meets it again after every gap)
            if len(self._skipped) >= SKIPPED_KEPT:
                self._skipped.pop(next(iter(self._skipped)))
            self._skipped[key] = None
            self.logger.warning(
                "skipping malformed job %s: %s; it cannot be ended FAILED in place (%s)",
                key,
                found,
                blocked,
                extra={"job_id": JobView(doc).id_value, "problem": found},
            )

    def _now(self) -> float:
        """Unix time on the server's clock (the earliest it can read now), so that a node whose clock is off
        starts postponed jobs neither early nor late."""
        return self.store.clock.earliest()

    def _next_due(self) -> float:
        """Seconds until the next postponed run of ours is due (IDLE_WAIT_SECONDS when none is)."""
        if not self._postponed:
            return IDLE_WAIT_SECONDS
        return max(0.0, self._postponed[0][0] - self._now())

    def _release_due(self) -> None:
        while self._due_events:  # moved to WAITING by us, their events not yet written (an outage)
            self.life.record_due(*self._due_events[0])
            self._due_events.pop(0)
        while self._postponed and self._postponed[0][0] <= self._now():
            _, job_id, run = self._postponed[0]
            doc = self._postponed_docs.get((job_id, run))
            try:
                event = self.life.unpostpone(doc) if doc is not None else None
            except ServerUnavailableError:
                raise  # the entry stays for the next round
            except Exception:
                self.logger.exception("cannot move a due job to waiting", extra={"job_id": job_id})
                event = None
            heapq.heappop(self._postponed)
            self._postponed_docs.pop((job_id, run), None)
            if doc is not None and event is not None:
                self._due_events.append((doc, event))
                self.life.record_due(doc, event)
                self._due_events.pop()

    def _unblock(self) -> None:
        """Hand over the held jobs whose dependencies have all ended DONE (SPEC 8)."""
        for doc in self._blocked.release():
            self._hand_over(doc)

    def _reschedule_orphans(self) -> None:
        server_now = self.store.clock.now(earliest=True)  # a lease has ended once the server surely passed it
        for doc in self.store.orphans(server_now):
            if isinstance(job_id := JobView(doc).id, ObjectId) and job_id in self._running:
                continue  # ours: our manager fences it, and then we record it
            found = problem(doc, capped=self.store.capped)  # a release writes what a run's end writes
            if found is not None:  # ended FAILED (or skipped): the sweep goes on with the others
                self._malformed(doc, found)
                continue
            # Dead, or only cut off or paused: not known yet. The sweep counts until its owner vouches for it.
            try:
                self.life.release_orphan(doc, reason="its node stopped renewing the lease").record()
            except ServerUnavailableError:
                raise  # the next round sweeps it (and the ones after it)
            except Exception:  # one document the sweep cannot handle never keeps the others from being swept
                self.logger.exception("cannot put back orphaned job %s", JobView(doc).ref)
        # Canceled while running, and neither the worker nor its node settled the run before the lease ran out:
        # they died (or are cut off, and find it settled when they come back).
        for doc in self.store.unsettled_cancels(server_now):
            if isinstance(job_id := JobView(doc).id, ObjectId) and job_id in self._running:
                continue  # ours: our manager stops its worker, and then we settle it
            try:
                self.life.settle_cancel(doc)
            except ServerUnavailableError:
                raise
            except Exception:
                self.logger.exception("cannot settle canceled job %s", JobView(doc).ref)

    # -- the manager -----------------------------------------------------------------------------------------------

    def _start_manager(self) -> None:
        parent_end, child_end = Pipe()
        factory = self.factory

        def run() -> int:
            forking.reset_signals()
            manager = factory.build_manager()
            manager.process(child_end)
            return 0

        # The manager must not hold the metrics port open: it would outlive a node that dies.
        inherited = [self.metrics.listener] if self.metrics is not None and self.metrics.listener else []
        try:
            # No child starts with another thread of ours inside pymongo: the heartbeat's beats and the stream's
            # reads hold this lock (a restart waits for the read in progress, at most a second).
            reads = self._wakeups.forking() if self._wakeups is not None else contextlib.nullcontext()
            with self._fork_lock, reads:
                self._manager_pid = forking.fork(run, close=[parent_end, *inherited])
        except SpawnForkError:
            parent_end.close()
            child_end.close()
            raise
        child_end.close()
        self._conn = parent_end
        self._handed.clear()  # a new manager holds nothing yet, and has said nothing of its workers
        self._free, self._received, self._sent = None, 0, 0
        self._inbox = Inbox(parent_end, self._track, self._wake)
        self.logger.info("worker manager started", extra={"pid": self._manager_pid})

    def _send(self, message: Any) -> None:
        conn = self._conn
        try:
            # The inbox thread reads the manager's reports meanwhile, so the manager is never blocked on us. A
            # manager that reads nothing for a whole lease (paused, hung) is ended: its restart rescans the jobs.
            stuck_since = time.monotonic()
            while conn is not None and not conn.closed and not forking.writable(conn, 0.05):
                self._read_manager()
                pid = self._manager_pid
                if pid is None or not forking.running(pid):
                    return  # the manager is gone: its restart rescans the waiting jobs
                if time.monotonic() - stuck_since > float(self.options[o.ORPHANED_TIMEOUT]):
                    self.logger.error("worker manager unresponsive for a whole lease; ending it", extra={"pid": pid})
                    self._stuck_manager_killed = True
                    forking.kill_tree(pid)
                    return
            if conn is not None and not conn.closed:
                with self._send_lock:
                    conn.send(message)
        except (OSError, ValueError):
            self.logger.warning("worker manager pipe closed")

    def _send_nowait(self, message: Any) -> bool:
        """Send a small message if the pipe has room now (from the heartbeat thread: it must never block)."""
        conn = self._conn
        try:
            if conn is None or conn.closed or not forking.writable(conn, 0):
                return False
            with self._send_lock:
                conn.send(message)
        except (OSError, ValueError):
            return False
        return True

    def _read_manager(self) -> None:
        """Handle the reports the inbox thread has read (and tracked) so far, in order."""
        if self._inbox is not None:
            for report in self._inbox.drain():
                self._on_manager_message(report)

    def _track(self, message: Any) -> None:
        """The bookkeeping of a report, done by the inbox thread as it arrives: the heartbeat renews a claim from
        the moment it is reported, however busy the node's loop is."""
        with self._state_lock:
            match message:
                case WorkerSpawned(worker_id=worker_id, pid=pid):
                    self._worker_pids[worker_id] = pid
                    self._all_workers.add(worker_id)
                case WorkerExited(worker_id=worker_id):
                    self._worker_pids.pop(worker_id, None)
                    self._all_workers.discard(worker_id)
                    self._exited_workers.append(worker_id)
                case JobClaimed(job_id=job_id, worker_id=worker_id, run=run, claimed_at=claimed_at):
                    if claimed_at < self._claimed_at.get(job_id, 0.0):
                        # A late report of an older claim: the newer one is the live run (the older fences itself).
                        self._ignored_claims.add((job_id, claimed_at))
                        return
                    self._running[job_id] = worker_id
                    self._runs[job_id] = run
                    self._claimed_at[job_id] = claimed_at
                case JobFinished(job_id=job_id, worker_id=worker_id) | JobKilled(job_id=job_id, worker_id=worker_id):
                    self._forget_run(job_id, worker_id)

    def _on_manager_message(self, message: Any) -> None:
        match message:
            case WorkerSpawned(worker_id=worker_id, pid=pid):
                self._emitter.emit(WORKER_SPAWN, {"_id": worker_id, "pid": pid, "signal": None})
            case WorkerExited(worker_id=worker_id, pid=pid, signal=sig):
                self._emitter.emit(WORKER_KILL, {"_id": worker_id, "pid": pid, "signal": sig})
            case JobClaimed(job_id=job_id, job_class=job_class, claimed_at=claimed_at):
                self._claimed(job_id, job_class, claimed_at)
            case JobFinished(job_id=job_id, status=status):
                self._run_recorded(job_id, status)
            case JobNotClaimed(job_id=job_id):
                self._handed.discard(job_id)
                self.claims_lost += 1
                if self.metrics is not None:
                    self.metrics.claim_lost()
            case Capacity(free=free, received=received):
                self._free, self._received = free, received
            case JobHeldBack(job_id=job_id):
                self._handed.discard(job_id)
                doc = self.store.find_job(job_id)  # as it is now: held while it is still due
                if doc is not None and JobView(doc).status_value == JobStatus.WAITING and self._fit(doc):
                    self._hold(doc)
            case JobKilled(job_id=job_id, worker_id=worker_id, run=run, reason=reason, signal=sig, timeout=timeout):
                if self.metrics is not None:
                    self.metrics.run_ended(job_id, KILLED_STATUS.get(reason))
                died = f"worker process died (signal {sig})" if reason == KillReason.DIED else ""
                self._unrecorded.append(self.life.after_kill(job_id, worker_id, run, reason, timeout, died))
                self._free_slots(job_id, worker_id)

    def _claimed(self, job_id: ObjectId, job_class: str, claimed_at: float) -> None:
        self._handed.discard(job_id)
        self.claims_won += 1
        with self._state_lock:
            if (job_id, claimed_at) in self._ignored_claims:
                self._ignored_claims.discard((job_id, claimed_at))
                return
        if self.metrics is not None:
            self.metrics.run_started(job_id, job_class)

    def _run_recorded(self, job_id: ObjectId, status: int | None) -> None:
        """A worker of ours has recorded its run's end (``status``; None: it recorded none)."""
        if status is not None:
            # A dependent held here looks at it now: node streams carry no DONE, so else only the timer would.
            self._blocked.ended(job_id)
        if self.metrics is not None:
            self.metrics.run_ended(job_id, status)

    def _free_slots(self, job_id: ObjectId, worker_id: ObjectId) -> None:
        """A killed worker's slots of the limits, given back at once (else the next worker finds its run over)."""
        if self._controls.limits:
            with contextlib.suppress(ServerUnavailableError):
                self.store.free_slots(list(self._controls.limits), job_id, worker_id)

    def _worker_counts(self) -> tuple[int, int]:
        """(busy, idle) workers of this node (read by the metrics thread at scrape time)."""
        total, busy = len(self._worker_pids), len(self._running)
        return busy, max(0, total - busy)

    def _heartbeat_age(self) -> float:
        """Seconds since the heartbeat last reached the server (read by the metrics thread)."""
        beat = self._heartbeat
        return time.monotonic() - beat.reached if beat is not None else 0.0

    def _forget_run(self, job_id: ObjectId, worker_id: ObjectId) -> None:
        """A worker is done with a job. Another worker may hold its next run already (a late report): keep that."""
        if self._running.get(job_id) == worker_id:
            del self._running[job_id]
            self._runs.pop(job_id, None)
            self._claimed_at.pop(job_id, None)

    def _record_kills(self) -> None:
        """Record the ends of killed workers' jobs; what fails stays queued (prepared as it is) for the next round.
        Each is looked at once more a little later, for a write its worker sent just before it died."""
        while self._unrecorded:
            self._unrecorded[0].record()
            self._late_sweeps.append(self._unrecorded.pop(0))
        now = time.monotonic()
        while self._late_sweeps and self._late_sweeps[0].sweep_again_at <= now:
            self._late_sweeps[0].sweep()
            self._late_sweeps.pop(0)

    def _check_manager(self) -> None:
        pid = self._manager_pid
        if pid is not None:
            done, status = _waitpid(pid)
            if not done:
                return
            if not self._stopping:
                self.logger.error("worker manager died", extra={"pid": pid, "status": status})
            self._manager_pid = None
            if self._inbox is not None:
                self._inbox.wait_closed(2.0)  # every report it sent before it died
            self._read_manager()
            self._abandon_running(orphaned=not self._stuck_manager_killed)
            self._stuck_manager_killed = False
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
            if len(self._restarts) > MAX_RESTARTS:
                self.logger.critical("worker manager keeps dying; queue node exits")
                self.exit_code = 1
                self._stopping = True
        if self._manager_pid is None and not self._stopping:
            self._start_manager()
            self._scan()  # the new manager knows no waiting job yet

    def _abandon_running(self, orphaned: bool) -> None:
        """The manager is gone: make sure its workers are too, and queue their jobs' ends for recording."""
        with self._state_lock:
            pids = list(self._worker_pids.values())
            self._worker_pids.clear()
        for pid in pids:  # normally dead already; a stray one (e.g. busy in a C call) must not run its job on
            forking.kill_tree(pid)
        for job_id, worker in list(self._running.items()):
            why = KillReason.MANAGER_DIED if orphaned else KillReason.STOP
            self._unrecorded.append(self.life.after_kill(job_id, worker, self._runs.get(job_id, 1), why, 0))
            if self.metrics is not None:  # put back to WAITING: its run ended as released
                self.metrics.run_ended(job_id, None)
        with self._state_lock:
            self._running.clear()
            self._runs.clear()
            self._claimed_at.clear()
        self._record_kills()
        # A worker may have claimed a job and died (killed with its manager) before anyone heard of the claim.
        for doc in self.store.jobs_of_workers([*self._all_workers, *self._exited_workers]):
            found = problem(doc, capped=self.store.capped)  # made malformed while it ran: ended FAILED, or left
            if found is not None:
                self._malformed(doc, found)
                continue
            reason = "worker manager died" if orphaned else "queue node stopped"
            self.life.release(doc, JobView(doc).worker, orphaned=orphaned, reason=reason).record()

    def _stop_manager(self) -> None:
        """Stop the manager and its workers; every job they were running goes back to WAITING (same id)."""
        pid = self._manager_pid
        if pid is not None:
            self._send(Stop())
            # Runs whose code has returned record their ends before their workers exit: wait up to a lease for them.
            deadline = time.monotonic() + max(STOP_SECONDS, float(self.options[o.ORPHANED_TIMEOUT]))
            exited = False
            while time.monotonic() < deadline:
                self._read_manager_safely()
                done, _ = _waitpid(pid)
                if done:
                    exited = True
                    break
                time.sleep(0.02)
            if not exited:
                self.logger.error("worker manager did not stop in time; killing it", extra={"pid": pid})
                forking.kill_tree(pid)
                _waitpid(pid, block=True)
            if self._inbox is not None:
                self._inbox.wait_closed(2.0)
            self._read_manager_safely()
            self._manager_pid = None
        deadline = time.monotonic() + STOP_SECONDS
        while True:
            try:
                self._abandon_running(orphaned=False)
                break
            except ServerUnavailableError as exc:
                if time.monotonic() > deadline:  # their leases run out and other nodes take them over
                    self.logger.error("could not put interrupted jobs back: %s", _first_line(exc))
                    break
                time.sleep(ERROR_BACKOFF_SECONDS)
            except Exception as exc:
                self.logger.error("could not put interrupted jobs back", extra={"error": str(exc)})
                break
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _read_manager_safely(self) -> None:
        try:
            self._read_manager()
            self._record_kills()
        except Exception as exc:
            self.logger.error("could not record a worker's end", extra={"error": str(exc)})


class _Timers:
    def __init__(self, orphaned_timeout: float) -> None:
        self.orphans_every = max(0.5, min(orphaned_timeout / 2, 15.0))
        self.orphans = time.monotonic()
        self.peers_every = period_of(orphaned_timeout)  # the registry changes at each heartbeat
        self.peers = time.monotonic()
        self.burst = time.monotonic()


def _waitpid(pid: int, block: bool = False) -> tuple[int, int]:
    try:
        return os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return pid, 0


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
