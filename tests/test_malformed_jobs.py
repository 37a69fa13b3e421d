"""Malformed job documents never stop anything (SPEC 2), and stored text never drives the terminal (SPEC 7).

The fuzz writes documents straight into the job collection (anyone who can write it can), with every field
missing or of a wrong type and unknown statuses, while real queue nodes serve valid jobs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import bson
import pytest
from bson import CodecOptions, Decimal128, Int64, ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo.database import Database
from starlette.testclient import TestClient

from helpers import TESTS_DIR, Node, free_port, wait_until, worker_factory
from taskscheduler import JobStatus, Queue, Scheduler
from taskscheduler.cli.display import visible
from taskscheduler.client.process import Process
from taskscheduler.constants import DEFAULT_JOB_QUEUE, NO_WORKER, UNSET_TIME
from taskscheduler.errors import InvalidJobError
from taskscheduler.node.backlog import Backlog
from taskscheduler.node.protocol import RunJob
from taskscheduler.ops.dashboard.app import ACTION_HEADER, create_app
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.store.schema import problem

NOOP = "sample_jobs:Noop"
REJECTED = "taskscheduler.errors.InvalidJobError"
MISSING = object()
NOW = datetime.now(timezone.utc)  # stored times of the cases: any past or near time will do


class Case:
    """One document to store: how it differs from a valid job, and what must become of it: ``failed`` (ended
    FAILED with an InvalidJobError naming ``field``), ``kept`` (left as stored: nothing to route, or it cannot
    take that write in a capped collection), or ``done`` (odd but valid: it runs)."""

    def __init__(self, label: str, doc: dict[str, Any], expect: str, field: str = "") -> None:
        self.label, self.doc, self.expect, self.field = label, doc, expect, field


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = {**doc, "options": dict(doc["options"]), "data": dict(doc["data"])}
    head, _, tail = path.partition(".")
    target = doc[head] if tail else doc
    key = tail or head
    if value is MISSING:
        target.pop(key, None)
    else:
        target[key] = value
    return doc


def cases(base: Callable[[], dict[str, Any]]) -> list[Case]:
    """Every field of a job document missing or of a wrong type, one at a time, and unknown statuses."""
    found: list[Case] = []

    def add(path: str, values: list[Any], expect: str, status: int = JobStatus.WAITING, **extra: Any) -> None:
        for value in values:
            doc = _set(dict(base(), status=status, **extra), path, value)
            label = f"{path}={'missing' if value is MISSING else repr(value)}@{status}"
            found.append(Case(label, doc, expect, path))

    wrong = [MISSING, None, "x", [1], {"a": 1}]
    add("_id", ["x", 7, 1.5], "failed")
    add("class", [MISSING, None, [1], {"a": 1}, 7, "", ObjectId(), b"\x00"], "failed")
    add("class", ["x"], "kept")  # a name no node serves: it waits, and `info` names it
    add("status", [MISSING, None, 99, -1, "0", 0.0, Int64(0), Decimal128("0"), True, [0], 1.5], "kept")
    add("run", [*wrong, 0, -1, 1.5, Int64(1)], "failed")
    for name in ("created", "started", "alive", "expires"):
        add(name, [MISSING, "x", 0], "failed")
    for name in ("ended", "outcome", "change"):  # what ending it FAILED writes: a capped document cannot take it
        add(name, [MISSING, "x", 0], "kept")
    for name in ("lease", "progress"):
        add(name, [MISSING, "x", 1, math.nan, None], "failed")
    add("worker", [MISSING, "x", None], "failed")
    for name in ("orphaned", "failures"):
        add(name, [MISSING, "x", -1, 1.5, Int64(0)], "failed")
    add("options", [MISSING, None, "x", [1], 7], "failed")
    for status in (JobStatus.WAITING, JobStatus.POSTPONED):
        add("options.at", [MISSING, "x", math.nan, -1.0, 1e300, 0, None, NOW], "failed", status)
    add("options.unknown", [1], "done", JobStatus.POSTPONED)  # an option of another version is no harm
    add("run", ["x"], "failed", JobStatus.POSTPONED)
    for name in ("interval", "retry", "retry_interval", "timeout", "retry_max_interval", "priority"):
        add(f"options.{name}", ["x", 1.5, True, 10**12], "failed")
    for name in ("force_spawn", "ignore_data", "retry_jitter", "interval_reference"):
        add(f"options.{name}", [7, "x", None], "failed")
    add("options.retry_backoff", ["x", None, 0.5, 1e308], "failed")
    for name in ("cron", "timezone"):
        add(f"options.{name}", [7, None], "failed")
    add("data", ["x", [1], None, 1.5], "done")
    add("data.parent", [7, "x", ObjectId()], "done")
    # A node does not judge what it does not serve: it waits for its own nodes.
    add("options.retry", ["x"], "kept", JobStatus.WAITING, **{"class": "otherjobs:Job"})
    # Runs whose lease ran out: the sweep ends the malformed ones and goes on with the others.
    expired = {"worker": ObjectId(), "alive": NOW - timedelta(minutes=5), "expires": NOW - timedelta(minutes=4)}
    add("worker", [MISSING, "x"], "failed", JobStatus.PROCESSING, **{k: v for k, v in expired.items() if k != "worker"})
    add("options", ["x"], "failed", JobStatus.PROCESSING, **expired)
    add("data.n", [0], "done", JobStatus.PROCESSING, **expired)  # a valid orphan: put back, then run
    # Every field missing.
    found.append(Case("empty", {"_id": ObjectId()}, "kept"))
    found.append(Case("status only", {"_id": ObjectId(), "status": 0}, "kept", "class"))
    found.append(Case("class and status", {"_id": ObjectId(), "class": NOOP, "status": 0}, "kept", "run"))
    return found


def insert_cases(scheduler: Scheduler, batch: str) -> list[Case]:
    defaults = scheduler.get_options()

    def base() -> dict[str, Any]:
        at = NOW.timestamp() + 1.0  # a POSTPONED job comes due at once
        doc = scheduler.lifecycle.prepare(NOOP, {"batch": batch}, {"at": at}, defaults)
        return dict(doc, status=int(JobStatus.WAITING))

    found = [c for c in cases(base) if isinstance(c.doc["_id"], ObjectId) or batch == "before"]  # ids are unique
    scheduler._db[DEFAULT_JOB_QUEUE].insert_many([c.doc for c in found], ordered=False)
    return found


def outcome_of(scheduler: Scheduler, case: Case) -> tuple[Any, Any]:
    stored = scheduler._db[DEFAULT_JOB_QUEUE].find_one({"_id": case.doc["_id"]})
    assert stored is not None, case.label
    event = scheduler._db["taskscheduler.events"].find_one({"_id": stored.get("outcome")})
    return stored, event


def settled(scheduler: Scheduler, case: Case) -> bool:
    stored, event = outcome_of(scheduler, case)
    if case.expect == "kept":
        return True
    status = JobStatus.FAILED if case.expect == "failed" else JobStatus.DONE
    return bool(stored.get("status") == status and event is not None)


def cli_env(server: EmbeddedServer, database: str, **extra: str) -> dict[str, str]:
    pythonpath = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath, TASKSCHEDULER_MONGODB_URI=server.uri)
    return dict(env, TASKSCHEDULER_DATABASE=database, **extra)


@pytest.fixture
def run(server: EmbeddedServer, db_name: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    def call(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "taskscheduler", *args],
            capture_output=True,
            text=True,
            env=cli_env(server, db_name, **env),
            timeout=60,
        )

    return call


#: Runs ``taskscheduler show ID`` for every id given on stdin in one process (a process each would take
#: minutes): prints, per id, the exit code and whether an exception escaped the command (a traceback).
SHOW_EACH = """
import contextlib, io, json, sys, traceback
from taskscheduler.cli.commands import main
found = {}
for job_id in sys.stdin.read().split():
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main(["show", job_id])
    except SystemExit as exc:
        found[job_id] = [exc.code, out.getvalue()]
    except BaseException:
        found[job_id] = ["traceback", traceback.format_exc()]
