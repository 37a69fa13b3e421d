"""What an operator asks of a cluster: jobs per status and class, live nodes, backlog, recent run ends."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId

from ..client.job import serves
from ..client.scheduler import Scheduler
from ..core.flow import EVERY_JOB, Controls
from ..store.entries import CountRow, NodeEntry
from ..store.schema import status_label
from ..store.views import JobView


def cluster_info(scheduler: Scheduler) -> dict[str, Any]:
    """A plain-JSON summary (``taskscheduler info``)."""
    store = scheduler.store
    now = store.server_time()
    counts = store.job_counts()
    by_status: Counter[str] = Counter()
    by_class: dict[str, Counter[str]] = {}
    for row in map(CountRow, counts):
        name = status_label(row.status)  # "malformed" for what is no status (SPEC 2): shown, never fatal
        by_status[name] += int(row.count)
        by_class.setdefault(_class_label(row.job_class), Counter())[name] += int(row.count)
    nodes: list[dict[str, Any]] = []
    for doc in store.live_nodes():
        node = NodeEntry(doc)
        # Stored data is hostile input: anything but a list of documents counts as no workers.
        workers = node.workers
        busy = sum(1 for w in workers if w.job is not None)
        nodes.append(
            {
                "id": str(node.id),
                "host": node.host,
                "pid": node.pid,
                "started": node.started.isoformat() if isinstance(node.started, datetime) else None,
                "version": node.version,
                "modules": node.modules,
                "workers": len(workers),
                "busy": busy,
                "idle": len(workers) - busy,
            }
        )
    oldest = store.oldest_waiting()
    ended = store.run_end_counts(now - timedelta(hours=1), now - timedelta(minutes=1))
    served = [m for node in nodes for m in node["modules"]]
    return {
        "time": now.isoformat(),
        "jobs": {"total": sum(by_status.values()), "by_status": dict(by_status)},
        "classes": {cls: dict(counter) for cls, counter in sorted(by_class.items())},
        "nodes": nodes,
        "oldest_waiting_seconds": _age(now, oldest) if oldest else None,
        "runs_ended": {
            "last_minute": _by_status(ended, "recent"),
            "last_hour": _by_status(ended, "count"),
        },
        "unserved_waiting_classes": [c for c in store.waiting_classes() if not serves(c, served)],
        **flow_summary(scheduler),
    }


#: Limits and pauses whose waiting jobs ``info`` counts (one count each); the others show ``waiting`` None, so a
#: cluster with thousands of keys still answers at once.
MAX_COUNTED_CONTROLS = 100


def flow_summary(scheduler: Scheduler) -> dict[str, Any]:
    """Limits and pauses (SPEC 8), each with what it holds: runs holding a limit's slots, jobs waiting under it
    (counted for the first MAX_COUNTED_CONTROLS of them, in key order)."""
    store = scheduler.store
    controls = Controls.from_docs(store.flow_controls())
    counted = iter(range(MAX_COUNTED_CONTROLS))

    def waiting(key: str | None) -> int | None:
        return store.waiting_under(key) if next(counted, None) is not None else None

    limits = {
        key: {**limit.describe(), "running": len(limit.holders), "waiting": waiting(key)}
        for key, limit in sorted(controls.limits.items())
    }
    paused = {key: {"waiting": waiting(None if key == EVERY_JOB else key)} for key in sorted(controls.paused)}
    return {"limits": limits, "paused": paused}


def allow_lists(scheduler: Scheduler) -> list[list[str]]:
    """The allow-list (modules served) of each live queue node, oldest node first: ``[]`` when none runs."""
    return [NodeEntry(node).modules for node in scheduler.store.live_nodes()]


def _by_status(rows: list[dict[str, Any]], field: str) -> dict[str, int]:
    """Run ends per status label from the store's counts (``field``: which count), statuses that had none left
    out; statuses stored as other number types (``4.0``) share their label's count."""
    counts: Counter[str] = Counter()
    for row in map(CountRow, rows):
        if row.counted(field):
            counts[status_label(row.status)] += row.counted(field)
    return dict(counts)


def _class_label(job_class: Any) -> str:
    """A stored class as a key: itself, or the ``repr`` of a malformed one (a number, a list: never a name)."""
    return job_class if isinstance(job_class, str) else repr(job_class)


def _age(now: datetime, doc: Mapping[str, Any]) -> float | None:
    """Seconds since a job was created (by its id's time when ``created`` is malformed)."""
    job = JobView(doc)
    created = job.created_value
    if not isinstance(created, datetime):
        job_id = job.id_value
        created = job_id.generation_time if isinstance(job_id, ObjectId) else None
    return (now - created).total_seconds() if created is not None else None
