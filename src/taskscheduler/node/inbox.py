"""A queue node's inbox of its manager's reports, read by a thread of its own.

The node's loop may be slow for a while (a large scan of waiting jobs, slow reads): the reports must not wait for
it. A claim the node has not heard of is a lease nobody renews, and the manager fences it half a lease after the
claim; a pipe nobody reads blocks the manager. So a thread reads every report as it comes, lets the node track it
at once (``track``, quick bookkeeping under the node's lock), and queues it for the node's loop, which does the
slow part (records, events, metrics) in the same order.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


class Inbox:
    """Reads ``connection`` until it closes; ``drain()`` returns what came since the last call, oldest first.
    ``wake`` is called after each report and once the connection closed."""

    def __init__(
        self, connection: Connection, track: Callable[[Any], None], wake: Callable[[], None] = lambda: None
    ) -> None:
        self._connection = connection
        self._track = track
        self._wake = wake  # the node's loop sleeps until something comes: each report (and the end) wakes it
        self._reports: deque[Any] = deque()
        self.closed = threading.Event()  # the manager's end is gone: every report it sent has been read
        self._thread = threading.Thread(target=self._read, name="taskscheduler-inbox", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                report = self._connection.recv()  # blocks: an idle node costs nothing here
                self._track(report)
                self._reports.append(report)
                self._wake()
        except (EOFError, OSError, ValueError):
            pass
        finally:
            self.closed.set()
            self._wake()  # the manager is gone: the loop looks at it now

    def drain(self) -> list[Any]:
        reports = []
        while self._reports:
            reports.append(self._reports.popleft())
        return reports

    def wait_closed(self, timeout: float) -> bool:
        """Wait until every report the manager sent has been read (it exited); False on timeout."""
        return self.closed.wait(timeout)
