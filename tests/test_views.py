"""The typed readers of stored documents (store.views, store.entries, store.records' JobFields) against hostile
BSON in the job, event, registry and flow-control collections, through the public paths (CLI ``jobs``/``show``/
``info``/``schedules`` with --json, the dashboard's JSON API, Process handles, add_job_once, requeue, a node).

SPEC 2: anyone may write any BSON there, and no node, worker, CLI command or dashboard view crashes or prints a
traceback because of it: a registry entry's workers that are no list of documents count as none and its values
are shown as strict JSON, a run end whose run is no number is listed under no run, and a job whose status is
malformed holds no add_job_once key (it never runs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from bson import Decimal128, Int64, ObjectId
from pymongo.database import Database
from starlette.testclient import TestClient

from helpers import TESTS_DIR, Node
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import DEFAULT_JOB_QUEUE, NODE_REGISTRY
from taskscheduler.errors import TaskSchedulerError
from taskscheduler.events import Emitter
from taskscheduler.ops.dashboard.app import create_app
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store import StatusChange

NOOP = "sample_jobs:Noop"
EVENTS = "taskscheduler.events"
FLOW = f"{DEFAULT_JOB_QUEUE}.flow"


@pytest.fixture
def run(server: EmbeddedServer, db_name: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``taskscheduler ARGS`` as a subprocess against the test server (as tests/test_cli.py runs it)."""

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ, PYTHONPATH=str(TESTS_DIR), TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name
        )
        env["TZ"] = "UTC"
        return subprocess.run(
            [sys.executable, "-m", "taskscheduler", *args], capture_output=True, text=True, env=env, timeout=60
        )

    return call


def _answered(out: subprocess.CompletedProcess[str]) -> None:
    """A CLI command answered in one piece: exit 0, no traceback."""
    assert out.returncode == 0 and "Traceback" not in out.stderr, (out.args, out.stderr[-2000:])


def _entry(**fields: Any) -> dict[str, Any]:
    """A live registry entry (not yet expired), as a node writes one, with ``fields`` as given."""
    now = datetime.now(timezone.utc)
    entry = {
        "_id": ObjectId(),
        "host": "h",
        "pid": 1,
        "started": now,
        "alive": now,
        "lease": 30.0,
        "expires": now + timedelta(hours=1),
        "version": "x",
        "modules": ["elsewhere"],
        "workers": [],
    }
    entry.update(fields)
    return entry


# -- the dashboard's node cards: a hostile registry entry is shown, never a 500 ------------------------------------

#: Registry values the dashboard's node card (views.node_view) passes on unchecked: it iterates
#: ``workers_value or []`` and ``modules_value or []`` (not NodeEntry.workers / .modules, which drop what is no
#: list of documents), and puts host, pid and version into the JSON response as stored.
NODE_CARD_CRASHES: dict[str, dict[str, Any]] = {
    "workers=['x']": {"workers": ["not a worker"]},  # WorkerEntry('x').id: str has no .get (AttributeError)
    "workers=5": {"workers": 5},  # iterating an int (TypeError)
    "modules=5": {"modules": 5},  # iterating an int (TypeError)
    "host=ObjectId": {"host": ObjectId()},  # JSONResponse cannot encode it (TypeError)
    "pid=NaN": {"pid": math.nan},  # JSONResponse refuses NaN (allow_nan=False: ValueError)
    "version=bytes": {"version": b"\x01"},  # not JSON (TypeError)
    "worker pid=Decimal128": {"workers": [{"_id": ObjectId(), "pid": Decimal128("1"), "job": None}]},
}


