"""A submodule of the allowed package: its jobs run under its own name only."""

from __future__ import annotations

from typing import Any

from taskscheduler import AbstractJob


class Hello(AbstractJob):
    def start(self) -> str:
        return "Hello"


def hello(data: Any) -> str:
    return "hello"
