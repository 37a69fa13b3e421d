"""Every example runs exactly as its documentation says, from the repository root, with no traceback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskscheduler.node.nodeproc import spawn_node, stop_node
from taskscheduler.ops.embedded import EmbeddedServer

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(server: EmbeddedServer, db_name: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what a user has
    return dict(clean, TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name)


@pytest.fixture
def node_for(server: EmbeddedServer, db_name: str, tmp_path: Path, env: dict[str, str]) -> Iterator[object]:
    nodes: list[subprocess.Popen[bytes]] = []

    def start(module: str, *args: str) -> Path:
        log = tmp_path / f"{module}.log"
        nodes.append(
            spawn_node(
                server.uri, db_name, [module], list(args), log=str(log), env=env, log_level="INFO", cwd=str(ROOT)
            )
        )
        return log

    yield start
    for node in nodes:
        stop_node(node)


def run_example(module: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("examples.hello", [r"^DONE hello, world$"]),
        ("examples.waiting", [r"^squares: \[0, 1, 4, 9, 16, 25, 36, 49, 64, 81\]$", r"^failed as expected: negative"]),
        (
            "examples.progress_events",
            [r"onProcessing", r"^progress +\S+ progress=(20|40|60|80)$", r"onDone .* progress=100$"],
        ),
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


def test_cron_example_keeps_one_job_per_schedule(node_for: object, env: dict[str, str]) -> None:
    node_for("examples.cron")  # type: ignore[operator]
    first = run_example("examples.cron", env)
    assert re.search(
        r"^report: cron '0 7 \* \* mon-fri' in Europe/Zurich, POSTPONED, next run \S+T07:00\+0[12]:00$",
        first,
        re.MULTILINE,
    ), first
    assert re.search(r"^tick: cron '\* \* \* \* \*' in UTC, POSTPONED, next run \S+:\d\d\+00:00$", first, re.MULTILINE)
    second = run_example("examples.cron", env)  # run again: the same two jobs, not two more
    assert second.splitlines()[0] == first.splitlines()[0]


def test_priorities_example_starts_the_urgent_job_first(node_for: object, env: dict[str, str]) -> None:
    node_for("examples.priorities", "--pm", "static", "--min-children", "1", "--max-children", "1")  # type: ignore[operator]
    printed = run_example("examples.priorities", env)
    assert "start order: already running, urgent, bulk 0, bulk 1, bulk 2, bulk 3, bulk 4" in printed, printed


def test_fastapi_example_adds_a_job_and_streams_its_progress(node_for: object, env: dict[str, str]) -> None:
    pytest.importorskip("fastapi", reason="the FastAPI example needs examples/requirements-fastapi.txt")
    node_for("examples.fastapi_app")  # type: ignore[operator]
    script = (
        "import json\n"
        "from fastapi.testclient import TestClient\n"
        "from examples.fastapi_app import create_app\n"
        "with TestClient(create_app()) as web:\n"
        "    job_id = web.post('/jobs', json={'steps': 4}).json()['id']\n"
        "    with web.stream('GET', f'/jobs/{job_id}/progress') as events:\n"
        "        seen = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith('data: ')]\n"
        "    print('progress', [e['progress'] for e in seen if e['status'] == 'PROCESSING'])\n"
        "    print('last', seen[-1])\n"
        "    print('result', web.get(f'/jobs/{job_id}').json()['result'])\n"
        "    print('missing', web.get('/jobs/' + '0' * 24).status_code, web.get('/jobs/nope').status_code)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    moving = json.loads(re.search(r"^progress (.*)$", out.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert len(moving) >= 2 and moving == sorted(moving)  # the bar moved while the job ran
    assert "last {'status': 'DONE', 'progress': 100.0}" in out.stdout
    assert "result counted 4 steps" in out.stdout and "missing 404 404" in out.stdout


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


def test_chain_example_passes_results_along_and_cancels_after_a_failure(node_for: object, env: dict[str, str]) -> None:
    node_for("examples.chain", "--max-children", "4")  # type: ignore[operator]
    printed = run_example("examples.chain", env)
    assert "chain blocked by: 1 job" in printed, printed
    assert 'chain: [["the", 3], ["fox", 2]]' in printed.replace("'", '"'), printed
    assert "chord: 30" in printed, printed  # 1 + 4 + 9 + 16
    # Each canceled step names the dependency that failed it: Count the broken step, Top the canceled Count.
    for step, culprit in (("Count", "FAILED"), ("Top", "CANCELED")):
        line = rf"^after a failure: {step} CANCELED - canceled: dependency [0-9a-f]{{24}} ended {culprit}$"
        assert re.search(line, printed, re.MULTILINE), printed


def test_mailer_example_keeps_its_limits(node_for: object, env: dict[str, str]) -> None:
    node_for("examples.mailer", "--max-children", "4")  # type: ignore[operator]
    printed = run_example("examples.mailer", env)
    assert "limits: {'concurrency': 2, 'rate': '4/s'}" in printed, printed
    sent = re.search(r"^sent 8 mails in ([\d.]+) s, at most (\d) at once$", printed, re.MULTILINE)
    assert sent is not None, printed
    # 8 starts at 4 per second: the last four start a second after the first four, at the earliest.
    assert float(sent.group(1)) >= 1.0 and int(sent.group(2)) <= 2, printed


def test_two_nodes_script_refuses_a_port_another_server_holds() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = dict(os.environ, PYTHON=sys.executable, PORT=str(port))
        out = subprocess.run(
            ["bash", str(ROOT / "examples" / "two_nodes.sh")], env=env, capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"port {port} is in use" in out.stderr and "squares" not in out.stdout


def test_the_examples_own_tests_pass_through_the_pytest_plugin() -> None:
    """examples/tests uses only what a user has: the plugin registered by the package's entry point (no conftest of
    this repository), run as the README says."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TASKSCHEDULER_"))}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/tests"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^4 passed", out.stdout, re.MULTILINE), out.stdout
