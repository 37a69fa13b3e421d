"""WorkerManager options (upstream WorkerManagerTest) and pool behaviour driven over its pipe."""

from __future__ import annotations

import os
from multiprocessing import Pipe
from typing import Any

import pytest

from helpers import IdleWorkerFactory, wait_until
from taskscheduler import DefaultWorkerFactory, WorkerManager
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.node.protocol import JobKilled, Stop, WorkerExited, WorkerSpawned


def factory(**manager: Any) -> DefaultWorkerFactory:
    return DefaultWorkerFactory("mongodb://127.0.0.1:1/?directConnection=true", "x", manager_options=manager or None)


@pytest.mark.parametrize(
    "options",
    [
        {"min_children": 3, "max_children": 2},
        {"pm": "foo"},
        {"pm": "STATIC"},
        {"min_children": "foo"},
        {"max_children": "foo"},
        {"max_children": 0},
        {"min_children": True},
        {"bar": 1},
    ],
)
def test_invalid_options(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        WorkerManager(factory(), options=options)
    with pytest.raises(InvalidArgumentError):
        factory(**options)


def test_defaults_and_constants() -> None:
    m = WorkerManager(factory())
    assert m.get_options() == {"pm": "dynamic", "min_children": 1, "max_children": 2}
    assert (WorkerManager.PM_DYNAMIC, WorkerManager.PM_STATIC, WorkerManager.PM_ONDEMAND) == (
        "dynamic",
        "static",
        "ondemand",
    )
    assert m.set_options({"pm": "static", "min_children": 2}).get_options()["min_children"] == 2
    with pytest.raises(InvalidArgumentError):
        WorkerManager(object())  # type: ignore[arg-type]


def test_manager_forks_min_children_and_stops_them() -> None:
    """A manager in its own process: static pool of 2, then 'stop' kills both and reports their ends."""
    parent, child = Pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the manager process
        code = 0
        try:
            parent.close()
            WorkerManager(IdleWorkerFactory(), options={"pm": "static", "min_children": 2}).process(child)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    child.close()
    messages: list[Any] = []

    def read(kind: type, count: int) -> bool:
        try:
            while parent.poll(0.1):
                messages.append(parent.recv())
        except EOFError:
            pass  # the manager has exited
        return sum(1 for m in messages if isinstance(m, kind)) >= count

    wait_until(lambda: read(WorkerSpawned, 2), 10, what="two workers")
    spawned = [m for m in messages if isinstance(m, WorkerSpawned)]
    assert len({m.worker_id for m in spawned}) == 2 and len({m.pid for m in spawned}) == 2
    parent.send(Stop())
    wait_until(lambda: read(WorkerExited, 2), 10, what="two exits")
    exited = [m for m in messages if isinstance(m, WorkerExited)]
    assert {(m.worker_id, m.pid) for m in exited} == {(m.worker_id, m.pid) for m in spawned}
    assert all(m.signal is None for m in exited)  # idle workers leave on the stop's Exit message, unkilled
    assert not [m for m in messages if isinstance(m, JobKilled)]  # idle workers: no job to report
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
