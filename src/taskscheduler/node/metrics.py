"""Prometheus metrics of one queue node (``queue --metrics-port N``), served at ``/metrics``.

Every series comes from what the node knows anyway: its manager reports each claim and each end of its own
workers' runs (:class:`~taskscheduler.node.protocol.JobClaimed`, ``JobFinished``, ``JobKilled``), the heartbeat thread
records when it last reached the server, the node keeps its worker list. So a run costs the server nothing extra.
The only query is the count of waiting and postponed jobs: one aggregation on the status index, made by the
node's loop at most every :data:`REFRESH_SECONDS` and only while someone scrapes.

Labels are a job's class and a status, never a job id, and only classes this node serves get a label of their
own (:class:`ClassLabels`): every other class name, whatever is stored, counts under ``other``, so the number of
series stays bounded however many class names the job collection holds.

The endpoint (:class:`Endpoint`) is one thread whatever the number of connections: each is a coroutine with a
deadline, and there are at most :data:`MAX_SCRAPE_CONNECTIONS` at once.

``prometheus_client`` is the optional extra ``metrics``; without it, building :class:`NodeMetrics` raises
:class:`~taskscheduler.errors.MissingExtraError` naming the install.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from bson import ObjectId

from ..client.job import load_job_class, serves, split_name
from ..constants import DEFAULT_METRICS_HOST, JobStatus
from ..errors import ConfigurationError, InvalidArgumentError, InvalidJobError, MissingExtraError
from ..store.entries import CountRow

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

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
#: The ``class`` label of every class without one of its own.
OTHER = "other"
#: Classes that get a label of their own on one node at most (then the rest count under ``other``).
MAX_CLASS_LABELS = 200
#: Longest class name that can have a label of its own (no real one comes close; a longer one is ``other``
#: unexamined, so neither a series nor the memory below can be made large by one long stored name).
MAX_LABEL_CHARS = 500
#: Class names remembered as having no label of their own, so that a flood of made-up names is judged once each
#: (forgotten all at once beyond this many).
MAX_REFUSED_NAMES = 10_000
#: Seconds a scrape connection may take to send its request and read the answer; then it is closed.
SCRAPE_TIMEOUT_SECONDS = 5.0
#: Connections the endpoint serves at once; more are closed as soon as they are accepted.
MAX_SCRAPE_CONNECTIONS = 32
#: Longest request head (request line and headers) the endpoint reads, in bytes.
MAX_REQUEST_BYTES = 8192


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


class ClassLabels:
    """The ``class`` label of a job class name on a node: the name itself for a class the node serves, else
    :data:`OTHER`. The node serves a class when the name is one its workers would run: a class or function this
    process has loaded already from a module of the node's allow-list (its ``--import`` modules and what they
    import), defined there under exactly that name; or one of whose runs ended DONE on this node (its worker
    loaded it). Nothing is imported to decide. At most :data:`MAX_CLASS_LABELS` names get a label of their own.
    Used by the node's loop only.
    """

    def __init__(self, modules: Iterable[str]) -> None:
        self.modules = tuple(modules)
        self._known: set[str] = set()
        self._refused: set[str] = set()

    def __call__(self, job_class: object) -> str:
        if not isinstance(job_class, str) or len(job_class) > MAX_LABEL_CHARS or job_class in self._refused:
            return OTHER
        if job_class in self._known or (len(self._known) < MAX_CLASS_LABELS and self._loaded(job_class)):
            self._known.add(job_class)
            return job_class
        self._refuse(job_class)
        return OTHER

    def ran(self, job_class: str) -> None:
        """A run of ``job_class`` ended DONE on this node: its worker loaded it, so its next runs get its label."""
        if (
            job_class not in self._known
            and len(self._known) < MAX_CLASS_LABELS
            and len(job_class) <= MAX_LABEL_CHARS
            and serves(job_class, self.modules)
        ):
            self._refused.discard(job_class)
            self._known.add(job_class)

    def _loaded(self, job_class: str) -> bool:
        try:
            module, _ = split_name(job_class)
        except InvalidArgumentError:
            return False
        # Only a module this process holds already: resolving then imports nothing, runs no module code.
        if not module or sys.modules.get(module) is None or not serves(job_class, self.modules):
            return False
        try:
            load_job_class(job_class, self.modules)
        except InvalidJobError:
            return False
        return True

    def _refuse(self, job_class: str) -> None:
        if len(self._refused) >= MAX_REFUSED_NAMES:
            self._refused.clear()
        self._refused.add(job_class)


class NodeMetrics:
    """The series of one node, in a registry of its own (never prometheus_client's global one).

    ``workers()`` returns (busy, idle); ``heartbeat_age()`` the seconds since the node last reached the server
    with its heartbeat; ``count_jobs()`` rows ``{"class", "status", "count"}`` of waiting and postponed jobs;
    ``modules`` is the node's allow-list (its classes get labels of their own: :class:`ClassLabels`).
    The counters are fed by the node's loop; the gauges are read at scrape time.
    """

    def __init__(
        self,
        port: int,
        workers: Callable[[], tuple[int, int]],
        heartbeat_age: Callable[[], float],
        count_jobs: Callable[[], Iterable[Mapping[str, Any]]],
        host: str = DEFAULT_METRICS_HOST,
        modules: Iterable[str] = (),
    ) -> None:
        require_prometheus_client()
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.port = port
        self.host = host
        self.labels = ClassLabels(modules)
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
        self.lost = Counter(
            "taskscheduler_claims_lost",
            "Claims this node's workers tried and lost (another worker had the job first, or it could not run).",
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
        # job -> (class, its label, claimed at: monotonic); a run ends under the label it started with
        self._claims: dict[ObjectId, tuple[str, str, float]] = {}
        self._endpoint: Endpoint | None = None
        self._next_count = 0.0

    # -- serving ---------------------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Start the HTTP endpoint (a daemon thread). ConfigurationError when the address cannot be bound."""
        self._endpoint = Endpoint(self.registry, self.host, self.port)

    @property
    def listener(self) -> socket.socket | None:
        """The listening socket, which a forked child closes (it must not keep the port bound)."""
        return self._endpoint.socket if self._endpoint is not None else None

    @property
    def address(self) -> tuple[str, int] | None:
        """The (host, port) the endpoint listens on (port 0 asks for a free one)."""
        return self._endpoint.address if self._endpoint is not None else None

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None

    # -- what the node reports -------------------------------------------------------------------------------------

    def run_started(self, job_id: ObjectId, job_class: str) -> None:
        label = self.labels(job_class)
        self._claims[job_id] = (job_class, label, time.monotonic())
        self.started.labels(label).inc()

    def claim_lost(self) -> None:
        self.lost.inc()

    def run_ended(self, job_id: ObjectId, status: int | None) -> None:
        """A run of ours ended (``status`` None: put back to WAITING). A run whose claim we never heard of (the
        node started after it) counts nothing: its start was never counted either."""
        claim = self._claims.pop(job_id, None)
        if claim is None:
            return
        job_class, label, since = claim
        self.ended.labels(label, status_label(status)).inc()
        self.duration.labels(label).observe(time.monotonic() - since)
        if status == JobStatus.DONE:
            self.labels.ran(job_class)

    def refresh(self) -> None:
        """Count waiting and postponed jobs if someone scraped lately and the last count is old (node loop)."""
        now = time.monotonic()
        if now < self._next_count or now - self._jobs.scraped > SCRAPED_LATELY_SECONDS:
            return
        self._next_count = now + REFRESH_SECONDS
        self._jobs.rows = job_count_rows(self._count_jobs(), self.labels)


def job_count_rows(rows: Iterable[Mapping[str, Any]], labels: Callable[[object], str]) -> list[tuple[str, str, float]]:
    """``(class label, status name, count)`` of waiting and postponed jobs, the counts of classes without a label
    of their own summed under ``other``; rows that are not such a count (a malformed document's) are left out."""
    totals: dict[tuple[str, str], float] = {}
    for row in map(CountRow, rows):
        status, count = row.status, row.count
        if isinstance(status, bool) or status not in (JobStatus.WAITING, JobStatus.POSTPONED):
            continue
        if isinstance(count, bool) or not isinstance(count, (int, float)):
            continue
        key = (labels(row.job_class), JobStatus(int(status)).name.lower())
        totals[key] = totals.get(key, 0.0) + float(count)
    return [(label, status, count) for (label, status), count in sorted(totals.items())]


class _JobCounts:
    """``taskscheduler_jobs{class, status}`` from the node loop's last count (scrapes never wait on MongoDB)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []
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
        for label, status, count in self.rows:
            family.add_metric([label, status], count)
        yield family


class Endpoint:
    """``/metrics`` over HTTP from one daemon thread running an event loop, whatever the number of connections.

    Every connection is a coroutine that must send its request within :data:`SCRAPE_TIMEOUT_SECONDS` (and read
    the answer as fast); at most :data:`MAX_SCRAPE_CONNECTIONS` are served at once, the others closed at once. So
    half-open or slow connections cost neither threads nor memory beyond that, and free their places by
    themselves. Bound at construction: ConfigurationError when ``host:port`` cannot be.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        try:
            family, _, _, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            self.socket = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(64)
        except OSError as exc:
            self.socket.close()
            raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self.address: tuple[str, int] = self.socket.getsockname()[:2]
        self._open = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskscheduler-metrics", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)

    def close(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self.socket.close()

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        server = None
        try:
            server = loop.run_until_complete(
                asyncio.start_server(self._answer, sock=self.socket, limit=MAX_REQUEST_BYTES)
            )
            loop.call_soon(self._ready.set)
            loop.run_forever()
        finally:
            self._ready.set()
            if server is not None:
                server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_SCRAPE_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SCRAPE_TIMEOUT_SECONDS)
            writer.write(self._reply(head))
            await asyncio.wait_for(writer.drain(), SCRAPE_TIMEOUT_SECONDS)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # too slow, too long or gone: closed without an answer
        finally:
            self._open -= 1
            writer.close()

    def _reply(self, head: bytes) -> bytes:
        """The whole HTTP answer to a request head."""
        from prometheus_client.exposition import choose_encoder

        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines[1:])}
        if method not in ("GET", "HEAD"):
            return _http(405, "text/plain; charset=utf-8", b"only GET /metrics\n", method == "HEAD")
        if path not in ("/", "/metrics"):
            return _http(404, "text/plain; charset=utf-8", b"metrics are at /metrics\n", method == "HEAD")
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        try:
            body = encoder(self.registry)
        except Exception as exc:  # a collector failed: say so, and keep serving
            return _http(500, "text/plain; charset=utf-8", f"{type(exc).__name__}\n".encode(), method == "HEAD")
        return _http(200, content_type, body, method == "HEAD")


def _http(status: int, content_type: str, body: bytes, head_only: bool = False) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}[status]
    fields = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    return f"HTTP/1.1 {status} {reason}\r\n{fields}\r\n".encode("latin-1") + (b"" if head_only else body)
