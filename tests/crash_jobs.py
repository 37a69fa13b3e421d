"""Job classes of the crash, outage and self-fencing tests (kept apart from sample_jobs, which the fault harness
extends): huge outcomes, progress through an outage, logged starts and ends, a BaseException, a ticker."""

from __future__ import annotations

import os
import time

from taskscheduler import AbstractJob

#: Bigger than a BSON document may be (16 MiB).
HUGE = 17 * 1024 * 1024


class HugeResult(AbstractJob):
    def start(self) -> str:
        return "x" * HUGE


class HugeError(AbstractJob):
    def start(self) -> None:
        raise RuntimeError("y" * HUGE)


class ProgressThroughOutage(AbstractJob):
    """Reports progress while ``data["flag"]`` exists (the test's outage), then returns."""

    def start(self) -> str:
        deadline = time.monotonic() + 20
        while os.path.exists(self.data["flag"]) and time.monotonic() < deadline:
            self.update_progress(50)
            time.sleep(0.05)
        self.update_progress(100)
        return "survived"


class StartLog(AbstractJob):
    """Appends ``start <pid> <time>`` when it starts, sleeps ``data["seconds"]``, then ``end <pid> <time>``."""

    def start(self) -> None:
        self._line("start")
        time.sleep(float(self.data["seconds"]))
        self._line("end")

    def _line(self, what: str) -> None:
        append_line(self.data["path"], f"{what} {os.getpid()} {time.time():.3f}")


def append_line(path: str, line: str) -> None:
    """One line appended in one write (lines of several processes never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def read_log(path: str) -> list[tuple[str, int, float]]:
    if not os.path.exists(path):
        return []
    out: list[tuple[str, int, float]] = []
    with open(path) as lines:
        for line in lines:
            what, pid, at = line.split()
            out.append((what, int(pid), float(at)))
    return out


#: What a Ticker's subprocess runs: a line ``sub <pid> <monotonic time>`` every 50 ms, until it is killed.
SUB_TICKS = (
    "import os, sys, time\n"
    "while True:\n"
    "    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
    "    os.write(fd, f'sub {os.getpid()} {time.monotonic():.4f}\\n'.encode())\n"
    "    os.close(fd)\n"
    "    time.sleep(0.05)\n"
)


class Ticker(AbstractJob):
    """Writes ``start``, then ``tick`` every 50 ms for ``data["seconds"]``, then ``end`` to ``data["log"]``, each
    ``<what> <pid> <time.monotonic()>`` (one clock for every process of the machine). With ``data["spawn"]`` it
    first starts a subprocess that ticks as ``sub`` forever (in a session of its own with ``data["new_session"]``)."""

    def start(self) -> str:
        if self.data.get("spawn"):
            import subprocess
            import sys

            subprocess.Popen(
                [sys.executable, "-c", SUB_TICKS, self.data["log"]],
                start_new_session=bool(self.data.get("new_session")),
                stdin=subprocess.DEVNULL,
            )
        self._line("start")
        end = time.monotonic() + float(self.data.get("seconds", 0))
        while time.monotonic() < end:
            time.sleep(0.05)
            self._line("tick")
        self._line("end")
        return "ticked"

    def _line(self, what: str) -> None:
        append_line(self.data["log"], f"{what} {os.getpid()} {time.monotonic():.4f}")


def read_ticks(path: str) -> list[tuple[str, int, float]]:
    """A Ticker's log: (what, pid, monotonic time) per line."""
    return read_log(path)


class Abort(BaseException):
    """Like asyncio.CancelledError, gevent.Timeout or trio.Cancelled: an exception that is not an Exception."""


class RaisesBaseException(AbstractJob):
    def start(self) -> None:
        raise Abort("job gave up")


class EndThenLinger(AbstractJob):
    """Appends ``start`` and ``end`` lines (its work), then lingers ``data["linger"]`` s before returning."""

    def start(self) -> str:
        self._line("start")
        self._line("end")
        time.sleep(float(self.data["linger"]))
        return "done"

    def _line(self, what: str) -> None:
        append_line(self.data["path"], f"{what} {os.getpid()}")
