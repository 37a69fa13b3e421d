"""The allow-list holds by the module that defines a job's code, and stored names are checked, never imported by
producers (SPEC 2: "Imports are allow-listed and route jobs"; issue 17 items 1, 5 and 8).

The fixture package tests/allowlist_fixtures has an allowed package (``allowed``) that defines a few jobs and also
holds, under names of its own, code defined elsewhere (``elsewhere``), a module attribute that is a module, a
re-export of its own submodule, aliases, private names and a ``__main__.py``; ``sidefx`` must never be imported.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.database import Database

import allowlist_fixtures.allowed
import allowlist_fixtures.allowed.jobs
import allowlist_fixtures.elsewhere
from helpers import TESTS_DIR, Node, wait_until
from taskscheduler import AsyncScheduler, JobStatus, Scheduler, Worker
from taskscheduler.client.job import class_path, load_job_class, serves
from taskscheduler.errors import InvalidArgumentError, InvalidJobError
from taskscheduler.ops.embedded import EmbeddedServer

ALLOWED = ("allowlist_fixtures.allowed",)
#: What a node serving ALLOWED may run: the jobs the allowed modules define, by the names they define them under
#: (and each top-level one in the dotted form too), with what each returns.
RUNNABLE = {
    "allowlist_fixtures.allowed:Good": "Good",
    "allowlist_fixtures.allowed:Good.Inner": "Good.Inner",
    "allowlist_fixtures.allowed:good": "good",
    "allowlist_fixtures.allowed.jobs:Hello": "Hello",
    "allowlist_fixtures.allowed.jobs:hello": "hello",
}
#: Modules no name may import in a node serving ALLOWED (the second import of the package, its script, sidefx).
NEVER_IMPORTED = (
    "allowlist_fixtures.allowed.__init__",
    "allowlist_fixtures.allowed.__main__",
    "allowlist_fixtures.sidefx",
)
#: Names that reach code an allowed module did not define under that name, each one way of getting there.
REFUSED = [
    "allowlist_fixtures.allowed:EvilJob",  # a class imported from elsewhere
    "allowlist_fixtures.allowed:elsewhere.EvilJob",  # through a module attribute
    "allowlist_fixtures.allowed.elsewhere.EvilJob",  # the same, dotted: read as module "allowed.elsewhere"
    "allowlist_fixtures.allowed:evil_function",  # a function imported from elsewhere
    "allowlist_fixtures.allowed:evil_alias",  # ... under another name
    "allowlist_fixtures.allowed:Good.Evil",  # an outside class held by an allowed class
    "allowlist_fixtures.allowed:Hello",  # a re-export of the allowed submodule's class
    "allowlist_fixtures.allowed.Hello",  # the same, dotted
    "allowlist_fixtures.allowed:Alias",  # an allowed class under a name it was not defined under
    "allowlist_fixtures.allowed:alias",  # an allowed function likewise
    "allowlist_fixtures.allowed:Good.method",  # a method
    "allowlist_fixtures.allowed:os.system",  # a builtin of a module attribute
    "allowlist_fixtures.allowed:os",  # a module attribute that is a module
    "allowlist_fixtures.allowed:jobs",  # the allowed submodule, as an attribute
    "allowlist_fixtures.allowed.__main__:X",  # the package's script
    "allowlist_fixtures.allowed.__init__:Good",  # the package imported a second time
    "allowlist_fixtures.allowed:_Private",  # private names
    "allowlist_fixtures.allowed:_private",
    "allowlist_fixtures.allowed:Good.__class__",  # dunder attributes
    "allowlist_fixtures.allowed:__builtins__",
    "allowlist_fixtures.allowed.Good.Inner",  # a nested class in the dotted form: module "allowed.Good"
    "allowlist_fixtures.allowed:Good\nFORGED log line",  # a newline: a forged log line
    "allowlist_fixtures.allowed:Good:Inner",
]
#: Names outside ALLOWED: a node serving ALLOWED never claims them.
OUTSIDE = ["allowlist_fixtures.elsewhere:EvilJob", "allowlist_fixtures.sidefx:Nothing", "allowlist_fixtures:mark"]


@pytest.fixture
def markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory the fixture modules leave their ``imported-``/``ran-`` markers in (also in a node's workers)."""
    directory = tmp_path / "markers"
    directory.mkdir()
    monkeypatch.setenv("ALLOWLIST_MARKERS", str(directory))
    return directory


