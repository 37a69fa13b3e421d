"""The preferred node of a job: rendezvous hashing over the live nodes that serve its class."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

from bson import ObjectId

from taskscheduler.node.peers import GRACE_SECONDS, LAST_STAGGERED_RANK, STAGGER_SECONDS, Peers, delay

NOW = datetime(2026, 12, 6, 12, 0, 0)


def _entry(node_id: ObjectId, modules: list[str], age: float = 0.0, lease: float = 30.0) -> dict[str, object]:
    return {"_id": node_id, "modules": modules, "alive": NOW - timedelta(seconds=age), "lease": lease}


def _views(ids: list[ObjectId], modules: list[str] | None = None) -> list[Peers]:
    views = []
    for me in ids:
        peers = Peers(me, modules or ["jobs"])
        peers.update([_entry(i, modules or ["jobs"]) for i in ids], NOW, 5.0)
        views.append(peers)
    return views


def test_every_node_agrees_on_one_preferred_node_per_job() -> None:
    views = _views([ObjectId() for _ in range(5)])
    firsts: Counter[int] = Counter()
    for _ in range(2000):
        job = ObjectId()
        ranks = sorted(view.rank(job, "jobs:Noop") for view in views)
        assert ranks == [0, 1, 2, 3, 4]  # one preferred node, the others in one order
        firsts[next(n for n, view in enumerate(views) if view.rank(job, "jobs:Noop") == 0)] += 1
    assert all(300 <= count <= 500 for count in firsts.values()), firsts  # an even share each (400 expected)


def test_a_node_leaving_moves_only_its_own_jobs() -> None:
    ids = [ObjectId() for _ in range(4)]
    before = _views(ids)
    after = _views(ids[:3])
    jobs = [ObjectId() for _ in range(500)]
    for job in jobs:
        first_before = next(i for i, view in zip(ids, before, strict=True) if view.rank(job, "jobs:Noop") == 0)
        first_after = next(i for i, view in zip(ids[:3], after, strict=True) if view.rank(job, "jobs:Noop") == 0)
        if first_before != ids[3]:
            assert first_after == first_before


def test_only_live_nodes_serving_the_class_count() -> None:
    me, stale, other_module, live = ObjectId(), ObjectId(), ObjectId(), ObjectId()
    peers = Peers(me, ["jobs"])
    period = 5.0  # a lease of 30 s: a heartbeat every 5 s
    peers.update(
        [
            _entry(stale, ["jobs"], age=3 * period + 1),
            _entry(other_module, ["mail"]),
            _entry(live, ["jobs"], age=3 * period - 1),
            {"_id": "not an id", "modules": ["jobs"], "alive": NOW},
            {"_id": ObjectId(), "modules": "jobs", "alive": NOW},
            {"_id": ObjectId(), "modules": ["jobs"], "alive": "yesterday"},
        ],
        NOW,
        period,
    )
    assert [p.id for p in peers.others] == [other_module, live]
    ranks = {peers.rank(ObjectId(), "jobs.sub:Job") for _ in range(200)}
    assert ranks == {0, 1}  # only `live` competes for jobs of `jobs`
    assert {peers.rank(ObjectId(), "other:Job") for _ in range(50)} == {0}  # nobody else serves it


def test_a_node_alone_or_without_a_registry_is_always_first() -> None:
    peers = Peers(ObjectId(), ["jobs"])
    assert peers.rank(ObjectId(), "jobs:Noop") == 0
    assert peers.rank("any id", "jobs:Noop") == 0


def test_delays_grow_by_rank_up_to_a_bound_well_inside_a_second() -> None:
    assert delay(0) == 0.0
    assert delay(1) == GRACE_SECONDS
    assert delay(2) == GRACE_SECONDS + STAGGER_SECONDS
    assert delay(1000) == delay(LAST_STAGGERED_RANK) < 1.0
