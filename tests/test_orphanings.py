"""SPEC 4: orphanings count dead processes only. A run put back because its node could not reach the server (an
outage, a partition, a pause) never counts toward the three orphanings that fail a job; a node that dies while it
runs the job does, whoever puts the run back.

A sweep (another node puts back a run whose lease ran out) cannot tell yet whether the owner died: it stores no
count, and its release event counts as an orphaning until the owner, alive, vouches for it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.database import Database

from helpers import TESTS_DIR, Node, Recorder, stop_nodes, unindexed, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import NO_WORKER, NODE_REGISTRY, KillReason
from taskscheduler.core import lifecycle as lifecycle_module
from taskscheduler.core.lifecycle import Change
from taskscheduler.node.nodeproc import spawn_node
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import STATUS_UNKNOWN

LEASE = 30.0
SWEPT = "its node stopped renewing the lease"
ORPHANED_ERROR = "taskscheduler.errors.OrphanedJobError"
#: What a server outage fails: every read and write a node makes (``hello`` still answers, as a socket that
#: connects but whose commands are cut would: the test's own client turns the failpoint off with it).
OUTAGE_COMMANDS = ["find", "aggregate", "getMore", "insert", "update", "findAndModify", "delete"]


def sweep(scheduler: Scheduler, job_id: ObjectId) -> tuple[ObjectId, Change]:
    """A new worker claims the job's run; another node then sweeps it (its lease ran out, the owner is silent)."""
    worker = ObjectId()
    assert scheduler.store.claim(job_id, worker, LEASE) is not None
    doc = scheduler.store.find_job(job_id)  # as the sweeper's query finds it: with the lease end on the server
    assert doc is not None
    return worker, scheduler.lifecycle.release_orphan(doc, reason=SWEPT)


def swept_back(scheduler: Scheduler, job_id: ObjectId) -> dict[ObjectId, bool]:
    """worker -> whether its owner vouched for it, for every sweep of the job."""
    return {e["worker"]: e["sweep"]["back"] for e in scheduler.store.job_events(job_id) if "sweep" in e}


def owns(scheduler: Scheduler, job_id: ObjectId, worker: ObjectId) -> bool:
    job = scheduler.store.find_job(job_id)
    return job["status"] == JobStatus.PROCESSING and job["worker"] == worker


def settled(scheduler: Scheduler, job_id: ObjectId, worker: ObjectId) -> bool:
    """The worker's claim was put back, and that counts as no death: its owner vouched for the sweep (or put the
    run back itself)."""
    put_back = (JobStatus.WAITING, JobStatus.POSTPONED)  # POSTPONED: held for a verdict
    releases = [e for e in scheduler.store.job_events(job_id) if e["status"] in put_back and e["worker"] == worker]
    return bool(releases) and all(e.get("sweep", {"back": True})["back"] for e in releases)


# -- the counting rule, against the store ---------------------------------------------------------------------------


