"""Test-only faults at named points of a run: off unless the environment variable ``TASKSCHEDULER_FAILPOINTS`` is
set, so that tests and the chaos harness can pause or kill a worker exactly where no outside signal could aim.

``TASKSCHEDULER_FAILPOINTS="worker.claimed=stop:3;worker.returned=sleep:1@0.5"``: at the point ``worker.claimed``
the process stops itself (SIGSTOP, every thread, as a frozen container would) and is continued 3 s later; at
``worker.returned`` it sleeps 1 s in half of the hits. Actions: ``stop:SECONDS``, ``sleep:SECONDS``, ``kill`` (SIGKILL
of the process itself). With ``TASKSCHEDULER_FAILPOINTS_ONCE=DIR`` each point fires once across all processes (the
first to create ``DIR/<point>`` wins).

Points: ``worker.claimed`` (a claim was written; the manager has not heard of it and no job code ran),
``worker.returned`` (the job's code returned; its end is not recorded yet).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from typing import NamedTuple

ENVIRONMENT = "TASKSCHEDULER_FAILPOINTS"
ONCE_ENVIRONMENT = "TASKSCHEDULER_FAILPOINTS_ONCE"


class _Action(NamedTuple):
    kind: str
    seconds: float
    probability: float


_points: dict[str, _Action] | None = None


def _parse(text: str) -> dict[str, _Action]:
    points: dict[str, _Action] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, spec = item.partition("=")
        spec, _, chance = spec.partition("@")
        kind, _, seconds = spec.partition(":")
        points[name.strip()] = _Action(kind.strip(), float(seconds or 0), float(chance or 1))
    return points


def hit(name: str) -> None:
    """Apply the fault configured for point ``name``, if any (a dictionary lookup when none is)."""
    global _points
    if _points is None:
        _points = _parse(os.environ.get(ENVIRONMENT, ""))
    action = _points.get(name)
    if action is None or random.random() >= action.probability or not _first(name):
        return
    if action.kind == "sleep":
        time.sleep(action.seconds)
    elif action.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.kind == "stop":
        # Someone must continue us: a detached shell outlives the stop (and us, should we be killed meanwhile).
        subprocess.Popen(
            ["sh", "-c", f"sleep {action.seconds}; kill -CONT {os.getpid()}"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.kill(os.getpid(), signal.SIGSTOP)


def _first(name: str) -> bool:
    folder = os.environ.get(ONCE_ENVIRONMENT)
    if not folder:
        return True
    try:
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
