"""What the dashboard shows, as plain JSON: job rows, a job's details with its runs, nodes, counts.

No web framework here: these take stored documents and the public API's objects and return dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from bson import ObjectId

from ...client.process import Process, plain
from ...constants import JobStatus
from ...core.runs import counted_run_ends as lifecycle_run_ends
from ...errors import InvalidJobError
from ...store.schema import MALFORMED, status_label

#: Jobs the table shows at most (newest first).
MAX_ROWS = 200
#: Runs a job page shows at most (newest first, with how many there are).
MAX_RUNS = 200
#: Non-finite floats, which JSON cannot hold, as the text JavaScript and Python print for them.
NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


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
    for node in nodes:
        label = f"{node.get('host')} (pid {node.get('pid')})"
        listed = node.get("workers")
        for worker in listed if isinstance(listed, list) else []:
            if isinstance(worker, Mapping):
                labels[str(worker.get("_id"))] = label
    return labels


def job_row(process: Process, nodes: Mapping[str, str]) -> dict[str, Any]:
    """One row of the live table. Reads nothing more than the job document (no event lookup per row). A
    malformed document is shown as it is, with ``malformed`` naming what is wrong (else None)."""
    worker = str(process.worker) if process.worker else None
    try:
        status = process.status.name.lower()
    except InvalidJobError:
        status = MALFORMED
    return {
        "id": str(process.id),
        "class": process.job_class,
        "status": status,
        "malformed": process.malformed,
        "progress": shown(process.progress),
        "run": process.run,
        "created": plain(process.created),
        "started": plain(process.started),
        "ended": plain(process.ended),
        "worker": worker,
        "node": nodes.get(worker) if worker else None,
    }


def job_details(
    process: Process, nodes: Mapping[str, str], events: Iterable[Mapping[str, Any]], total_runs: int, outcome: Any
) -> dict[str, Any]:
    """The job page: the job, its data and options, the last run's error or result, and its newest ended runs
    (newest first) from ``events`` (``Store.recent_run_events``), with ``runs_total``, how many runs ended.
    ``outcome``: the job document's ``outcome`` (the id of the end event that counted last)."""
    runs = []
    for run in counted_run_ends(events, outcome):
        fields = shown({key: run.get(key) for key in ("run", "worker", "started", "ended", "error") if key in run})
        fields["status"] = status_name(run.get("status"))
        fields["has_result"] = "result" in run
        fields["result"] = shown(run.get("result"))
        runs.append(fields)
    return {
        **job_row(process, nodes),
        "data": shown(process.data),
        "options": shown(process.options),
        "error": shown(process.error),
        "result": shown(process.result),
        "runs": runs,
        "runs_total": max(total_runs, len(runs)),
    }


def counted_run_ends(events: Iterable[Mapping[str, Any]], outcome: Any) -> list[Mapping[str, Any]]:
    """One end event per run number, newest run first: the end that counted (``Lifecycle.runs``'s rule)."""
    return list(reversed(lifecycle_run_ends([dict(e) for e in events], outcome)))


def node_view(node: Mapping[str, Any]) -> dict[str, Any]:
    workers = [
        {"id": str(w.get("_id")), "pid": w.get("pid"), "job": str(w["job"]) if w.get("job") else None}
        for w in node.get("workers") or []
    ]
    return {
        "id": str(node.get("_id")),
        "host": node.get("host"),
        "pid": node.get("pid"),
        "started": plain(node.get("started")),
        "version": node.get("version"),
        "modules": [str(m) for m in node.get("modules") or []],
        "workers": workers,
        "busy": sum(1 for w in workers if w["job"]),
    }


def counts_view(counts: Mapping[int, int]) -> dict[str, int]:
    return {status_name(status): n for status, n in sorted(counts.items())}


def job_query(statuses: Iterable[str], job_class: str | None, job_id: str | None) -> dict[str, Any] | None:
    """The filter of the table (None: an id that cannot match anything). Unknown status names match nothing.
    Each status is sent once however often it is named: the server's cost grows with the ``$in`` list."""
    query: dict[str, Any] = {}
    wanted = {s.strip().upper() for s in statuses if s.strip()}
    if wanted:
        query["status"] = {"$in": sorted(int(JobStatus[s]) for s in wanted if s in JobStatus.__members__)}
    if job_class:
        query["class"] = job_class
    if job_id:
        if not ObjectId.is_valid(job_id.strip()):
            return None
        query["_id"] = ObjectId(job_id.strip())
    return query
