"""Terminal views of jobs (rich): the ``jobs`` table and the live ``watch`` view, and :func:`visible`, which
every command passes stored text through before a terminal sees it (SPEC 7, Hardening)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..client.process import Process as ProcessView
from ..constants import JobStatus
from ..errors import InvalidJobError

if TYPE_CHECKING:
    from ..client.process import Process
    from ..client.scheduler import Scheduler

STATUS_STYLE = {
    JobStatus.WAITING: "cyan",
    JobStatus.POSTPONED: "blue",
    JobStatus.PROCESSING: "yellow",
    JobStatus.DONE: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELED: "magenta",
    JobStatus.TIMEOUT: "red",
}


#: Characters stored text must not send to a terminal: C0 and C1 controls (escape sequences set titles, open
#: links, move the cursor, rewrite what was printed) and the bidirectional overrides that reorder text on screen.
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE_IN_LINE = re.compile(f"[\t\n{_UNSAFE}]")
_UNSAFE_IN_TEXT = re.compile(f"[{_UNSAFE}]")


def visible(value: Any, multiline: bool = False) -> str:
    """Stored text as a terminal may show it: every control character as a visible escape (``\\x1b``), so no
    value from the job collection can move the cursor, rewrite a line, set a title or open a link. With
    ``multiline`` (a traceback), newlines and tabs stay."""
    text = value if isinstance(value, str) else str(value)
    return (_UNSAFE_IN_TEXT if multiline else _UNSAFE_IN_LINE).sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def cell(value: Any) -> Text:
    """A table cell of stored text: a ``Text`` is never read as console markup, so ``[link=...]`` stays text."""
    return Text(visible(value))


def status_of(process: Process) -> JobStatus | None:
    """The job's status, or None when its stored status is none (a malformed document)."""
    try:
        return process.status
    except InvalidJobError:
        return None


def error_line(error: Any, multiline: bool = False) -> str:
    """``class: message`` of a recorded error, visible (on one line unless ``multiline``)."""
    text = f"{error.get('class')}: {error.get('message')}" if isinstance(error, Mapping) else error
    return visible(text, multiline)


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
        status, malformed = status_of(p), p.malformed
        note = ""
        if malformed:  # shown as it is stored, with what is wrong (a node ends it FAILED or skips it)
            note = f"malformed: {malformed}"
        elif status in (JobStatus.FAILED, JobStatus.TIMEOUT) and p.error:
            note = error_line(p.error)[:60]
        elif status == JobStatus.POSTPONED:
            note = f"at {datetime.fromtimestamp(float(p.options.get('at', 0)), timezone.utc):%H:%M:%S}"
        name, style = ("malformed", "bold red") if status is None else (status.name.lower(), STATUS_STYLE[status])
        table.add_row(
            cell(p.id),
            cell(p.job_class),
            Text(name, style=style),
            ProgressBar(total=100, completed=p.progress, width=20),
            cell(str(p.worker)[-8:]) if p.worker else "-",
            _age(p.created),
            cell(note),
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
                        if status_of(p) == JobStatus.PROCESSING:
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
