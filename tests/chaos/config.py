"""The numbers of a chaos seed: timings, slack of the checks, fault kinds and weights, the skewed node."""

from __future__ import annotations

import re
from pathlib import Path

JOB = "sample_jobs:ChaosJob"
#: The limit key of the harness's "limited" jobs (SPEC 8), set with concurrency LIMIT before any job is added.
LIMIT_KEY = "chaos-limit"
LIMIT = 2
ORPHANED_TIMEOUT = 2.0
#: How long faults are injected; then the system settles within SETTLE_SECONDS.
FAULT_SECONDS = 15.0
#: Claims the nodes may lose (another worker had the job first) per claim they win, on top of CLAIM_SLACK: each job
#: is claimed first by its preferred node alone; the faults (pauses, outages, kills) cost some more.
CLAIM_BUDGET = 0.5
CLAIM_SLACK = 10
SETTLE_SECONDS = 45.0
#: Overlap of activity below this is scheduling noise (one clock, time.monotonic(), for every process).
OVERLAP_SLACK = 0.02
#: Event times are stamped (on the server's clock, as each process reads it) when a change is prepared, before it is
#: written: a claim is stamped before it is sent and may take up to its bound (store.CLAIM_SECONDS, a quarter of
#: the lease when less) to be written, so the release that let it in may carry a later stamp by that much.
STAMP_SLACK = min(1.0, ORPHANED_TIMEOUT / 4) + 0.05
#: See Harness._kill_node.
NODE_AFTER_WORKER_KILL = 1.0
#: A graceful stop that reaches a job's code in the instant it returns may still end it (the last statement of
#: start() and its return to the worker are not one instant); the stop's grace (fencing.STOP_RETURN_SECONDS),
#: the watchdog's period and the manager's outside kill (manager.STOP_GRACE_SECONDS) bound when that can happen.
STOP_RETURN_RACE = 1.2
#: The stall window: the longest overlap tolerated when the first execution ran on a SIGSTOPped node (or its worker
#: was stopped): one heartbeat, plus slack.
STALL_OVERLAP = ORPHANED_TIMEOUT / 4 + 0.5
#: Activity logged this little after a lease's end on the server is clock noise (the server keeps milliseconds).
LEASE_SLACK = 0.1
#: A run that starts this little before it is due is clock noise (a node reads the server's clock over the wire).
EARLY_SLACK = 0.1
#: How long a job's subprocess may outlive its worker killed by the harness: the stall window.
CHILD_SLACK = STALL_OVERLAP
#: Commands a failpoint closes the connection on (never the handshake: the outage is of the data path).
FAILPOINT_COMMANDS = (
    ("find", "aggregate", "getMore", "insert", "update", "findAndModify", "delete"),
    ("update", "findAndModify"),
    ("insert", "delete"),
    ("find", "aggregate", "getMore"),
)
#: An outage of the whole data path (the ``outages`` fault).
OUTAGE_COMMANDS = FAILPOINT_COMMANDS[0]
FAULT_KINDS = (
    "kill_node",
    "term_node",
    "kill_worker",
    "stop_node",
    "failpoint",
    "cancel",
    "group_stop",
    "kill_worker_children",
    "outages",
    "term_during_end",
)
#: Weights of the faults drawn beyond one of each kind (one series of outages per seed is enough).
FAULT_WEIGHTS = (2, 1, 3, 1, 2, 2, 1, 2, 0, 1)
#: Faults that are a node's configuration, counted when they happen (claim pauses) or once per node (skew).
NODE_FAULTS = ("claim_pause", "skew")
#: Test-only failpoints (taskscheduler.failpoints) that make the moments term_during_end and claim_pause aim at.
RETURNED_FAILPOINT = "worker.returned=sleep:0.3@0.3"
CLAIM_PAUSE_CHANCE = 0.15
#: Debian's libfaketime (package faketime); the skewed node's clock is this many seconds off.
FAKETIME_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
CLOCK_SKEW = 120
#: A node's log line for each worker it forks.
SPAWNED = re.compile(r"worker ([0-9a-f]{24}) spawned \(pid (\d+)\)")
#: sitecustomize.py of the skewed node. libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC=1 (needed: faking the
#: monotonic clock too makes every threading wait with a timeout hang) fails clock_nanosleep(CLOCK_MONOTONIC,
#: TIMER_ABSTIME), which time.sleep() uses since Python 3.11, with EINVAL (libfaketime issue 426): sleep in
#: select() instead, on the same real monotonic clock.
SLEEP_WORKAROUND = '''"""time.sleep() that works under libfaketime 0.9.10 (FAKETIME_DONT_FAKE_MONOTONIC=1)."""
import select
import time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        select.select([], [], [], left)


time.sleep = _sleep
'''
ORPHANED_ERROR = "taskscheduler.errors.OrphanedJobError"
DEPENDENCY_ERROR = "taskscheduler.errors.DependencyFailedError"
TIMEOUT_ERROR = "taskscheduler.errors.JobTimeoutError"
RELEASED_ERROR = "taskscheduler.errors.JobReleasedError"
RECURRING = ("interval", "open")


def parse_seeds(value: str) -> list[int]:
    """``"5"``: seeds 0-4; ``"3,17"``: those; ``"10-19"``: that range (inclusive)."""
    value = str(value).strip()
    if value.isdigit():
        return list(range(int(value)))
    seeds: list[int] = []
    for part in value.split(","):
        low, _, high = part.strip().partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds
