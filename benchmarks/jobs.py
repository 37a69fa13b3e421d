"""Job classes for the benchmarks."""

from __future__ import annotations

from taskscheduler import AbstractJob


class Noop(AbstractJob):
    def start(self) -> None:
        return None
