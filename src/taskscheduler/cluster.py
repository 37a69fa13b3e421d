"""What an operator asks of a cluster: jobs per status and class, live nodes, backlog, recent run ends."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from .constants import JobStatus
from .job import serves
from .scheduler import Scheduler


def cluster_info(scheduler: Scheduler) -> dict[str, Any]:
    """A plain-JSON summary (``taskscheduler info``)."""
    store = scheduler.store
    now = store.server_time()
    counts = store.job_counts()
    by_status: Counter[str] = Counter()
    by_class: dict[str, Counter[str]] = {}
    for row in counts:
        name = JobStatus(int(row["status"])).name.lower()
        by_status[name] += int(row["count"])
        by_class.setdefault(str(row["class"]), Counter())[name] += int(row["count"])
    nodes: list[dict[str, Any]] = []
    for node in store.live_nodes():
        workers = node.get("workers") or []
        busy = sum(1 for w in workers if w.get("job") is not None)
        nodes.append(
            {
                "id": str(node["_id"]),
                "host": node.get("host"),
                "pid": node.get("pid"),
                "started": node["started"].isoformat() if node.get("started") else None,
                "version": node.get("version"),
                "modules": list(node.get("modules") or []),
                "workers": len(workers),
                "busy": busy,
                "idle": len(workers) - busy,
            }
        )
    oldest = store.oldest_waiting()
    ended_hour = store.run_ends_since(now - timedelta(hours=1))
    minute_ago = now - timedelta(minutes=1)
    served = [m for node in nodes for m in node["modules"]]
    return {
        "time": now.isoformat(),
        "jobs": {"total": sum(by_status.values()), "by_status": dict(by_status)},
        "classes": {cls: dict(counter) for cls, counter in sorted(by_class.items())},
        "nodes": nodes,
        "oldest_waiting_seconds": (now - oldest["created"]).total_seconds() if oldest else None,
        "runs_ended": {
            "last_minute": _by_status(e for e in ended_hour if e["time"] >= minute_ago),
            "last_hour": _by_status(ended_hour),
        },
        "unserved_waiting_classes": [c for c in store.waiting_classes() if not serves(c, served)],
    }


def _by_status(events: Any) -> dict[str, int]:
    return dict(Counter(JobStatus(int(e["status"])).name.lower() for e in events))
