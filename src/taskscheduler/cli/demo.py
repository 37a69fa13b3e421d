"""``taskscheduler demo``: an embedded server, a queue node and example jobs that show the features live."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from rich.console import Console
from rich.live import Live

from ..client.job import AbstractJob
from ..constants import JobStatus
from ..errors import InvalidArgumentError, MissingExtraError
from ..node.nodeproc import spawn_node, stop_node
from ..redact import redact_uri


class Countdown(AbstractJob):
    """Counts down ``data["steps"]`` steps, reporting progress."""

    def start(self) -> str:
        steps = int(self.data.get("steps", 10))
        for step in range(1, steps + 1):
            time.sleep(float(self.data.get("pause", 0.3)))
            self.update_progress(step * 100 / steps)
        return f"counted {steps} steps"


class Flaky(AbstractJob):
    """Always fails: shows the error record and the retry chain."""

    def start(self) -> None:
        raise RuntimeError("the mail server said no")


class Slow(AbstractJob):
    """Sleeps far longer than its timeout (or until canceled)."""

    def start(self) -> None:
        time.sleep(float(self.data.get("seconds", 60)))


class Tick(AbstractJob):
    """A tiny interval job."""

    def start(self) -> str:
        return time.strftime("%H:%M:%S")


class AsyncPing(AbstractJob):
    """An ``async def start``: runs in the worker's own event loop."""

    async def start(self) -> str:
        import asyncio

        await asyncio.sleep(0.5)
        return "pong"


def shout(data: Any) -> str:
    """A plain function as a job; ``current_job()`` gives what ``self`` gives a class."""
    from ..client.job import current_job

    job = current_job()
    if job is not None:
        job.update_progress(100)
    return str(data).upper()


def run_demo(
    limit: float = 45.0, plain: bool = False, keep: bool = False, uri: str | None = None, database: str = "demo"
) -> int:
    """Run the demo; 0 when every example ended as expected. ``keep``: then keep the server, the node and a
    dashboard running until Ctrl-C (or SIGTERM), their addresses printed. ``uri``: on that deployment (in
    ``database``) instead of an embedded server."""
    from ..client.scheduler import Scheduler
    from ..errors import EmbeddedServerError
    from ..ops.embedded import EmbeddedServer
    from ..store import connect
    from .display import console as make_console

    console = make_console()
    server: EmbeddedServer | None = None
    if uri is None:
        try:
            server = EmbeddedServer(port=0, data_dir=":memory:")
        except EmbeddedServerError as exc:
            console.print(f"[red]{exc}[/red]")
            return 1
    with server or contextlib.nullcontext(), tempfile.TemporaryDirectory() as tmp:
        target = server.uri if server is not None else str(uri)
        shown = redact_uri(target)  # a URI given may hold a password
        console.print(f"embedded server: {target}" if server is not None else f"MongoDB: {shown} (database {database})")
        # While the demo runs, its jobs can be watched in a browser too (the extra dashboard serves the page).
        console.print(
            "open the dashboard while it runs (another terminal, then http://127.0.0.1:8080/): "
            f"taskscheduler dashboard --mongodb-uri {shlex.quote(shown)} --database {shlex.quote(database)}",
            highlight=False,
            soft_wrap=True,
        )
        scheduler = Scheduler(connect(target, database, timeout_ms=5_000))  # an answer as soon as the other commands
        scheduler.store.check_deployment()  # an unreachable or unfit deployment: one line, exit 1 (before a node)
        node = spawn_node(
            target,
            database,
            ["taskscheduler.cli.demo"],
            ["--max-children", "4", "--orphaned-timeout", "5"],
            log=os.path.join(tmp, "node.log"),
        )
        try:
            jobs = _spool(scheduler)
            ok = _show(scheduler, jobs, console, limit, plain)
            if keep:
                _keep(target, database, node.pid, console)
        finally:
            stop_node(node, timeout=15)
        console.print(f"queue node stopped (exit code {node.returncode})")
    return 0 if ok and node.returncode == 0 else 1


