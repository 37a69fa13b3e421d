"""Attacks on the day's changes: wait_for letting go of its change stream (the driver kills the cursor later), the
CLI's `--utc` after a command, piped tables sized by COLUMNS, `demo --mongodb-uri`, and the awaitable no-I/O
AsyncScheduler calls and `AsyncProcess.blocked_by`. Problems are strict xfails naming what is wrong; the rest is
what held."""

from __future__ import annotations

import asyncio
import copy
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from bson.int64 import Int64
from pymongo import AsyncMongoClient, MongoClient, monitoring
from pymongo.database import Database

from taskscheduler import AsyncScheduler, Scheduler
from taskscheduler.constants import JobStatus
from taskscheduler.errors import SchedulerClosedError
from taskscheduler.ops.embedded import EmbeddedServer

VENV_BIN = Path(sys.executable).parent
CONSOLE_SCRIPT = str(VENV_BIN / "taskscheduler")


# -- helpers ---------------------------------------------------------------------------------------------------------


class CursorIds(monitoring.CommandListener):
    """The ids of the cursors the aggregates (change streams) of a client opened."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.command_name == "aggregate":
            cursor_id = event.reply.get("cursor", {}).get("id", 0)
            if cursor_id:
                self.ids.append(int(cursor_id))


def still_open(db: Database[dict[str, Any]], ids: list[int]) -> list[int]:
    """Which of these change stream cursors the server still held (it kills them now: a probe, not a read)."""
    alive: list[int] = []
    for start in range(0, len(ids), 500):
        reply = db.command({"killCursors": "$cmd.aggregate", "cursors": [Int64(i) for i in ids[start : start + 500]]})
        alive += [int(i) for i in reply.get("cursorsKilled", [])]
    return alive


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    full_env.update(env or {})
    return subprocess.run(
        [CONSOLE_SCRIPT, *args], capture_output=True, text=True, env=full_env, timeout=timeout, stdin=subprocess.DEVNULL
    )


def finished_job(scheduler: Scheduler) -> Any:
    p = scheduler.add_job("sample_jobs:Noop")
    scheduler.cancel_job(p.id)
    return p


# -- 1. wait_for lets go of its change stream -----------------------------------------------------------------------


def test_thousands_of_waits_leave_no_cursor_behind_once_the_driver_had_a_second(
    server: EmbeddedServer, db_name: str
) -> None:
    """Held: 1500 waits in a row (each opens a change stream and drops it) pile up cursors on the server for about
    a second, and the driver's background thread kills every one of them; a client closed right after the last
    wait kills what is still queued."""
    listener = CursorIds()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[listener])
    probe: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    try:
        scheduler = Scheduler(client[db_name])
        p = finished_job(scheduler)
        for _ in range(1500):
            scheduler.wait_for([p], timeout=10)
        assert len(listener.ids) >= 1500
        time.sleep(2.5)
        assert still_open(probe[db_name], listener.ids) == []
        # then waits followed at once by close(): the queued kills go with it
        listener.ids.clear()
        for _ in range(200):
            scheduler.wait_for([p], timeout=10)
        client.close()
        assert still_open(probe[db_name], listener.ids) == []
    finally:
        client.close()
        probe.drop_database(db_name)
        probe.close()


def test_waits_from_many_threads_at_once_all_answer_and_leave_no_cursor(server: EmbeddedServer, db_name: str) -> None:
    """Held: 8 threads sharing one Scheduler, each waiting 150 times on finished jobs and on jobs cancelled while
    they wait: every wait answers, no error, and no cursor is left after a second."""
    listener = CursorIds()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[listener])
    probe: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    errors: list[BaseException] = []
    try:
        scheduler = Scheduler(client[db_name])
        done = finished_job(scheduler)

        def waiter() -> None:
            try:
                for n in range(150):
                    if n % 50 == 0:  # one that really waits for a change
                        p = scheduler.add_job("sample_jobs:Noop")
                        threading.Timer(0.2, scheduler.cancel_job, [p.id]).start()
                        scheduler.wait_for([p], timeout=10)
                        assert p.status == JobStatus.CANCELED
                    else:
                        scheduler.wait_for([done], timeout=10)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        threads = [threading.Thread(target=waiter) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        time.sleep(2.5)
        assert still_open(probe[db_name], listener.ids) == []
    finally:
        client.close()
        probe.drop_database(db_name)
        probe.close()


WAIT_THEN_EXIT = """
import sys, threading
from pymongo import MongoClient, monitoring
from taskscheduler import Scheduler

class Ids(monitoring.CommandListener):
    ids = []
    def started(self, e): pass
    def failed(self, e): pass
    def succeeded(self, e):
        if e.command_name == "aggregate" and e.reply["cursor"]["id"]:
            Ids.ids.append(e.reply["cursor"]["id"])

