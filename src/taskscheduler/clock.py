"""The server's clock as seen from this process, without a server command per reading.

Leases are compared on the server (``$$NOW``), but some times are decided here: when a retry, interval or cron
run starts next, whether a new job is due or postponed, when a postponed job is due, and the ``started``,
``ended`` and ``created`` times stored on a job. A node whose clock is minutes off must neither run jobs early
nor late (SPEC 4), so these come from the server's clock: read once with ``hello`` and then carried forward on
this machine's monotonic clock, which no clock step, NTP correction or faked wall clock moves. The reading is
taken again when it is older than :data:`REFRESH_SECONDS`, or when the wall clock moved apart from the
monotonic one (a suspended machine: the monotonic clock stood still meanwhile).

One reading holds for every process of a machine (the monotonic clock is system-wide), but each process asks
through its own Store: a MongoClient must not cross a fork.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .errors import ServerUnavailableError

logger = logging.getLogger("taskscheduler.clock")

#: Seconds a reading of the server's clock is carried forward before it is taken again (the monotonic clock
#: drifts by parts per million, so a minute keeps it within milliseconds, for one ``hello`` a minute).
REFRESH_SECONDS = 60.0
#: A reading whose round trip took longer (seconds; e.g. it opened the connection) is taken once more, and the
#: tighter one kept: the error of a reading is half its round trip.
TIGHT_ROUND_TRIP = 0.02
#: Seconds between attempts to refresh a reading while the server does not answer (the old one serves).
RETRY_SECONDS = 5.0
#: Seconds a refresh may take before the old reading is kept (a first reading waits as long as the client does).
REFRESH_TIMEOUT = 2.0
#: Seconds the wall clock may move apart from the monotonic one before the reading is taken again: more than
#: any NTP slew in a refresh period, less than any suspend worth noticing.
MAX_WALL_DRIFT = 0.5

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: Asks the server for its clock; the argument bounds the call in seconds (None: the client's own timeouts).
Ask = Callable[[float | None], datetime]


@dataclass(frozen=True)
class _Reading:
    server: float  # the server's clock, unix seconds, as read
    anchor: float  # our monotonic clock at the middle of the round trip
    error: float  # how far off ``server`` at ``anchor`` may be: half the round trip, and half a millisecond
    wall: float  # our wall clock at ``anchor`` (to notice a suspend)
    retry_at: float  # monotonic time before which it is not refreshed (set after a failed refresh)


class ServerClock:
    """The server's clock, read with one command on first use and again every :data:`REFRESH_SECONDS`."""

    def __init__(
        self,
        ask: Ask,
        refresh: float = REFRESH_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._ask = ask
        self._refresh = refresh
        self._monotonic = monotonic
        self._wall = wall
        self._reading: _Reading | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def time(self) -> float:
        """Now on the server's clock, in unix seconds (the best estimate)."""
        reading, now = self._current()
        return reading.server + (now - reading.anchor)

    def earliest(self) -> float:
        """The earliest the server's clock can read now (unix seconds): what decides whether a time has come."""
        reading, now = self._current()
        return reading.server + (now - reading.anchor) - reading.error

    def reached(self, at: float) -> bool:
        """Whether the server's clock has surely reached ``at`` (unix seconds): a run due then may start."""
        return at <= self.earliest()

    def now(self, earliest: bool = False) -> datetime:
        """Now on the server's clock (with ``earliest``, the earliest it can read now): an aware UTC datetime in
        whole milliseconds (what BSON stores), rounded down."""
        seconds = self.earliest() if earliest else self.time()
        return _EPOCH + timedelta(milliseconds=math.floor(seconds * 1000))

    def _current(self) -> tuple[_Reading, float]:
        reading, now = self._reading, self._monotonic()
        if reading is None or self._outdated(reading, now):
            reading = self._measure(reading)
            now = self._monotonic()
        return reading, now

    def _outdated(self, reading: _Reading, now: float) -> bool:
        if now < reading.retry_at:
            return False
        elapsed = now - reading.anchor
        return elapsed >= self._refresh or abs(self._wall() - reading.wall - elapsed) > MAX_WALL_DRIFT

    def _measure(self, old: _Reading | None) -> _Reading:
        if self._pid != os.getpid():  # forked while another thread held the lock: a lock of our own
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            current = self._reading
            if current is not None and current is not old:  # another thread took it meanwhile
                return current
            try:
                reading = self._read(REFRESH_TIMEOUT if old is not None else None)
            except ServerUnavailableError as exc:
                if old is None:
                    raise
                # The old reading stays good to milliseconds for a long while: keep it, ask again later.
                logger.warning("cannot refresh the server's clock; keeping the last reading: %s", exc)
                reading = _Reading(old.server, old.anchor, old.error, old.wall, self._monotonic() + RETRY_SECONDS)
            self._reading = reading
            return reading

    def _read(self, timeout: float | None) -> _Reading:
        best = self._sample(timeout)
        if best.error > TIGHT_ROUND_TRIP / 2:
            try:
                again = self._sample(timeout)
            except ServerUnavailableError:
                return best  # the first one serves
            best = min(best, again, key=lambda reading: reading.error)
        return best

    def _sample(self, timeout: float | None) -> _Reading:
        before = self._monotonic()
        # The server's clock reads in whole milliseconds: it was somewhere in the millisecond after its answer.
        server = self._ask(timeout).timestamp() + 0.0005
        after = self._monotonic()
        anchor = (before + after) / 2
        error = (after - before) / 2 + 0.0005
        return _Reading(server, anchor, error, self._wall() - (after - anchor), anchor)
