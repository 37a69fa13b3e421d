"""The dashboard's server side (SPEC 7): JSON endpoints, actions with --token and --read-only, escaping, the live
event stream. The page itself is driven in a real browser in test_dashboard_browser.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from bson import ObjectId
from starlette.testclient import TestClient

from helpers import TESTS_DIR, free_port, wait_until
from taskscheduler import JobStatus, Scheduler, Worker
from taskscheduler.errors import ServerUnavailableError
from taskscheduler.ops.dashboard import bind
from taskscheduler.ops.dashboard.app import ACTION_HEADER, STATIC, create_app
from taskscheduler.ops.embedded import EmbeddedServer

ACT = {ACTION_HEADER: "1"}
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def web(scheduler: Scheduler) -> Iterator[TestClient]:
    with TestClient(create_app(scheduler)) as c:
        yield c


def run_in_process(scheduler: Scheduler, job_id: ObjectId) -> None:
    """Run one job in this process (no queue node needed for a job's end)."""
    Worker(ObjectId(), scheduler, scheduler._db).process_one(job_id)


def test_page_and_static_files_are_served_with_a_strict_policy(web: TestClient) -> None:
    page = web.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "panels.js", "style.css"):
        assert web.get(f"/static/{name}").status_code == 200
        assert f"/static/{name}" in page.text
    for script in STATIC.glob("*.js"):
        code = script.read_text()
        # Values from job data are put into the page as text only.
        assert not re.search(r"\.innerHTML|innerHTML\s*:|outerHTML|insertAdjacentHTML|document\.write|eval\(", code)
        # No error is swallowed: no empty catch, no promise whose failure is dropped.
        assert not re.search(r"catch\s*(\(\w*\))?\s*\{\s*\}|\.catch\(\s*\(\w*\)\s*=>\s*\{\s*\}\s*\)", code), script.name
    assert "style=" not in (STATIC / "index.html").read_text()  # the policy allows no inline style


def test_json_endpoints_counts_jobs_filters_and_a_job_page(web: TestClient, scheduler: Scheduler) -> None:
    echo = scheduler.add_job("sample_jobs:Echo", {"n": 1})
    failed = scheduler.add_job("sample_jobs:Fail", {"n": 2})
    waiting = scheduler.add_job("sample_jobs:Noop")
    run_in_process(scheduler, echo.id)
    run_in_process(scheduler, failed.id)

    config = web.get("/api/config").json()
    assert config == {"read_only": False, "token_required": False, "version": config["version"],
                      "database": scheduler._db.name}
    counts = web.get("/api/summary").json()["counts"]
    assert (counts["done"], counts["failed"], counts["waiting"], counts["processing"]) == (1, 1, 1, 0)

    rows = web.get("/api/jobs").json()
    assert [r["id"] for r in rows["jobs"]] == [str(waiting.id), str(failed.id), str(echo.id)]  # newest first
    assert rows["total"] == 3
    assert [r["id"] for r in web.get("/api/jobs?status=failed").json()["jobs"]] == [str(failed.id)]
    assert [r["id"] for r in web.get("/api/jobs?status=done,waiting").json()["jobs"]] == [
        str(waiting.id),
        str(echo.id),
    ]
    assert [r["id"] for r in web.get("/api/jobs?class=sample_jobs:Echo").json()["jobs"]] == [str(echo.id)]
    assert [r["id"] for r in web.get(f"/api/jobs?id={failed.id}").json()["jobs"]] == [str(failed.id)]
    assert web.get("/api/jobs?id=nonsense").json() == {"jobs": [], "total": 0}

    page = web.get(f"/api/jobs/{failed.id}").json()
    assert page["status"] == "failed" and page["data"] == {"n": 2} and page["options"]["retry"] == 0
    assert page["error"]["class"] == "ValueError" and "boom" in page["error"]["message"]
    (run,) = page["runs"]
    assert run["status"] == "failed" and "boom" in run["error"]["message"]
    assert "Traceback" in run["error"]["traceback"] and "boom" in run["error"]["traceback"]
    done = web.get(f"/api/jobs/{echo.id}").json()
    assert done["result"] == {"n": 1} and done["runs"][0]["result"] == {"n": 1}
    assert web.get(f"/api/jobs/{ObjectId()}").status_code == 404
    assert web.get("/api/jobs/nonsense").status_code == 404


