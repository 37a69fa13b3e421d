"""A queue node run as its own ``taskscheduler queue`` process (the demo and the benchmarks use it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping


def spawn_node(
    uri: str,
    database: str,
    imports: Iterable[str] = (),
    args: Iterable[str] = (),
    log: str | None = None,
    env: Mapping[str, str] | None = None,
    log_level: str = "WARNING",
    cwd: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a queue node in a new session (its own process group), output to ``log`` or nowhere."""
    cmd = [
        sys.executable,
        "-m",
        "taskscheduler",
        "--log-level",
        log_level,
        "queue",
        "--database",
        database,
    ]
    for module in imports:
        cmd += ["--import", module]
    cmd += list(args)
    # The URI goes by environment, not argument: a command line is readable by every local user (ps, /proc),
    # and a URI may hold a password.
    full_env = {**os.environ, **(env or {}), "TASKSCHEDULER_MONGODB_URI": uri}
    if log is None:
        return subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=cwd
        )
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )


def stop_node(node: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM (a graceful stop), then SIGKILL to the whole group if it does not exit in time."""
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
    try:
        return node.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        return node.wait(5)
