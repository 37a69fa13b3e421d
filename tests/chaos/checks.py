"""The invariants a seed's history is checked against (SPEC sections 2 and 4), one function per promise, and
:func:`judge`, which runs them all on what a :class:`~chaos.harness.Harness` recorded."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from bson import ObjectId

from chaos.config import (
    CHILD_SLACK,
    DEPENDENCY_ERROR,
    EARLY_SLACK,
    LIMIT,
    ORPHANED_ERROR,
    OVERLAP_SLACK,
    RECURRING,
    STALL_OVERLAP,
    STAMP_SLACK,
    STOP_RETURN_RACE,
    TIMEOUT_ERROR,
)
from chaos.harness import Harness
from chaos.leases import Lease, check_leases, lease_history, read_changes
from chaos.runlog import Execution, Judged, NodeState, Spec, _during
from taskscheduler import JobStatus
from taskscheduler.constants import MAX_ORPHANINGS

# -- the invariants -----------------------------------------------------------------------------------------------


def _error_class(event: dict[str, Any]) -> str | None:
    error = event.get("error")
    return error.get("class") if isinstance(error, dict) else None


def _seconds(value: Any, t0_wall: float) -> str:
    return f"{value.timestamp() - t0_wall:.3f}" if isinstance(value, datetime) else "-"


def _kind_of(event: dict[str, Any]) -> str:
    """PROCESSING (an attempt), end, release (back to WAITING), entry (next run announced by the previous run's
    end), unpostpone (POSTPONED -> WAITING when due)."""
    status = event["status"]
    if status == JobStatus.PROCESSING:
        return "attempt"
    if status >= JobStatus.DONE:
        return "end"
    if event.get("error"):  # POSTPONED: held for a verdict after a sweep that would be the third orphaning
        return "release" if status in (JobStatus.WAITING, JobStatus.POSTPONED) else "unknown"
    if event.get("worker") is not None:
        return "entry"
    return "unpostpone" if status == JobStatus.WAITING else "unknown"


def check_final(j: Judged, canceled: dict[ObjectId, str]) -> None:
    """The job ended as the SPEC allows for its kind."""
    status = JobStatus(j.doc["status"])
    ends = j.ends()
    last_error = _error_class(ends[-1]) if ends else None
    by_test = j.spec.id in canceled
    if not status.is_terminal:
        return  # reported by the settling deadline
    allowed = {
        "plain": {JobStatus.DONE},
        "retry": {JobStatus.FAILED},
        "timeout": {JobStatus.TIMEOUT},
        "interval": {JobStatus.CANCELED},
        "open": set(),
        "cancel": set(),
        "children": {JobStatus.DONE},
        "delayed": {JobStatus.DONE},
        "limited": {JobStatus.DONE},
        "dependent": {JobStatus.DONE, JobStatus.CANCELED},  # see check_dependencies
    }[j.spec.kind]
    if status == JobStatus.CANCELED and by_test:
        return
    if status == JobStatus.FAILED and last_error == ORPHANED_ERROR:
        return  # orphaned a third time (SPEC 4): any job may end so
    if status not in allowed:
        why = f"canceled by the test: {canceled[j.spec.id]}" if by_test else "not canceled by the test"
        j.problems.append(f"ended {status.name} (last error {last_error}), not allowed for a {j.spec.kind} job ({why})")
    if j.spec.kind == "retry" and status == JobStatus.FAILED and last_error not in ("ValueError", ORPHANED_ERROR):
        j.problems.append(f"ended FAILED by {last_error}, not by its own error")


def check_run_ends(j: Judged, api_runs: list[dict[str, Any]]) -> None:
    """Exactly one end event per run, run numbers 1..K contiguous; Process.runs(), run and outcome agree."""
    ends = j.ends()
    per_run = Counter(int(e["run"]) for e in ends)
    doubled = sorted(r for r, n in per_run.items() if n > 1)
    if doubled:
        j.problems.append(f"runs {doubled} have more than one end event")
    terminal = JobStatus(j.doc["status"]).is_terminal
    last = int(j.doc["run"]) if terminal else int(j.doc["run"]) - 1
    if sorted(per_run) != list(range(1, last + 1)):
        j.problems.append(f"end events of runs {sorted(per_run)}, expected 1..{last} (job run {j.doc['run']})")
    if any(int(e["run"]) > int(j.doc["run"]) for e in j.events):
        j.problems.append(f"events of runs after the job's run {j.doc['run']}")
    if [e["_id"] for e in api_runs] != [e["_id"] for e in sorted(ends, key=lambda e: e["run"])]:
        j.problems.append(
            f"Process.runs() lists {[(e['run'], e['status']) for e in api_runs]}, "
            f"the events {[(e['run'], e['status']) for e in ends]}"
        )
    if terminal and ends and j.doc.get("outcome") != max(ends, key=lambda e: e["run"])["_id"]:
        j.problems.append("the job's outcome is not the end event of its last run")


def check_retries(j: Judged, canceled: dict[ObjectId, str]) -> None:
    """No retry lost or doubled; a next run only after a failure (retry) or for a recurring job. Counted in runs
    (a run with two end events is reported by check_run_ends)."""
    ends = list({int(e["run"]): e for e in sorted(j.ends(), key=lambda e: (e["run"], e["time"]))}.values())
    if not ends:
        return
    statuses = [JobStatus(e["status"]) for e in ends]
    failed = (JobStatus.FAILED, JobStatus.TIMEOUT)
    if j.spec.kind in RECURRING:
        if JobStatus.CANCELED in statuses[:-1]:
            j.problems.append(f"a run followed a CANCELED run: {[s.name for s in statuses]}")
        cancel_at = j.spec.data.get("cancel_at")
        if cancel_at and j.spec.id not in canceled and len(ends) < int(cancel_at):
            j.problems.append(f"ended after {len(ends)} runs; it cancels itself in run {cancel_at} only")
        if j.spec.kind == "open" and j.spec.id in canceled and "after" in canceled[j.spec.id]:
            if len(ends) < j.spec.open_runs + 1:
                j.problems.append(f"canceled after {j.spec.open_runs} runs, but has only {len(ends)} ends")
        return
    if any(s not in failed for s in statuses[:-1]):
        j.problems.append(f"a run followed a run that needs none: {[s.name for s in statuses]}")
    if len(ends) > j.spec.retry + 1:
        j.problems.append(f"{len(ends)} runs with retry {j.spec.retry}: a retry was doubled")
    if statuses[-1] in failed and len(ends) != j.spec.retry + 1:
        j.problems.append(f"ended {statuses[-1].name} after {len(ends)} runs with retry {j.spec.retry}: retry lost")
    if j.spec.fails and JobStatus.DONE in statuses:
        j.problems.append("a job that always fails has a DONE run")


def check_errors(j: Judged) -> None:
    """Each recorded failure is one the job can have: its own error, its timeout, a third orphaning."""
    own = {"retry": {"ValueError"}, "interval": {"RuntimeError"}}.get(j.spec.kind, set())
    for e in j.ends():
        status, error = JobStatus(e["status"]), _error_class(e)
        if status == JobStatus.FAILED and error not in own | {ORPHANED_ERROR}:
            j.problems.append(f"run {e['run']} FAILED with {error}: {(e.get('error') or {}).get('message')}")
        if status == JobStatus.TIMEOUT and (j.spec.kind != "timeout" or error != TIMEOUT_ERROR):
            j.problems.append(f"run {e['run']} ended TIMEOUT ({error})")
        if status == JobStatus.DONE and j.spec.fails:
            j.problems.append(f"run {e['run']} ended DONE")


def check_history(j: Judged) -> None:
    """Per run: attempts one after the other, each closed (release) before the next claim, the last one closed by
    the run's end; the run announced once by the previous run's end; no event of an unknown shape."""
    by_run: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in j.events:
        by_run[int(e["run"])].append(e)
    ends = {int(e["run"]): e for e in j.ends()}
    for run, events in sorted(by_run.items()):
        kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            kinds[_kind_of(e)].append(e)
        if kinds["unknown"]:
            j.problems.append(f"run {run}: events of no known kind {[(e['status'], e.get('worker')) for e in events]}")
        _check_entry(j, run, kinds, ends.get(run - 1))
        _check_attempts(j, run, kinds)


def _check_entry(j: Judged, run: int, kinds: dict[str, list[dict[str, Any]]], previous: dict[str, Any] | None) -> None:
    entries, unpostpones = kinds["entry"], kinds["unpostpone"]
    if run == 1:
        if entries:
            j.problems.append("run 1 has a next-run event")
    elif len(entries) != 1:
        j.problems.append(f"run {run} announced {len(entries)} times by a previous run's end")
    elif previous is None or entries[0]["worker"] != previous.get("worker") or entries[0]["time"] != previous["time"]:
        j.problems.append(f"run {run} announced by something else than the end of run {run - 1}")
    holds = [e for e in kinds["release"] if e["status"] == JobStatus.POSTPONED]
    if len(unpostpones) > 1 + len(holds):
        j.problems.append(f"run {run} moved from POSTPONED to WAITING {len(unpostpones)} times ({len(holds)} holds)")
    postponed = bool(entries) and entries[0]["status"] == JobStatus.POSTPONED
    if postponed and kinds["attempt"] and not unpostpones:
        j.problems.append(f"run {run} was claimed while POSTPONED (no WAITING event before its claim)")


def _check_attempts(j: Judged, run: int, kinds: dict[str, list[dict[str, Any]]]) -> None:
    attempts = _claim_order(kinds)
    # A worker may claim a run again after it was released: each attempt is closed by that worker's first
    # release after it.
    pending_releases: dict[Any, list[dict[str, Any]]] = {}
    for e in sorted(kinds["release"], key=lambda e: e["time"]):
        pending_releases.setdefault(e["worker"], []).append(e)
    end = kinds["end"][0] if kinds["end"] else None
    workers = {a["worker"] for a in attempts}
    for e in kinds["release"]:
        if e["worker"] not in workers:
            j.problems.append(f"run {run}: release of worker ..{str(e['worker'])[-6:]} that has no attempt")
    if end is not None and end.get("worker") is not None and end["worker"] not in workers:
        note = f"run {run}: end {JobStatus(end['status']).name} by worker ..{str(end['worker'])[-6:]} has no attempt"
        (j.tolerated if end["status"] == JobStatus.CANCELED else j.problems).append(note)
    for i, attempt in enumerate(attempts):
        mine = pending_releases.get(attempt["worker"]) or []
        closing = mine.pop(0) if mine else None
        if closing is None and end is not None and end.get("worker") == attempt["worker"]:
            closing = end
        if closing is None:
            if i < len(attempts) - 1 or end is not None:
                j.problems.append(
                    f"run {run}: attempt of worker ..{str(attempt['worker'])[-6:]} never released nor ended, "
                    "yet the run went on"
                )
            continue
        if (attempt["time"] - closing["time"]).total_seconds() > STAMP_SLACK:
            j.problems.append(f"run {run}: attempt of ..{str(attempt['worker'])[-6:]} closed before it started")
        if i + 1 < len(attempts) and (closing["time"] - attempts[i + 1]["time"]).total_seconds() > STAMP_SLACK:
            j.problems.append(
                f"run {run}: worker ..{str(attempts[i + 1]['worker'])[-6:]} claimed the job before "
                f"..{str(attempt['worker'])[-6:]}'s attempt was closed"
            )
    if end is not None and any(a["time"] > end["time"] for a in attempts):
        j.problems.append(f"run {run}: an attempt started after the run ended")


def _claim_order(kinds: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A run's attempts in the order their claims were written. A claim is stamped before it is sent and written up
    to STAMP_SLACK later: of two attempts stamped that close, the one its worker's release closed first was written
    first (the other could only be written once it was released)."""
    attempts = sorted(kinds["attempt"], key=lambda e: e["time"])
    closed: dict[Any, Any] = {}
    for e in sorted(kinds["release"], key=lambda e: e["time"]):
        closed.setdefault(e["worker"], e["time"])
    for i in range(len(attempts) - 1):
        a, b = attempts[i], attempts[i + 1]
        a_closed, b_closed = closed.get(a["worker"]), closed.get(b["worker"])
        near = (b["time"] - a["time"]).total_seconds() <= STAMP_SLACK
        if near and b_closed is not None and (a_closed is None or b_closed < a_closed):
            attempts[i], attempts[i + 1] = b, a
    return attempts


