"""The web dashboard (``taskscheduler dashboard``): a Starlette app served by uvicorn, both from the optional
extra ``dashboard``. Importing this package needs neither; :func:`require_extra` says which install brings them.
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ...errors import ConfigurationError, MissingExtraError
from .limits import MAX_STREAMS, REQUEST_ROOM, SHUTDOWN_SECONDS

__all__ = [
    "MAX_STREAMS",
    "REQUEST_ROOM",
    "SHUTDOWN_SECONDS",
    "bind",
    "check_allowed_host",
    "require_extra",
    "serve",
    "trusted_hosts",
]

if TYPE_CHECKING:
    from ...client.scheduler import Scheduler

#: The install that brings the dashboard's dependencies.
DASHBOARD_EXTRA = 'pip install "mongodb-task-scheduler[dashboard]"'
#: Names of this machine as seen from itself, always answered.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
#: Addresses that mean "every interface" (no name of a machine).
WILDCARDS = ("0.0.0.0", "::", "")
#: An allowed Host: a name or address, ``*.domain`` (its subdomains) or ``*`` (any Host: no check), no port.
_ALLOWED_HOST = re.compile(r"\*|(\*\.)?[A-Za-z0-9_.-]+|\[?[0-9A-Fa-f:.]+\]?")


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
    allowed_hosts: Iterable[str] = (),
    warn: Callable[[str], object] | None = None,
    max_streams: int = MAX_STREAMS,
) -> None:
    """Serve the dashboard until SIGINT/SIGTERM; ``announce`` gets the one line saying where, ``warn`` (default:
    stderr) a warning when it serves the network without a token. ``max_streams``: live streams (open pages)
    served at once; the server takes at most ``max_streams`` + :data:`REQUEST_ROOM` connections.

    It answers only requests whose Host names this machine (no DNS rebinding from a web page): the bound address,
    the loopback names and, bound to more than loopback, the machine's names and addresses, plus
    ``allowed_hosts`` (names under which it is reached, e.g. behind a proxy; ``*`` turns the check off)."""
    require_extra()
    import uvicorn

    from .app import create_app
    from .server import Server

    sock = bind(host, port)
    hosts = trusted_hosts(host, allowed_hosts)
    app = create_app(scheduler, read_only=read_only, token=token, allowed_hosts=hosts, max_streams=max_streams)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        lifespan="on",
        limit_concurrency=max_streams + REQUEST_ROOM,
    )
    shown = f"[{host}]" if ":" in host else host
    announce(f"dashboard on http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C to stop)")
    if token is None and not _is_loopback(host):
        can = "read every job's data" if read_only else "read every job's data and cancel or requeue jobs (set --token)"
        (warn or _stderr)(f"warning: the dashboard is served to the network without --token: anyone who can reach "
                          f"port {sock.getsockname()[1]} of this machine can {can}")
    Server(config, on_exit=app.state.feed.end_streams).run(sockets=[sock])


def check_allowed_host(value: str) -> str:
    """An ``--allowed-host`` value as the Host check compares it (ValueError if it cannot be one)."""
    name = value.strip().lower()
    if not _ALLOWED_HOST.fullmatch(name) or (":" in name and name.count(":") < 2):
        raise ValueError(f"{value!r} is not a host name, an address, '*.DOMAIN' or '*' (give no port)")
    return name


def trusted_hosts(host: str, allowed: Iterable[str] = ()) -> list[str] | None:
    """The Host header values answered when bound to ``host`` (None: any)."""
    extra = [check_allowed_host(name) for name in allowed]
    if "*" in extra:
        return None
    names = {*LOOPBACK_NAMES, host, *extra}
    if not _is_loopback(host):
        names |= _machine_names()
    return sorted({f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names if n not in WILDCARDS})


def _machine_names() -> set[str]:
    """This machine's host name, its fully qualified name, the addresses they resolve to and the address of its
    default route: what a browser on the network is given to reach it (others: ``--allowed-host``)."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        try:
            names |= {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(name, None)}
        except OSError:
            pass
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):  # documentation nets
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                udp.connect((probe, 9))  # no packet is sent: only the route is looked up
                names.add(str(udp.getsockname()[0]).split("%")[0])
        except OSError:
            pass
    return {name.lower() for name in names if name}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")
