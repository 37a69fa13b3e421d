"""Deployment defaults that hold against a local adversary: the embedded server's files and address, the image and
compose file, no password of a MongoDB URI in any output, bad ports as one line, dependency floors, and the
options upstream code passes (``retry``/``interval`` below -1, ``orphaned_rate_limit``)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from pymongo.database import Database

from helpers import TESTS_DIR, wait_until
from taskscheduler import DefaultWorkerFactory, Queue, Scheduler
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.node.nodeproc import spawn_node
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.redact import redact_uri, scrub
from taskscheduler.store import connect

ROOT = Path(__file__).resolve().parent.parent
SECRET = "S3CRETPW"


def pythonpath() -> str:
    return os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])


def taskscheduler(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHONPATH=pythonpath(), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "taskscheduler", *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def assert_one_line_error(out: subprocess.CompletedProcess[str], code: int) -> None:
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("Error: ")


# The embedded server: this machine only, its files its user's only.


@pytest.fixture(scope="module")
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedServer, Path, Path]]:
    base = tmp_path_factory.mktemp("private")
    base.chmod(0o755)
    data = base / "data"
    data.mkdir(mode=0o755)  # made before, as an older version (or a hand) left it
    data.chmod(0o755)
    log = base / "server.log"
    old_umask = os.umask(0o022)  # what most shells run with
    try:
        srv = EmbeddedServer(port=0, data_dir=str(data), log_path=str(log)).start()
    finally:
        os.umask(old_umask)
    yield srv, data, log
    srv.stop()


def test_the_embedded_server_keeps_its_files_to_its_own_user(
    private_server: tuple[EmbeddedServer, Path, Path],
) -> None:
    srv, data, log = private_server
    client = connect(srv.uri, "private")
    try:
        client["jobs"].insert_one({"written": True})  # make the server write data files
    finally:
        client.client.close()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0
    modes = {str(p): stat.S_IMODE(p.stat().st_mode) for p in data.rglob("*")}
    assert modes
    assert {path: oct(mode) for path, mode in modes.items() if mode & 0o077} == {}


def test_a_new_data_directory_is_made_mode_0700(tmp_path: Path) -> None:
    data = tmp_path / "a" / "b"
    with EmbeddedServer(port=0, data_dir=str(data)):
        assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_the_embedded_server_listens_on_loopback_only(private_server: tuple[EmbeddedServer, Path, Path]) -> None:
    srv, _, _ = private_server
    assert srv.host == "127.0.0.1" and srv.uri.startswith("mongodb://127.0.0.1:")
    proc = srv._proc
    assert proc is not None
    listening = [c for c in psutil.Process(proc.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


@pytest.mark.parametrize("port", [70000, -1, True, "27017"])
def test_the_embedded_server_refuses_a_port_out_of_range(port: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="port must be an integer from 0 to 65535"):
        EmbeddedServer(port=port)


# The image and the compose file.


def test_compose_publishes_mongodb_on_loopback_only() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    published = [(name, str(p)) for name, s in compose["services"].items() for p in s.get("ports", [])]
    assert published, "the compose file publishes MongoDB for a client on the host"
    assert [(n, p) for n, p in published if not p.startswith("127.0.0.1:")] == []


def test_the_image_runs_as_a_user_that_is_not_root() -> None:
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [i for i, words in enumerate(lines) if words[0] == "USER"]
    assert users, "the image runs as root"
    last = users[-1]
    assert lines[last][1] not in ("root", "0") and not lines[last][1].startswith(("root:", "0:"))
    assert not any(words[0] == "USER" for words in lines[last + 1 :])
    assert any(words[0] == "CMD" for words in lines[last + 1 :])  # the command runs as that user


def test_the_build_context_leaves_out_the_venv_git_and_caches() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "**/__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".env"} <= ignored


# Passwords of MongoDB URIs.


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("mongodb://admin:S3CRETPW@h/", "mongodb://admin:***@h/"),
        ("mongodbx://admin:S3CRETPW@h/", "mongodbx://admin:***@h/"),
        ("mongodb+srv://admin:S3CRETPW@cluster.example.com/db", "mongodb+srv://admin:***@cluster.example.com/db"),
        ("mongodb://admin:S3CRETPW@h1:1,h2:2/?replicaSet=rs", "mongodb://admin:***@h1:1,h2:2/?replicaSet=rs"),
        ("mongodb://admin:S3C@RETPW@h/", "mongodb://admin:***@h/"),  # an unescaped @
        ("mongodb://admin:S3C/RETPW@h/", "mongodb://admin:***@h/"),  # an unescaped /
        ("mongodb://admin:S3C:RETPW@h/", "mongodb://admin:***@h/"),
        ("mongodb://admin:S3%40CRETPW@h/", "mongodb://admin:***@h/"),
        ("admin:S3CRETPW@h", "admin:***@h"),  # no scheme
        ("mongodb://h1:27017,h2:27017/?replicaSet=rs0", "mongodb://h1:27017,h2:27017/?replicaSet=rs0"),
        ("mongodb://admin@h/", "mongodb://admin@h/"),  # a user, no password
        ("", ""),
    ],
)
def test_a_uri_is_shown_without_its_password(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_a_driver_message_is_scrubbed_of_the_password_as_given_and_decoded() -> None:
    uri = "mongodb://admin:S3%40CRETPW@h/"
    assert scrub("bad S3%40CRETPW and S3@CRETPW", uri) == "bad *** and ***"
    assert scrub("nothing to hide", "mongodb://h/") == "nothing to hide"


@pytest.mark.parametrize(
    "uri",
    [
        "mongodbx://admin:S3CRETPW@h/",
        "mongodb://admin:S3CRETPW@h:70000/",  # pymongo's ValueError: a traceback before
        "mongodb://admin:S3CRETPW@h:port/",
        "mongodb://admin:S3CRETPW@[::1/",
        "mongodb://admin:S3C/RETPW@h/",
        "mongodb://admin:S3C@RETPW@h/",
        "mongodb://admin:S3CRETPW@h/?tlsCAFile=/nonexistent/ca.pem",  # an OSError: a traceback before
        "mongodb://admin:S3CRETPW@h/?authMechanism=MONGODB-X509",
    ],
)
def test_a_bad_uri_is_a_typed_error_without_the_password(uri: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        connect(uri, "db", timeout_ms=100)
    message = str(caught.value)
    assert message.startswith("invalid MongoDB URI ") and SECRET not in message and "***" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no driver text chained


@pytest.mark.parametrize(
    "uri", ["mongodbx://admin:S3CRETPW@h/", "mongodb://admin:S3CRETPW@h:70000/", "mongodb://admin:S3C/RETPW@h/"]
)
@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_cli_says_a_bad_uri_in_one_line_without_the_password(uri: str, how: str) -> None:
    if how == "flag":
        out = taskscheduler("jobs", "--mongodb-uri", uri)
    else:
        out = taskscheduler("jobs", env={"TASKSCHEDULER_MONGODB_URI": uri})
    assert_one_line_error(out, 2)
    assert SECRET not in out.stderr + out.stdout and "admin:***@" in out.stderr


def test_a_node_started_by_the_library_gets_its_uri_by_environment(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    uri = "mongodb://admin:S3CRETPW@h:70000/"  # refused at once: the node exits after saying why
    node = spawn_node(uri, "db", ["sample_jobs"], log=str(log), env={"PYTHONPATH": pythonpath()})
    try:
        assert SECRET not in " ".join(map(str, node.args))  # what ps and /proc/PID/cmdline show every local user
        assert node.wait(60) == 2
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(10)
    output = log.read_text()
    assert "invalid MongoDB URI 'mongodb://admin:***@h:70000/'" in output and SECRET not in output


# Ports out of range: one line, exit 2.


@pytest.mark.parametrize(
    "args",
    [
        ("server", "--port", "70000"),
        ("queue", "--import", "sample_jobs", "--metrics-port", "70000"),
        ("dashboard", "--port", "70000"),
        ("jobs", "--mongodb-uri", "mongodb://127.0.0.1:70000/"),
    ],
)
def test_a_port_out_of_range_is_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    out = taskscheduler(*args)
    assert_one_line_error(out, 2)
    assert "70000" in out.stderr or "65535" in out.stderr


# Dependency floors past known CVEs.

FLOORS = {
    "pymongo": Version("4.13"),  # AsyncMongoClient; CVE-2024-5629 before 4.6.3
    "starlette": Version("0.49.1"),  # CVE-2025-62727: Range header DoS in StaticFiles
    "h11": Version("0.16"),  # CVE-2025-43859, through uvicorn
}


def _requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += extra
    return [Requirement(text) for text in texts]


def test_dependency_floors_are_past_known_vulnerabilities() -> None:
    requirements = _requirements()
    for name, floor in FLOORS.items():
        found = [r for r in requirements if r.name.lower() == name]
        assert found, f"{name} has no floor in pyproject.toml"
        for requirement in found:
            lower = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
            assert lower and max(lower) >= floor, f"{requirement} allows releases before {floor}"


def test_the_installed_dependencies_meet_the_floors() -> None:
    for requirement in _requirements():
        if requirement.name.lower() in FLOORS:
            installed = metadata.version(requirement.name)
            assert requirement.specifier.contains(installed, prereleases=True), f"{requirement.name} {installed}"


# Drop-in options: what upstream accepts keeps its meaning.


def test_retry_and_interval_below_minus_one_mean_what_minus_one_means(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop", retry=-5, interval=-3)
    assert p.options["retry"] == -1 and p.options["interval"] == -1
    assert scheduler.get_job(p.id).options["retry"] == -1
    again = scheduler.add_job_once("sample_jobs:Noop", None, {"retry": -7, "interval": -2})
    assert again.id == p.id  # the same options as stored: no second job
    with pytest.raises(InvalidArgumentError, match="option retry must be an integer"):
        scheduler.add_job("sample_jobs:Noop", retry=-2.5)
    with pytest.raises(InvalidArgumentError, match="option interval must be <="):
        scheduler.add_job("sample_jobs:Noop", interval=2**31)


def test_default_retry_and_interval_below_minus_one_too(new_scheduler: Callable[..., Scheduler]) -> None:
    scheduler = new_scheduler({"default_retry": -10, "default_interval": -2})
    assert scheduler.get_options()["default_retry"] == -1
    p = scheduler.add_job("sample_jobs:Noop")
    assert p.options["retry"] == -1 and p.options["interval"] == -1


def test_an_endless_retry_below_minus_one_keeps_retrying(scheduler: Scheduler, start_node: Any) -> None:
    p = scheduler.add_job("sample_jobs:Fail", retry=-3, retry_interval=0)
    start_node()
    wait_until(lambda: len(p.runs()) >= 3, timeout=30, what="three failed runs")
    p.refresh()
    assert p.options["retry"] == -1 and p.status in (0, 1, 2)  # WAITING, POSTPONED or PROCESSING: never FAILED
    scheduler.cancel_job(p.id)


def test_orphaned_rate_limit_is_accepted_and_ignored_with_a_deprecation_warning(
    db: Database[dict[str, Any]], server: EmbeddedServer
) -> None:
    with pytest.warns(DeprecationWarning, match="orphaned_rate_limit is ignored") as caught:
        scheduler = Scheduler(db, options={Scheduler.OPTION_ORPHANED_RATE_LIMIT: 100})
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert "orphaned_rate_limit" not in scheduler.get_options()
    with pytest.warns(DeprecationWarning, match="orphaned_rate_limit"):
        scheduler.set_options({"orphaned_rate_limit": 30})
    factory = DefaultWorkerFactory(server.uri, db.name, imports=["sample_jobs"])
    with pytest.warns(DeprecationWarning, match="orphaned_rate_limit") as caught:
        node = Queue(scheduler, db, factory, options={"orphaned_rate_limit": 30})
    assert caught[0].filename == __file__
    assert "orphaned_rate_limit" not in node.get_options()
    with pytest.raises(InvalidArgumentError, match="must be an integer"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        Scheduler(db, options={"orphaned_rate_limit": "10"})
    with pytest.raises(InvalidArgumentError) as unknown:
        Scheduler(db, options={"orphaned_rate": 1})
    assert "orphaned_rate_limit" not in str(unknown.value)  # not offered among the valid options
