"""The command line: ``taskscheduler queue|server|add|jobs|show|cancel|requeue|info|schedules|health|flush|watch|
dashboard|demo`` (and ``limit|pause|resume``).

Every flag can also come from ``TASKSCHEDULER_<FLAG>`` (shown in ``--help``). Bad input prints one line on
stderr and exits 2; an unreachable server exits 1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Any, TypeVar

import click
from bson import ObjectId, json_util
from bson.errors import InvalidId

from .. import options as o
from ..constants import (
    DEFAULT_DATABASE,
    DEFAULT_EVENT_QUEUE,
    DEFAULT_EVENT_QUEUE_SIZE,
    DEFAULT_JOB_QUEUE,
    DEFAULT_JOB_QUEUE_SIZE,
    DEFAULT_MAX_CHILDREN,
    DEFAULT_METRICS_HOST,
    DEFAULT_MIN_CHILDREN,
    DEFAULT_MONGODB_URI,
    DEFAULT_ORPHANED_TIMEOUT,
    DEFAULT_PM,
    JobStatus,
)
from ..errors import (
    ConfigurationError,
    EmbeddedServerError,
    InvalidArgumentError,
    InvalidJobError,
    JobNotFoundError,
    MissingExtraError,
    ServerUnavailableError,
    TaskSchedulerError,
)
from ..ops.dashboard.limits import MAX_STREAMS

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2

#: Seconds ``queue`` and ``dashboard`` wait at start for MongoDB to come up (``--connect-timeout``): long enough
#: for a compose or Kubernetes start, where the server, ``rs.initiate()`` and the primary's election (about 10 s)
#: come up together with the nodes.
DEFAULT_CONNECT_TIMEOUT = 60.0


F = TypeVar("F", bound=Callable[..., Any])


def _env(flag: str) -> str:
    return "TASKSCHEDULER_" + flag.upper().replace("-", "_")


def _option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """A click option that can also come from ``TASKSCHEDULER_<FLAG>`` (shown in ``--help``), as every flag can."""
    flag = next(d for d in decls if d.startswith("--"))
    decorator: Callable[[F], F] = click.option(*decls, envvar=_env(flag[2:]), show_envvar=True, **attrs)
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

        scheduler = Scheduler(connect(self.uri, self.database, timeout_ms=timeout_ms), options=self.scheduler_options)
        if wait > 0:
            log = logging.getLogger("taskscheduler")
            scheduler.store.wait_until_ready(wait, lambda reason: log.warning("%s (--connect-timeout)", reason))
        else:
            scheduler.store.check_deployment()
        return scheduler


_CONNECTION_OPTIONS = [
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
    """The connection options every command takes, handed to it as ``conn``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {flag: kwargs.pop(flag[2:].replace("-", "_")) for flag, *_ in _CONNECTION_OPTIONS}
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

    decorated: Any = wrapper
    for flag, default, kind, text in reversed(_CONNECTION_OPTIONS):
        decorated = _option(flag, default=default, type=kind, show_default=True, help=text)(decorated)
    return decorated  # type: ignore[no-any-return]


#: ``--connect-timeout`` of the long-running commands (``queue``, ``dashboard``).
_connect_timeout_option = _option(
    "--connect-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_CONNECT_TIMEOUT,
    show_default=True,
    help="Seconds to wait at start for MongoDB to come up (the server to answer, the replica set to be initiated "
    "and to elect a primary), saying what it waits for; then exit 1. 0: do not wait.",
)


def _object_id(value: str) -> ObjectId:
    if not ObjectId.is_valid(value):
        raise click.BadParameter(f"{value!r} is not a job id (24 hex digits)")
    return ObjectId(value)


def _print_json(value: Any) -> None:
    """Plain JSON, as jq users expect: ids as strings, times as ISO 8601 (no MongoDB Extended JSON)."""
    from ..client.process import plain

    click.echo(json.dumps(plain(value), indent=2))


#: ``--path`` of ``queue`` and ``add``: where job modules are looked up first, as ``rq worker`` does. The console
#: script does not put the current folder on ``sys.path`` (only ``python -m`` does), hence the default ".".
_path_option = _option(
    "--path",
    "paths",
    multiple=True,
    default=(".",),
    show_default=True,
    help="Directory put first on sys.path to import job modules from; repeatable.",
)


