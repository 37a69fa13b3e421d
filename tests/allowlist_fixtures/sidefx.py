"""A module with a side effect on import: a producer naming it (``add_job``) must never import it."""

from __future__ import annotations

from allowlist_fixtures import mark
from taskscheduler import AbstractJob

mark(f"imported-{__name__}")


class Nothing(AbstractJob):
    def start(self) -> None:
        mark("ran-Nothing")