print(json.dumps(found))
"""


def test_malformed_documents_never_stop_nodes_workers_or_views(
    scheduler: Scheduler, start_node: Callable[..., Node], run: Any, server: EmbeddedServer
) -> None:
    """Given malformed documents stored before any node starts, more while it runs, and a second node started
    after them; when they serve valid jobs meanwhile; then every valid job ends DONE, every malformed one is
    ended FAILED naming its field or left as stored, no node or worker stops, and jobs/show/info, the
    dashboard's JSON API and metrics all answer."""
    valid = [scheduler.add_job(NOOP, {"n": i}) for i in range(3)]
    parent = scheduler.add_job(NOOP, {"n": "parent"})
    kids = [{"_id": ObjectId(), "class": NOOP, "status": s, "data": {"parent": parent.id}} for s in (-1, 4.0, "x")]
    scheduler._db[DEFAULT_JOB_QUEUE].insert_many(kids)  # a parent's worker reads its children's statuses
    stored = insert_cases(scheduler, "before")
    port = free_port()
    first = start_node("--metrics-port", str(port))
    valid += [scheduler.add_job(NOOP, {"n": i}) for i in range(3, 6)]
    stored += insert_cases(scheduler, "while")
    second = start_node()
    valid += [scheduler.add_job(NOOP, {"n": i}) for i in range(6, 9)]

    scheduler.wait_for([*valid, parent], timeout=60)
    assert all(p.status == JobStatus.DONE for p in [*valid, parent]), [p.error for p in valid]
    def unsettled() -> list[str]:
        return [case.label for case in stored if not settled(scheduler, case)]

    try:
        wait_until(lambda: not unsettled(), timeout=30, interval=0.5)
    except AssertionError:
        raise AssertionError(f"not ended as expected: {unsettled()}") from None
    for case in stored:
        doc, event = outcome_of(scheduler, case)
        if case.expect == "failed":
            assert event["error"]["class"] == REJECTED, case.label
            assert f"field '{case.field}'" in event["error"]["message"], (case.label, event["error"]["message"])
        elif case.expect == "kept":
            raw = scheduler._db.get_collection(DEFAULT_JOB_QUEUE, CodecOptions(RawBSONDocument))
            assert raw.find_one({"_id": case.doc["_id"]}).raw == bson.encode(case.doc), case.label  # untouched
    for node in (first, second):
        assert node.proc.poll() is None, node.output()
        log = node.output()
        assert "queue node step failed" not in log and "worker process died" not in log, log
    assert "skipping malformed job" in first.output() + second.output()

    # The operator's views: every command answers, in one piece.
    for args in (("jobs",), ("jobs", "--all"), ("jobs", "--all", "--json"), ("info",), ("info", "--json")):
        out = run(*args)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (args, out.stderr)
    assert "malformed" in run("jobs", "--all").stdout
    assert "malformed" in json.loads(run("info", "--json").stdout)["jobs"]["by_status"]
    shown = [c for c in stored if isinstance(c.doc["_id"], ObjectId)]
    each = subprocess.run(
        [sys.executable, "-c", SHOW_EACH],
        input=" ".join(str(c.doc["_id"]) for c in shown),
        capture_output=True,
        text=True,
        env=cli_env(server, scheduler._db.name),
        timeout=120,
    )
    assert each.returncode == 0, each.stderr
    for job_id, (code, output) in json.loads(each.stdout).items():
        assert code == 0, (job_id, output)
    # Actions on what cannot take them: refused in one line, nothing written.
    odd_status = next(c for c in stored if c.label == "status=99@WAITING")
    rejected = next(c for c in stored if c.label == "class=7@WAITING")
    for args in (("cancel", str(odd_status.doc["_id"])), ("requeue", str(rejected.doc["_id"]))):
        out = run(*args)
        assert out.returncode == 2 and "it is malformed" in out.stderr, (args, out.stderr)
        assert len(out.stderr.splitlines()) == 1, out.stderr

    # The dashboard's JSON API.
    with TestClient(create_app(scheduler)) as web:
        rows = web.get("/api/jobs")
        assert rows.status_code == 200 and rows.json()["total"] == len(stored) + len(valid) + 1 + len(kids)
        assert {r["status"] for r in rows.json()["jobs"]} >= {"malformed", "failed", "done"}
        assert web.get("/api/summary").status_code == 200
        assert web.get("/api/jobs?status=waiting").status_code == 200
        for case in shown:
            assert web.get(f"/api/jobs/{case.doc['_id']}").status_code == 200, case.label
        refused = web.post(f"/api/jobs/{odd_status.doc['_id']}/cancel", headers={ACTION_HEADER: "1"})
        assert refused.status_code == 409 and "malformed" in refused.json()["error"]

    # Metrics: scraped until the node has counted the jobs.
    def jobs_counted() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return "taskscheduler_jobs{" in reply.read().decode()

    wait_until(jobs_counted, timeout=20, what="waiting jobs in /metrics")
    assert first.proc.poll() is None, first.output()