def test_data_holding_markup_is_returned_as_json_text(web: TestClient, scheduler: Scheduler) -> None:
    job = scheduler.add_job("sample_jobs:Echo", {"note": EVIL}, {"id": ObjectId()})
    reply = web.get(f"/api/jobs/{job.id}")
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.json()["data"] == {"note": EVIL}  # as data: the page puts it in with textContent


def test_cancel_and_requeue_from_the_dashboard(web: TestClient, scheduler: Scheduler) -> None:
    job = scheduler.add_job("sample_jobs:Noop")
    canceled = web.post(f"/api/jobs/{job.id}/cancel", headers=ACT)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert job.refresh().status == JobStatus.CANCELED
    requeued = web.post(f"/api/jobs/{job.id}/requeue", headers=ACT)
    assert requeued.status_code == 200 and requeued.json()["run"] == 2
    assert job.refresh().status == JobStatus.WAITING
    again = web.post(f"/api/jobs/{job.id}/requeue", headers=ACT)  # a waiting job cannot be requeued
    assert again.status_code == 409 and job.refresh().run == 2
    assert web.post(f"/api/jobs/{job.id}/delete", headers=ACT).status_code == 404
    assert web.post(f"/api/jobs/{ObjectId()}/cancel", headers=ACT).status_code == 404


def test_an_action_without_its_header_is_refused(web: TestClient, scheduler: Scheduler) -> None:
    job = scheduler.add_job("sample_jobs:Noop")
    assert web.post(f"/api/jobs/{job.id}/cancel").status_code == 403  # e.g. a form on another site
    assert job.refresh().status == JobStatus.WAITING


