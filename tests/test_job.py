"""Job classes: naming, importing, the AbstractJob accessors (upstream JobTest)."""

from __future__ import annotations

import pytest
from bson import ObjectId

import sample_jobs
from taskscheduler import AbstractJob, JobInterface
from taskscheduler.client.job import class_path, load_job_class
from taskscheduler.errors import InvalidArgumentError, InvalidJobError


def test_class_path_and_load() -> None:
    assert class_path(sample_jobs.Noop) == "sample_jobs:Noop"
    assert class_path("sample_jobs.Noop") == "sample_jobs:Noop"
    assert class_path("not_importable.Thing") == "not_importable:Thing"  # split without importing
    assert load_job_class("sample_jobs:Echo") is sample_jobs.Echo
    assert load_job_class("sample_jobs.Echo") is sample_jobs.Echo


@pytest.mark.parametrize("path", ["nope:Job", "sample_jobs:Missing", "sample_jobs:os", "builtins:dict"])
def test_load_errors(path: str) -> None:
    with pytest.raises(InvalidJobError):
        load_job_class(path)


def test_local_classes_are_refused() -> None:
    class Local(AbstractJob):
        def start(self) -> None:
            return None

    with pytest.raises(InvalidArgumentError, match="importable"):
        class_path(Local)


def test_accessors() -> None:
    job = sample_jobs.Echo()
    assert isinstance(job, JobInterface)
    job_id = ObjectId()
    assert job.set_data({"foo": "bar"}) is job and job.get_data() == {"foo": "bar"}
    assert job.set_id(job_id) is job and job.get_id() == job_id
    assert job.start() == {"foo": "bar"}


def test_main_classes_are_refused_with_advice() -> None:
    main_class = type("Script", (AbstractJob,), {"start": lambda self: None, "__module__": "__main__"})
    for given in (main_class, "__main__:Script", "__main__.Script"):
        with pytest.raises(InvalidArgumentError, match="move it into a module"):
            class_path(given)


def test_allow_list_covers_modules_and_submodules_only() -> None:
    from taskscheduler.client.job import serves

    assert serves("sample_jobs:Noop", ["sample_jobs"])
    assert serves("pkg.jobs.mail:Send", ["pkg.jobs"]) and serves("pkg.jobs.mail.Send", ["pkg.jobs"])
    assert not serves("pkg.jobsx:Send", ["pkg.jobs"]) and not serves("this:Anything", ["sample_jobs"])


def test_a_stored_class_outside_the_allow_list_is_never_imported() -> None:
    import sys

    assert "antigravity" not in sys.modules
    with pytest.raises(InvalidJobError, match="outside this node's allowed modules"):
        load_job_class("antigravity:Anything", ["sample_jobs"])
    with pytest.raises(InvalidJobError):
        load_job_class("antigravity.Anything", ["sample_jobs"])
    assert "antigravity" not in sys.modules  # its top-level code (opening a browser) never ran
    assert load_job_class("sample_jobs:Echo", ["sample_jobs"]) is sample_jobs.Echo


def test_a_status_prints_as_its_name_and_stores_as_its_number() -> None:
    import json

    from taskscheduler import JobStatus

    assert str(JobStatus.DONE) == "DONE" and f"{JobStatus.FAILED}" == "FAILED"
    assert "{}".format(JobStatus.WAITING) == "WAITING"  # noqa: UP032 (str.format is a path of its own)
    assert JobStatus.DONE == 3 and f"{JobStatus.DONE:d}" == "3" and json.dumps({"s": JobStatus.TIMEOUT}) == '{"s": 6}'
