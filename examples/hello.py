"""Hello: add a job and wait for its result.

Run against `taskscheduler server`, with a node: `taskscheduler queue --import examples.hello`, then
`python -m examples.hello` (from the repository root).
"""

from __future__ import annotations

import os
from typing import Any

from pymongo import MongoClient

from taskscheduler import AbstractJob, Scheduler


class Hello(AbstractJob):
    def start(self) -> str:
        return f"hello, {self.data}"


#: Jobs are named by module: run as ``python -m examples.hello``, this file is ``__main__``,
#: which no worker can import.
MODULE = "examples.hello"


def database() -> Any:
    """The database named by the same variables the CLI reads (a local server by default)."""
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    return MongoClient(uri)[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]


def main() -> None:
    scheduler = Scheduler(database())
    process = scheduler.add_job(f"{MODULE}:Hello", "world").wait(timeout=30)
    print(process.status.name, process.result)


if __name__ == "__main__":
    main()
