"""The embedded MongoDB-compatible server: SecantusDB as a single-node replica set, in a child process.

SecantusDB is GPL-2.0 and therefore an optional extra: ``pip install mongodb-task-scheduler[embedded]``.
It always runs as a subprocess (never in-process), because queue nodes fork.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from ..errors import EmbeddedServerError, InvalidArgumentError, ServerUnavailableError

#: Seconds to wait for the server to answer after it was started.
START_SECONDS = 30.0
#: The server has no authentication: whoever reaches its port reads and writes every job. This machine only,
#: unless told otherwise.
DEFAULT_HOST = "127.0.0.1"
#: What the server creates (its data directory, the files in it, its log) only its own user may read.
PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uri_for(port: int, host: str = DEFAULT_HOST) -> str:
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"mongodb://{host}:{port}/?directConnection=true"


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (a wildcard address is no destination)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class EmbeddedServer:
    """Start with ``with EmbeddedServer(port=0) as srv: srv.uri``; port 0 picks a free one.

    It has no authentication: it binds to ``host`` (127.0.0.1, this machine only, by default) and keeps its data
    directory mode 0700, its files readable by its own user only."""

    def __init__(
        self,
        port: int = 27017,
        data_dir: str | os.PathLike[str] = ".taskscheduler/data",
        test_commands: bool = False,
        log_path: str | None = None,
        standalone: bool = False,
        host: str = DEFAULT_HOST,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgumentError(f"port must be an integer from 0 to 65535 (0: a free one), got {port!r}")
        if not isinstance(host, str) or not host or any(c.isspace() for c in host):
            raise InvalidArgumentError(f"host must be an address to listen on, such as 127.0.0.1, got {host!r}")
        if importlib.util.find_spec("secantus") is None:
            raise EmbeddedServerError(
                "the embedded server needs SecantusDB: pip install 'mongodb-task-scheduler[embedded]'"
            )
        self.port = port or free_port()
        self.host = host
        self.data_dir = str(data_dir)
        self.test_commands = test_commands
        self.standalone = standalone  # no replica set: what taskscheduler refuses (for tests of that refusal)
        self.log_path = log_path
        self.uri = uri_for(self.port, _connect_host(host))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EmbeddedServer:
        self._check_port()
        if self.data_dir != ":memory:":
            try:
                data = Path(self.data_dir)
                data.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
                data.chmod(PRIVATE_DIR_MODE)  # also one made before (by an older version, or by hand)
            except OSError as exc:
                raise EmbeddedServerError(f"cannot use data directory {self.data_dir!r}: {exc.strerror}") from None
        args = [
            sys.executable,
            "-m",
            "secantus",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--storage-path",
            self.data_dir,
            "--log-level",
            "WARNING",
        ]
        if self.test_commands:
            args.append("--enable-test-commands")
        if self.standalone:
            args.append("--standalone")
        if self.log_path:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with open(fd, "ab") as log:
                self._proc = subprocess.Popen(
                    args, stdout=log, stderr=log, start_new_session=True, umask=PRIVATE_UMASK
                )
        else:
            self._proc = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                umask=PRIVATE_UMASK,
            )
        self._wait_ready()
        return self

    def _check_port(self) -> None:
        """A port in use is the operator's to change: said in one line before the server starts."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family) as sock:
            try:
                sock.bind((self.host, self.port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise EmbeddedServerError(f"port {self.port} is in use: choose another with --port") from None
                raise EmbeddedServerError(f"cannot listen on {self.host} port {self.port}: {exc.strerror}") from None

    def _wait_ready(self) -> None:
        from ..store import connect

        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedServerError(
                    f"embedded server exited with code {self._proc.returncode} on port {self.port}"
                )
            try:
                db = connect(self.uri, "admin", timeout_ms=500)
                try:
                    db.command("ping")
                    return
                finally:
                    db.client.close()
            except (ServerUnavailableError, Exception):
                time.sleep(0.1)
        self.stop()
        raise EmbeddedServerError(f"embedded server did not answer on port {self.port} within {START_SECONDS} s")

    def wait(self) -> None:
        """Block until the server exits or Ctrl-C/SIGTERM arrives (then stop it)."""
        stop = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        previous = signal.signal(signal.SIGTERM, on_signal)
        try:
            while not stop and self._proc is not None and self._proc.poll() is None:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
