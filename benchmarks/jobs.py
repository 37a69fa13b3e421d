"""Job classes for the benchmarks."""

from __future__ import annotations

import time

from taskscheduler import AbstractJob


class Noop(AbstractJob):
    def start(self) -> None:
        return None


class Nap(AbstractJob):
    """50 ms of waiting: long enough to sample the worker's memory, short enough to count process overhead."""

    def start(self) -> None:
        time.sleep(0.05)


class Second(AbstractJob):
    """One second of waiting: a slot under a concurrency limit stays busy for a known time."""

    def start(self) -> None:
        time.sleep(1.0)


def noop() -> None:
    """The RQ side of the side-by-side benchmark (RQ runs functions)."""
    return None
