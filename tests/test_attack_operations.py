"""Hostile review of the operator surface (issue 12, SPEC 3 and 7): metrics, dashboard, info/health.

Each test names one defect and asserts what SPEC 7 / issue 12 require; they fail against commit 04728c9.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from bson import ObjectId
from starlette.testclient import TestClient

from helpers import TESTS_DIR, Node, wait_until
from taskscheduler import Scheduler, Worker
from taskscheduler.errors import ServerUnavailableError
from taskscheduler.ops.dashboard import bind
from taskscheduler.ops.dashboard.app import create_app
from taskscheduler.ops.embedded import EmbeddedServer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_in_process(scheduler: Scheduler, job_id: ObjectId) -> None:
    Worker(ObjectId(), scheduler, scheduler._db).process_one(job_id)


@pytest.fixture
def web(scheduler: Scheduler) -> Iterator[TestClient]:
    with TestClient(create_app(scheduler), raise_server_exceptions=False) as c:
        yield c


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


# -- dashboard: job page --


def test_job_page_of_a_job_whose_data_holds_nan_is_served(web: TestClient, scheduler: Scheduler) -> None:
    """SPEC 7: a job page shows data, options, runs and results. Data and results are any BSON: NaN and
    Infinity are ordinary BSON doubles (a measurement job returns them), yet the page answers 500."""
    job = scheduler.add_job("sample_jobs:Echo", {"ratio": float("nan"), "limit": float("inf")})
    run_in_process(scheduler, job.id)  # its result is the same data
    reply = web.get(f"/api/jobs/{job.id}")
    assert reply.status_code == 200, reply.text
    row = web.get(f"/api/jobs?id={job.id}")
    assert row.status_code == 200


# -- dashboard: Host checks --


def test_dashboard_bound_to_another_loopback_address_answers_requests_naming_it(
    server: EmbeddedServer, db_name: str, tmp_path: Path
) -> None:
    """`--host 127.0.0.2` is a loopback address (dashboard._is_loopback says so) and binds, but the allowed
    Host list only holds 127.0.0.1/localhost/::1: every request to http://127.0.0.2:PORT/ is a 400."""
    port = free_port("127.0.0.2")
    proc = start_dashboard(server, db_name, tmp_path, "--host", "127.0.0.2", "--port", str(port))
    try:
        url = f"http://127.0.0.2:{port}"
        wait_up(url, proc, tmp_path)
        reply = httpx2.get(f"{url}/api/config", timeout=5)
        assert reply.status_code == 200, reply.text
    finally:
        proc.terminate()
        proc.wait(15)


