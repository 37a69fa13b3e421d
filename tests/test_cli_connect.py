"""Long-running commands wait for a deployment that is coming up (``--connect-timeout``, issue 21): a queue node
started before its server comes up once the server answers, then runs jobs; past the timeout it exits 1 with one
clear line. What a deployment says while it comes up is judged by ``deployment_problem`` (real ``hello`` replies
of each stage: a replica set member nobody initiated yet, a set without a primary yet)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from helpers import TESTS_DIR, Node, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.errors import ConfigurationError, ServerUnavailableError
from taskscheduler.node.nodeproc import spawn_node
from taskscheduler.ops.embedded import EmbeddedServer, free_port, uri_for
from taskscheduler.store.mongo import deployment
from taskscheduler.store.mongo.deployment import _Problem, deployment_problem

WHERE = "mongo1:27017"
#: ``hello`` of a mongod started with --replSet before rs.initiate() (MongoDB 7.0).
UNINITIATED = {
    "isWritablePrimary": False,
    "secondary": False,
    "info": "Does not have a valid replica set config",
    "isreplicaset": True,
    "ok": 1.0,
}
#: ``hello`` of a member of an initiated set that has not elected a primary yet.
NO_PRIMARY = {"isWritablePrimary": False, "secondary": True, "setName": "rs0", "hosts": [WHERE], "ok": 1.0}
PRIMARY = {"isWritablePrimary": True, "secondary": False, "setName": "rs0", "primary": WHERE, "ok": 1.0}
STANDALONE = {"isWritablePrimary": True, "ok": 1.0}
MONGOS = {"isWritablePrimary": True, "msg": "isdbgrid", "ok": 1.0}


def problem(hello: dict[str, Any], version: str = "7.0.12", primary: bool = True) -> _Problem | None:
    return deployment_problem(hello, version, WHERE, primary=primary)


def test_a_set_not_initiated_yet_or_without_a_primary_yet_passes_with_time() -> None:
    waiting = problem(UNINITIATED)
    assert waiting is not None and waiting.passing and "not initiated yet" in waiting.message
    electing = problem(NO_PRIMARY)
    assert electing is not None and electing.passing and "no primary yet" in electing.message
    assert problem(PRIMARY) is None and problem(MONGOS) is None


def test_what_time_cannot_cure_fails_at_once() -> None:
    standalone = problem(STANDALONE)
    assert standalone is not None and not standalone.passing and "not a replica set" in standalone.message
    old = problem(PRIMARY, version="4.4.29")
    assert old is not None and not old.passing and "needs 5.0.7" in old.message


def test_short_commands_still_accept_a_secondary() -> None:
    """``jobs``, ``show``... read; only queue and dashboard, which write, wait for a primary."""
    assert problem(NO_PRIMARY, primary=False) is None


class Stages:
    """A deployment coming up: each attempt of wait_until_ready gets the next stage."""

    def __init__(self, *stages: _Problem | None) -> None:
        self.stages = list(stages)

    def __call__(self, *, primary: bool) -> _Problem | None:
        assert primary  # the wait asks for a primary
        return self.stages.pop(0) if len(self.stages) > 1 else self.stages[0]


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployment, "WAIT_PAUSE_SECONDS", 0.01)


def test_the_wait_says_each_reason_once_and_returns_when_ready(scheduler: Scheduler, quick: None) -> None:
    store = scheduler.store
    unreachable = _Problem("cannot reach MongoDB: connection refused", passing=True, reachable=False)
    uninitiated, electing = problem(UNINITIATED), problem(NO_PRIMARY)
    stages = Stages(unreachable, unreachable, uninitiated, uninitiated, electing, None)
    store._deployment_problem = stages  # type: ignore[method-assign]
    said: list[str] = []
    store._checked = False
    store.wait_until_ready(30, said.append)
    assert [s.split(": ", 1)[1].split(";")[0] for s in said] == [
        p.message for p in (unreachable, uninitiated, electing) if p is not None
    ]
    assert all("giving up in" in s for s in said)


def test_the_wait_gives_up_naming_the_last_reason(scheduler: Scheduler, quick: None) -> None:
    store = scheduler.store
    store._deployment_problem = Stages(problem(UNINITIATED))  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=r"not initiated yet .*\(waited 0.3 s"):
        store.wait_until_ready(0.3, lambda reason: None)
    assert 0.3 <= time.monotonic() - started < 5
    store._deployment_problem = Stages(_Problem("cannot reach MongoDB: refused", passing=True, reachable=False))
    with pytest.raises(ServerUnavailableError, match="waited 0.2 s"):
        store.wait_until_ready(0.2, lambda reason: None)
    store._deployment_problem = Stages(problem(STANDALONE))
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="not a replica set"):
        store.wait_until_ready(30, lambda reason: None)
    assert time.monotonic() - started < 1  # at once: waiting cannot make it a replica set


# -- real processes ------------------------------------------------------------------------------------------------


@pytest.fixture
def late_port(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A free port for a server started later in the test, and its data directory (stopped after)."""
    yield free_port(), tmp_path / "late-server"


