"""Prometheus metrics of one queue node (``queue --metrics-port N``), served at ``/metrics``.

Every series comes from what the node knows anyway: its manager reports each claim and each end of its own
workers' runs (:class:`~taskscheduler.protocol.JobClaimed`, ``JobFinished``, ``JobKilled``), the heartbeat thread
records when it last reached the server, the node keeps its worker list. So a run costs the server nothing extra.
The only query is the count of waiting and postponed jobs: one aggregation on the status index, made by the
node's loop at most every :data:`REFRESH_SECONDS` and only while someone scrapes.

Labels are a job's class and a status, never a job id: the number of series stays bounded.
``prometheus_client`` is the optional extra ``metrics``; without it, building :class:`NodeMetrics` raises
:class:`~taskscheduler.errors.MissingExtraError` naming the install.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from bson import ObjectId

from .constants import JobStatus
from .errors import ConfigurationError, MissingExtraError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

#: The install that brings this module's dependency.
METRICS_EXTRA = 'pip install "mongodb-task-scheduler[metrics]"'
#: Longest a count of waiting and postponed jobs is reused before the node's loop counts again.
REFRESH_SECONDS = 5.0
#: The node counts waiting jobs only while it was scraped this recently (nobody looks: no query).
SCRAPED_LATELY_SECONDS = 120.0
#: Run duration buckets in seconds: from sub-second jobs to hour-long ones.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: The ``status`` label of a run that did not end but was put back to WAITING (node stopped, worker died,
#: lease lost); every other ended run is labelled with the job status it ended in.
RELEASED = "released"


def require_prometheus_client() -> None:
    """MissingExtraError (a ConfigurationError) unless ``prometheus_client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"queue --metrics-port needs prometheus_client: {METRICS_EXTRA}") from None


def status_label(status: int | None) -> str:
    """The ``status`` label of an ended run: ``done``, ``failed``, ``timeout``, ``canceled`` or ``released``."""
    if status is None or status < JobStatus.DONE:
        return RELEASED
    return JobStatus(status).name.lower()


class NodeMetrics:
    """The series of one node, in a registry of its own (never prometheus_client's global one).

    ``workers()`` returns (busy, idle); ``heartbeat_age()`` the seconds since the node last reached the server
    with its heartbeat; ``count_jobs()`` rows ``{"class", "status", "count"}`` of waiting and postponed jobs.
    The counters are fed by the node's loop; the gauges are read at scrape time.
    """

    def __init__(
        self,
        port: int,
        workers: Callable[[], tuple[int, int]],
        heartbeat_age: Callable[[], float],
        count_jobs: Callable[[], Iterable[Mapping[str, Any]]],
        host: str = "",
    ) -> None:
        require_prometheus_client()
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.port = port
        self.host = host
        self._count_jobs = count_jobs
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = Counter(
            "taskscheduler_runs_started", "Runs this node's workers claimed.", ["class"], registry=self.registry
        )
        self.ended = Counter(
            "taskscheduler_runs_ended",
            "Runs of this node's workers that ended, by the status they ended in (released: put back to waiting).",
            ["class", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "taskscheduler_run_duration_seconds",
            "Seconds from a run's claim to its end, for runs of this node's workers.",
            ["class"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        busy = Gauge("taskscheduler_workers_busy", "This node's workers running a job.", registry=self.registry)
        idle = Gauge("taskscheduler_workers_idle", "This node's workers waiting for a job.", registry=self.registry)
        busy.set_function(lambda: float(workers()[0]))
        idle.set_function(lambda: float(workers()[1]))
        lag = Gauge(
            "taskscheduler_heartbeat_lag_seconds",
            "Seconds since this node's heartbeat last reached the server (registry refresh and lease renewal).",
            registry=self.registry,
        )
        lag.set_function(heartbeat_age)
        self._jobs = _JobCounts()
        self.registry.register(self._jobs)
        self._claims: dict[ObjectId, tuple[str, float]] = {}  # job -> (class, claimed at, monotonic)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._next_count = 0.0

    # -- serving ---------------------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Start the HTTP endpoint (a daemon thread). ConfigurationError when the port cannot be bound."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(self.port, self.host or "0.0.0.0", self.registry)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on port {self.port}: {exc.strerror or exc}") from exc

    @property
    def listener(self) -> socket.socket | None:
        """The listening socket, which a forked child closes (it must not keep the port bound)."""
        return self._server.socket if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- what the node reports -------------------------------------------------------------------------------------

    def run_started(self, job_id: ObjectId, job_class: str) -> None:
        self._claims[job_id] = (job_class, time.monotonic())
        self.started.labels(job_class).inc()

    def run_ended(self, job_id: ObjectId, status: int | None) -> None:
        """A run of ours ended (``status`` None: put back to WAITING). A run whose claim we never heard of (the
        node started after it) counts nothing: its start was never counted either."""
        claim = self._claims.pop(job_id, None)
        if claim is None:
            return
        job_class, since = claim
        self.ended.labels(job_class, status_label(status)).inc()
        self.duration.labels(job_class).observe(time.monotonic() - since)

    def refresh(self) -> None:
        """Count waiting and postponed jobs if someone scraped lately and the last count is old (node loop)."""
        now = time.monotonic()
        if now < self._next_count or now - self._jobs.scraped > SCRAPED_LATELY_SECONDS:
            return
        self._next_count = now + REFRESH_SECONDS
        self._jobs.rows = [dict(row) for row in self._count_jobs()]


class _JobCounts:
    """``taskscheduler_jobs{class, status}`` from the node loop's last count (scrapes never wait on MongoDB)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.scraped = -SCRAPED_LATELY_SECONDS * 2  # never

    def describe(self) -> list[Metric]:
        return []  # no fixed description: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        self.scraped = time.monotonic()
        family = GaugeMetricFamily(
            "taskscheduler_jobs",
            f"Jobs of the cluster waiting or postponed (counted at most every {REFRESH_SECONDS:g} s while scraped).",
            labels=["class", "status"],
        )
        for row in self.rows:
            family.add_metric([str(row["class"]), JobStatus(int(row["status"])).name.lower()], float(row["count"]))
        yield family