client = MongoClient(sys.argv[1], tz_aware=True, event_listeners=[Ids()])
scheduler = Scheduler(client[sys.argv[2]])
p = scheduler.add_job("sample_jobs:Noop")
threading.Timer(0.3, scheduler.cancel_job, [p.id]).start()
p.wait(timeout=10)                                  # README's quick start: wait, print, exit
print(p.status.name, *Ids.ids)
"""


@pytest.mark.xfail(
    strict=True,
    reason="a script that exits right after wait_for/Process.wait (README's quick start, examples/waiting.py: no "
    "client.close()) now leaves its change stream's cursor open on the server until its 10 min timeout; before "
    "a5b12a8 wait_for killed it before returning (docs/jobs.md only asks scripts to close their client)",
)
def test_a_script_that_exits_right_after_a_wait_leaves_no_cursor_on_the_server(
    server: EmbeddedServer, db: Database[dict[str, Any]], db_name: str, tmp_path: Path
) -> None:
    script = tmp_path / "wait_then_exit.py"
    script.write_text(WAIT_THEN_EXIT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, str(script), server.uri, db_name], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    status, *ids = out.stdout.split()
    assert status == "CANCELED" and ids, out.stdout
    time.sleep(1.5)  # what the driver's thread would have needed, had the process lived
    assert still_open(db, [int(i) for i in ids]) == []


def test_a_wait_then_fork_works_in_parent_and_child(scheduler: Scheduler) -> None:
    """Held: a wait, then os.fork() at once; the child can wait again through the inherited client (pymongo's
    fork warning aside), the parent too."""
    p = finished_job(scheduler)
    scheduler.wait_for([p], timeout=10)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            import warnings

            warnings.simplefilter("ignore")
            scheduler.wait_for([p], timeout=10)
            code = 0 if scheduler.get_job(p.id).status == JobStatus.CANCELED else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    scheduler.wait_for([p], timeout=10)
    assert p.status == JobStatus.CANCELED


# -- 2. the CLI -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("columns", ["0", "1", "-5", "abc", "39", "99999999999999999999", " 80", "80.5", ""])
def test_hostile_columns_values_give_a_table_that_is_not_cut(
    server: EmbeddedServer, db_name: str, scheduler: Scheduler, columns: str
) -> None:
    """Held: COLUMNS that is not a sane width (0, 1, negative, text, huge) prints the same table as no COLUMNS,
    exit 0, without a traceback; a huge width does not blow the output up."""
    p = scheduler.add_job("sample_jobs:Noop")
    out = cli("jobs", "--mongodb-uri", server.uri, "--database", db_name, env={"COLUMNS": columns})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert str(p.id) in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 200
    assert len(out.stdout) < 5000


@pytest.mark.xfail(
    strict=True,
    reason="COLUMNS holding a digit that str.isdigit() accepts but int() refuses (superscript '²') crashes every "
    "table command with a ValueError traceback (display.console: columns.isdigit() then int(columns))",
)
def test_columns_with_a_superscript_digit_is_ignored_not_a_traceback(
    server: EmbeddedServer, db_name: str, scheduler: Scheduler
) -> None:
    scheduler.add_job("sample_jobs:Noop")
    out = cli("jobs", "--mongodb-uri", server.uri, "--database", db_name, env={"COLUMNS": "8²"})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr


def test_utc_twice_and_from_the_environment(server: EmbeddedServer, db_name: str, scheduler: Scheduler) -> None:
    """Held: `--utc` before and after the command, twice after it, or TASKSCHEDULER_UTC=1 all show UTC;
    TASKSCHEDULER_UTC=0 keeps the local zone; a non-boolean value is one line, exit 2."""
    p = scheduler.add_job("sample_jobs:Noop")
    conn = ("--mongodb-uri", server.uri, "--database", db_name)
    zone = {"TZ": "Asia/Tokyo"}
    for args, env in (
        (("--utc", "show", str(p.id), "--utc"), zone),
        (("show", str(p.id), "--utc", "--utc"), zone),
        (("show", str(p.id)), {**zone, "TASKSCHEDULER_UTC": "1"}),
    ):
        out = cli(*args, *conn, env=env)
        assert out.returncode == 0 and "UTC" in out.stdout and "JST" not in out.stdout, (args, out.stdout, out.stderr)
    out = cli("show", str(p.id), *conn, env={**zone, "TASKSCHEDULER_UTC": "0"})
    assert out.returncode == 0 and "JST" in out.stdout, out.stdout
    out = cli("show", str(p.id), *conn, env={**zone, "TASKSCHEDULER_UTC": "maybe"})
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_command_whose_server_goes_away_before_it_closes_exits_cleanly(tmp_path: Path) -> None:
    """Held: `add` on a server that is stopped right after the insert: the room give-back and the client's close
    at the end fail quietly; exit 0 with the id printed, no traceback."""
    srv = EmbeddedServer(port=0, data_dir=":memory:")
    srv.start()
    try:
        script = tmp_path / "gone.py"
        script.write_text(
            textwrap.dedent(
                """
                import os, signal, sys
                from taskscheduler.client.scheduler import Scheduler
                from taskscheduler.cli import main
                added = Scheduler.add_job
                def add(self, *a, **k):
                    p = added(self, *a, **k)
                    os.kill(int(sys.argv[2]), signal.SIGKILL)   # the server is gone before the command ends
                    return p
                Scheduler.add_job = add
                main(["add", "x.y:Z", "--no-import-check", "--mongodb-uri", sys.argv[1], "--database", "gone"])
                """
            )
        )
        assert srv._proc is not None
        pid = srv._proc.pid
        out = subprocess.run(
            [sys.executable, str(script), srv.uri, str(pid)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr and len(out.stdout.strip()) == 24, (out.stdout, out.stderr)
    finally:
        srv.stop()


def test_demo_on_an_unreachable_uri_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Held: `demo --mongodb-uri` naming nothing that answers: exit 1, one `Error:` line on stderr, no traceback,
    no queue node started (it checks the deployment first), the password never printed."""
    out = cli("demo", "--plain", "--mongodb-uri", "mongodb://bob:hunter2pw@127.0.0.1:1/", timeout=90)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("Error:") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "hunter2pw" not in out.stdout + out.stderr
    assert "queue node" not in out.stdout


