"""Leases as the job collection's change stream tells them (server clock), and the check that no job code ran
after the lease it ran under had expired."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pymongo.database import Database

from chaos.config import LEASE_SLACK
from chaos.runlog import Judged
from taskscheduler import JobStatus


@dataclass
class Lease:
    """One attempt's hold on a run, from the job collection's change stream (server clock, unix seconds): when it
    was claimed, and the last expiry its node wrote while the attempt owned the run."""

    run: int
    claimed: float
    expires: float
    ended: float | None = None  # when the attempt stopped owning the run (ended, released, taken over)


def lease_history(changes: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[Lease]]:
    """(job, worker) -> the leases its attempts held, replayed from change events (inserts carry the document,
    updates the fields they changed)."""
    leases: dict[tuple[str, str], list[Lease]] = defaultdict(list)
    docs: dict[Any, dict[str, Any]] = {}
    holding: dict[Any, tuple[tuple[str, int], Lease]] = {}
    for change in changes:
        key = (change.get("documentKey") or {}).get("_id")
        op = change["operationType"]
        if op in ("insert", "replace") and change.get("fullDocument") is not None:
            doc = dict(change["fullDocument"])
        elif op == "update":
            doc = dict(docs.get(key, {}))
            doc.update((change.get("updateDescription") or {}).get("updatedFields") or {})
        else:
            docs.pop(key, None)
            if key in holding:
                holding.pop(key)[1].ended = _timestamp(change["wallTime"]) if "wallTime" in change else None
            continue
        docs[key] = doc
        wall = change.get("wallTime")
        when = _timestamp(wall) if isinstance(wall, datetime) else float(change["clusterTime"].time)
        held = holding.get(key)
        owned = doc.get("status") == JobStatus.PROCESSING and isinstance(doc.get("expires"), datetime)
        owner = (str(doc.get("worker")), int(doc.get("run", 1)))
        if held is not None and (not owned or held[0] != owner):
            held[1].ended = when
            holding.pop(key)
            held = None
        if not owned:
            continue
        if held is None:  # a claim
            lease = Lease(owner[1], when, _timestamp(doc["expires"]))
            leases[(str(key), owner[0])].append(lease)
            holding[key] = (owner, lease)
        else:  # a renewal (or another change while it is held)
            held[1].expires = _timestamp(doc["expires"])
    return leases


def _timestamp(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def read_changes(db: Database[dict[str, Any]], collection: str, start: Any) -> list[dict[str, Any]]:
    """Every change of ``collection`` since the operation time ``start``."""
    changes = []
    with db.watch([{"$match": {"ns.coll": collection}}], start_at_operation_time=start, max_await_time_ms=100) as cs:
        empty = 0
        while empty < 2:
            change = cs.try_next()
            if change is None:
                empty += 1
                continue
            empty = 0
            changes.append(change)
    return changes


def check_leases(j: Judged, leases: Mapping[tuple[str, str], list[Lease]], offset: float) -> int:
    """No activity of a job's code (its worker or its subprocesses) after the lease it ran under expired on the
    server. ``offset``: server (wall) clock minus the run log's monotonic clock. Returns the executions checked."""
    checked = 0
    for x in j.executions:
        held = [
            lease
            for lease in leases.get((str(j.spec.id), x.worker), ())
            if x.run in (None, lease.run) and lease.claimed <= x.start + offset + LEASE_SLACK
        ]
        if not held:
            continue  # no claim seen for it: check_executions reports an execution no attempt explains
        lease = max(held, key=lambda lease: lease.claimed)
        checked += 1
        late = x.stop + offset - lease.expires
        if late > LEASE_SLACK:
            j.problems.append(
                f"execution {x.token} (run {x.run}, node {x.node}, worker ..{x.worker[-6:]}) was active {late:.2f} s "
                "after its lease expired on the server"
                + (" (its subprocess)" if x.child_last is not None and x.child_last + offset > lease.expires else "")
            )
    return checked
