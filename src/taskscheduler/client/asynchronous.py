"""AsyncScheduler and AsyncProcess: the Scheduler API for asyncio applications (FastAPI, aiohttp...).

There is one implementation of the job rules, not two: every coroutine here runs the very Scheduler/Lifecycle/
Store code that the sync API runs, on a private thread pool and a synchronous client built from the
AsyncMongoClient's own settings (what Motor did for a decade). The event loop never waits on MongoDB; a job
added by either API is the same job, with the same validation, storage rules and events. Waits and listens poll
a stop flag at least once a second, so a cancelled coroutine frees its thread promptly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Generic, TypeVar

from blinker import Namespace
from bson import ObjectId

from ..constants import JobStatus
from ..errors import InvalidArgumentError, SchedulerClosedError
from ..store import sync_twin
from .process import Process
from .scheduler import Scheduler

T = TypeVar("T")


class Options(dict[str, Any]):
    """The options as a dict, which may be awaited too (``await scheduler.get_options()``)."""

    def __await__(self) -> Generator[Any, None, dict[str, Any]]:
        yield from ()
        return dict(self)


class Awaited(Generic[T]):
    """A read of MongoDB that a property of :class:`AsyncProcess` starts: awaited as it is, or called first for
    the coroutine (``asyncio.create_task(p.blocked_by())``)."""

    def __init__(self, start: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._start = start

    def __await__(self) -> Generator[Any, None, T]:
        return self._start().__await__()

    def __call__(self) -> Coroutine[Any, Any, T]:
        return self._start()

#: Threads per AsyncScheduler for short calls (waits and listens run on threads of their own).
MAX_THREADS = 8
#: Jobs read per thread hop while iterating get_jobs().
BATCH = 100


class AsyncScheduler:
    """The Scheduler API as coroutines, over a ``pymongo.AsyncDatabase``. Options, errors and events are the
    Scheduler's; methods return :class:`AsyncProcess`. Event handlers run on the event loop (a coroutine
    handler is scheduled as a task)."""

    def __init__(
        self,
        db: Any,
        logger: logging.Logger | None = None,
        options: Mapping[str, Any] | None = None,
        emitter: Namespace | None = None,
    ) -> None:
        self._sync = Scheduler(sync_twin(db), logger, options, emitter)
        self._executor = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="taskscheduler-async")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stops: set[threading.Event] = set()  # of the waits and listens now pending
        self._threads: set[threading.Thread] = set()  # running them
        self._closed = False
        # Dropped without close(): the private client and pool go with it (no "unclosed MongoClient" warning).
        weakref.finalize(self, _release, self._executor, self._sync.store.close)

    @property
    def scheduler(self) -> Scheduler:
        """The synchronous twin this runs on (same options, same emitter)."""
        return self._sync

    async def close(self) -> None:
        """End pending waits and listens (they raise SchedulerClosedError), then release the thread pool and the
        private connection pool. Calls after close() raise SchedulerClosedError."""
        if self._closed:
            return
        self._closed = True
        for stop in list(self._stops):
            stop.set()
        executor, threads = self._executor, list(self._threads)

        def release() -> None:
            executor.shutdown(wait=True, cancel_futures=True)
            for thread in threads:
                thread.join(timeout=5)  # each sees its stop within a second
            self._sync.store.close()

        await asyncio.get_running_loop().run_in_executor(None, release)

    async def __aenter__(self) -> AsyncScheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- options and events (no I/O): plain calls, which may be awaited too ----------------------------------------

    def set_options(self, options: Mapping[str, Any]) -> AsyncScheduler:
        self._check_open()
        self._sync.set_options(options)
        return self

    def get_options(self) -> Options:
        self._check_open()
        return Options(self._sync.get_options())

    def __await__(self) -> Generator[Any, None, AsyncScheduler]:
        """Every Scheduler method is a coroutine here (SPEC 6), and those that do no I/O return at once: awaiting
        what ``set_options`` or ``on`` returned (this scheduler) gives it back."""
        yield from ()
        return self

    def on(self, event: str, handler: Callable[[str, Any], Any]) -> AsyncScheduler:
        """Call ``handler(event_name, async_process)`` on the event loop for status events this instance sees."""
        self._check_open()
        if not callable(handler):
            raise InvalidArgumentError(f"handler must be callable, got {handler!r}")

        def relay(name: str, process: Any) -> None:
            if isinstance(process, Process):
                with contextlib.suppress(Exception):  # an outage must not fail the call that fired the event
                    process.error  # noqa: B018 - loads the outcome here (an I/O thread), never on the loop
            payload = AsyncProcess(process, self) if isinstance(process, Process) else process
            loop = self._loop
            if loop is None or loop.is_closed():
                _deliver(handler, name, payload)
            else:
                loop.call_soon_threadsafe(_deliver, handler, name, payload)

        self._sync.on(event, relay)
        return self

    # -- the API ---------------------------------------------------------------------------------------------------

    async def add_job(
        self,
        job_class: type | Callable[..., Any] | str,
        data: Any = None,
        options: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> AsyncProcess:
        return self._wrap(await self._run(_loaded, self._sync.add_job, job_class, data, options, **kw))

    async def add_job_once(
        self,
        job_class: type | Callable[..., Any] | str,
        data: Any = None,
        options: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> AsyncProcess:
        return self._wrap(await self._run(_loaded, self._sync.add_job_once, job_class, data, options, **kw))

    async def add_chain(self, steps: Iterable[Any]) -> list[AsyncProcess]:
        # A generator is read here, on the caller's thread; anything add_chain refuses goes to it as it is.
        listed = isinstance(steps, Iterable) and not isinstance(steps, (str, bytes, Mapping))
        added = await self._run(self._sync.add_chain, list(steps) if listed else steps)
        return [self._wrap(process) for process in added]

    async def set_limit(self, key: str, concurrency: int | None = None, rate: str | None = None) -> None:
        await self._run(self._sync.set_limit, key, concurrency, rate)

    async def remove_limit(self, key: str) -> None:
        await self._run(self._sync.remove_limit, key)

    async def limits(self) -> dict[str, dict[str, Any]]:
        return await self._run(self._sync.limits)

    async def pause(self, key: str) -> None:
        await self._run(self._sync.pause, key)

    async def resume(self, key: str) -> None:
        await self._run(self._sync.resume, key)

    async def paused(self) -> list[str]:
        return await self._run(self._sync.paused)

    async def get_job(self, job_id: ObjectId | str) -> AsyncProcess:
        return self._wrap(await self._run(_loaded, self._sync.get_job, job_id))

    def get_jobs(self, query: Mapping[str, Any] | None = None) -> AsyncJobs:
        """``async for process in scheduler.get_jobs(query)``, or ``await`` it for a list. As
        :meth:`Scheduler.get_jobs`: ``None`` lists the unfinished jobs, ``{}`` every job."""
        return AsyncJobs(self, query)

    async def cancel_job(self, job_id: ObjectId | str) -> None:
        await self._run(self._sync.cancel_job, job_id)

    async def requeue_job(self, job_id: ObjectId | str) -> AsyncProcess:
        return self._wrap(await self._run(_loaded, self._sync.requeue_job, job_id))

    async def flush(self) -> None:
        await self._run(self._sync.flush)

    async def update_progress(self, job_id: ObjectId | str, progress: float | None = None) -> None:
        await self._run(self._sync.update_progress, job_id, progress)

    async def wait_for(
        self,
        processes: Iterable[AsyncProcess | Process] | AsyncProcess,
        options: int = 0,
        timeout: float | None = None,
    ) -> None:
        """Until every listed job has finished (as Scheduler.wait_for), without blocking the event loop."""
        if isinstance(processes, (AsyncProcess, Process)):
            items: list[Any] = [processes]
        elif isinstance(processes, Iterable) and not isinstance(processes, (str, bytes, Mapping)):
            items = list(processes)
        else:
            raise InvalidArgumentError(f"wait_for() requires AsyncProcess objects, got {type(processes).__name__}")
        synced = [p.process if isinstance(p, AsyncProcess) else p for p in items]
        stop = threading.Event()
        self._stops.add(stop)
        try:
            await self._run_long(_finished, self._sync, synced, options, timeout, stop)
        finally:
            stop.set()
            self._stops.discard(stop)
        self._check_open("wait_for() was ended by close() before the jobs finished")

    async def listen(
        self,
        callback: Callable[[AsyncProcess], Any],
        query: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Call ``callback(async_process)`` (a function or a coroutine function) on the event loop once per status
        change of a job matching ``query``, until it returns True."""
        if not callable(callback):
            raise InvalidArgumentError(f"callback must be callable, got {callback!r}")
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        async def answer(process: Process) -> bool:
            verdict = callback(AsyncProcess(process, self))
            if inspect.isawaitable(verdict):
                verdict = await verdict
            return verdict is True

        def bridge(process: Process) -> bool:
            process.error  # noqa: B018 - loads the outcome here, in the listening thread, not on the loop
            future = asyncio.run_coroutine_threadsafe(answer(process), loop)
            while True:
                try:
                    return future.result(timeout=0.5)
                except concurrent.futures.TimeoutError:
                    if stop.is_set():  # the listening coroutine was cancelled: end the sync listen too
                        future.cancel()
                        return True

        self._stops.add(stop)
        try:
            await self._run_long(self._sync.listen, bridge, query, timeout, stop=stop)
        finally:
            stop.set()
            self._stops.discard(stop)
        self._check_open("listen() was ended by close()")

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _check_open(self, what: str = "this AsyncScheduler is closed") -> None:
        if self._closed:
            raise SchedulerClosedError(what)

    async def _run(self, function: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A short call (a few round trips) on the pool."""
        self._check_open()
        loop = asyncio.get_running_loop()
        self._loop = loop
        return await loop.run_in_executor(self._executor, functools.partial(function, *args, **kw))

    async def _run_long(self, function: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A wait or listen, on a thread of its own: any number may be pending without starving short calls.
        Daemon threads: one the caller stopped ends within a second, and none holds the interpreter open."""
        self._check_open()
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[T] = loop.create_future()

        def settle(outcome: Callable[[], None]) -> None:
            if not future.done():
                outcome()

        def work() -> None:
            try:
                result = function(*args, **kw)
            except BaseException as exc:  # handed to the awaiting coroutine, as run_in_executor would
                error = exc
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits any more
                    loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

        def tracked() -> None:
            try:
                work()
            finally:
                self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=tracked, name="taskscheduler-async-wait", daemon=True)
        self._threads.add(thread)
        thread.start()
        return await future

    def _wrap(self, process: Process) -> AsyncProcess:
        return AsyncProcess(process, self)