def test_with_a_token_actions_without_it_get_403_and_change_nothing(scheduler: Scheduler) -> None:
    job = scheduler.add_job("sample_jobs:Noop")
    with TestClient(create_app(scheduler, token="s3cret")) as client:
        assert client.get("/api/config").json()["token_required"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = client.post(f"/api/jobs/{job.id}/cancel", headers={**ACT, **headers})
            assert reply.status_code == 403, headers
            assert job.refresh().status == JobStatus.WAITING and job.run == 1
        assert client.get(f"/api/jobs/{job.id}").status_code == 200  # reading needs no token
        ok = client.post(f"/api/jobs/{job.id}/cancel", headers={**ACT, "Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and job.refresh().status == JobStatus.CANCELED


def test_read_only_refuses_every_action(scheduler: Scheduler) -> None:
    job = scheduler.add_job("sample_jobs:Noop")
    with TestClient(create_app(scheduler, read_only=True, token="t")) as client:
        assert client.get("/api/config").json()["read_only"] is True
        for action in ("cancel", "requeue"):
            reply = client.post(f"/api/jobs/{job.id}/{action}", headers={**ACT, "Authorization": "Bearer t"})
            assert reply.status_code in (403, 405)
        assert client.get(f"/api/jobs/{job.id}/cancel").status_code == 405  # no GET action either
    assert job.refresh().status == JobStatus.WAITING and job.run == 1


def test_bound_to_localhost_it_answers_only_local_host_names(scheduler: Scheduler) -> None:
    app = create_app(scheduler, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/api/config").status_code == 200
        assert client.get("/api/config", headers={"Host": "attacker.example"}).status_code == 400


@pytest.fixture
def live_url(scheduler: Scheduler) -> Iterator[str]:
    """The dashboard served by a real uvicorn in a thread of this process."""
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(create_app(scheduler), log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="uvicorn to start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_server_sent_events_deliver_a_change(live_url: str, scheduler: Scheduler) -> None:
    events: list[tuple[str, Any]] = []
    with httpx2.stream("GET", f"{live_url}/api/stream", timeout=10) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = reply.iter_lines()
        event = None
        job = None
        for line in lines:
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event is not None:
                events.append((event, json.loads(line[len("data: "):])))
                if event == "ready":
                    job = scheduler.add_job("sample_jobs:Noop", {"hello": EVIL})  # after: it must be seen
                elif event == "job" and job is not None and events[-1][1]["id"] == str(job.id):
                    break
    assert events[0][0] == "ready"
    row = next(data for name, data in events if name == "job")
    assert row["status"] == "waiting" and row["class"] == "sample_jobs:Noop" and "hello" not in row


def _cli(server: EmbeddedServer, db_name: str, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(TESTS_DIR)) if p))
    return subprocess.run(
        [sys.executable, "-m", "taskscheduler", "dashboard", *args, "--mongodb-uri", server.uri, "--database", db_name],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli_names_the_install_when_the_extra_is_missing(server: EmbeddedServer, db_name: str, tmp_path: Path) -> None:
    (tmp_path / "starlette").mkdir()
    (tmp_path / "starlette" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'starlette'\", name='starlette')\n"
    )
    out = _cli(server, db_name, pythonpath=str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert 'pip install "mongodb-task-scheduler[dashboard]"' in out.stderr and "Traceback" not in out.stderr


def test_cli_port_in_use_is_one_line_and_exit_1(server: EmbeddedServer, db_name: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _cli(server, db_name, "--port", str(port))
    assert out.returncode == 1, out.stderr
    assert f"cannot serve the dashboard on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_host_check_answers_the_bound_address_and_this_machine_and_allowed_names() -> None:
    from taskscheduler.ops.dashboard import check_allowed_host, trusted_hosts

    assert "127.0.0.2" in (trusted_hosts("127.0.0.2") or [])
    assert socket.gethostname().lower() not in (trusted_hosts("127.0.0.1") or [])  # loopback: no network names
    everywhere = trusted_hosts("0.0.0.0", ["dash.example.com", "*.internal", "fd00::7"])
    assert everywhere is not None
    assert {"localhost", "127.0.0.1", "[::1]", socket.gethostname().lower(), "dash.example.com", "*.internal",
            "[fd00::7]"} <= set(everywhere)
    assert "0.0.0.0" not in everywhere
    assert trusted_hosts("0.0.0.0", ["*"]) is None  # explicitly off
    for bad in ("example.com:8080", "a*b", "", "http://x"):
        with pytest.raises(ValueError):
            check_allowed_host(bad)


def test_cli_refuses_an_allowed_host_with_a_port(server: EmbeddedServer, db_name: str) -> None:
    out = _cli(server, db_name, "--allowed-host", "example.com:8080")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_non_finite_numbers_and_the_runs_of_a_job_page(web: TestClient, scheduler: Scheduler) -> None:
    job = scheduler.add_job("sample_jobs:Echo", {"values": [float("nan"), float("inf"), -float("inf"), 1.5]})
    run_in_process(scheduler, job.id)
    page = web.get(f"/api/jobs/{job.id}").json()
    assert page["data"] == page["result"] == {"values": ["NaN", "Infinity", "-Infinity", 1.5]}
    assert page["runs_total"] == 1 and page["runs"][0]["result"]["values"][0] == "NaN"


def start_dashboard(server: EmbeddedServer, db_name: str, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(tmp_path / "dashboard.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "taskscheduler", "dashboard", *args],
            env=dict(os.environ, TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name,
                     PYTHONPATH=str(TESTS_DIR)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_up(url: str, proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        try:
            with socket.create_connection((url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])), 1):
                return True
        except OSError:
            return False

    wait_until(up, timeout=20, what="the dashboard")


def test_job_page_of_a_job_whose_data_holds_nan_is_served(web: TestClient, scheduler: Scheduler) -> None:
    """SPEC 7: data and results are any BSON: a job page with NaN and Infinity in them is served."""
    job = scheduler.add_job("sample_jobs:Echo", {"ratio": float("nan"), "limit": float("inf")})
    run_in_process(scheduler, job.id)  # its result is the same data
    reply = web.get(f"/api/jobs/{job.id}")
    assert reply.status_code == 200, reply.text
    row = web.get(f"/api/jobs?id={job.id}")
    assert row.status_code == 200


@contextlib.contextmanager
def dashboard_on(server: EmbeddedServer, db_name: str, tmp_path: Path, host: str) -> Iterator[tuple[str, int]]:
    """`taskscheduler dashboard --host HOST` on a free port, up: (its URL, the port); terminated after."""
    port = free_port(host)
    proc = start_dashboard(server, db_name, tmp_path, "--host", host, "--port", str(port))
    try:
        url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        wait_up(url, proc, tmp_path)
        yield url, port
    finally:
        proc.terminate()
        proc.wait(15)


def test_dashboard_bound_to_another_loopback_address_answers_requests_naming_it(
    server: EmbeddedServer, db_name: str, tmp_path: Path
) -> None:
    """`--host 127.0.0.2` (a loopback address) answers requests whose Host names it."""
    with dashboard_on(server, db_name, tmp_path, "127.0.0.2") as (url, _):
        reply = httpx2.get(f"{url}/api/config", timeout=5)
        assert reply.status_code == 200, reply.text


def test_dashboard_on_all_interfaces_still_refuses_a_foreign_host_header(
    server: EmbeddedServer, db_name: str, tmp_path: Path, scheduler: Scheduler
) -> None:
    """With `--host 0.0.0.0` a request naming a foreign host (DNS rebinding) is still refused."""
    with dashboard_on(server, db_name, tmp_path, "0.0.0.0") as (url, port):
        assert httpx2.get(f"{url}/api/config", timeout=5).status_code == 200
        job = scheduler.add_job("sample_jobs:Noop")
        rebound = {"Host": f"attacker.example:{port}", "X-Taskscheduler-Action": "1"}
        assert httpx2.get(f"{url}/api/jobs/{job.id}", headers=rebound, timeout=5).status_code == 400
        assert httpx2.post(f"{url}/api/jobs/{job.id}/cancel", headers=rebound, timeout=5).status_code in (400, 403)


def test_pages_learn_of_changes_missed_while_the_feed_thread_restarted(
    live_url: str, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 7: a change made while the feed thread restarts reaches open pages, or they are told to reload."""
    url = live_url
    store = scheduler.store
    original = store.live_nodes
    missed: list[ObjectId] = []
    armed = threading.Event()

    def flaky() -> Any:
        if armed.is_set() and not missed:
            missed.append(scheduler.add_job("sample_jobs:Noop").id)  # happens while the feed is down
            raise ServerUnavailableError("connection refused (simulated outage)")
        return original()

    monkeypatch.setattr(store, "live_nodes", flaky)
    seen: list[tuple[str, Any]] = []
    deadline = time.monotonic() + 12
    with httpx2.stream("GET", f"{url}/api/stream", timeout=20) as reply:
        event = None
        for line in reply.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event is not None:
                seen.append((event, json.loads(line[len("data: "):])))
                if event == "ready" and not armed.is_set():
                    armed.set()
                    continue
                if event == "ready":  # told to reload: fine
                    break
                if event == "job" and missed and seen[-1][1]["id"] == str(missed[0]):
                    break
            if time.monotonic() > deadline:
                break
    assert missed, "the simulated outage never happened"
    told = [e for e, _ in seen].count("ready") >= 2 or any(
        e == "job" and d["id"] == str(missed[0]) for e, d in seen
    )
    assert told, f"job {missed[0]} added during the feed restart never reached the page, and no reload: {seen}"


def test_dashboard_stops_promptly_on_sigint_with_live_pages_open(
    server: EmbeddedServer, db_name: str, tmp_path: Path
) -> None:
    """SPEC 7: with live pages open, Ctrl-C stops the dashboard within a few seconds, without a traceback."""
    port = free_port()
    proc = start_dashboard(server, db_name, tmp_path, "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc, tmp_path)
        opened: list[Any] = []

        def page() -> None:
            try:
                with httpx2.stream("GET", f"{url}/api/stream", timeout=30) as reply:
                    opened.append(reply)
                    for _ in reply.iter_lines():
                        pass
            except Exception:
                pass

        threads = [threading.Thread(target=page, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(opened) == 3, what="three live pages")
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log = (tmp_path / "dashboard.log").read_text()
    assert took < 5, f"took {took:.1f} s to stop"
    assert "Traceback" not in log, log
    assert code in (0, 130), log


def test_a_token_with_surrounding_blanks_is_refused_or_usable(
    server: EmbeddedServer, db_name: str, scheduler: Scheduler, tmp_path: Path
) -> None:
    """SPEC 7: `--token ' s3cret '` is either refused (exit 2) or usable as the header browsers send (trimmed)."""
    job = scheduler.add_job("sample_jobs:Noop")
    port = free_port()
    proc = start_dashboard(server, db_name, tmp_path, "--port", str(port), "--token", " s3cret ")
    try:
        try:
            code = proc.wait(4)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            assert code == 2, (tmp_path / "dashboard.log").read_text()
            return
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc, tmp_path)
        reply = httpx2.post(f"{url}/api/jobs/{job.id}/cancel", timeout=5,
                            headers={"X-Taskscheduler-Action": "1", "Authorization": "Bearer s3cret"})
        assert reply.status_code == 200, f"the token can never be sent: {reply.status_code} {reply.text}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


def test_job_page_of_a_long_running_recurring_job_is_bounded(web: TestClient, scheduler: Scheduler) -> None:
    """SPEC 7: a job page sends at most 200 runs, however many runs the job had."""
    job = scheduler.add_job("sample_jobs:Echo", {"pad": "x" * 200})
    run_in_process(scheduler, job.id)
    (end,) = [e for e in scheduler.store.events.find({"job": job.id}) if e.get("run") == 1 and "result" in e]
    copies = []
    for run in range(2, 3002):  # as the runs of a recurring job: one run end per run number
        copy = dict(end, _id=ObjectId(), run=run)
        if "end" in copy:
            copy["end"] = copy["_id"]
        copies.append(copy)
    scheduler.store.events.insert_many(copies)
    reply = web.get(f"/api/jobs/{job.id}")
    assert reply.status_code == 200
    runs = reply.json()["runs"]
    assert len(runs) <= 200, f"the job page sent {len(runs)} runs ({len(reply.content)} bytes)"


# -- what an operator reads at a glance, flow control, trends, bulk actions (SPEC 7 and 8) ----------------------------

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FAIL = "sample_jobs:Fail"


def register_node(scheduler: Scheduler, modules: list[str]) -> ObjectId:
    """A live queue node's registry entry, as a node writes it (no node process needed to be 'served')."""
    node_id = ObjectId()
    facts = {"host": "host-a", "pid": 4242, "started": datetime.now(timezone.utc), "version": "test",
             "modules": modules, "workers": []}
    scheduler.store.register_node(node_id, facts, 60)
    return node_id


def test_rows_show_readable_times_the_error_line_the_next_start_and_unserved_classes(scheduler: Scheduler) -> None:
    failed = scheduler.add_job(FAIL, {"why": "x" * 400 + "\nsecond line"})
    run_in_process(scheduler, failed.id)
    retrying = scheduler.add_job(FAIL, {"why": "again"}, retry=1, retry_interval=3600)
    run_in_process(scheduler, retrying.id)  # failed once, postponed for its retry
    later = scheduler.add_job("sample_jobs:Noop", at=time.time() + 3600)
    elsewhere = scheduler.add_job("other_module:Job")
    register_node(scheduler, ["sample_jobs"])
    with TestClient(create_app(scheduler)) as web:
        rows = {r["id"]: r for r in web.get("/api/jobs").json()["jobs"]}
    row = rows[str(failed.id)]
    assert row["status"] == "failed" and ISO_MS.match(row["created"]) and ISO_MS.match(row["ended"])
    assert row["error_line"].startswith("ValueError: boom: {'why': 'xxx") and "second line" not in row["error_line"]
    assert len(row["error_line"]) == 160 and row["error_line"].endswith("\u2026")  # one line, shortened
    assert row["next_start"] is None and row["unserved"] is False
    waiting_retry = rows[str(retrying.id)]
    assert waiting_retry["status"] == "postponed" and waiting_retry["run"] == 2
    assert waiting_retry["error_line"] == "ValueError: boom: {'why': 'again'}"  # the failed run it retries
    postponed = rows[str(later.id)]
    assert postponed["error_line"] is None and ISO_MS.match(postponed["next_start"])
    assert abs(datetime.fromisoformat(postponed["next_start"].replace("Z", "+00:00")).timestamp()
               - later.options["at"]) < 0.002
    assert postponed["unserved"] is False  # sample_jobs is served by the live node
    assert rows[str(elsewhere.id)]["unserved"] is True  # no live node serves other_module


def test_a_job_page_shows_what_blocks_it_its_schedule_and_readable_run_times(
    web: TestClient, scheduler: Scheduler
) -> None:
    first = scheduler.add_job("sample_jobs:Noop")
    done = scheduler.add_job("sample_jobs:Echo", {"n": 1})
    run_in_process(scheduler, done.id)
    blocked = scheduler.add_job("sample_jobs:Gather", None, depends_on=[first, done])
    page = web.get(f"/api/jobs/{blocked.id}").json()
    assert page["blocked_by"] == [str(first.id)]  # the DONE dependency no longer blocks it
    assert page["options"]["depends_on"] == [str(first.id), str(done.id)] and page["schedule"] is None
    assert web.get(f"/api/jobs/{first.id}").json()["blocked_by"] == []
    run = web.get(f"/api/jobs/{done.id}").json()["runs"][0]
    assert ISO_MS.match(run["started"]) and ISO_MS.match(run["ended"]) and run["ended"] >= run["started"]
    cron = scheduler.add_job("sample_jobs:Noop", cron="0 7 * * *", timezone="Europe/Zurich")
    page = web.get(f"/api/jobs/{cron.id}").json()
    assert page["schedule"] == {"kind": "cron", "cron": "0 7 * * *", "timezone": "Europe/Zurich"}
    assert page["recurring"] is True and page["status"] == "postponed" and ISO_MS.match(page["next_start"])
    every = scheduler.add_job("sample_jobs:Noop", interval=90, interval_reference="start")
    assert web.get(f"/api/jobs/{every.id}").json()["schedule"] == {
        "kind": "interval", "seconds": 90, "reference": "start"}


def test_the_flow_panel_lists_limits_and_pauses_with_what_each_holds(web: TestClient, scheduler: Scheduler) -> None:
    scheduler.set_limit("sample_jobs:Noop", concurrency=2, rate="10/m")
    scheduler.set_limit("smtp", concurrency=1)
    scheduler.pause("reports")
    for _ in range(3):
        scheduler.add_job("sample_jobs:Noop")
    scheduler.add_job("sample_jobs:Echo", limit_key="smtp")
    scheduler.add_job("sample_jobs:Echo", limit_key="reports")
    flow = web.get("/api/flow").json()
    assert flow["limits"] == [
        {"key": "sample_jobs:Noop", "concurrency": 2, "rate": "10/m", "running": 0, "waiting": 3},
        {"key": "smtp", "concurrency": 1, "rate": None, "running": 0, "waiting": 1},
    ]
    assert flow["paused"] == [{"key": "reports", "waiting": 1}]
    assert (flow["limits_total"], flow["paused_total"]) == (2, 1)


def test_pause_and_resume_from_the_dashboard(scheduler: Scheduler) -> None:
    with TestClient(create_app(scheduler, token="s3cret")) as web:
        auth = {**ACT, "Authorization": "Bearer s3cret"}
        paused = web.post("/api/flow/pause", params={"key": "sample_jobs:Echo"}, headers=auth)
        assert paused.status_code == 200 and paused.json()["paused"] == [{"key": "sample_jobs:Echo", "waiting": 0}]
        assert scheduler.paused() == ["sample_jobs:Echo"]
        assert web.post("/api/flow/pause", params={"key": "*"}, headers=auth).status_code == 200
        assert scheduler.paused() == ["*", "sample_jobs:Echo"]
        resumed = web.post("/api/flow/resume", params={"key": "*"}, headers=auth)
        assert resumed.status_code == 200 and [p["key"] for p in resumed.json()["paused"]] == ["sample_jobs:Echo"]
        bad = web.post("/api/flow/pause", params={"key": "a\nb"}, headers=auth)
        assert bad.status_code == 400 and "limit_key" not in scheduler.paused()
        assert web.post("/api/flow/pause", params={"key": ""}, headers=auth).status_code == 400
        assert web.post("/api/flow/stop", params={"key": "x"}, headers=auth).status_code == 404
        for headers in (ACT, {"Authorization": "Bearer s3cret"}, {**ACT, "Authorization": "Bearer nope"}):
            for action in ("pause", "resume"):
                refused = web.post(f"/api/flow/{action}", params={"key": "sample_jobs:Echo"}, headers=headers)
                assert refused.status_code == 403, (action, headers)
        assert web.get("/api/flow/pause", params={"key": "x"}).status_code == 405
    assert scheduler.paused() == ["sample_jobs:Echo"]  # nothing changed by the refused ones
    with TestClient(create_app(scheduler, read_only=True)) as web:
        assert web.post("/api/flow/resume", params={"key": "sample_jobs:Echo"}, headers=ACT).status_code == 403
    assert scheduler.paused() == ["sample_jobs:Echo"]


def failed_jobs(scheduler: Scheduler, n: int) -> list[ObjectId]:
    ids = []
    for i in range(n):
        job = scheduler.add_job(FAIL, {"i": i})
        run_in_process(scheduler, job.id)
        ids.append(job.id)
    return ids


def test_bulk_requeue_says_how_many_it_will_requeue_and_requeues_at_most_those(scheduler: Scheduler) -> None:
    failed = failed_jobs(scheduler, 3)
    canceled = scheduler.add_job("sample_jobs:Noop")
    scheduler.cancel_job(canceled.id)
    done = scheduler.add_job("sample_jobs:Echo")
    run_in_process(scheduler, done.id)
    with TestClient(create_app(scheduler)) as web:
        assert web.get("/api/bulk/requeue").json() == {"count": 3, "will_requeue": 3, "max": 500}
        assert web.get("/api/bulk/requeue", params={"status": "done"}).json()["count"] == 0
        assert web.get("/api/bulk/requeue", params={"status": "failed,done", "class": FAIL}).json()["count"] == 3
        assert web.get("/api/bulk/requeue", params={"class": "sample_jobs:Echo"}).json()["count"] == 0
        assert web.get("/api/bulk/requeue", params={"id": str(failed[0])}).json()["count"] == 1
        assert web.post("/api/bulk/requeue", headers=ACT).status_code == 400  # how many were confirmed?
        reply = web.post("/api/bulk/requeue", params={"status": "failed", "expected": "2"}, headers=ACT)
        assert reply.status_code == 200
        assert reply.json() == {"requeued": 2, "failed": [], "failed_total": 0, "remaining": 1}
    statuses = {job_id: scheduler.get_job(job_id).status for job_id in failed}
    assert [statuses[i] for i in failed] == [JobStatus.FAILED, JobStatus.WAITING, JobStatus.WAITING]  # newest
    assert scheduler.get_job(failed[1]).run == 2
    assert canceled.refresh().status == JobStatus.CANCELED and done.refresh().status == JobStatus.DONE


def test_bulk_requeue_reports_the_jobs_it_could_not_requeue(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = failed_jobs(scheduler, 3)
    original = scheduler.requeue_job

    def racing(job_id: ObjectId) -> Any:
        if job_id == failed[1]:  # as if another operator requeued it a moment before
            original(job_id)
            return original(job_id)
        return original(job_id)

    monkeypatch.setattr(scheduler, "requeue_job", racing)
    with TestClient(create_app(scheduler)) as web:
        reply = web.post("/api/bulk/requeue", params={"expected": "3"}, headers=ACT).json()
    assert reply["requeued"] == 2 and reply["failed_total"] == 1 and reply["remaining"] == 0
    (failure,) = reply["failed"]
    assert failure["id"] == str(failed[1]) and "WAITING" in failure["error"].upper()


def test_bulk_requeue_is_bounded_and_refused_as_single_actions_are(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskscheduler.ops.dashboard import actions

    monkeypatch.setattr(actions, "MAX_BULK", 2)
    failed = failed_jobs(scheduler, 3)
    with TestClient(create_app(scheduler, token="t")) as web:
        assert web.get("/api/bulk/requeue").json() == {"count": 3, "will_requeue": 2, "max": 2}
        for headers in ({}, ACT, {**ACT, "Authorization": "Bearer wrong"}, {"Authorization": "Bearer t"}):
            assert web.post("/api/bulk/requeue", params={"expected": "3"}, headers=headers).status_code == 403
        assert all(scheduler.get_job(i).status == JobStatus.FAILED for i in failed)  # refused: nothing changed
        reply = web.post("/api/bulk/requeue", params={"expected": "3"}, headers={**ACT, "Authorization": "Bearer t"})
        assert reply.json()["requeued"] == 2 and reply.json()["remaining"] == 1
    with TestClient(create_app(scheduler, read_only=True)) as web:
        assert web.post("/api/bulk/requeue", params={"expected": "1"}, headers=ACT).status_code == 403
    assert sum(scheduler.get_job(i).status == JobStatus.FAILED for i in failed) == 1


def end_event(job_class: Any, status: JobStatus, ended: datetime, seconds: float | None) -> dict[str, Any]:
    """A run's end event as the lifecycle writes it (``seconds``: how long the run took; None: never started)."""
    event: dict[str, Any] = {"_id": ObjectId(), "job": ObjectId(), "class": job_class, "run": 1,
                             "status": int(status), "time": ended, "worker": None}
    if seconds is not None:
        event["started"] = ended - timedelta(seconds=seconds)
        event["ended"] = ended
    return event


def test_trends_count_run_ends_per_minute_and_per_class_with_failure_rate_and_percentiles(
    web: TestClient, scheduler: Scheduler
) -> None:
    now = scheduler.store.server_time()
    a, b = "sample_jobs:Echo", "sample_jobs:Fail"
    events = [end_event(a, JobStatus.DONE, now - timedelta(minutes=30, seconds=10), s) for s in (1, 2, 10)]
    events += [
        end_event(a, JobStatus.FAILED, now - timedelta(seconds=20), 4),
        end_event(b, JobStatus.TIMEOUT, now - timedelta(seconds=20), 30),
        end_event(b, JobStatus.CANCELED, now - timedelta(seconds=20), None),  # canceled while waiting
        end_event(a, JobStatus.DONE, now - timedelta(hours=2), 1),  # before the window
        end_event(a, JobStatus.PROCESSING, now - timedelta(seconds=5), None),  # a claim: no run end
        end_event(12, JobStatus.FAILED, now - timedelta(seconds=5), 0.5),  # a malformed job's class
    ]
    scheduler.store.events.insert_many(events)
    trends = web.get("/api/trends").json()
    minutes = trends["minutes"]
    assert len(minutes) == 60 and ISO_MS.match(minutes[0]["start"]) and ISO_MS.match(trends["until"])
    assert sum(m["done"] for m in minutes) == 3 and sum(m["failed"] for m in minutes) == 2
    assert sum(m["timeout"] for m in minutes) == 1 and sum(m["canceled"] for m in minutes) == 1
    assert minutes[29]["done"] == 3 and minutes[59]["failed"] == 2  # 30 min 10 s ago; the last minute
    by_class = {c["class"]: c for c in trends["classes"]}
    assert list(by_class) == [a, b, "12"] and trends["classes_total"] == 3  # most runs first
    echo = by_class[a]
    assert echo["runs"] == 4 and echo["counts"] == {"done": 3, "failed": 1} and echo["failure_rate"] == 0.25
    assert echo["p50"] == pytest.approx(2.0, rel=0.03) and echo["p95"] == pytest.approx(10.0, rel=0.03)
    fail = by_class[b]
    assert fail["runs"] == 2 and fail["failure_rate"] == 1.0 and fail["timed"] == 1  # the cancel is no failure
    assert fail["p50"] == fail["p95"] == pytest.approx(30.0, rel=0.03)


def test_trends_return_a_bounded_number_of_classes(web: TestClient, scheduler: Scheduler) -> None:
    from taskscheduler.store.mongo.trends import TREND_CLASSES

    now = scheduler.store.server_time()
    events = [
        end_event(f"m:Class{i:03d}", JobStatus.DONE, now - timedelta(seconds=30), 1)
        for i in range(TREND_CLASSES + 20)
        for _ in range(1 + (i == 7))  # Class007 has the most runs
    ]
    scheduler.store.events.insert_many(events)
    trends = web.get("/api/trends").json()
    assert len(trends["classes"]) == TREND_CLASSES and trends["classes_total"] == TREND_CLASSES + 20
    assert trends["classes"][0]["class"] == "m:Class007" and trends["classes"][0]["runs"] == 2


def test_a_live_page_is_sent_the_flow_panel_when_a_pause_changes_it(live_url: str, scheduler: Scheduler) -> None:
    seen: list[tuple[str, Any]] = []
    deadline = time.monotonic() + 15
    with httpx2.stream("GET", f"{live_url}/api/stream", timeout=20) as reply:
        event = None
        for line in reply.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event is not None:
                seen.append((event, json.loads(line[len("data: "):])))
                if event == "ready":
                    scheduler.pause("sample_jobs:Echo")
                names = [name for name, data in seen if name == "trends" or (name == "flow" and data["paused"])]
                if {"flow", "trends"} <= set(names):  # the trends are sent to open pages too
                    break
            assert time.monotonic() < deadline, f"no flow panel with the pause, or no trends: {seen}"
    flow = [data for name, data in seen if name == "flow"]
    assert flow[-1]["paused"] == [{"key": "sample_jobs:Echo", "waiting": 0}]


def test_the_schedules_view_lists_the_recurring_jobs(web: TestClient, scheduler: Scheduler) -> None:
    cron = scheduler.add_job("sample_jobs:Noop", cron="0 7 * * *", timezone="Europe/Zurich")
    every = scheduler.add_job("sample_jobs:Echo", interval=5400, at=time.time() + 60)
    scheduler.add_job("sample_jobs:Noop")  # runs once: no schedule
    scheduler.pause("sample_jobs:Echo")
    found = web.get("/api/schedules").json()
    assert found["total"] == 2
    by_id = {s["id"]: s for s in found["schedules"]}
    assert set(by_id) == {str(cron.id), str(every.id)}
    assert by_id[str(cron.id)]["kind"] == "cron" and by_id[str(cron.id)]["expression"] == "0 7 * * *"
    assert by_id[str(cron.id)]["timezone"] == "Europe/Zurich" and by_id[str(cron.id)]["paused"] is False
    assert by_id[str(every.id)]["expression"] == "every 1h 30m" and by_id[str(every.id)]["paused"] is True
    assert by_id[str(every.id)]["runs"] == 0 and by_id[str(every.id)]["next_start"] is not None
