"""Job classes the tests run in real worker processes (imported by queue nodes with --import sample_jobs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taskscheduler import AbstractJob


class Noop(AbstractJob):
    def start(self) -> None:
        return None


class Echo(AbstractJob):
    """Returns its data as the result."""

    def start(self) -> Any:
        return self.data


class Fail(AbstractJob):
    def start(self) -> None:
        raise ValueError(f"boom: {self.data}")


class FailHalfway(AbstractJob):
    """Stores progress 40, then fails."""

    def start(self) -> None:
        self.update_progress(40)
        raise RuntimeError("gave up at 40 %")


class Sleep(AbstractJob):
    """Sleeps ``data["seconds"]`` (in C, without ever calling update_progress)."""

    def start(self) -> str:
        time.sleep(float(self.data["seconds"]))
        return "slept"


class Progress(AbstractJob):
    def start(self) -> None:
        for step in range(1, 5):
            self.update_progress(step * 25)
            time.sleep(0.05)


class Unencodable(AbstractJob):
    def start(self) -> object:
        return object()


class CountRun(AbstractJob):
    """Appends one line per execution to ``data["path"]``; sleeps ``data.get("seconds", 0)`` first."""

    def start(self) -> None:
        time.sleep(float(self.data.get("seconds", 0)))
        with open(self.data["path"], "a") as out:
            out.write(f"{self.id} {os.getpid()}\n")


class WritePid(AbstractJob):
    """Writes its pid to ``data["path"]``, then sleeps ``data["seconds"]``."""

    def start(self) -> None:
        with open(self.data["path"], "w") as out:
            out.write(str(os.getpid()))
        time.sleep(float(self.data["seconds"]))


class SpawnChildren(AbstractJob):
    """Adds children of ``data["child"]`` (class path) with ``data["child_data"]``, waits for them."""

    def start(self) -> list[str]:
        kids = [
            self.scheduler.add_job(self.data["child"], dict(self.data.get("child_data", {}), parent=self.id))
            for _ in range(int(self.data.get("count", 2)))
        ]
        self.scheduler.wait_for(kids, timeout=30)
        return [str(k.id) for k in kids]


class Exits(AbstractJob):
    """Calls sys.exit(): the job fails, the worker lives on."""

    def start(self) -> None:
        import sys

        sys.exit(3)


def chaos_line(fd: int, *fields: object) -> None:
    """One line of the chaos run log, written with a single write() on an O_APPEND descriptor."""
    os.write(fd, (" ".join(str(f) for f in fields) + "\n").encode())


#: The subprocess of a ChaosJob with ``data["children"]``: its activity lines are its parent execution's (its
#: token); it ends by itself after ``child_seconds``. ``chaos-child`` in its command line lets the harness find
#: one left behind by a killed worker.
CHAOS_CHILD = """
import os, sys, time
log, token, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(log, os.O_WRONLY | os.O_APPEND)
end = time.monotonic() + seconds
while time.monotonic() < end:
    os.write(fd, f"C {token} {os.getpid()} {time.monotonic()}\\n".encode())
    time.sleep(0.05)
