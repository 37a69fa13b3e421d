"""Deployments that cannot serve are refused up front, in one line: not a replica set, a port in use."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from helpers import TESTS_DIR
from taskscheduler import Scheduler
from taskscheduler.errors import ConfigurationError
from taskscheduler.ops.embedded import EmbeddedServer


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(port=0, data_dir=str(tmp_path_factory.mktemp("standalone")), standalone=True)
    srv.start()
    yield srv
    srv.stop()


def cli(*args: str, uri: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=uri, TASKSCHEDULER_DATABASE="solo")
    return subprocess.run(
        [sys.executable, "-m", "taskscheduler", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_the_api_refuses_a_server_without_a_replica_set(standalone: EmbeddedServer) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(standalone.uri, tz_aware=True)
    try:
        scheduler = Scheduler(client["solo"])
        with pytest.raises(ConfigurationError, match="not a replica set"):
            scheduler.add_job("sample_jobs:Noop")
        with pytest.raises(ConfigurationError, match="rs.initiate"):
            scheduler.listen(lambda p: True, timeout=1)
        assert client["solo"].list_collection_names() == []  # nothing written
    finally:
        client.close()


@pytest.mark.parametrize(
    "args",
    [
        ("add", "sample_jobs:Noop"),
        ("jobs",),
        ("queue", "--import", "sample_jobs"),
        ("info",),
        ("health",),
        ("dashboard",),
    ],
)
def test_the_cli_says_so_in_one_line_with_exit_1(standalone: EmbeddedServer, args: tuple[str, ...]) -> None:
    out = cli(*args, uri=standalone.uri)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "not a replica set" in out.stderr


def test_server_refuses_a_port_in_use(server: EmbeddedServer, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "taskscheduler", "server", "--port", str(server.port), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == f"Error: port {server.port} is in use: choose another with --port"
    assert "listening" not in out.stdout
