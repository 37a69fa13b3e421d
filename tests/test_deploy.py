"""docker-compose.yml, the Dockerfile and .dockerignore (issue 21). No Docker engine runs here, so the files are
checked as data (start order conditions, restart policies, healthchecks, ports on loopback only, the non-root
user, the build context), and what can run without Docker runs: mongo-init's script against a stand-in
``mongosh``, the dashboard's command and each healthcheck against the test server. What only Docker can show is
in docs/deployment.md."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import TESTS_DIR, wait_until
from taskscheduler.ops.embedded import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
MEMBERS = ("mongo1", "mongo2", "mongo3")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    found: dict[str, Any] = compose["services"]
    return found


def _queues(services: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in services.items() if s.get("command", [])[:2] == ["taskscheduler", "queue"]}


def _script(service: dict[str, Any]) -> str:
    """The shell script of a ``[sh|bash, -c, SCRIPT]`` command as the container's shell gets it (compose turns
    ``$$`` into ``$``)."""
    command = service["command"]
    assert command[0] in ("sh", "bash") and command[1] == "-c"
    return str(command[2]).replace("$$", "$")


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment with compose's ``${VAR:-default}`` read from ours."""
    found = {}
    for key, value in service.get("environment", {}).items():
        text = str(value)
        found[key] = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), text)
    return found


# -- the compose file as data -------------------------------------------------------------------------------------


def test_the_members_form_a_replica_set_and_say_when_they_answer(services: dict[str, Any]) -> None:
    for name in MEMBERS:
        member = services[name]
        assert member["command"][:3] == ["mongod", "--replSet", "rs0"]
        assert member["restart"] == "unless-stopped"
        check = member["healthcheck"]["test"]
        assert check[:2] == ["CMD", "mongosh"] and "ping" in " ".join(check)


def test_mongo_init_waits_for_every_member_and_is_idempotent_and_retried(services: dict[str, Any]) -> None:
    init = services["mongo-init"]
    assert init["depends_on"] == {m: {"condition": "service_healthy"} for m in MEMBERS}
    assert init["restart"] == "on-failure"
    script = _script(init)
    assert all(f"{m}:27017" in script for m in MEMBERS) and "rs.initiate" in script
    assert "NotYetInitialized" in script  # an initiated set is left as it is
    assert "db.hello().primary" in script and "quit(1)" in script  # done only once the set has a primary


def test_queue_nodes_start_after_the_set_is_initiated_and_restart(services: dict[str, Any]) -> None:
    queues = _queues(services)
    assert len(queues) == 2
    for queue in queues.values():
        assert queue["build"] == "."
        assert queue["depends_on"] == {"mongo-init": {"condition": "service_completed_successfully"}}
        assert queue["restart"] == "unless-stopped"
        assert queue["healthcheck"]["test"] == ["CMD", "taskscheduler", "health"]
        env = _env(queue)
        uri = env["TASKSCHEDULER_MONGODB_URI"]
        assert "replicaSet=rs0" in uri and all(f"{m}:27017" in uri for m in MEMBERS)
        assert float(env["TASKSCHEDULER_CONNECT_TIMEOUT"]) >= 60
        assert env["TASKSCHEDULER_IMPORT"] == "examples.hello" and (ROOT / "examples/hello.py").exists()


def test_every_long_running_service_has_a_healthcheck_and_a_restart_policy(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name == "mongo-init":  # runs once, to completion
            continue
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), name


def test_ports_are_published_on_loopback_only(services: dict[str, Any]) -> None:
    published = [(name, str(p)) for name, s in services.items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"mongo1", "queue1", "queue2", "dashboard"}
    for name, port in published:
        assert port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)


def test_the_dashboard_runs_read_only_or_with_a_token(services: dict[str, Any]) -> None:
    dash = services["dashboard"]
    assert dash["depends_on"] == {"mongo-init": {"condition": "service_completed_successfully"}}
    script = _script(dash)
    assert "taskscheduler dashboard" in script and "--read-only" in script and "TASKSCHEDULER_TOKEN" in script
    assert "--allowed-host dashboard" in script
    env = dash["environment"]
    assert env["TASKSCHEDULER_HOST"] == "0.0.0.0" and env["TASKSCHEDULER_TOKEN"] == "${TASKSCHEDULER_TOKEN:-}"
    assert dash["ports"] == [f"127.0.0.1:{env['TASKSCHEDULER_PORT']}:{env['TASKSCHEDULER_PORT']}"]


def test_every_environment_variable_is_a_flag_of_its_command(services: dict[str, Any]) -> None:
    """A misspelt variable would be ignored without a word: each must appear in its command's --help."""
    for name in ("queue1", "queue2", "dashboard"):
        command = "dashboard" if name == "dashboard" else "queue"
        shown = subprocess.run(
            [sys.executable, "-m", "taskscheduler", command, "--help"], capture_output=True, text=True, timeout=60
        ).stdout
        for variable in services[name]["environment"]:
            assert variable in shown.replace("\n", "").replace(" ", ""), (name, variable)


# -- the image ----------------------------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_image_runs_as_a_non_root_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", _dockerfile(), re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert f"useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin {users[-1]}" in _dockerfile()


def test_the_image_installs_the_dashboard_and_metrics_extras() -> None:
    import tomllib

    found = re.search(r'pip install --no-cache-dir "\.\[([\w,]+)\]"', _dockerfile())
    assert found is not None
    extras = set(found.group(1).split(","))
    assert extras == {"dashboard", "metrics"}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= set(declared)