def _search_first(paths: Sequence[str]) -> None:
    """Put ``paths`` first on ``sys.path``, in the order given."""
    for path in reversed(paths):
        sys.path.insert(0, os.path.abspath(path))


def _where(paths: Sequence[str]) -> str:
    return ", ".join(os.path.abspath(p) for p in paths)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mongodb-task-scheduler")
@_option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@_option("--utc", is_flag=True, help="Show times in UTC instead of the terminal's local zone.")
def cli(log_level: str, utc: bool) -> None:
    """Run jobs in parallel across processes and machines, with MongoDB as the only infrastructure."""
    from .display import show_utc

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    show_utc(utc)


@cli.command()
@common
@_option(
    "--import",
    "imports",
    multiple=True,
    help="Module whose job classes this node runs (its allow-list, submodules included); repeatable, required.",
)
@_path_option
@_option(
    "--pm",
    type=click.Choice(list(o.PM_MODES)),
    default=DEFAULT_PM,
    show_default=True,
    help="Worker process management mode.",
)
@_option(
    "--min-children",
    type=click.IntRange(min=0),
    default=DEFAULT_MIN_CHILDREN,
    show_default=True,
)
@_option(
    "--max-children",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_CHILDREN,
    show_default=True,
)
@_option(
    "--orphaned-timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_ORPHANED_TIMEOUT,
    show_default=True,
    help="Lease of a running job, in seconds: renewed six times per lease; other nodes take over a job whose "
    "lease ran out.",
)
@_option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Serve Prometheus metrics of this node at http://HOST:PORT/metrics (0: off; needs the extra metrics).",
)
@_option(
    "--metrics-host",
    default=DEFAULT_METRICS_HOST,
    show_default=True,
    help="Address the metrics endpoint listens on (0.0.0.0: every interface, for a Prometheus on another machine).",
)
@_connect_timeout_option
@_option(
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
    _search_first(paths)
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
            f"cannot import job module: {type(exc).__name__}: {exc} (searched {_where(paths)} first)"
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


def _job_id(value: str, flag: str) -> ObjectId:
    try:
        return ObjectId(value.strip())
    except (InvalidId, TypeError):
        raise click.BadParameter(f"{flag} {value!r} is not a job id (24 hex digits)") from None


def _parse_at(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither unix seconds nor an ISO 8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


@cli.command()
@common
@click.argument("job_class")
@_option("--data", default=None, help="Job data as JSON (extended JSON for ObjectIds and dates).")
@_option(
    "--at",
    default=None,
    help="Earliest start: unix seconds or ISO 8601 time; a time without a zone is read as UTC (another zone: "
    "2026-12-07T07:00:00+01:00).",
)
@_option("--interval", type=int, default=None, help="Seconds between runs (-1: again at once).")
@_option("--retry", type=int, default=None, help="Retries after a failure or timeout (-1: endless).")
@_option("--retry-interval", type=int, default=None, help="Seconds before a retry.")
@_option("--timeout", type=int, default=None, help="Hard timeout in seconds (0: none).")
@_option("--cron", default=None, help='Cron expression: run at each match, e.g. "*/15 * * * *" or "@daily".')
@_option(
    "--timezone",
    default=None,
    help='IANA zone in which --cron is read (default "UTC"); only with --cron (--at carries its own zone).',
)
@_option("--retry-backoff", type=float, default=None, help="Growth factor of the retry delay (>= 1).")
@_option("--retry-max-interval", type=int, default=None, help="Longest retry delay in seconds.")
@_option("--retry-jitter", is_flag=True, default=False, help="Draw each retry delay from [delay/2, delay].")
@_option("--priority", type=int, default=None, help="-100..100: higher starts first among due jobs.")
@_option("--force-spawn", is_flag=True, default=False, help="Run in a dedicated worker process.")
@_option(
    "--depends-on",
    multiple=True,
    help="Id of a job this one waits for: it starts once all ended DONE, and is canceled if one fails; repeatable.",
)
@_option("--limit-key", default=None, help="An extra key under which limits and pauses count this job.")
@_path_option
@_option("--no-import-check", is_flag=True, help="Do not check that JOB_CLASS can be imported here.")
@_option("--json", "as_json", is_flag=True, help="Print the job as JSON instead of its id.")
def add(
    conn: Connection,
    job_class: str,
    data: str | None,
    at: str | None,
    interval: int | None,
    retry: int | None,
    retry_interval: int | None,
    timeout: int | None,
    cron: str | None,
    timezone: str | None,
    retry_backoff: float | None,
    retry_max_interval: int | None,
    retry_jitter: bool,
    priority: int | None,
    force_spawn: bool,
    depends_on: Sequence[str],
    limit_key: str | None,
    paths: Sequence[str],
    no_import_check: bool,
    as_json: bool,
) -> None:
    """Add a job of JOB_CLASS ("module:QualName", a job class or function); prints its id."""
    from ..client.job import class_path, load_job_class

    class_path(job_class)  # a malformed name is refused before anything is imported
    given_here = click.get_current_context().get_parameter_source("timezone") == click.core.ParameterSource.COMMANDLINE
    if timezone is not None and cron is None and given_here:  # it would be ignored: say so instead
        raise click.UsageError(
            "--timezone is the zone a --cron expression is read in; without --cron it means nothing. For --at, "
            "write the zone into the time: 2026-12-07T07:00:00+01:00"
        )
    if not no_import_check:
        _search_first(paths)
        try:
            load_job_class(job_class)
        except InvalidJobError as exc:
            raise InvalidJobError(
                f"{_first_line(exc)} (searched {_where(paths)} first: --path DIR names another folder; "
                "--no-import-check adds it anyway)"
            ) from None
    payload: Any = None
    if data is not None:
        try:
            payload = json_util.loads(data)
        except Exception as exc:  # ValueError, bson's InvalidId...: the operator's text, said in one line
            raise click.BadParameter(f"--data is not valid JSON: {exc}") from None
    given: dict[str, Any] = {
        o.AT: _parse_at(at),
        o.INTERVAL: interval,
        o.RETRY: retry,
        o.RETRY_INTERVAL: retry_interval,
        o.TIMEOUT: timeout,
        o.CRON: cron,
        o.TIMEZONE: timezone,
        o.RETRY_BACKOFF: retry_backoff,
        o.RETRY_MAX_INTERVAL: retry_max_interval,
        o.RETRY_JITTER: retry_jitter or None,
        o.PRIORITY: priority,
        o.FORCE_SPAWN: force_spawn or None,
        o.DEPENDS_ON: [_job_id(value, "--depends-on") for value in depends_on] or None,
        o.LIMIT_KEY: limit_key,
    }
    job_options = {k: v for k, v in given.items() if v is not None}
    scheduler = conn.scheduler()
    process = scheduler.add_job(job_class, payload, job_options)
    if as_json:
        _print_json(process.to_dict())
    else:
        click.echo(str(process.id))
    _warn_when_unserved(scheduler, job_class)


def _warn_when_unserved(scheduler: Any, job_class: str) -> None:
    """One line on stderr when no live queue node would claim the job just added (SPEC 3): it would wait without a
    word. Never an error: the job is added, and a script reading its id from stdout must not add it again."""
    from ..client.job import serves, split_name
    from ..ops.cluster import allow_lists
    from .display import visible

    try:
        nodes = allow_lists(scheduler)
    except Exception:  # the registry is a hint only: the add succeeded and its exit code says so
        return
    if any(serves(job_class, modules) for modules in nodes):
        return
    module = visible(split_name(job_class)[0])
    if not module:  # a bare name ("test", as upstream's tests use) is stored as given and served by no node
        click.echo(f"Warning: no queue node serves {visible(job_class)}, a name without a module", err=True)
        return
    if not nodes:
        click.echo(f"Note: no queue node is running; the job waits for one started with --import {module}", err=True)
        return
    served = visible(", ".join(dict.fromkeys(m for modules in nodes for m in modules)) or "nothing")
    count = f"{len(nodes)} live node{'s' if len(nodes) > 1 else ''}"
    click.echo(
        f"Warning: no live queue node serves {module} ({count}, serving {served}); the job waits for a node started "
        f"with --import {module}",
        err=True,
    )


def _status_names() -> list[str]:
    return [s.name.lower() for s in JobStatus]


@cli.command()
@common
@_option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_status_names(), case_sensitive=False),
    help="Only jobs in this status (repeatable). Default: waiting, postponed, processing.",
)
@_option("--all", "show_all", is_flag=True, help="Jobs in every status.")
@_option("--class", "job_class", default=None, help="Only jobs of this class.")
@_option(
    "--limit", type=click.IntRange(min=1, max=10**9), default=200, show_default=True, help="Newest jobs shown."
)
@_option("--json", "as_json", is_flag=True, help="Print plain JSON (one array) instead of a table.")
def jobs(
    conn: Connection,
    statuses: Sequence[str],
    show_all: bool,
    job_class: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List jobs, newest first."""
    from ..client.process import Process
    from .display import jobs_table

    query: dict[str, Any] = {}
    if statuses:
        query["status"] = {"$in": [int(JobStatus[s.upper()]) for s in statuses]}
    elif not show_all:
        query["status"] = {"$lt": int(JobStatus.DONE)}
    if job_class:
        query["class"] = job_class
    scheduler = conn.scheduler()
    found = [Process(doc, scheduler) for doc in scheduler.store.newest_jobs(query, limit)]
    if as_json:
        _print_json([p.to_dict() for p in found])
    else:
        from .display import console

        total = scheduler.store.count_jobs(query)
        more = f"; --limit {total} to see all" if total > len(found) else ""
        out = console()
        out.print(jobs_table(found, title=f"{len(found)} of {total} jobs, newest first{more}", width=out.width))


@cli.command()
@common
@click.argument("job_id")
@_option("--json", "as_json", is_flag=True)
def show(conn: Connection, job_id: str, as_json: bool) -> None:
    """Show one job, with its runs and the error or result of the last one."""
    from ..store.schema import status_label
    from .display import cron_zone, error_line, readable_time, status_of, visible

    process = conn.scheduler().get_job(_object_id(job_id))
    doc = process.to_dict()
    doc["error"] = process.error
    doc["result"] = process.result
    status = status_of(process)
    doc["status_name"] = status.name if status is not None else "MALFORMED"
    doc["malformed"] = process.malformed
    doc["next_run"] = _next_run(process)
    doc["runs"] = [
        {key: run.get(key) for key in ("run", "status", "worker", "started", "ended", "error", "result") if key in run}
        for run in process.runs()
    ]
    if as_json:
        _print_json(doc)
        return
    _print_details(doc, cron_zone(process.options))
    for run in doc["runs"]:
        error = run.get("error")
        outcome = error_line(error) if error else visible(repr(run.get("result")))
        name = status_label(run.get("status")).upper()
        ended = readable_time(run["ended"]) if run.get("ended") is not None else "-"
        click.echo(f"run {visible(run.get('run'))}: {name} {ended} {outcome}")


def _next_run(process: Any) -> str | None:
    """When the job's next run may start (ISO 8601, in the cron's zone when it has one), or None when no run
    is pending (or its document is malformed: then nothing can be said)."""
    from .display import cron_zone, status_of

    if status_of(process) not in (JobStatus.WAITING, JobStatus.POSTPONED) or process.malformed:
        return None
    options = process.options
    zone = cron_zone(options)
    at = max(float(options.get(o.AT) or 0), datetime.now(timezone.utc).timestamp())
    return datetime.fromtimestamp(at, zone).isoformat(timespec="seconds")


def _print_details(doc: dict[str, Any], zone: tzinfo) -> None:
    """The job's fields, one a line; stored text through ``visible`` (no control character reaches the terminal);
    times in UTC with their date and saying so, the next run also in its cron's ``zone``."""
    from .display import error_line, in_its_zone, readable_time, visible

    for key in (
        "_id",
        "class",
        "status_name",
        "malformed",
        "next_run",
        "run",
        "progress",
        "created",
        "started",
        "ended",
        "worker",
        "data",
        "options",
        "result",
        "error",
    ):
        value = doc.get(key)
        if key == "malformed" and not value:
            continue
        if key == "error" and value:
            click.echo(f"error: {error_line(value, multiline=True)}")
            if isinstance(value, dict) and value.get("traceback"):
                click.echo(visible(str(value["traceback"]).rstrip(), multiline=True))
            continue
        if key in ("created", "started", "ended") and value is not None:
            value = readable_time(value)
        elif key == "next_run" and value is not None:
            value = in_its_zone(value, zone)
        elif key == "options" and isinstance(value, dict) and value.get(o.AT) is not None:
            at = value[o.AT]  # 0: no start time asked for ("now"), not the first second of 1970
            value = {**value, o.AT: "now" if at == 0 else readable_time(at)}
        shown = json_util.dumps(value) if isinstance(value, (dict, list)) else value
        click.echo(f"{key.replace('_name', '')}: {visible(shown)}")


