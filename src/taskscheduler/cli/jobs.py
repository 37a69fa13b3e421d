"""Commands on jobs: ``add``, ``jobs``, ``show``, ``cancel``, ``requeue``, ``flush``, ``watch``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone, tzinfo
from typing import Any

import click
from bson import json_util

from .. import options as o
from ..constants import JobStatus
from ..errors import (
    InvalidJobError,
)
from .group import (
    Connection,
    cli,
    common,
    first_line,
    job_id_arg,
    object_id_arg,
    on_command_line,
    option,
    path_option,
    print_json,
    search_first,
    where,
)


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
@option("--data", default=None, help="Job data as JSON (extended JSON for ObjectIds and dates).")
@option(
    "--at",
    default=None,
    help="Earliest start: unix seconds or ISO 8601 time; a time without a zone is read as UTC (another zone: "
    "2026-12-07T07:00:00+01:00).",
)
@option("--interval", type=int, default=None, help="Seconds between runs (-1: again at once).")
@option("--retry", type=int, default=None, help="Retries after a failure or timeout (-1: endless).")
@option("--retry-interval", type=int, default=None, help="Seconds before a retry.")
@option("--timeout", type=int, default=None, help="Hard timeout in seconds (0: none).")
@option("--cron", default=None, help='Cron expression: run at each match, e.g. "*/15 * * * *" or "@daily".')
@option(
    "--timezone",
    default=None,
    help='IANA zone in which --cron is read (default "UTC"); only with --cron (--at carries its own zone).',
)
@option("--retry-backoff", type=float, default=None, help="Growth factor of the retry delay (>= 1).")
@option("--retry-max-interval", type=int, default=None, help="Longest retry delay in seconds.")
@option("--retry-jitter", is_flag=True, default=False, help="Draw each retry delay from [delay/2, delay].")
@option("--priority", type=int, default=None, help="-100..100: higher starts first among due jobs.")
@option("--force-spawn", is_flag=True, default=False, help="Run in a dedicated worker process.")
@option(
    "--depends-on",
    multiple=True,
    help="Id of a job this one waits for: it starts once all ended DONE, and is canceled if one fails; repeatable.",
)
@option("--limit-key", default=None, help="An extra key under which limits and pauses count this job.")
@path_option
@option("--no-import-check", is_flag=True, help="Do not check that JOB_CLASS can be imported here.")
@option("--json", "as_json", is_flag=True, help="Print the job as JSON instead of its id.")
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
    given_here = on_command_line("timezone")
    if timezone is not None and cron is None and given_here:  # it would be ignored: say so instead
        raise click.UsageError(
            "--timezone is the zone a --cron expression is read in; without --cron it means nothing. For --at, "
            "write the zone into the time: 2026-12-07T07:00:00+01:00"
        )
    if not no_import_check:
        search_first(paths)
        try:
            load_job_class(job_class)
        except InvalidJobError as exc:
            raise InvalidJobError(
                f"{first_line(exc)} (searched {where(paths)} first: --path DIR names another folder; "
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
        o.DEPENDS_ON: [job_id_arg(value, "--depends-on") for value in depends_on] or None,
        o.LIMIT_KEY: limit_key,
    }
    job_options = {k: v for k, v in given.items() if v is not None}
    scheduler = conn.scheduler()
    process = scheduler.add_job(job_class, payload, job_options)
    if as_json:
        print_json(process.to_dict())
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
@option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_status_names(), case_sensitive=False),
    help="Only jobs in this status (repeatable). Default: waiting, postponed, processing.",
)
@option("--all", "show_all", is_flag=True, help="Jobs in every status.")
@option("--class", "job_class", default=None, help="Only jobs of this class.")
@option("--limit", type=click.IntRange(min=1, max=10**9), default=200, show_default=True, help="Newest jobs shown.")
@option("--json", "as_json", is_flag=True, help="Print plain JSON (one array) instead of a table.")
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
    from ..store import jobs_filter
    from .display import jobs_table

    chosen = [JobStatus[s.upper()] for s in statuses] if statuses else None
    unfinished = None if statuses or show_all else JobStatus.DONE
    query = jobs_filter(chosen, job_class or None, below=unfinished)
    scheduler = conn.scheduler()
    found = [Process(doc, scheduler) for doc in scheduler.store.newest_jobs(query, limit)]
    if as_json:
        print_json([p.to_dict() for p in found])
    else:
        from .display import console

        total = scheduler.store.count_jobs(query)
        more = f"; --limit {total} to see all" if total > len(found) else ""
        out = console()
        out.print(jobs_table(found, title=f"{len(found)} of {total} jobs, newest first{more}", width=out.width))


@cli.command()
@common
@click.argument("job_id")
@option("--json", "as_json", is_flag=True)
def show(conn: Connection, job_id: str, as_json: bool) -> None:
    """Show one job, with its runs and the error or result of the last one."""
    from ..store.schema import status_label
    from ..store.views import EventView
    from .display import cron_zone, error_line, readable_time, status_of, visible

    process = conn.scheduler().get_job(object_id_arg(job_id))
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
        print_json(doc)
        return
    _print_details(doc, cron_zone(process.options))
    for run in map(EventView, doc["runs"]):  # each as stored: any value shown, never raised
        error = run.error_value
        outcome = error_line(error) if error else visible(repr(run.result_value))
        name = status_label(run.status_value).upper()
        ended = readable_time(run.ended_value) if run.ended_value is not None else "-"
        click.echo(f"run {visible(run.run_value)}: {name} {ended} {outcome}")


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
    from ..store.views import ErrorView
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
            traceback = ErrorView(value).traceback if isinstance(value, dict) else None
            if traceback:
                click.echo(visible(str(traceback).rstrip(), multiline=True))
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
    conn.scheduler().cancel_job(object_id_arg(job_id))
    click.echo(f"canceled {job_id}")


@cli.command()
@common
@click.argument("job_id")
def requeue(conn: Connection, job_id: str) -> None:
    """Run a FAILED, TIMEOUT or CANCELED job again (same id, next run number)."""
    process = conn.scheduler().requeue_job(object_id_arg(job_id))
    click.echo(f"requeued {job_id} (run {process.run})")


@cli.command()
@common
@option("--yes", is_flag=True, help="Confirm: drop every job and event.")
def flush(conn: Connection, yes: bool) -> None:
    """Drop every job and event (running queue nodes keep working)."""
    if not yes:
        raise click.UsageError("flush drops every job and event; pass --yes to confirm")
    conn.scheduler().flush()
    click.echo("flushed")


@cli.command()
@common
@option(
    "--refresh",
    type=click.FloatRange(min=0.05),
    default=0.5,
    show_default=True,
    help="Seconds between screen refreshes (its own name: TASKSCHEDULER_INTERVAL is add's --interval).",
)
@option("--once", is_flag=True, help="Print the table once and exit (non-interactive).")
def watch(conn: Connection, refresh: float, once: bool) -> None:
    """Live view of jobs and their progress, driven by change streams, until Ctrl-C."""
    from .display import watch_jobs

    watch_jobs(conn.scheduler(), interval=refresh, once=once)
