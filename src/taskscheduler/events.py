"""The event catalogue: every blinker signal, its short name, and who emits it.

Order per scenario and the emitting process are documented in ``docs/events.md``. Handlers registered with
``on()`` are called as ``handler(event_name, payload)``: ``payload`` is a :class:`~taskscheduler.Process` for
status events and ``{"_id": ObjectId, "pid": int, "signal": int | None}`` for worker events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blinker import Namespace

from .constants import JobStatus
from .errors import InvalidArgumentError

PREFIX = "taskscheduler.on"

#: Status events, fired once per status change.
WAITING = "taskscheduler.onWaiting"
POSTPONED = "taskscheduler.onPostponed"
PROCESSING = "taskscheduler.onProcessing"
DONE = "taskscheduler.onDone"
FAILED = "taskscheduler.onFailed"
TIMEOUT = "taskscheduler.onTimeout"
CANCEL = "taskscheduler.onCancel"
#: Worker events, fired by a queue node for its own workers only.
WORKER_SPAWN = "taskscheduler.onWorkerSpawn"
WORKER_KILL = "taskscheduler.onWorkerKill"
#: Receives every event (``on("*", ...)``).
ALL = "taskscheduler.*"

#: The event of each status. CANCELED fires ``cancel`` and TIMEOUT fires ``timeout`` (upstream swaps them).
STATUS_EVENTS: dict[JobStatus, str] = {
    JobStatus.WAITING: WAITING,
    JobStatus.POSTPONED: POSTPONED,
    JobStatus.PROCESSING: PROCESSING,
    JobStatus.DONE: DONE,
    JobStatus.FAILED: FAILED,
    JobStatus.TIMEOUT: TIMEOUT,
    JobStatus.CANCELED: CANCEL,
}

#: Short name -> full name.
SHORT_NAMES: dict[str, str] = {
    "waiting": WAITING,
    "postponed": POSTPONED,
    "processing": PROCESSING,
    "done": DONE,
    "failed": FAILED,
    "timeout": TIMEOUT,
    "cancel": CANCEL,
    "workerSpawn": WORKER_SPAWN,
    "workerKill": WORKER_KILL,
    "*": ALL,
}
FULL_NAMES: frozenset[str] = frozenset(SHORT_NAMES.values())

Handler = Callable[[str, Any], Any]


def resolve(event: str) -> str:
    """Full signal name of a short name, a full name or ``"*"``."""
    if event in FULL_NAMES:
        return event
    if isinstance(event, str) and event in SHORT_NAMES:
        return SHORT_NAMES[event]
    raise InvalidArgumentError(f"unknown event {event!r}; use one of {sorted(SHORT_NAMES)} or their full names")


class Emitter:
    """Connects handlers to a blinker namespace and fires events on it (the specific signal, then ``*``)."""

    def __init__(self, namespace: Namespace | None = None) -> None:
        if namespace is not None and not isinstance(namespace, Namespace):
            raise InvalidArgumentError(f"emitter must be a blinker.Namespace, got {type(namespace).__name__}")
        self.namespace = namespace if namespace is not None else Namespace()
        self._receivers: list[Callable[..., Any]] = []  # blinker holds receivers weakly; keep them alive

    def on(self, event: str, handler: Handler) -> None:
        if not callable(handler):
            raise InvalidArgumentError(f"handler must be callable, got {handler!r}")
        name = resolve(event)

        def receiver(sender: str, **payload: Any) -> None:
            handler(sender, payload["payload"])

        self._receivers.append(receiver)
        self.namespace.signal(name).connect(receiver, weak=False)

    def wants_status(self) -> bool:
        """Whether anything listens to status events (so they are worth building)."""
        names = [*STATUS_EVENTS.values(), ALL]
        return any(bool(self.namespace.signal(name).receivers) for name in names)

    def emit(self, name: str, payload: Any) -> None:
        self.namespace.signal(name).send(name, payload=payload)
        self.namespace.signal(ALL).send(name, payload=payload)

    def emit_status(self, status: int, payload: Any) -> None:
        self.emit(STATUS_EVENTS[JobStatus(status)], payload)