def check_executions(j: Judged) -> None:
    """The run log and the events tell the same story."""
    # An attempt is recorded by its PROCESSING event; one canceled while running also by the CANCELED event
    # (worker and start of the run), which is all that remains of it when its node died before recording it.
    attempts = {(int(e["run"]), str(e["worker"])) for e in j.events if e["status"] == JobStatus.PROCESSING}
    attempts |= {(int(e["run"]), str(e["worker"])) for e in j.events if e["status"] == JobStatus.CANCELED}
    attempt_workers = {w for _, w in attempts}
    for x in j.executions:
        recorded = (x.run, x.worker) in attempts if x.run is not None else x.worker in attempt_workers
        if not recorded:
            j.problems.append(f"execution {x.token} (run {x.run}, worker ..{x.worker[-6:]}) has no PROCESSING event")
    for e in j.ends():
        worker = str(e.get("worker"))
        needs = {JobStatus.DONE: "ok", JobStatus.FAILED: "fail" if _error_class(e) == "ValueError" else None}
        outcome = needs.get(JobStatus(e["status"]))
        if outcome is None:
            continue
        if not any(x.worker == worker and x.run in (None, e["run"]) and x.outcome == outcome for x in j.executions):
            j.problems.append(
                f"run {e['run']} recorded {JobStatus(e['status']).name} by worker ..{worker[-6:]}, "
                f"but no execution of that worker ended '{outcome}'"
            )
    check_retry_count(j)