def test_a_job_made_malformed_while_it_runs_never_holds_up_its_node(
    db: Database[dict[str, Any]], start_node: Callable[..., Node], new_scheduler: Callable[..., Scheduler]
) -> None:
    """Given a running job whose document is made malformed (its options no document); when its timeout kills
    it; then its node ends it FAILED naming the field and goes on recording the next job's timeout."""
    scheduler = new_scheduler()  # no size guard: this test changes a document's size on purpose
    node = start_node()
    odd = scheduler.add_job("sample_jobs:Sleep", {"seconds": 30}, timeout=3)  # time to change it while it runs
    wait_until(lambda: odd.refresh().status == JobStatus.PROCESSING, timeout=20)
    db[DEFAULT_JOB_QUEUE].update_one({"_id": odd.id}, {"$set": {"options": "x"}})
    after = scheduler.add_job("sample_jobs:Sleep", {"seconds": 30}, timeout=1)
    scheduler.wait_for([odd, after], timeout=30)
    assert odd.status == JobStatus.FAILED and odd.error is not None, odd.error
    assert odd.error["class"] == REJECTED and "field 'options'" in odd.error["message"]
    assert after.status == JobStatus.TIMEOUT, after.error
    assert node.proc.poll() is None and "queue node step failed" not in node.output(), node.output()


