"""Every example runs exactly as its documentation says, from the repository root, with no traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskscheduler.embedded import EmbeddedServer
from taskscheduler.nodeproc import spawn_node, stop_node

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(server: EmbeddedServer, db_name: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what a user has
    return dict(clean, TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name)


@pytest.fixture
def node_for(server: EmbeddedServer, db_name: str, tmp_path: Path, env: dict[str, str]) -> Iterator[object]:
    nodes: list[subprocess.Popen[bytes]] = []

    def start(module: str) -> Path:
        log = tmp_path / f"{module}.log"
        nodes.append(spawn_node(server.uri, db_name, [module], log=str(log), env=env, log_level="INFO", cwd=str(ROOT)))
        return log

    yield start
    for node in nodes:
        stop_node(node)


def run_example(module: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("examples.hello", [r"^DONE hello, world$"]),
        ("examples.waiting", [r"^squares: \[0, 1, 4, 9, 16, 25, 36, 49, 64, 81\]$", r"^failed as expected: negative"]),
        ("examples.progress_events", [r"onProcessing", r"onDone .* progress=100$"]),
        (
            "examples.retries_timeouts",
            [r"^slow job: TIMEOUT job exceeded its timeout", *[rf"run {n}: FAILED no luck today$" for n in (1, 2, 3)]],
        ),
    ],
)
def test_example_runs_as_documented(module: str, expected: list[str], node_for: object, env: dict[str, str]) -> None:
    log = node_for(module)  # type: ignore[operator]
    printed = run_example(module, env)
    for pattern in expected:
        assert re.search(pattern, printed, re.MULTILINE), printed
    text = Path(log).read_text()
    assert text.count("Traceback") == text.count(" failed: "), text  # tracebacks only of jobs failing on purpose


def test_two_nodes_script_cleans_up_after_itself(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(port))
    out = subprocess.run(
        ["bash", str(ROOT / "examples" / "two_nodes.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "squares: [0, 1, 4" in out.stdout
    leftovers = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port}|--port {port}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "processes left running: " + leftovers.stdout
