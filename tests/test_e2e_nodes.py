"""Queue nodes: allow-listed imports route work (a node claims only jobs of the modules it imports, others wait
for theirs), and each live node keeps an entry in the node registry."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Node, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.embedded import EmbeddedServer

pytestmark = pytest.mark.e2e


def test_nodes_split_work_by_module_and_unserved_jobs_wait(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    start_node()  # serves sample_jobs only
    theirs = scheduler.add_job("crash_jobs:StartLog", {"path": "/dev/null", "seconds": 0})
    ours = scheduler.add_job("sample_jobs:Noop").wait(timeout=30)
    assert ours.status == JobStatus.DONE
    assert scheduler.get_job(theirs.id).status == JobStatus.WAITING  # not failed: nobody here serves it
    start_node("--import", "crash_jobs")
    theirs.wait(timeout=30)
    assert theirs.status == JobStatus.DONE and theirs.error is None


def test_queue_imports_from_the_current_directory(server: EmbeddedServer, db_name: str, tmp_path: Path) -> None:
    (tmp_path / "myjobs.py").write_text(
        "from taskscheduler import AbstractJob\n\n\nclass Hello(AbstractJob):\n"
        "    def start(self):\n        return 'hi'\n"
    )
    cmd = [sys.executable, "-m", "taskscheduler", "queue", "--mongodb-uri", server.uri, "--database", db_name]
    node = subprocess.Popen([*cmd, "--import", "myjobs"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        from pymongo import MongoClient

        client: MongoClient[dict[str, object]] = MongoClient(server.uri, tz_aware=True)
        p = Scheduler(client[db_name]).add_job("myjobs:Hello")
        p.wait(timeout=30)
        assert p.status == JobStatus.DONE and p.result == "hi"
        client.close()
    finally:
        node.terminate()
        _, err = node.communicate(timeout=20)
    assert node.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--import MODULE"),
        (["--import", "no_such_module_here"], "cannot import job module: ModuleNotFoundError"),
        (["--import", "bad name"], "module names"),
    ],
)
def test_queue_refuses_a_missing_or_bad_allow_list(
    server: EmbeddedServer, db_name: str, tmp_path: Path, args: list[str], message: str
) -> None:
    cmd = [sys.executable, "-m", "taskscheduler", "queue", "--mongodb-uri", server.uri, "--database", db_name]
    out = subprocess.run([*cmd, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_live_node_is_registered_and_leaves_the_registry(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    node = start_node(orphaned_timeout=1)
    entry = wait_until(
        lambda: [n for n in scheduler.store.live_nodes() if n["workers"]], 20, what="the node's registry entry"
    )[0]
    assert entry["pid"] == node.pid and entry["modules"] == ["sample_jobs"] and entry["lease"] == 1.0
    assert all(w["job"] is None and w["pid"] > 0 for w in entry["workers"])
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 3})
    busy = wait_until(
        lambda: [w for n in scheduler.store.live_nodes() for w in n["workers"] if w["job"] == p.id], 20, what="busy"
    )
    assert len(busy) == 1
    assert node.stop() == 0
    assert scheduler.store.live_nodes() == []  # a graceful stop removes it at once


def test_a_killed_node_expires_from_the_registry(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    node = start_node(orphaned_timeout=1)
    wait_until(lambda: scheduler.store.live_nodes(), 20, what="the node's registry entry")
    node.kill_group()
    wait_until(lambda: scheduler.store.live_nodes() == [], 10, what="the entry to expire (3 leases)")
