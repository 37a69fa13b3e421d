"""The event catalogue: every blinker signal, its short name, and who emits it.

Order per scenario and the emitting process are documented in ``docs/events.md``. Handlers registered with
``on()`` are called as ``handler(event_name, payload)``: ``payload`` is a :class:`~taskscheduler.Process` for
status events and ``{"_id": ObjectId, "pid": int, "signal": int | None}`` for worker events.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
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


#: Status changes remembered per namespace to fire each once, however many emitters (a Scheduler and a Queue
#: sharing one, as upstream's README shows) observe it.
SEEN_CHANGES = 10_000


#: Status changes fired per namespace (by ``id``: a Namespace is an unhashable dict), so that each is fired once
#: on it however many emitters see it; an entry goes with its namespace.
_SEEN: dict[int, tuple[weakref.ref[Namespace], OrderedDict[Hashable, None]]] = {}


def _seen_on(namespace: Namespace) -> OrderedDict[Hashable, None]:
    key = id(namespace)
    entry = _SEEN.get(key)
    if entry is None or entry[0]() is not namespace:  # none yet, or an id reused after its namespace went
        entry = (weakref.ref(namespace, lambda _: _SEEN.pop(key, None)), OrderedDict())
        _SEEN[key] = entry
    return entry[1]


class Emitter:
    """Connects handlers to a blinker namespace and fires events on it (the specific signal, then ``*``).

    Every Emitter on one namespace shares one memory of the status changes fired, so each change fires once per
    observer even when the Scheduler that made it and a Queue that saw it in its change stream share handlers.
    """

    def __init__(self, namespace: Namespace | None = None) -> None:
        if namespace is not None and not isinstance(namespace, Namespace):
            raise InvalidArgumentError(f"emitter must be a blinker.Namespace, got {type(namespace).__name__}")
        self.namespace = namespace if namespace is not None else Namespace()
        self._receivers: list[Callable[..., Any]] = []  # blinker holds receivers weakly; keep them alive
        # Shared by every emitter on the namespace (a caller's Namespace may serve several schedulers).
        self._seen: OrderedDict[Hashable, None] = _seen_on(self.namespace)

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

    def emit_status(self, status: int, payload: Any, change: Hashable | None = None) -> None:
        """Fire the event of ``status`` for a Process, unless this change was fired on this namespace already.
        ``change`` tells this change of the job from its others (see :func:`change_key`); None: always fire."""
        key = None if change is None else (int(status), change)
        if key is not None:
            if key in self._seen:
                self._seen.move_to_end(key)
                return
            self._seen[key] = None
            if len(self._seen) > SEEN_CHANGES:
                self._seen.popitem(last=False)
        self.emit(STATUS_EVENTS[JobStatus(status)], payload)


def change_key(job_id: Any, run: Any, started: Any, mark: Any) -> Hashable:
    """What tells one status change of a job from another (with its status): the job, its run, when that run
    started and the mark of the change that recorded it (a claim sets a new start; every other change a new
    mark)."""
    return (job_id, run, started, mark)