class AsyncJobs:
    """The jobs ``AsyncScheduler.get_jobs`` finds: an async iterator, or awaitable as a list."""

    def __init__(self, scheduler: AsyncScheduler, query: Mapping[str, Any] | None) -> None:
        self._scheduler = scheduler
        self._query = query

    def __aiter__(self) -> AsyncIterator[AsyncProcess]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[AsyncProcess]:
        run = self._scheduler._run
        found: Iterator[Process] = await run(self._scheduler.scheduler.get_jobs, self._query)
        while True:
            batch = await run(_next_batch, found)
            for process in batch:
                yield AsyncProcess(process, self._scheduler)
            if len(batch) < BATCH:
                return

    async def _list(self) -> list[AsyncProcess]:
        return [p async for p in self]

    def __await__(self) -> Generator[Any, None, list[AsyncProcess]]:
        return self._list().__await__()


class AsyncProcess:
    """The handle of one job for asyncio code: the Process properties, and ``await refresh()``, ``await wait()``,
    ``await runs()``. ``error`` and ``result`` are read when the process is loaded, never on the event loop."""

    def __init__(self, process: Process, scheduler: AsyncScheduler) -> None:
        self.process = process
        self._scheduler = scheduler

    def __repr__(self) -> str:
        return f"<Async{repr(self.process)[1:]}"  # a malformed status reads as such, never raises

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (AsyncProcess, Process)) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def id(self) -> ObjectId:
        return self.process.id

    @property
    def job_class(self) -> str:
        return self.process.job_class

    @property
    def data(self) -> Any:
        return self.process.data

    @property
    def options(self) -> dict[str, Any]:
        return self.process.options

    @property
    def status(self) -> JobStatus:
        return self.process.status

    @property
    def progress(self) -> float:
        return self.process.progress

    @property
    def worker(self) -> ObjectId | None:
        return self.process.worker

    @property
    def created(self) -> datetime | None:
        return self.process.created

    @property
    def started(self) -> datetime | None:
        return self.process.started

    @property
    def ended(self) -> datetime | None:
        return self.process.ended

    @property
    def run(self) -> int:
        return self.process.run

    @property
    def error(self) -> dict[str, Any] | None:
        return self.process.error

    @property
    def result(self) -> Any:
        return self.process.result

    async def refresh(self) -> AsyncProcess:
        await self._scheduler._run(_loaded, self.process.refresh)
        return self

    async def wait(self, timeout: float | None = None, throw: bool = False) -> AsyncProcess:
        await self._scheduler.wait_for([self], Scheduler.OPTION_THROW_EXCEPTION if throw else 0, timeout)
        return self

    @property
    def blocked_by(self) -> Awaited[list[ObjectId]]:
        """The dependencies not yet DONE, read from MongoDB: ``await p.blocked_by`` (as ``Process.blocked_by``
        reads) or ``await p.blocked_by()``."""
        return Awaited(lambda: self._scheduler._run(lambda: self.process.blocked_by))

    async def runs(self) -> list[dict[str, Any]]:
        return await self._scheduler._run(self.process.runs)

    def to_dict(self) -> dict[str, Any]:
        return self.process.to_dict()