def test_malformed_children_do_not_stop_canceling_their_parent(scheduler: Scheduler) -> None:
    """A parent's cancel cancels its unfinished children; a child whose status is no status is left alone."""
    parent = scheduler.add_job(NOOP, at=datetime.now(timezone.utc).timestamp() + 3600)
    child = scheduler.add_job(NOOP, {"parent": parent.id})
    odd = {"_id": ObjectId(), "class": NOOP, "status": -1, "data": {"parent": parent.id}}
    scheduler._db[DEFAULT_JOB_QUEUE].insert_one(odd)
    scheduler.cancel_job(parent.id)
    assert parent.refresh().status == JobStatus.CANCELED and child.refresh().status == JobStatus.CANCELED
    assert scheduler._db[DEFAULT_JOB_QUEUE].find_one({"_id": odd["_id"]})["status"] == -1


def test_every_job_this_library_writes_fits_the_schema(scheduler: Scheduler) -> None:
    """The checks refuse nothing this library stores itself, through a job's whole life."""
    opts: list[dict[str, Any]] = [{}, {"at": NOW.timestamp() + 60}, {"cron": "@daily", "timezone": "Europe/Paris"}]
    opts += [{"retry": -1, "retry_backoff": 2.0, "retry_jitter": True, "priority": 100, "force_spawn": True}]
    jobs = [scheduler.add_job(NOOP, {"i": i}, o) for i, o in enumerate(opts)]
    for job in jobs:
        doc = scheduler._db[DEFAULT_JOB_QUEUE].find_one({"_id": job.id})
        assert problem(doc, capped=True) is None, doc
        assert job.malformed is None
    scheduler.cancel_job(jobs[0].id)
    requeued = scheduler.requeue_job(jobs[0].id)
    assert problem(scheduler._db[DEFAULT_JOB_QUEUE].find_one({"_id": requeued.id}), capped=True) is None


def test_a_backlog_orders_jobs_whatever_their_options_hold() -> None:
    backlog = Backlog()
    odd: list[Any] = ["x", [1], 7, None, {"priority": "high", "at": math.nan}, {"priority": 5, "at": "soon"}]
    for options in odd:
        backlog.add(RunJob({"_id": ObjectId(), "options": options, "created": "yesterday"}, 30.0))
    backlog.add(RunJob({"_id": ObjectId(), "options": {"priority": 9}}, 30.0))
    assert backlog.pop().doc["options"] == {"priority": 9}
    assert backlog.pop().doc["options"] == {"priority": 5, "at": "soon"}
    assert len([backlog.pop() for _ in range(len(backlog))]) == len(odd) - 1


def _terminal_injection(db: Database[dict[str, Any]], scheduler: Scheduler) -> tuple[ObjectId, ObjectId]:
    linked = "sample_jobs:[link=https://evil.example/]Noop[/link]"
    job = {"_id": ObjectId(), "class": linked, "status": 0, "data": None, "options": {}}
    message = "boom\x1b]0;pwned\x07\x1b]8;;https://evil.example/\x07click\x1b]8;;\x07\rover\x08\u202etxt"
    failed = scheduler.add_job(NOOP)
    error = {"class": "x\x1b[2J", "message": message, "traceback": f"line 1\n{message}"}
    event = {"_id": ObjectId(), "job": failed.id, "class": NOOP, "run": 1, "status": 4, "time": NOW, "error": error}
    db["taskscheduler.events"].insert_one(event)
    db[DEFAULT_JOB_QUEUE].update_one({"_id": failed.id}, {"$set": {"status": 4, "outcome": event["_id"]}})
    db[DEFAULT_JOB_QUEUE].insert_one(job)
    return job["_id"], failed.id


