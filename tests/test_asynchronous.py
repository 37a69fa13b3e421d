"""AsyncScheduler / AsyncProcess: the same scenarios through the sync and the asyncio API (parametrized), then
what only the asyncio API promises: the event loop keeps running while a wait is pending."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.database import Database

import sample_jobs
from helpers import Node
from taskscheduler import AsyncProcess, AsyncScheduler, JobStatus, Process, Scheduler
from taskscheduler.errors import (
    InvalidArgumentError,
    JobFailedError,
    JobNotFoundError,
    WaitTimeoutError,
)
from taskscheduler.ops.embedded import EmbeddedServer


class Api:
    """One scenario, two APIs: every call is awaited, and goes to the Scheduler or the AsyncScheduler."""

    def __init__(self, kind: str, server: EmbeddedServer, db: Database[dict[str, Any]]) -> None:
        self.kind = kind
        self.server = server
        self.db = db
        self.sync = Scheduler(db)
        self.aio: AsyncScheduler | None = None
        self.events: list[tuple[str, type]] = []

    async def open(self) -> None:
        if self.kind == "async":
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(self.server.uri, tz_aware=True)
            self.aio = AsyncScheduler(client[self.db.name])
        self.api.on("*", lambda name, p: self.events.append((name, type(p))))

    @property
    def api(self) -> Any:
        return self.aio if self.aio is not None else self.sync

    @property
    def process_type(self) -> type:
        return AsyncProcess if self.aio is not None else Process

    async def call(self, method: str, *args: Any, **kw: Any) -> Any:
        return await _resolved(getattr(self.api, method)(*args, **kw))

    async def of(self, process: Any, method: str, *args: Any, **kw: Any) -> Any:
        return await _resolved(getattr(process, method)(*args, **kw))

    async def jobs(self, query: dict[str, Any] | None = None) -> list[Any]:
        found = self.api.get_jobs(query)
        if self.aio is not None:
            return [p async for p in found]
        return list(found)

    async def close(self) -> None:
        if self.aio is not None:
            await self.aio.close()


async def _resolved(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@pytest.fixture(params=["sync", "async"])
def api(request: pytest.FixtureRequest, server: EmbeddedServer, db: Database[dict[str, Any]]) -> Api:
    return Api(request.param, server, db)


def run(api: Api, scenario: Callable[[Api], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        await api.open()
        try:
            await scenario(api)
        finally:
            await api.close()

    asyncio.run(main())


# -- the same scenarios through both APIs ----------------------------------------------------------------------


def test_add_wait_and_read_back(api: Api, start_node: Callable[..., Node]) -> None:
    start_node()

    async def scenario(api: Api) -> None:
        p = await api.call("add_job", sample_jobs.Echo, {"x": 1}, priority=5)
        assert isinstance(p, api.process_type) and p.status == JobStatus.WAITING and p.options["priority"] == 5
        await api.of(p, "wait", timeout=30)
        assert p.status == JobStatus.DONE and p.result == {"x": 1} and p.error is None
        again = await api.call("get_job", p.id)
        assert again.id == p.id and again.status == JobStatus.DONE and again.result == {"x": 1}
        runs = await api.of(again, "runs")
        assert [r["status"] for r in runs] == [JobStatus.DONE]
        done = await api.jobs({"status": int(JobStatus.DONE)})
        assert [j.id for j in done] == [p.id] and all(isinstance(j, api.process_type) for j in done)
        assert p.to_dict()["_id"] == str(p.id)
        assert ("taskscheduler.onWaiting", api.process_type) in api.events

    run(api, scenario)


def test_failures_throw_and_timeouts_raise(api: Api, start_node: Callable[..., Node]) -> None:
    start_node()

    async def scenario(api: Api) -> None:
        failing = await api.call("add_job", sample_jobs.Fail, "z")
        with pytest.raises(JobFailedError) as info:
            await api.call("wait_for", [failing], Scheduler.OPTION_THROW_EXCEPTION, timeout=30)
        assert info.value.error is not None and info.value.error["message"] == "boom: z"
        later = await api.call("add_job", sample_jobs.Noop, at=2_000_000_000)
        with pytest.raises(WaitTimeoutError):
            await api.of(later, "wait", timeout=0.3)

    run(api, scenario)


def test_cancel_requeue_once_and_errors(api: Api) -> None:
    async def scenario(api: Api) -> None:
        p = await api.call("add_job", sample_jobs.Noop, at=2_000_000_000)
        await api.call("cancel_job", p.id)
        await api.of(p, "refresh")
        assert p.status == JobStatus.CANCELED
        back = await api.call("requeue_job", p.id)
        assert back.status == JobStatus.WAITING and back.run == 2 and back.id == p.id
        first = await api.call("add_job_once", sample_jobs.Echo, {"k": 1})
        second = await api.call("add_job_once", sample_jobs.Echo, {"k": 1})
        assert first.id == second.id
        with pytest.raises(InvalidArgumentError, match="option priority"):
            await api.call("add_job", sample_jobs.Noop, priority=1000)
        with pytest.raises(JobNotFoundError):
            await api.call("get_job", "0" * 24)
        with pytest.raises(InvalidArgumentError):
            await api.call("cancel_job", "not an id")
        assert len(await api.jobs()) == 2  # the requeued job and the once job
        await api.call("flush")
        assert await api.jobs() == []

    run(api, scenario)


def test_flow_control_calls_and_their_refusals(api: Api) -> None:
    """SPEC 8 through both APIs: add_chain, set_limit, limits, pause, paused, resume, remove_limit."""

    async def scenario(api: Api) -> None:
        chain = await api.call("add_chain", [(sample_jobs.Echo, 1), (sample_jobs.Echo, 2, {"priority": 5})])
        assert [type(p) for p in chain] == [api.process_type] * 2
        # A read of the database: a property of a Process, a coroutine of an AsyncProcess.
        blocked = await api.of(chain[1], "blocked_by") if api.aio is not None else chain[1].blocked_by
        assert chain[1].options["depends_on"] == [chain[0].id] and blocked == [chain[0].id]
        for bad in ({"a": 1}, 5, "steps"):  # a mapping's keys, a number, a string: no list of steps
            with pytest.raises(InvalidArgumentError, match="steps must be a list"):
                await api.call("add_chain", bad)
        await api.call("set_limit", "mail", concurrency=2, rate="10/m")
        assert await api.call("limits") == {"mail": {"concurrency": 2, "rate": "10/m"}}
        await api.call("pause", "*")
        assert await api.call("paused") == ["*"]
        await api.call("resume", "*")
        await api.call("remove_limit", "mail")
        assert await api.call("paused") == [] and await api.call("limits") == {}

    run(api, scenario)


def test_listen_until_the_callback_says_stop(api: Api, start_node: Callable[..., Node]) -> None:
    start_node()

    async def scenario(api: Api) -> None:
        # A job that fails again and again, run after run: whenever listening starts, a next claim comes (no head
        # start needed). Its runs end straight in the next one (WAITING): FAILED is an event, not a status.
        p = await api.call("add_job", sample_jobs.Fail, "loop", retry=-1, retry_interval=0)
        seen: list[JobStatus] = []

        def callback(process: Any) -> bool:
            assert isinstance(process, api.process_type) and process.id == p.id
            seen.append(process.status)
            return bool(process.status == JobStatus.PROCESSING)

        if api.aio is not None:
            await api.aio.listen(callback, {"_id": p.id}, timeout=30)
        else:  # a sync listen blocks its thread
            await asyncio.get_running_loop().run_in_executor(None, lambda: api.sync.listen(callback, {"_id": p.id}, 30))
        assert seen and seen[-1] == JobStatus.PROCESSING and seen.count(JobStatus.PROCESSING) == 1
        await api.call("cancel_job", p.id)

    run(api, scenario)


# -- what only the asyncio API promises ------------------------------------------------------------------------


def test_the_event_loop_keeps_ticking_while_a_wait_is_pending(
    server: EmbeddedServer, db: Database[dict[str, Any]], start_node: Callable[..., Node]
) -> None:
    start_node()

    async def main() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        async with AsyncScheduler(client[db.name]) as scheduler:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticking = asyncio.create_task(ticker())
            p = await scheduler.add_job(sample_jobs.Sleep, {"seconds": 1.0})
            before = ticks
            await p.wait(timeout=30)
            ticking.cancel()
            assert p.status == JobStatus.DONE and p.result == "slept"
            assert ticks - before >= 30  # about 100 ticks in a second; a blocked loop would show none

    asyncio.run(main())


def test_a_cancelled_wait_frees_its_thread_and_async_callbacks_work(
    server: EmbeddedServer, db: Database[dict[str, Any]]
) -> None:
    async def main() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        scheduler = AsyncScheduler(client[db.name])
        handled: list[str] = []

        async def handler(name: str, process: AsyncProcess) -> None:
            await asyncio.sleep(0)
            handled.append(name)

        scheduler.on("waiting", handler)
        p = await scheduler.add_job(sample_jobs.Noop)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(p.wait(), 0.3)
        deadline = asyncio.get_running_loop().time() + 5
        while not handled and asyncio.get_running_loop().time() < deadline:  # the callback runs on the loop
            await asyncio.sleep(0.01)
        assert handled == ["taskscheduler.onWaiting"]
        started = asyncio.get_running_loop().time()
        await scheduler.close()  # the cancelled wait's thread ends within a second: close does not hang
        assert asyncio.get_running_loop().time() - started < 5

    asyncio.run(main())


def test_async_scheduler_needs_an_async_database(db: Database[dict[str, Any]]) -> None:
    with pytest.raises(InvalidArgumentError, match="AsyncDatabase"):
        AsyncScheduler(db)
    assert AsyncScheduler.OPTION_PRIORITY == Scheduler.OPTION_PRIORITY == "priority"


def test_async_close_while_a_wait_is_pending_ends_the_wait_without_reporting_the_job_finished(
    server: EmbeddedServer, db: Database[dict[str, Any]], scheduler: Scheduler
) -> None:
    """SPEC 2: close() during a pending wait_for makes it raise (or be cancelled), never return with the job WAITING."""

    async def main() -> tuple[bool, BaseException | None, JobStatus]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        aio = AsyncScheduler(client[db.name])
        p = await aio.add_job(sample_jobs.Noop)  # no node: it stays WAITING
        watching = threading.Event()
        read = aio.scheduler._read_pending

        def read_then_watch(wait: Any, ids: Any) -> None:
            read(wait, ids)
            watching.set()

        aio.scheduler._read_pending = read_then_watch  # type: ignore[method-assign]
        waiting = asyncio.ensure_future(aio.wait_for([p], timeout=30))
        assert await asyncio.to_thread(watching.wait, 10), "the wait never started"
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
    server: EmbeddedServer, db: Database[dict[str, Any]], new_scheduler: Callable[..., Scheduler]
) -> None:
    """SPEC 2: wait_for(5), wait_for(None) (sync and async) raise InvalidArgumentError."""
    sync = new_scheduler()

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


def test_async_process_outcome_after_a_timed_out_wait_is_read_off_the_event_loop(
    server: EmbeddedServer, db: Database[dict[str, Any]], new_scheduler: Callable[..., Scheduler]
) -> None:
    """SPEC 6: after a WaitTimeoutError a changed process's outcome is loaded, never read on the event loop."""
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
            new_scheduler().cancel_job(ends.id)  # another client ends it
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


def test_calls_without_io_may_be_awaited_as_every_method_of_the_async_api(
    server: EmbeddedServer, db: Database[dict[str, Any]]
) -> None:
    """SPEC 6: every Scheduler method as a coroutine. set_options, get_options and on do no I/O: they work as
    plain calls and awaited alike; blocked_by reads MongoDB: awaited as the property Process has, or called."""

    async def main() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        scheduler = AsyncScheduler(client[db.name])
        try:
            assert await scheduler.set_options({"default_retry": 2}) is scheduler
            assert scheduler.set_options({"default_retry": 3}) is scheduler
            awaited = await scheduler.get_options()
            assert type(awaited) is dict and awaited["default_retry"] == 3
            assert scheduler.get_options()["default_retry"] == 3
            assert await scheduler.on("done", lambda name, p: None) is scheduler
            first = await scheduler.add_job(sample_jobs.Noop)
            second = await scheduler.add_job(sample_jobs.Noop, depends_on=[first.id])
            assert await second.blocked_by == [first.id]
            assert await second.blocked_by() == [first.id]
            assert await first.blocked_by == []
        finally:
            await scheduler.close()

    asyncio.run(main())
