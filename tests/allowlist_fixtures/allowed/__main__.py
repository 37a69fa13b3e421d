"""The allowed package's script: a worker must never execute it (``allowlist_fixtures.allowed.__main__:X``)."""

from __future__ import annotations

from allowlist_fixtures import mark
from taskscheduler import AbstractJob

mark(f"imported-{__name__}")


class X(AbstractJob):
    def start(self) -> str:
        mark("ran-X")
        return "X"
