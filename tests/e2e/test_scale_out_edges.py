"""Edges of the preferred-node claim (node/peers.py, node/deferred.py, the node's deferral): a job whose preferred
node cannot claim it (busy, paused, killed, fake) starts within the grace delay plus 1 s, none waits forever, a
busy node takes no part, and a deferred job keeps its priority and its own worker (force_spawn)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest
from bson import ObjectId
from pymongo.database import Database

from helpers import Node, id_preferring, start_delay, wait_for_peers, wait_until
from taskscheduler import JobStatus, Process, Scheduler
from taskscheduler.constants import NODE_REGISTRY
from taskscheduler.node.peers import GRACE_SECONDS, LAST_STAGGERED_RANK, STAGGER_SECONDS

pytestmark = pytest.mark.e2e

#: The longest a job may wait when its preferred node cannot claim it: the last staggered rank's delay plus SPEC 4's
#: second.
TAKEOVER_SECONDS = GRACE_SECONDS + STAGGER_SECONDS * (LAST_STAGGERED_RANK - 1) + 1.0
ONE_WORKER = ("--pm", "static", "--min-children", "1", "--max-children", "1")
NOOP = "sample_jobs:Noop"
SLEEP = "sample_jobs:Sleep"


def _node_ids(scheduler: Scheduler, nodes: list[Node]) -> list[ObjectId]:
    """The registry id of each node (in the order given), once all are registered."""
    pids = [node.pid for node in nodes]

    def registered() -> list[ObjectId] | None:
        entries = {e["pid"]: e["_id"] for e in scheduler.store.live_nodes() if e.get("pid") in pids}
        return [entries[pid] for pid in pids] if len(entries) == len(pids) else None

    found: list[ObjectId] = wait_until(registered, timeout=30, what="every node in the registry")
    return found


def _processing(scheduler: Scheduler, job: Process) -> None:
    wait_until(lambda: scheduler.get_job(job.id).status == JobStatus.PROCESSING, timeout=30, what="its start")


def _warm_up(scheduler: Scheduler, nodes: list[Node]) -> list[ObjectId]:
    """Every node registered, serving, and knowing the others: one job preferring each runs to its end."""
    ids = _node_ids(scheduler, nodes)
    wait_for_peers(nodes)
    scheduler.wait_for([scheduler.add_job(NOOP, id=id_preferring(i, ids)) for i in ids], timeout=30)
    return ids


def _manager(node: Node) -> psutil.Process:
    """A node's worker manager: its one child process."""
    children: list[psutil.Process] = wait_until(
        lambda: psutil.Process(node.pid).children(), timeout=10, what="the worker manager"
    )
    assert len(children) == 1, children
    return children[0]


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


# -- found, and fixed -------------------------------------------------------------------------------------------------