@pytest.mark.e2e
@pytest.mark.xfail(
    strict=True,
    reason="`demo --mongodb-uri URI --database DB` cancels every unfinished job of DB at its end "
    "(_show: `for p in scheduler.get_jobs(): cancel_job`), not only its own examples: on a real deployment it "
    "cancels the user's jobs",
)
def test_demo_on_a_deployment_leaves_the_other_jobs_of_its_database_alone(
    server: EmbeddedServer, db_name: str, scheduler: Scheduler
) -> None:
    mine = scheduler.add_job("myapp.mail:Send", {"to": "x"})  # no node here serves it: it waits
    later = scheduler.add_job("myapp.report:Build", None, interval=3600)
    out = cli("demo", "--plain", "--seconds", "30", "--mongodb-uri", server.uri, "--database", db_name, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert scheduler.get_job(mine.id).status == JobStatus.WAITING
    assert scheduler.get_job(later.id).status != JobStatus.CANCELED


@pytest.fixture(scope="module")
def kept_demo(server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`demo --keep` on the test server through a URI with a password (a user of a database of its own), run
    until it says what it keeps, then Ctrl-C: its output."""
    database = f"t_kept_demo_{os.getpid()}"
    admin: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    admin[database].command("createUser", "demo_user", pwd="Sekr1tPassw0rd", roles=["dbOwner"])
    host = server.uri.split("://", 1)[1].split("/", 1)[0]
    uri = f"mongodb://demo_user:Sekr1tPassw0rd@{host}/?directConnection=true&authSource={database}"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    demo = subprocess.Popen(
        [CONSOLE_SCRIPT, "demo", "--plain", "--keep", "--seconds", "30", "--mongodb-uri", uri, "--database", database],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path_factory.mktemp("kept"),
    )
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("add jobs:"):
                break
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
        lines.append(rest)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
        admin[database].command("dropAllUsersFromDatabase")
        admin.drop_database(database)
        admin.close()
    return {"output": "".join(lines), "database": database, "code": demo.returncode}


@pytest.mark.e2e
@pytest.mark.xfail(
    strict=True,
    reason="`demo --keep --mongodb-uri URI` prints the URI's password: its 'add jobs: TASKSCHEDULER_MONGODB_URI=...' "
    "hint quotes the raw URI (demo._keep), though every other line masks it",
)
def test_demo_keep_never_prints_the_uris_password(kept_demo: Any) -> None:
    assert "kept running until Ctrl-C" in kept_demo["output"], kept_demo["output"]
    assert "Sekr1tPassw0rd" not in kept_demo["output"]


@pytest.mark.e2e
@pytest.mark.xfail(
    strict=True,
    reason="`demo --keep --database DB` tells the operator to add jobs with `--database demo`: the hint in "
    "demo._keep hard-codes the database, so the jobs it suggests go where no kept node looks",
)
def test_demo_keep_hint_names_the_database_it_runs_in(kept_demo: Any) -> None:
    hint = next(line for line in kept_demo["output"].splitlines() if line.startswith("add jobs:"))
    assert f"--database {kept_demo['database']}" in hint, hint


def test_demo_keep_with_a_uri_stops_cleanly_on_ctrl_c(kept_demo: Any) -> None:
    """Held: the kept demo on a deployment ends on Ctrl-C with its node stopped (exit code 0 said)."""
    assert "queue node stopped (exit code 0)" in kept_demo["output"], kept_demo["output"]
    assert "Traceback" not in kept_demo["output"]


# -- 3. asyncio -----------------------------------------------------------------------------------------------------


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


@pytest.mark.xfail(
    strict=True,
    reason="AsyncScheduler.close() says calls after it raise SchedulerClosedError, but set_options, get_options and "
    "on (now awaitable 'coroutines') still work on a closed scheduler: set_options changes its options and on() "
    "connects a handler that can never fire, silently",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="`p.blocked_by()` is typed Awaitable, no longer a coroutine: mypy --strict rejects "
    "asyncio.create_task(p.blocked_by()) and asyncio.run(p.blocked_by()), which type-checked when blocked_by was "
    "an async def (and still work at run time)",
)
def test_mypy_strict_accepts_blocked_by_called_as_a_coroutine(tmp_path: Path) -> None:
    out = mypy_strict(USER_CODE_TASKS, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
