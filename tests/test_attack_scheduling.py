"""Hostile review of the scheduling work (issue 11, SPEC sections 2, 4, 5 and 6): each test names one defect and
asserts what the SPEC or the issue requires.

This module is also a job module: the e2e tests below start a queue node that imports it (``--import
test_attack_scheduling``), so its module-level job functions run in real workers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.database import Database

import sample_jobs
from helpers import TESTS_DIR, Node, as_record
from taskscheduler import AsyncScheduler, JobStatus, Scheduler
from taskscheduler.client.job import load_job_class
from taskscheduler.core.runs import next_start
from taskscheduler.errors import InvalidArgumentError, InvalidJobError
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.options import MAX_TIMESTAMP
from taskscheduler.recurrence import cron_expression, next_cron_time, retry_delay

# -- job functions run by the e2e tests (this module is on the node's allow-list) ------------------------------


def generator_job(data: dict[str, Any]) -> Iterator[int]:
    """A generator function given as a job: its body must run (or add_job must refuse it)."""
    Path(data["marker"]).write_text("ran")
    yield 1


async def async_generator_job(data: dict[str, Any]) -> Any:
    """An async generator function given as a job: its body must run (or add_job must refuse it)."""
    Path(data["marker"]).write_text("ran")
    yield 1


# -- function jobs: the allow-list --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_function_job_path_walks_attributes_out_of_the_allow_list(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """SPEC 2/4: a node runs job code only from its allow-list, and 'A stored class name never makes a node import
    anything else'. load_job_class walks the QualName attribute by attribute and accepts any Python function it
    reaches, so 'sample_jobs:os.popen' (sample_jobs imports os) runs os.popen(data) - a shell command - in a worker
    of a node that only allows sample_jobs."""
    pwned = tmp_path / "pwned"
    start_node()
    p = scheduler.add_job("sample_jobs:os.popen", f"touch {pwned}")
    p.wait(timeout=30)
    time.sleep(0.5)
    assert not pwned.exists(), "a shell command ran through 'sample_jobs:os.popen'"
    assert p.status == JobStatus.FAILED and p.error is not None
    assert p.error["class"].endswith("InvalidJobError")


def test_function_job_path_cannot_name_a_method_or_an_imported_function() -> None:
    """The same hole without a node: a worker's loader hands back functions that are not module-level functions
    of the allowed module (a class's method, a function another module defines)."""
    for path in ("sample_jobs:os.popen", "sample_jobs:Noop.start", "sample_jobs:AbstractJob.update_progress"):
        with pytest.raises(InvalidJobError):
            load_job_class(path, ["sample_jobs"])


# -- function jobs: generator functions ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("function", [generator_job, async_generator_job], ids=["generator", "async_generator"])
def test_generator_function_job_ends_done_without_running_its_body(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path, function: Any
) -> None:
    """SPEC 2: 'add_job(f, data) ... runs f(data) in a worker'. A (async) generator function is accepted by
    add_job, but the worker only creates the generator object: the job ends DONE (result None, 'not
    BSON-encodable' warning) and its body never runs. Either refuse it at add_job (InvalidArgumentError) or run
    it."""
    marker = tmp_path / f"{function.__name__}.ran"
    try:
        p = scheduler.add_job(function, {"marker": str(marker)})
    except InvalidArgumentError:
        return  # refused up front: fine
    start_node(modules=("sample_jobs", "test_attack_scheduling"))  # this module's job functions too
    p.wait(timeout=30)
    assert marker.exists(), f"job ended {p.status.name} but the body of {function.__name__} never ran"


# -- cron ---------------------------------------------------------------------------------------------------------


def test_cron_with_an_at_near_the_end_of_time_is_an_invalid_argument(scheduler: Scheduler) -> None:
    """SPEC 2/6: bad options raise InvalidArgumentError with nothing written. `at` up to MAX_TIMESTAMP is
    accepted, but with a cron the first match is searched past year 9999 and croniter's OverflowError escapes."""
    for cron in ("* * * * *", "@yearly"):
        with pytest.raises(InvalidArgumentError):
            scheduler.add_job(sample_jobs.Noop, cron=cron, at=MAX_TIMESTAMP - 5)
    assert scheduler.store.jobs.count_documents({}) == 0


def test_cron_expression_with_random_field_is_refused_or_deterministic() -> None:
    """SPEC 6: cron is '5 fields with names, ranges, steps'. croniter's 'R' (random) field passes validation and
    makes every computation of the next run draw a new minute: the same job, end time and expression give
    different next runs (on every node, at every run)."""
    try:
        expr = cron_expression("cron", "R * * * *")
    except InvalidArgumentError:
        return
    after = 1_704_067_200.0  # 2024-01-01 00:00 UTC
    seen = {next_cron_time(expr, "UTC", after) for _ in range(20)}
    assert len(seen) == 1, f"'R * * * *' gives {len(seen)} different next runs for the same input"


def test_add_job_once_with_cron_and_at_is_idempotent(scheduler: Scheduler) -> None:
    """SPEC 2 add_job_once: an active job of the same class, data and options is returned, not replaced. For a
    cron job the stored `at` is rewritten to the first cron match, so the requested `at` never equals it: every
    call cancels the job and adds a new one (an app that calls add_job_once at each start churns its cron job)."""
    at = time.time() + 2 * 86400
    first = scheduler.add_job_once(sample_jobs.Noop, {"k": 1}, cron="0 3 * * *", at=at)
    second = scheduler.add_job_once(sample_jobs.Noop, {"k": 1}, cron="0 3 * * *", at=at)
    assert second.id == first.id, "the same add_job_once replaced the cron job"
    assert first.refresh().status == JobStatus.POSTPONED


# -- retry delays -------------------------------------------------------------------------------------------------


def test_retry_max_interval_bounds_the_delay_without_backoff() -> None:
    """SPEC 6: retry_max_interval is the 'upper bound of a retry delay'. With the default retry_backoff 1.0 the
    bound is not applied: retry_interval=600, retry_max_interval=60 waits 600 s."""
    doc = {"options": {"retry": 3, "retry_interval": 600, "retry_max_interval": 60, "retry_backoff": 1.0}}
    now = 1_700_000_000.0
    follow = next_start(as_record(doc), JobStatus.FAILED, now)
    assert follow is not None
    assert follow[1] - now <= 60, f"retry delay {follow[1] - now} s exceeds retry_max_interval 60 s"


def test_retry_delay_formula_holds_for_many_failures() -> None:
    """SPEC 6: delay of retry n is retry_interval * retry_backoff ** (n - 1), bounded. With retry_interval 0 that
    is 0 for every n, but once backoff ** (n - 1) overflows a float (retry=-1 runs long enough) the delay jumps
    to retry_max_interval."""
    options = {"retry_interval": 0, "retry_backoff": 2.0, "retry_max_interval": 3600}
    assert retry_delay(options, 10) == 0.0
    assert retry_delay(options, 2000) == 0.0


# -- AsyncScheduler -----------------------------------------------------------------------------------------------


def test_async_close_while_a_wait_is_pending_does_not_report_the_job_finished(
    server: EmbeddedServer, db: Database[dict[str, Any]], scheduler: Scheduler
) -> None:
    """SPEC 2 wait_for: 'returns when every listed job is terminal'. AsyncScheduler.close() sets the stop flag of
    a pending wait, and the sync wait returns normally: the awaiting coroutine sees wait_for() return while the job
    is still WAITING (no error, no cancellation), as if it had finished."""

    async def main() -> tuple[bool, BaseException | None, JobStatus]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        aio = AsyncScheduler(client[db.name])
        p = await aio.add_job(sample_jobs.Noop)  # no node: it stays WAITING
        waiting = asyncio.ensure_future(aio.wait_for([p], timeout=30))
        await asyncio.sleep(0.5)
        await aio.close()
        try:
            await asyncio.wait_for(asyncio.shield(waiting), 5)
            outcome: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - any way of saying "not finished" is fine
            outcome = exc
        await client.close()
        return waiting.done(), outcome, p.status

    done, outcome, status = asyncio.run(main())
    assert done
    assert outcome is not None or status.is_terminal, (
        f"wait_for() returned normally after close() with the job still {status.name}"
    )


def test_async_wait_for_rejects_a_non_iterable_with_invalid_argument(
    server: EmbeddedServer, db: Database[dict[str, Any]]
) -> None:
    """SPEC 2: invalid arguments are errors.InvalidArgumentError. wait_for(5) raises a bare TypeError from
    list(5) (sync and async), and AsyncScheduler.wait_for(process) with a single sync Process (which
    Scheduler.wait_for accepts) does too."""
    sync = Scheduler(db)

    async def main() -> list[str]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        aio = AsyncScheduler(client[db.name])
        problems = []
        try:
            for bad in (5, None):
                try:
                    await aio.wait_for(bad, timeout=1)  # type: ignore[arg-type]
                    problems.append(f"async wait_for({bad!r}) returned")
                except InvalidArgumentError:
                    pass
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"async wait_for({bad!r}): {type(exc).__name__}")
        finally:
            await aio.close()
            await client.close()
        return problems

    problems = asyncio.run(main())
    for bad in (5, None):
        try:
            sync.wait_for(bad, timeout=1)  # type: ignore[arg-type]
        except InvalidArgumentError:
            pass
        except Exception as exc:  # noqa: BLE001
            problems.append(f"sync wait_for({bad!r}): {type(exc).__name__}")
    assert not problems, problems


