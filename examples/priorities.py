"""Priorities: with one worker busy, a burst of low-priority jobs waits and a later urgent job goes first.

`taskscheduler queue --import examples.priorities --pm static --min-children 1 --max-children 1`, then
`python -m examples.priorities`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pymongo import MongoClient

from taskscheduler import AbstractJob, JobStatus, Scheduler


class Work(AbstractJob):
    """Notes when it started, then works for ``data["seconds"]``."""

    def start(self) -> float:
        started = time.time()
        time.sleep(float(self.data.get("seconds", 0.1)))
        return started


MODULE = "examples.priorities"


def database() -> Any:
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    return MongoClient(uri, tz_aware=True)[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]


def main() -> None:
    scheduler = Scheduler(database())
    busy = scheduler.add_job(f"{MODULE}:Work", {"name": "already running", "seconds": 1.0})
    deadline = time.monotonic() + 30
    while busy.refresh().status != JobStatus.PROCESSING and time.monotonic() < deadline:
        time.sleep(0.05)  # a demo's patience, not synchronisation: the node may still be starting
    jobs = [scheduler.add_job(f"{MODULE}:Work", {"name": f"bulk {n}"}, priority=-10) for n in range(5)]
    jobs.append(scheduler.add_job(f"{MODULE}:Work", {"name": "urgent"}, priority=90))
    scheduler.wait_for([busy, *jobs], timeout=60)
    order = sorted([busy, *jobs], key=lambda p: p.result)
    print("start order:", ", ".join(p.data["name"] for p in order))


if __name__ == "__main__":
    main()