@pytest.mark.parametrize("fields", list(NODE_CARD_CRASHES.values()), ids=list(NODE_CARD_CRASHES))
def test_the_dashboard_survives_a_hostile_registry_entry(
    scheduler: Scheduler, db: Database[dict[str, Any]], fields: dict[str, Any]
) -> None:
    """Given one live registry entry holding a value of the wrong type (anyone may write the registry, SPEC 2);
    when the dashboard's summary (node cards), job table or job page is asked for (each reads the node cards:
    served_modules refreshes them); then each answers 200 with the entry shown (the lenient reading ``info`` and
    node_labels give it), not a 500."""
    job = scheduler.add_job(NOOP)
    db[NODE_REGISTRY].insert_one(_entry(**fields))
    with TestClient(create_app(scheduler), raise_server_exceptions=False) as web:
        for path in ("/api/summary", "/api/jobs", f"/api/jobs/{job.id}"):
            reply = web.get(path)
            assert reply.status_code == 200, (path, reply.text[:500])
        assert len(web.get("/api/summary").json()["nodes"]) == 1


def test_info_and_the_job_table_survive_the_same_registry_entries(
    scheduler: Scheduler, db: Database[dict[str, Any]], run: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """The same entries through NodeEntry's checked readings (``info`` and ``info --json``, ``health --node``):
    shown leniently, never raised."""
    db[NODE_REGISTRY].insert_many([_entry(**fields) for fields in NODE_CARD_CRASHES.values()])
    scheduler.add_job(NOOP)
    out = run("info", "--json")
    _answered(out)
    nodes = json.loads(out.stdout)["nodes"]
    assert len(nodes) == len(NODE_CARD_CRASHES)
    assert sorted(n["workers"] for n in nodes) == [0] * (len(NODE_CARD_CRASHES) - 1) + [1]  # only real documents
    assert all(isinstance(n["modules"], list) for n in nodes)
    _answered(run("info"))
    listed = db[NODE_REGISTRY].find_one({"workers": 5})
    assert listed is not None
    _answered(run("health", "--node", str(listed["_id"])))


# -- a run end whose run number is no number: listed under no run ----------------------------------------------

#: Run numbers an ended run's event may hold that ``int()`` refuses: counted_run_ends (core/runs.py, behind
#: Process.runs, ``show`` and the dashboard's job page) and MongoJobStore.recent_run_events (store/mongo/reads.py,
#: the job page) read ``int(event.run_or(0))`` / ``int(event.get("run", 0))``.
BAD_RUNS = {"str": "x", "null": None, "NaN": math.nan, "inf": math.inf, "list": [1], "document": {"n": 1}}


def _failed_with_a_run_end(scheduler: Scheduler, db: Database[dict[str, Any]], run_value: Any) -> ObjectId:
    """A job ended FAILED whose only run end (its outcome) stores ``run_value`` as its run number."""
    job = scheduler.add_job(NOOP)
    now = datetime.now(timezone.utc)
    error = {"class": "ValueError", "message": "boom", "traceback": ""}
    end = {
        "_id": ObjectId(),
        "job": job.id,
        "class": NOOP,
        "run": run_value,
        "status": int(JobStatus.FAILED),
        "time": now,
        "started": now,
        "ended": now,
        "worker": None,
        "error": error,
    }
    db[EVENTS].insert_one(end)
    db[DEFAULT_JOB_QUEUE].update_one(
        {"_id": job.id}, {"$set": {"status": int(JobStatus.FAILED), "outcome": end["_id"], "ended": now}}
    )
    return job.id


@pytest.mark.parametrize("run_value", list(BAD_RUNS.values()), ids=list(BAD_RUNS))
def test_a_handle_lists_the_runs_of_a_job_whose_run_end_holds_no_number(
    scheduler: Scheduler, db: Database[dict[str, Any]], run_value: Any
) -> None:
    """Given a run end (anyone may write an event, SPEC 2) whose ``run`` is no number; when a handle lists the
    job's runs; then it answers (the end shown, or left out), never raises."""
    job_id = _failed_with_a_run_end(scheduler, db, run_value)
    process = scheduler.get_job(job_id)
    assert process.error == {"class": "ValueError", "message": "boom", "traceback": ""}  # its outcome reads fine
    assert len(process.runs()) <= 1


def test_show_answers_for_a_job_whose_run_end_holds_no_number(
    scheduler: Scheduler, db: Database[dict[str, Any]], run: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    job_id = _failed_with_a_run_end(scheduler, db, "x")
    for args in (("show", str(job_id)), ("show", str(job_id), "--json")):
        _answered(run(*args))


@pytest.mark.parametrize("run_value", ["x", None, math.nan], ids=["str", "null", "NaN"])
def test_the_job_page_answers_for_a_job_whose_run_end_holds_no_number(
    scheduler: Scheduler, db: Database[dict[str, Any]], run_value: Any
) -> None:
    job_id = _failed_with_a_run_end(scheduler, db, run_value)
    with TestClient(create_app(scheduler), raise_server_exceptions=False) as web:
        page = web.get(f"/api/jobs/{job_id}")
        assert page.status_code == 200, page.text[:500]
        assert web.get("/api/jobs").status_code == 200


def test_run_numbers_of_other_number_types_are_read_as_numbers(
    scheduler: Scheduler, db: Database[dict[str, Any]], run: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """A run end's run stored as Int64 or a float lists as that run everywhere. (Stored as a bool it lists in
    ``show`` but not on the job page: recent_run_events' ``run >= 1`` query matches no bool.)"""
    ids = [_failed_with_a_run_end(scheduler, db, value) for value in (Int64(2), 2.0)]
    for job_id in ids:
        runs = scheduler.get_job(job_id).runs()
        assert len(runs) == 1 and runs[0]["error"]["message"] == "boom"
        out = run("show", str(job_id), "--json")
        _answered(out)
        assert len(json.loads(out.stdout)["runs"]) == 1
    with TestClient(create_app(scheduler), raise_server_exceptions=False) as web:
        for job_id in ids:
            page = web.get(f"/api/jobs/{job_id}")
            assert page.status_code == 200 and len(page.json()["runs"]) == 1, page.text[:500]


# -- what held: hostile job documents through every view, by JobView's lenient readings ---------------------------


#: Job documents of every malformed shape a view reads (ids, statuses, runs, times, options, workers, events).
def _hostile_jobs() -> list[dict[str, Any]]:
    base: dict[str, Any] = {"class": NOOP, "status": int(JobStatus.WAITING), "data": None, "options": {}}
    odd: list[dict[str, Any]] = [
        {"status": True},
        {"status": Int64(0)},
        {"status": 0.0},
        {"status": "waiting"},
        {"status": None},
        {"run": True},
        {"run": Int64(3)},
        {"run": 2.5},
        {"run": "x"},
        {"run": math.nan},
        {"worker": "w", "status": int(JobStatus.PROCESSING)},
        {"worker": 7},
        {"outcome": "o", "status": int(JobStatus.FAILED)},
        {"outcome": ObjectId(), "status": int(JobStatus.DONE)},  # an outcome event that is gone
        {"change": [1]},
        {"created": "yesterday", "started": 5, "ended": {"t": 1}, "expires": "x", "alive": []},
        {"progress": "half"},
        {"progress": math.inf},
        {"options": "x"},
        {"options": {"cron": 5, "interval": "x", "at": "soon", "timezone": 7, "priority": "high"}},
        {"options": {"interval": math.nan}},
        {"options": {"interval": 1e30}},
        {"options": {"cron": "not a cron"}, "status": int(JobStatus.POSTPONED)},
        {"options": {"depends_on": ["x", ObjectId()]}},
        {"options": {"limit_key": ["k"]}},
        {"class": 7},
        {"class": None},
        {"data": {"parent": "p"}},
        {"parent_run": "x", "children": "y"},
        {"key": 5, "once": ["x"]},
    ]
    return [{**base, "_id": ObjectId(), **fields} for fields in odd]


def test_every_view_answers_for_hostile_jobs_events_registry_entries_and_controls(
    scheduler: Scheduler, db: Database[dict[str, Any]], run: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """Given malformed jobs (and ids of other types), odd events, registry entries NodeEntry checks, and hostile
    flow controls; when every CLI view (with --json), the dashboard's JSON API and the handles read them; then all
    answer: malformed jobs listed as malformed, hostile controls limiting nothing."""
    jobs = _hostile_jobs()
    db[DEFAULT_JOB_QUEUE].insert_many(jobs)
    db[DEFAULT_JOB_QUEUE].insert_many(  # ids of other types: listed, never raised
        [{"_id": job_id, "class": NOOP, "status": 0, "options": {"interval": 60}} for job_id in ("s", 7, None)]
    )
    with_event = jobs[0]["_id"]
    db[EVENTS].insert_many(
        [
            {"_id": ObjectId(), "job": with_event, "status": "x", "run": 1},
            {"_id": ObjectId(), "job": with_event, "status": int(JobStatus.DONE), "error": "not a document"},
            {"_id": ObjectId(), "job": with_event, "status": int(JobStatus.FAILED), "run": 2, "error": {"message": 5}},
        ]
    )
    db[NODE_REGISTRY].insert_many(
        [_entry(_id="s"), _entry(modules="x", workers=None), _entry(started="now", alive=5, lease="x", host=None)]
    )
    db[FLOW].insert_many(
        [
            {"_id": "pause:7", "kind": "pause", "key": 7},
            {"_id": "other", "kind": "pause", "key": NOOP},  # another id than its kind and key: controls nothing
            {"_id": f"limit:{NOOP}", "kind": "limit", "key": NOOP, "concurrency": True, "rate": "x"},
            {"_id": "limit:k", "kind": "limit", "key": "k", "concurrency": 1, "holders": "x", "starts": [1]},
            {"_id": "limit:r", "kind": "limit", "key": "r", "rate": {"count": 1, "seconds": "x"}},
        ]
    )
    for args in (
        ("jobs", "--all"),
        ("jobs", "--all", "--json"),
        ("info",),
        ("info", "--json"),
        ("schedules",),
        ("schedules", "--json"),
        ("watch", "--once"),
    ):
        _answered(run(*args))
    listed = json.loads(run("jobs", "--all", "--json").stdout)
    assert len(listed) == len(jobs) + 3
    for job in jobs[:8]:
        out = run("show", str(job["_id"]), "--json")
        _answered(out)
        assert json.loads(out.stdout)["_id"] == str(job["_id"])
    assert scheduler.paused() == []  # neither pause controls anything
    with TestClient(create_app(scheduler), raise_server_exceptions=False) as web:
        for path in ("/api/jobs", "/api/flow", "/api/schedules", "/api/trends", "/api/jobs?status=waiting,failed"):
            assert web.get(path).status_code == 200, path
        for job in jobs:
            assert web.get(f"/api/jobs/{job['_id']}").status_code == 200, job
    for job in jobs:
        process = scheduler.get_job(job["_id"])
        process.to_dict()
        process.runs()
        assert isinstance(process.run, int) and isinstance(process.options, dict)
        assert process.error is None or isinstance(process.error, dict)


# -- what held: a node next to hostile registry entries and controls ---------------------------------------------


def test_a_node_runs_jobs_next_to_hostile_registry_entries_and_controls(
    scheduler: Scheduler, db: Database[dict[str, Any]], start_node: Callable[..., Node]
) -> None:
    """Given registry entries of every wrong shape (one a live-looking peer serving the jobs' module, lease
    infinite) and hostile pauses and limits (a limit whose only holder is no run of this library's); when a node
    serves jobs; then every job ends DONE and the node never logs a failed step."""
    far = datetime.now(timezone.utc) + timedelta(days=1)
    db[NODE_REGISTRY].insert_many(
        [
            _entry(_id="not an id", modules=["sample_jobs"]),
            _entry(modules="sample_jobs"),
            _entry(modules=[1, None, "sample_jobs"], alive="x"),
            _entry(modules=["sample_jobs"], alive=far, lease=math.inf),
            _entry(modules=["sample_jobs"], alive=far, lease=math.nan),
            _entry(modules=["sample_jobs"], alive=far, lease=True),
        ]
    )
    db[FLOW].insert_many(
        [
            {"_id": "pause:*", "kind": "pause", "key": ["*"]},
            {"_id": "pause:x", "kind": "pause", "key": "x", "extra": math.nan},
            {
                "_id": "limit:sample_jobs:Echo",
                "kind": "limit",
                "key": "sample_jobs:Echo",
                "concurrency": 1,
                "holders": [{"job": "x", "worker": 5, "since": "then"}, 7],
                "starts": [],
            },
            {"_id": f"limit:{NOOP}", "kind": "limit", "key": NOOP, "concurrency": Int64(1)},
        ]
    )
    node = start_node()
    jobs = [scheduler.add_job(NOOP, {"n": i}) for i in range(3)]
    jobs += [scheduler.add_job("sample_jobs:Echo", {"n": i}) for i in range(2)]
    scheduler.wait_for(jobs, timeout=60)
    assert all(p.refresh().status == JobStatus.DONE for p in jobs), [p.status for p in jobs]
    assert node.proc.poll() is None, node.output()
    log = node.output()
    assert "step failed" not in log and "Traceback" not in log, log[-3000:]


# -- an add_job_once key held by a job whose status is no status: the key is free -------------------------------


@pytest.mark.parametrize("status", ["x", None, [1]], ids=["str", "null", "list"])
def test_add_job_once_survives_a_key_holder_whose_status_is_no_status(
    new_scheduler: Callable[..., Scheduler], db: Database[dict[str, Any]], status: Any
) -> None:
    """Given the job holding an add_job_once key rewritten with a status that is none (SPEC 2); when the same job
    is added once again; then the call answers (a new job, or the library's own error naming the field), never a
    bare TypeError from comparing the stored value with JobStatus.DONE. (No size guard: the rewrite changes the
    document's size, as a hostile writer may.)"""
    scheduler = new_scheduler()
    first = scheduler.add_job_once(NOOP, {"a": 1})
    db[DEFAULT_JOB_QUEUE].update_one({"_id": first.id}, {"$set": {"status": status}})
    try:
        scheduler.add_job_once(NOOP, {"a": 1})
    except TaskSchedulerError:
        pass  # refused in the library's words: fine


def test_requeue_survives_a_key_holder_whose_status_is_no_status(
    new_scheduler: Callable[..., Scheduler],
    db: Database[dict[str, Any]],
    run: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """Given a canceled add_job_once job whose key a later job holds, that later job rewritten with a status that
    is none; when an operator requeues the first (``taskscheduler requeue``); then the command answers in one line
    (requeued, or refused), never with a traceback."""
    scheduler = new_scheduler()
    first = scheduler.add_job_once(NOOP, {"a": 1})
    scheduler.cancel_job(first.id)
    second = scheduler.add_job_once(NOOP, {"a": 1})
    assert second.id != first.id
    db[DEFAULT_JOB_QUEUE].update_one({"_id": second.id}, {"$set": {"status": "x"}})
    out = run("requeue", str(first.id))
    assert out.returncode in (0, 2) and "Traceback" not in out.stderr, out.stderr[-2000:]


# -- a run end seen in a change stream whose event is hostile -----------------------------------------------------


def test_a_listener_sees_the_status_of_a_change_whose_run_end_event_is_hostile(scheduler: Scheduler) -> None:
    """A change that ended a run and scheduled the next names the end's event; a listener builds that end from
    it. An event stored with a status that is no status (anyone may write one, SPEC 2) tells no end: the listener
    still sees the change's own status, and nothing raises."""
    p = scheduler.add_job("sample_jobs:Noop")
    hostile = ObjectId()
    scheduler.store.events.insert_one({"_id": hostile, "job": p.id, "status": "x", "run": 1, "time": "never"})
    emitter = Emitter()
    seen: list[int] = []
    emitter.on("*", lambda name, process: seen.append(int(process.status)))
    change = StatusChange(job_id=p.id, status=int(JobStatus.WAITING), document=None, run=2, ended_run=hostile)
    doc = dict(scheduler.store.find_job(p.id) or {}, run=2)
    scheduler.lifecycle.observe(change, doc, emitter)
    assert seen == [JobStatus.WAITING]
