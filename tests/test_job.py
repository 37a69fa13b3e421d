"""Job classes: naming, importing, the AbstractJob accessors (upstream JobTest)."""

from __future__ import annotations

import pytest
from bson import ObjectId

import sample_jobs
from taskscheduler import AbstractJob, JobInterface
from taskscheduler.errors import InvalidArgumentError, InvalidJobError
from taskscheduler.job import class_path, load_job_class


def test_class_path_and_load() -> None:
    assert class_path(sample_jobs.Noop) == "sample_jobs:Noop"
    assert class_path("sample_jobs.Noop") == "sample_jobs:Noop"
    assert class_path("not_importable.Thing") == "not_importable.Thing"
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
