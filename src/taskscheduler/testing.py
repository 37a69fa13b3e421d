"""A pytest plugin for testing code that uses taskscheduler (SPEC 9), registered through the ``pytest11`` entry
point: inert (nothing imported, nothing started) unless a test asks for one of its fixtures.

Fixtures:

- ``taskscheduler_uri``: the URI of a MongoDB for the whole session: the server named by ``TASKSCHEDULER_TEST_URI``,
  or an embedded server (SecantusDB, in memory) started once for the session in a process of its own.
- ``taskscheduler_db``: a fresh database on it for each test, dropped after the test.
- ``taskscheduler_scheduler``: a :class:`~taskscheduler.Scheduler` on that database.

And :func:`run_jobs`, which runs the due jobs in the calling process, without a queue node or a fork::

    def test_welcome_mail(taskscheduler_scheduler):
        taskscheduler_scheduler.add_job("myapp.jobs:SendWelcome", {"user": 42})
        (job,) = run_jobs(taskscheduler_scheduler)
        assert job.status == JobStatus.DONE
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest
from bson import ObjectId

if TYPE_CHECKING:
    from pymongo.database import Database

    from .client.process import Process
    from .client.scheduler import Scheduler
    from .core.flow import Controls

#: The environment variable naming a MongoDB to test against instead of the embedded server.
URI_VARIABLE = "TASKSCHEDULER_TEST_URI"


def run_jobs(scheduler: Scheduler, timeout: float = 30) -> list[Process]:
    """Run the due jobs in this process (no node, no fork) until none is due, and return the jobs that ran, each
    once, in the order they first started (a job canceled or ended FAILED as malformed without running is not
    among them).

    Each job goes through the same lifecycle as on a node: its claim, events, run end, retries and next runs
    scheduled as usual; a postponed job whose time has come (on the server's clock) is due, one postponed to
    later is not. Jobs start in the order a node would start them: higher priority first, then first in, first
    out. Any module's jobs run (there is no allow-list here). A job waits for its dependencies as on a node: it
    runs once every job it depends on has ended DONE, and is canceled once one failed for good. Pauses and limits
    hold as on a node: a job they hold back is not due (``run_jobs`` returns without waiting for a rate's window).

    Not as on a node: a job's ``timeout`` option is not enforced (nothing kills the calling process), and a job
    that waits for another job to run (``wait()`` on a child) waits in vain, as nothing else runs meanwhile.
    ``timeout`` bounds the whole call: if jobs are still due after that many seconds (a job that schedules itself
    again at once, say), :class:`~taskscheduler.errors.WaitTimeoutError` is raised.
    """
    from .constants import DEFAULT_ORPHANED_TIMEOUT
    from .errors import InvalidArgumentError, WaitTimeoutError
    from .node.backlog import start_order
    from .node.worker import Worker
    from .store.views import JobView

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    worker = Worker(ObjectId(), scheduler, scheduler.db)
    store = scheduler.store
    started: dict[Any, None] = {}  # job ids, in the order they first started
    unrunnable: set[tuple[Any, Any]] = set()  # (job, run) a worker refused and left as it was (malformed)
    deadline = time.monotonic() + timeout
    while True:
        _move_due(scheduler)
        due, controls = _runnable(scheduler, unrunnable)
        if not due:
            break
        if time.monotonic() > deadline:
            raise WaitTimeoutError(f"run_jobs: {len(due)} job(s) still due after {timeout:g} s")
        doc = min(due, key=start_order)
        limits = controls.limited(doc)
        job = JobView(doc)
        if worker.run(doc, None, DEFAULT_ORPHANED_TIMEOUT, limits):
            started.setdefault(job.id)
            continue
        stored = store.find_job(job.id)  # refused: malformed (ended FAILED), or its parent failed (CANCELED)
        if stored is not None and JobView(stored).status_value == job.status_value and JobView(stored).same_run(job):
            unrunnable.add((job.id, job.run_value))  # and unchanged: it would be picked again
    return [scheduler.get_job(job_id) for job_id in started]


def _move_due(scheduler: Scheduler) -> None:
    """POSTPONED -> WAITING for the jobs whose time has come on the server's clock, as a node moves them."""
    from .constants import JobStatus
    from .store.schema import due

    life, store = scheduler.lifecycle, scheduler.store
    now = store.clock.earliest()
    for doc in store.scan((JobStatus.POSTPONED,)):
        if due(doc, now):
            event = life.unpostpone(doc)
            if event is not None:
                life.record_due(doc, event)


def _runnable(scheduler: Scheduler, unrunnable: set[tuple[Any, Any]]) -> tuple[list[Any], Controls]:
    """The WAITING jobs that may start now. Held back as a node holds them: a job with dependencies until every
    one has ended DONE; one of whose dependencies failed for good is canceled."""
    from .constants import JobStatus
    from .core.dependencies import failure_of, verdicts
    from .core.flow import Controls
    from .errors import InvalidArgumentError
    from .store.views import JobView

    store = scheduler.store
    controls = Controls.from_docs(store.flow_controls())
    due = [d for d in store.scan((JobStatus.WAITING,)) if _id_and_run(d) not in unrunnable]
    now = store.clock.now()
    due = [d for d in due if controls.held_back(d, now) is None]  # a pause, or a full limit (a rate's, say)
    held = set()
    for job_id, verdict in verdicts(store, due).items():
        if verdict.failed is not None:
            doc = next(d for d in due if JobView(d).id == job_id)
            with contextlib.suppress(InvalidArgumentError):
                scheduler.lifecycle.cancel(doc, error=failure_of(*verdict.failed))
        if not verdict.ready:
            held.add(job_id)
    return [d for d in due if JobView(d).id not in held], controls


def _id_and_run(doc: Mapping[str, Any]) -> tuple[Any, Any]:
    """A job's id and run number as stored (None when missing): a run that was refused is not tried again."""
    from .store.views import JobView

    job = JobView(doc)
    return job.id_value, job.run_value


@pytest.fixture(scope="session")
def taskscheduler_uri() -> Iterator[str]:
    """A MongoDB for the session: ``TASKSCHEDULER_TEST_URI``, or an embedded server started for it."""
    named = os.environ.get(URI_VARIABLE)
    if named:
        yield named
        return
    from .ops.embedded import EmbeddedServer

    with EmbeddedServer(port=0, data_dir=":memory:") as server:
        yield server.uri


@pytest.fixture
def taskscheduler_db(taskscheduler_uri: str) -> Iterator[Database[dict[str, Any]]]:
    """A fresh database for this test, dropped after it."""
    from .store import connect

    db = connect(taskscheduler_uri, f"test_{uuid.uuid4().hex[:16]}")
    try:
        yield db
    finally:
        db.client.drop_database(db.name)
        db.client.close()


@pytest.fixture
def taskscheduler_scheduler(taskscheduler_db: Database[dict[str, Any]]) -> Iterator[Scheduler]:
    """A Scheduler on this test's database."""
    from .client.scheduler import Scheduler

    scheduler = Scheduler(taskscheduler_db)
    try:
        yield scheduler
    finally:
        scheduler.close()
