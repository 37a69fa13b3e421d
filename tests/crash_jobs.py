"""Job classes of the crash-safety regression tests (kept apart from sample_jobs, which the fault harness extends)."""

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
        fd = os.open(self.data["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{what} {os.getpid()} {time.time():.3f}\n".encode())
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