def check_retry_count(j: Judged) -> None:
    """A job that always fails, ended FAILED by its own errors: its runs that failed in the log are 1..retry+1."""
    ends = j.ends()
    if j.spec.kind != "retry" or j.doc.get("status") != JobStatus.FAILED:
        return
    if any(_error_class(e) != "ValueError" for e in ends):
        return  # canceled, or orphaned: some runs never got to fail
    expected = set(range(1, j.spec.retry + 2))
    failed = [x.run for x in j.executions if x.outcome == "fail"]
    known = {r for r in failed if r is not None}
    unknown = len(failed) - len([r for r in failed if r is not None])  # run number not readable (outage)
    if not known <= expected or len(expected - known) > unknown:
        j.problems.append(f"failed in the log in runs {sorted(known)} (+{unknown} unknown), not {sorted(expected)}")


def check_overlaps(
    j: Judged, nodes: dict[str, NodeState], worker_stops: Mapping[int, list[list[float]]] | None = None
) -> None:
    """No job ran on two workers at overlapping times, subprocesses included (but for the stall window when the
    first one's node, or its worker, was stopped: its fencing delay)."""
    executions = sorted(j.executions, key=lambda x: x.start)
    for i, a in enumerate(executions):
        for b in executions[i + 1 :]:
            overlap = min(a.stop, b.stop) - b.start
            if b.worker == a.worker or overlap <= OVERLAP_SLACK:
                continue
            text = (
                f"executions {a.token} (node {a.node}, worker ..{a.worker[-6:]}) and {b.token} (node {b.node}, "
                f"worker ..{b.worker[-6:]}) overlap by {overlap:.2f} s"
            )
            node = nodes.get(a.node)
            # A worker stopped right after its claim (the claim pause) is stalled before its execution starts.
            paused = _during((worker_stops or {}).get(a.pid, []), a.start - 1.0, a.stop)
            if node is not None and node.stalled_during(a.start, a.stop) and overlap <= STALL_OVERLAP:
                j.tolerated.append(text + f" (node {a.node} was SIGSTOPped)")
            elif paused and overlap <= STALL_OVERLAP:
                j.tolerated.append(text + f" (worker pid {a.pid} was stopped)")
            else:
                j.problems.append(text)




