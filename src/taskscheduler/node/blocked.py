"""The jobs a queue node holds back because they wait for other jobs to end (SPEC 8, dependencies)."""

from __future__ import annotations

import time
from typing import Any

from bson import ObjectId

from ..core.dependencies import depends_on, failure_of, verdicts
from ..core.lifecycle import Lifecycle
from ..errors import InvalidArgumentError, ServerUnavailableError
from ..store.views import JobView

#: Seconds between two looks at the dependencies of the jobs a node holds back (one read for all of them).
CHECK_SECONDS = 0.5


class Blocked:
    """Waiting jobs of this node's modules whose dependencies have not all ended DONE. While any is held, they
    are looked at again every CHECK_SECONDS, all in one read; each is released once its every dependency is
    DONE, or canceled (naming the culprit) once one has ended FAILED, TIMEOUT or CANCELED. Polling what is stored
    loses no wake-up, whoever dies when: a node that restarts finds the jobs again in its scan. The node's change
    stream only makes the next look come sooner (:meth:`ended`), so a dependent usually starts within a round trip
    of its last dependency's end rather than within CHECK_SECONDS."""

    def __init__(self, life: Lifecycle) -> None:
        self.life = life
        self.jobs: dict[ObjectId, dict[str, Any]] = {}
        #: How many held jobs wait for each dependency (to tell at once whether an ended job matters here).
        self._awaited: dict[Any, int] = {}
        self._next_look = 0.0

    def hold(self, doc: dict[str, Any]) -> None:
        job_id = JobView(doc).id
        if job_id not in self.jobs:
            for dependency in set(depends_on(doc)):
                self._awaited[dependency] = self._awaited.get(dependency, 0) + 1
        self.jobs[job_id] = doc
        self._next_look = 0.0  # a new one is looked at in this round

    def drop(self, job_id: Any) -> None:
        doc = self.jobs.pop(job_id, None)
        if doc is not None:
            self._forget(doc)

    def ended(self, job_id: Any) -> None:
        """A job has ended (the node saw its status change): when a held job waits for it, look in this round."""
        if job_id in self._awaited:
            self._next_look = 0.0

    def _forget(self, doc: dict[str, Any]) -> None:
        for dependency in set(depends_on(doc)):
            left = self._awaited.get(dependency, 0) - 1
            if left > 0:
                self._awaited[dependency] = left
            else:
                self._awaited.pop(dependency, None)

    def release(self) -> list[dict[str, Any]]:
        """The held jobs that may start now (held no more); those that never may are canceled."""
        if not self.jobs or time.monotonic() < self._next_look:
            return []
        self._next_look = time.monotonic() + CHECK_SECONDS
        ready = []
        for job_id, verdict in verdicts(self.life.store, list(self.jobs.values())).items():
            if verdict.ready:
                ready.append(self.jobs[job_id])
                self.drop(job_id)
            elif verdict.failed is not None:
                try:
                    self.life.cancel(self.jobs[job_id], error=failure_of(*verdict.failed))
                except InvalidArgumentError:
                    pass  # it ended meanwhile (canceled, or claimed elsewhere and over)
                except ServerUnavailableError:
                    continue  # still held: canceled at a later look (the ready ones go now all the same)
                self.drop(job_id)
        return ready