def _ignored() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_the_venv_secrets_and_caches_out() -> None:
    ignored = _ignored()
    for entry in (".venv", ".git", ".env", ".env.*", "**/__pycache__", ".taskscheduler", "secantus-data"):
        assert entry in ignored, entry


def test_what_the_image_copies_is_in_the_build_context() -> None:
    copied = [src for line in re.findall(r"^COPY\s+(.+)$", _dockerfile(), re.M) for src in shlex.split(line)[:-1]]
    assert {"pyproject.toml", "README.md", "LICENSE", "src", "examples"} <= set(copied)
    for path in copied:
        assert (ROOT / path).exists(), path
        assert not any(fnmatch(path, pattern.rstrip("/")) for pattern in _ignored()), path


# -- what runs without Docker ------------------------------------------------------------------------------------


STUB_MONGOSH = """#!/bin/sh
# Stands in for mongosh: a member answers after it was asked $answers_after times (state in $STATE).
host=""; eval_text=""
while [ $# -gt 0 ]; do
  case "$1" in --host) host="$2"; shift 2;; --eval) eval_text="$2"; shift 2;; *) shift;; esac
done
count=$(cat "$STATE/$host" 2>/dev/null || echo 0); count=$((count + 1)); echo "$count" > "$STATE/$host"
echo "$host $(echo "$eval_text" | tr '\\n' ' ')" >> "$STATE/calls"
limit=$(cat "$STATE/$host.answers_after" 2>/dev/null || echo 0)
[ "$count" -gt "$limit" ] || exit 1
case "$eval_text" in *rs.initiate*) echo "mongo-init: primary mongo1:27017";; esac
exit 0
"""


@pytest.fixture
def stand_ins(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A PATH with a stand-in mongosh and a sleep that does not sleep, and the folder of their state."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "mongosh").write_text(STUB_MONGOSH)
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("mongosh", "sleep"):
        (bin_dir / tool).chmod(0o755)
    yield state, dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STATE=str(state))


def test_mongo_init_waits_for_a_late_member_before_initiating(
    services: dict[str, Any], stand_ins: tuple[Path, dict[str, str]]
) -> None:
    state, env = stand_ins
    (state / "mongo2.answers_after").write_text("3")  # mongo2 answers on the fourth ping
    out = subprocess.run(["bash", "-c", _script(services["mongo-init"])], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("mongo-init: waiting for mongo2") == 3
    calls = (state / "calls").read_text().splitlines()
    initiate = [i for i, call in enumerate(calls) if "rs.initiate" in call]
    assert len(initiate) == 1 and calls[initiate[0]].startswith("mongo1 ")
    for member in MEMBERS:  # every member answered before the set was initiated
        assert any(call.startswith(f"{member} ") and "ping" in call for call in calls[: initiate[0]]), member


def test_mongo_init_fails_when_a_member_never_answers(
    services: dict[str, Any], stand_ins: tuple[Path, dict[str, str]]
) -> None:
    state, env = stand_ins
    (state / "mongo3.answers_after").write_text("1000")
    out = subprocess.run(["bash", "-c", _script(services["mongo-init"])], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "mongo3 does not answer" in out.stderr  # restart: on-failure tries again
    assert "rs.initiate" not in (state / "calls").read_text()


def _healthcheck(service: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    argv = [sys.executable if test[1] == "python" else test[1], *test[2:]]
    if argv[0] == "taskscheduler":
        argv = [sys.executable, "-m", "taskscheduler", *argv[1:]]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


def test_the_queue_healthcheck_answers_for_the_replica_set(
    services: dict[str, Any], server: EmbeddedServer, db_name: str
) -> None:
    env = {**os.environ, **_env(services["queue1"]), "TASKSCHEDULER_MONGODB_URI": server.uri}
    assert _healthcheck(services["queue1"], env).returncode == 0
    env["TASKSCHEDULER_MONGODB_URI"] = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
    down = _healthcheck(services["queue1"], env)
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stderr


@pytest.mark.parametrize("token", ["", "s3cret"])
def test_the_dashboard_command_is_read_only_unless_given_a_token(
    services: dict[str, Any], server: EmbeddedServer, db_name: str, token: str
) -> None:
    dash = services["dashboard"]
    port = free_port()
    env = {**os.environ, **_env(dash), "PYTHONPATH": str(TESTS_DIR), "TASKSCHEDULER_MONGODB_URI": server.uri}
    # This machine's loopback here, not every interface as in the container.
    env.update(TASKSCHEDULER_HOST="127.0.0.1", TASKSCHEDULER_PORT=str(port), TASKSCHEDULER_DATABASE=db_name)
    env["TASKSCHEDULER_TOKEN"] = token
    bin_dir = Path(sys.executable).parent  # `taskscheduler` as the image has it on PATH
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = subprocess.Popen(
        ["sh", "-c", _script(dash)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: _healthcheck(dash, env).returncode == 0 or proc.poll() is not None, 30, 0.2)
        assert proc.poll() is None, proc.communicate()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/config", timeout=5) as reply:
            config = json.loads(reply.read())
        assert (config["read_only"], config["token_required"]) == ((False, True) if token else (True, False))
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_systemd_unit_runs_the_queue() -> None:
    unit = (ROOT / "examples/deploy/taskscheduler-queue.service").read_text()
    assert "ExecStart=" in unit and "taskscheduler queue" in unit and "KillSignal=SIGTERM" in unit
