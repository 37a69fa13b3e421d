"""Terminal views of jobs (rich): the ``jobs`` table and the live ``watch`` view, and :func:`visible`, which
every command passes stored text through before a terminal sees it (SPEC 7, Hardening)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rich import box
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .. import options as o
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


#: The zone times are shown in: None for the terminal's local zone, UTC with ``taskscheduler --utc``.
_shown_zone: tzinfo | None = None


def show_utc(utc: bool) -> None:
    """Show times in UTC (``--utc``) instead of the terminal's local zone."""
    global _shown_zone
    _shown_zone = timezone.utc if utc else None


def readable_time(value: Any, short: bool = False) -> str:
    """A time as an operator reads it: in the terminal's local zone (UTC with ``--utc``) and saying which, to the
    second (``2026-12-07 07:00:00 CET``); with ``short``, without the date when it is today there. Takes a
    datetime, unix seconds or ISO 8601 text; anything else (stored data) is shown as it is, visibly."""
    moment = _moment(value)
    if moment is None:
        return visible(value)
    try:
        shown = moment.astimezone(_shown_zone)
    except (ValueError, OverflowError, OSError):  # beyond what the local zone's rules cover: said in UTC
        shown = moment
    zone = shown.tzname() or "UTC"
    if short and shown.date() == datetime.now(shown.tzinfo).date():
        return f"{shown:%H:%M:%S} {zone}"
    return f"{shown:%Y-%m-%d %H:%M:%S} {zone}"


def _moment(value: Any) -> datetime | None:
    moment: datetime
    try:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            moment = datetime.fromtimestamp(value, timezone.utc)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def cron_zone(options: Mapping[str, Any]) -> tzinfo:
    """The zone a job's next starts are read in: its cron's zone (UTC when none or unreadable: a stored zone is
    read again here, never trusted), else UTC."""
    if not options.get(o.CRON):
        return timezone.utc
    try:
        return ZoneInfo(str(options.get(o.TIMEZONE) or "UTC"))
    except (ValueError, ZoneInfoNotFoundError, OSError):
        return timezone.utc


def in_its_zone(value: Any, zone: tzinfo, short: bool = False) -> str:
    """:func:`readable_time`, followed by the time in ``zone`` (a cron's) when that zone shows it otherwise:
    ``2026-12-07 06:00:00 UTC (2026-12-07 07:00:00 Europe/Zurich)``, or ``(07:00 Europe/Zurich)`` when ``short``."""
    text = readable_time(value, short)
    moment = _moment(value)
    if moment is None or not isinstance(zone, ZoneInfo) or zone.key == "UTC":
        return text
    with contextlib.suppress(ValueError, OverflowError, OSError):
        if moment.astimezone(_shown_zone).utcoffset() == moment.astimezone(zone).utcoffset():
            return text  # the same clock already
    local = moment.astimezone(zone)
    return f"{text} ({local:%H:%M} {zone.key})" if short else f"{text} ({local:%Y-%m-%d %H:%M:%S} {zone.key})"


def console() -> Console:
    """A console; when output is not a terminal, as wide as ``COLUMNS`` says, else wide enough that no column is
    cut."""
    import os
    import shutil
    import sys

    # Rich reads COLUMNS and LINES itself unless given both sizes, and int() of "8²" (a digit to isdigit())
    # raises; shutil reads them safely, then asks the terminal. In a terminal with sane ones, rich follows resizes.
    size = shutil.get_terminal_size()
    if sys.stdout.isatty():
        odd = any(v.isdigit() and not v.isascii() for v in (os.environ.get("COLUMNS", ""), os.environ.get("LINES", "")))
        return Console(width=size.columns, height=size.lines) if odd else Console()
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isascii() and columns.isdigit() else 0
    return Console(width=width if 40 <= width <= 1000 else 200, height=size.lines)


