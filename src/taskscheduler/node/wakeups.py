"""What wakes a queue node's loop: its change stream, read by a thread of its own, and its manager's reports.

The loop used to read the stream itself, a few hundred milliseconds at a time, and ran its steps after each read
whether anything had happened or not: an idle node woke five times a second. Now a reader thread waits on the
stream (the server answers at once when something changes) and queues what it sees, in the stream's order; the
inbox thread queues a wake-up for each manager report; and the loop sleeps until one of those comes or its next
timer is due.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

from ..store import StatusChange, StatusFeed

logger = logging.getLogger("taskscheduler.queue")

#: Longest one read of the stream waits on the server while nothing changes (it answers at once when something
#: does). A node's stop waits for the read in progress, so this bounds what the reader adds to a stop.
READ_SECONDS = 1.0
#: Pause after a read of the stream failed in a way the feed could not ride out itself, before the next.
ERROR_BACKOFF_SECONDS = 0.5


class Kind(enum.Enum):
    CHANGE = "change"  #: a job's status change (``change``)
    FLOW = "flow"  #: the pauses or limits changed: read them before any change queued after this
    PEERS = "peers"  #: a node joined or left the registry: read it again
    GAP = "gap"  #: the stream restarted without its resume token: changes may be missing, look at what is stored
    WAKE = "wake"  #: something else needs the loop (a manager report)


class Wakeup(NamedTuple):
    kind: Kind
    change: StatusChange | None = None


class Wakeups:
    """The queue the node's loop sleeps on, and the reader thread that fills it from ``feed`` (and closes it when
    it ends)."""

    def __init__(self, feed: StatusFeed) -> None:
        self.feed = feed
        #: Held during each read: the node takes it to fork, so that no child starts with this thread in pymongo.
        #: Its own lock, not the heartbeat's: a beat never waits for a read.
        self._read_lock = threading.Lock()
        self._forking = threading.Event()  # set while the node waits for the lock: reads wait (no starving it)
        self._queue: queue.SimpleQueue[Wakeup] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="taskscheduler-stream", daemon=True)

    def start(self) -> Wakeups:
        self._thread.start()
        return self

    def halt(self) -> None:
        """Ask the reader to stop after the read in progress (without waiting for it)."""
        self._stop.set()
        self.wake()

    def stop(self) -> None:
        """Stop reading; returns once the read in progress has ended (within READ_SECONDS or so)."""
        self.halt()
        if self._thread.is_alive():
            self._thread.join()

    @contextlib.contextmanager
    def forking(self) -> Iterator[None]:
        """Keep this thread out of pymongo while the node forks its manager (waits for the read in progress)."""
        self._forking.set()
        try:
            with self._read_lock:
                yield
        finally:
            self._forking.clear()

    def wake(self) -> None:
        self._queue.put(Wakeup(Kind.WAKE))

    def next(self, timeout: float) -> Wakeup | None:
        """The next wake-up, waiting at most ``timeout`` seconds for it (None then)."""
        try:
            return self._queue.get(timeout=max(0.0, timeout)) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _read(self) -> None:
        try:
            self._read_until_stopped()
        finally:
            self.feed.close()  # the feed is this thread's: nobody closes it under a read in progress

    def _read_until_stopped(self) -> None:
        feed = self.feed
        gaps, flows, peers = feed.gaps, feed.flow_changes, feed.peer_changes
        while not self._stop.is_set():
            while self._forking.is_set() and not self._stop.is_set():
                time.sleep(0.01)
            try:
                with self._read_lock:
                    change = feed.poll(READ_SECONDS)
            except Exception:  # a reader outlives one bad read (the feed rides out outages by itself)
                logger.exception("reading the change stream failed; retrying")
                time.sleep(ERROR_BACKOFF_SECONDS)
                continue
            if feed.gaps != gaps:
                gaps = feed.gaps
                self._queue.put(Wakeup(Kind.GAP))
            if feed.flow_changes != flows:  # a poll returns at each change of the controls, in the stream's order
                flows = feed.flow_changes
                self._queue.put(Wakeup(Kind.FLOW))
            if feed.peer_changes != peers:
                peers = feed.peer_changes
                self._queue.put(Wakeup(Kind.PEERS))
            if change is not None:
                self._queue.put(Wakeup(Kind.CHANGE, change))
