"""Which node claims a waiting job first: the one the job prefers among the live nodes that serve its class.

Every node hears of every waiting job. If each handed it to a worker at once, every idle node would try the claim
and all but one would lose: the cost of a job would grow with the number of nodes. Instead, each job prefers one
node, picked by rendezvous (highest random weight) hashing of the job's id with each candidate node's id, where the
candidates are the live nodes of the registry that serve the job's class. Every node computes the same order from
the same registry, without talking to the others, and a node that joins or leaves moves only its own share of the
jobs. The preferred node claims at once; the runner-up claims only if the job is still waiting after
GRACE_SECONDS and it has a free worker, the next ones a little later (STAGGER_SECONDS per rank), so a dead,
paused or busy preferred node costs a job at most that delay, and its takeover by one claim rather than a race.
The order is only a preference: nodes with different views of the registry (a node just joined or left) each
claim as they see it, and the claim itself, conditional on the job still waiting, decides who runs it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId

from ..client.job import serves
from ..store.entries import NodeEntry
from ..store.schema import job_ref
from .heartbeat import period_of

#: How long the runner-up waits for the preferred node to claim a job before it claims the job itself.
GRACE_SECONDS = 0.25
#: What each further rank waits on top, so that a job whose first choices are all busy or gone is taken over by
#: one claim at a time rather than by a race of every node.
STAGGER_SECONDS = 0.1
#: Ranks past this one wait as long as it does: the longest delay is GRACE_SECONDS + 3 * STAGGER_SECONDS (0.55 s),
#: well inside the second in which a waiting job starts when a worker is free anywhere (SPEC 4).
LAST_STAGGERED_RANK = 4
#: A registry entry counts as a live node while its last refresh is at most this many of its heartbeats old: a
#: node that died without leaving the registry stops being preferred within a few seconds (its entry expires
#: only after several leases).
LIVE_HEARTBEATS = 3


@dataclass(frozen=True)
class Peer:
    """A live node as the registry shows it: its id and the modules it serves."""

    id: ObjectId
    modules: tuple[str, ...]
    weight_key: bytes


class Peers:
    """This node's view of the live nodes, and the rank of this node among those serving a job's class."""

    def __init__(self, me: ObjectId, modules: Iterable[str]) -> None:
        self.me = Peer(me, tuple(modules), me.binary)
        self._others: tuple[Peer, ...] = ()

    @property
    def others(self) -> tuple[Peer, ...]:
        return self._others

    def update(self, entries: Iterable[Mapping[str, Any]], now: datetime, heartbeat: float) -> None:
        """Take the registry's entries as the live nodes (those refreshed within LIVE_HEARTBEATS of their own
        heartbeats before ``now``, on the server's clock). Malformed entries are skipped: the registry is only a
        hint, never a reason to stop."""
        others = []
        for doc in entries:
            entry = NodeEntry(doc)
            node_id = entry.id
            modules = entry.modules_value
            if not isinstance(node_id, ObjectId) or node_id == self.me.id or not isinstance(modules, list):
                continue
            if not self._alive(entry, now, heartbeat):
                continue
            names = tuple(m for m in modules if isinstance(m, str) and m)
            others.append(Peer(node_id, names, node_id.binary))
        self._others = tuple(others)

    @staticmethod
    def _alive(entry: NodeEntry, now: datetime, heartbeat: float) -> bool:
        alive = entry.alive
        if not isinstance(alive, datetime):
            return False
        lease = entry.lease
        period = heartbeat
        if isinstance(lease, (int, float)) and not isinstance(lease, bool) and lease > 0:
            period = period_of(float(lease))
        return alive.replace(tzinfo=None) >= now.replace(tzinfo=None) - timedelta(seconds=LIVE_HEARTBEATS * period)

    def rank(self, job_id: Any, job_class: str) -> int:
        """0 when this node is the job's preferred node (or the only one serving it), else how many live nodes
        serving its class come before this one."""
        if not self._others:
            return 0
        key = _job_key(job_id)
        mine = _weight(key, self.me.weight_key)
        return sum(
            1
            for peer in self._others
            if serves(job_class, peer.modules) and _before(_weight(key, peer.weight_key), peer, mine, self.me)
        )


def delay(rank: int) -> float:
    """Seconds a node of ``rank`` waits before it claims a job that is still waiting (0 for the preferred node)."""
    if rank <= 0:
        return 0.0
    return GRACE_SECONDS + STAGGER_SECONDS * (min(rank, LAST_STAGGERED_RANK) - 1)


def _job_key(job_id: Any) -> bytes:
    if isinstance(job_id, ObjectId):
        return job_id.binary
    return job_ref(job_id).encode("utf-8", "surrogatepass")


def _weight(job_key: bytes, node_key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(job_key + node_key, digest_size=8).digest(), "big")


def _before(weight: int, peer: Peer, mine: int, me: Peer) -> bool:
    """Whether ``peer`` ranks before this node for a job (ties, all but impossible, go to the greater id)."""
    return weight > mine or (weight == mine and peer.weight_key > me.weight_key)
