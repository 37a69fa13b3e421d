"""Progress and events: watch a job's status changes while it reports progress.

`taskscheduler queue --import examples.progress_events`, then `python -m examples.progress_events`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pymongo import MongoClient

from taskscheduler import AbstractJob, JobStatus, Process, Scheduler


class Steps(AbstractJob):
    def start(self) -> None:
        for step in range(1, 6):
            time.sleep(0.3)
            self.update_progress(step * 20)


#: Jobs are named by module: run as ``python -m examples.progress_events``, this file is ``__main__``,
#: which no worker can import.
MODULE = "examples.progress_events"


def database() -> Any:
    """The database named by the same variables the CLI reads (a local server by default)."""
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    return MongoClient(uri)[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]


def show_progress(job: Process, stop: threading.Event) -> None:
    """Progress is a field of the job, not an event: read it while the job runs (one indexed read each time; the
    worker stores it at most once per ``progress_rate_limit``)."""
    shown = -1.0
    while not stop.wait(0.1):
        job.refresh()
        if job.status == JobStatus.PROCESSING and job.progress != shown:
            shown = job.progress
            print(f"{'progress':<28} {job.id} progress={shown:.0f}")


def main() -> None:
    scheduler = Scheduler(database())
    scheduler.on("*", lambda name, p: print(f"{name:<28} {p.id} progress={p.progress:.0f}"))
    # Due in a second: listen() below sees the changes that come after it opens its stream, and a free node would
    # claim a job due now before that (its claim, the `processing` event, would go unseen).
    job = scheduler.add_job(f"{MODULE}:Steps", at=time.time() + 1)
    stop = threading.Event()
    reader = threading.Thread(target=show_progress, args=(scheduler.get_job(job.id), stop))
    reader.start()

    def until_done(process: Process) -> bool:
        return process.status.is_terminal

    try:
        scheduler.listen(until_done, {"_id": job.id}, timeout=60)  # status events, as they happen
    finally:
        stop.set()
        reader.join()


if __name__ == "__main__":
    main()