@cli.command()
@common
@click.argument("job_id")
def cancel(conn: Connection, job_id: str) -> None:
    """Cancel a job (a running one is killed)."""
    conn.scheduler().cancel_job(_object_id(job_id))
    click.echo(f"canceled {job_id}")


@cli.command()
@common
@click.argument("key")
@_option("--concurrency", type=click.IntRange(min=1), default=None, help="At most N runs under KEY at once.")
@_option("--rate", default=None, help="At most N starts under KEY per second, minute or hour: N/s, N/m or N/h.")
@_option("--remove", is_flag=True, help="Remove the limit on KEY.")
def limit(conn: Connection, key: str, concurrency: int | None, rate: str | None, remove: bool) -> None:
    """Limit the runs under KEY (a class "module:QualName", or a job's limit_key) in the whole cluster; without
    --concurrency, --rate or --remove, show the limit on KEY."""
    from .display import visible

    scheduler = conn.scheduler()
    if remove:
        if concurrency is not None or rate is not None:
            raise click.UsageError("--remove takes no --concurrency or --rate")
        scheduler.remove_limit(key)
        click.echo(f"no limit on {visible(key)}")
        return
    if concurrency is not None or rate is not None:
        scheduler.set_limit(key, concurrency=concurrency, rate=rate)
        _note_dotted_class(key)
    found = scheduler.limits().get(key)
    if found is None:
        click.echo(f"no limit on {visible(key)}")
        return
    click.echo(f"limit on {visible(key)}: concurrency {found['concurrency'] or '-'}, rate {found['rate'] or '-'}")


