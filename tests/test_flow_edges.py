"""Flow control (SPEC 8: dependencies, limits, pauses; SPEC 9: burst, run_jobs) at its edges: hostile stored
controls, an outage in the middle of a release, limits present at a node's start or set while runs go, slots of
runs killed right after their claim, burst with jobs that cannot start, add_chain with a taken id."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId

from helpers import TESTS_DIR, Node
from taskscheduler import JobStatus, Scheduler
from taskscheduler.errors import InvalidArgumentError, ServerUnavailableError
from taskscheduler.node.blocked import Blocked
from taskscheduler.node.slots import Slots
from taskscheduler.testing import run_jobs

EXIT_SECONDS = 30


def _flow(scheduler: Scheduler) -> Any:
    return scheduler.store.flow


# -- hostile documents in <job_queue>.flow --


def test_hostile_holders_in_a_limit_do_not_break_the_client_calls(scheduler: Scheduler) -> None:
    """SPEC 2 (malformed stored data shows instead of failing) / SPEC 8 limits() and paused(): one limit document
    whose ``holders`` is not an array makes Controls.from_docs raise TypeError, so limits(), paused() (and every
    node's _read_flow) fail."""
    _flow(scheduler).insert_one({"_id": "limit:x", "kind": "limit", "key": "x", "concurrency": 1, "holders": 5})
    scheduler.pause("sample_jobs:Noop")
    assert scheduler.paused() == ["sample_jobs:Noop"]
    assert "x" in scheduler.limits()


def test_hostile_holders_in_a_limit_do_not_stop_a_node_from_running_waiting_jobs(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 2 "Malformed documents never stop a node" and SPEC 4 latency ("a WAITING job starts within 1 s"): with
    a limit document whose ``holders`` is not an array, the node's _read_flow raises on every round, so the start-up
    scan (gated on it in Queue._iterate) never runs, and jobs that were WAITING before the node started never run."""
    job = scheduler.add_job("sample_jobs:Noop")  # under no limit at all
    _flow(scheduler).insert_one({"_id": "limit:x", "kind": "limit", "key": "x", "concurrency": 1, "holders": 5})
    start_node()
    scheduler.wait_for([job], timeout=15)
    assert scheduler.get_job(job.id).status == JobStatus.DONE


def test_a_hostile_rate_in_one_limit_does_not_hold_back_unrelated_jobs(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 2 "every other job keeps running": a limit document whose rate count is not a number makes
    Limit.full raise ValueError inside _hand_over; in the start-up scan that aborts the scan at the first job under
    that key, so every job the scan meets after it is never handed over (the scan is retried and aborts again)."""
    _flow(scheduler).insert_one(
        {
            "_id": "limit:k",
            "kind": "limit",
            "key": "k",
            "concurrency": None,
            "rate": {"count": "many", "seconds": 60},
            "holders": [],
            "starts": [],
        }
    )
    scheduler.add_job("sample_jobs:Noop", limit_key="k")
    others = [scheduler.add_job("sample_jobs:Echo", n) for n in range(3)]  # under no limit
    start_node()
    scheduler.wait_for(others, timeout=15)
    assert all(scheduler.get_job(p.id).status == JobStatus.DONE for p in others)


def test_a_hostile_holder_entry_is_dropped_not_a_worker_crash(scheduler: Scheduler) -> None:
    """SPEC 8 "A slot held by a run whose process died is freed ... (never leaked)" and SPEC 2 (stored data never
    crashes a worker): a holder without a ``job`` is judged stale by node/slots._stale, and then
    FlowControls.drop_holders indexes ``holder["job"]``: KeyError out of Worker.run (the worker process dies)."""
    scheduler.set_limit("k", concurrency=1)
    _flow(scheduler).update_one({"_id": "limit:k"}, {"$set": {"holders": [{"worker": ObjectId()}]}})
    job = scheduler.add_job("sample_jobs:Noop", limit_key="k")
    slots = Slots(scheduler.store, ObjectId(), logging.getLogger("test"))
    assert slots.take(job.id, ["k"])


def test_a_non_document_holder_is_dropped_not_a_worker_crash(scheduler: Scheduler) -> None:
    """As above, for a holder that is not a document at all: FlowControls.take_slot's last line calls ``h.get`` on
    it (AttributeError), while the node's snapshot (Controls.from_docs) ignores it and keeps handing the job over:
    across a node, every worker it is handed to dies with a traceback and the job never runs (a fork loop)."""
    scheduler.set_limit("k", concurrency=1)
    _flow(scheduler).update_one({"_id": "limit:k"}, {"$set": {"holders": [5]}})
    job = scheduler.add_job("sample_jobs:Noop", limit_key="k")
    slots = Slots(scheduler.store, ObjectId(), logging.getLogger("test"))
    assert slots.take(job.id, ["k"])


# -- dependencies --


def test_a_chain_with_a_duplicate_id_writes_nothing(scheduler: Scheduler) -> None:
    """SPEC 2 job options: "a duplicate [id] raises InvalidArgumentError" with "nothing written" (and add_chain's
    own promise: every step is checked before anything is written): a chain whose second step reuses an existing
    id raises only at its insert, after the first step was stored: a lone first step runs without its chain."""
    existing = scheduler.add_job("sample_jobs:Noop")
    before = scheduler.store.jobs.count_documents({})
    with pytest.raises(InvalidArgumentError):
        scheduler.add_chain([("sample_jobs:Echo", "first"), ("sample_jobs:Noop", None, {"id": existing.id})])
    assert scheduler.store.jobs.count_documents({}) == before


def test_a_ready_dependent_is_not_lost_when_cancelling_another_fails(scheduler: Scheduler, monkeypatch: Any) -> None:
    """SPEC 8 "A job whose last dependency ends DONE starts within 1 s ... (no lost wake-up)" and SPEC 4 (an outage
    fails no job): Blocked.release pops ready jobs into a local list, then an outage while it cancels another held
    job raises out of it and the popped ready jobs are gone from the node for good (no rescan follows)."""
    done, failed = scheduler.add_job("sample_jobs:Noop"), scheduler.add_job("sample_jobs:Noop")
    ready = scheduler.add_job("sample_jobs:Noop", depends_on=[done])
    doomed = scheduler.add_job("sample_jobs:Noop", depends_on=[failed])
    jobs = scheduler.store.jobs
    # As a worker that recorded these ends and died before cancelling dependents leaves them (int32, same size).
    jobs.update_one({"_id": done.id}, {"$set": {"status": int(JobStatus.DONE)}})
    jobs.update_one({"_id": failed.id}, {"$set": {"status": int(JobStatus.FAILED)}})
    blocked = Blocked(scheduler.lifecycle)
    blocked.hold(scheduler.store.find_job(ready.id))
    blocked.hold(scheduler.store.find_job(doomed.id))

    def outage(*args: Any, **kw: Any) -> bool:
        raise ServerUnavailableError("MongoDB unreachable (simulated)")

    monkeypatch.setattr(scheduler.lifecycle, "cancel", outage)
    assert [doc["_id"] for doc in blocked.release()] == [ready.id]  # released all the same
    assert list(blocked.jobs) == [doomed.id]  # held, to be canceled at a later look
    monkeypatch.undo()
    blocked._next_look = 0.0
    assert blocked.release() == [] and blocked.jobs == {}
    assert scheduler.get_job(doomed.id).status == JobStatus.CANCELED


# -- burst mode --


def test_a_burst_node_does_not_wait_for_a_dependent_of_a_postponed_job(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 9: serve until no job is due or running; "Postponed jobs not yet due do not keep it alive". A WAITING
    job that depends on a job postponed by an hour cannot start before that hour either, yet _end_burst counts it
    as due (store.due_jobs looks at status only), so the batch host hangs for the hour."""
    later = scheduler.add_job("sample_jobs:Noop", at=time.time() + 3600)
    scheduler.add_job("sample_jobs:Noop", depends_on=[later])
    node = start_node("--burst")
    assert node.proc.wait(EXIT_SECONDS) == 0, node.output()[-3000:]


# -- a pause or a limit lets a blocked dependent through --


def _barrier(scheduler: Scheduler) -> None:
    """Run a job of another class, added now, to its end: the node has routed (or held back) every job added
    before it by then, so a check that one of those did not start is a check, not a guess at a delay."""
    assert scheduler.add_job("sample_jobs:Echo", "barrier").wait(timeout=30).status == JobStatus.DONE


def test_a_limit_present_at_node_start_does_not_run_a_dependent_before_its_dependency(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 8 "makes a job start only after every job it depends on ended DONE. Until then it stays WAITING ... and
    no node claims it". At start a node's _read_flow sees every limit as new and scans WAITING jobs into _held
    before _scan has put the dependents into _blocked; _release_held then hands the dependent over (the worker
    checks no dependencies) while its dependency is POSTPONED for an hour."""
    scheduler.set_limit("sample_jobs:Noop", concurrency=5)
    later = scheduler.add_job("sample_jobs:Echo", "later", at=time.time() + 3600)
    dependent = scheduler.add_job("sample_jobs:Noop", depends_on=[later])
    start_node()
    _barrier(scheduler)
    assert scheduler.get_job(dependent.id).status == JobStatus.WAITING, "ran before its dependency"
    assert scheduler.get_job(dependent.id).runs() == []


def test_a_pause_does_not_let_a_dependent_run_before_its_dependency_on_resume(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 8, as above, through a pause: pause('*') before the node starts, a dependent of a postponed job, then
    resume: the dependent (in _held and _blocked both) is handed over by _release_held and runs."""
    scheduler.pause("*")
    later = scheduler.add_job("sample_jobs:Echo", "later", at=time.time() + 3600)
    dependent = scheduler.add_job("sample_jobs:Noop", depends_on=[later])
    start_node()
    time.sleep(1.5)  # the node starts and looks at the jobs while everything is paused (nothing to wait on)
    scheduler.resume("*")
    _barrier(scheduler)
    assert scheduler.get_job(dependent.id).status == JobStatus.WAITING, "ran before its dependency"


# -- limits --


def test_a_concurrency_limit_set_while_runs_are_processing_counts_them(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 8 "concurrency=N: at most N runs under that key are PROCESSING at once in the whole cluster": a limit
    set (or removed and set again: $setOnInsert empties ``holders``) while runs under its key are PROCESSING
    starts with no holders, so new runs start beside them: 3 PROCESSING under concurrency=1."""
    start_node("--max-children", "3")
    running = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 4}) for _ in range(2)]
    deadline = time.monotonic() + 30
    while not all(scheduler.get_job(p.id).status == JobStatus.PROCESSING for p in running):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    scheduler.set_limit("sample_jobs:Sleep", concurrency=1)
    extra = scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.1})
    _barrier(scheduler)
    assert scheduler.get_job(extra.id).status == JobStatus.WAITING, "started beside 2 runs under concurrency=1"


