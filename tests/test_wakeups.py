"""node/wakeups.py: the node loop's queue, filled in the stream's order by a reader thread of its own."""

from __future__ import annotations

import threading
import time

from taskscheduler import Scheduler
from taskscheduler.node.wakeups import READ_SECONDS, Kind, Wakeup, Wakeups


def next_of(wakeups: Wakeups, kinds: set[Kind], timeout: float = 10.0) -> Wakeup:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = wakeups.next(0.2)
        if item is not None and item.kind in kinds:
            return item
    raise AssertionError(f"no {kinds} within {timeout} s")


def test_changes_and_control_changes_come_in_the_streams_order(scheduler: Scheduler) -> None:
    with scheduler.store.status_feed(flow=True, await_ms=200) as feed:
        wakeups = Wakeups(feed).start()
        try:
            first = scheduler.add_job("sample_jobs:Noop")
            scheduler.pause("sample_jobs:Noop")
            second = scheduler.add_job("sample_jobs:Noop")
            seen = [next_of(wakeups, {Kind.CHANGE, Kind.FLOW}) for _ in range(3)]
        finally:
            wakeups.stop()
    assert [item.kind for item in seen] == [Kind.CHANGE, Kind.FLOW, Kind.CHANGE]
    assert [item.change.job_id for item in seen if item.change is not None] == [first.id, second.id]


def test_a_wake_up_ends_the_wait_at_once_and_stop_ends_the_reader(scheduler: Scheduler) -> None:
    with scheduler.store.status_feed(flow=True, await_ms=int(READ_SECONDS * 1000)) as feed:
        wakeups = Wakeups(feed).start()
        threading.Timer(0.2, wakeups.wake).start()
        item = wakeups.next(30.0)  # a report of the manager, say: long before the 30 s
        assert item is not None and item.kind is Kind.WAKE
        wakeups.stop()
        assert not wakeups._thread.is_alive()
        assert wakeups.next(0) is not None  # stop wakes whoever sleeps on the queue


def test_no_read_runs_while_the_node_forks(scheduler: Scheduler) -> None:
    with scheduler.store.status_feed(flow=True, await_ms=200) as feed:
        wakeups = Wakeups(feed).start()
        try:
            with wakeups.forking():  # the reader is out of pymongo, and stays out, until the fork is done
                job = scheduler.add_job("sample_jobs:Noop")
                assert wakeups.next(0.6) is None
            assert next_of(wakeups, {Kind.CHANGE}).change.job_id == job.id  # type: ignore[union-attr]
        finally:
            wakeups.stop()