def assert_nothing_forbidden_happened(markers: Path) -> None:
    """No job code of ``elsewhere`` (or private, or a method) ran, and nothing in NEVER_IMPORTED was imported."""
    left = sorted(p.name for p in markers.iterdir())
    assert [m for m in left if m != "imported-allowlist_fixtures.allowed"] == []
    for module in NEVER_IMPORTED:
        assert module not in sys.modules


def insert_raw(scheduler: Scheduler, job_class: str) -> ObjectId:
    """A job document whose class is ``job_class`` exactly, as anyone who can write the collection can store it
    (add_job would refuse most of these names)."""
    doc = scheduler.lifecycle.prepare("allowlist_fixtures.allowed:Good", None, {}, scheduler.get_options())
    doc["class"] = job_class
    scheduler.store.insert_job(doc)
    job_id: ObjectId = doc["_id"]
    return job_id


# -- the loader: every attribute path a stored name can take ---------------------------------------------------


def attribute_chains(obj: object, depth: int) -> Iterator[tuple[str, ...]]:
    """Every chain of attribute names reachable from ``obj`` through modules of the fixtures and classes."""
    for name in dir(obj):
        try:
            value = getattr(obj, name)
        except Exception:
            continue
        yield (name,)
        if depth > 1 and isinstance(value, (type, ModuleType)):
            outside = isinstance(value, ModuleType) and not value.__name__.startswith("allowlist_fixtures")
            for rest in attribute_chains(value, 1 if outside else depth - 1):  # os: os.system and the like
                yield (name, *rest)


def test_only_jobs_defined_in_allowed_modules_under_their_own_names_load(markers: Path) -> None:
    """Every attribute chain (three deep, dunders included) from the allowed package, its submodule and the
    outside module, put after every module path (real, outside, private, bogus) in both the colon and the dotted
    form: the loader returns exactly the jobs RUNNABLE names, each one the object defined under the name given,
    refuses every other with InvalidJobError, and imports nothing outside the allow-list."""
    chains: set[tuple[str, ...]] = set()
    for root in (allowlist_fixtures.allowed, allowlist_fixtures.allowed.jobs, allowlist_fixtures.elsewhere):
        chains.update(attribute_chains(root, 3))
    assert ("elsewhere", "EvilJob") in chains and ("os", "system") in chains and ("Good", "__class__") in chains
    modules = [
        "allowlist_fixtures",
        *ALLOWED,
        "allowlist_fixtures.allowed.jobs",
        "allowlist_fixtures.elsewhere",
        "allowlist_fixtures.allowed.elsewhere",
        "os",
        *NEVER_IMPORTED,
    ]
    before = set(sys.modules)
    loaded: dict[str, str] = {}
    tried = 0
    for module in modules:
        for chain in chains:
            for separator in ":.":
                name = f"{module}{separator}{'.'.join(chain)}"
                tried += 1
                try:
                    target = load_job_class(name, ALLOWED)
                except InvalidJobError:
                    continue
                defined = f"{target.__module__}:{target.__qualname__}"
                assert name in (defined, defined.replace(":", ".")), f"{name!r} loaded {defined}"
                assert serves(defined, ALLOWED)
                loaded[name] = defined
    assert tried > 10_000
    assert set(loaded.values()) == set(RUNNABLE)
    assert sorted(loaded) == sorted([*RUNNABLE, *(n.replace(":", ".") for n in RUNNABLE if "Inner" not in n)])
    assert {m for m in set(sys.modules) - before if not serves(f"{m}:X", ALLOWED)} == set()
    assert_nothing_forbidden_happened(markers)


def test_a_name_reaching_code_defined_elsewhere_is_an_invalid_job(markers: Path) -> None:
    loaded = []
    for name in REFUSED:
        for allowed in (ALLOWED, None):  # without an allow-list (the CLI's import check) alike
            try:
                load_job_class(name, allowed)
            except InvalidJobError:
                continue
            loaded.append(name)
    assert loaded == []
    assert_nothing_forbidden_happened(markers)


# -- a worker runs only those -----------------------------------------------------------------------------------


