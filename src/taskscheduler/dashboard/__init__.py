"""The web dashboard (``taskscheduler dashboard``): a Starlette app served by uvicorn, both from the optional
extra ``dashboard``. Importing this package needs neither; :func:`require_extra` says which install brings them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConfigurationError, MissingExtraError

if TYPE_CHECKING:
    from ..scheduler import Scheduler

#: The install that brings the dashboard's dependencies.
DASHBOARD_EXTRA = 'pip install "mongodb-task-scheduler[dashboard]"'
#: Seconds uvicorn gives open live streams (server-sent events never end by themselves) when stopping.
SHUTDOWN_SECONDS = 1


def require_extra() -> None:
    """MissingExtraError unless Starlette and uvicorn can be imported."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"the dashboard needs {exc.name}: {DASHBOARD_EXTRA}") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts so that a port in use is one clear error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigurationError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    scheduler: Scheduler,
    host: str,
    port: int,
    read_only: bool = False,
    token: str | None = None,
    announce: Callable[[str], object] = print,
) -> None:
    """Serve the dashboard until SIGINT/SIGTERM; ``announce`` gets the one line saying where."""
    require_extra()
    import uvicorn

    from .app import create_app

    sock = bind(host, port)
    # Bound to this machine, it answers only requests naming this machine (no DNS rebinding from a web page).
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]"] if _is_loopback(host) else None
    app = create_app(scheduler, read_only=read_only, token=token, allowed_hosts=hosts)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=SHUTDOWN_SECONDS, lifespan="on"
    )
    shown = f"[{host}]" if ":" in host else host
    announce(f"dashboard on http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C to stop)")
    uvicorn.Server(config).run(sockets=[sock])


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