def check_dependencies(
    j: Judged, by_id: Mapping[Any, Judged], offset: float, canceled: Mapping[Any, str] | None = None
) -> None:
    """SPEC 8: a dependent runs only after every dependency ended DONE (never before the last one's end), and
    ends CANCELED, naming a dependency, when one ended FAILED, TIMEOUT or CANCELED (unless the test canceled it
    first)."""
    deps = [by_id.get(s.id) for s in j.spec.depends_on]
    if j.spec.kind != "dependent" or any(d is None for d in deps):
        return  # not a dependent, or a dependency the harness could not judge: nothing to compare with
    ends = j.ends()
    by_test = j.spec.id in (canceled or {}) and j.doc.get("status") == JobStatus.CANCELED
    if by_test and ends and not ends[-1].get("error"):
        return  # the test's own cancel came first
    finals = [JobStatus(d.doc["status"]) for d in deps if d is not None]
    status, errors = JobStatus(j.doc["status"]), [_error_class(e) for e in j.ends()]
    if all(f == JobStatus.DONE for f in finals) and status != JobStatus.DONE and ORPHANED_ERROR not in errors:
        j.problems.append(f"its dependencies all ended DONE, but it ended {status.name}")
    failed = any(f.is_terminal and f != JobStatus.DONE for f in finals)
    if failed and (status != JobStatus.CANCELED or errors != [DEPENDENCY_ERROR]):
        j.problems.append(f"a dependency failed ({[f.name for f in finals]}), yet it ended {status.name} {errors}")
    ends = [_done_at(d, offset) for d in deps if d is not None]
    if None in ends:
        if j.executions:
            j.problems.append(f"{len(j.executions)} executions, although a dependency never ended DONE")
        return
    last = max(e for e in ends if e is not None)
    for x in j.executions:
        if x.start < last - EARLY_SLACK:
            j.problems.append(f"execution {x.token} started {last - x.start:.2f} s before its last dependency ended")


