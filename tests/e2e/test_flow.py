"""SPEC 8, limits and pauses across real queue nodes: a limit holds in the whole cluster, a dead run's slot comes
back, a pause stops new runs everywhere and a resume starts them within a second."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path

from helpers import Node, wait_until
from taskscheduler import JobStatus, Process, Scheduler

#: How far two processes' readings of the server's clock may differ (each estimates it from its own round trips).
CLOCK_SLACK = 0.05


def runs_of(processes: Iterable[Process]) -> list[tuple[datetime, datetime]]:
    """(started, ended) of every ended run of these jobs."""
    spans = []
    for p in processes:
        for run in p.runs():
            if run.get("started") and run.get("ended"):
                spans.append((run["started"], run["ended"]))
    return spans


def most_at_once(spans: list[tuple[datetime, datetime]], slack: float = 0.0) -> int:
    """Most runs at once; ``slack`` seconds are taken off each run's end (times from different processes' readings
    of the server's clock)."""
    moments = sorted([(s, 1) for s, _ in spans] + [(e - timedelta(seconds=slack), -1) for _, e in spans])
    running = most = 0
    for _, step in moments:
        running += step
        most = max(most, running)
    return most


def test_a_concurrency_limit_holds_across_two_nodes(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    scheduler.set_limit("mail", concurrency=2)
    start_node("--max-children", "3")
    start_node("--max-children", "3")
    jobs = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.5}, limit_key="mail") for _ in range(6)]
    jobs += [scheduler.add_job("sample_jobs:Echo", "also mail", limit_key="mail") for _ in range(2)]
    free = scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.5})  # under no limit: runs at once beside them
    scheduler.wait_for([*jobs, free], timeout=60)
    assert all(p.status == JobStatus.DONE for p in [*jobs, free])
    spans = sorted(runs_of(jobs))
    assert most_at_once(spans, CLOCK_SLACK) <= 2, spans
    assert most_at_once(spans, CLOCK_SLACK) == 2  # and the limit is used, not serialised
    # Every slot given back: a worker gives its slots back once it has recorded the run's end (the DONE that
    # wait_for saw), a moment later.
    wait_until(lambda: scheduler.store.limit_holders("mail") == [], 10, what="every slot given back")


def test_a_rate_limit_holds_across_two_nodes(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    scheduler.set_limit("sample_jobs:Echo", rate="2/s")
    start_node("--max-children", "2")
    start_node("--max-children", "2")
    jobs = [scheduler.add_job("sample_jobs:Echo", n) for n in range(6)]
    scheduler.wait_for(jobs, timeout=60)
    starts = sorted(s for s, _ in runs_of(jobs))
    gaps = [(starts[i + 2] - starts[i]).total_seconds() for i in range(len(starts) - 2)]
    assert min(gaps) >= 0.95, f"3 starts within {min(gaps):.2f} s under 2/s"


def test_a_slot_held_by_a_run_whose_node_died_comes_back(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    scheduler.set_limit("sample_jobs:Sleep", concurrency=1)
    node = start_node()
    doomed = scheduler.add_job("sample_jobs:Sleep", {"seconds": 1.5})
    wait_until(lambda: scheduler.get_job(doomed.id).status == JobStatus.PROCESSING, 30, what="the first run")
    after = scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.2})
    node.kill_group()  # its slot stays with the dead run until that run is orphaned
    start_node("--max-children", "2")
    scheduler.wait_for([doomed, after], timeout=60)  # the orphaned run again, then the other: one slot, reused
    assert doomed.status == JobStatus.DONE and after.status == JobStatus.DONE
    assert most_at_once(runs_of([doomed, after]), CLOCK_SLACK) == 1


def test_a_pause_stops_new_runs_everywhere_and_a_resume_starts_them(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    start_node("--max-children", "1")
    start_node("--max-children", "1")
    running = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 1.5}) for _ in range(2)]
    wait_until(lambda: all(scheduler.get_job(p.id).status == JobStatus.PROCESSING for p in running), 30, what="both")
    queued = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.1}) for _ in range(3)]
    scheduler.pause("sample_jobs:Sleep")
    later = scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.1})  # added after the pause
    scheduler.wait_for(running, timeout=30)  # running runs finish
    time.sleep(1.5)  # the point: nothing starts while paused (a free worker sits on each node all along)
    assert [scheduler.get_job(p.id).status for p in [*queued, later]] == [JobStatus.WAITING] * 4
    resumed_at = time.time()
    scheduler.resume("sample_jobs:Sleep")
    scheduler.wait_for([*queued, later], timeout=30)
    first_start = min(s for s, _ in runs_of([*queued, later]))
    assert first_start.timestamp() - resumed_at < 1.0


