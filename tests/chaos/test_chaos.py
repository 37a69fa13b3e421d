"""Randomized fault harness ("chaos"): real queue nodes, a seeded schedule of faults, invariants checked after.

Each seed starts 2-3 queue nodes (``orphaned_timeout`` 2 s, 2-3 workers each), adds a mix of
``sample_jobs:ChaosJob`` jobs (plain, always failing with retries, recurring ones that cancel themselves or are
canceled by the test after some runs, jobs that sleep past their timeout, long jobs canceled while running, jobs
due a few seconds after they are added, jobs whose code starts subprocesses, some in a session of their own) and,
for :data:`FAULT_SECONDS`, injects faults drawn from the seed, each kind at least once:

- ``kill_node``: SIGKILL of a node's process group, and a restart; ``term_node``: SIGTERM of a node, and a
  restart; ``kill_worker``: SIGKILL of a single worker process;
- ``stop_node``: SIGSTOP of a node's queue process past ``orphaned_timeout`` (its manager and workers keep
  running), then SIGCONT; ``group_stop``: the same for the node's whole process group (Ctrl-Z, a frozen
  container: the node and its manager stop, the workers, each in a process group of its own, keep running);
- ``failpoint``: ``failCommand`` failpoints that make the server close connections for a moment; ``outages``:
  2-4 outages of the whole data path in a row, each longer than ``orphaned_timeout``;
- ``kill_worker_children``: SIGKILL of the worker alone, or of the node process alone, while the job's
  subprocesses run;
- ``term_during_end``: SIGTERM of a node while one of its workers is between its job's return and the recording
  of its end (nodes run with the test-only failpoint ``worker.returned=sleep:0.3@0.3`` so that such moments last);
- ``cancel``: cancels of running or waiting jobs;
- node configurations drawn per node: ``claim_pause``, workers that stop themselves right after their claim is
  written, before their manager hears of it (failpoint ``worker.claimed=stop:S@0.15``, S shorter or longer than
  the lease; counted when the harness sees a stopped worker); ``skew``: one node of the seed runs with its clock
  120 s behind or ahead (Debian's libfaketime; the server never is, and ``time.monotonic()`` stays real).

Then the faults stop, every node is stopped gracefully (SIGTERM) while jobs run, fresh nodes take over, the
system settles (polling with deadlines), the nodes stop gracefully again, and the run log the jobs wrote (one line
per start, tick and end of every execution and every tick of its subprocesses, see ``ChaosJob``), the job and
event collections and the job collection's change stream are checked against SPEC sections 2 and 4:

- every job ended in a status the SPEC allows for its kind (FAILED only by its own error or a third orphaning,
  CANCELED only when canceled); a node stopped with SIGTERM leaves no job PROCESSING (and exits 0), no node exits
  by itself, and no node process is left once the nodes stop;
- each run of a job has exactly one end event, run numbers are contiguous, ``Process.runs()`` lists exactly those
  events, the job's ``run`` and ``outcome`` agree with them;
- no retry lost or doubled: a job that always fails ran exactly retry + 1 runs unless canceled; runs follow each
  other only after FAILED/TIMEOUT (retry) or for recurring jobs;
- the events of each run tell a history the SPEC allows: attempts (claims) one after the other, each closed by a
  release before the next claim, the last one by the run's end; the next run announced once, by the end of the
  previous one;
- every execution in the log is recorded as an attempt of its run (PROCESSING event of its worker), and every run
  recorded DONE or FAILED by a job's own error was really executed to that end by that worker;
- no job ran on two workers at overlapping times (one execution, its subprocesses included, logged activity after
  another one had started), except for at most one heartbeat (+ slack), the stall window, when the first one ran
  on a node that was SIGSTOPped (queue process or whole group) or its worker was stopped (SPEC 4: a stalled node
  fences its own jobs);
- no job code ran after the lease it ran under expired on the server: each attempt's lease (its claim and the
  last expiry its node wrote) is read from the job collection's change stream, and no activity of the execution
  (worker or subprocess) is logged after it (SPEC 4: every process that runs a job's code fences itself);
- no subprocess of a job outlived its worker by more than the stall window when the harness killed the worker or
  its node (SPEC 4: a worker that dies takes its job's processes with it);
- no run ran again after its code had returned, unless its worker died before the end was recorded or an outage
  kept it from recording (SPEC 4: a graceful stop never kills a run whose code has returned);
- no run started before it was due on the server's clock: a job added with ``at`` not before it, a retry or
  interval run not before the end of the previous run plus its delay (SPEC 4: schedules use the server's clock);
- a job ended FAILED by a third orphaning only when three attempts of that run lost their process to a SIGKILL
  (SPEC 4: orphanings count dead processes only).

:func:`test_chaos_room` (same seeds) attacks the room ledger of a small capped job collection (SPEC 5): long-lived
producers, one-shot producers (``taskscheduler add``, and fresh schedulers by the hundred) and ``flush()`` from
another process; its change stream shows that no unfinished job is ever evicted and no finished job deleted while
the collection is less than half full.

``make test`` runs seeds 0-2; ``make chaos`` runs 50 (``--chaos-seeds N``, or a list/range such as ``3,17`` or
``10-19``). A failure names its seed: rerun it alone with ``--chaos-seeds SEED-SEED``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from chaos.checks import judge
from chaos.config import FAULT_SECONDS, SETTLE_SECONDS, parse_seeds
from chaos.harness import Harness
from chaos.leases import read_changes
from chaos.report import _log_marks, report, summary
from chaos.room import ROOM_CAP, ROOM_OPTIONS, RoomChaos, check_room
from helpers import Node
from taskscheduler import Scheduler
from taskscheduler.ops.embedded import EmbeddedServer


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "chaos_seed" in metafunc.fixturenames:
        metafunc.parametrize("chaos_seed", parse_seeds(metafunc.config.getoption("--chaos-seeds")))




# -- the test -----------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(FAULT_SECONDS + SETTLE_SECONDS + 90)
def test_chaos(
    chaos_seed: int,
    scheduler: Scheduler,
    client: MongoClient[dict[str, Any]],
    start_node: Callable[..., Node],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    db_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = Harness(chaos_seed, scheduler, client, start_node, monkeypatch, tmp_path, db_name)
    try:
        h.drive()
        h.stop_all()
        h.settle()
    finally:
        h.cleanup()
    judged = judge(h)
    head = summary(h, judged) + f" | node logs: {_log_marks(h.nodes)}"
    with capsys.disabled():
        print("\n" + head)
    text = report(h, judged, head)
    (tmp_path / "chaos-report.txt").write_text(text)  # also of a seed that passes: what its faults did
    if h.violations or any(j.problems for j in judged):
        pytest.fail(f"{text}\n(this report: {tmp_path / 'chaos-report.txt'})", pytrace=False)




@pytest.fixture
def room_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of the room scenario's own: the test server scans every entry of a capped collection on each insert
    and grows slower with what a long session left in it (seeds late in a run, or after the suite's other tests,
    ran out of time while alone they take seconds)."""
    srv = EmbeddedServer(port=0, data_dir=str(tmp_path / "room-server"), log_path=str(tmp_path / "room-server.log"))
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_chaos_room(chaos_seed: int, room_server: EmbeddedServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Long-lived producers, one-shot producers and flush() from another process fill a small capped job
    collection again and again: no unfinished job is lost to eviction, no finished one deleted below half full."""
    server = room_server
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, serverSelectionTimeoutMS=10_000)
    try:
        _room(chaos_seed, server, client["room"], capsys)
    finally:
        client.close()


def _room(
    chaos_seed: int, server: EmbeddedServer, db: Database[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    start = db.command("ping")["operationTime"]
    chaos = RoomChaos(chaos_seed, server.uri, db)
    try:
        chaos.credit_round()
        chaos.leak_round()
    finally:
        chaos.close()
    room = chaos.room
    problems = check_room(read_changes(db, str(ROOM_OPTIONS["job_queue"]), start), ROOM_CAP)
    problems += [f"job {job} missing: added after the last flush, never finished" for job in sorted(chaos.missing)]
    problems += room.errors
    head = (
        f"chaos room seed {chaos_seed}: {len(chaos.producers)} producers, {chaos.oneshots} one-shot schedulers, "
        f"{len(room.added)} jobs added, {len(room.flushes)} flushes, {room.full} QueueFullError, "
        f"{len(room.finished)} finished by the test | {time.monotonic() - started:.1f} s"
    )
    with capsys.disabled():
        print("\n" + head)
    if problems:
        pytest.fail("\n".join([head, *chaos.steps, "violations:", *(f"  {p}" for p in problems)]), pytrace=False)