def _keep(uri: str, database: str, node_pid: int, console: Console) -> None:
    """Keep the demo's server and node, and serve a dashboard on a free port, until Ctrl-C or SIGTERM."""
    from ..ops.dashboard import require_extra

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    page = None
    try:
        try:
            require_extra()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            page = subprocess.Popen(
                [sys.executable, "-m", "taskscheduler", "dashboard", "--port", str(port), "--database", database],
                env={**os.environ, "TASKSCHEDULER_MONGODB_URI": uri},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            dashboard = f"http://127.0.0.1:{port}/"
        except MissingExtraError as exc:
            dashboard = f"none ({exc})"
        console.print(
            f"kept running until Ctrl-C: MongoDB {redact_uri(uri)} (database {database}), queue node pid {node_pid}, "
            f"dashboard {dashboard}",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"add jobs: TASKSCHEDULER_MONGODB_URI={shlex.quote(redact_uri(uri))} taskscheduler add --database "
            f"{shlex.quote(database)} "
            "taskscheduler.cli.demo:Tick",
            highlight=False,
            soft_wrap=True,
        )
        while not stop.wait(0.5):
            pass
        console.print("stopping the demo")
    finally:
        if page is not None:
            page.terminate()
            try:
                page.wait(timeout=10)
            except subprocess.TimeoutExpired:
                page.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _spool(scheduler: Any) -> dict[str, Any]:
    here = "taskscheduler.cli.demo:"
    jobs = {f"countdown {n}": scheduler.add_job(here + "Countdown", {"steps": 8 + 2 * n}) for n in range(3)}
    jobs["flaky (retry 2)"] = scheduler.add_job(here + "Flaky", None, retry=2, retry_interval=1)
    jobs["slow (timeout 2s)"] = scheduler.add_job(here + "Slow", {"seconds": 60}, timeout=2)
    jobs["slow (canceled)"] = scheduler.add_job(here + "Slow", {"seconds": 60})
    jobs["postponed 3s"] = scheduler.add_job(here + "Countdown", {"steps": 3}, at=time.time() + 3)
    jobs["tick (interval 2s)"] = scheduler.add_job(here + "Tick", None, interval=2)
    jobs["cron (every minute)"] = scheduler.add_job(here + "Tick", None, cron="* * * * *", timezone="UTC")
    jobs["urgent (priority 90)"] = scheduler.add_job(here + "Countdown", {"steps": 2}, priority=90)
    jobs["function job"] = scheduler.add_job(here + "shout", "hello")
    jobs["async job"] = scheduler.add_job(here + "AsyncPing")
    return jobs


def _show(scheduler: Any, jobs: dict[str, Any], console: Console, limit: float, plain: bool) -> bool:
    from .display import jobs_table

    deadline = time.monotonic() + limit
    canceled = False
    live = Live(console=console, refresh_per_second=4, transient=False) if not plain else None
    if live is not None:
        live.start()
    try:
        seen: dict[Any, JobStatus] = {}
        while time.monotonic() < deadline:
            everything = list(scheduler.get_jobs({"class": {"$regex": "^taskscheduler.cli.demo:"}}))
            cancel_target = jobs["slow (canceled)"]
            if not canceled and scheduler.get_job(cancel_target.id).status == JobStatus.PROCESSING:
                time.sleep(1)
                scheduler.cancel_job(cancel_target.id)
                canceled = True
            if live is not None:
                live.update(jobs_table(everything, title="demo jobs", width=console.width))
            else:
                for p in everything:
                    if seen.get(p.id) != p.status:
                        seen[p.id] = p.status
                        note = f" ({p.progress:.0f}%)" if p.status == JobStatus.PROCESSING else ""
                        console.print(f"{p.job_class.split(':')[-1]:<10} {p.id} {p.status.name.lower()}{note}")
            if _finished(scheduler, jobs):
                break
            time.sleep(0.25)
    finally:
        if live is not None:
            live.stop()
    # Stop the interval chain and whatever of the demo's is left: its own jobs only (on a deployment given with
    # --mongodb-uri, the database may hold other jobs), their children with them.
    ids = [p.id for p in jobs.values()]
    for p in scheduler.get_jobs({"_id": {"$in": ids}, "status": {"$lt": int(JobStatus.DONE)}}):
        with contextlib.suppress(InvalidArgumentError):  # it ended meanwhile
            scheduler.cancel_job(p.id)
    return _summary(scheduler, jobs, console)


def _finished(scheduler: Any, jobs: dict[str, Any]) -> bool:
    """Every example ended, and the interval job (one job, one id, run after run) has run three times."""
    named = [scheduler.get_job(p.id) for name, p in jobs.items() if not name.startswith(("tick", "cron"))]
    tick = scheduler.get_job(jobs["tick (interval 2s)"].id)
    return all(p.status.is_terminal for p in named) and len(tick.runs()) >= 3


def _summary(scheduler: Any, jobs: dict[str, Any], console: Console) -> bool:
    from rich.table import Table

    from ..store.views import ErrorView

    expected = {
        "countdown 0": JobStatus.DONE,
        "countdown 1": JobStatus.DONE,
        "countdown 2": JobStatus.DONE,
        "flaky (retry 2)": JobStatus.FAILED,
        "slow (timeout 2s)": JobStatus.TIMEOUT,
        "slow (canceled)": JobStatus.CANCELED,
        "postponed 3s": JobStatus.DONE,
        "tick (interval 2s)": JobStatus.CANCELED,  # runs until the demo cancels it
        "cron (every minute)": JobStatus.CANCELED,  # one job, back to POSTPONED after each run, until canceled
        "urgent (priority 90)": JobStatus.DONE,
        "function job": JobStatus.DONE,
        "async job": JobStatus.DONE,
    }
    table = Table(title="summary")
    for column in ("example", "status", "expected", "runs", "result / error"):
        table.add_column(column)
    ok = True
    for name, process in jobs.items():
        p = scheduler.get_job(process.id)
        runs = len(p.runs())
        detail = ErrorView(p.error).message_as_stored if p.error else (str(p.result) if p.result is not None else "")
        good = p.status == expected[name]
        ok = ok and good
        mark = "[green]yes[/green]" if good else "[red]no[/red]"
        table.add_row(name, p.status.name.lower(), f"{expected[name].name.lower()} {mark}", str(runs), detail[:50])
    console.print(table)
    console.print(
        "[green]demo finished: every example behaved as expected[/green]" if ok else "[red]demo: surprises[/red]"
    )
    return ok
