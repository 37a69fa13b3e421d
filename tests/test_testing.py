"""SPEC 9: the pytest plugin ``taskscheduler.testing``: its fixtures in a user's own test session (through the
``pytest11`` entry point), and ``run_jobs``, which runs due jobs in the calling process through the lifecycle."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

from taskscheduler import JobStatus, Scheduler
from taskscheduler.errors import InvalidArgumentError, WaitTimeoutError
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.testing import run_jobs

pytest_plugins = ["pytester"]


def test_run_jobs_runs_the_due_jobs_in_a_nodes_order(scheduler: Scheduler) -> None:
    first = scheduler.add_job("sample_jobs:Echo", "first")
    low = scheduler.add_job("sample_jobs:Echo", "low", priority=-5)
    urgent = scheduler.add_job("sample_jobs:Echo", "urgent", priority=5)
    second = scheduler.add_job("sample_jobs:Echo", "second")
    ran = run_jobs(scheduler)
    assert [p.id for p in ran] == [urgent.id, first.id, second.id, low.id]
    assert all(p.status == JobStatus.DONE for p in ran)
    assert [p.result for p in ran] == ["urgent", "first", "second", "low"]
    assert run_jobs(scheduler) == []  # nothing is due any more


def test_run_jobs_goes_through_the_lifecycle(scheduler: Scheduler) -> None:
    """Claim, events, the run's end, a retry due at once (run), an interval's next run (postponed, not run)."""
    seen: list[tuple[str, Any]] = []
    scheduler.on("*", lambda name, p: seen.append((name.removeprefix("taskscheduler.on"), p.id)))
    failing = scheduler.add_job("sample_jobs:Fail", "x", retry=1, retry_interval=0)
    recurring = scheduler.add_job("sample_jobs:Noop", interval=3600)
    later = scheduler.add_job("sample_jobs:Noop", at=time.time() + 3600)
    ran = run_jobs(scheduler)
    assert [p.id for p in ran] == [failing.id, recurring.id]  # each once, in the order they first started
    failed = scheduler.get_job(failing.id)
    assert failed.status == JobStatus.FAILED and len(failed.runs()) == 2
    assert failed.error is not None and failed.error["class"] == "ValueError"
    again = scheduler.get_job(recurring.id)
    assert again.status == JobStatus.POSTPONED and again.run == 2 and [r["status"] for r in again.runs()] == [3]
    assert scheduler.get_job(later.id).status == JobStatus.POSTPONED
    assert ("Processing", failing.id) in seen and ("Failed", failing.id) in seen and ("Done", recurring.id) in seen


def test_run_jobs_runs_a_postponed_job_once_due_and_children_by_their_parents_rules(scheduler: Scheduler) -> None:
    soon = scheduler.add_job("sample_jobs:Echo", "soon", at=time.time() + 0.5)
    parent = scheduler.add_job("sample_jobs:Noop")
    child = scheduler.add_job("sample_jobs:Noop", {"parent": parent.id})
    failing = scheduler.add_job("sample_jobs:Fail", "parent")
    orphan = scheduler.add_job("sample_jobs:Noop", {"parent": failing.id})
    ran = run_jobs(scheduler)
    assert [p.id for p in ran][:3] == [parent.id, child.id, failing.id]  # the orphan child never ran
    assert [p.status for p in ran][:3] == [JobStatus.DONE, JobStatus.DONE, JobStatus.FAILED]
    assert scheduler.get_job(orphan.id).status == JobStatus.CANCELED
    if soon.id not in [p.id for p in ran]:  # not yet due when the others were done
        time.sleep(0.6)  # its `at` passing is the point of the test, not a wait for something else
        assert [p.id for p in run_jobs(scheduler)] == [soon.id]
    assert scheduler.get_job(soon.id).status == JobStatus.DONE


def test_run_jobs_gives_up_on_jobs_that_stay_due(scheduler: Scheduler) -> None:
    scheduler.add_job("sample_jobs:Noop", interval=-1)  # runs again at once, for ever
    with pytest.raises(WaitTimeoutError, match=r"run_jobs: 1 job\(s\) still due after 1 s"):
        run_jobs(scheduler, timeout=1)
    with pytest.raises(InvalidArgumentError, match="timeout must be a positive number"):
        run_jobs(scheduler, timeout=0)


def test_a_malformed_job_ends_failed_without_stopping_run_jobs(new_scheduler: Callable[..., Scheduler]) -> None:
    scheduler = new_scheduler()  # no size guard: the test changes a document's size on purpose
    bad = scheduler.add_job("sample_jobs:Noop")
    scheduler.store.jobs.update_one({"_id": bad.id}, {"$set": {"options.retry": "many"}})
    good = scheduler.add_job("sample_jobs:Noop")
    ran = run_jobs(scheduler)
    assert scheduler.get_job(bad.id).status == JobStatus.FAILED
    assert scheduler.get_job(good.id).status == JobStatus.DONE and [p.id for p in ran] == [good.id]


USERS_JOBS = """
    from taskscheduler import AbstractJob

    class Greet(AbstractJob):
        def start(self):
            return f"hello {self.data}"
"""

USERS_TESTS = """
    from taskscheduler import JobStatus, Scheduler
    from taskscheduler.testing import run_jobs

    def test_greeting(taskscheduler_scheduler):
        assert isinstance(taskscheduler_scheduler, Scheduler)
        taskscheduler_scheduler.add_job("users_jobs:Greet", "ada")
        (job,) = run_jobs(taskscheduler_scheduler)
        assert job.status == JobStatus.DONE and job.result == "hello ada"

    def test_each_test_has_a_fresh_database(taskscheduler_db, taskscheduler_scheduler):
        assert taskscheduler_scheduler.db.name == taskscheduler_db.name
        assert taskscheduler_db.name not in SEEN
        SEEN.append(taskscheduler_db.name)
        assert run_jobs(taskscheduler_scheduler) == []

    def test_again(taskscheduler_db):
        assert taskscheduler_db.name not in SEEN
        SEEN.append(taskscheduler_db.name)

    SEEN = []
"""


def _users_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(users_jobs=textwrap.dedent(USERS_JOBS), test_users=textwrap.dedent(USERS_TESTS))
    pytester.syspathinsert()


def test_the_plugin_serves_a_users_tests_on_the_server_it_is_given(
    pytester: pytest.Pytester, server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the entry point alone (no conftest): TASKSCHEDULER_TEST_URI names the server; databases dropped."""
    _users_project(pytester)
    monkeypatch.setenv("TASKSCHEDULER_TEST_URI", server.uri)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    before = set(server_databases(server))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=3)
    assert set(server_databases(server)) <= before, "a test database was left behind"


def test_the_plugin_starts_an_embedded_server_when_none_is_named(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _users_project(pytester)
    monkeypatch.delenv("TASKSCHEDULER_TEST_URI", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-k", "greeting")
    result.assert_outcomes(passed=1)


def test_the_plugin_is_inert_in_a_session_that_does_not_use_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_other="""
        import subprocess

        def test_nothing_started():
            found = subprocess.run(["pgrep", "-f", "-P", str(__import__("os").getpid()), "secantus"],
                                   capture_output=True)
            assert found.stdout == b""
        """
    )
    monkeypatch.delenv("TASKSCHEDULER_TEST_URI", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "--trace-config")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*registered*taskscheduler.testing*"])


def server_databases(server: EmbeddedServer) -> list[str]:
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    try:
        return [name for name in client.list_database_names() if name.startswith("test_")]
    finally:
        client.close()
