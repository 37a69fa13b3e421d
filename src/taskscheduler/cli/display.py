"""Terminal views of jobs (rich): the ``jobs`` table and the live ``watch`` view."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from ..constants import JobStatus
from ..process import Process as ProcessView

if TYPE_CHECKING:
    from ..process import Process
    from ..scheduler import Scheduler

STATUS_STYLE = {
    JobStatus.WAITING: "cyan",
    JobStatus.POSTPONED: "blue",
    JobStatus.PROCESSING: "yellow",
    JobStatus.DONE: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELED: "magenta",
    JobStatus.TIMEOUT: "red",
}


def console() -> Console:
    """A console; when output is not a terminal, wide enough that no column is cut."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=200)


def _age(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = max(0.0, (datetime.now(timezone.utc) - when).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def jobs_table(processes: Iterable[Process], title: str | None = None) -> Table:
    table = Table(title=title, expand=False)
    for column in ("id", "class", "status", "progress", "worker", "age", "note"):
        table.add_column(column, no_wrap=column != "note")
    for p in processes:
        style = STATUS_STYLE.get(p.status, "")
        note = ""
        if p.status in (JobStatus.FAILED, JobStatus.TIMEOUT) and p.error:
            note = f"{p.error.get('class')}: {p.error.get('message')}"[:60]
        elif p.status == JobStatus.POSTPONED:
            note = f"at {datetime.fromtimestamp(float(p.options.get('at', 0)), timezone.utc):%H:%M:%S}"
        table.add_row(
            str(p.id),
            p.job_class,
            f"[{style}]{p.status.name.lower()}[/{style}]",
            ProgressBar(total=100, completed=p.progress, width=20),
            str(p.worker)[-8:] if p.worker else "-",
            _age(p.created),
            note,
        )
    return table


def watch_jobs(scheduler: Scheduler, interval: float = 0.5, once: bool = False, limit: int = 30) -> None:
    """Live table of the most recent jobs until Ctrl-C; status changes arrive through a change stream."""
    out = console()
    jobs: dict[object, Process] = {p.id: p for p in _recent(scheduler, limit)}
    if once:
        out.print(jobs_table(jobs.values(), title="jobs"))
        return
    feed = scheduler.store.status_feed()
    try:
        with Live(jobs_table(jobs.values(), title="jobs"), console=out, refresh_per_second=4) as live:
            next_refresh = 0.0
            while True:
                change = feed.poll(interval)
                if change is not None and change.document is not None:
                    jobs[change.job_id] = ProcessView(change.document, scheduler)
                if time.monotonic() >= next_refresh:
                    for p in list(jobs.values()):
                        if p.status == JobStatus.PROCESSING:
                            p.refresh()  # progress is not a status change: read it
                    shown = sorted(jobs.values(), key=lambda p: p.id)[-limit:]
                    live.update(jobs_table(shown, title="jobs (Ctrl-C to quit)"))
                    next_refresh = time.monotonic() + interval
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()


def _recent(scheduler: Scheduler, limit: int) -> list[Process]:
    """The newest ``limit`` jobs, oldest of them first (read by the primary key, never the whole collection)."""
    return [ProcessView(doc, scheduler) for doc in reversed(scheduler.store.newest_jobs({}, limit))]
