"""Retries and timeouts: a failing job retried twice, and a job killed by its timeout.

`taskscheduler queue --import examples.retries_timeouts`, then `python -m examples.retries_timeouts`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pymongo import MongoClient

from taskscheduler import AbstractJob, JobStatus, Scheduler


class Unlucky(AbstractJob):
    def start(self) -> None:
        raise RuntimeError("no luck today")


class TooSlow(AbstractJob):
    def start(self) -> None:
        time.sleep(3600)


#: Jobs are named by module: run as ``python -m examples.retries_timeouts``, this file is ``__main__``,
#: which no worker can import.
MODULE = "examples.retries_timeouts"


def database() -> Any:
    """The database named by the same variables the CLI reads (a local server by default)."""
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    return MongoClient(uri)[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]


def main() -> None:
    scheduler = Scheduler(database())
    slow = scheduler.add_job(f"{MODULE}:TooSlow", timeout=2)
    unlucky = scheduler.add_job(f"{MODULE}:Unlucky", retry=2, retry_interval=1)
    slow.wait(timeout=30)
    print("slow job:", slow.status.name, slow.error["message"] if slow.error else "")
    unlucky.wait(timeout=30)  # one job, one id, through all its runs
    for run in unlucky.runs():
        print(f"unlucky {unlucky.id} run {run['run']}:", JobStatus(run["status"]).name, run["error"]["message"])


if __name__ == "__main__":
    main()
