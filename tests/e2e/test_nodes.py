"""Queue nodes: allow-listed imports route work (a node claims only jobs of the modules it imports, others wait
for theirs), and each live node keeps an entry in the node registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from bson import ObjectId

from helpers import Node, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.ops.embedded import EmbeddedServer

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


def _cli(server: EmbeddedServer, db_name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name)
    return subprocess.run(
        [sys.executable, "-m", "taskscheduler", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_info_and_health_describe_the_cluster(
    scheduler: Scheduler, start_node: Callable[..., Node], server: EmbeddedServer, db_name: str
) -> None:
    node = start_node()
    scheduler.add_job("sample_jobs:Noop").wait(timeout=30)
    scheduler.add_job("sample_jobs:Fail", "x").wait(timeout=30)
    scheduler.add_job("crash_jobs:StartLog", {"path": "/dev/null", "seconds": 0})  # nobody serves crash_jobs
    live = wait_until(lambda: [n for n in scheduler.store.live_nodes() if n["workers"]], 20, what="registry")[0]
    out = _cli(server, db_name, "info", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["jobs"] == {"total": 3, "by_status": {"done": 1, "failed": 1, "waiting": 1}}
    assert summary["classes"]["sample_jobs:Fail"] == {"failed": 1}
    assert [n["pid"] for n in summary["nodes"]] == [node.pid] and summary["nodes"][0]["idle"] >= 1
    assert summary["runs_ended"]["last_minute"] == {"done": 1, "failed": 1}
    assert summary["unserved_waiting_classes"] == ["crash_jobs:StartLog"]
    assert summary["oldest_waiting_seconds"] >= 0
    table = _cli(server, db_name, "info")
    assert "jobs: 3 (done 1, failed 1, waiting 1)" in table.stdout
    assert "waiting classes no live node serves: crash_jobs:StartLog" in table.stdout
    assert _cli(server, db_name, "health").returncode == 0
    assert _cli(server, db_name, "health", "--node", str(live["_id"])).returncode == 0
    node.stop()
    dead = _cli(server, db_name, "health", "--node", str(live["_id"]))
    assert dead.returncode == 1
    assert dead.stderr.strip() == f"Error: queue node {live['_id']} is not alive (no fresh registry entry)"


def test_health_of_an_unreachable_server_is_exit_1(db_name: str) -> None:
    env = dict(os.environ, TASKSCHEDULER_MONGODB_URI="mongodb://127.0.0.1:1/?directConnection=true")
    out = subprocess.run([sys.executable, "-m", "taskscheduler", "health"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_a_free_worker_starts_a_new_job_at_once_after_other_nodes_took_many(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """SPEC 4: a WAITING job starts within 1 s of a free slot, however many jobs other nodes claimed meanwhile."""
    start_node("--import", "crash_jobs", "--pm", "static", "--min-children", "1", "--max-children", "1")
    flag = tmp_path / "busy"
    flag.touch()
    busy = scheduler.add_job("crash_jobs:ProgressThroughOutage", {"flag": str(flag)})  # runs while the flag exists
    wait_until(lambda: scheduler.get_job(busy.id).status == JobStatus.PROCESSING, 30, what="the node to be busy")
    elsewhere = ObjectId()  # the workers of other nodes, which take every job at once
    for _ in range(300):
        scheduler.lifecycle.claim(scheduler.add_job("sample_jobs:Noop").id, elsewhere, 120.0)
    # The node must have read them all in its change stream: it tells nothing per job it hands over (no log
    # line, no metric of jobs claimed elsewhere), so this waits a time many times its stream's latency.
    time.sleep(1)
    flag.unlink()
    busy.wait(timeout=30)
    began = time.monotonic()
    fresh = scheduler.add_job("sample_jobs:Noop")
    fresh.wait(timeout=60)
    took = time.monotonic() - began
    assert took < 2.0, f"a new job waited {took:.1f} s for a free worker (SPEC: within 1 s)"
