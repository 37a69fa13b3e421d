"""The lease keeper of a queue node: a thread that renews its running jobs' leases on the server's clock.

It runs beside the node's loop so that nothing the loop does (a long scan of waiting jobs, a slow change-stream
poll, a full pipe) can delay a renewal: a late renewal would make the manager fence (kill) healthy jobs.
After each renewal it tells the manager how long its jobs may run on (:class:`~taskscheduler.node.protocol.Fence`);
a job found owned by someone else has its worker killed at once (:class:`~taskscheduler.node.protocol.KillJob`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bson import ObjectId

from ..core.lifecycle import Lifecycle
from ..errors import ServerUnavailableError
from .fencing import lease_clock
from .protocol import Fence, KillJob, KillReason

#: Renewals per lease: two may fail before the manager fences the node's jobs at half the lease, and then
#: other nodes wait the other half before they take them over.
RENEWALS_PER_LEASE = 6
#: Longest pause between two renewals, whatever the lease.
MAX_PERIOD_SECONDS = 10.0


def period_of(lease: float) -> float:
    """Seconds between two heartbeats of a node whose lease is ``lease`` seconds."""
    return min(lease / RENEWALS_PER_LEASE, MAX_PERIOD_SECONDS)


class Heartbeat:
    """Renews the leases of the jobs ``running()`` returns (job -> (worker, run)) every lease/6 seconds."""

    def __init__(
        self,
        life: Lifecycle,
        lease: float,
        running: Callable[[], Mapping[ObjectId, tuple[ObjectId, int]]],
        send: Callable[[Any], bool],
        logger: logging.Logger,
        fork_lock: threading.Lock | None = None,
        register: Callable[[], None] | None = None,
    ) -> None:
        self.life = life
        self.lease = lease
        self.period = period_of(lease)
        self.running = running
        self.register = register  # refreshes the node's registry entry, every beat
        self.send = send
        self.logger = logger
        #: Held during a beat; the node takes it to fork, so no child starts with this thread inside pymongo.
        self.fork_lock = fork_lock or threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskscheduler-heartbeat", daemon=True)
        #: Renewals that reached the server (for tests and operators).
        self.renewals = 0
        #: When a beat last reached the server (``time.monotonic()``): the node's metrics show its age.
        self.reached = time.monotonic()

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                with self.fork_lock:
                    self.beat()
            except ServerUnavailableError as exc:
                self.logger.warning("cannot renew leases: MongoDB unreachable (%s)", str(exc).splitlines()[0])
            except Exception:  # a daemon thread outlives one bad beat: log it, go on
                self.logger.exception("lease renewal failed")

    def beat(self) -> None:
        """One renewal of every running job's lease; then the fence moves on, and lost jobs are killed."""
        if self.register is not None:
            try:  # the registry is for operators: its trouble must never stop a renewal
                self.register()
                self.reached = time.monotonic()
            except Exception as exc:
                self.logger.warning(f"could not refresh this node's registry entry: {exc}")
        owners = dict(self.running())
        if not owners:
            return
        sent = lease_clock()
        lost = self.life.heartbeat(owners)
        self.renewals += 1
        self.reached = time.monotonic()
        for job_id in lost:
            self.logger.error(
                f"job {job_id} is no longer ours (its lease ran out and it was taken over or put back); "
                "killing its worker",
                extra={"job_id": job_id},
            )
            self.send(KillJob(job_id, owners[job_id][0], KillReason.LOST, owners[job_id][1]))
        renewed = tuple((job, worker) for job, (worker, _) in owners.items() if job not in lost)
        self.send(Fence(sent + self.lease / 2, renewed))