def test_cli_output_never_passes_markup_or_control_characters_from_stored_data(
    db: Database[dict[str, Any]], scheduler: Scheduler, run: Any
) -> None:
    """Given a class name holding console markup and an error holding escape sequences; when jobs, show and
    info print them; then the markup is printed as text and every control character as a visible escape."""
    linked_id, failed_id = _terminal_injection(db, scheduler)
    printed = {args: run(*args) for args in (("jobs", "--all"), ("show", str(failed_id)), ("show", str(linked_id)))}
    printed[("info",)] = run("info")
    for args, out in printed.items():
        assert out.returncode == 0, (args, out.stderr)
        text = out.stdout.replace("\n", "")
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\u202e" for c in text), (args, out.stdout)
    assert "[link=https://evil.example/]" in printed[("jobs", "--all")].stdout  # the markup is shown, not obeyed
    shown = printed[("show", str(failed_id))].stdout
    assert "\\x1b]0;pwned\\x07" in shown and "\\u202e" in shown and "line 1\n" in shown  # a traceback keeps lines
    # A terminal (forced here) gets no hyperlink from stored data either: rich renders [link=...] as one.
    forced = run("jobs", "--all", FORCE_COLOR="1", COLUMNS="200")
    assert forced.returncode == 0 and "\x1b]8;" not in forced.stdout, forced.stdout


def test_a_malformed_job_reads_as_malformed_through_its_process() -> None:
    """Its status raises a typed error naming the field; everything else reads without raising."""
    process = Process({"_id": ObjectId(), "class": 7, "status": 99, "options": "x", "run": "2", "progress": "1"}, None)
    with pytest.raises(InvalidJobError, match="field 'status' is 99"):
        process.status  # noqa: B018
    assert "MALFORMED" in repr(process) and (process.options, process.run, process.progress) == ({}, 1, 0.0)
    assert process.malformed is not None and "field 'class' is 7" in process.malformed


def test_visible_escapes_what_a_terminal_would_obey() -> None:
    assert visible("a\x1b[31mb\tc\nd\x9b\u202e") == "a\\x1b[31mb\\x09c\\x0ad\\x9b\\u202e"
    assert visible("line\n\tnext\r", multiline=True) == "line\n\tnext\\x0d"
    assert visible("[bold]ok[/bold] ümlaut 日本") == "[bold]ok[/bold] ümlaut 日本"


@pytest.mark.parametrize("hostile", ["unowned", "no lease"])
def test_a_running_job_without_a_worker_or_lease_never_stops_the_sweep_of_the_others(
    hostile: str, db: Database[dict[str, Any]], server: EmbeddedServer, new_scheduler: Callable[..., Scheduler]
) -> None:
    """SPEC 2: a PROCESSING document whose worker or lease end is the unset value stopped the sweep of every orphan
    after it: now one without a worker is malformed (ended FAILED), one without a lease end is put back, and the
    orphans after it are put back in the same round."""
    scheduler = new_scheduler()
    scheduler.store.ensure()
    doc = scheduler.lifecycle.prepare(NOOP, None, {}, scheduler.get_options())
    hour_ago = scheduler.store.server_time() - timedelta(hours=1)
    if hostile == "unowned":
        doc.update(status=int(JobStatus.PROCESSING), worker=NO_WORKER, expires=hour_ago)
    else:
        doc.update(status=int(JobStatus.PROCESSING), worker=ObjectId(), expires=UNSET_TIME)
    scheduler.store.jobs.insert_one(doc)
    good = scheduler.add_job(NOOP)
    assert scheduler.store.claim(good.id, ObjectId(), 30.0) is not None
    minute_ago = scheduler.store.server_time() - timedelta(seconds=60)
    scheduler.store.jobs.update_one({"_id": good.id}, {"$set": {"expires": minute_ago}})  # its node died
    queue = Queue(new_scheduler(), db, worker_factory(server.uri, db.name))
    assert queue._step(queue._reschedule_orphans)
    assert scheduler.store.find_job(good.id)["status"] == JobStatus.WAITING
    bad = scheduler.get_job(doc["_id"])
    if hostile == "unowned":  # no worker to condition a write on: ended FAILED, naming the field
        assert bad.status == JobStatus.FAILED and bad.error is not None
        assert bad.error["class"].endswith("InvalidJobError") and "'worker'" in bad.error["message"]
    else:  # owned, with no lease end stored: put back as any orphan
        assert bad.status == JobStatus.WAITING
