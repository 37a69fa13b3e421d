"""Schedules follow the server's clock, never a node's (SPEC 4, SPEC 2 "a run never starts before its time").

Unit tests of :class:`~taskscheduler.clock.ServerClock` (fed a fake server and fake clocks), one against the real
server (one ``hello`` for many readings), and end to end: queue nodes whose clock is two minutes behind or ahead
(Debian's libfaketime, monotonic clock left real; the server's clock is not skewed) run interval runs, retries
and postponed jobs on the server's time. Starts are measured with ``time.monotonic()``, which every process of
the machine shares (``ChaosJob`` logs it), and compared with this (unskewed) process's view of the server's time.

Without libfaketime the end-to-end tests skip with the reason; with CI=true they fail instead (``.ci/run``
installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient, monitoring

from helpers import Node, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.clock import MAX_WALL_DRIFT, REFRESH_SECONDS, RETRY_SECONDS, ServerClock
from taskscheduler.errors import ServerUnavailableError
from taskscheduler.ops.embedded import EmbeddedServer

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
CHAOS = "sample_jobs:ChaosJob"
SKEW = 120  # seconds a skewed node's clock is off
INTERVAL = 2  # seconds of the interval and retry delays
#: Latency of a due job (SPEC 4: within 1 s) plus slack for a loaded test machine.
LATE = 1.0 + 1.0
#: Stored times are whole milliseconds (rounded down), and a job's code returns before its end is recorded.
MS = 0.005


class FakeServer:
    """A server clock ``offset`` seconds ahead of the fake wall clock; each answer takes ``round_trip`` s."""

    def __init__(self, offset: float, round_trip: float = 0.002) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0
        self.offset = offset
        self.round_trip = round_trip
        self.asked: list[float | None] = []
        self.down = False

    def advance(self, seconds: float, wall: float | None = None) -> None:
        self.mono += seconds
        self.wall += seconds if wall is None else wall

    def ask(self, timeout: float | None) -> datetime:
        self.asked.append(timeout)
        if self.down:
            raise ServerUnavailableError("cannot reach MongoDB: down")
        self.advance(self.round_trip / 2)
        now = datetime.fromtimestamp(int((self.wall + self.offset) * 1000) / 1000, timezone.utc)  # BSON's ms
        self.advance(self.round_trip / 2)
        return now

    def clock(self) -> ServerClock:
        return ServerClock(self.ask, monotonic=lambda: self.mono, wall=lambda: self.wall)


# -- the clock -------------------------------------------------------------------------------------------------


def test_the_clock_reads_the_server_time_not_the_local_one() -> None:
    server = FakeServer(offset=-SKEW)
    clock = server.clock()
    assert clock.time() == pytest.approx(server.wall - SKEW, abs=0.002)
    server.advance(7.5)
    assert clock.time() == pytest.approx(server.wall - SKEW, abs=0.002)
    stored = clock.now()
    assert stored.microsecond % 1000 == 0 and stored.timestamp() == pytest.approx(server.wall - SKEW, abs=0.002)
    assert len(server.asked) == 1


def test_a_time_counts_as_reached_only_once_the_server_surely_read_it() -> None:
    server = FakeServer(offset=0.0, round_trip=0.010)  # the server read its clock somewhere within 10 ms
    clock = server.clock()
    estimate = clock.time()
    uncertainty = 0.005 + 0.0005  # half the round trip, and the millisecond the server's answer was rounded to
    assert clock.earliest() == pytest.approx(estimate - uncertainty, abs=1e-9)
    assert not clock.reached(estimate)
    server.advance(uncertainty + 1e-6)
    assert clock.reached(estimate)
    assert clock.now(earliest=True) <= clock.now()


def test_one_reading_serves_every_call_until_the_refresh_period() -> None:
    server = FakeServer(offset=SKEW)
    clock = server.clock()
    for _ in range(1000):
        clock.time()
        clock.now()
        clock.reached(0.0)
    assert len(server.asked) == 1
    server.advance(REFRESH_SECONDS - 1)
    clock.time()
    assert len(server.asked) == 1
    server.advance(1)
    clock.time()
    assert len(server.asked) == 2 and server.asked[1] is not None  # a refresh is bounded: the old reading waits


def test_a_wall_clock_that_jumps_is_read_again() -> None:
    server = FakeServer(offset=0.0)
    clock = server.clock()
    clock.time()
    server.advance(1.0, wall=1.0 + MAX_WALL_DRIFT * 2)  # suspended, or the clock was stepped
    assert clock.time() == pytest.approx(server.wall, abs=0.002)
    assert len(server.asked) == 2


def test_a_slow_first_reading_is_taken_again_and_the_tighter_one_kept() -> None:
    server = FakeServer(offset=0.0, round_trip=0.5)  # e.g. the first command opened the connection
    answers = iter([0.5, 0.002])

    def ask(timeout: float | None) -> datetime:
        server.round_trip = next(answers)
        return server.ask(timeout)

    clock = ServerClock(ask, monotonic=lambda: server.mono, wall=lambda: server.wall)
    assert clock.time() - clock.earliest() == pytest.approx(0.001 + 0.0005, abs=1e-6)
    assert len(server.asked) == 2


def test_an_unreachable_server_fails_the_first_reading_and_keeps_a_later_one() -> None:
    server = FakeServer(offset=SKEW)
    server.down = True
    clock = server.clock()
    with pytest.raises(ServerUnavailableError):
        clock.time()
    server.down = False
    clock.time()
    server.down = True
    server.advance(REFRESH_SECONDS)
    assert clock.time() == pytest.approx(server.wall + SKEW, abs=0.002)  # the last reading, carried forward
    asked = len(server.asked)
    server.advance(RETRY_SECONDS / 2)
    clock.time()
    assert len(server.asked) == asked  # not asked again at every call while the server is down
    server.down = False
    server.advance(RETRY_SECONDS)
    clock.time()
    assert len(server.asked) == asked + 1


class HelloCounter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.hellos = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name.lower() in ("hello", "ismaster"):
            self.hellos += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_the_store_clock_costs_one_command_for_many_readings(server: EmbeddedServer, db_name: str) -> None:
    counter = HelloCounter()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[counter])
    try:
        clock = Scheduler(client[db_name]).store.clock
        times = [clock.time() for _ in range(200)]
        # The server runs on this machine, unskewed: its clock is ours.
        assert times[-1] == pytest.approx(time.time(), abs=0.05)
        assert times == sorted(times)
        assert counter.hellos <= 2  # one reading (two when the first round trip was slow)
    finally:
        client.drop_database(db_name)
        client.close()


# -- nodes whose clock is off ----------------------------------------------------------------------------------


def _faketime_env(skew: int) -> dict[str, str]:
    """The environment of a process whose wall clock is ``skew`` seconds off (its monotonic clock stays real)."""
    if not os.path.exists(FAKETIME_LIB):
        message = f"{FAKETIME_LIB} not found: apt-get install faketime (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the clock skew tests must run in CI: {message}")
        pytest.skip(message)
    return {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": f"{skew:+d}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def _add_with_skew(uri: str, database: str, env: dict[str, str], data: dict[str, Any], at: float) -> ObjectId:
    """add_job from a producer process whose clock is skewed; returns the job's id."""
    code = (
        "import sys, json\n"
        "from taskscheduler import Scheduler\n"
        "from taskscheduler.store import connect\n"
        "s = Scheduler(connect(sys.argv[1], sys.argv[2]))\n"
        "print(s.add_job(sys.argv[3], json.loads(sys.argv[4]), at=float(sys.argv[5])).id)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, uri, database, CHAOS, json.dumps(data), repr(at)],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return ObjectId(out.stdout.strip().splitlines()[-1])


def _runs(log: Path) -> dict[str, list[tuple[float, float]]]:
    """(start, end) of each execution per job id, in ``time.monotonic()`` (ChaosJob's log), oldest first."""
    starts: dict[str, tuple[str, float]] = {}
    ends: dict[str, float] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        fields = line.split()
        if fields[0] == "S":
            starts[fields[1]] = (fields[2], float(fields[7]))
        elif fields[0] == "E":
            ends[fields[1]] = float(fields[2])
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for token, (job, start) in starts.items():
        if token in ends:
            runs[job].append((start, ends[token]))
    return {job: sorted(found) for job, found in runs.items()}


def _gaps(runs: list[tuple[float, float]]) -> list[float]:
    """Seconds from the end of each run's code to the start of the next run."""
    return [after[0] - before[1] for before, after in zip(runs, runs[1:], strict=False)]


@pytest.mark.parametrize("skew", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_a_node_with_a_skewed_clock_runs_schedules_on_the_server_clock(
    skew: int,
    scheduler: Scheduler,
    server: EmbeddedServer,
    db_name: str,
    start_node: Callable[..., Node],
    tmp_path: Path,
) -> None:
    """A node 2 minutes behind neither runs interval runs and retries back to back nor starts a postponed job
    early; one 2 minutes ahead delays none of them. A producer 2 minutes ahead does not start a postponed job
    early either. The times the worker stores (``started``, ``ended``) are the server's."""
    skewed = _faketime_env(skew)
    log = tmp_path / "runs.log"
    node = start_node("--pm", "static", "--min-children", "3", "--max-children", "3", env=skewed)
    # The server runs on this machine, unskewed: time.time() here is the server's clock.
    to_monotonic = time.monotonic() - time.time()
    interval = scheduler.add_job(CHAOS, {"log": str(log)}, interval=INTERVAL)
    retried = scheduler.add_job(CHAOS, {"log": str(log), "fail": True}, retry=2, retry_interval=INTERVAL)
    at = time.time() + 3
    postponed_id = _add_with_skew(server.uri, db_name, _faketime_env(SKEW), {"log": str(log)}, at)

    def finished() -> bool:
        runs = _runs(log)
        return len(runs.get(str(interval.id), [])) >= 3 and len(runs.get(str(retried.id), [])) >= 3 and bool(
            runs.get(str(postponed_id))
        )

    wait_until(finished, timeout=30, what=f"three interval runs, three tries and the postponed run ({node.log})")
    scheduler.cancel_job(interval.id)
    runs = _runs(log)

    for name, job in (("interval", interval.id), ("retry", retried.id)):
        gaps = _gaps(runs[str(job)][:3])
        assert all(INTERVAL - MS <= gap <= INTERVAL + LATE for gap in gaps), f"{name} runs {gaps} s apart"
    ((start, _),) = runs[str(postponed_id)]
    due = at + to_monotonic
    assert due - MS <= start <= due + LATE, f"the postponed job started {start - due:+.3f} s from its time"

    retried = scheduler.get_job(retried.id)
    wait_until(lambda: retried.refresh().status == JobStatus.FAILED, what="the last try's end")
    postponed = scheduler.get_job(postponed_id)
    wait_until(lambda: postponed.refresh().status == JobStatus.DONE, what="the postponed job's end")
    assert postponed.started is not None and postponed.ended is not None
    assert at - MS <= postponed.started.timestamp() <= postponed.ended.timestamp() <= at + LATE
    assert postponed.created is not None and abs(postponed.created.timestamp() - (at - 3)) < LATE
    assert [run["run"] for run in retried.runs()] == [1, 2, 3]
    ends = [run["ended"].timestamp() for run in retried.runs()]
    assert all(INTERVAL - MS <= b - a <= INTERVAL + LATE for a, b in zip(ends, ends[1:], strict=False)), ends
    assert node.proc.poll() is None


def test_the_server_clock_is_read_as_aware_utc(scheduler: Scheduler) -> None:
    """A naive reading would be taken for local time: hours off on a machine whose zone is not UTC."""
    server_now = scheduler.store.server_time()
    assert server_now.utcoffset() is not None and server_now.utcoffset().total_seconds() == 0
    assert abs(server_now.timestamp() - time.time()) < 5
