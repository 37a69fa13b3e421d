"""Dependencies between jobs (SPEC 8): a job starts only once every job it depends on has ended DONE, and is
canceled, naming the culprit, once one has ended FAILED, TIMEOUT or CANCELED for good.

Nothing about it is written into the dependent while it waits: a DONE job stays DONE (a job with a recurring
schedule cannot be a dependency, and requeue never moves a DONE job), so "every dependency is DONE" never stops
being true once it is, and whoever looks (a node, before it hands the job to a worker; ``run_jobs``) may decide
from what it reads. A dependency that is gone (deleted by retention after it ended) counts as DONE: had it failed,
its dependents would have been canceled then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bson import ObjectId

from .. import options as o
from ..constants import JobStatus
from ..errors import DependencyFailedError, InvalidArgumentError, JobNotFoundError
from ..store import JobStore
from ..store.views import JobView
from .changes import library_error

#: How a dependency ends for good without its dependents ever running.
FAILED_FOR_GOOD = (JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED)


def depends_on(doc: Mapping[str, Any]) -> list[ObjectId]:
    """The jobs a stored job depends on, in the order given (none when the field holds something else)."""
    found = JobView(doc).options.get(o.DEPENDS_ON)
    if not isinstance(found, list):
        return []
    return [item for item in found if isinstance(item, ObjectId)]


@dataclass(frozen=True)
class Verdict:
    """Where a job's dependencies stand: ``waiting_for`` the ones not DONE yet; ``failed`` the first (in the
    order given) that ended otherwise for good, with its status."""

    waiting_for: tuple[ObjectId, ...] = ()
    failed: tuple[ObjectId, JobStatus] | None = None

    @property
    def ready(self) -> bool:
        return self.failed is None and not self.waiting_for


def judge(dependencies: Sequence[ObjectId], states: Mapping[Any, Mapping[str, Any]]) -> Verdict:
    waiting: list[ObjectId] = []
    for dependency in dependencies:
        state = states.get(dependency)
        if state is None:
            continue  # gone: it ended long ago, and DONE (a failure would have canceled us then)
        status = JobView(state).status_value
        if status == JobStatus.DONE:
            continue
        if status in FAILED_FOR_GOOD:
            return Verdict(tuple(waiting), (dependency, JobStatus(status)))
        waiting.append(dependency)
    return Verdict(tuple(waiting))


def verdicts(store: JobStore, docs: Iterable[Mapping[str, Any]]) -> dict[Any, Verdict]:
    """The verdict of each job (by id) that has dependencies, from one read of all their dependencies."""
    wanted = {JobView(doc).id_value: depends_on(doc) for doc in docs}
    wanted = {job: deps for job, deps in wanted.items() if deps}
    if not wanted:
        return {}
    states = store.job_states({dep for deps in wanted.values() for dep in deps})
    return {job: judge(deps, states) for job, deps in wanted.items()}


def check_new(store: JobStore, dependencies: Sequence[ObjectId], known: Iterable[ObjectId] = ()) -> None:
    """Refuse dependencies a new job cannot have (nothing is written): an unknown job, or a recurring one (it
    never ends for good, so its dependents would wait for ever). ``known``: ids of jobs being added with it."""
    known = set(known)
    asked = [dep for dep in dependencies if dep not in known]
    if not asked:
        return
    states = store.job_states(asked)
    for dep in asked:
        state = states.get(dep)
        if state is None:
            raise JobNotFoundError(f"option depends_on: no job with id {dep}")
        options = JobView(state).options
        if options.get(o.INTERVAL) or options.get(o.CRON):
            raise InvalidArgumentError(
                f"option depends_on: job {dep} is recurring (interval or cron), so it never ends for good; "
                "a job can depend only on jobs that run once (with their retries)"
            )


def failure_of(dependency: ObjectId, status: JobStatus) -> dict[str, str]:
    """The error recorded on a job canceled because of ``dependency``."""
    return library_error(DependencyFailedError, f"canceled: dependency {dependency} ended {status.name}")
