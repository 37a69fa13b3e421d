"""What the dashboard shows, as plain JSON: job rows, a job's details with its runs, nodes, counts.

No web framework here: these take stored documents and the public API's objects and return dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from bson import ObjectId

from ... import options as o
from ...client.job import serves
from ...client.process import Process, plain
from ...constants import NO_WORKER, UNSET_TIME, JobStatus
from ...core.runs import counted_run_ends as lifecycle_run_ends
from ...errors import InvalidJobError
from ...store import jobs_filter
from ...store.entries import NodeEntry
from ...store.schema import MALFORMED, status_label
from ...store.views import ErrorView, EventView, JobView

#: Jobs the table shows at most (newest first).
MAX_ROWS = 200
#: Runs a job page shows at most (newest first, with how many there are).
MAX_RUNS = 200
#: Non-finite floats, which JSON cannot hold, as the text JavaScript and Python print for them.
NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
#: Characters of the job table's error column (one line: the error's class and its message's first line).
ERROR_LINE = 160
#: Statuses whose row shows the error of the job's last ended run: ended badly, or waiting for a retry of one.
SHOWS_ERROR = (JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED, JobStatus.WAITING, JobStatus.POSTPONED)
#: Statuses whose row warns when no live node serves the job's class (those jobs would wait for ever).
NEEDS_A_NODE = (JobStatus.WAITING, JobStatus.POSTPONED)


def shown(value: Any) -> Any:
    """A stored value as strict JSON for the page: :func:`plain`, with NaN and infinities (ordinary BSON doubles
    in job data and results) as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``."""
    return _finite(plain(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def status_name(status: Any) -> str:
    """A stored status's name, or ``"malformed"`` for anything else (SPEC 2: shown, never a failed request)."""
    return status_label(status)


