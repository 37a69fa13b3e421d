"""The command line, run as a real subprocess against the test server."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from bson import ObjectId

from helpers import TESTS_DIR, Node, in_a_terminal, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import fields_equal, literal, utcnow


@pytest.fixture
def run(server: EmbeddedServer, db_name: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    def call(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        full_env = dict(
            os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name
        )
        full_env["TZ"] = "UTC"  # times are shown in the terminal's zone: the same on every machine (a test may set it)
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "taskscheduler", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
        )

    return call


#: The console script users run (``taskscheduler``), not ``python -m taskscheduler``: only ``-m`` puts the
#: current folder on ``sys.path``, so tests that run ``-m`` alone miss what users see.
SCRIPT = str(Path(sys.executable).with_name("taskscheduler"))


@pytest.fixture
def script(server: EmbeddedServer, db_name: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs the console script as a user does: from a folder of their own, no PYTHONPATH set for them."""

    def call(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        full_env.update(TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name, **(env or {}))
        return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=60)

    return call


def _job_module(folder: Path, name: str = "mymod") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text("def job(data):\n    return data\n")
    return folder


def test_add_finds_job_modules_in_the_current_folder_as_queue_does(
    script: Any, scheduler: Scheduler, tmp_path: Path
) -> None:
    project = _job_module(tmp_path / "project")
    added = script("add", "mymod:job", cwd=project)
    assert added.returncode == 0, added.stderr
    assert scheduler.get_job(ObjectId(added.stdout.strip())).job_class == "mymod:job"


def test_add_path_names_where_job_modules_are(script: Any, scheduler: Scheduler, tmp_path: Path) -> None:
    _job_module(tmp_path / "jobs_here")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert script("add", "mymod:job", "--path", str(tmp_path / "jobs_here"), cwd=elsewhere).returncode == 0
    relative = script("add", "mymod:job", "--path", "../jobs_here", cwd=elsewhere)
    assert relative.returncode == 0, relative.stderr
    assert scheduler.store.jobs.count_documents({}) == 2


