"""What every command shares: the ``taskscheduler`` group, its options read also from ``TASKSCHEDULER_<FLAG>``,
the connection options, exit codes and small parsers."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from bson import ObjectId
from bson.errors import InvalidId

from .. import options as o
from ..constants import (
    DEFAULT_DATABASE,
    DEFAULT_EVENT_QUEUE,
    DEFAULT_EVENT_QUEUE_SIZE,
    DEFAULT_JOB_QUEUE,
    DEFAULT_JOB_QUEUE_SIZE,
    DEFAULT_MONGODB_URI,
)

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2

#: Seconds ``queue`` and ``dashboard`` wait at start for MongoDB to come up (``--connect-timeout``): long enough
#: for a compose or Kubernetes start, where the server, ``rs.initiate()`` and the primary's election (about 10 s)
#: come up together with the nodes.
DEFAULT_CONNECT_TIMEOUT = 60.0


F = TypeVar("F", bound=Callable[..., Any])


def env_name(flag: str) -> str:
    return "TASKSCHEDULER_" + flag.upper().replace("-", "_")


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """A click option that can also come from ``TASKSCHEDULER_<FLAG>`` (shown in ``--help``), as every flag can."""
    flag = next(d for d in decls if d.startswith("--"))
    decorator: Callable[[F], F] = click.option(*decls, envvar=env_name(flag[2:]), show_envvar=True, **attrs)
    return decorator


@dataclass(frozen=True)
class Connection:
    """Where the jobs are: what every command's connection options say."""

    uri: str
    database: str
    scheduler_options: dict[str, Any]

    def scheduler(self, timeout_ms: int = 5_000, wait: float = 0.0) -> Any:
        """A Scheduler on the deployment, checked (SPEC 5). ``wait`` > 0 (the long-running ``queue`` and
        ``dashboard``, see ``--connect-timeout``): wait up to that many seconds for a deployment that is coming up,
        logging what it waits for. 0 (every short command): an answer within ``timeout_ms``, as an operator at
        a terminal or a health probe with its own deadline wants one."""
        from ..client.scheduler import Scheduler
        from ..store import connect

        db = connect(self.uri, self.database, timeout_ms=timeout_ms)
        scheduler = Scheduler(db, options=self.scheduler_options)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # the command's client is ours: closed when it ends, which kills what its cursors left
            ctx.call_on_close(db.client.close)  # last in, first out: the room goes back before the client closes
            ctx.call_on_close(scheduler.close)
        if wait > 0:
            log = logging.getLogger("taskscheduler")
            scheduler.store.wait_until_ready(wait, lambda reason: log.warning("%s (--connect-timeout)", reason))
        else:
            scheduler.store.check_deployment()
        return scheduler


CONNECTION_OPTIONS = [
    ("--mongodb-uri", DEFAULT_MONGODB_URI, str, "MongoDB replica set (or single node) URI."),
    ("--database", DEFAULT_DATABASE, str, "Database holding the job and event collections."),
    ("--job-queue", DEFAULT_JOB_QUEUE, str, "Job collection."),
    (
        "--job-queue-size",
        DEFAULT_JOB_QUEUE_SIZE,
        click.IntRange(min=0, max=2**50),
        "Job collection size in bytes (0: not capped).",
    ),
    ("--event-queue", DEFAULT_EVENT_QUEUE, str, "Event collection."),
    (
        "--event-queue-size",
        DEFAULT_EVENT_QUEUE_SIZE,
        click.IntRange(min=0, max=2**50),
        "Event collection size (0: not capped).",
    ),
]


def common(func: F) -> F:
    """The connection options every command takes, handed to it as ``conn`` (and ``--utc``, which the group
    takes too)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("utc"):  # also after the command's name (taskscheduler show ID --utc)
            from .display import show_utc

            show_utc(True)
        values = {flag: kwargs.pop(flag[2:].replace("-", "_")) for flag, *_ in CONNECTION_OPTIONS}
        conn = Connection(
            uri=values["--mongodb-uri"],
            database=values["--database"],
            scheduler_options={
                o.JOB_QUEUE: values["--job-queue"],
                o.JOB_QUEUE_SIZE: values["--job-queue-size"],
                o.EVENT_QUEUE: values["--event-queue"],
                o.EVENT_QUEUE_SIZE: values["--event-queue-size"],
            },
        )
        return func(*args, conn=conn, **kwargs)

    decorated: Any = option("--utc", is_flag=True, help="Show times in UTC instead of the terminal's local zone.")(
        wrapper
    )
    for flag, default, kind, text in reversed(CONNECTION_OPTIONS):
        decorated = option(flag, default=default, type=kind, show_default=True, help=text)(decorated)
    return decorated  # type: ignore[no-any-return]


#: ``--connect-timeout`` of the long-running commands (``queue``, ``dashboard``).
connect_timeout_option = option(
    "--connect-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_CONNECT_TIMEOUT,
    show_default=True,
    help="Seconds to wait at start for MongoDB to come up (the server to answer, the replica set to be initiated "
    "and to elect a primary), saying what it waits for; then exit 1. 0: do not wait.",
)


def on_command_line(name: str) -> bool:
    """Whether the running command's parameter ``name`` was given on the command line (not by default, nor by
    its TASKSCHEDULER_* variable)."""
    return click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def object_id_arg(value: str) -> ObjectId:
    if not ObjectId.is_valid(value):
        raise click.BadParameter(f"{value!r} is not a job id (24 hex digits)")
    return ObjectId(value)


def print_json(value: Any) -> None:
    """Plain JSON, as jq users expect: ids as strings, times as ISO 8601 (no MongoDB Extended JSON)."""
    from ..client.process import plain

    click.echo(json.dumps(plain(value), indent=2))


#: ``--path`` of ``queue`` and ``add``: where job modules are looked up first, as ``rq worker`` does. The console
#: script does not put the current folder on ``sys.path`` (only ``python -m`` does), hence the default ".".
path_option = option(
    "--path",
    "paths",
    multiple=True,
    default=(".",),
    show_default=True,
    help="Directory put first on sys.path to import job modules from; repeatable.",
)


def search_first(paths: Sequence[str]) -> None:
    """Put ``paths`` first on ``sys.path``, in the order given."""
    for path in reversed(paths):
        sys.path.insert(0, os.path.abspath(path))


def where(paths: Sequence[str]) -> str:
    return ", ".join(os.path.abspath(p) for p in paths)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mongodb-task-scheduler")
@option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@option("--utc", is_flag=True, help="Show times in UTC instead of the terminal's local zone.")
def cli(log_level: str, utc: bool) -> None:
    """Run jobs in parallel across processes and machines, with MongoDB as the only infrastructure."""
    from .display import show_utc

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    show_utc(utc)


def job_id_arg(value: str, flag: str) -> ObjectId:
    try:
        return ObjectId(value.strip())
    except (InvalidId, TypeError):
        raise click.BadParameter(f"{flag} {value!r} is not a job id (24 hex digits)") from None


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
