"""The change streams wait_for opens: none left open on the server, after
hundreds of waits in a row, waits from many threads, or a script that exits right after its wait."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from bson.int64 import Int64
from pymongo import MongoClient, monitoring
from pymongo.database import Database

from taskscheduler import Scheduler
from taskscheduler.constants import JobStatus
from taskscheduler.ops.embedded import EmbeddedServer


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


def finished_job(scheduler: Scheduler) -> Any:
    p = scheduler.add_job("sample_jobs:Noop")
    scheduler.cancel_job(p.id)
    return p


def test_waits_in_a_row_leave_no_cursor_behind(server: EmbeddedServer, db_name: str) -> None:
    """300 waits in a row, each opening a change stream: when each returns, its cursor is gone from the server."""
    listener = CursorIds()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[listener])
    probe: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    try:
        scheduler = Scheduler(client[db_name])
        p = finished_job(scheduler)
        for _ in range(300):
            scheduler.wait_for([p], timeout=10)
        assert len(listener.ids) >= 300
        assert still_open(probe[db_name], listener.ids) == []
    finally:
        client.close()
        probe.drop_database(db_name)
        probe.close()


def test_waits_from_many_threads_at_once_all_answer_and_leave_no_cursor(server: EmbeddedServer, db_name: str) -> None:
    """Held: 8 threads sharing one Scheduler, each waiting 60 times on finished jobs and on jobs cancelled while
    they wait: every wait answers, no error, and no cursor is left."""
    listener = CursorIds()
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True, event_listeners=[listener])
    probe: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    errors: list[BaseException] = []
    try:
        scheduler = Scheduler(client[db_name])
        done = finished_job(scheduler)

        def waiter() -> None:
            try:
                for n in range(60):
                    if n % 30 == 0:  # one that really waits for a change
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
    assert still_open(db, [int(i) for i in ids]) == []