def test_run_jobs_honours_a_rate_limit(scheduler: Scheduler) -> None:
    """SPEC 8 "rate='N/h': at most N runs under that key start in any interval of that length ... in the whole
    cluster" and SPEC 9 (run_jobs runs jobs "through the same lifecycle"): run_jobs ignores limits ("one job runs
    at a time"), so under 1/h it starts both jobs at once (nor does it take the slot nodes count)."""
    scheduler.set_limit("sample_jobs:Echo", rate="1/h")
    first, second = scheduler.add_job("sample_jobs:Echo", 1), scheduler.add_job("sample_jobs:Echo", 2)
    assert [p.id for p in run_jobs(scheduler)] == [first.id]
    assert scheduler.get_job(second.id).status == JobStatus.WAITING


def test_a_slot_of_a_run_killed_after_its_claim_frees_when_the_run_is_orphaned(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Any
) -> None:
    """SPEC 8 "A slot held by a run whose process died is freed when that run is orphaned ...; jobs held back ...
    start within 1 s after a slot frees". A worker SIGKILLed right after its claim (before its manager heard of
    it) leaves its holder; the run is orphaned after the 1 s lease (swept within ~1.5 s), yet node/slots._stale
    keeps the slot of a WAITING job for CLAIM_GRACE_SECONDS (5 s) after it was *taken*, so nothing under the limit
    starts for ~5 s (here: the orphaned job itself, held back by its own dead run's slot)."""
    scheduler.set_limit("k", concurrency=1)
    once = tmp_path / "once"
    once.mkdir()
    env = {"TASKSCHEDULER_FAILPOINTS": "worker.claimed=kill", "TASKSCHEDULER_FAILPOINTS_ONCE": str(once)}
    start_node("--max-children", "2", orphaned_timeout=1.0, env=env)
    added = scheduler.store.clock.now()
    job = scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.2}, limit_key="k")
    scheduler.wait_for([job], timeout=30)
    started = scheduler.get_job(job.id).started  # of the run after the orphaning: its own dead slot held it back
    # lease 1 s + sweep period 0.5 s + the promised 1 s + 1 s of slack (without the limit: about 2 s)
    assert (started - added).total_seconds() < 3.5, f"started {started - added} after the add"


