"""Views of the other stored documents anyone may have written (SPEC 2): the node registry's entries
(:class:`NodeEntry`, their :class:`WorkerEntry`), pauses and limits (:class:`FlowControl`, a limit's
:class:`SlotHolder`), and the counts the store groups on the server (:class:`CountRow`).

Each field is given as stored (any value, None when missing): a reader keeps its own lenient checks, and a
hostile document never stops it. Jobs and events are read through :mod:`taskscheduler.store.views`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .views import Stored


@dataclass(frozen=True)
class WorkerEntry:
    """A worker as its node's registry entry lists it, each field as stored (any value, None when missing)."""

    doc: Mapping[str, Any]

    id = Stored("_id")
    pid = Stored("pid")
    job = Stored("job", "The job it runs, None when idle.")


@dataclass(frozen=True)
class NodeEntry:
    """A queue node's entry in the node registry, each field as stored (any value, None when missing): the
    registry is a hint anyone may have written, read by operators' views and by the other nodes, never a reason
    to stop (SPEC 2)."""

    doc: Mapping[str, Any]

    id = Stored("_id")
    host = Stored("host")
    pid = Stored("pid")
    started = Stored("started")
    version = Stored("version")
    modules_value = Stored("modules", "The modules served (the allow-list) as stored.")

    @property
    def modules(self) -> list[str]:
        """The modules served, each as text; none when the stored value is no list."""
        modules = self.doc.get("modules")
        return [str(m) for m in modules] if isinstance(modules, list) else []

    workers_value = Stored("workers", "The workers as stored (a list of worker documents in an entry that fits).")

    @property
    def workers(self) -> list[WorkerEntry]:
        """The workers listed as documents; anything but a list of documents counts as none."""
        listed = self.doc.get("workers")
        return [WorkerEntry(w) for w in listed if isinstance(w, Mapping)] if isinstance(listed, list) else []

    alive = Stored("alive", "The last heartbeat's time (the server's), as stored.")
    lease = Stored("lease", "The node's lease in seconds (its heartbeat period follows from it), as stored.")


def rate_parts(rate: Any) -> tuple[Any, Any]:
    """A stored rate's count and seconds as stored (None when missing); (None, None) for a rate that is no
    document."""
    return (rate.get("count"), rate.get("seconds")) if isinstance(rate, Mapping) else (None, None)


@dataclass(frozen=True)
class SlotHolder:
    """A run holding a slot of a limit, each field as stored (any value, None when missing): its job, its worker
    and since when (the server's time)."""

    doc: Mapping[str, Any]

    job = Stored("job")
    worker = Stored("worker")
    since = Stored("since")


@dataclass(frozen=True)
class FlowControl:
    """A stored pause or limit (SPEC 8), each field as stored (any value): anyone may write one, and a hostile one
    controls nothing and stops nothing (SPEC 2)."""

    doc: Mapping[str, Any]

    id = Stored("_id")
    kind = Stored("kind", '``"pause"`` or ``"limit"`` in a control this library wrote.')
    key = Stored("key", 'The class or ``limit_key`` it controls (``"*"``: a pause of every job).')
    concurrency = Stored("concurrency", "A limit's most runs at once, None when missing.")
    rate = Stored(
        "rate",
        "A limit's rate (a document of ``count`` starts per ``seconds``, see :func:`rate_parts`), None when missing.",
    )

    @property
    def holders(self) -> Any:
        """A limit's slot holders as stored (a list in one that fits, see :class:`SlotHolder`); [] when missing."""
        return self.doc.get("holders", [])

    @property
    def starts(self) -> Any:
        """A limit's recent start times as stored (a list in one that fits); [] when missing."""
        return self.doc.get("starts", [])


@dataclass(frozen=True)
class CountRow:
    """A count the store groups on the server (``job_counts``, ``waiting_counts``, ``run_end_counts``), each
    field as found (a malformed job's group shows any value, None when missing): a class and a status with how
    many jobs (or run ends: ``count`` in the last hour, ``recent`` in the last minute) have them."""

    doc: Mapping[str, Any]

    job_class = Stored("class")
    status = Stored("status")
    count = Stored("count")

    def counted(self, field: str) -> Any:
        """The count named ``field`` (``"count"`` or ``"recent"``); KeyError when the row has none."""
        return self.doc[field]
