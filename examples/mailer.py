"""A rate-limited mailer: at most 2 mails in flight and 4 sent per second, across every queue node.

`taskscheduler queue --import examples.mailer --max-children 4`, then `python -m examples.mailer`
(start more nodes with the same command: the limits still hold for all of them together).
"""

from __future__ import annotations

import os
import time
from typing import Any

from pymongo import MongoClient

from taskscheduler import AbstractJob, Scheduler

#: Jobs are named by module: run as ``python -m examples.mailer``, this file is ``__main__``, which no worker can
#: import.
MODULE = "examples.mailer"
#: Every job with this ``limit_key`` counts under the limit, whatever its class.
SMTP = "smtp.example.com"


class SendMail(AbstractJob):
    def start(self) -> dict[str, float]:
        began = time.time()
        time.sleep(0.2)  # stands in for the SMTP conversation
        return {"to": self.data["to"], "began": began, "ended": time.time()}


def database() -> Any:
    """The database named by the same variables the CLI reads (a local server by default)."""
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    return MongoClient(uri)[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of spans that overlap at one moment."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    busy = most = 0
    for _, step in edges:
        busy += step
        most = max(most, busy)
    return most


def main() -> None:
    scheduler = Scheduler(database())
    # Kept in MongoDB for the whole cluster (the same as `taskscheduler limit smtp.example.com --concurrency 2
    # --rate 4/s`); a node sees a change within a second.
    scheduler.set_limit(SMTP, concurrency=2, rate="4/s")
    print("limits:", scheduler.limits()[SMTP])
    began = time.time()
    mails = [scheduler.add_job(f"{MODULE}:SendMail", {"to": f"user{n}@example.com"}, limit_key=SMTP) for n in range(8)]
    scheduler.wait_for(mails, Scheduler.OPTION_THROW_EXCEPTION, timeout=60)
    spans = [(mail.result["began"], mail.result["ended"]) for mail in mails]
    print(f"sent {len(mails)} mails in {time.time() - began:.1f} s, at most {most_at_once(spans)} at once")
    scheduler.remove_limit(SMTP)


if __name__ == "__main__":
    main()
