"""Cron jobs in a time zone: one document per job, back to POSTPONED after each run.

`taskscheduler queue --import examples.cron`, then `python -m examples.cron` (add `--wait` to see the
every-minute job run once, within a minute).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pymongo import MongoClient

from taskscheduler import AbstractJob, Scheduler, current_job


class Report(AbstractJob):
    """A weekday report at 07:00 in Zurich (summer and winter time alike)."""

    def start(self) -> str:
        return f"report for {self.data['team']}"


def tick(data: Any) -> str:
    """A plain function as a job: current_job() tells which run this is."""
    job = current_job()
    return f"tick {data} (job {job.id if job else '?'})"


MODULE = "examples.cron"


def database() -> Any:
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    return MongoClient(uri, tz_aware=True)[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]


def main() -> None:
    scheduler = Scheduler(database())
    # add_job_once: running this script again keeps the one job instead of adding a second.
    report = scheduler.add_job_once(
        f"{MODULE}:Report", {"team": "ops"}, cron="0 7 * * mon-fri", timezone="Europe/Zurich"
    )
    minutely = scheduler.add_job_once(f"{MODULE}:tick", "every minute", cron="* * * * *")
    for name, job in (("report", report), ("tick", minutely)):
        zone = ZoneInfo(job.options["timezone"])
        when = datetime.fromtimestamp(job.options["at"], zone).isoformat(timespec="minutes")
        print(f"{name}: cron {job.options['cron']!r} in {zone.key}, {job.status.name}, next run {when}")
    if "--wait" in sys.argv:
        minutely.wait(timeout=90)  # a recurring job: returns once its next run has ended
        print(f"tick ran: {minutely.result}; next run at {datetime.fromtimestamp(minutely.options['at'])}")


if __name__ == "__main__":
    main()
