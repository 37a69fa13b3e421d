"""The chaos checks themselves, on made-up histories (no server): each catches what it must and tolerates
what the SPEC allows."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bson
from bson import ObjectId

from chaos.checks import (
    check_children,
    check_dependencies,
    check_doubled_runs,
    check_early_runs,
    check_errors,
    check_executions,
    check_final,
    check_history,
    check_limit,
    check_orphanings,
    check_overlaps,
    check_retries,
    check_retry_count,
    check_run_ends,
)
from chaos.config import CHILD_SLACK, DEPENDENCY_ERROR, ORPHANED_ERROR, RELEASED_ERROR, STALL_OVERLAP, STOP_RETURN_RACE
from chaos.leases import Lease, check_leases, lease_history
from chaos.room import check_room
from chaos.runlog import Execution, Judged, NodeState, RunLog, Spec
from helpers import Node
from taskscheduler import JobStatus

# -- the checks themselves, on made-up histories (no server) ------------------------------------------------------


def _event(run: int, status: JobStatus, worker: ObjectId | None, at: float, error: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"_id": ObjectId(), "run": run, "status": int(status), "worker": worker}
    event["time"] = datetime.fromtimestamp(1_700_000_000 + at, timezone.utc)
    if error:
        event["error"] = {"class": error, "message": "", "traceback": ""}
    return event


def _judge(kind: str, options: dict[str, Any], events: list[dict[str, Any]], runs: list[Execution]) -> Judged:
    ends = [e for e in events if e["status"] >= JobStatus.DONE]
    last = max(ends, key=lambda e: e["run"])
    doc = {"status": last["status"], "run": last["run"], "outcome": last["_id"]}
    j = Judged(Spec(kind, {}, options, ObjectId()), doc, events, runs)
    check_final(j, {})
    check_run_ends(j, sorted(ends, key=lambda e: e["run"]))
    check_retries(j, {})
    check_errors(j)
    check_history(j)
    check_executions(j)
    return j


def _retry_history(w1: ObjectId, w2: ObjectId, w3: ObjectId) -> list[dict[str, Any]]:
    """retry=1, always failing; run 1 first ran on w1, whose worker died (released), then failed on w2."""
    return [
        _event(1, JobStatus.PROCESSING, w1, 0.0),
        _event(1, JobStatus.WAITING, w1, 1.0, RELEASED_ERROR),
        _event(1, JobStatus.PROCESSING, w2, 1.5),
        _event(1, JobStatus.FAILED, w2, 2.0, "ValueError"),
        _event(2, JobStatus.POSTPONED, w2, 2.0),
        _event(2, JobStatus.WAITING, None, 3.0),
        _event(2, JobStatus.PROCESSING, w3, 3.1),
        _event(2, JobStatus.FAILED, w3, 3.5, "ValueError"),
    ]


def _runs(*rows: tuple[str, ObjectId, int, float, float | None, str | None]) -> list[Execution]:
    return [
        Execution(token, "job", str(worker), "n0", 1, start, end or start, run, end, outcome)
        for token, worker, run, start, end, outcome in rows
    ]


def test_checks_accept_a_history_the_spec_allows() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.1, None, None), ("b", w2, 1, 1.6, 1.9, "fail"), ("c", w3, 2, 3.2, 3.4, "fail"))
    j = _judge("retry", {"retry": 1}, _retry_history(w1, w2, w3), runs)
    check_retry_count(j)
    check_overlaps(j, {})
    assert j.problems == [] and j.tolerated == []


def test_checks_catch_lost_and_doubled_retries() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    lost = _judge("retry", {"retry": 2}, _retry_history(w1, w2, w3), [])
    assert any("retry lost" in p for p in lost.problems)
    doubled = _retry_history(w1, w2, w3) + [_event(2, JobStatus.FAILED, w3, 3.6, "ValueError")]
    assert any("more than one end event" in p for p in _judge("retry", {"retry": 1}, doubled, []).problems)


def test_checks_catch_histories_the_spec_forbids() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    unreleased = [e for e in _retry_history(w1, w2, w3) if e["status"] != JobStatus.WAITING or e["worker"] is None]
    problems = _judge("retry", {"retry": 1}, unreleased, []).problems
    assert any("never released nor ended" in p for p in problems)
    twice = _retry_history(w1, w2, w3) + [_event(2, JobStatus.POSTPONED, w1, 1.2)]
    assert any("announced 2 times" in p for p in _judge("retry", {"retry": 1}, twice, []).problems)
    unpostponed = [e for e in _retry_history(w1, w2, w3) if not (e["status"] == JobStatus.WAITING and e["run"] == 2)]
    assert any("claimed while POSTPONED" in p for p in _judge("retry", {"retry": 1}, unpostponed, []).problems)
    missing = _judge("retry", {"retry": 1}, _retry_history(w1, w2, w3), _runs(("x", ObjectId(), 1, 0.5, 0.7, "ok")))
    assert any("has no PROCESSING event" in p for p in missing.problems)
    outage = [_event(1, JobStatus.PROCESSING, w1, 0.0), _event(1, JobStatus.FAILED, w1, 1.0, "ServerUnavailableError")]
    assert any("FAILED with ServerUnavailableError" in p for p in _judge("plain", {}, outage, []).problems)


def test_checks_catch_overlapping_executions_but_a_stalled_nodes_fencing_delay() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.1, None, None), ("b", w2, 1, 0.5, 1.9, "fail"), ("c", w3, 2, 3.2, 3.4, "fail"))
    runs[0].last = 1.2  # "a" still ran 0.8 s after "b" started
    j = _judge("retry", {"retry": 1}, _retry_history(w1, w2, w3), runs)
    check_overlaps(j, {})
    assert any("overlap by 0.70 s" in p for p in j.problems)
    stalled = NodeState("n0", Node(None, Path("/dev/null")), stops=[[0.0, 2.0]])  # type: ignore[arg-type]
    runs[0].last = 0.8
    j = _judge("retry", {"retry": 1}, _retry_history(w1, w2, w3), runs)
    check_overlaps(j, {"n0": stalled})
    assert j.problems == [] and len(j.tolerated) == 1


def test_run_log_counts_a_subprocess_activity_as_its_execution_activity(tmp_path: Path) -> None:
    w1, w2 = ObjectId(), ObjectId()
    log = tmp_path / "runs.log"
    log.write_text(
        f"S a job {w1} n0 10 9 100.0\nR a 1 100.1\nK a 11 1\nC a 11 100.2\nT a 100.3\nC a 11 101.5\n"
        f"S b job {w2} n1 20 19 101.0\nR b 1 101.1\nE b 101.2 ok\n"
    )
    executions = RunLog(log).read()
    a = executions["a"]
    assert a.children == [11] and a.child_last == 101.5 and a.stop == 101.5 and a.end is None
    j = Judged(Spec("plain", {}, {}, ObjectId()), {}, [], list(executions.values()))
    check_overlaps(j, {})
    assert any("overlap by 0.20 s" in p for p in j.problems)  # the subprocess ran on after "b" started


def _change(op: str, job: ObjectId, at: float, **fields: Any) -> dict[str, Any]:
    """A change event of the job collection at ``at`` (seconds after 1_700_000_000, server clock)."""
    change: dict[str, Any] = {"operationType": op, "documentKey": {"_id": job}, "wallTime": _when(at)}
    if op == "insert":
        change["fullDocument"] = dict(fields, _id=job)
    elif op == "update":
        change["updateDescription"] = {"updatedFields": fields}
    return change


def _when(at: float) -> datetime:
    return datetime.fromtimestamp(1_700_000_000 + at, timezone.utc)


def test_checks_catch_job_code_running_after_its_lease_expired() -> None:
    job, w1, w2 = ObjectId(), ObjectId(), ObjectId()
    changes = [
        _change("insert", job, 0.0, status=int(JobStatus.WAITING), worker=None, run=1, expires=_when(0)),
        _change("update", job, 1.0, status=int(JobStatus.PROCESSING), worker=w1, expires=_when(3.0)),
        _change("update", job, 1.5, expires=_when(3.5)),  # renewed
        _change("update", job, 5.0, status=int(JobStatus.WAITING), worker=None),  # swept after it expired
        _change("update", job, 5.1, status=int(JobStatus.PROCESSING), worker=w2, expires=_when(7.1)),
        _change("update", job, 6.0, status=int(JobStatus.DONE)),
    ]
    leases = lease_history(changes)
    assert [(lease.run, lease.claimed, lease.expires, lease.ended) for lease in leases[(str(job), str(w1))]] == [
        (1, 1_700_000_001.0, 1_700_000_003.5, 1_700_000_005.0)
    ]
    offset = 1_700_000_000.0  # the run log's clock here: seconds after 1_700_000_000
    runs = _runs(("a", w1, 1, 1.1, None, None), ("b", w2, 1, 5.2, 5.9, "ok"))
    runs[0].last = 3.45  # fenced itself in time
    j = Judged(Spec("plain", {}, {}, job), {}, [], runs)
    check_leases(j, leases, offset)
    assert j.problems == []
    runs[0].last, runs[0].child_last = 4.0, 4.0  # its subprocess ran on 0.5 s past the lease
    check_leases(j, leases, offset)
    assert len(j.problems) == 1 and "0.50 s after its lease expired on the server (its subprocess)" in j.problems[0]


def test_checks_catch_a_subprocess_outliving_its_killed_worker() -> None:
    w1 = ObjectId()
    runs = _runs(("a", w1, 1, 0.0, None, None))
    runs[0].last = runs[0].child_last = 2.0 + CHILD_SLACK - 0.1
    j = Judged(Spec("children", {}, {}, ObjectId()), {}, [], runs)
    check_children(j, {"a": 2.0})
    assert j.problems == []
    runs[0].last = runs[0].child_last = 2.0 + CHILD_SLACK + 0.5
    check_children(j, {"a": 2.0})
    assert any("ran on" in p and "after the worker was killed" in p for p in j.problems)


def test_checks_catch_a_run_that_ran_again_after_its_code_returned() -> None:
    w1, w2 = ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.0, 1.0, "ok"), ("b", w2, 1, 3.0, 4.0, "ok"))
    j = Judged(Spec("plain", {}, {}, ObjectId()), {}, [], runs)
    check_doubled_runs(j, {str(w1): 1.5}, [])  # its worker died before recording the end: allowed
    check_doubled_runs(j, {}, [[2.0, 2.5]])  # an outage kept it from recording the end: allowed
    assert j.problems == []
    check_doubled_runs(j, {str(w1): 3.5}, [[0.0, 0.5]])  # its worker died after the run ran again
    assert any("run 1 ran again" in p for p in j.problems)
    j.problems.clear()
    node = runs[0].node
    check_doubled_runs(j, {}, [], {node: 0.5})  # its node's stop reached the code in the instant it returned
    assert j.problems == [] and any("graceful stop" in t for t in j.tolerated)
    check_doubled_runs(j, {}, [], {node: 1.0 - STOP_RETURN_RACE - 0.5})  # a stop long before: no excuse
    assert any("run 1 ran again" in p for p in j.problems)


def test_checks_catch_runs_started_before_they_were_due() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.1, None, None), ("b", w2, 1, 1.6, 1.9, "fail"), ("c", w3, 2, 3.2, 3.4, "fail"))
    j = _judge("retry", {"retry": 1, "retry_interval": 1}, _retry_history(w1, w2, w3), runs)
    check_early_runs(j, 0.0)
    assert j.problems == []  # run 2 started 1.3 s after run 1's code returned (retry_interval 1)
    runs[2].start = 2.5
    check_early_runs(j, 0.0)
    assert any("run 2 started 0.40 s before it was due" in p for p in j.problems)
    delayed = Judged(Spec("delayed", {}, {"at": 105.0}, ObjectId()), {}, [], _runs(("d", w1, 1, 4.0, 4.2, "ok")))
    check_early_runs(delayed, 100.0)
    assert any("run 1 started 1.00 s before its time" in p for p in delayed.problems)


def test_checks_catch_a_job_orphaned_without_dead_processes() -> None:
    w1, w2, w3 = ObjectId(), ObjectId(), ObjectId()
    events = [_event(1, JobStatus.PROCESSING, w, at) for w, at in ((w1, 0.0), (w2, 3.0), (w3, 6.0))]
    events += [_event(1, JobStatus.WAITING, w, at, RELEASED_ERROR) for w, at in ((w1, 2.5), (w2, 5.5))]
    events.append(_event(1, JobStatus.FAILED, w3, 8.5, ORPHANED_ERROR))
    job = ObjectId()
    j = Judged(Spec("plain", {}, {}, job), {}, events, [])
    leases = {(str(job), str(w)): [Lease(1, at, at + 2.0, at + 2.5)] for w, at in ((w1, 0.0), (w2, 3.0), (w3, 6.0))}
    check_orphanings(j, {str(w1): 1.0, str(w2): 4.0, str(w3): 7.0}, leases)
    assert j.problems == []
    check_orphanings(j, {str(w1): 1.0, str(w2): 9.0}, leases)  # w2 died after its attempt was put back
    assert any("only 1 of its 3 attempts lost their process" in p for p in j.problems)
    # Swept while cut off, and its node died before it could vouch (before the run ended): a dead owner to all.
    base = 1_700_000_000
    events[4]["sweep"] = {"expires": events[4]["time"], "back": False}
    swept = Judged(Spec("plain", {}, {}, job), {}, events, [])
    check_orphanings(swept, {str(w1): 1.0, str(w2): base + 7.5, str(w3): 7.0}, leases)
    assert swept.problems == []
    events[4]["sweep"]["back"] = True  # it came back and vouched: no death
    check_orphanings(swept, {str(w1): 1.0, str(w2): base + 7.5, str(w3): 7.0}, leases)
    assert any("only 2 of its 3 attempts lost their process" in p for p in swept.problems)


def test_checks_tolerate_the_stall_window_of_a_stopped_worker_only() -> None:
    w1, w2 = ObjectId(), ObjectId()
    runs = _runs(("a", w1, 1, 0.1, None, None), ("b", w2, 1, 0.5, 1.9, "ok"))
    runs[0].last = 0.8
    j = Judged(Spec("plain", {}, {}, ObjectId()), {}, [], runs)
    check_overlaps(j, {}, {1: [[-1.0, 0.05]]})  # its worker was stopped right before it ran (a claim pause)
    assert j.problems == [] and len(j.tolerated) == 1
    runs[0].last = 0.5 + STALL_OVERLAP + 0.2
    check_overlaps(j, {}, {1: [[-1.0, 0.05]]})
    assert len(j.problems) == 1


def test_room_check_catches_evictions_and_finished_jobs_deleted_below_half_full() -> None:
    doc = {"status": int(JobStatus.WAITING), "pad": "x" * 100}
    size = len(bson.encode(dict(doc, _id=ObjectId())))
    a, b, c, d = ObjectId(), ObjectId(), ObjectId(), ObjectId()
    allowed = [
        _change("insert", a, 0, **doc),
        _change("insert", b, 0, **doc),
        _change("update", a, 0, status=int(JobStatus.CANCELED)),
        _change("delete", a, 0),  # finished, collection full: room may be made of it
    ]
    assert check_room(allowed, 2 * size) == []
    below_half = [
        *allowed[:2],
        _change("insert", c, 0, **doc),
        _change("insert", d, 0, **doc),
        _change("update", a, 0, status=int(JobStatus.DONE)),
        _change("delete", a, 0),  # at 4 of 10 sizes: below half
        {"operationType": "drop"},
        _change("insert", b, 0, **doc),
        _change("delete", b, 0),  # evicted while WAITING
    ]
    problems = check_room(below_half, 10 * size)
    assert problems == [
        f"finished job {a} (DONE) deleted at 40% full, below half",
        f"unfinished job {b} (WAITING) deleted at 10% full",
    ]


def _done(kind: str, at: float, spec_id: ObjectId | None = None) -> Judged:
    w = ObjectId()
    events = [_event(1, JobStatus.PROCESSING, w, at - 0.5), _event(1, JobStatus.DONE, w, at)]
    doc = {"status": int(JobStatus.DONE), "run": 1, "outcome": events[-1]["_id"]}
    return Judged(Spec(kind, {}, {}, spec_id or ObjectId()), doc, events, [])


def _run(token: str, start: float, end: float, node: str = "n0") -> Execution:
    return Execution(token, "j", "w" * 24, node, 1, start, end, 1, end, "ok")


def test_a_dependent_that_started_before_its_dependency_ended_is_caught() -> None:
    offset = 1_700_000_000.0  # the events' clock (the server's) against the run log's
    first, second = _done("plain", 10.0), _done("plain", 12.0)
    w = ObjectId()
    events = [_event(1, JobStatus.PROCESSING, w, 11.5), _event(1, JobStatus.DONE, w, 13.0)]
    dependent = Judged(
        Spec("dependent", {}, {}, ObjectId(), depends_on=[first.spec, second.spec]),
        {"status": int(JobStatus.DONE), "run": 1},
        events,
        [_run("early", 11.5, 13.0)],
    )
    by_id = {j.spec.id: j for j in (first, second, dependent)}
    check_dependencies(dependent, by_id, offset)
    assert dependent.problems == ["execution early started 0.50 s before its last dependency ended"]
    in_time = Judged(dependent.spec, dependent.doc, events, [_run("ok", 12.05, 13.0)])
    check_dependencies(in_time, by_id, offset)
    assert in_time.problems == []


def test_a_dependent_of_a_failed_job_must_end_canceled_naming_it() -> None:
    w = ObjectId()
    failed_events = [_event(1, JobStatus.PROCESSING, w, 1.0), _event(1, JobStatus.FAILED, w, 2.0, "ValueError")]
    failed = Judged(Spec("retry", {}, {}, ObjectId()), {"status": int(JobStatus.FAILED), "run": 1}, failed_events, [])
    ran = Judged(
        Spec("dependent", {}, {}, ObjectId(), depends_on=[failed.spec]),
        {"status": int(JobStatus.DONE), "run": 1},
        [_event(1, JobStatus.PROCESSING, w, 3.0), _event(1, JobStatus.DONE, w, 4.0)],
        [_run("x", 3.0 - 1_700_000_000.0, 4.0)],
    )
    check_dependencies(ran, {failed.spec.id: failed}, 0.0)
    assert any("a dependency failed" in p for p in ran.problems)
    assert any("although a dependency never ended DONE" in p for p in ran.problems)
    canceled = Judged(
        ran.spec,
        {"status": int(JobStatus.CANCELED), "run": 1},
        [_event(1, JobStatus.CANCELED, None, 3.0, DEPENDENCY_ERROR)],
        [],
    )
    check_dependencies(canceled, {failed.spec.id: failed}, 0.0)
    assert canceled.problems == []


def test_more_runs_under_a_limit_than_it_allows_are_caught() -> None:
    limited = [
        Judged(Spec("limited", {}, {}, ObjectId()), {}, [], [_run("a", 0.0, 2.0), _run("b", 0.5, 2.0)]),
        Judged(Spec("limited", {}, {}, ObjectId()), {}, [], [_run("c", 1.0, 1.5)]),
    ]
    assert check_limit(limited, {}, 3) == []
    assert check_limit(limited, {}, 2) == ["3 executions of jobs under the limit of 2 at once at 1.00 (a, b, c)"]
    after = [limited[0], Judged(limited[1].spec, {}, [], [_run("c", 2.0, 2.5)])]
    assert check_limit(after, {}, 2) == []  # one ends as the next starts


def test_a_claim_stamped_before_another_but_written_after_its_release_is_no_double_claim() -> None:
    """Chaos seed 12: A's claim was stamped first, sent during an outage and written once B's attempt was released
    (STAMP_SLACK later at most): the attempts ran one after the other."""
    a, b, c = ObjectId(), ObjectId(), ObjectId()
    events = [
        _event(1, JobStatus.PROCESSING, a, 6.981),
        _event(1, JobStatus.PROCESSING, b, 7.223),
        _event(1, JobStatus.WAITING, b, 7.407, RELEASED_ERROR),
        _event(1, JobStatus.WAITING, a, 12.004, RELEASED_ERROR),
        _event(1, JobStatus.PROCESSING, c, 15.2),
        _event(1, JobStatus.DONE, c, 17.7),
    ]
    ran = [Execution("x", "job", str(c), "n0", 1, 15.2, 17.7, 1, 17.7, "ok")]
    assert _judge("plain", {}, events, ran).problems == []
    late = [dict(e) for e in events]
    late[1]["time"] = datetime.fromtimestamp(1_700_000_000 + 8.0, timezone.utc)  # stamped well after A's claim
    late[2]["time"] = datetime.fromtimestamp(1_700_000_000 + 8.2, timezone.utc)
    assert any("claimed the job before" in p for p in _judge("plain", {}, late, ran).problems)