def _done_at(j: Judged, offset: float) -> float | None:
    """When the job's DONE run ended, on the run log's clock (None: it has none)."""
    done = [e for e in j.ends() if e["status"] == JobStatus.DONE]
    return done[-1]["time"].timestamp() - offset if done else None


def check_limit(judged: list[Judged], nodes: Mapping[str, NodeState], limit: int) -> list[str]:
    """SPEC 8: never more than ``limit`` executions of the limited jobs at once, cluster-wide (but for the stall
    window of a SIGSTOPped node or worker, as for one job's executions)."""
    runs = [x for j in judged if j.spec.kind == "limited" for x in j.executions]
    found = []
    for x in runs:
        at_once = [y for y in runs if y.start <= x.start < y.stop - OVERLAP_SLACK]
        if len(at_once) <= limit:
            continue
        stalled = [y for y in at_once if (n := nodes.get(y.node)) is not None and n.stalled_during(y.start, y.stop)]
        longest = max(min(y.stop for y in at_once) - x.start, 0.0)
        if stalled and longest <= STALL_OVERLAP:
            continue
        found.append(
            f"{len(at_once)} executions of jobs under the limit of {limit} at once at {x.start:.2f} "
            f"({', '.join(y.token for y in at_once)})"
        )
    return found


def check_children(j: Judged, deaths: Mapping[str, float]) -> None:
    """A job's subprocesses die with its worker: none logs activity later than the stall window after the
    harness killed the worker or its node (``deaths``: execution token -> when)."""
    for x in j.executions:
        died = deaths.get(x.token)
        if died is not None and x.child_last is not None and x.child_last > died + CHILD_SLACK:
            j.problems.append(
                f"a subprocess of execution {x.token} (node {x.node}, worker pid {x.pid}) ran on "
                f"{x.child_last - died:.2f} s after the worker was killed"
            )


def check_doubled_runs(
    j: Judged, deaths: Mapping[str, float], outages: list[list[float]], stops: Mapping[str, float] | None = None
) -> None:
    """A run whose code returned is not run again, unless its worker died before the end was recorded or an
    outage kept the end from being recorded (then the run is not known to have ended). ``deaths``: worker id ->
    when the harness saw its process die (run log clock)."""
    for a in j.executions:
        if a.end is None or a.run is None:
            continue
        again = [b for b in j.executions if b.run == a.run and b.token != a.token and b.start > a.end]
        if not again:
            continue
        b = min(again, key=lambda x: x.start)
        if deaths.get(a.worker, float("inf")) <= b.start or _during(outages, a.end, b.start):
            continue
        stop = (stops or {}).get(a.node)
        if stop is not None and stop <= a.end <= stop + STOP_RETURN_RACE:
            j.tolerated.append(
                f"run {a.run} ran again after execution {a.token} returned '{a.outcome}' {a.end - stop:.2f} s into "
                f"its node's graceful stop (a stop may end code in the instant it returns)"
            )
            continue
        j.problems.append(
            f"run {a.run} ran again (execution {b.token} on node {b.node}) {b.start - a.end:.2f} s after execution "
            f"{a.token} on node {a.node} had returned '{a.outcome}', though its worker did not die"
        )


def _delay(spec: Spec, status: JobStatus) -> float:
    """The least time between a run's end with ``status`` and the next run's start (no jitter is asked)."""
    if status in (JobStatus.FAILED, JobStatus.TIMEOUT) and spec.retry:
        return float(spec.options.get("retry_interval", 0))
    return float(max(int(spec.options.get("interval", 0)), 0))


def check_early_runs(j: Judged, offset: float) -> None:
    """No run starts before it is due on the server's clock: run 1 not before the job's ``at``, a next run not
    before the end of the run before (the return of the execution that ended it) plus its delay."""
    starts: dict[int, float] = {}
    for x in j.executions:
        if x.run is not None:
            starts[x.run] = min(starts.get(x.run, x.start), x.start)
    at = j.spec.options.get("at")
    if at and 1 in starts and starts[1] + offset < float(at) - EARLY_SLACK:
        j.problems.append(f"run 1 started {float(at) - starts[1] - offset:.2f} s before its time (at)")
    ends = {int(e["run"]): e for e in j.ends()}
    for run, first in sorted(starts.items()):
        previous = ends.get(run - 1)
        if previous is None:
            continue
        ending = [x.stop for x in j.executions if x.run == run - 1 and x.worker == str(previous.get("worker"))]
        if not ending:
            continue
        status = JobStatus(previous["status"])
        due = max(ending) + _delay(j.spec, status)
        if first < due - EARLY_SLACK:
            j.problems.append(
                f"run {run} started {due - first:.2f} s before it was due (run {run - 1} ended {status.name}, "
                f"the next run {_delay(j.spec, status):.0f} s later)"
            )


