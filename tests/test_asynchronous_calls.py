"""AsyncScheduler's calls without I/O (awaited or not, after close), AsyncProcess.blocked_by (awaited, called,
in a task, across loops), and how user code using them type-checks under mypy --strict."""

from __future__ import annotations

import asyncio
import copy
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient, MongoClient

from taskscheduler import AsyncScheduler
from taskscheduler.constants import JobStatus
from taskscheduler.errors import SchedulerClosedError
from taskscheduler.ops.embedded import EmbeddedServer

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def async_db(server: EmbeddedServer, db_name: str) -> Any:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
    yield client[db_name]
    sync: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    sync.drop_database(db_name)
    sync.close()
    asyncio.run(client.close())


def test_options_and_awaitables_await_twice_copy_pickle_and_cross_loops(async_db: Any) -> None:
    """Held: Options awaited twice, pickled, copied, JSON-able; what set_options returns awaited twice; the
    scheduler gathered; blocked_by awaited twice from one Awaited, called, in a task and from another thread's
    loop."""
    import json

    async def main() -> None:
        s = AsyncScheduler(async_db)
        try:
            opts = s.get_options()
            assert await opts == await opts == dict(opts)
            assert pickle.loads(pickle.dumps(opts)) == opts and copy.deepcopy(opts) == opts
            json.dumps(opts, default=str)
            same = s.set_options({"default_retry": 1})
            assert (await same) is s and (await same) is s
            assert await asyncio.gather(s, s.on("done", lambda *_: None)) == [s, s]
            p = await s.add_job("sample_jobs:Noop")
            pending = p.blocked_by
            assert await pending == [] and await pending == [] and await p.blocked_by() == []
            assert await asyncio.create_task(p.blocked_by()) == []  # type: ignore[arg-type]
            elsewhere: list[Any] = []

            def other_loop() -> None:
                async def read() -> Any:
                    return (await s.get_options())["default_retry"], await p.blocked_by

                elsewhere.append(asyncio.run(read()))

            t = threading.Thread(target=other_loop)
            t.start()
            t.join(30)
            assert elsewhere == [(1, [])]
        finally:
            await s.close()

    asyncio.run(main())


def test_awaited_no_io_calls_on_a_closed_scheduler_raise(async_db: Any) -> None:
    async def main() -> None:
        s = AsyncScheduler(async_db)
        await s.close()
        with pytest.raises(SchedulerClosedError):
            await s.limits()  # what every I/O call does
        with pytest.raises(SchedulerClosedError):
            await s.set_options({"default_retry": 2})
        with pytest.raises(SchedulerClosedError):
            await s.on("done", lambda *_: None)

    asyncio.run(main())


def test_async_wait_then_close_at_once(async_db: Any) -> None:
    """Held: an AsyncScheduler wait answered by a cancel, then close() at once; close() again is a no-op and a call
    after it raises SchedulerClosedError."""

    async def main() -> None:
        s = AsyncScheduler(async_db)
        p = await s.add_job("sample_jobs:Noop")

        async def cancel_soon() -> None:
            await asyncio.sleep(0.2)
            await s.cancel_job(p.id)

        task = asyncio.create_task(cancel_soon())
        await p.wait(timeout=10)
        await task
        await s.close()
        await s.close()
        assert p.status == JobStatus.CANCELED
        with pytest.raises(SchedulerClosedError):
            await p.refresh()

    asyncio.run(main())


USER_CODE_OK = """
from __future__ import annotations

from typing import Any

from bson import ObjectId

from taskscheduler import AsyncScheduler
from taskscheduler.client.asynchronous import AsyncProcess


def handler(name: str, process: Any) -> None:
    print(name, process)


async def use(scheduler: AsyncScheduler, p: AsyncProcess) -> None:
    same: AsyncScheduler = await scheduler.set_options({"default_retry": 1})
    again: AsyncScheduler = await scheduler.on("done", handler)
    options: dict[str, Any] = await scheduler.get_options()
    plain: dict[str, Any] = scheduler.get_options()
    read: list[ObjectId] = await p.blocked_by
    called: list[ObjectId] = await p.blocked_by()
    print(same, again, options, plain, read, called)
"""

USER_CODE_TASKS = """
from __future__ import annotations

import asyncio

from bson import ObjectId

from taskscheduler.client.asynchronous import AsyncProcess


async def in_a_task(p: AsyncProcess) -> list[ObjectId]:
    return await asyncio.create_task(p.blocked_by())


def from_sync_code(p: AsyncProcess) -> list[ObjectId]:
    return asyncio.run(p.blocked_by())
"""


def mypy_strict(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    user = tmp_path / "user_code.py"
    user.write_text(code)
    return subprocess.run(
        [str(VENV_BIN / "mypy"), "--strict", "--cache-dir", str(tmp_path / "cache"), str(user)],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_mypy_strict_accepts_the_new_awaits(tmp_path: Path) -> None:
    """Held: `await set_options/on/get_options` and both forms of blocked_by type-check under --strict."""
    out = mypy_strict(USER_CODE_OK, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_accepts_blocked_by_called_as_a_coroutine(tmp_path: Path) -> None:
    out = mypy_strict(USER_CODE_TASKS, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
