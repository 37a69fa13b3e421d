"""Hello: add a job and wait for its result.

Run against `taskscheduler server`, with a node: `taskscheduler queue --import examples.hello`, then
`python -m examples.hello` (from the repository root).
"""

from __future__ import annotations

import os

from taskscheduler import AbstractJob, Scheduler
from taskscheduler.store import connect


class Hello(AbstractJob):
    def start(self) -> str:
        return f"hello, {self.data}"


def main() -> None:
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    scheduler = Scheduler(connect(uri, os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")))
    process = scheduler.add_job(Hello, "world").wait(timeout=30)
    print(process.status.name, process.result)


if __name__ == "__main__":
    main()
