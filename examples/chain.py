"""Dependencies: a chain whose steps read the step before, and a chord (a job that waits for a group).

`taskscheduler queue --import examples.chain --max-children 4`, then `python -m examples.chain`.
"""

from __future__ import annotations

import os
from typing import Any

from pymongo import MongoClient

from taskscheduler import AbstractJob, JobStatus, Scheduler

#: Jobs are named by module: run as ``python -m examples.chain``, this file is ``__main__``, which no worker can
#: import.
MODULE = "examples.chain"


class Fetch(AbstractJob):
    """The first step: its result is what the next step reads."""

    def start(self) -> list[str]:
        return [word for word in str(self.data).split() if word]


class Count(AbstractJob):
    """A later step: it reads the result of the step before (its one dependency)."""

    def start(self) -> dict[str, int]:
        (previous,) = self.dependencies()
        counts: dict[str, int] = {}
        for word in previous.result:
            counts[word.lower()] = counts.get(word.lower(), 0) + 1
        return counts


class Top(AbstractJob):
    def start(self) -> list[Any]:
        (previous,) = self.dependencies()
        return sorted(previous.result.items(), key=lambda item: (-item[1], item[0]))[: int(self.data)]


class Square(AbstractJob):
    def start(self) -> int:
        return int(self.data) ** 2


class Total(AbstractJob):
    """The chord's end: it runs once every job of the group ended DONE, and adds up their results."""

    def start(self) -> int:
        return sum(int(dependency.result) for dependency in self.dependencies())


class Broken(AbstractJob):
    def start(self) -> None:
        raise RuntimeError("the source is gone")


def database() -> Any:
    """The database named by the same variables the CLI reads (a local server by default)."""
    uri = os.environ.get("TASKSCHEDULER_MONGODB_URI", "mongodb://127.0.0.1:27017/?directConnection=true")
    return MongoClient(uri)[os.environ.get("TASKSCHEDULER_DATABASE", "taskscheduler")]


def main() -> None:
    scheduler = Scheduler(database())

    text = "the quick fox jumps over the lazy dog the fox"
    chain = scheduler.add_chain([(f"{MODULE}:Fetch", text), (f"{MODULE}:Count", None), (f"{MODULE}:Top", 2)])
    print("chain blocked by:", len(chain[-1].blocked_by), "job")  # Top waits for Count
    scheduler.wait_for(chain, timeout=60)
    print("chain:", [[word, n] for word, n in chain[-1].result])

    group = [scheduler.add_job(f"{MODULE}:Square", n) for n in range(1, 5)]
    total = scheduler.add_job(f"{MODULE}:Total", None, depends_on=group)  # a chord
    scheduler.wait_for([total], timeout=60)
    print("chord:", total.result)

    # A step that fails for good cancels the rest of its chain, naming the culprit.
    broken = scheduler.add_chain([(f"{MODULE}:Broken", None), (f"{MODULE}:Count", None), (f"{MODULE}:Top", 1)])
    scheduler.wait_for(broken, timeout=60)
    for step in broken[1:]:
        step = scheduler.get_job(step.id)
        assert step.status == JobStatus.CANCELED
        print("after a failure:", step.job_class.split(":")[1], step.status.name, "-", step.error["message"])


if __name__ == "__main__":
    main()
