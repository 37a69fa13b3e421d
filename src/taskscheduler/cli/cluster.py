"""Commands on the cluster: ``info``, ``schedules``, ``health``, and the flow controls ``limit``, ``pause``,
``resume`` (SPEC 7, 8)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import click
from bson import ObjectId

from .. import options as o
from ..constants import JobStatus
from .group import EXIT_UNAVAILABLE, Connection, cli, common, option, print_json


@cli.command()
@common
@click.argument("key")
@option("--concurrency", type=click.IntRange(min=1), default=None, help="At most N runs under KEY at once.")
@option("--rate", default=None, help="At most N starts under KEY per second, minute or hour: N/s, N/m or N/h.")
@option("--remove", is_flag=True, help="Remove the limit on KEY.")
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
@option("--json", "as_json", is_flag=True, help="Print plain JSON.")
def info(conn: Connection, as_json: bool) -> None:
    """Jobs per status and class, live nodes and their workers, backlog, runs ended lately, unserved classes."""
    from ..ops.cluster import cluster_info
    from .display import visible

    summary = cluster_info(conn.scheduler())
    if as_json:
        print_json(summary)
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
@option("--json", "as_json", is_flag=True, help="Print plain JSON (one array; times in UTC) instead of a table.")
def schedules(conn: Connection, as_json: bool) -> None:
    """List the recurring jobs (interval or cron): next start, last run, runs so far, paused or not."""
    from ..ops.schedules import schedules as list_schedules

    found = list_schedules(conn.scheduler())
    if as_json:
        print_json([s.to_dict() for s in found])
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
@option("--node", "node_id", default=None, help="Also require this queue node (its registry id) to be alive.")
def health(conn: Connection, node_id: str | None) -> None:
    """Exit 0 when the server answers as a replica set (and the node is alive), else 1 with one line."""
    from ..store.entries import NodeEntry

    wanted = None
    if node_id is not None:  # bad input before connecting: exit 2 even when the server is unreachable
        if not ObjectId.is_valid(node_id):
            raise click.BadParameter(f"{node_id!r} is not a node id (24 hex digits)", param_hint="'--node'")
        wanted = ObjectId(node_id)
    scheduler = conn.scheduler()
    if wanted is not None:
        if not any(NodeEntry(node).id == wanted for node in scheduler.store.live_nodes()):
            click.echo(f"Error: queue node {node_id} is not alive (no fresh registry entry)", err=True)
            sys.exit(EXIT_UNAVAILABLE)
    click.echo("ok")