"""


class ChaosJob(AbstractJob):
    """The job of tests/chaos/. Logs every execution to ``data["log"]`` (lines, fields space-separated):

    ``S token job worker node pid ppid time`` at the start, ``R token run time`` once the run number is known,
    ``T token time`` every ``TICK`` seconds of work and ``E token time outcome`` at the end (``ok``, ``fail`` or
    ``cancel``); ``time`` is ``time.monotonic()`` (one clock for all processes of the machine), ``token`` names
    the execution, ``node`` is the ``CHAOS_NODE`` variable of the queue node that forked the worker.

    Works ``data["seconds"]``, then raises if ``data["fail"]``; from run ``data["cancel_at"]`` on (a recurring
    job) it cancels itself instead of returning.

    With ``data["children"]`` (a list of booleans) it first starts one subprocess per item (in a new session when
    true) that works ``data["child_seconds"]`` as part of this execution: ``K token pid new_session`` when started,
    then ``C token pid time`` every ``TICK``; the execution waits for them before it ends, so only a killed
    worker or node can leave them running.
    """

    TICK = 0.05

    def start(self) -> str:
        started = time.monotonic()
        token = os.urandom(4).hex()
        fd = os.open(self.data["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            node = os.environ.get("CHAOS_NODE", "?")
            chaos_line(fd, "S", token, self.id, self.scheduler.owner, node, os.getpid(), os.getppid(), started)
            run = self._run_number()
            if run is not None:
                chaos_line(fd, "R", token, run, time.monotonic())
            children = self._start_children(fd, token)
            end = started + float(self.data.get("seconds", 0))
            while time.monotonic() < end:
                time.sleep(max(0.0, min(self.TICK, end - time.monotonic())))
                chaos_line(fd, "T", token, time.monotonic())
            for child in children:
                try:
                    child.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    child.kill()  # a child that hangs must not outlive its execution
                    child.wait()
            cancel_at = self.data.get("cancel_at")
            if cancel_at and run is not None and run >= int(cancel_at):
                if not self._retry(lambda: self.scheduler.cancel_job(self.id) or True):
                    chaos_line(fd, "E", token, time.monotonic(), "fail")
                    raise RuntimeError(f"job {self.id} could not cancel itself")
                chaos_line(fd, "E", token, time.monotonic(), "cancel")
                return "canceled itself"
            if self.data.get("fail"):
                chaos_line(fd, "E", token, time.monotonic(), "fail")
                raise ValueError(f"chaos failure of {self.id}")
            chaos_line(fd, "E", token, time.monotonic(), "ok")
            return "ok"
        finally:
            os.close(fd)

    def _start_children(self, fd: int, token: str) -> list[subprocess.Popen[bytes]]:
        children = []
        for new_session in self.data.get("children") or ():
            seconds = str(self.data["child_seconds"])
            child = subprocess.Popen(
                [sys.executable, "-c", CHAOS_CHILD, self.data["log"], token, seconds, "chaos-child"],
                start_new_session=bool(new_session),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            chaos_line(fd, "K", token, child.pid, int(bool(new_session)))
            children.append(child)
        return children

    def _run_number(self) -> int | None:
        """This run's number, read from the job while this worker owns it (None if that cannot be told)."""
        process = self._retry(lambda: self.scheduler.get_job(self.id))
        if process is None or process.worker != self.scheduler.owner:
            return None
        return process.run

    @staticmethod
    def _retry(call: Any, patience: float = 1.5) -> Any:
        """``call()``, tried again while MongoDB drops connections (the harness injects that); None at the end."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return call()
            except Exception:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.1)


# -- function and async jobs (issue: scheduling) -----------------------------------------------------------------


def add_numbers(data: dict[str, Any]) -> int:
    """A function job: reports progress through current_job(), returns the sum."""
    from taskscheduler import current_job

    job = current_job()
    assert job is not None
    job.update_progress(50)
    return int(data["a"]) + int(data["b"])


def failing_function(data: Any) -> None:
    raise RuntimeError(f"function failed: {data}")


def sleepy_function(data: dict[str, Any]) -> str:
    time.sleep(float(data["seconds"]))
    return "slept"


def whoami(data: Any) -> dict[str, Any]:
    """Returns what current_job() says of the running job."""
    from taskscheduler import current_job

    job = current_job()
    assert job is not None
    return {"id": str(job.id), "data": job.data, "scheduler": type(job.scheduler).__name__}


class AsyncEcho(AbstractJob):
    """An async job: awaits, reports progress, returns its data and the id current_job() gives."""

    async def start(self) -> Any:
        import asyncio

        from taskscheduler import current_job

        await asyncio.sleep(0.01)
        self.update_progress(40)
        job = current_job()
        return {"data": self.data, "current": str(job.id) if job else None}


class AsyncSleep(AbstractJob):
    """An async job that sleeps in its event loop for ``data["seconds"]``."""

    async def start(self) -> str:
        import asyncio

        await asyncio.sleep(float(self.data["seconds"]))
        return "slept"


async def async_function(data: Any) -> Any:
    import asyncio

    await asyncio.sleep(0.01)
    return {"async": data}


class StartTime(AbstractJob):
    """Records when it started (for ordering tests) and sleeps ``data.get("seconds", 0)``."""

    def start(self) -> float:
        started = time.time()
        time.sleep(float((self.data or {}).get("seconds", 0)))
        return started


class SlowProgress(AbstractJob):
    """Moves its progress in ``data["steps"]`` steps of ``data["pause"]`` seconds each (the dashboard's progress
    bars; with many steps, a job that runs until it is canceled)."""

    def start(self) -> str:
        steps = int(self.data.get("steps", 10))
        for step in range(1, steps + 1):
            time.sleep(float(self.data.get("pause", 0.3)))
            self.update_progress(100.0 * step / steps)
        return f"{steps} steps"


def generator_job(data: dict[str, Any]) -> Iterator[int]:
    """A generator function given as a job: its body must run (or add_job must refuse it)."""
    Path(data["marker"]).write_text("ran")
    yield 1


async def async_generator_job(data: dict[str, Any]) -> Any:
    """An async generator function given as a job: its body must run (or add_job must refuse it)."""
    Path(data["marker"]).write_text("ran")
    yield 1


class Gather(AbstractJob):
    """Returns the results of the jobs it depends on, in the order given (``self.dependencies()``)."""

    def start(self) -> list[Any]:
        return [p.result for p in self.dependencies()]


class FailOnce(AbstractJob):
    """Fails in its first run (run 1), ends DONE in any later one (a retry, a requeue)."""

    def start(self) -> str:
        if self.scheduler.get_job(self.id).run == 1:
            raise ValueError("first run fails")
        return "ok"


class AddChild(AbstractJob):
    """Adds one child job (``data["child"]``, default Noop) and returns without waiting for it."""

    def start(self) -> str:
        child = self.scheduler.add_job(
            self.data.get("child", "sample_jobs:Noop") if self.data else "sample_jobs:Noop", {"parent": self.id}
        )
        return str(child.id)