def test_a_busy_node_holding_a_ripe_job_of_another_node_does_not_spin(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    a, b = start_node(*ONE_WORKER), start_node(*ONE_WORKER)
    ids = _warm_up(scheduler, [a, b])
    busy = [scheduler.add_job(SLEEP, {"seconds": 5}, id=id_preferring(i, ids, SLEEP)) for i in ids]
    for job in busy:
        _processing(scheduler, job)
    waiting = scheduler.add_job(NOOP, id=id_preferring(ids[0], ids))  # b defers it; it ripens after the grace
    time.sleep(GRACE_SECONDS + 0.2)
    before, started = _cpu_seconds(b.pid), time.monotonic()
    time.sleep(1.5)  # a window of CPU time: nothing to poll for
    used = (_cpu_seconds(b.pid) - before) / (time.monotonic() - started)
    assert scheduler.get_job(waiting.id).status == JobStatus.WAITING  # both nodes still busy: the test holds
    assert used < 0.2, f"node b used {used:.2f} s of CPU per second while it only waited for a worker"


def test_a_job_whose_preferred_node_is_busy_is_not_overtaken_by_a_later_lower_priority_job(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    a, b = start_node(*ONE_WORKER), start_node(*ONE_WORKER)
    ids = _warm_up(scheduler, [a, b])
    _processing(scheduler, scheduler.add_job(SLEEP, {"seconds": 5}, id=id_preferring(ids[0], ids, SLEEP)))
    # b is idle: the high-priority job, preferred by the busy a, is b's to take after the grace delay.
    high = scheduler.add_job(NOOP, priority=50, id=id_preferring(ids[0], ids))
    time.sleep(0.05)
    low = scheduler.add_job(SLEEP, {"seconds": 3}, priority=-50, id=id_preferring(ids[1], ids, SLEEP))
    scheduler.wait_for([high, low], timeout=30)
    assert start_delay(scheduler, high.id) <= TAKEOVER_SECONDS
    high_started, low_started = scheduler.get_job(high.id).started, scheduler.get_job(low.id).started
    assert high_started is not None and low_started is not None
    assert high_started <= low_started


def test_a_force_spawn_job_whose_preferred_manager_is_paused_starts_on_a_busy_node(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    a, b = start_node(*ONE_WORKER), start_node(*ONE_WORKER)
    ids = _warm_up(scheduler, [a, b])
    _processing(scheduler, scheduler.add_job(SLEEP, {"seconds": 5}, id=id_preferring(ids[1], ids, SLEEP)))
    manager = _manager(a)
    manager.suspend()  # a's node renews its entry: a stays the preferred node of its jobs
    try:
        forced = scheduler.add_job(NOOP, force_spawn=True, id=id_preferring(ids[0], ids))
        forced.wait(timeout=30)
        assert forced.status == JobStatus.DONE
        assert start_delay(scheduler, forced.id) <= TAKEOVER_SECONDS
    finally:
        manager.resume()


# -- what held -----------------------------------------------------------------------------------------------------


def test_fake_live_nodes_that_never_claim_cost_at_most_the_grace_delay(
    scheduler: Scheduler, db: Database[dict[str, Any]], start_node: Callable[..., Node]
) -> None:
    node = start_node(*ONE_WORKER)
    _node_ids(scheduler, [node])
    far = datetime.now(timezone.utc) + timedelta(days=3650)
    fakes = [ObjectId() for _ in range(6)]  # alive ten years from now: live forever in every view, never claim
    db[NODE_REGISTRY].insert_many(
        [{"_id": f, "modules": ["sample_jobs"], "alive": far, "expires": far, "lease": 1e9} for f in fakes]
    )
    wait_for_peers([node], others=len(fakes))  # the inserts wake it (PEERS), else its next registry read
    jobs = [scheduler.add_job(NOOP) for _ in range(8)]
    scheduler.wait_for(jobs, timeout=30)
    delays = [start_delay(scheduler, p.id) for p in jobs]
    assert all(scheduler.get_job(p.id).status == JobStatus.DONE for p in jobs)
    assert max(delays) <= TAKEOVER_SECONDS, delays
    assert max(delays) >= GRACE_SECONDS  # the fakes did rank first for some: the test proves something


def test_thousands_of_registry_entries_delay_no_job_past_the_last_rank(
    scheduler: Scheduler, db: Database[dict[str, Any]], start_node: Callable[..., Node]
) -> None:
    far = datetime.now(timezone.utc) + timedelta(days=1)
    db[NODE_REGISTRY].insert_many(
        [{"_id": ObjectId(), "modules": ["sample_jobs"], "alive": far, "expires": far} for _ in range(2000)]
    )
    a, b = start_node(*ONE_WORKER), start_node(*ONE_WORKER)
    _node_ids(scheduler, [a, b])
    wait_for_peers([a, b], others=2001)
    # The node's DEBUG line counts them all and names a few: one line, never thousands of ids.
    lines = [line for node in (a, b) for line in node.output().splitlines() if "live nodes besides this one" in line]
    assert lines and max(len(line) for line in lines) < 600, max(lines, key=len)[:300]
    jobs = []
    for _ in range(6):
        jobs.append(scheduler.add_job(NOOP))
        time.sleep(0.1)
    scheduler.wait_for(jobs, timeout=30)
    delays = [start_delay(scheduler, p.id) for p in jobs]
    assert max(delays) <= TAKEOVER_SECONDS, delays


def test_a_job_preferring_a_node_whose_manager_was_sigkilled_starts_once(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    a, b = start_node(*ONE_WORKER), start_node(*ONE_WORKER)
    ids = _warm_up(scheduler, [a, b])
    os.kill(_manager(a).pid, signal.SIGKILL)  # a starts a new one; until it reports, a knows of no free worker
    runs = tmp_path / "runs"
    count = "sample_jobs:CountRun"
    jobs = [scheduler.add_job(count, {"path": str(runs)}, id=id_preferring(ids[0], ids, count)) for _ in range(4)]
    scheduler.wait_for(jobs, timeout=30)
    for p in jobs:
        assert scheduler.get_job(p.id).status == JobStatus.DONE
        assert start_delay(scheduler, p.id) <= TAKEOVER_SECONDS
    ran = [line.split()[0] for line in runs.read_text().splitlines()]
    assert sorted(ran) == sorted(str(p.id) for p in jobs)  # each once


@pytest.mark.parametrize(
    "pool",
    [ONE_WORKER, ("--pm", "dynamic", "--min-children", "0", "--max-children", "1"), ("--pm", "ondemand")],
    ids=["static", "dynamic-min-0", "ondemand"],
)
def test_jobs_preferring_a_node_whose_manager_is_paused_start_on_another_pool(
    scheduler: Scheduler, start_node: Callable[..., Node], pool: tuple[str, ...]
) -> None:
    a, b = start_node(*ONE_WORKER), start_node(*pool)
    ids = _warm_up(scheduler, [a, b])
    manager = _manager(a)
    manager.suspend()  # a's node stays live in the registry and keeps handing its jobs to a manager that sleeps
    try:
        jobs = [scheduler.add_job(NOOP, id=id_preferring(ids[0], ids)) for _ in range(3)]
        scheduler.wait_for(jobs, timeout=30)
        assert all(scheduler.get_job(p.id).status == JobStatus.DONE for p in jobs)
        delays = [start_delay(scheduler, p.id) for p in jobs]
        # One after the other on b's one worker (ondemand: up to max_children, 5 by default, at once).
        assert max(delays) <= TAKEOVER_SECONDS + 0.5, delays
    finally:
        manager.resume()


def test_held_jobs_of_several_nodes_start_after_a_resume(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    a, b = start_node(*ONE_WORKER), start_node(*ONE_WORKER)
    ids = _warm_up(scheduler, [a, b])
    scheduler.pause(NOOP)
    jobs = [scheduler.add_job(NOOP, id=id_preferring(i, ids)) for i in ids for _ in range(2)]
    time.sleep(GRACE_SECONDS + 0.4)  # past every grace: each node holds every job (paused), deferred or not
    assert all(scheduler.get_job(p.id).status == JobStatus.WAITING for p in jobs)
    resumed = time.monotonic()
    scheduler.resume(NOOP)
    scheduler.wait_for(jobs, timeout=30)
    # Two jobs per node, one worker each: the second waits for the first (a no-op) on its own node or the other.
    assert time.monotonic() - resumed <= TAKEOVER_SECONDS + 1.0
    assert all(scheduler.get_job(p.id).status == JobStatus.DONE for p in jobs)


def test_two_burst_nodes_run_every_job_and_exit(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    jobs = [scheduler.add_job(NOOP) for _ in range(10)]
    nodes = [start_node("--burst", *ONE_WORKER) for _ in range(2)]
    for node in nodes:
        assert node.proc.wait(60) == 0, node.output()[-2000:]
    assert all(scheduler.get_job(p.id).status == JobStatus.DONE for p in jobs)