# -- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_add_cron_with_a_far_at_is_one_line_exit_2(server: EmbeddedServer, db_name: str, scheduler: Any) -> None:
    """SPEC 3: bad input is one line on stderr, exit 2, never a traceback, nothing written."""
    env = dict(
        os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskscheduler",
            "add",
            "sample_jobs:Noop",
            "--cron",
            "* * * * *",
            "--at",
            "9999-12-31T23:59:58+00:00",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2, (out.returncode, out.stderr[-500:])
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr[-500:]
    assert scheduler.store.jobs.count_documents({}) == 0


# -- priorities ---------------------------------------------------------------------------------------------------


def test_backlog_put_back_keeps_first_in_first_out_within_a_priority() -> None:
    """SPEC 6 priority: 'first in, first out within one'. Jobs handed to workers that die before claiming them are
    put back (WorkerManager._on_exit, one call per dead worker); put_back gives each a new front sequence
    (-1, -2, ...), so the last one put back runs first: two crashed hand-overs come back in reverse order."""
    from bson import ObjectId

    from taskscheduler.node.backlog import Backlog
    from taskscheduler.node.protocol import RunJob

    def task(name: str) -> RunJob:
        return RunJob({"_id": ObjectId(), "name": name, "options": {"priority": 0}}, 30.0)

    backlog = Backlog()
    a, b, c = task("a"), task("b"), task("c")
    for t in (a, b, c):
        backlog.add(t)
    first, second = backlog.pop(), backlog.pop()
    assert [first.doc["name"], second.doc["name"]] == ["a", "b"]
    backlog.put_back(first)  # the workers a and b were handed to died; reaped in the order they were handed
    backlog.put_back(second)
    assert [backlog.pop().doc["name"] for _ in range(3)] == ["a", "b", "c"]


def test_async_process_error_after_a_timed_out_wait_does_io_on_the_loop(
    server: EmbeddedServer, db: Database[dict[str, Any]]
) -> None:
    """Brief/SPEC 6: AsyncProcess.error and .result are 'read when the process is loaded, never on the event
    loop'. wait_for updates the listed processes in place on its thread and loads their outcomes only when it
    returns normally: after WaitTimeoutError (or JobFailedError) a process that changed during the wait has an
    unloaded outcome, and reading .error then queries MongoDB on the event loop."""
    from taskscheduler.errors import WaitTimeoutError

    loop_reads: list[str] = []

    async def main() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        aio = AsyncScheduler(client[db.name])
        life = aio.scheduler.lifecycle
        original = life.outcome
        loop_thread = threading.current_thread()

        def outcome(doc: Any) -> Any:
            if threading.current_thread() is loop_thread:
                loop_reads.append(str(doc.get("_id")))
            return original(doc)

        life.outcome = outcome  # type: ignore[method-assign]
        try:
            stays = await aio.add_job(sample_jobs.Noop)  # no node: stays WAITING
            ends = await aio.add_job(sample_jobs.Noop)
            Scheduler(db).cancel_job(ends.id)  # another client ends it
            with pytest.raises(WaitTimeoutError):
                await aio.wait_for([ends, stays], timeout=1.5)
            assert ends.status == JobStatus.CANCELED  # updated in place by the wait
            ends.error  # noqa: B018 - must not touch MongoDB here, on the loop
            ends.result  # noqa: B018
        finally:
            await aio.close()
            await client.close()

    asyncio.run(main())
    assert not loop_reads, f"outcome read on the event loop for {loop_reads}"


# -- cron and clocks ----------------------------------------------------------------------------------------------


def test_cron_match_runs_once_when_the_worker_clock_is_behind() -> None:
    """SPEC 4/6: nodes release a POSTPONED run on the server's clock; the worker computes the next cron match
    from its own clock ('first match after the end'). A worker whose clock is behind the server's (by more than
    the run's duration: a fast job, NTP-level skew) ends the 12:00 run at 11:59:59.5 by its clock, and the next run
    is 12:00 again: the same match runs twice. The next match must lie after the run's own match (options.at) /
    its server-clock start."""
    from datetime import datetime, timezone

    match = 1_704_110_400.0  # 2024-01-01 12:00:00 UTC, a match of "0 * * * *"
    doc = {
        "_id": None,
        "run": 1,
        "started": datetime.fromtimestamp(match + 0.010, timezone.utc),  # server clock, at the claim
        "failures": 0,
        "options": {"cron": "0 * * * *", "timezone": "UTC", "retry": 0, "at": match, "interval": 0},
    }
    follow = next_start(as_record(doc), JobStatus.DONE, match - 0.5)  # the worker's clock: half a second behind
    assert follow is not None
    assert follow[1] > match, f"the 12:00 match is scheduled again (next at {follow[1]} == its own at {match})"