def test_a_queue_node_started_before_its_server_comes_up_and_runs_a_job(
    late_port: tuple[int, Path], tmp_path: Path
) -> None:
    port, data = late_port
    uri = uri_for(port)
    log = tmp_path / "node.log"
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    node = Node(spawn_node(uri, "late", ["sample_jobs"], log=str(log), env=env, log_level="INFO"), log)
    server = EmbeddedServer(port=port, data_dir=str(data))
    try:
        # The node is up and waiting (the case: the server came up seconds after the node).
        wait_until(lambda: "waiting for MongoDB" in node.output(), 20, what="the node to say it waits")
        assert node.proc.poll() is None, node.output()
        server.start()
        client: MongoClient[dict[str, Any]] = MongoClient(server.uri, tz_aware=True)
        try:
            scheduler = Scheduler(client["late"])
            job = scheduler.add_job("sample_jobs:Echo", {"late": True})
            job.wait(timeout=60)
            assert (job.status, job.result) == (JobStatus.DONE, {"late": True}), node.output()
        finally:
            client.close()
        assert node.stop() == 0, node.output()
        assert "cannot reach MongoDB" in node.output() and "--connect-timeout" in node.output()
    finally:
        if node.proc.poll() is None:
            node.kill_group()
        server.stop()


def _cli(*args: str, uri: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=uri)
    return subprocess.run(
        [sys.executable, "-m", "taskscheduler", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize("command", [("queue", "--import", "sample_jobs"), ("dashboard", "--port", "0")])
def test_past_its_connect_timeout_a_long_running_command_exits_1_with_one_error_line(command: tuple[str, ...]) -> None:
    uri = uri_for(free_port())  # nobody listens there
    started = time.monotonic()
    out = _cli(*command, "--connect-timeout", "3", uri=uri)
    took = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot reach MongoDB" in errors[0] and "waited 3 s" in errors[0], out.stderr
    assert out.stderr.strip().endswith(errors[0]) and "Traceback" not in out.stderr
    assert "waiting for MongoDB" in out.stderr  # it said what it waited for
    assert 3 <= took < 30


def test_the_connect_timeout_comes_from_its_env_var_too() -> None:
    uri = uri_for(free_port())
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=uri, TASKSCHEDULER_CONNECT_TIMEOUT="0")
    env_out = subprocess.run(
        [sys.executable, "-m", "taskscheduler", "queue", "--import", "sample_jobs"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    # 0: no wait, the short answer of every other command: one line.
    assert env_out.returncode == 1 and len(env_out.stderr.strip().splitlines()) == 1, env_out.stderr
    assert "waiting for MongoDB" not in env_out.stderr