def test_a_worker_runs_only_jobs_defined_in_its_allowed_modules(
    db: Database[dict[str, Any]],
    markers: Path,
    caplog: pytest.LogCaptureFixture,
    new_scheduler: Callable[..., Scheduler],
) -> None:
    """Documents written straight into the collection: the runnable names end DONE with their job's result,
    every other name under an allowed module ends FAILED with InvalidJobError without running anything, names
    outside are never claimed, and no log line carries a stored name's newline."""
    caplog.set_level("DEBUG", logger="taskscheduler")
    scheduler = new_scheduler()
    worker = Worker(ObjectId(), new_scheduler(), db, job_modules=ALLOWED)
    runs = {**RUNNABLE, "allowlist_fixtures.allowed.Good": "Good", "allowlist_fixtures.allowed.jobs.hello": "hello"}
    names = [*runs, *REFUSED]
    ids = {name: insert_raw(scheduler, name) for name in [*names, *OUTSIDE]}
    for name in [*names, *OUTSIDE]:
        worker.process_one(ids[name])
    for name in names:
        p = scheduler.get_job(ids[name])
        if name in runs:
            assert (p.status, p.result) == (JobStatus.DONE, runs[name]), name
        else:
            assert p.status == JobStatus.FAILED and p.error is not None, name
            assert p.error["class"] == "taskscheduler.errors.InvalidJobError", (name, p.error)
    for name in OUTSIDE:
        assert scheduler.get_job(ids[name]).status == JobStatus.WAITING
    assert_nothing_forbidden_happened(markers)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("taskscheduler")]
    assert any("FORGED" in message for message in ours)
    forged = [message for message in ours if "\n" in message or "\r" in message]
    assert forged == []


@pytest.mark.e2e
def test_a_node_fails_names_that_reach_outside_code_and_logs_them_escaped(
    scheduler: Scheduler, start_node: Callable[..., Node], markers: Path
) -> None:
    """The issue's attack through a real node (``--import allowlist_fixtures.allowed``): each name fails with
    InvalidJobError in a worker, the outside job never runs, the package's script is never executed nor the
    package imported twice, and the stored newline forges no line in the node's log."""
    attacks = [
        "allowlist_fixtures.allowed:EvilJob",
        "allowlist_fixtures.allowed:elsewhere.EvilJob",
        "allowlist_fixtures.allowed.elsewhere.EvilJob",
        "allowlist_fixtures.allowed.__main__:X",
        "allowlist_fixtures.allowed.__init__:Good",
        "allowlist_fixtures.allowed:Good\nFORGED log line",
    ]
    ids = [insert_raw(scheduler, name) for name in attacks]
    good = scheduler.add_job(allowlist_fixtures.allowed.Good)
    node = start_node(modules=ALLOWED, env={"ALLOWLIST_MARKERS": str(markers)})
    assert good.wait(timeout=30).result == "Good"
    for job_id in ids:
        p = wait_until(lambda job_id=job_id: (p := scheduler.get_job(job_id)).status >= JobStatus.DONE and p, 30)
        assert p.status == JobStatus.FAILED and p.error is not None and p.error["class"].endswith("InvalidJobError")
    assert [m.name for m in markers.iterdir()] == ["imported-allowlist_fixtures.allowed"]  # by the node only
    log = node.output()
    assert "FORGED" in log and not any(line.startswith("FORGED") for line in log.splitlines()), log


# -- producers: names are checked, never imported ---------------------------------------------------------------

BAD_NAMES = [
    "a:b\nFORGED",
    "allowlist_fixtures.allowed:Good\r\nFORGED",
    "[link=https://example.com]x[/link]:Job",
    "pkg:Job\x1b[31m",
    "pkg:Job name",
    "pkg:Job:Other",
    "pkg:",
    ":Job",
    "pkg.",
    "pkg..mod:Job",
    "pkg-mod:Job",
    " pkg:Job",
    "",
    "pkg.__main__:X",
    "pkg.__init__:Job",
    "pkg:_Private",
    "pkg:Job.__class__",
    "_pkg.mod:Job",
    "__main__:Job",
]


def test_add_job_refuses_a_malformed_name_writing_nothing(scheduler: Scheduler) -> None:
    accepted = []
    for name in BAD_NAMES:
        for add in (scheduler.add_job, scheduler.add_job_once):
            try:
                add(name)
            except InvalidArgumentError:
                continue
            accepted.append(name)
    assert accepted == []
    assert scheduler.store.jobs.count_documents({}) == 0


def test_add_job_refuses_private_classes_and_functions(scheduler: Scheduler) -> None:
    for target in (allowlist_fixtures.allowed._Private, allowlist_fixtures.allowed._private):
        with pytest.raises(InvalidArgumentError, match="'_"):
            scheduler.add_job(target)
    assert scheduler.store.jobs.count_documents({}) == 0