def test_a_pause_of_every_job_holds_a_due_cron_run_once(scheduler: Scheduler, start_node: Callable[..., Node]) -> None:
    scheduler.pause("*")
    start_node()
    job = scheduler.add_job("sample_jobs:Noop", interval=1)  # due at once, then every second
    time.sleep(2.5)  # the point: matches pass while paused
    assert scheduler.get_job(job.id).runs() == []
    scheduler.resume("*")
    wait_until(lambda: len(scheduler.get_job(job.id).runs()) >= 1, 10, what="the run after the resume")
    time.sleep(0.5)  # a catch-up storm would have run more by now
    assert len(scheduler.get_job(job.id).runs()) == 1
    scheduler.cancel_job(job.id)


def test_a_limit_set_while_jobs_wait_in_a_nodes_backlog_holds_for_them(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    start_node("--pm", "static", "--min-children", "3", "--max-children", "3")
    busy = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 1.0}) for _ in range(3)]
    wait_until(lambda: all(scheduler.get_job(p.id).status == JobStatus.PROCESSING for p in busy), 30, what="busy")
    # Handed over at once: in the manager's backlog, waiting for a free worker.
    queued = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.3}, limit_key="slow") for _ in range(4)]
    scheduler.set_limit("slow", concurrency=1)
    scheduler.wait_for([*busy, *queued], timeout=60)
    assert most_at_once(runs_of(queued), CLOCK_SLACK) == 1


def test_jobs_a_pause_held_start_in_priority_order_after_the_resume(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 8: jobs held back stay WAITING, in priority order (then first in, first out)."""
    start_node("--pm", "static", "--min-children", "1", "--max-children", "1")
    scheduler.pause("sample_jobs:StartTime")
    jobs = [scheduler.add_job("sample_jobs:StartTime", {}, priority=p) for p in (0, 50, -10, 50, 90)]
    warm = scheduler.add_job("sample_jobs:Noop").wait(timeout=30)  # the node is up, and held them meanwhile
    assert warm.status == JobStatus.DONE
    assert {scheduler.get_job(p.id).status for p in jobs} == {JobStatus.WAITING}
    scheduler.resume("sample_jobs:StartTime")
    scheduler.wait_for(jobs, timeout=30)
    assert {p.status for p in jobs} == {JobStatus.DONE}
    started = sorted(jobs, key=lambda p: p.result)  # each job's own reading of when it started
    assert [p.options["priority"] for p in started] == [90, 50, 50, 0, -10]
    assert [p.id for p in started[1:3]] == [jobs[1].id, jobs[3].id]  # first in, first out within a priority


def test_a_pause_written_while_a_claim_is_under_way_lets_only_that_claim_through(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """docs/operations.md: a job whose claim was under way when the pause was written may still start; nothing
    handed over or added after it does until the resume."""
    once = tmp_path / "once"
    once.mkdir()
    env = {"TASKSCHEDULER_FAILPOINTS": "worker.admitted=sleep:1.5", "TASKSCHEDULER_FAILPOINTS_ONCE": str(once)}
    start_node("--pm", "static", "--min-children", "1", "--max-children", "1", env=env)
    first = scheduler.add_job("sample_jobs:Noop")
    wait_until(lambda: (once / "worker.admitted").exists(), 30, what="the worker about to claim the first job")
    scheduler.pause("sample_jobs:Noop")
    second = scheduler.add_job("sample_jobs:Noop")
    assert first.wait(timeout=30).status == JobStatus.DONE  # its claim was under way: it went through
    time.sleep(1.0)  # the point: nothing else starts while paused (the worker is free all along)
    assert scheduler.get_job(second.id).status == JobStatus.WAITING
    scheduler.resume("sample_jobs:Noop")
    assert second.wait(timeout=30).status == JobStatus.DONE


def test_a_limit_rewritten_again_and_again_while_claims_go_on_still_holds(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """set_limit flooded while two nodes claim under the limit: never more runs at once than the limit allows,
    and every slot given back at the end."""
    scheduler.set_limit("mail", concurrency=2)
    start_node("--max-children", "3")
    start_node("--max-children", "3")
    jobs = [scheduler.add_job("sample_jobs:Sleep", {"seconds": 0.3}, limit_key="mail") for _ in range(10)]
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            scheduler.set_limit("mail", concurrency=2, rate="1000/s")
            scheduler.set_limit("mail", concurrency=2)

    flooding = threading.Thread(target=flood)
    flooding.start()
    try:
        scheduler.wait_for(jobs, timeout=90)
    finally:
        stop.set()
        flooding.join()
    assert all(p.status == JobStatus.DONE for p in jobs)
    assert most_at_once(sorted(runs_of(jobs)), CLOCK_SLACK) <= 2
    wait_until(lambda: scheduler.store.limit_holders("mail") == [], 10, what="every slot given back")