def test_dashboard_on_all_interfaces_still_refuses_a_foreign_host_header(
    server: EmbeddedServer, db_name: str, tmp_path: Path, scheduler: Scheduler
) -> None:
    """With `--host 0.0.0.0` there is no Host check at all: a web page that rebinds attacker.example to
    127.0.0.1 reads every job's data and (without --token) cancels jobs, same-origin, custom header included.
    The operator's browser is the attack path whatever the bind address; only names of this machine should
    be answered (or an explicit allow-list)."""
    port = free_port("0.0.0.0")
    proc = start_dashboard(server, db_name, tmp_path, "--host", "0.0.0.0", "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc, tmp_path)
        assert httpx2.get(f"{url}/api/config", timeout=5).status_code == 200
        job = scheduler.add_job("sample_jobs:Noop")
        rebound = {"Host": f"attacker.example:{port}", "X-Taskscheduler-Action": "1"}
        assert httpx2.get(f"{url}/api/jobs/{job.id}", headers=rebound, timeout=5).status_code == 400
        assert httpx2.post(f"{url}/api/jobs/{job.id}/cancel", headers=rebound, timeout=5).status_code in (400, 403)
    finally:
        proc.terminate()
        proc.wait(15)


# -- dashboard: live feed --


@pytest.fixture
def live(scheduler: Scheduler) -> Iterator[tuple[str, Any]]:
    sock = bind("127.0.0.1", 0)
    app = create_app(scheduler)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, what="uvicorn to start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    srv.should_exit = True
    thread.join(10)
    sock.close()


def test_pages_learn_of_changes_missed_while_the_feed_thread_restarted(
    live: tuple[str, Any], scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 7: the table updates itself from change streams. When the feed thread's round fails (MongoDB
    unreachable while reading the node registry, any error), Broadcaster._run reopens a NEW change stream
    without a resume token: changes in between are lost, and open pages are never told (no new `ready`, which
    is what makes a page reload). The page keeps saying "live" and shows a stale table for good."""
    url, _app = live
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


# -- dashboard: the page in a real browser --

import test_dashboard_browser  # noqa: E402

browser = test_dashboard_browser.browser  # its fixtures, shared
dashboard_url = test_dashboard_browser.dashboard_url


def _shown(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, "shown").text)


@pytest.mark.e2e
def test_live_table_total_stays_exact_when_a_job_beyond_the_first_200_changes(
    browser: Any, dashboard_url: str, scheduler: Scheduler
) -> None:
    """SPEC 3/7: the table says "N of TOTAL". app.js upsertRow() counts any row it has not loaded as a new job
    (state.total += 1), so a status change of a job older than the 200 loaded ones inflates TOTAL for good."""
    oldest = scheduler.add_job("sample_jobs:Noop", options={"at": time.time() + 3600})
    for _ in range(204):
        scheduler.add_job("sample_jobs:Noop", options={"at": time.time() + 3600})
    browser.get(dashboard_url + "/")
    wait_until(lambda: _shown(browser) == "200 of 205 shown", timeout=20, what="the table loaded")
    scheduler.cancel_job(oldest.id)  # an old job changes: still 205 jobs
    newest = scheduler.add_job("sample_jobs:Noop")  # then one new job: 206
    wait_until(
        lambda: browser.execute_script("return state.rows.has(arguments[0])", str(newest.id)),
        timeout=20,
        what="the new job on the page",
    )
    assert _shown(browser) == "200 of 206 shown"


@pytest.mark.e2e
def test_live_table_keeps_a_bounded_number_of_rows_while_jobs_pour_in(
    browser: Any, dashboard_url: str, scheduler: Scheduler
) -> None:
    """Issue 12 / brief: the table stays bounded. The server sends at most 200 rows, but every live `job`
    event adds to app.js state.rows and nothing ever drops one: a page left open on a busy cluster holds every
    job it ever saw (memory) and re-sorts all of them on each event (renderRows is O(n log n) per event)."""
    browser.get(dashboard_url + "/")
    wait_until(lambda: _shown(browser) == "0 of 0 shown", timeout=20, what="the empty table")
    wait_until(lambda: browser.execute_script("return state.online"), timeout=20, what="live updates")
    jobs = [scheduler.add_job("sample_jobs:Noop", options={"at": time.time() + 3600}) for _ in range(300)]
    wait_until(
        lambda: browser.execute_script("return state.rows.has(arguments[0])", str(jobs[-1].id)),
        timeout=30,
        what="the last job on the page",
    )
    assert browser.execute_script("return state.rows.size") <= 200


# -- metrics: a worker manager that dies --

from test_metrics import sample, scrape, scrape_when_up  # noqa: E402


def _kill_manager(node: Node) -> None:
    import psutil

    (manager,) = psutil.Process(node.pid).children()
    manager.kill()
    wait_until(
        lambda: [c.pid for c in psutil.Process(node.pid).children() if c.status() != psutil.STATUS_ZOMBIE]
        not in ([], [manager.pid]),
        20,
        what="a new manager",
    )


def _settle(read: Callable[[], Any], ok: Callable[[Any], bool], seconds: float) -> Any:
    """The last value read within ``seconds`` (early when ``ok``)."""
    deadline = time.monotonic() + seconds
    value = read()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = read()
    return value


@pytest.mark.e2e
def test_manager_death_counts_the_interrupted_run_as_ended(
    scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    """SPEC 7 / issue 12: runs started and ended per class and status, counters that move by exactly the runs
    that happened. A run interrupted by the manager's death is released (the job runs again), but
    Queue._abandon_running clears _running without metrics.run_ended: started counts it, ended never does
    (and NodeMetrics._claims keeps the entry forever)."""
    port = free_port()
    node = start_node("--metrics-port", str(port), "--pm", "static", "--min-children", "1", "--max-children", "1")
    scrape_when_up(port, node)
    wait_until(lambda: sample(scrape(port), "taskscheduler_workers_idle") == 1, 20, what="an idle worker")
    cls = "sample_jobs:Sleep"
    job = scheduler.add_job(cls, {"seconds": 2})
    wait_until(lambda: sample(scrape(port), "taskscheduler_runs_started_total", **{"class": cls}) == 1, 20)
    _kill_manager(node)
    assert job.wait(timeout=40).status.name == "DONE"

    def counts() -> tuple[float, float, float]:
        s = scrape(port)
        ended = sum(v for (name, labels), v in s.items() if name == "taskscheduler_runs_ended_total")
        return (
            sample(s, "taskscheduler_runs_started_total", **{"class": cls}),
            ended,
            sample(s, "taskscheduler_runs_ended_total", **{"class": cls, "status": "released"}),
        )

    started, ended, released = _settle(counts, lambda v: v == (2, 2, 1), 10)
    assert (started, ended, released) == (2, 2, 1), (
        f"{started} runs started, {ended} ended ({released} released): the interrupted run is never counted"
    )
    assert node.stop() == 0


# -- dashboard: process life --


def test_dashboard_stops_promptly_on_sigint_with_live_pages_open(
    server: EmbeddedServer, db_name: str, tmp_path: Path
) -> None:
    """SPEC 7: `dashboard` serves until Ctrl-C. With pages open (server-sent events never end by themselves)
    Ctrl-C must still stop it within a few seconds, without a traceback."""
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
    """SPEC 7: with --token, actions need the token. `--token ' s3cret '` (a blank pasted from a file or env)
    is accepted by the CLI, but _token_ok compares the header's stripped value with the unstripped token, and
    browsers trim header values too: no request can ever carry it, every action is 403 forever. The CLI should
    strip it or refuse it (bad input, exit 2)."""
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
    """SPEC 7 job page: runs with errors, tracebacks and results. views.job_details returns EVERY ended run
    (Lifecycle.runs reads all of the job's events, up to the 500 MB event collection): a job with an interval
    of 1 s has ~600,000 runs in 7 days of retention, and its page becomes one giant response built in memory.
    The table is capped at 200 rows; the runs of one job deserve the same (newest first, with a total)."""
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