@cli.command()
@common
@click.argument("key")
def pause(conn: Connection, key: str) -> None:
    """Start no new run under KEY (a class, a limit_key, or '*' for every job) until `resume KEY`."""
    from .display import visible

    scheduler = conn.scheduler()
    already = key in scheduler.paused()
    scheduler.pause(key)
    click.echo(f"paused {visible(key)}{' (already)' if already else ''}: running runs finish, due jobs wait")
    _note_dotted_class(key)


@cli.command()
@common
@click.argument("key")
def resume(conn: Connection, key: str) -> None:
    """Undo `pause KEY`: its due jobs start."""
    from .display import visible

    scheduler = conn.scheduler()
    paused = scheduler.paused()
    if key not in paused:
        # Resuming is idempotent (exit 0), but "resumed" would hide a mistyped key while the real pause holds on.
        now = ", ".join(visible(k) for k in paused) if paused else "nothing"
        click.echo(f"{visible(key)} was not paused (paused: {now})")
        _note_dotted_class(key)
        return
    scheduler.resume(key)
    click.echo(f"resumed {visible(key)}")


def _note_dotted_class(key: str) -> None:
    """Say on stderr how a class is named when KEY reads as a dotted class path: ``add_job`` accepts
    "module.QualName" and stores "module:QualName", so a limit or pause on the dotted form is one on a limit_key
    no job of that class has, and holds nothing back without a word."""
    from .display import visible

    if ":" in key or "." not in key.strip("."):
        return
    module, _, name = key.rpartition(".")
    click.echo(
        f"note: a class is named 'module:QualName' ('{visible(module)}:{visible(name)}'); "
        f"'{visible(key)}' counts only jobs whose limit_key is '{visible(key)}'",
        err=True,
    )


