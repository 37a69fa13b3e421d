"""The dashboard's live feed: one thread per dashboard process follows the job collection's change stream and
fans each change out to every open page (server-sent events), however many pages are open.

The thread also refreshes the node list every :data:`NODES_SECONDS` and, after changes, the counts per status
at most every :data:`COUNTS_SECONDS`. A second thread, while pages are open, reads the flow-control panel every
:data:`~.panels.FLOW_SECONDS` (sent when it changed) and the trends and schedules every :data:`PANELS_SECONDS`
(an hour of events may take a while to group: never in the way of the changes). Reads per dashboard, never per
page or per job.

One change stream serves the thread's whole life: after a failed round (MongoDB unreachable, any error) it
resumes where it was. Whenever changes may have been missed anyway (a failed round, a stream that could not
resume), every page gets a new ``ready`` and reloads what it shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from bson import ObjectId

from ...client.process import Process
from ...client.scheduler import Scheduler
from ...errors import ServerUnavailableError
from ...store import ActivityFeed
from .limits import MAX_STREAMS
from .panels import FLOW_SECONDS, TRENDS_SECONDS, Cached, flow_view, schedules_view, trends_view
from .views import counts_view, error_line, error_wanted, job_row, node_labels, node_view

logger = logging.getLogger("taskscheduler.dashboard")

#: Seconds between two reads of the node registry (nodes refresh their entries with each heartbeat).
NODES_SECONDS = 3.0
#: Shortest pause between two recounts of jobs per status while changes arrive.
COUNTS_SECONDS = 1.0
#: Messages queued for one page at most; a page that falls this far behind is dropped and reconnects.
PAGE_BACKLOG = 2000
#: Longest wait on the change stream before the thread looks at its timers.
POLL_SECONDS = 0.25
#: Seconds between two sends of the trends and schedules to open pages.
PANELS_SECONDS = 15.0
#: Error lines remembered by the id of the run end that recorded them (an end never changes once written).
ERROR_CACHE = 4000

Message = tuple[str, str]  # (event name, JSON data)


class Broadcaster:
    """Follows the job collection in a thread; ``subscribe()`` gives each page its own queue of messages."""

    def __init__(self, scheduler: Scheduler, max_streams: int = MAX_STREAMS) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
        self.max_streams = max_streams
        self._pages: dict[asyncio.Queue[Message | None], asyncio.AbstractEventLoop] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closing = threading.Event()  # the server is stopping: every stream ends, new ones at once
        self._resync = False  # changes may have been missed: tell every page to reload (a new ``ready``)
        self._thread: threading.Thread | None = None
        self._panels_thread: threading.Thread | None = None
        #: worker id -> its node's label, and the nodes as last read (shared with request handlers).
        self.labels: dict[str, str] = {}
        self.nodes: list[dict[str, Any]] = []
        self._served: list[str] | None = None  # the modules the live nodes serve (None: not read yet)
        self._errors: OrderedDict[ObjectId, str | None] = OrderedDict()
        self._errors_lock = threading.Lock()
        self._ready = threading.Event()
        #: The panels beside the table, shared by the endpoints and the thread (each read once per period).
        self.trends = Cached(lambda: trends_view(scheduler), TRENDS_SECONDS)
        self.flow = Cached(lambda: flow_view(scheduler), FLOW_SECONDS)
        self.schedules = Cached(lambda: schedules_view(scheduler), TRENDS_SECONDS)

    def start(self) -> Broadcaster:
        self._thread = threading.Thread(target=self._run, name="taskscheduler-dashboard-feed", daemon=True)
        self._thread.start()
        self._panels_thread = threading.Thread(target=self._panels, name="taskscheduler-dashboard-panels", daemon=True)
        self._panels_thread.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        """Whether the change stream is open (a page subscribing now misses no change made after); False at once
        when the server is stopping."""
        deadline = time.monotonic() + timeout
        while not self._ready.is_set() and not self._closing.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._ready.wait(min(remaining, POLL_SECONDS))
        return self._ready.is_set()

    def stop(self) -> None:
        self.end_streams()
        self._stop.set()
        for thread in (self._thread, self._panels_thread):
            if thread is not None:
                thread.join(5)

    def end_streams(self) -> None:
        """End every page's stream, and any opened from now on (the server is stopping). Never blocks: safe in a
        signal handler, before the server waits for its connections to close."""
        self._closing.set()
        with self._lock:
            pages = list(self._pages.items())
        for queue, loop in pages:
            try:
                loop.call_soon_threadsafe(_end, queue)
            except RuntimeError:  # its loop is closed: nothing left to end
                pass

    def subscribe(self) -> asyncio.Queue[Message | None] | None:
        """A new page's queue of messages, or None when ``max_streams`` pages are subscribed already."""
        queue: asyncio.Queue[Message | None] = asyncio.Queue(PAGE_BACKLOG)
        with self._lock:
            if len(self._pages) >= self.max_streams:
                return None
            self._pages[queue] = asyncio.get_running_loop()
        if self._closing.is_set():
            _end(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Message | None]) -> None:
        with self._lock:
            self._pages.pop(queue, None)

    def publish(self, event: str, data: Any) -> None:
        message = (event, json.dumps(data))
        with self._lock:
            pages = list(self._pages.items())
        for queue, loop in pages:
            loop.call_soon_threadsafe(_offer, queue, message)

    @property
    def watched(self) -> bool:
        """Whether any page is open."""
        with self._lock:
            return bool(self._pages)

    # -- rows of the job table ---------------------------------------------------------------------------------------

    def served_modules(self) -> list[str]:
        """The modules the live nodes serve, as last read (read now when never read)."""
        if self._served is None:
            self.refresh_nodes()
        return list(self._served or [])

    def rows(self, processes: Iterable[Process]) -> list[dict[str, Any]]:
        """Table rows of these jobs, with the error lines they show: read in one query for the ends not read
        before (an end never changes, so each is read once), and the unserved-class warning."""
        processes = list(processes)
        wanted = {p.id: end for p in processes if (end := error_wanted(p)) is not None}
        lines = self.error_lines(wanted.values())
        served = self.served_modules()
        rows = []
        for process in processes:
            end = wanted.get(process.id)
            rows.append(job_row(process, self.labels, served, lines.get(end) if end is not None else None))
        return rows

    def error_lines(self, ends: Iterable[ObjectId]) -> dict[ObjectId, str | None]:
        ends = list(dict.fromkeys(ends))
        with self._errors_lock:
            known = {end: self._errors[end] for end in ends if end in self._errors}
        missing = [end for end in ends if end not in known]
        if missing:
            found = self.store.end_errors(missing)
            with self._errors_lock:
                for end in missing:
                    error_class, message = found.get(end, (None, None))
                    known[end] = self._errors[end] = error_line(error_class, message)
                while len(self._errors) > ERROR_CACHE:
                    self._errors.popitem(last=False)
        return known

    # -- the thread ------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        feed: ActivityFeed | None = None
        try:
            while not self._stop.is_set():
                try:
                    if feed is None:
                        feed = self.store.activity_feed()
                    self._follow(feed)
                except ServerUnavailableError as exc:
                    logger.warning("dashboard feed: MongoDB unreachable; retrying (%s)", str(exc).splitlines()[0])
                    self._resync = True
                    self._stop.wait(1.0)
                except Exception:  # the feed outlives one bad round: log it, resume it
                    logger.exception("dashboard feed failed; resuming it")
                    self._resync = True
                    self._stop.wait(1.0)
        finally:
            if feed is not None:
                feed.close()

    def _follow(self, feed: ActivityFeed) -> None:
        """Rounds until stopped or an error: the feed is the thread's, resumed by the next call."""
        self._ready.set()
        gaps = feed.gaps
        next_nodes = 0.0
        next_counts = 0.0
        counts_due = True
        while not self._stop.is_set():
            change = feed.poll(POLL_SECONDS)
            if feed.gaps != gaps:  # the stream restarted without its resume token: changes were missed
                gaps = feed.gaps
                self._resync = True
            if change is not None and change.document is not None:
                (row,) = self.rows([Process(change.document, self.scheduler)])
                self.publish("job", row)
                counts_due = True
            now = time.monotonic()
            if now >= next_nodes:
                next_nodes = now + NODES_SECONDS
                self.refresh_nodes()
                self.publish("nodes", self.nodes)
            if self._resync:  # MongoDB answers again and the stream is open: pages reload, missing nothing
                self._resync = False
                counts_due = True
                self.publish("ready", {})
            if counts_due and now >= next_counts:
                next_counts = now + COUNTS_SECONDS
                counts_due = False
                self.publish("counts", counts_view(self.store.status_counts()))

    def _panels(self) -> None:
        """The panels' thread: sends them to open pages until stopped; a failed read is logged and tried again."""
        timers = _Timers()
        while not self._stop.is_set():
            try:
                if self.watched:
                    self._send_panels(timers, time.monotonic())
            except ServerUnavailableError as exc:
                logger.warning("dashboard panels: MongoDB unreachable; retrying (%s)", str(exc).splitlines()[0])
                self._stop.wait(1.0)
            except Exception:  # a panel outlives one bad read: log it, try again
                logger.exception("dashboard panels failed; trying again")
                self._stop.wait(1.0)
            self._stop.wait(POLL_SECONDS)

    def _send_panels(self, timers: _Timers, now: float) -> None:
        """The flow panel when it changed, the trends and schedules every :data:`PANELS_SECONDS`."""
        if timers.due("flow", now, FLOW_SECONDS):
            flow = json.dumps(self.flow.get())
            if flow != timers.last_flow:
                timers.last_flow = flow
                self.publish("flow", json.loads(flow))
        if timers.due("trends", now, PANELS_SECONDS):
            self.publish("trends", self.trends.get())
        if timers.due("schedules", now, PANELS_SECONDS):
            self.publish("schedules", self.schedules.get())

    def refresh_nodes(self) -> None:
        found = self.store.live_nodes()
        self.labels = node_labels(found)
        self.nodes = [node_view(node) for node in found]
        self._served = sorted({module for node in self.nodes for module in node["modules"]})


class _Timers:
    """When each panel was last sent by the feed thread (it sends the first at once)."""

    def __init__(self) -> None:
        self.next: dict[str, float] = {}
        self.last_flow: str | None = None

    def due(self, name: str, now: float, period: float) -> bool:
        if now < self.next.get(name, 0.0):
            return False
        self.next[name] = now + period
        return True


def _end(queue: asyncio.Queue[Message | None]) -> None:
    """End a page's stream (in its event loop), whatever it has queued."""
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(None)


def _offer(queue: asyncio.Queue[Message | None], message: Message) -> None:
    """Queue a message for a page (in its event loop); a page too far behind gets an end and reconnects."""
    try:
        queue.put_nowait(message)
    except asyncio.QueueFull:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)