def _age(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = max(0.0, (datetime.now(timezone.utc) - when).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


#: The job table's columns in the order they are given up when a terminal is narrow (the id never is: a cut id
#: cannot be pasted into ``show`` or ``cancel``), each with its width: fixed, or the least a folding one gets.
_ID_WIDTH = 24
_BY_IMPORTANCE: tuple[tuple[str, tuple[int, ...], bool], ...] = (
    # (name, widths to try, folds)
    ("id", (_ID_WIDTH,), False),
    ("status", (10,), False),
    ("class", (16,), True),
    ("age", (4,), False),
    ("progress", (20, 10), False),
    ("note", (16,), True),
    ("worker", (8,), False),
)
_SHOWN_ORDER = ("id", "class", "status", "progress", "worker", "age", "note")
_GAP = 3  # a blank, a separator, a blank between two columns


def _layout(width: int) -> dict[str, int]:
    """The columns that fit in ``width`` terminal columns, with their (least) widths: the most important first,
    each at the widest of its widths that still fits."""
    chosen: dict[str, int] = {}
    used = -_GAP
    for name, widths, _folds in _BY_IMPORTANCE:
        for w in widths:
            if used + _GAP + w <= width or name == "id":
                chosen[name] = w
                used += _GAP + w
                break
    return chosen


def jobs_table(processes: Iterable[Process], title: str | None = None, width: int = 200) -> Table:
    """The job table for a terminal ``width`` columns wide: ids always whole; other columns shrink, fold or go
    (the note then goes under the class) when the terminal is narrow."""
    layout = _layout(width)
    folds = {name for name, _widths, f in _BY_IMPORTANCE if f}
    table = Table(title=title, expand=False, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    shown = [name for name in _SHOWN_ORDER if name in layout]
    for name in shown:
        if name in folds:
            table.add_column(name, min_width=layout[name], overflow="fold")
        else:
            table.add_column(name, width=layout[name], no_wrap=True)
    for p in processes:
        status, malformed = status_of(p), p.malformed
        note = ""
        if malformed:  # shown as it is stored, with what is wrong (a node ends it FAILED or skips it)
            note = f"malformed: {malformed}"
        elif status in (JobStatus.FAILED, JobStatus.TIMEOUT) and p.error:
            note = error_line(p.error)[:60]
        elif status == JobStatus.POSTPONED:
            note = f"at {in_its_zone(p.options.get('at'), cron_zone(p.options), short=True)}"
        name, style = ("malformed", "bold red") if status is None else (status.name.lower(), STATUS_STYLE[status])
        job_class = cell(p.job_class)
        if note and "note" not in layout:  # no room for its own column: under the class
            job_class.append("\n" + visible(note), style="dim")
        cells: dict[str, Any] = {
            "id": cell(p.id),
            "class": job_class,
            "status": Text(name, style=style),
            # In its status colour: a failed run shows how far it got in red, not a bar like a done one.
            "progress": ProgressBar(
                total=100,
                completed=p.progress,
                width=layout.get("progress"),
                complete_style=style,
                finished_style=style,
            ),
            "worker": cell(str(p.worker)[-8:]) if p.worker else "-",
            "age": _age(p.created),
            "note": cell(note),
        }
        table.add_row(*(cells[name] for name in shown))
    return table


def watch_jobs(scheduler: Scheduler, interval: float = 0.5, once: bool = False, limit: int = 30) -> None:
    """Live table of the most recent jobs until Ctrl-C; status changes arrive through a change stream."""
    out = console()
    jobs: dict[object, Process] = {p.id: p for p in _recent(scheduler, limit)}
    if once:
        out.print(jobs_table(jobs.values(), title="jobs", width=out.width))
        return
    feed = scheduler.store.status_feed()
    try:
        with Live(jobs_table(jobs.values(), title="jobs", width=out.width), console=out, refresh_per_second=4) as live:
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
                    live.update(jobs_table(shown, title="jobs (Ctrl-C to quit)", width=out.width))
                    next_refresh = time.monotonic() + interval
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()


def _recent(scheduler: Scheduler, limit: int) -> list[Process]:
    """The newest ``limit`` jobs, oldest of them first (read by the primary key, never the whole collection)."""
    return [ProcessView(doc, scheduler) for doc in reversed(scheduler.store.newest_jobs({}, limit))]