def test_a_failed_import_check_says_where_it_looked_and_how_to_add_anyway(
    script: Any, scheduler: Scheduler, tmp_path: Path
) -> None:
    out = script("add", "mymod:job", cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "No module named 'mymod'" in out.stderr and "--no-import-check" in out.stderr
    assert str(tmp_path) in out.stderr and "--path" in out.stderr
    assert scheduler.store.jobs.count_documents({}) == 0


def test_add_jobs_show_cancel_flush(run: Any, scheduler: Scheduler) -> None:
    added = run("add", "sample_jobs:Echo", "--data", '{"n": 1}', "--retry", "2", "--timeout", "5")
    assert added.returncode == 0, added.stderr
    job_id = ObjectId(added.stdout.strip())
    p = scheduler.get_job(job_id)
    assert p.data == {"n": 1} and p.options["retry"] == 2 and p.options["timeout"] == 5
    listed = run("jobs", "--json")
    assert listed.returncode == 0
    assert [j["_id"] for j in json.loads(listed.stdout)] == [str(job_id)]  # plain JSON, not Extended JSON
    assert json.loads(listed.stdout)[0]["created"].endswith("+00:00")
    table = run("jobs")
    assert "sample_jobs:Echo" in table.stdout and "waiting" in table.stdout and "1 of 1 jobs" in table.stdout
    shown = run("show", str(job_id), "--json")
    assert json.loads(shown.stdout)["status_name"] == "WAITING"
    text = run("show", str(job_id)).stdout
    assert '"at": "now"' in text and "1970" not in text  # at 0: no start time asked for
    assert run("cancel", str(job_id)).returncode == 0
    assert scheduler.get_job(job_id).status == JobStatus.CANCELED
    assert json.loads(run("jobs", "--json", "--status", "canceled").stdout)[0]["status"] == JobStatus.CANCELED
    assert run("flush", "--yes").returncode == 0
    assert list(scheduler.get_jobs({})) == []


def test_postponed_add_with_iso_time(run: Any, scheduler: Scheduler) -> None:
    out = run("add", "sample_jobs:Noop", "--at", "2099-01-01T00:00:00+00:00")
    assert out.returncode == 0, out.stderr
    assert scheduler.get_job(ObjectId(out.stdout.strip())).status == JobStatus.POSTPONED


@pytest.mark.parametrize(
    "args",
    [
        ("add", "sample_jobs:Noop", "--data", "{not json"),
        ("add", "sample_jobs:Noop", "--retry", "abc"),
        ("add", "sample_jobs:Noop", "--retry", "2147483648"),  # below -1 is endless (upstream); above int32 is not
        ("add", "sample_jobs:Noop", "--at", "tomorrow"),
        ("add", "no_such_module:Job"),
        ("show", "nope"),
        ("show", str(ObjectId())),
        ("cancel", "123"),
        ("flush",),
        ("queue", "--pm", "weird"),
        ("queue", "--min-children", "3", "--max-children", "2"),
        ("jobs", "--status", "sleepy"),
        ("add", "sample_jobs:Noop", "--at", "99999999999999"),
        ("add", "sample_jobs:Noop", "--database", "bad/name"),
        ("requeue", str(ObjectId())),
        ("queue", "--import", "sample_jobs", "--orphaned-timeout", "0.5"),
        ("add", "sample_jobs:Noop", "--cron", "every minute"),
        ("add", "sample_jobs:Noop", "--cron", "@daily", "--timezone", "Atlantis/Capital"),
        ("add", "sample_jobs:Noop", "--cron", "@daily", "--interval", "60"),
        ("add", "sample_jobs:Noop", "--priority", "500"),
        ("add", "sample_jobs:Noop", "--retry-backoff", "0.5"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run: Any, scheduler: Scheduler, args: tuple[str, ...]) -> None:
    out = run(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.startswith("Error:")
    assert scheduler.store.jobs.count_documents({}) == 0


def test_add_with_scheduling_options_and_show_the_next_run(run: Any, scheduler: Scheduler) -> None:
    added = run(
        "add",
        "sample_jobs:add_numbers",
        "--data",
        '{"a": 1, "b": 2}',
        "--cron",
        "30 9 * * mon-fri",
        "--timezone",
        "America/New_York",
        "--priority",
        "-20",
        "--retry",
        "3",
        "--retry-backoff",
        "2",
        "--retry-max-interval",
        "600",
        "--retry-jitter",
    )
    assert added.returncode == 0, added.stderr
    p = scheduler.get_job(ObjectId(added.stdout.strip()))
    assert p.job_class == "sample_jobs:add_numbers" and p.status == JobStatus.POSTPONED
    assert (p.options["cron"], p.options["timezone"], p.options["priority"]) == (
        "30 9 * * mon-fri",
        "America/New_York",
        -20,
    )
    assert (p.options["retry_backoff"], p.options["retry_max_interval"], p.options["retry_jitter"]) == (2.0, 600, True)
    shown = json.loads(run("show", str(p.id), "--json").stdout)
    next_run = datetime.fromisoformat(shown["next_run"])
    assert next_run.strftime("%H:%M") == "09:30" and next_run.weekday() < 5  # read in New York, shown there
    assert next_run.timestamp() == p.options["at"]
    text = run("show", str(p.id)).stdout
    in_utc = next_run.astimezone(timezone.utc)
    assert f"next_run: {in_utc:%Y-%m-%d %H:%M:%S} UTC ({next_run:%Y-%m-%d %H:%M:%S} America/New_York)" in text, text


def test_cancel_finished_job_is_exit_2(run: Any, scheduler: Scheduler) -> None:
    p = scheduler.add_job("test")
    done = {"status": literal(int(JobStatus.DONE)), "ended": literal(utcnow())}
    assert scheduler.store.transition(p.id, fields_equal({"status": int(JobStatus.WAITING)}), done)
    before = scheduler.store.find_job(p.id)
    out = run("cancel", str(p.id))
    assert out.returncode == 2 and "DONE" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert scheduler.store.find_job(p.id) == before


def test_unreachable_server_exit_1(run: Any) -> None:
    out = run("jobs", "--mongodb-uri", "mongodb://127.0.0.1:1/?directConnection=true")
    assert out.returncode == 1
    assert "cannot reach MongoDB" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("cannot reach MongoDB") == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_health_with_a_bad_node_id_is_bad_input_even_when_the_server_is_unreachable(run: Any) -> None:
    out = run("health", "--node", "bad-id", "--mongodb-uri", "mongodb://127.0.0.1:1/?directConnection=true")
    assert out.returncode == 2 and "not a node id" in out.stderr, out.stderr


def test_help_shows_env_vars(run: Any) -> None:
    out = run("queue", "--help")
    assert out.returncode == 0
    for var in (
        "TASKSCHEDULER_MONGODB_URI",
        "TASKSCHEDULER_PM",
        "TASKSCHEDULER_MAX_CHILDREN",
        "TASKSCHEDULER_ORPHANED_TIMEOUT",
        "TASKSCHEDULER_IMPORT",
    ):
        assert var in out.stdout


def test_env_var_sets_flag(run: Any, scheduler: Scheduler) -> None:
    out = run("add", "sample_jobs:Noop", env={"TASKSCHEDULER_DATABASE": "otherdb_" + ObjectId().__str__()})
    assert out.returncode == 0
    assert scheduler.store.jobs.count_documents({}) == 0  # it went to the other database


def test_every_flag_reads_its_env_var(run: Any, scheduler: Scheduler) -> None:
    out = run("add", "sample_jobs:Noop", env={"TASKSCHEDULER_TIMEOUT": "7", "TASKSCHEDULER_RETRY": "2"})
    assert out.returncode == 0, out.stderr
    p = scheduler.get_job(ObjectId(out.stdout.strip()))
    assert (p.options["timeout"], p.options["retry"]) == (7, 2)
    for command, var in (("add", "TASKSCHEDULER_AT"), ("jobs", "TASKSCHEDULER_LIMIT"), ("demo", "TASKSCHEDULER_PLAIN")):
        assert var in run(command, "--help").stdout


def test_watch_once_prints_jobs(run: Any, scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    out = run("watch", "--once")
    assert out.returncode == 0 and str(p.id) in out.stdout and "waiting" in out.stdout


def test_watch_live_under_a_pty(server: EmbeddedServer, db_name: str, scheduler: Scheduler) -> None:
    import pty

    p = scheduler.add_job("sample_jobs:Noop")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        import fcntl
        import struct
        import termios

        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        os.environ.update(TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name, COLUMNS="200")
        os.execv(sys.executable, [sys.executable, "-m", "taskscheduler", "watch", "--refresh", "0.2"])
    seen = b""
    deadline = time.monotonic() + 20
    try:
        while str(p.id).encode() not in seen and time.monotonic() < deadline:
            import select

            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 65536)
        scheduler.cancel_job(p.id)
        while b"canceled" not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 65536)
    finally:
        os.kill(pid, 2)
        _, status = os.waitpid(pid, 0)
    assert str(p.id).encode() in seen and b"canceled" in seen
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.e2e
def test_queue_command_runs_jobs(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    node = start_node("--pm", "static", "--min-children", "2")
    p = scheduler.add_job("sample_jobs:Echo", 7).wait(timeout=30)
    assert p.result == 7
    assert node.stop() == 0


@pytest.mark.e2e
def test_demo_runs_keeps_its_cluster_on_keep_and_exits_zero(tmp_path: Path) -> None:
    """`demo --keep`: after the examples, the server, the node and a dashboard run until Ctrl-C (SPEC 3)."""
    before = _python_children()
    demo = subprocess.Popen(
        [sys.executable, "-m", "taskscheduler", "demo", "--plain", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("kept running until Ctrl-C"):
                break
        out = "".join(lines)
        assert "every example behaved as expected" in out, out
        assert "taskscheduler dashboard --mongodb-uri 'mongodb://127.0.0.1:" in out  # where to watch it live
        for name in ("countdown", "flaky", "timeout", "canceled", "postponed", "interval"):
            assert name in out
        url = re.search(r"dashboard (http://127\.0\.0\.1:\d+/)", lines[-1])
        assert url is not None, lines[-1]
        page = wait_until(lambda: _get(url.group(1)), 20, what="the kept dashboard")
        assert "taskscheduler" in page.lower()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()
    wait_until(lambda: _python_children() <= before, 10, what="no process left behind")


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return str(answer.read().decode())
    except OSError:
        return None


def _python_children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.e2e
def test_queue_and_add_use_custom_collections(
    run: Any, db: Any, start_node: Callable[..., Node], new_scheduler: Callable[..., Scheduler]
) -> None:
    options = {"job_queue": "my.jobs", "event_queue": "my.events", "job_queue_size": 0, "event_queue_size": 0}
    flags = ["--job-queue", "my.jobs", "--event-queue", "my.events", "--job-queue-size", "0", "--event-queue-size", "0"]
    node = start_node(*flags)
    added = run("add", "sample_jobs:Echo", "--data", '"custom"', *flags)
    assert added.returncode == 0, added.stderr
    s = new_scheduler(options)
    p = s.get_job(ObjectId(added.stdout.strip())).wait(timeout=30)
    assert p.status == JobStatus.DONE and p.result == "custom"
    assert not db["my.jobs"].options().get("capped")
    assert "taskscheduler.jobs" not in db.list_collection_names() or db["taskscheduler.jobs"].count_documents({}) == 0
    assert node.stop() == 0


def test_server_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal as sig

    import psutil

    from taskscheduler.ops.embedded import free_port
    from taskscheduler.store import connect

    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "taskscheduler", "server", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"mongodb://127.0.0.1:{port}/" in line
            db = connect(f"mongodb://127.0.0.1:{port}/?directConnection=true", "x", timeout_ms=5000)
            assert db.command("ping")["ok"] == 1.0
            db.client.close()
            servers = psutil.Process(proc.pid).children(recursive=True)
            assert servers
            proc.send_signal(sig.SIGTERM)
            assert proc.wait(20) == 0
            wait_until(lambda: not any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE for s in servers), 10)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_jobs_lists_the_newest_first_and_says_how_many_there_are(run: Any, scheduler: Scheduler) -> None:
    ids = [str(scheduler.add_job("sample_jobs:Noop").id) for _ in range(3)]
    listed = run("jobs", "--json", "--limit", "2")
    assert [j["_id"] for j in json.loads(listed.stdout)] == ids[:0:-1]
    table = run("jobs", "--limit", "2")
    assert "2 of 3 jobs, newest first" in table.stdout and ids[0] not in table.stdout


def test_requeue_and_show_follow_one_job_through_its_runs(run: Any, scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    scheduler.cancel_job(p.id)
    out = run("requeue", str(p.id))
    assert out.returncode == 0 and out.stdout.strip() == f"requeued {p.id} (run 2)"
    assert scheduler.get_job(p.id).status == JobStatus.WAITING
    shown = json.loads(run("show", str(p.id), "--json").stdout)
    assert shown["run"] == 2 and [r["status"] for r in shown["runs"]] == [JobStatus.CANCELED]
    assert "run 1: CANCELED" in run("show", str(p.id)).stdout


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "--limit", "99999999999999999999"],
        ["add", "sample_jobs:Noop", "--job-queue", ".jobs"],
        ["add", "sample_jobs:Noop", "--job-queue", "a..b"],
        ["add", "sample_jobs:Noop", "--job-queue", "system.jobs"],
        ["add", "sample_jobs:Noop", "--job-queue", "big", "--job-queue-size", "99999999999999999999"],
        ["jobs", "--event-queue", "a..b"],
        ["jobs", "--mongodb-uri", "mongodb://someone:wrong@{host}/?directConnection=true"],
        ["add", "sample_jobs:Noop", "--data", '{{"owner": {{"$oid": "zz"}}}}'],
        ["server", "--port", "0", "--data-dir", "/proc/no/such/dir"],
    ],
    ids=[
        "huge-limit",
        "leading-dot",
        "double-dot",
        "system-name",
        "huge-size",
        "event-queue-name",
        "wrong-password",
        "bad-extended-json",
        "bad-data-dir",
    ],
)
def test_cli_operator_mistakes_print_one_line_not_a_traceback(
    server: EmbeddedServer, db_name: str, args: list[str]
) -> None:
    """SPEC 3: an operator's mistake (names, numbers, credentials, extended JSON, data dir): one line, exit 1 or 2."""
    host = server.uri.split("//")[1].split("/")[0]
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=server.uri)
    env["TASKSCHEDULER_DATABASE"] = db_name
    done = subprocess.run(
        [sys.executable, "-m", "taskscheduler", *[a.format(host=host) for a in args]],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode in (1, 2) and len(done.stderr.strip().splitlines()) == 1, done.stderr


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


def _live_node(scheduler: Scheduler, *modules: str) -> ObjectId:
    node_id = ObjectId()
    facts = {"host": "h", "pid": 1, "started": utcnow(), "modules": list(modules), "workers": []}
    scheduler.store.register_node(node_id, facts, 60)
    return node_id


def test_add_warns_when_no_live_node_serves_the_jobs_module(run: Any, scheduler: Scheduler) -> None:
    _live_node(scheduler, "other_jobs", "more_jobs")
    added = run("add", "sample_jobs:Noop")
    assert added.returncode == 0 and ObjectId(added.stdout.strip())  # stdout: the id alone, for scripts
    assert len(added.stderr.strip().splitlines()) == 1, added.stderr
    assert "no live queue node serves sample_jobs" in added.stderr and "--import sample_jobs" in added.stderr
    assert "other_jobs, more_jobs" in added.stderr  # what the live nodes do serve
    as_json = run("add", "sample_jobs:Noop", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["class"] == "sample_jobs:Noop"
    assert "no live queue node serves sample_jobs" in as_json.stderr
    assert scheduler.store.jobs.count_documents({}) == 2


def test_add_says_nothing_more_when_a_live_node_serves_the_job(run: Any, scheduler: Scheduler) -> None:
    _live_node(scheduler, "other_jobs")
    _live_node(scheduler, "sample_jobs")
    added = run("add", "sample_jobs:Echo", "--data", "1")
    assert added.returncode == 0 and added.stderr == "", added.stderr


def test_add_says_when_no_queue_node_is_running(run: Any, scheduler: Scheduler) -> None:
    added = run("add", "sample_jobs:Noop")
    assert added.returncode == 0 and ObjectId(added.stdout.strip())
    assert len(added.stderr.strip().splitlines()) == 1, added.stderr
    assert "no queue node is running" in added.stderr and "--import sample_jobs" in added.stderr


def test_add_of_a_name_without_a_module_says_no_node_serves_it(run: Any, scheduler: Scheduler) -> None:
    _live_node(scheduler, "sample_jobs")
    added = run("add", "test", "--no-import-check")
    assert added.returncode == 0 and "no queue node serves test, a name without a module" in added.stderr


@pytest.mark.parametrize("columns", [80, 60])
def test_job_ids_print_whole_in_a_narrow_terminal(
    server: EmbeddedServer, db_name: str, scheduler: Scheduler, columns: int
) -> None:
    ids = [
        scheduler.add_job("sample_jobs:add_numbers", {"a": 1}).id,
        scheduler.add_job("sample_jobs:Noop", None, {"at": time.time() + 86_400 * 3}).id,
        scheduler.add_job("a_rather_long_package_name.with_a_module:AndAVeryLongJobClassName").id,
    ]
    env = {"TASKSCHEDULER_MONGODB_URI": server.uri, "TASKSCHEDULER_DATABASE": db_name}
    for command in (("jobs",), ("watch", "--once")):
        shown = in_a_terminal(*command, columns=columns, env=env)
        for job_id in ids:
            assert str(job_id) in shown, shown  # whole, so it can be pasted into show or cancel
        assert max(len(line) for line in shown.splitlines()) <= columns, shown
        assert "…" not in shown.split("jobs", 1)[1] or columns < 80, shown


def test_the_job_table_keeps_ids_whole_at_every_width(scheduler: Scheduler) -> None:
    from rich.console import Console

    from taskscheduler.cli.display import jobs_table

    scheduler.add_job("sample_jobs:Noop", None, {"at": time.time() + 3600})
    scheduler.add_job("a_rather_long_package_name.with_a_module:AndAVeryLongJobClassName")
    found = list(scheduler.get_jobs({}))
    for width in range(40, 201, 7):
        out = Console(width=width, record=True, file=io.StringIO())
        out.print(jobs_table(found, title="jobs", width=width))
        text = out.export_text()
        assert all(str(p.id) in text for p in found), (width, text)
        assert max(len(line) for line in text.splitlines()) <= width, (width, text)


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (("info", "--log-level", "DEBUG"), "put it before the command: taskscheduler --log-level DEBUG info"),
        (("jobs", "--log-level=DEBUG", "--json"), "put it before the command: taskscheduler --log-level DEBUG jobs"),
        (("info", "--version"), "put it before the command: taskscheduler --version"),
    ],
)
def test_an_option_of_taskscheduler_itself_after_the_command_says_where_it_goes(
    script: Any, tmp_path: Path, args: tuple[str, ...], hint: str
) -> None:
    out = script(*args, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "No such option" in out.stderr and hint in out.stderr, out.stderr
    assert "TASKSCHEDULER_LOG_LEVEL" in out.stderr or "--version" in args


def test_the_log_level_before_the_command_is_taken(script: Any, tmp_path: Path) -> None:
    out = script("--log-level", "DEBUG", "jobs", "--json", cwd=tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout) == [], out.stderr


def test_add_help_says_a_time_without_a_zone_is_utc(script: Any, tmp_path: Path) -> None:
    text = " ".join(script("add", "--help", cwd=tmp_path).stdout.split())
    assert "a time without a zone is read as UTC" in text, text
    assert "--timezone" in text and "only with --cron" in text, text


def test_a_timezone_without_a_cron_is_refused(run: Any, scheduler: Scheduler) -> None:
    out = run("add", "sample_jobs:Noop", "--timezone", "Europe/Zurich", "--at", "2099-01-01T07:00:00")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("Error:") and "--timezone" in out.stderr and "--cron" in out.stderr, out.stderr
    assert "+01:00" in out.stderr  # how to give --at a zone of its own
    assert scheduler.store.jobs.count_documents({}) == 0
    zoned = run("add", "sample_jobs:Noop", "--cron", "0 7 * * *", "--timezone", "Europe/Zurich")
    assert zoned.returncode == 0, zoned.stderr


def _tomorrow_at_seven_in_zurich_cron(scheduler: Scheduler) -> Any:
    return scheduler.add_job("sample_jobs:Noop", None, {"cron": "0 7 * * *", "timezone": "Europe/Zurich"})


def test_jobs_shows_start_times_with_their_date_and_zone(run: Any, scheduler: Scheduler) -> None:
    from datetime import timedelta

    far = datetime(5138, 3, 1, 9, 46, 39, tzinfo=timezone.utc)
    scheduler.add_job("sample_jobs:Noop", None, {"at": far.timestamp()})
    cron = _tomorrow_at_seven_in_zurich_cron(scheduler)
    soon = datetime.now(timezone.utc) + timedelta(seconds=90)
    scheduler.add_job("sample_jobs:Noop", None, {"at": soon.timestamp()})
    table = run("jobs").stdout
    assert "at 5138-03-01 09:46:39 UTC" in table, table
    next_start = datetime.fromtimestamp(cron.options["at"], timezone.utc)
    assert f"at {next_start:%Y-%m-%d %H:%M:%S} UTC" in table, table  # 07:00 in Zurich, said in UTC with its date
    today = soon.date() == datetime.now(timezone.utc).date()
    assert (f"at {soon:%H:%M:%S} UTC" if today else f"at {soon:%Y-%m-%d %H:%M:%S} UTC") in table, table
    as_json = json.loads(run("jobs", "--json").stdout)
    assert sorted(j["options"]["at"] for j in as_json)[-1] == far.timestamp()  # JSON unchanged: unix seconds


def test_times_are_shown_in_the_terminals_zone_and_in_utc_with_the_utc_flag(run: Any, scheduler: Scheduler) -> None:
    """SPEC 7: the CLI shows times in the terminal's local zone, saying which; ``--utc`` shows them in UTC."""
    far = datetime(5138, 3, 1, 9, 46, 39, tzinfo=timezone.utc)
    scheduler.add_job("sample_jobs:Noop", None, {"at": far.timestamp()})
    zurich = {"TZ": "Europe/Zurich"}
    assert "at 5138-03-01 10:46:39 CET" in run("jobs", env=zurich).stdout
    assert "at 5138-03-01 09:46:39 UTC" in run("--utc", "jobs", env=zurich).stdout
    assert "at 5138-03-01 09:46:39 UTC" in run("jobs", env={**zurich, "TASKSCHEDULER_UTC": "1"}).stdout


def test_show_says_times_with_their_date_and_zone(run: Any, scheduler: Scheduler) -> None:
    cron = _tomorrow_at_seven_in_zurich_cron(scheduler)
    text = run("show", str(cron.id)).stdout
    next_start = datetime.fromtimestamp(cron.options["at"], timezone.utc)
    local = next_start.astimezone(ZoneInfo("Europe/Zurich"))
    assert f"next_run: {next_start:%Y-%m-%d %H:%M:%S} UTC ({local:%Y-%m-%d %H:%M:%S} Europe/Zurich)" in text, text
    created = scheduler.get_job(cron.id).created
    assert created is not None and f"created: {created.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC" in text, text
    assert f'"at": "{next_start:%Y-%m-%d %H:%M:%S} UTC"' in text, text  # no unix seconds for a reader
    shown = json.loads(run("show", str(cron.id), "--json").stdout)  # JSON unchanged: ISO 8601 and unix seconds
    assert datetime.fromisoformat(shown["next_run"]) == local and shown["options"]["at"] == cron.options["at"]


def test_add_depends_on_and_limit_key(run: Any, scheduler: Scheduler) -> None:
    first = scheduler.add_job("sample_jobs:Noop")
    out = run("add", "sample_jobs:Noop", "--depends-on", str(first.id), "--limit-key", "mail")
    assert out.returncode == 0, out.stderr
    added = scheduler.get_job(ObjectId(out.stdout.strip()))
    assert added.options["depends_on"] == [first.id] and added.options["limit_key"] == "mail"
    assert added.blocked_by == [first.id]
    unknown = run("add", "sample_jobs:Noop", "--depends-on", str(ObjectId()))
    assert unknown.returncode == 2 and "no job with id" in unknown.stderr and "Traceback" not in unknown.stderr
    bad = run("add", "sample_jobs:Noop", "--depends-on", "nope")
    assert bad.returncode == 2 and "is not a job id" in bad.stderr


def test_limit_pause_resume_and_info(run: Any, scheduler: Scheduler) -> None:
    out = run("limit", "mail", "--concurrency", "2", "--rate", "10/m")
    assert out.returncode == 0 and out.stdout.strip() == "limit on mail: concurrency 2, rate 10/m", out.stderr
    assert scheduler.limits() == {"mail": {"concurrency": 2, "rate": "10/m"}}
    assert run("limit", "mail").stdout.strip() == "limit on mail: concurrency 2, rate 10/m"
    bad = run("limit", "mail", "--rate", "lots")
    assert bad.returncode == 2 and "rate must be like" in bad.stderr and "Traceback" not in bad.stderr
    scheduler.add_job("sample_jobs:Noop", limit_key="mail")
    assert run("pause", "sample_jobs:Noop").returncode == 0
    info = run("info").stdout
    assert "limit mail: concurrency 2, rate 10/m; 0 running, 1 waiting" in info
    assert "paused sample_jobs:Noop: 1 waiting" in info
    summary = json.loads(run("info", "--json").stdout)
    assert summary["limits"]["mail"] == {"concurrency": 2, "rate": "10/m", "running": 0, "waiting": 1}
    assert summary["paused"] == {"sample_jobs:Noop": {"waiting": 1}}
    assert run("resume", "sample_jobs:Noop").stdout.strip() == "resumed sample_jobs:Noop"
    assert run("limit", "mail", "--remove").stdout.strip() == "no limit on mail"
    assert scheduler.limits() == {} and scheduler.paused() == []


def test_utc_is_taken_after_the_commands_name_too(
    run: Callable[..., subprocess.CompletedProcess[str]], scheduler: Scheduler
) -> None:
    """SPEC 7: `--utc` shows times in UTC; like the connection options, it may follow the command's name."""
    p = scheduler.add_job("sample_jobs:Noop")
    zone = {"TZ": "Asia/Tokyo"}
    local = run("show", str(p.id), env=zone)
    assert local.returncode == 0 and "JST" in local.stdout, local.stdout + local.stderr
    for args in (("show", str(p.id), "--utc"), ("--utc", "show", str(p.id))):
        out = run(*args, env=zone)
        assert out.returncode == 0 and "UTC" in out.stdout and "JST" not in out.stdout, (args, out.stdout, out.stderr)
    assert run("jobs", "--utc", env=zone).returncode == 0  # every command takes it (its table shows ages)


def test_piped_tables_are_as_wide_as_columns_says_and_keep_ids_whole(
    run: Callable[..., subprocess.CompletedProcess[str]], scheduler: Scheduler
) -> None:
    """A table printed to a pipe (a script's `subprocess.run`) is as wide as COLUMNS says, like one in a
    terminal (SPEC 7: ids whole at 80 columns); without COLUMNS, wide enough that nothing folds."""
    ids = [str(scheduler.add_job("sample_jobs:Echo", {"text": "x" * 60}).id) for _ in range(3)]
    out = run("jobs", env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 80, out.stdout
    assert all(job_id in out.stdout for job_id in ids), out.stdout
