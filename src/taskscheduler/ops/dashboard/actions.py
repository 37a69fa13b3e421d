"""What the dashboard's page can change, each through the public Scheduler API: cancel or requeue one job, pause or
resume a class, a limit key or every job, and requeue every FAILED/TIMEOUT job matching the table's filter.

Every action is a POST checked the same way before anything is read (:func:`refusal`): refused in read-only mode,
without the custom header (a cross-site form cannot send one, so no other web page can trigger an action), and,
with a token, without ``Authorization: Bearer TOKEN``. Refused actions answer 403 and change nothing.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from bson import ObjectId

from ...client.scheduler import Scheduler
from ...errors import ServerUnavailableError, TaskSchedulerError
from .views import job_query

#: The header every action must carry (browsers refuse to send it cross-site without our consent).
ACTION_HEADER = "X-Taskscheduler-Action"
#: Jobs one bulk requeue acts on at most (the newest first); the page says when more match.
MAX_BULK = 500
#: Failures a bulk requeue reports one by one at most (the others are counted).
MAX_BULK_FAILURES = 20
#: The statuses a bulk requeue takes (a CANCELED job was canceled on purpose: requeued one by one only).
REQUEUED = ("failed", "timeout")


def refusal(read_only: bool, token: str | None, headers: Mapping[str, str]) -> tuple[int, str] | None:
    """Why an action is refused (status, message), or None when it may go on."""
    if read_only:
        return 403, "this dashboard is read-only"
    if headers.get(ACTION_HEADER) != "1":
        return 403, f"actions need the {ACTION_HEADER} header"
    if token is not None and not token_ok(headers.get("Authorization", ""), token):
        return 403, "a valid token is needed (Authorization: Bearer TOKEN)"
    return None


def token_ok(given: str, token: str) -> bool:
    scheme, _, value = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def bulk_query(statuses: str, job_class: str | None, job_id: str | None) -> dict[str, Any] | None:
    """The jobs a bulk requeue takes: FAILED or TIMEOUT ones among those the table's filter (``statuses``: its
    comma-separated status names, empty for all) shows; None when none can match."""
    named = {s.strip().lower() for s in statuses.split(",") if s.strip()}
    wanted = [s for s in REQUEUED if not named or s in named]
    if not wanted:
        return None
    return job_query(wanted, job_class, job_id)


def bulk_preview(scheduler: Scheduler, query: dict[str, Any] | None) -> dict[str, Any]:
    """How many jobs a bulk requeue of ``query`` would requeue now (``will_requeue``: at most :data:`MAX_BULK`)."""
    count = scheduler.store.count_jobs(query) if query is not None else 0
    return {"count": count, "will_requeue": min(count, MAX_BULK), "max": MAX_BULK}


def bulk_requeue(scheduler: Scheduler, query: dict[str, Any] | None, expected: int) -> dict[str, Any]:
    """Requeue the newest ``expected`` (at most :data:`MAX_BULK`) jobs matching ``query``, one by one through
    ``Scheduler.requeue_job``: a job that changed meanwhile (requeued by someone else, gone) is reported in
    ``failed`` with the reason, the others keep going. ``remaining``: matching jobs left afterwards.

    An outage stops it (ServerUnavailableError saying how far it got): each further job would wait out the
    driver's server selection again, holding the request (and a server thread) for as many times as jobs are left."""
    if query is None or expected <= 0:
        return {"requeued": 0, "failed": [], "failed_total": 0, "remaining": 0}
    found = scheduler.store.newest_jobs(query, min(expected, MAX_BULK))
    requeued = 0
    failed: list[dict[str, str]] = []
    failed_total = 0
    for doc in found:
        job_id = doc["_id"]
        try:
            scheduler.requeue_job(job_id)
        except ServerUnavailableError as exc:
            raise ServerUnavailableError(
                f"{str(exc).splitlines()[0][:300]}: requeued {requeued} of {len(found)} before it, the rest not tried"
            ) from exc
        except TaskSchedulerError as exc:
            failed_total += 1
            if len(failed) < MAX_BULK_FAILURES:
                failed.append({"id": _id_text(job_id), "error": str(exc).splitlines()[0][:300]})
            continue
        requeued += 1
    return {
        "requeued": requeued,
        "failed": failed,
        "failed_total": failed_total,
        "remaining": scheduler.store.count_jobs(query),
    }


def _id_text(job_id: Any) -> str:
    return str(job_id) if isinstance(job_id, ObjectId) else repr(job_id)[:40]
