"""Every process that runs a job's code fences itself (SPEC 4): a worker, and every process its job started, stops
before the lease it ran under can expire, whether its node, its manager or the whole process group is paused,
killed or cut off; a worker that dies takes its job's processes with it; a graceful stop never kills a run whose
code has returned. Real queue nodes, real signals, the test-only failpoints of :mod:`taskscheduler.failpoints`."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from crash_jobs import read_log, read_ticks
from helpers import Node, alive, wait_until
from taskscheduler import JobStatus, Scheduler
from taskscheduler.failpoints import ENVIRONMENT, ONCE_ENVIRONMENT

TICKER = "crash_jobs:Ticker"
MODULES = ("crash_jobs", "sample_jobs")
LEASE = 2.0


def _starts(log: Path) -> list[tuple[int, float]]:
    return [(pid, at) for what, pid, at in read_ticks(str(log)) if what == "start"]


def _last_activity(log: Path, pid: int) -> float:
    return max(at for _, p, at in read_ticks(str(log)) if p == pid)


def test_a_worker_whose_node_is_paused_stops_its_job_before_another_node_runs_it(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """SIGSTOP of the node's whole process group (Ctrl-Z, a frozen container) stops the node and its manager; the
    worker, in a group of its own, stops its job itself before the lease runs out, so the node that takes the job
    over never runs it beside the first execution."""
    log = tmp_path / "ticks.log"
    first = start_node(orphaned_timeout=LEASE, modules=MODULES)
    process = scheduler.add_job(TICKER, {"log": str(log), "seconds": 3})
    wait_until(lambda: _starts(log), 15, what="the first execution")
    worker_pid = _starts(log)[0][0]
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        start_node(orphaned_timeout=LEASE, modules=MODULES)
        wait_until(lambda: len(_starts(log)) >= 2, 20, what="the second node's execution")
        second_start = _starts(log)[1][1]
        assert not alive(worker_pid), "the paused node's worker still runs the job"
        assert _last_activity(log, worker_pid) < second_start
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert process.wait(timeout=20).status == JobStatus.DONE
    assert [e["status"] for e in process.runs()] == [JobStatus.DONE]
    assert first.proc.poll() is None, "the continued node should serve on"
    # The worker wrote nothing (its job's thread ran on until it died): the second node swept the run, and the
    # continued node, finding its worker fenced and the run put back, vouched for the sweep: no orphaning counts.
    def vouched() -> list[dict[str, Any]]:
        events = scheduler.store.job_events(process.id)
        return [e for e in events if e["status"] == JobStatus.WAITING and e.get("sweep", {}).get("back")]

    (release,) = wait_until(vouched, 20, what="the continued node vouching for the sweep")
    assert release["error"]["message"] == "its node stopped renewing the lease"
    assert (scheduler.store.find_job(process.id) or {})["orphaned"] == 0


@pytest.mark.parametrize("new_session", [False, True], ids=["same-group", "own-session"])
@pytest.mark.parametrize("victim", ["worker", "node"])
def test_the_processes_a_job_started_die_with_its_worker(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path, victim: str, new_session: bool
) -> None:
    """SIGKILL of the worker alone (the OOM killer) or of the node process alone: the subprocess the job started
    (also one in a session of its own) is killed with it, before the job runs again anywhere."""
    log = tmp_path / "ticks.log"
    node = start_node(orphaned_timeout=LEASE, modules=MODULES)
    scheduler.add_job(TICKER, {"log": str(log), "seconds": 60, "spawn": True, "new_session": new_session})
    wait_until(lambda: _starts(log) and [p for w, p, _ in read_ticks(str(log)) if w == "sub"], 15, what="job + sub")
    worker_pid = _starts(log)[0][0]
    sub_pid = next(p for w, p, _ in read_ticks(str(log)) if w == "sub")
    os.kill(worker_pid if victim == "worker" else node.pid, signal.SIGKILL)
    wait_until(lambda: not alive(sub_pid), 5, what="the job's subprocess to die with its worker")


def test_a_graceful_stop_lets_a_returned_run_record_its_end(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while a worker whose code has returned is still recording its end (a slow server, a rolling
    restart): the end is recorded and the job does not run again."""
    log = tmp_path / "ticks.log"
    monkeypatch.setenv(ENVIRONMENT, "worker.returned=sleep:1.5")
    node = start_node(orphaned_timeout=LEASE, modules=MODULES)
    process = scheduler.add_job(TICKER, {"log": str(log), "seconds": 0.2})
    wait_until(lambda: [w for w, _, _ in read_ticks(str(log)) if w == "end"], 15, what="the job's code to return")
    assert node.stop(signal.SIGTERM, timeout=20) == 0
    assert process.refresh().status == JobStatus.DONE
    assert [e["status"] for e in process.runs()] == [JobStatus.DONE]
    assert len(_starts(log)) == 1