def check_orphanings(j: Judged, deaths: Mapping[str, float], leases: Mapping[tuple[str, str], list[Lease]]) -> None:
    """A run ends FAILED by orphaning only when MAX_ORPHANINGS of its attempts lost their process while they owned
    the run (SPEC 4: orphanings count dead processes only; a run put back after an outage or a pause is not
    counted). ``deaths``: worker id -> when its process died, on the server's clock."""

    def died_holding(attempt: Mapping[str, Any]) -> bool:
        worker = str(attempt.get("worker"))
        if worker not in deaths:
            return False
        held = [lease for lease in leases.get((str(j.spec.id), worker), ()) if lease.run == attempt["run"]]
        # Dead before its hold on the run ended (the node that sees the death needs a moment to put it back).
        return not held or any(lease.ended is None or deaths[worker] <= lease.ended + 0.5 for lease in held)

    def never_came_back(attempt: Mapping[str, Any], failed: Mapping[str, Any]) -> bool:
        """Swept while cut off, then dead before it could vouch for the sweep (its node killed before the run
        ended): to everyone else it is a dead owner, and so it counts (nothing could tell it apart)."""
        worker = attempt.get("worker")
        swept = [
            e
            for e in j.events
            if e["run"] == attempt["run"] and e.get("worker") == worker and isinstance(e.get("sweep"), Mapping)
        ]
        died = deaths.get(str(worker))
        ended = failed.get("time")
        before_end = died is not None and (not isinstance(ended, datetime) or died <= ended.timestamp())
        return before_end and any(not e["sweep"].get("back") for e in swept)

    for e in j.ends():
        if _error_class(e) != ORPHANED_ERROR:
            continue
        attempts = [a for a in j.events if a["status"] == JobStatus.PROCESSING and a["run"] == e["run"]]
        died = [a for a in attempts if died_holding(a) or never_came_back(a, e)]
        if len(died) < MAX_ORPHANINGS:
            j.problems.append(
                f"run {e['run']} ended FAILED as orphaned, but only {len(died)} of its {len(attempts)} attempts "
                "lost their process"
            )


def judge(h: Harness) -> list[Judged]:
    executions: dict[str, list[Execution]] = defaultdict(list)
    for x in h.log.read().values():
        executions[x.job].append(x)
    nodes = {n.label: n for n in h.nodes}
    leases = lease_history(read_changes(h.client[h.db_name], h.scheduler.store.job_queue, h.start_op))
    worker_deaths, deaths, offset = h.worker_deaths(), h.deaths(), h.t0_wall - h.t0
    deaths_on_server = {worker: died + offset for worker, died in worker_deaths.items()}
    judged = []
    for spec in h.specs:
        if spec.id is None:
            continue
        process = h.scheduler.get_job(spec.id)
        doc = h.scheduler.store.find_job(spec.id) or {}
        events = list(h.scheduler.store.events.find({"job": spec.id}))
        events.sort(key=lambda e: (e["run"], e["time"], e["status"] != JobStatus.PROCESSING))
        j = Judged(spec, doc, events, executions.pop(str(spec.id), []))
        check_final(j, h.canceled)
        check_run_ends(j, process.runs())
        check_retries(j, h.canceled)
        check_errors(j)
        check_history(j)
        check_executions(j)
        check_overlaps(j, nodes, h.worker_stops)
        h.leases_checked += check_leases(j, leases, offset)
        check_children(j, deaths)
        check_doubled_runs(j, worker_deaths, h.outages, h.node_stops)
        check_early_runs(j, offset)
        check_orphanings(j, deaths_on_server, leases)
        judged.append(j)
    by_id = {j.spec.id: j for j in judged}
    for j in judged:
        check_dependencies(j, by_id, offset, h.canceled)
    h.violations.extend(check_limit(judged, nodes, LIMIT))
    for job, stray in executions.items():
        h.violations.append(f"{len(stray)} executions of job {job} that the test never added")
    return judged
