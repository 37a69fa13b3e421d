"""Job classes the tests run in real worker processes (imported by queue nodes with --import sample_jobs)."""

from __future__ import annotations

import os
import time
from typing import Any

from taskscheduler import AbstractJob


class Noop(AbstractJob):
    def start(self) -> None:
        return None


class Echo(AbstractJob):
    """Returns its data as the result."""

    def start(self) -> Any:
        return self.data


class Fail(AbstractJob):
    def start(self) -> None:
        raise ValueError(f"boom: {self.data}")


class Sleep(AbstractJob):
    """Sleeps ``data["seconds"]`` (in C, without ever calling update_progress)."""

    def start(self) -> str:
        time.sleep(float(self.data["seconds"]))
        return "slept"


class Progress(AbstractJob):
    def start(self) -> None:
        for step in range(1, 5):
            self.update_progress(step * 25)
            time.sleep(0.05)


class Unencodable(AbstractJob):
    def start(self) -> object:
        return object()


class CountRun(AbstractJob):
    """Appends one line per execution to ``data["path"]``; sleeps ``data.get("seconds", 0)`` first."""

    def start(self) -> None:
        time.sleep(float(self.data.get("seconds", 0)))
        with open(self.data["path"], "a") as out:
            out.write(f"{self.id} {os.getpid()}\n")


class WritePid(AbstractJob):
    """Writes its pid to ``data["path"]``, then sleeps ``data["seconds"]``."""

    def start(self) -> None:
        with open(self.data["path"], "w") as out:
            out.write(str(os.getpid()))
        time.sleep(float(self.data["seconds"]))


class SpawnChildren(AbstractJob):
    """Adds children of ``data["child"]`` (class path) with ``data["child_data"]``, waits for them."""

    def start(self) -> list[str]:
        kids = [
            self.scheduler.add_job(self.data["child"], dict(self.data.get("child_data", {}), parent=self.id))
            for _ in range(int(self.data.get("count", 2)))
        ]
        self.scheduler.wait_for(kids, timeout=30)
        return [str(k.id) for k in kids]


class Exits(AbstractJob):
    """Calls sys.exit(): the job fails, the worker lives on."""

    def start(self) -> None:
        import sys

        sys.exit(3)