@cli.command()
@common
@click.argument("job_id")
def requeue(conn: Connection, job_id: str) -> None:
    """Run a FAILED, TIMEOUT or CANCELED job again (same id, next run number)."""
    process = conn.scheduler().requeue_job(_object_id(job_id))
    click.echo(f"requeued {job_id} (run {process.run})")


@cli.command()
@common
@_option("--json", "as_json", is_flag=True, help="Print plain JSON.")
def info(conn: Connection, as_json: bool) -> None:
    """Jobs per status and class, live nodes and their workers, backlog, runs ended lately, unserved classes."""
    from ..ops.cluster import cluster_info
    from .display import visible

    summary = cluster_info(conn.scheduler())
    if as_json:
        _print_json(summary)
        return
    jobs = summary["jobs"]
    statuses = ", ".join(f"{name} {n}" for name, n in sorted(jobs["by_status"].items())) or "none"
    click.echo(f"jobs: {jobs['total']} ({statuses})")
    for cls, counts in summary["classes"].items():
        click.echo(f"  {visible(cls)}: " + ", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    click.echo(f"nodes: {len(summary['nodes'])} live")
    for node in summary["nodes"]:  # the registry is stored data too
        click.echo(
            f"  {visible(node['id'])} {visible(node['host'])} pid {visible(node['pid'])}: {node['busy']} busy, "
            f"{node['idle']} idle workers; modules {visible(', '.join(node['modules']))}"
        )
    oldest = summary["oldest_waiting_seconds"]
    click.echo(f"oldest waiting job: {'none' if oldest is None else f'{oldest:.0f} s'}")
    for span in ("last_minute", "last_hour"):
        ended = summary["runs_ended"][span]
        text = ", ".join(f"{name} {n}" for name, n in sorted(ended.items())) or "none"
        click.echo(f"runs ended in the {span.replace('last_', 'last ')}: {text}")
    unserved = summary["unserved_waiting_classes"]
    if unserved:
        click.echo(f"waiting classes no live node serves: {visible(', '.join(unserved))}")
    for key, held in summary["limits"].items():
        click.echo(
            f"limit {visible(key)}: concurrency {held['concurrency'] or '-'}, rate {held['rate'] or '-'}; "
            f"{held['running']} running, {_waiting(held)}"
        )
    for key, held in summary["paused"].items():
        click.echo(f"paused {visible(key)}: {_waiting(held)}")


def _waiting(held: Mapping[str, Any]) -> str:
    if held["waiting"] is None:
        return "waiting not counted (too many limits and pauses)"
    return f"{held['waiting']} waiting"


@cli.command()
@common
@_option("--json", "as_json", is_flag=True, help="Print plain JSON (one array; times in UTC) instead of a table.")
def schedules(conn: Connection, as_json: bool) -> None:
    """List the recurring jobs (interval or cron): next start, last run, runs so far, paused or not."""
    from ..ops.schedules import schedules as list_schedules

    found = list_schedules(conn.scheduler())
    if as_json:
        _print_json([s.to_dict() for s in found])
        return
    from .display import console

    out = console()
    out.print(schedules_table(found, width=out.width))


#: Width of a job id in a table: printed whole, so it can be pasted into ``show`` or ``cancel``.
_ID_COLUMNS = 24


def schedules_table(found: Sequence[Any], width: int = 200) -> Any:
    """The ``schedules`` table for a terminal ``width`` columns wide. Ids stay whole at any width from 40 on;
    the other columns fold, and narrower terminals stack them (below 110 columns the expression goes under the
    class and the last run under the next start, below 80 all of a schedule goes in one column next to its id).
    Times in the terminal's zone (``--utc``: UTC) with zone, and their date unless it is today there; a cron's
    own zone after them when that differs; how far off they are."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from .display import STATUS_STYLE, cell, cron_zone, in_its_zone, visible

    layout = "wide" if width >= 110 else "narrow" if width >= 80 else "compact"
    title = f"{len(found)} schedule{'' if len(found) == 1 else 's'}, soonest first" if found else "no schedules"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("id", width=_ID_COLUMNS, no_wrap=True)
    headers = {
        "wide": ("class", "schedule", "next start", "last run", "runs", "paused"),
        "narrow": ("class, schedule", "next start, last run", "runs"),
        "compact": ("schedule",),
    }[layout]
    for header in headers:
        if header == "runs":
            table.add_column(header, justify="right", no_wrap=True)
        else:
            table.add_column(header, overflow="fold", min_width=6 if header == "paused" else 10)
    now = datetime.now(timezone.utc).timestamp()
    short = layout != "wide"
    for s in found:
        zone = cron_zone({o.CRON: s.expression if s.kind == "cron" else "", o.TIMEZONE: s.timezone or "UTC"})
        expression = visible(s.expression) + (f" ({visible(s.timezone)})" if s.timezone else "")
        if s.status == JobStatus.PROCESSING:
            upcoming = Text("running now", style=STATUS_STYLE[JobStatus.PROCESSING])
        elif s.next_start is None:
            upcoming = Text("-")
        elif s.status == JobStatus.WAITING or s.next_start <= now:
            upcoming = Text(f"due since {in_its_zone(s.next_start, zone, short)} ({_span(now - s.next_start)} ago)")
        else:
            upcoming = Text(f"{in_its_zone(s.next_start, zone, short)} (in {_span(s.next_start - now)})")
        last = Text("-")
        if s.last_status is not None:
            last = Text(s.last_status.name, style=STATUS_STYLE[s.last_status])
            if s.last_end is not None:
                last.append(f" {in_its_zone(s.last_end, zone, short)} ({_span(now - s.last_end)} ago)")
        paused = Text("paused", style="yellow") if s.paused else Text("-")
        if layout == "wide":
            table.add_row(cell(s.id), cell(s.job_class), Text(expression), upcoming, last, str(s.runs), paused)
            continue
        job = cell(s.job_class)
        job.append("\n" + expression, style="dim")
        if s.paused:
            job.append("\npaused", style="yellow")
        upcoming.append("\nlast: ", style="dim")
        upcoming.append_text(last)
        if layout == "narrow":
            table.add_row(cell(s.id), job, upcoming, str(s.runs))
        else:
            job.append("\nnext: ", style="dim")
            job.append_text(upcoming)
            job.append(f"\nruns: {s.runs}", style="dim")
            table.add_row(cell(s.id), job)
    return table


def _span(seconds: float) -> str:
    """A duration as an operator reads it: ``45s``, ``12m``, ``3h 5m``, ``2d 4h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86_400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86_400}d {seconds % 86_400 // 3600}h"


@cli.command()
@common
@_option("--node", "node_id", default=None, help="Also require this queue node (its registry id) to be alive.")
def health(conn: Connection, node_id: str | None) -> None:
    """Exit 0 when the server answers as a replica set (and the node is alive), else 1 with one line."""
    wanted = None
    if node_id is not None:  # bad input before connecting: exit 2 even when the server is unreachable
        if not ObjectId.is_valid(node_id):
            raise click.BadParameter(f"{node_id!r} is not a node id (24 hex digits)", param_hint="'--node'")
        wanted = ObjectId(node_id)
    scheduler = conn.scheduler()
    if wanted is not None:
        if not any(node["_id"] == wanted for node in scheduler.store.live_nodes()):
            click.echo(f"Error: queue node {node_id} is not alive (no fresh registry entry)", err=True)
            sys.exit(EXIT_UNAVAILABLE)
    click.echo("ok")


@cli.command()
@common
@_option("--yes", is_flag=True, help="Confirm: drop every job and event.")
def flush(conn: Connection, yes: bool) -> None:
    """Drop every job and event (running queue nodes keep working)."""
    if not yes:
        raise click.UsageError("flush drops every job and event; pass --yes to confirm")
    conn.scheduler().flush()
    click.echo("flushed")


@cli.command()
@common
@_option(
    "--refresh",
    type=click.FloatRange(min=0.05),
    default=0.5,
    show_default=True,
    help="Seconds between screen refreshes (its own name: TASKSCHEDULER_INTERVAL is add's --interval).",
)
@_option("--once", is_flag=True, help="Print the table once and exit (non-interactive).")
def watch(conn: Connection, refresh: float, once: bool) -> None:
    """Live view of jobs and their progress, driven by change streams, until Ctrl-C."""
    from .display import watch_jobs

    watch_jobs(conn.scheduler(), interval=refresh, once=once)


@cli.command()
@_option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The server has no authentication: this machine only by default.",
)
@_option("--port", type=click.IntRange(0, 65535), default=27017, show_default=True)
@_option(
    "--data-dir",
    default=".taskscheduler/data",
    show_default=True,
    help="Where the embedded server keeps its data, mode 0700 (':memory:' for none).",
)
def server(host: str, port: int, data_dir: str) -> None:
    """Run the embedded MongoDB-compatible server (SecantusDB) until Ctrl-C. It has no authentication."""
    import ipaddress

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
@_option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (this machine only by default).")
@_option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@_option("--read-only", is_flag=True, help="No cancel or requeue: the buttons are absent, the actions refused.")
@_option(
    "--token",
    default=None,
    help="Actions need this token (the page asks for it); better set by env var. Surrounding blanks are dropped.",
)
@_option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    callback=_allowed_hosts,
    help="Also answer requests for this Host (a name, '*.DOMAIN', or '*': any), e.g. behind a proxy. Repeatable "
    "(env var: blank-separated). This machine's names and addresses are always answered.",
)
@_option(
    "--max-streams",
    type=click.IntRange(min=1),
    default=MAX_STREAMS,
    show_default=True,
    help="Live-updating pages served at once; more get 503 and try again later.",
)
@_connect_timeout_option
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
@_option("--seconds", type=click.FloatRange(min=5), default=45, show_default=True, help="Longest the demo runs.")
@_option("--plain", is_flag=True, help="Plain text output instead of the live display.")
@_option(
    "--keep",
    is_flag=True,
    help="Then keep the server, the node and a dashboard running until Ctrl-C, and print their addresses.",
)
def demo(seconds: float, plain: bool, keep: bool) -> None:
    """Start an embedded server and a queue node, run example jobs, show them live, print a summary."""
    from .demo import run_demo

    sys.exit(run_demo(limit=seconds, plain=plain, keep=keep))


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point with our exit codes: 2 for bad input, 1 for an unreachable server."""
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False, prog_name="taskscheduler")
    except click.exceptions.Abort:
        sys.exit(130)
    except click.NoSuchOption as exc:
        click.echo(f"Error: {_where_it_goes(exc) or exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except ServerUnavailableError as exc:
        click.echo(f"Error: {_first_line(exc)}; is the server running?", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except MissingExtraError as exc:  # the operator's install: bad input, said with the pip command that fixes it
        click.echo(f"Error: {_first_line(exc)}", err=True)
        sys.exit(EXIT_USAGE)
    except (ConfigurationError, EmbeddedServerError) as exc:
        click.echo(f"Error: {_first_line(exc)}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except (InvalidArgumentError, JobNotFoundError, TaskSchedulerError) as exc:
        click.echo(f"Error: {_first_line(exc)}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(EXIT_OK)


def _where_it_goes(exc: click.NoSuchOption) -> str | None:
    """For an option of ``taskscheduler`` itself given after a command (``info --log-level DEBUG``): where it goes.
    Click knows the option only where it was declared, so its error alone reads as if it did not exist."""
    for param in cli.params:
        if isinstance(param, click.Option) and exc.option_name in (*param.opts, *param.secondary_opts):
            name = param.opts[0]
            value = " VALUE"
            if param.is_flag:
                value = ""
            elif isinstance(param.type, click.Choice):
                value = f" {param.type.choices[0]}"
            command = exc.ctx.info_name if exc.ctx is not None and exc.ctx.parent is not None else None
            example = f"taskscheduler {name}{value}" + (f" {command}" if command and not param.is_eager else "")
            env = f" (or set {param.envvar})" if isinstance(param.envvar, str) else ""
            where = f" for {command}" if command else ""
            return (
                f"No such option {exc.option_name!r}{where}: it belongs to taskscheduler itself, so put it before "
                f"the command: {example}{env}"
            )
    return None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
