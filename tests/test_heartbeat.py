"""The heartbeat thread of a queue node: lease renewals beside the node's loop, fences, kills of lost jobs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from bson import ObjectId

from helpers import (
    claim,
    wait_until,
)
from taskscheduler import Scheduler
from taskscheduler.node.fencing import lease_clock
from taskscheduler.node.heartbeat import Heartbeat
from taskscheduler.node.protocol import Fence, KillJob, KillReason


def test_leases_are_renewed_beside_the_loop_and_lost_jobs_killed(scheduler: Scheduler) -> None:
    mine, taken = scheduler.add_job("sample_jobs:Noop"), scheduler.add_job("sample_jobs:Noop")
    _, worker = claim(scheduler, mine.id, lease=2)
    _, other = claim(scheduler, taken.id, lease=2)
    sent: list[Any] = []
    stale = ObjectId()
    owners = {mine.id: (worker, 1), taken.id: (stale, 1)}  # the second was taken over by `other`
    beat = Heartbeat(scheduler.lifecycle, 2.0, lambda: owners, lambda m: sent.append(m) or True, logging.getLogger())
    before = scheduler.store.find_job(mine.id)["expires"]
    began = lease_clock()
    beat.start()
    try:
        wait_until(lambda: any(isinstance(m, Fence) for m in sent), 5, what="a renewal")
    finally:
        beat.stop()
    assert beat.period == pytest.approx(2 / 6)
    assert scheduler.store.find_job(mine.id)["expires"] > before
    assert KillJob(taken.id, stale, KillReason.LOST, 1) in sent and not any(
        isinstance(m, KillJob) and m.job_id == mine.id for m in sent
    )
    fence = next(m for m in sent if isinstance(m, Fence))
    assert began <= fence.deadline - 1.0 <= lease_clock()  # half a lease from the renewal, on the fences' clock
    assert fence.renewed == ((mine.id, worker),)  # only what was renewed may run on
