"""The CLI's output and demo: tables sized by hostile COLUMNS values, `--utc` before, after and twice, a command
whose server goes away before it closes, and `demo --mongodb-uri` (one line on an unreachable URI, the other
jobs of its database left alone, no password printed, the database named in its hints)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from helpers import CONSOLE_SCRIPT
from taskscheduler import Scheduler
from taskscheduler.constants import JobStatus
from taskscheduler.ops.embedded import EmbeddedServer


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    full_env.update(env or {})
    return subprocess.run(
        [CONSOLE_SCRIPT, *args], capture_output=True, text=True, env=full_env, timeout=timeout, stdin=subprocess.DEVNULL
    )


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
def test_demo_on_a_deployment_named_on_the_command_line_leaves_the_other_jobs_of_its_database_alone(
    server: EmbeddedServer, db_name: str, scheduler: Scheduler
) -> None:
    """SPEC 3: the connection options are accepted after every command's name; `demo --mongodb-uri URI` runs the
    examples on that deployment (in --database) and cancels only its own at its end; the same URI in
    TASKSCHEDULER_MONGODB_URI alone (set for the other commands) does not move the demo off its embedded server."""
    mine = scheduler.add_job("myapp.mail:Send", {"to": "x"})  # no node here serves it: it waits
    later = scheduler.add_job("myapp.report:Build", None, interval=3600)
    out = cli("demo", "--plain", "--seconds", "30", "--mongodb-uri", server.uri, "--database", db_name, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "embedded server" not in out.stdout and f"(database {db_name})" in out.stdout
    classes = {p.job_class for p in scheduler.get_jobs({})}
    assert any(name.startswith("taskscheduler.cli.demo:") for name in classes), classes
    assert scheduler.get_job(mine.id).status == JobStatus.WAITING
    assert scheduler.get_job(later.id).status != JobStatus.CANCELED
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    demo = subprocess.Popen(
        [CONSOLE_SCRIPT, "demo", "--plain"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(env, TASKSCHEDULER_MONGODB_URI=server.uri),
    )
    try:
        assert demo.stdout is not None
        assert demo.stdout.readline().startswith("embedded server: mongodb://")
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=30)
        if demo.stdout is not None:
            demo.stdout.close()


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
def test_demo_keep_never_prints_the_uris_password(kept_demo: Any) -> None:
    assert "kept running until Ctrl-C" in kept_demo["output"], kept_demo["output"]
    assert "Sekr1tPassw0rd" not in kept_demo["output"]


@pytest.mark.e2e
def test_demo_keep_hint_names_the_database_it_runs_in(kept_demo: Any) -> None:
    hint = next(line for line in kept_demo["output"].splitlines() if line.startswith("add jobs:"))
    assert f"--database {kept_demo['database']}" in hint, hint


def test_demo_keep_with_a_uri_stops_cleanly_on_ctrl_c(kept_demo: Any) -> None:
    """Held: the kept demo on a deployment ends on Ctrl-C with its node stopped (exit code 0 said)."""
    assert "queue node stopped (exit code 0)" in kept_demo["output"], kept_demo["output"]
    assert "Traceback" not in kept_demo["output"]
