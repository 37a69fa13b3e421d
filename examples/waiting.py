"""Waiting for jobs: spool a batch and wait for all of them, failing fast on the first failure.

`taskscheduler queue --import examples.waiting --max-children 4`, then `python -m examples.waiting`.
"""

from __future__ import annotations

import os
from typing import Any

from pymongo import MongoClient

from taskscheduler import AbstractJob, Scheduler
from taskscheduler.errors import JobFailedError


class Square(AbstractJob):
    def start(self) -> int:
        if self.data < 0:
            raise ValueError("negative input")
        return int(self.data) ** 2


#: Jobs are named by module: run as ``python -m examples.waiting``, this file is ``__main__``,
#: which no worker can import.
MODULE = "examples.waiting"


def database() -> Any:
    """The database named by the same variables the CLI reads (a local server by default)."""
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    return MongoClient(uri)[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]


def main() -> None:
    scheduler = Scheduler(database())
    batch = [scheduler.add_job(f"{MODULE}:Square", n) for n in range(10)]
    scheduler.wait_for(batch, timeout=60)
    print("squares:", [p.result for p in batch])
    try:
        scheduler.wait_for([scheduler.add_job(f"{MODULE}:Square", -1)], Scheduler.OPTION_THROW_EXCEPTION, timeout=60)
    except JobFailedError as exc:
        print("failed as expected:", exc.error["message"] if exc.error else exc)


if __name__ == "__main__":
    main()