# The Scheduler's option names, on the async class too.
for _name in dir(Scheduler):
    if _name.startswith("OPTION_"):
        setattr(AsyncScheduler, _name, getattr(Scheduler, _name))


def _release(executor: ThreadPoolExecutor, close_client: Callable[[], None]) -> None:
    executor.shutdown(wait=False, cancel_futures=True)
    close_client()


def _loaded(read: Callable[..., Process], *args: Any, **kw: Any) -> Process:
    """The process ``read(*args, **kw)`` returns, with the outcome of its last run read here (in the thread), so
    ``error`` and ``result`` never touch MongoDB from the event loop."""
    process = read(*args, **kw)
    process.error  # noqa: B018 - loads and caches the outcome
    return process


def _finished(
    scheduler: Scheduler, processes: list[Process], options: int, timeout: float | None, stop: threading.Event
) -> None:
    try:
        scheduler.wait_for(processes, options, timeout, stop=stop)
    finally:  # also after WaitTimeoutError or JobFailedError: the processes were updated meanwhile
        for process in processes:
            with contextlib.suppress(Exception):
                process.error  # noqa: B018 - loads and caches the outcome off the loop


def _next_batch(found: Iterator[Process]) -> list[Process]:
    batch = []
    for process in found:
        process.error  # noqa: B018 - loads and caches the outcome off the loop
        batch.append(process)
        if len(batch) >= BATCH:
            break
    return batch


def _deliver(handler: Callable[[str, Any], Any], name: str, payload: Any) -> None:
    outcome = handler(name, payload)
    if inspect.isawaitable(outcome):
        asyncio.ensure_future(_awaitable(outcome))


async def _awaitable(outcome: Awaitable[Any]) -> Any:
    return await outcome