@pytest.fixture
def sweeps_confirmed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counting rule alone: a sweep is evidence at once (not after SWEEP_CONFIRM_LEASES leases)."""
    monkeypatch.setattr(lifecycle_module, "SWEEP_CONFIRM_LEASES", 0.0)


def held(scheduler: Scheduler, job_id: ObjectId) -> dict[str, Any]:
    """The job, held for a verdict after a sweep: POSTPONED, naming the swept worker, not claimable."""
    job = scheduler.store.find_job(job_id)
    assert job["status"] == JobStatus.POSTPONED and job["worker"] != NO_WORKER, job
    assert scheduler.store.claim(job_id, ObjectId(), LEASE) is None  # the run does not go again meanwhile
    return job


def test_a_fresh_sweep_is_no_evidence_until_its_owner_had_time_to_vouch(scheduler: Scheduler) -> None:
    """After an outage the sweepers and the cut-off owners come back at once: a sweep younger than
    SWEEP_CONFIRM_LEASES leases does not count yet, so two quick sweeps and a third never fail the job at once.
    The third is held until its owners had time to vouch; they were only cut off, so it runs again."""
    p = scheduler.add_job("sample_jobs:Noop")
    owners = []
    for _ in range(3):
        owner, change = sweep(scheduler, p.id)
        assert change.record()
        owners.append(owner)
    doc = held(scheduler, p.id)
    assert doc["options"]["at"] >= time.time() + 2 * LEASE  # SWEEP_CONFIRM_LEASES leases (plus a second)
    for owner in owners:  # each comes back, finds its run put back, and vouches
        scheduler.lifecycle.after_kill(p.id, owner, 1, KillReason.LOST, 0).record()
    assert scheduler.lifecycle.unpostpone(doc) is not None  # the verdict, once due: no death
    job = scheduler.store.find_job(p.id)
    assert (job["status"], job["worker"], job["run"]) == (JobStatus.WAITING, NO_WORKER, 1)
    due = [e for e in scheduler.store.job_events(p.id) if e["status"] == JobStatus.WAITING and not e.get("error")]
    assert len(due) == 1 and job["change"] == due[0]["_id"]


def test_a_held_run_whose_owners_never_vouch_fails_at_its_third_orphaning(scheduler: Scheduler) -> None:
    """SPEC 4: the third orphaning fails the run: three nodes died with it in quick succession, and it never
    runs a fourth time. Every node due to decide races: the verdict is recorded once."""
    p = scheduler.add_job("sample_jobs:Noop")
    for _ in range(3):
        third, change = sweep(scheduler, p.id)
        assert change.record()
    doc = held(scheduler, p.id)
    seen: list[str] = []
    scheduler.on("*", lambda name, job: seen.append(name.removeprefix("taskscheduler.on")))
    assert scheduler.lifecycle.unpostpone(doc) is None  # a node decides
    assert scheduler.lifecycle.unpostpone(doc) is None  # and another, a moment later
    failed = scheduler.get_job(p.id)
    assert failed.status == JobStatus.FAILED and failed.run == 1 and failed.error is not None
    assert failed.error == {
        "class": ORPHANED_ERROR,
        "message": f"job orphaned 3 times; last: {SWEPT}",
        "traceback": "",
    }
    assert [(r["status"], r["worker"]) for r in failed.runs()] == [(JobStatus.FAILED, third)]
    ends = [e for e in scheduler.store.job_events(p.id) if e["status"] == JobStatus.FAILED]
    assert len(ends) == 1 and seen.count("Failed") <= 1


def test_a_held_run_that_is_canceled_is_not_decided(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    for _ in range(3):
        _, change = sweep(scheduler, p.id)
        assert change.record()
    doc = held(scheduler, p.id)
    scheduler.cancel_job(p.id)
    assert scheduler.lifecycle.unpostpone(doc) is None
    assert scheduler.get_job(p.id).status == JobStatus.CANCELED
    assert [e["status"] for e in scheduler.store.job_events(p.id) if e["status"] >= JobStatus.DONE] == [
        JobStatus.CANCELED
    ]


@pytest.mark.usefixtures("sweeps_confirmed_at_once")
def test_a_sweep_counts_until_its_owner_vouches_for_it(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    first, change = sweep(scheduler, p.id)
    assert change.record()
    job = scheduler.store.find_job(p.id)
    assert job["status"] == JobStatus.WAITING and job["orphaned"] == 0  # a sweep stores no count
    (event,) = [e for e in scheduler.store.job_events(p.id) if "sweep" in e]
    assert event["status"] == JobStatus.WAITING and event["worker"] == first and event["sweep"]["back"] is False
    assert event["error"]["message"] == SWEPT
    second, change = sweep(scheduler, p.id)
    assert change.record()  # two orphanings so far: neither owner has shown up again
    # The first owner was only cut off: back, its node records the run it fenced, finds it put back, vouches.
    scheduler.lifecycle.after_kill(p.id, first, 1, "lost", 0).record()
    assert swept_back(scheduler, p.id) == {first: True, second: False}
    third, change = sweep(scheduler, p.id)
    assert change.record()
    assert scheduler.store.find_job(p.id)["status"] == JobStatus.WAITING  # 1 confirmed: the second
    fourth, change = sweep(scheduler, p.id)
    assert change.record()
    # 2 confirmed (the second, the third): the fourth's owner may be only paused, so it is no death yet, and the
    # run is held until it had time to vouch. It never does: the verdict is the third orphaning.
    doc = held(scheduler, p.id)
    assert scheduler.lifecycle.unpostpone(doc) is None
    failed = scheduler.get_job(p.id)
    assert failed.status == JobStatus.FAILED and failed.run == 1
    assert failed.error is not None and failed.error["class"] == ORPHANED_ERROR
    assert failed.error["message"] == f"job orphaned 3 times; last: {SWEPT}"
    assert scheduler.store.find_job(p.id)["orphaned"] == 3
    assert [(r["status"], r["worker"]) for r in failed.runs()] == [(JobStatus.FAILED, fourth)]


@pytest.mark.usefixtures("sweeps_confirmed_at_once")
def test_two_deaths_and_then_an_owner_cut_off_leave_the_run_waiting(scheduler: Scheduler) -> None:
    """SPEC 4, orphanings count dead processes only: after two confirmed deaths, the sweep of a run whose owner
    is only paused or cut off puts it back, and when that owner comes back and vouches, its sweep never counts."""
    p = scheduler.add_job("sample_jobs:Noop")
    for _ in range(2):
        _, change = sweep(scheduler, p.id)
        assert change.record()
    paused, change = sweep(scheduler, p.id)
    assert change.record()
    doc = held(scheduler, p.id)  # it would be the third: held until its owner had time to vouch
    scheduler.lifecycle.after_kill(p.id, paused, 1, KillReason.LOST, 0).record()  # its node comes back, fenced
    assert swept_back(scheduler, p.id)[paused] is True
    assert scheduler.lifecycle.unpostpone(doc) is not None  # the verdict: no death, the run goes again
    worker = ObjectId()
    assert scheduler.store.claim(p.id, worker, LEASE) is not None
    assert scheduler.lifecycle.end(scheduler.store.find_job(p.id), worker, JobStatus.DONE).record()
    assert scheduler.get_job(p.id).status == JobStatus.DONE


def test_an_owner_that_ends_its_run_after_a_sweep_vouches_for_it(scheduler: Scheduler) -> None:
    """A worker whose job returned while the server was out of reach records the end once it is back, and finds
    the run put back: it lives, so its sweep was no death."""
    p = scheduler.add_job("sample_jobs:Noop")
    first, change = sweep(scheduler, p.id)
    running = scheduler.store.find_job(p.id)
    assert change.record()
    assert scheduler.lifecycle.end(running, first, JobStatus.DONE).record() is False
    assert swept_back(scheduler, p.id) == {first: True}
    for _ in range(2):
        _, change = sweep(scheduler, p.id)
        assert change.record()
    assert scheduler.store.find_job(p.id)["status"] == JobStatus.WAITING  # 2 orphanings, not 3


@pytest.mark.usefixtures("sweeps_confirmed_at_once")
def test_deaths_a_node_saw_and_unvouched_sweeps_add_up(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    first, change = sweep(scheduler, p.id)
    assert change.record()
    # The node saw its worker die, but too late: the sweep was first. A death vouches for nothing.
    scheduler.lifecycle.after_kill(p.id, first, 1, KillReason.DIED, 0, "worker process died (signal 9)").record()
    second, change = sweep(scheduler, p.id)
    assert change.record()
    assert swept_back(scheduler, p.id) == {first: False, second: False}
    worker = ObjectId()
    assert scheduler.store.claim(p.id, worker, LEASE) is not None
    doc = scheduler.store.find_job(p.id)
    died = "worker process died (signal 9)"
    assert scheduler.lifecycle.release(doc, worker, orphaned=True, reason=died).record()
    # Two of the three are sweeps, which only a verdict decides: held until their owners had time to vouch.
    assert scheduler.lifecycle.unpostpone(held(scheduler, p.id)) is None
    failed = scheduler.get_job(p.id)
    assert failed.status == JobStatus.FAILED and failed.error is not None
    assert failed.error["message"] == f"job orphaned 3 times; last: {died}"


def test_a_death_seen_by_its_node_is_stored_and_a_fenced_release_counts_nothing(scheduler: Scheduler) -> None:
    p = scheduler.add_job("sample_jobs:Noop")
    worker = ObjectId()
    assert scheduler.store.claim(p.id, worker, LEASE) is not None
    scheduler.lifecycle.after_kill(p.id, worker, 1, KillReason.DIED, 0, "worker process died (signal 9)").record()
    assert scheduler.store.find_job(p.id)["orphaned"] == 1
    worker = ObjectId()
    assert scheduler.store.claim(p.id, worker, LEASE) is not None
    scheduler.lifecycle.after_kill(p.id, worker, 1, "lost", 0).record()
    job = scheduler.store.find_job(p.id)
    assert job["status"] == JobStatus.WAITING and job["orphaned"] == 1
    assert swept_back(scheduler, p.id) == {}  # neither was a sweep


def test_attempts_of_one_sweep_count_once(scheduler: Scheduler) -> None:
    """A sweep whose write got no answer is prepared again next round: both attempts' events may be stored."""
    p = scheduler.add_job("sample_jobs:Noop")
    first, attempt = sweep(scheduler, p.id)
    scheduler.store.insert_events(attempt.events)  # written, then the connection dropped before the update
    doc = scheduler.store.find_job(p.id)
    assert scheduler.lifecycle.release_orphan(doc, reason=SWEPT).record()
    assert len([e for e in scheduler.store.job_events(p.id) if "sweep" in e]) == 2
    _, change = sweep(scheduler, p.id)
    assert change.record()
    assert scheduler.store.find_job(p.id)["status"] == JobStatus.WAITING  # 2 orphanings, not 3