def test_held_jobs_are_not_all_handed_over_at_every_slot_change(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 8 "jobs held back stay WAITING, in priority order, and start within 1 s after a slot frees" (and the
    commands-per-job budget): Queue._release_held judges every held job against the same snapshot, so whenever the
    snapshot shows one free slot (each take and give-back is a flow change) it hands over *every* held job; each
    worker then tries the slot (findAndModify, plus a holders read and a job read when full), fails, and the node
    reads the job back (JobHeldBack). Work grows with held jobs x slot changes: 30 jobs under concurrency=1 cost
    ~465 slot attempts, 60 jobs ~1160."""
    scheduler.set_limit("k", concurrency=1)
    node = start_node("--max-children", "2")
    jobs = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.1}, limit_key="k") for _ in range(30)]
    scheduler.wait_for(jobs, timeout=120)
    attempts = [
        line
        for line in node.output().splitlines()
        if "Command started" in line and '"commandName": "findAndModify"' in line and ".flow" in line
    ]
    assert len(attempts) <= 3 * len(jobs), f"{len(attempts)} slot attempts for {len(jobs)} jobs"


# -- arguments of set_limit / pause / resume at their edges --


@pytest.mark.parametrize("rate", ["99999999999999999999/s", "3000000000/s", "1000000/h"])
def test_a_rate_no_limit_document_can_keep_is_refused_and_nothing_is_written(scheduler: Scheduler, rate: str) -> None:
    """SPEC 8 rate "N/s" and strict arguments (nothing written): a count past 2**63 raised bson's OverflowError;
    one past 2**31 was stored as an int64, which core.flow._limit then calls malformed (a limit the library wrote
    that limits nothing); a count of a million keeps a million start times in one document (16 MB on the dot, and
    each start filters the whole array: 18 s per start on the test server)."""
    with pytest.raises(InvalidArgumentError, match="rate"):
        scheduler.set_limit("k", rate=rate)
    assert _flow(scheduler).count_documents({}) == 0


def test_the_largest_rate_accepted_is_a_working_limit(scheduler: Scheduler) -> None:
    from taskscheduler.core.flow import MAX_RATE_COUNT

    scheduler.set_limit("k", rate=f"{MAX_RATE_COUNT}/h")
    assert scheduler.limits() == {"k": {"concurrency": None, "rate": f"{MAX_RATE_COUNT}/h"}}
    assert Slots(scheduler.store, ObjectId(), logging.getLogger("test")).take(ObjectId(), ["k"])


@pytest.mark.parametrize("call", ["set_limit", "remove_limit", "pause", "resume"])
def test_a_key_that_cannot_be_stored_is_refused_as_invalid(scheduler: Scheduler, call: str) -> None:
    """Strict arguments: a key holding a lone surrogate (no UTF-8 form) passed checked_key and reached bson, which
    raised UnicodeEncodeError out of the call (not a TaskSchedulerError: a CLI or dashboard caller crashed)."""
    args: dict[str, Any] = {"concurrency": 1} if call == "set_limit" else {}
    with pytest.raises(InvalidArgumentError, match="key"):
        getattr(scheduler, call)("bad\ud800key", **args)
    assert _flow(scheduler).count_documents({}) == 0


def test_a_limit_key_option_that_cannot_be_stored_is_refused_as_invalid(scheduler: Scheduler) -> None:
    with pytest.raises(InvalidArgumentError):
        scheduler.add_job("sample_jobs:Noop", limit_key="bad\ud800key")


def test_a_malformed_stored_rate_reaches_no_terminal_as_control_characters(
    scheduler: Scheduler, server: Any, db_name: str
) -> None:
    """SPEC 7 "CLI output never passes control characters or console markup from stored data to the terminal":
    core.flow.rate_text put a stored rate count into the text as it was, and ``taskscheduler limit KEY`` prints that
    text unescaped (a hand-written count of "\\x1b]0;owned\\x07" retitles the operator's terminal)."""
    hostile = {"count": "\x1b]0;owned\x07\x1b[2J", "seconds": 60}
    _flow(scheduler).insert_one({"_id": "limit:k", "kind": "limit", "key": "k", "rate": hostile, "holders": []})
    shown = scheduler.limits()["k"]
    assert shown["malformed"] is True and "\x1b" not in str(shown["rate"])
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=server.uri)
    env["TASKSCHEDULER_DATABASE"] = db_name
    done = subprocess.run(
        [sys.executable, "-m", "taskscheduler", "limit", "k"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"limit on k: .*rate \?/m", done.stdout), done.stdout
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout


def test_a_control_stored_under_another_id_controls_nothing(scheduler: Scheduler) -> None:
    """A pause or limit document whose ``_id`` is not ``<kind>:<key>`` (written by hand): Controls.from_docs took
    its ``key`` field, so paused() and limits() listed a pause and a limit that resume() and remove_limit() (and
    the dashboard's resume button) delete by ``_id`` and so can never remove, and every node held the key's jobs
    for ever (a limit's slots are taken by ``_id``: it never frees)."""
    _flow(scheduler).insert_many(
        [
            {"_id": "pause:other", "kind": "pause", "key": "sample_jobs:Noop"},
            {"_id": "junk", "kind": "limit", "key": "k", "concurrency": 1, "holders": [], "starts": []},
        ]
    )
    scheduler.resume("sample_jobs:Noop")
    scheduler.remove_limit("k")
    assert scheduler.paused() == [] and scheduler.limits() == {}
    job = scheduler.add_job("sample_jobs:Noop", limit_key="k")
    assert [p.id for p in run_jobs(scheduler)] == [job.id]


@pytest.mark.parametrize("broken", [{"holders": 5}, {"starts": "never"}, {"holders": None, "starts": {"a": 1}}])
def test_set_limit_repairs_a_limit_whose_slots_are_broken(scheduler: Scheduler, broken: dict[str, Any]) -> None:
    """SPEC 2 (malformed stored data) / SPEC 8 set_limit: a limit document whose ``holders`` or ``starts`` is not an
    array is shown as malformed and limits nothing, and set_limit (what an operator does to fix it) kept both
    fields as they were: the limit stayed malformed until removed and set again."""
    doc = {"_id": "limit:k", "kind": "limit", "key": "k", "concurrency": 1, "rate": None, "holders": [], "starts": []}
    _flow(scheduler).insert_one({**doc, **broken})
    assert scheduler.limits()["k"].get("malformed") is True
    scheduler.set_limit("k", concurrency=1, rate="5/m")
    assert scheduler.limits() == {"k": {"concurrency": 1, "rate": "5/m"}}
    first, second = (scheduler.add_job("sample_jobs:Noop", limit_key="k") for _ in range(2))
    slots = Slots(scheduler.store, ObjectId(), logging.getLogger("test"))
    assert slots.take(first.id, ["k"]) and not slots.take(second.id, ["k"])  # the limit of 1 holds


def test_a_burst_node_does_not_wait_for_a_cycle_of_dependencies(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 9 burst ("serve until no job of the node's modules is due or running") with stored dependencies that
    form a cycle (written by hand, or see test_dependencies' id reuse): neither job can ever start, yet
    Queue._may_start counted each as busy because the job it waits for is due, so the batch host never stopped."""
    done = [scheduler.add_job("sample_jobs:Noop") for _ in range(2)]
    run_jobs(scheduler)
    first, second = (scheduler.add_job("sample_jobs:Noop", depends_on=[d]) for d in done)
    for job, other in ((first, second), (second, first)):  # the same size: the stored id replaced in place
        scheduler.store.jobs.update_one({"_id": job.id}, {"$set": {"options.depends_on": [other.id]}})
    node = start_node("--burst")
    assert node.proc.wait(EXIT_SECONDS) == 0, node.output()[-3000:]
    assert {scheduler.get_job(j.id).status for j in (first, second)} == {JobStatus.WAITING}


def test_info_counts_the_waiting_jobs_of_a_bounded_number_of_controls(scheduler: Scheduler) -> None:
    from taskscheduler.ops import cluster

    for n in range(cluster.MAX_COUNTED_CONTROLS + 5):
        scheduler.pause(f"key{n:03d}")
    scheduler.add_job("sample_jobs:Noop", limit_key="key000")
    summary = cluster.flow_summary(scheduler)["paused"]
    assert len(summary) == cluster.MAX_COUNTED_CONTROLS + 5  # every pause listed
    assert summary["key000"]["waiting"] == 1
    assert sum(held["waiting"] is None for held in summary.values()) == 5  # only so many counted