def node_labels(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """worker id -> "host (pid N)" of the node it belongs to, for the table's node column."""
    labels: dict[str, str] = {}
    for entry in map(NodeEntry, nodes):
        label = f"{entry.host} (pid {entry.pid})"
        for worker in entry.workers:
            labels[str(worker.id)] = label
    return labels


def iso(value: Any) -> str | None:
    """A stored time as the page reads it: ISO 8601 in UTC to the millisecond (``2026-12-07T06:00:00.250Z``), or
    None for no time (unset, or not a date). Unix seconds (an ``at`` option) are read as such."""
    moment: datetime
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        try:
            moment = datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    else:
        return None
    if moment == UNSET_TIME:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stored_status(process: Process) -> JobStatus | None:
    """The job's status, or None for a malformed one."""
    try:
        return process.status
    except InvalidJobError:
        return None


def error_line(error_class: Any, message: Any) -> str | None:
    """An error as one short line: its class and the first line of its message, cut to :data:`ERROR_LINE`."""
    first = str(message).strip().splitlines()[0] if isinstance(message, str) and message.strip() else ""
    name = str(error_class) if error_class else ""
    line = f"{name}: {first}" if name and first else name or first
    if not line:
        return None
    return line if len(line) <= ERROR_LINE else line[: ERROR_LINE - 1] + "\u2026"


def error_wanted(process: Process) -> ObjectId | None:
    """The id of the run end whose error the job's row shows (the last ended run's), or None when the row shows
    none: a job that ended badly, or waits for the retry of a run that did."""
    status = stored_status(process)
    outcome = JobView(process.document()).outcome_value
    if status not in SHOWS_ERROR or not isinstance(outcome, ObjectId) or outcome == NO_WORKER:
        return None
    if status in (JobStatus.WAITING, JobStatus.POSTPONED) and process.run <= 1:
        return None
    return outcome


def job_row(
    process: Process,
    nodes: Mapping[str, str],
    served: Iterable[str] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One row of the live table. Reads nothing more than the job document: ``error`` is the line of its last
    run's error when the caller read it (:func:`error_wanted`), ``served`` the modules the live nodes serve
    (None: unknown, no warning). A malformed document is shown as it is, with ``malformed`` naming what is
    wrong (else None)."""
    worker = str(process.worker) if process.worker else None
    status = stored_status(process)
    options = process.options
    return {
        "id": str(process.id),
        "class": process.job_class,
        "status": status.name.lower() if status is not None else MALFORMED,
        "malformed": process.malformed,
        "progress": shown(process.progress),
        "run": process.run,
        "created": iso(process.created),
        "started": iso(process.started),
        "ended": iso(process.ended),
        "next_start": _next_start(status, options, process.created),
        "recurring": bool(options.get(o.CRON) or options.get(o.INTERVAL)),
        "worker": worker,
        "node": nodes.get(worker) if worker else None,
        "error_line": error,
        "unserved": served is not None and status in NEEDS_A_NODE and not serves(process.job_class, served),
    }


def _next_start(status: JobStatus | None, options: Mapping[str, Any], created: datetime | None) -> str | None:
    """When a waiting or postponed job may start: its ``at`` (its creation when due at once); None otherwise."""
    if status not in (JobStatus.WAITING, JobStatus.POSTPONED):
        return None
    return iso(options.get(o.AT)) or iso(created)


def schedule_of(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """How a recurring job recurs (``kind``: "cron" or "interval"), or None for a job that runs once."""
    cron, interval = options.get(o.CRON), options.get(o.INTERVAL)
    if isinstance(cron, str) and cron:
        zone = options.get(o.TIMEZONE)
        return {"kind": "cron", "cron": cron, "timezone": zone if isinstance(zone, str) and zone else "UTC"}
    if isinstance(interval, int) and not isinstance(interval, bool) and interval:
        reference = options.get(o.INTERVAL_REFERENCE)
        return {"kind": "interval", "seconds": interval, "reference": reference if reference == "start" else "end"}
    return None


def job_details(
    process: Process,
    nodes: Mapping[str, str],
    events: Iterable[Mapping[str, Any]],
    total_runs: int,
    outcome: Any,
    served: Iterable[str] | None = None,
    blocked_by: Iterable[ObjectId] = (),
) -> dict[str, Any]:
    """The job page: the job, its data and options, the last run's error or result, and its newest ended runs
    (newest first) from ``events`` (``Store.recent_run_events``), with ``runs_total``, how many runs ended.
    ``outcome``: the job document's ``outcome`` (the id of the end event that counted last); ``blocked_by``:
    the dependencies not yet DONE (``Process.blocked_by``)."""
    runs = []
    for run in map(EventView, counted_run_ends(events, outcome)):
        fields = shown(run.run_fields())
        fields["started"] = iso(run.started_value)
        fields["ended"] = iso(run.ended_value)
        fields["status"] = status_name(run.status_value)
        fields["has_result"] = run.has_result
        fields["result"] = shown(run.result_value)
        runs.append(fields)
    error = process.error
    stored_error = ErrorView(error) if error else None
    return {
        **job_row(
            process,
            nodes,
            served,
            error_line(stored_error.error_class, stored_error.message) if stored_error is not None else None,
        ),
        "data": shown(process.data),
        "options": shown(process.options),
        "schedule": schedule_of(process.options),
        "blocked_by": [str(job_id) for job_id in blocked_by],
        "error": shown(error),
        "result": shown(process.result),
        "runs": runs,
        "runs_total": max(total_runs, len(runs)),
    }


def counted_run_ends(events: Iterable[Mapping[str, Any]], outcome: Any) -> list[Mapping[str, Any]]:
    """One end event per run number, newest run first: the end that counted (``Lifecycle.runs``'s rule)."""
    return list(reversed(lifecycle_run_ends([dict(e) for e in events], outcome)))


def node_view(node: Mapping[str, Any]) -> dict[str, Any]:
    """A registry entry as the page shows it. The registry is a hint anyone may have written (SPEC 2): anything
    but a list of documents counts as no workers, and each value is made strict JSON (as job data is)."""
    entry = NodeEntry(node)
    workers = [{"id": str(w.id), "pid": shown(w.pid), "job": str(w.job) if w.job else None} for w in entry.workers]
    return {
        "id": str(entry.id),
        "host": shown(entry.host),
        "pid": shown(entry.pid),
        "started": iso(entry.started),
        "version": shown(entry.version),
        "modules": entry.modules,
        "workers": workers,
        "busy": sum(1 for w in workers if w["job"]),
    }


def counts_view(counts: Mapping[int, int]) -> dict[str, int]:
    return {status_name(status): n for status, n in sorted(counts.items())}


def job_query(statuses: Iterable[str], job_class: str | None, job_id: str | None) -> dict[str, Any] | None:
    """The filter of the table (None: an id that cannot match anything). Unknown status names match nothing.
    Each status is sent once however often it is named: the server's cost grows with the ``$in`` list."""
    wanted = {s.strip().upper() for s in statuses if s.strip()}
    if job_id and not ObjectId.is_valid(job_id.strip()):
        return None
    return jobs_filter(
        sorted(int(JobStatus[s]) for s in wanted if s in JobStatus.__members__) if wanted else None,
        job_class or None,
        job_id=ObjectId(job_id.strip()) if job_id else None,
    )
