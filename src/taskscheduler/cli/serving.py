"""The long-running commands: ``queue``, ``server``, ``dashboard`` and ``demo``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from .. import options as o
from ..constants import (
    DEFAULT_MAX_CHILDREN,
    DEFAULT_METRICS_HOST,
    DEFAULT_MIN_CHILDREN,
    DEFAULT_ORPHANED_TIMEOUT,
    DEFAULT_PM,
)
from ..ops.dashboard.limits import MAX_STREAMS
from .group import (
    Connection,
    cli,
    common,
    connect_timeout_option,
    on_command_line,
    option,
    path_option,
    search_first,
    where,
)


@cli.command()
@common
@option(
    "--import",
    "imports",
    multiple=True,
    help="Module whose job classes this node runs (its allow-list, submodules included); repeatable, required.",
)
@path_option
@option(
    "--pm",
    type=click.Choice(list(o.PM_MODES)),
    default=DEFAULT_PM,
    show_default=True,
    help="Worker process management mode.",
)
@option(
    "--min-children",
    type=click.IntRange(min=0),
    default=DEFAULT_MIN_CHILDREN,
    show_default=True,
)
@option(
    "--max-children",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_CHILDREN,
    show_default=True,
)
@option(
    "--orphaned-timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_ORPHANED_TIMEOUT,
    show_default=True,
    help="Lease of a running job, in seconds: renewed six times per lease; other nodes take over a job whose "
    "lease ran out.",
)
@option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Serve Prometheus metrics of this node at http://HOST:PORT/metrics (0: off; needs the extra metrics).",
)
@option(
    "--metrics-host",
    default=DEFAULT_METRICS_HOST,
    show_default=True,
    help="Address the metrics endpoint listens on (0.0.0.0: every interface, for a Prometheus on another machine).",
)
@connect_timeout_option
@option(
    "--burst",
    is_flag=True,
    help="Stop (exit 0, gracefully) once no job of these modules is due or running here; jobs postponed to "
    "later do not keep it running. For CI and batch hosts run by cron.",
)
def queue(
    conn: Connection,
    imports: Sequence[str],
    paths: Sequence[str],
    pm: str,
    min_children: int,
    max_children: int,
    orphaned_timeout: float,
    metrics_port: int,
    metrics_host: str,
    connect_timeout: float,
    burst: bool,
) -> None:
    """Run a queue node (blocks; SIGTERM or Ctrl-C stops it gracefully; with --burst, also when idle)."""
    from ..node.factory import DefaultWorkerFactory
    from ..node.queue import Queue

    if not imports:
        raise click.UsageError("name the modules of the jobs this node runs: --import MODULE (repeatable)")
    if metrics_port:
        from ..node.metrics import require_prometheus_client

        require_prometheus_client()  # before connecting: a missing extra is the operator's to fix, at once
    search_first(paths)
    factory = DefaultWorkerFactory(
        conn.uri,
        conn.database,
        scheduler_options=conn.scheduler_options,
        manager_options={o.PM: pm, o.MIN_CHILDREN: min_children, o.MAX_CHILDREN: max_children},
        imports=imports,
    )
    try:
        factory.import_modules()
    except Exception as exc:  # the operator's module: say what is wrong with it in one line
        raise click.UsageError(
            f"cannot import job module: {type(exc).__name__}: {exc} (searched {where(paths)} first)"
        ) from exc
    scheduler = conn.scheduler(wait=connect_timeout)
    node = Queue(
        scheduler,
        scheduler.db,
        factory,
        options={
            o.ORPHANED_TIMEOUT: orphaned_timeout,
            o.METRICS_PORT: metrics_port,
            o.METRICS_HOST: metrics_host,
            o.BURST: burst,
        },
    )
    node.process()
    sys.exit(node.exit_code)


@cli.command()
@common
@option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The server has no authentication: this machine only by default.",
)
@option("--port", type=click.IntRange(0, 65535), default=27017, show_default=True)
@option(
    "--data-dir",
    default=".taskscheduler/data",
    show_default=True,
    help="Where the embedded server keeps its data, mode 0700 (':memory:' for none).",
)
def server(conn: Connection, host: str, port: int, data_dir: str) -> None:
    """Run the embedded MongoDB-compatible server (SecantusDB) until Ctrl-C. It has no authentication."""
    import ipaddress

    for name, flag in (("mongodb_uri", "--mongodb-uri"), ("database", "--database")):
        if on_command_line(name):
            click.echo(f"note: {flag} is for the commands that connect; `server` serves (--host, --port)", err=True)

    from ..ops.embedded import EmbeddedServer

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    with EmbeddedServer(port=port, data_dir=data_dir, host=host) as srv:
        if not loopback:
            click.echo(
                f"Warning: the embedded server has no authentication; on {host} anyone who reaches port {srv.port} "
                "can read, add and change every job",
                err=True,
            )
        click.echo(f"embedded server listening: {srv.uri}", err=False)
        srv.wait()


def _allowed_hosts(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    from ..ops.dashboard import check_allowed_host

    try:
        return tuple(check_allowed_host(value) for value in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@cli.command()
@common
@option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (this machine only by default).")
@option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@option("--read-only", is_flag=True, help="No cancel or requeue: the buttons are absent, the actions refused.")
@option(
    "--token",
    default=None,
    help="Actions need this token (the page asks for it); better set by env var. Surrounding blanks are dropped.",
)
@option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    callback=_allowed_hosts,
    help="Also answer requests for this Host (a name, '*.DOMAIN', or '*': any), e.g. behind a proxy. Repeatable "
    "(env var: blank-separated). This machine's names and addresses are always answered.",
)
@option(
    "--max-streams",
    type=click.IntRange(min=1),
    default=MAX_STREAMS,
    show_default=True,
    help="Live-updating pages served at once; more get 503 and try again later.",
)
@connect_timeout_option
def dashboard(
    conn: Connection,
    host: str,
    port: int,
    read_only: bool,
    token: str | None,
    allowed_hosts: tuple[str, ...],
    max_streams: int,
    connect_timeout: float,
) -> None:
    """Serve the web dashboard: counts, a live job table, job pages, nodes, cancel and requeue (needs the extra
    dashboard)."""
    from ..ops.dashboard import require_extra, serve

    require_extra()  # before connecting: a missing extra is the operator's to fix, at once
    if token is not None:
        token = token.strip()  # header values are trimmed (by browsers, by HTTP): blanks could never be sent
        if not token:
            raise click.BadParameter("--token must not be empty")
    serve(
        conn.scheduler(wait=connect_timeout),
        host,
        port,
        read_only=read_only,
        token=token,
        announce=click.echo,
        allowed_hosts=allowed_hosts,
        warn=lambda message: click.echo(message, err=True),
        max_streams=max_streams,
    )


@cli.command()
@common
@option("--seconds", type=click.FloatRange(min=5), default=45, show_default=True, help="Longest the demo runs.")
@option("--plain", is_flag=True, help="Plain text output instead of the live display.")
@option(
    "--keep",
    is_flag=True,
    help="Then keep the server, the node and a dashboard running until Ctrl-C, and print their addresses.",
)
def demo(conn: Connection, seconds: float, plain: bool, keep: bool) -> None:
    """Start an embedded server and a queue node, run example jobs, show them live, print a summary. With
    --mongodb-uri on the command line, on that deployment instead (in the database "demo" unless --database says
    another)."""
    from .demo import run_demo

    # Only a deployment named on the command line: TASKSCHEDULER_MONGODB_URI, set for the other commands, must
    # not send `make demo` to a real deployment.
    uri = conn.uri if on_command_line("mongodb_uri") else None
    database = conn.database if on_command_line("database") else "demo"
    sys.exit(run_demo(limit=seconds, plain=plain, keep=keep, uri=uri, database=database))