def test_sweeping_and_vouching_are_served_by_indexes(recorded: tuple[Database[dict[str, Any]], Recorder]) -> None:
    db, recorder = recorded
    s = Scheduler(db)
    p = s.add_job("test")
    worker, change = sweep(s, p.id)
    recorder.commands.clear()
    assert change.record()
    s.lifecycle.after_kill(p.id, worker, 1, "lost", 0).record()
    _, change = sweep(s, p.id)
    assert change.record()
    assert swept_back(s, p.id)[worker] is True
    count, slow = unindexed(db, recorder.commands)
    assert count >= 4
    assert slow == [], "\n".join(map(str, slow))


# -- across real queue nodes ------------------------------------------------------------------------------------------


@pytest.fixture
def start_named_node(server: EmbeddedServer, db_name: str, tmp_path: Path) -> Iterator[Callable[[str], Node]]:
    """A queue node whose connections carry an application name, so a failpoint can cut off that node alone."""
    nodes: list[Node] = []

    def start(app: str) -> Node:
        log = tmp_path / f"{app}.log"
        proc = spawn_node(
            f"{server.uri}&appName={app}",
            db_name,
            ["sample_jobs"],
            ["--orphaned-timeout", "2"],
            log=str(log),
            env={"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])},
            log_level="DEBUG",
        )
        nodes.append(Node(proc, log))
        return nodes[-1]

    yield start
    stop_nodes(nodes)


def _failpoint(client: MongoClient[dict[str, Any]], app: str | None) -> None:
    data: dict[str, Any] = {"failCommands": OUTAGE_COMMANDS, "closeConnection": True}
    if app is not None:
        data["appName"] = app
    client.admin.command("configureFailPoint", "failCommand", mode="alwaysOn", data=data)


def _owner(db: Database[dict[str, Any]], worker: ObjectId, apps: dict[int, str]) -> str | None:
    entry = db[NODE_REGISTRY].find_one({"workers._id": worker}, {"pid": 1})
    return apps.get(entry["pid"]) if entry else None


def test_outages_longer_than_the_lease_never_fail_a_job(
    scheduler: Scheduler,
    start_named_node: Callable[[str], Node],
    client: MongoClient[dict[str, Any]],
    db: Database[dict[str, Any]],
) -> None:
    """Four outages of the whole cluster, each longer than orphaned_timeout (2 s); the job's own node reconnects
    last each time, so the other node puts the run back. Nobody dies: the job never fails and ends DONE."""
    nodes = {name: start_named_node(name) for name in ("node_a", "node_b")}
    apps = {node.pid: name for name, node in nodes.items()}
    p = scheduler.add_job("sample_jobs:Sleep", {"seconds": 6})
    swept: list[ObjectId] = []
    try:
        for outage in range(4):
            job = wait_until(
                lambda: (d := scheduler.store.find_job(p.id))["status"] == JobStatus.PROCESSING
                and d["worker"] not in swept
                and d,
                30,
                what=f"run attempt {outage + 1}",
            )
            worker = job["worker"]
            owner = wait_until(lambda w=worker: _owner(db, w, apps), 10, what="the owner in the registry")
            _failpoint(client, None)
            time.sleep(2.5)  # the outage itself (the fault, not a wait for anything): longer than the lease
            _failpoint(client, owner)  # the others are back; the owner still cut off
            wait_until(lambda w=worker: not owns(scheduler, p.id, w), 20, what="the sweep")
            client.admin.command("configureFailPoint", "failCommand", mode="off")
            swept.append(worker)
            # The owner is back: it finds the run it fenced put back, and vouches for the sweep.
            wait_until(
                lambda w=worker: settled(scheduler, p.id, w) or scheduler.get_job(p.id).status == JobStatus.FAILED,
                20,
                what="the owner to vouch",
            )
            assert scheduler.get_job(p.id).status != JobStatus.FAILED, f"failed after outage {outage + 1}"
    finally:
        client.admin.command("configureFailPoint", "failCommand", mode="off")
    p.wait(timeout=60)
    assert p.status == JobStatus.DONE and p.run == 1, [n.output()[-3000:] for n in nodes.values()]
    assert swept_back(scheduler, p.id) == dict.fromkeys(swept, True)
    events = scheduler.store.job_events(p.id)
    assert [JobStatus(e["status"]).name for e in events] == ["PROCESSING", "WAITING"] * 4 + ["PROCESSING", "DONE"]
    assert all(e["error"]["message"] == SWEPT for e in events if e["status"] == JobStatus.WAITING)
    assert scheduler.store.find_job(p.id)["orphaned"] == 0
    assert all(node.proc.poll() is None for node in nodes.values())


def test_a_node_killed_again_and_again_with_the_job_fails_it(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The job's node (its whole process group) is SIGKILLed while it runs the job, again and again, a fresh node
    started after each kill: none of the dead owners ever comes back. The third sweep would be the third orphaning
    were the earlier owners dead: the run is held until all had SWEEP_CONFIRM_LEASES leases to vouch, then fails,
    with no further run."""
    pid_file = tmp_path / "pid"
    p = scheduler.add_job("sample_jobs:WritePid", {"path": str(pid_file), "seconds": 60})
    node = start_node()
    kills = 0
    while p.refresh().status != JobStatus.FAILED and kills < 6:
        wait_until(
            lambda: (pid_file.exists() and pid_file.read_text()) or p.refresh().status == JobStatus.FAILED,
            30,
            what=f"run attempt {kills + 1}",
        )
        if p.status == JobStatus.FAILED:
            break
        pid_file.unlink()
        node.kill_group()
        kills += 1
        node = start_node()
    p.wait(timeout=60)
    assert kills == 3  # held after the third sweep, then failed: never a fourth run
    assert p.status == JobStatus.FAILED and p.run == 1
    assert p.error is not None and p.error["class"] == ORPHANED_ERROR
    assert p.error["message"] == f"job orphaned 3 times; last: {SWEPT}"
    assert [JobStatus(r["status"]) for r in p.runs()] == [JobStatus.FAILED]
    assert not any(swept_back(scheduler, p.id).values())
    assert not pid_file.exists()  # no run after the failing sweep


@pytest.mark.usefixtures("sweeps_confirmed_at_once")
def test_a_verdicts_retry_reaches_the_nodes_although_the_status_stays_postponed(scheduler: Scheduler) -> None:
    """Held POSTPONED, failed by its verdict with a retry due later: POSTPONED again, run 2. The status did not
    change, so a node's stream (filtered on status changes) missed it and the retry never ran (chaos seed 15)."""
    p = scheduler.add_job("sample_jobs:Noop", retry=1, retry_interval=60)
    for _ in range(3):
        _, change = sweep(scheduler, p.id)
        assert change.record()
    doc = held(scheduler, p.id)
    routed = tuple(int(s) for s in (JobStatus.WAITING, JobStatus.POSTPONED, JobStatus.CANCELED, JobStatus.PROCESSING))
    with scheduler.store.status_feed(lookup=False, statuses=routed, flow=True) as feed:
        assert scheduler.lifecycle.unpostpone(doc) is None  # the verdict: FAILED, run 2 POSTPONED
        stored = scheduler.store.find_job(p.id)
        assert (stored["status"], stored["run"]) == (JobStatus.POSTPONED, 2)
        seen = wait_until(lambda: feed.poll(0.2), timeout=10, what="the run-2 change on the node's stream")
    assert seen.job_id == p.id and seen.status == STATUS_UNKNOWN and seen.run == 2
