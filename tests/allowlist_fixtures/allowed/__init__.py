"""The package a node allows (``--import allowlist_fixtures.allowed``). Besides the jobs it defines it holds, under
names of its own, objects defined elsewhere; none of those may run through a name in this package."""

from __future__ import annotations

import os  # noqa: F401 (a module attribute that is a module: os.system must never run)
from typing import Any

from allowlist_fixtures import elsewhere, mark  # noqa: F401 (a module outside the allow-list, as an attribute)
from allowlist_fixtures.elsewhere import EvilJob, evil_function  # defined elsewhere, imported here
from taskscheduler import AbstractJob

from . import jobs  # noqa: F401 (the allowed submodule, as an attribute)
from .jobs import Hello, hello  # noqa: F401 (defined in .jobs, re-exported here)

mark(f"imported-{__name__}")  # as "allowlist_fixtures.allowed.__init__" only if a name imports it a second time


class Good(AbstractJob):
    """Runs as ``allowlist_fixtures.allowed:Good``."""

    class Inner(AbstractJob):
        """Runs as ``allowlist_fixtures.allowed:Good.Inner`` (a nested class needs the colon form)."""

        def start(self) -> str:
            return "Good.Inner"

    Evil = EvilJob  # an outside class held by an allowed class

    def start(self) -> str:
        return "Good"

    def method(self, data: Any = None) -> str:  # a function, but a method: never a job
        mark("ran-method")
        return "method"


def good(data: Any) -> str:
    return "good"


class _Private(AbstractJob):
    def start(self) -> str:
        mark("ran-_Private")
        return "_Private"


def _private(data: Any) -> str:
    mark("ran-_private")
    return "_private"


Alias = Good  # the same class under a name it was not defined under
alias = good
evil_alias = evil_function
