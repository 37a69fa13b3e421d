"""Flow control (SPEC 8): cluster-wide limits (concurrency, rate) and pauses, keyed by a job's class or its
``limit_key``.

What a node needs to decide is a snapshot of every control (:class:`Controls`), read again whenever one changes:
nodes see those changes in the same change stream as the jobs', in the order they were made, so a job added after
``pause()`` returned is never handed to a worker by a node that has not seen the pause. A node holds back what
the snapshot says may not start; the worker's slot (taken in one conditional update of the limit, see
:mod:`taskscheduler.store.mongo.flow`) is what keeps a limit when several nodes race.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .. import options as o
from ..errors import InvalidArgumentError
from ..store.entries import FlowControl, rate_parts
from ..store.views import JobView

#: The pause key that pauses every job.
EVERY_JOB = "*"
#: Units of a rate: "N/s", "N/m", "N/h".
RATE_UNITS = {"s": 1, "m": 60, "h": 3600}
#: Most starts a rate may allow in its interval: a limit keeps the time of each start in the interval in its one
#: document, and every start filters them all (a million is 16 MB, the largest document MongoDB stores). For more,
#: a shorter interval: "10000/h" as it is, "600000/h" as "10000/m".
MAX_RATE_COUNT = 10_000
_RATE = re.compile(r"^\s*([0-9]+)\s*/\s*([smh])\s*$")


def checked_key(key: Any, *, pause: bool = False) -> str:
    """A limit or pause key: a class name ("module:QualName") or a ``limit_key`` value (``"*"``: every job, for a
    pause only)."""
    if not isinstance(key, str) or not key.strip():
        raise InvalidArgumentError(f"key must be a job class ('module:QualName') or a limit_key, got {key!r}")
    if key == EVERY_JOB and not pause:
        raise InvalidArgumentError("'*' pauses every job; a limit needs a class or a limit_key")
    return o.limit_key("key", key)  # also: text that can be stored (UTF-8)


def parse_rate(rate: Any) -> dict[str, int] | None:
    """``"N/s"``, ``"N/m"`` or ``"N/h"`` (1 <= N <= MAX_RATE_COUNT) as stored: ``{"count": N, "seconds": 1, 60 or
    3600}``."""
    if rate is None:
        return None
    found = _RATE.match(rate) if isinstance(rate, str) else None
    if found is None or int(found.group(1)) < 1:
        raise InvalidArgumentError(f"rate must be like '10/s', '100/m' or '1000/h' (at least 1), got {rate!r}")
    count = int(found.group(1))
    if count > MAX_RATE_COUNT:
        raise InvalidArgumentError(
            f"rate allows at most {MAX_RATE_COUNT} starts per interval (a limit keeps each start's time), got "
            f"{rate!r}: give it per shorter interval ('N/m' or 'N/s')"
        )
    return {"count": count, "seconds": RATE_UNITS[found.group(2)]}


def rate_text(rate: Any) -> str | None:
    """A stored rate as ``"N/m"``; a count that is no whole number (a hand-written document) shows as ``"?"``:
    stored text never reaches a terminal or a page from here."""
    if not isinstance(rate, Mapping):
        return None
    count, seconds = rate_parts(rate)
    span = seconds if isinstance(seconds, int) and not isinstance(seconds, bool) else 1
    unit = {length: name for name, length in RATE_UNITS.items()}.get(span, "s")
    shown = count if isinstance(count, int) and not isinstance(count, bool) else "?"
    return f"{shown}/{unit}"


def checked_concurrency(concurrency: Any) -> int | None:
    if concurrency is None:
        return None
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= o.INT32_MAX:
        raise InvalidArgumentError(f"concurrency must be a whole number of at least 1, got {concurrency!r}")
    return concurrency


def keys_of(doc: Mapping[str, Any]) -> list[str]:
    """The keys a job counts under: its class and, when set, its ``limit_key``."""
    job = JobView(doc)
    keys = []
    if isinstance(job.class_value, str):
        keys.append(job.class_value)
    extra = job.options.get(o.LIMIT_KEY)
    if isinstance(extra, str) and extra and extra not in keys:
        keys.append(extra)
    return keys


@dataclass(frozen=True)
class Limit:
    key: str
    concurrency: int | None = None
    rate: Mapping[str, int] | None = None
    holders: tuple[Mapping[str, Any], ...] = ()
    starts: tuple[datetime, ...] = ()

    def room(self, now: datetime) -> int:
        """How many more runs under this key may start at ``now`` (the server's time), as the snapshot says."""
        room = 1_000_000
        if self.concurrency is not None:
            room = min(room, self.concurrency - len(self.holders))
        if self.rate is not None:
            count, seconds = self._rate
            since = now - timedelta(seconds=seconds)
            room = min(room, count - sum(1 for t in self.starts if t > since))
        return room

    def full(self, now: datetime) -> bool:
        """Whether the snapshot says no run under this key may start at ``now`` (the server's time)."""
        if self.concurrency is not None and len(self.holders) >= self.concurrency:
            return True
        if self.rate is not None:
            count, seconds = self._rate
            since = now - timedelta(seconds=seconds)
            return sum(1 for t in self.starts if t > since) >= count
        return False

    @property
    def _rate(self) -> tuple[int, int]:
        """The rate's count and seconds (0 for a part missing: a limit read from a document has both)."""
        count, seconds = rate_parts(self.rate)
        return int(0 if count is None else count), int(0 if seconds is None else seconds)

    def describe(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "rate": rate_text(self.rate)}


def _limit(key: str, control: FlowControl) -> Limit | None:
    """A stored limit as this library writes it, or None (a hostile or broken document limits nothing, and never
    stops a node or a worker: SPEC 2)."""
    concurrency, rate = control.concurrency, control.rate
    holders, starts = control.holders, control.starts
    if concurrency is not None and not (type(concurrency) is int and concurrency >= 1):
        return None
    if rate is not None:
        if not isinstance(rate, Mapping) or rate_text(rate) is None:
            return None
        count, seconds = rate_parts(rate)
        if not (type(count) is int and count >= 1 and seconds in RATE_UNITS.values()):
            return None
    if (concurrency is None and rate is None) or not isinstance(holders, list) or not isinstance(starts, list):
        return None
    return Limit(
        key,
        concurrency,
        rate,
        tuple(h for h in holders if isinstance(h, Mapping)),
        tuple(t for t in starts if isinstance(t, datetime)),
    )


@dataclass(frozen=True)
class Controls:
    """Every pause and limit, as read at one moment."""

    paused: frozenset[str] = frozenset()
    limits: Mapping[str, Limit] = field(default_factory=dict)
    #: Limit documents this library did not write as they are (key -> document): shown, limiting nothing.
    broken: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_docs(cls, docs: Iterable[Mapping[str, Any]]) -> Controls:
        paused: set[str] = set()
        limits: dict[str, Limit] = {}
        broken: dict[str, Mapping[str, Any]] = {}
        for doc in docs:
            control = FlowControl(doc)
            key = control.key
            if not isinstance(key, str) or control.id != f"{control.kind}:{key}":
                # A hostile document controls nothing; nor does one stored under another id (written by hand):
                # resume() and remove_limit() could never remove it, and a limit's slots are taken by id.
                continue
            if control.kind == "pause":
                paused.add(key)
            elif control.kind == "limit":
                limit = _limit(key, control)
                if limit is not None:
                    limits[key] = limit
                else:
                    broken[key] = doc
        return cls(frozenset(paused), limits, broken)

    def described(self) -> dict[str, dict[str, Any]]:
        """Every limit as ``limits()`` shows it; a broken one (limiting nothing) with ``"malformed": True``."""
        shown = {key: limit.describe() for key, limit in self.limits.items()}
        for key, doc in self.broken.items():
            control = FlowControl(doc)
            concurrency = control.concurrency
            shown[key] = {
                "concurrency": concurrency if type(concurrency) is int else None,
                "rate": rate_text(control.rate),
                "malformed": True,
            }
        return dict(sorted(shown.items()))

    @property
    def empty(self) -> bool:
        return not self.paused and not self.limits

    def is_paused(self, doc: Mapping[str, Any]) -> bool:
        return EVERY_JOB in self.paused or any(key in self.paused for key in keys_of(doc))

    def limited(self, doc: Mapping[str, Any]) -> tuple[str, ...]:
        """The keys of ``doc`` under a limit (the slots its worker takes before it claims it)."""
        return tuple(key for key in keys_of(doc) if key in self.limits)

    def held_back(self, doc: Mapping[str, Any], now: datetime) -> str | None:
        """Why a node holds this due job back now (``"paused"`` or ``"limit <key>"``), or None."""
        if self.paused and self.is_paused(doc):
            return "paused"
        for key in self.limited(doc):
            if self.limits[key].full(now):
                return f"limit {key}"
        return None
