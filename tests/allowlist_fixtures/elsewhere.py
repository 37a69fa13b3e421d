"""Jobs outside every allow-list of the tests: the allowed package imports them, and they must never run."""

from __future__ import annotations

from typing import Any

from allowlist_fixtures import mark
from taskscheduler import AbstractJob


class EvilJob(AbstractJob):
    def start(self) -> str:
        mark("ran-EvilJob")
        return "EvilJob"


def evil_function(data: Any) -> str:
    mark("ran-evil_function")
    return "evil_function"
