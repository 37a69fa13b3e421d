"""The chain and mailer examples' own tests, as a user of the library writes them: the `taskscheduler.testing`
pytest plugin gives a scheduler on a fresh database, and `run_jobs` runs the jobs in the test's own process (no
queue node). Run from the repository root: `pytest examples/tests`.
"""

from __future__ import annotations

from examples.chain import MODULE
from taskscheduler import JobStatus, Scheduler
from taskscheduler.testing import run_jobs


def test_a_chain_passes_each_result_to_the_next_step(taskscheduler_scheduler: Scheduler) -> None:
    steps = taskscheduler_scheduler.add_chain(
        [(f"{MODULE}:Fetch", "b a b c b a"), (f"{MODULE}:Count", None), (f"{MODULE}:Top", 2)]
    )
    ran = run_jobs(taskscheduler_scheduler)
    assert [p.id for p in ran] == [p.id for p in steps]  # one after the other
    assert ran[-1].status == JobStatus.DONE and ran[-1].result == [["b", 3], ["a", 2]]


def test_a_chord_adds_up_its_group(taskscheduler_scheduler: Scheduler) -> None:
    group = [taskscheduler_scheduler.add_job(f"{MODULE}:Square", n) for n in (1, 2, 3)]
    total = taskscheduler_scheduler.add_job(f"{MODULE}:Total", None, depends_on=group)
    run_jobs(taskscheduler_scheduler)
    assert taskscheduler_scheduler.get_job(total.id).result == 14


def test_a_failed_step_cancels_the_rest_naming_it(taskscheduler_scheduler: Scheduler) -> None:
    broken, rest = taskscheduler_scheduler.add_chain([(f"{MODULE}:Broken", None), (f"{MODULE}:Count", None)])
    ran = run_jobs(taskscheduler_scheduler)
    assert [p.id for p in ran] == [broken.id]  # the rest never ran
    canceled = taskscheduler_scheduler.get_job(rest.id)
    assert canceled.status == JobStatus.CANCELED and str(broken.id) in canceled.error["message"]


def test_mails_under_a_limit_all_go(taskscheduler_scheduler: Scheduler) -> None:
    from examples.mailer import MODULE as MAILER
    from examples.mailer import SMTP

    taskscheduler_scheduler.set_limit(SMTP, concurrency=1)
    mails = [
        taskscheduler_scheduler.add_job(f"{MAILER}:SendMail", {"to": f"u{n}@example.com"}, limit_key=SMTP)
        for n in range(3)
    ]
    ran = run_jobs(taskscheduler_scheduler)
    assert sorted(p.result["to"] for p in ran) == [f"u{n}@example.com" for n in range(3)]
    assert {p.id for p in ran} == {p.id for p in mails}