def test_async_add_job_refuses_a_malformed_name(server: EmbeddedServer, db: Database[dict[str, Any]]) -> None:
    async def attempt() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(server.uri, tz_aware=True)
        aio = AsyncScheduler(client[db.name])
        try:
            for name in ("a:b\nFORGED", "pkg.__main__:X"):
                with pytest.raises(InvalidArgumentError):
                    await aio.add_job(name)
                with pytest.raises(InvalidArgumentError):
                    await aio.add_job_once(name)
        finally:
            await aio.close()
            await client.close()

    asyncio.run(attempt())
    assert db["taskscheduler.jobs"].count_documents({}) == 0


def test_names_are_stored_as_module_colon_qualname_without_importing(scheduler: Scheduler, markers: Path) -> None:
    """The dotted form is split without importing: its last segment is the class; the colon form is kept."""
    assert class_path("allowlist_fixtures.sidefx.Nothing") == "allowlist_fixtures.sidefx:Nothing"
    assert class_path("pkg.mod.Outer.Inner") == "pkg.mod.Outer:Inner"  # a nested class needs the colon form
    assert class_path("pkg.mod:Outer.Inner") == "pkg.mod:Outer.Inner"
    assert class_path("test") == "test"  # upstream's bare names: stored as given, served by no node
    assert not serves("test", ["test"])
    assert class_path(allowlist_fixtures.allowed.Good.Inner) == "allowlist_fixtures.allowed:Good.Inner"
    assert scheduler.add_job("allowlist_fixtures.sidefx.Nothing").job_class == "allowlist_fixtures.sidefx:Nothing"
    assert scheduler.add_job("allowlist_fixtures.sidefx:Nothing").job_class == "allowlist_fixtures.sidefx:Nothing"
    assert scheduler.add_job_once("allowlist_fixtures.sidefx.Nothing").job_class == "allowlist_fixtures.sidefx:Nothing"
    assert "allowlist_fixtures.sidefx" not in sys.modules and list(markers.iterdir()) == []


# -- the command line -------------------------------------------------------------------------------------------


def _cli(server: EmbeddedServer, db: Database[dict[str, Any]], markers: Path, *args: str) -> Any:

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        TASKSCHEDULER_MONGODB_URI=server.uri,
        TASKSCHEDULER_DATABASE=db.name,
        ALLOWLIST_MARKERS=str(markers),
    )
    return subprocess.run(
        [sys.executable, "-m", "taskscheduler", "add", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_cli_add_checks_the_name_and_where_the_job_is_defined(
    server: EmbeddedServer, scheduler: Scheduler, markers: Path
) -> None:
    for args in (
        ["a:b\nFORGED"],
        ["--no-import-check", "[link=https://example.com]x[/link]:Job"],
        ["allowlist_fixtures.allowed:EvilJob"],
    ):
        out = _cli(server, scheduler.store.db, markers, *args)
        assert out.returncode == 2 and out.stderr.startswith("Error:"), (args, out.stderr)
        assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "allowlist_fixtures.elsewhere:EvilJob" in out.stderr and "--no-import-check" in out.stderr
    assert scheduler.store.jobs.count_documents({}) == 0
    out = _cli(server, scheduler.store.db, markers, "--no-import-check", "allowlist_fixtures.sidefx.Nothing")
    assert out.returncode == 0, out.stderr
    assert scheduler.get_job(ObjectId(out.stdout.strip())).job_class == "allowlist_fixtures.sidefx:Nothing"
    assert "imported-allowlist_fixtures.sidefx" not in [m.name for m in markers.iterdir()]


@pytest.mark.e2e
def test_a_function_path_through_an_allowed_modules_import_never_runs(
    scheduler: Scheduler, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """SPEC 2/4: 'sample_jobs:os.popen' (a module sample_jobs imports) fails InvalidJobError and runs nothing."""
    pwned = tmp_path / "pwned"
    start_node()
    p = scheduler.add_job("sample_jobs:os.popen", f"touch {pwned}")
    p.wait(timeout=30)
    # Failed loading the name: nothing was called (a popen that ran would have ended the job DONE).
    assert p.status == JobStatus.FAILED and p.error is not None
    assert p.error["class"].endswith("InvalidJobError")
    assert not pwned.exists(), "a shell command ran through 'sample_jobs:os.popen'"


def test_function_job_path_cannot_name_a_method_or_an_imported_function() -> None:
    """A worker's loader refuses a class's method and a function another module defines."""
    for path in ("sample_jobs:os.popen", "sample_jobs:Noop.start", "sample_jobs:AbstractJob.update_progress"):
        with pytest.raises(InvalidJobError):
            load_job_class(path, ["sample_jobs"])