@pytest.mark.parametrize("paused", [4.0, 0.6 * LEASE], ids=["past-its-timer", "past-its-fence-only"])
def test_a_worker_paused_between_its_claim_and_the_hand_over_never_runs_the_job(
    scheduler: Scheduler,
    start_node: Callable[..., Node],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    paused: float,
) -> None:
    """A worker stopped right after its claim is written, before its manager hears of it, past the lease (its
    kernel timer ends it), or past half of it only (it stops itself on waking): the job is put back and run by
    another worker; the stopped one, continued, dies before it runs a line of the job. It was paused, not dead:
    never an orphaning (the chaos harness found the second case counted as a death, seed 46)."""
    log = tmp_path / "ticks.log"
    once = tmp_path / "once"
    once.mkdir()
    monkeypatch.setenv(ENVIRONMENT, f"worker.claimed=stop:{paused}")
    monkeypatch.setenv(ONCE_ENVIRONMENT, str(once))
    start_node("--max-children", "2", orphaned_timeout=LEASE, modules=MODULES)
    process = scheduler.add_job(TICKER, {"log": str(log), "seconds": 0.5})
    assert process.wait(timeout=30).status == JobStatus.DONE
    wait_until(lambda: not [p for p in psutil.process_iter() if _is_stopped(p)], 10, what="the paused worker to end")
    assert len(_starts(log)) == 1, "the job ran twice"
    claims = [e for e in scheduler.store.job_events(process.id) if e["status"] == JobStatus.PROCESSING]
    assert len(claims) == 2  # the paused worker's claim, then the one that ran it
    # Paused, not dead: its node reports the lost claim once the worker's timer has ended it, and the sweep that put
    # the run back is vouched for (it never counts as an orphaning).
    def vouched() -> bool:
        sweeps = [e for e in scheduler.store.job_events(process.id) if isinstance(e.get("sweep"), dict)]
        return all(e["sweep"]["back"] for e in sweeps)

    wait_until(vouched, 10, what="the paused worker's sweep to be vouched for")


def _is_stopped(proc: Any) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_STOPPED and "taskscheduler" in " ".join(proc.cmdline()))
    except psutil.Error:
        return False


@pytest.mark.e2e
def test_a_stalled_node_never_runs_a_job_beside_its_successor(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    stalled = start_node("--import", "crash_jobs", orphaned_timeout=2)
    p = scheduler.add_job("crash_jobs:StartLog", {"path": log, "seconds": 6})
    first = wait_until(lambda: [pid for what, pid, _ in read_log(log) if what == "start"], 30, what="first run")[0]
    os.kill(stalled.pid, signal.SIGSTOP)  # the queue process only: its manager and worker go on
    try:
        died_at = wait_until(lambda: None if alive(first) else time.time(), 10, what="the stalled node to fence")
        start_node("--import", "crash_jobs", orphaned_timeout=2)
        starts = wait_until(lambda: [e for e in read_log(log) if e[0] == "start"][1:], 30, what="second run")
        assert starts[0][2] > died_at, "the successor started while the stalled node's worker still ran the job"
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    p.wait(timeout=30)
    assert p.status == JobStatus.DONE
    assert [what for what, _, _ in read_log(log)] == ["start", "start", "end"]
    assert stalled.proc.poll() is None, stalled.output()[-2000:]
