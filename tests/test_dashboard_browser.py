"""The dashboard in a real headless browser (Debian's chromium, driven by selenium through Debian's chromedriver):
rows appear without a reload, progress bars move, cancel works from the page, a failed job's traceback shows, and
markup in job data stays text; what an operator reads at a glance (times with date and zone, the error column,
bars of failed runs, unserved classes, trends, limits and pauses, schedules, what blocks a job) and the actions
behind a confirmation (pause, resume, bulk requeue). The browser runs in the Europe/Zurich zone, so times shown
in its zone are told apart from UTC.

Without chromium and chromedriver this test skips with the reason; with CI=true it fails instead (``.ci/run``
installs them). ``DASHBOARD_SCREENSHOT=docs/dashboard.png`` saves the main page there (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    TESTS_DIR,
    Node,
    wait_until,
)
from taskscheduler import JobStatus, Scheduler
from taskscheduler.ops.embedded import EmbeddedServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SLOW = "sample_jobs:SlowProgress"
EVIL = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
ZONE = "Europe/Zurich"
#: A time as the page shows it: date, time to the second, the zone's short name (en-US: "GMT+1" or "CET").
SHOWN_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (GMT\+[12]|CES?T)$")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) or shutil.which(os.path.basename(path))):
            return f"{path} not found: apt-get install {package} (.ci/run does)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1360,860"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors (CSP violations among them)
    # The driver's path given explicitly: Selenium Manager never looks for one on the network. The browser runs in
    # a zone other than UTC, so that the page's local times are told apart from stored UTC ones.
    service = Service(executable_path=shutil.which("chromedriver") or CHROMEDRIVER, env={**os.environ, "TZ": ZONE})
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


@pytest.fixture
def dashboard_url(server: EmbeddedServer, db_name: str, tmp_path: Path) -> Iterator[str]:
    """``taskscheduler dashboard`` as an operator runs it: its own process, on a free port."""

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskscheduler", "dashboard", "--port", str(port)],
        env=dict(os.environ, TASKSCHEDULER_MONGODB_URI=server.uri, TASKSCHEDULER_DATABASE=db_name),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        try:
            with urllib.request.urlopen(f"{url}/api/config", timeout=2):
                return True
        except OSError:
            return False

    wait_until(up, timeout=20, what="the dashboard")
    yield url
    proc.terminate()
    proc.wait(15)
    log.close()


@pytest.mark.e2e
def test_the_dashboard_in_a_real_browser(
    browser: Any, dashboard_url: str, scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    node = start_node("--pm", "static", "--min-children", "2", "--max-children", "2")
    # A cluster with some history: done, failed (its data holds markup), and a job for later.
    done = [scheduler.add_job("sample_jobs:Echo", {"n": n}) for n in range(3)]
    failed = scheduler.add_job("sample_jobs:Fail", {"note": EVIL})
    scheduler.add_job("sample_jobs:Noop", options={"at": time.time() + 3600})
    scheduler.wait_for([*done, failed], timeout=20)

    browser.get(dashboard_url + "/")
    browser.execute_script("window.__loaded_once = true")  # gone if the page ever reloads

    # Rows are replaced as changes arrive: read them in one script each (a held element may be gone by then),
    # and click with a retry for the same reason.
    def text(selector: str) -> str | None:
        script = "const e = document.querySelector(arguments[0]); return e && e.textContent"
        found = browser.execute_script(script, selector)
        return None if found is None else str(found)

    def attribute(selector: str, name: str) -> str | None:
        script = "const e = document.querySelector(arguments[0]); return e && e.getAttribute(arguments[1])"
        found = browser.execute_script(script, selector, name)
        return None if found is None else str(found)

    def row_status(job_id: object) -> str | None:
        return attribute(f'tr[data-id="{job_id}"]', "data-status")

    def progress(job_id: object) -> float | None:
        found = browser.execute_script(
            "const e = document.querySelector(arguments[0]); return e && e.value", f'tr[data-id="{job_id}"] progress'
        )
        return None if found is None else float(found)

    def click(selector: str) -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, selector).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    wait_until(lambda: text("#live.on"), timeout=10, what="the live stream")
    wait_until(lambda: row_status(failed.id) == "failed", what="the failed job's row")
    wait_until(lambda: text('.count[data-status="done"] .n') == "3", what="the done count")
    # The registry entry a node writes at start lists no workers yet; the page shows each refresh (every 3 s).
    card = wait_until(lambda: "worker pid" in text(".node-card") and text(".node-card"), timeout=15, what="workers")
    assert "worker pid" in card and ("idle" in card or "busy" in card)

    # A job added from Python appears, and its progress bar moves, without a reload.
    moving = scheduler.add_job(SLOW, {"steps": 10, "pause": 0.35})
    wait_until(lambda: row_status(moving.id) is not None, timeout=10, what="the new job's row")
    seen: set[float] = set()

    def progressed() -> bool:
        value = progress(moving.id)
        if value is not None:
            seen.add(value)
        return row_status(moving.id) == "done"

    wait_until(progressed, timeout=20, interval=0.05, what="the job to end")
    assert len([v for v in seen if 0 < v < 100]) >= 2, seen  # the bar moved at least twice on its way
    assert browser.execute_script("return window.__loaded_once") is True

    # Cancel a running job from the page.
    endless = scheduler.add_job(SLOW, {"steps": 100, "pause": 0.3})  # 30 s: canceled long before
    wait_until(lambda: row_status(endless.id) == "processing", timeout=10, what="the endless job to run")
    wait_until(lambda: (progress(endless.id) or 0) > 0, what="the endless job's first progress")
    wait_until(lambda: click(f'tr[data-id="{endless.id}"] button.cancel'), what="the cancel button")
    wait_until(lambda: row_status(endless.id) == "canceled", timeout=10, what="CANCELED on the page")
    assert endless.refresh().status == JobStatus.CANCELED

    # Open the failed job and read its traceback; the markup in its data is shown as text.
    wait_until(lambda: click(f'tr[data-id="{failed.id}"] td.id a'), what="the failed job's link")
    traceback = wait_until(lambda: text("pre.traceback"), timeout=10, what="the traceback")
    assert "Traceback" in traceback and "ValueError: boom" in traceback
    data = text("#job-data") or ""
    assert "<script>" in data and "onerror" in data
    assert not browser.find_elements(By.CSS_SELECTOR, "#job-view img, #job-view script")
    assert browser.execute_script("return window.__xss") is None
    assert browser.execute_script("return window.__loaded_once") is True
    assert node.stop() == 0


def _shown(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, "shown").text)


@pytest.mark.e2e
def test_live_table_total_stays_exact_when_a_job_beyond_the_first_200_changes(
    browser: Any, dashboard_url: str, scheduler: Scheduler
) -> None:
    """SPEC 3/7: the table's "N of TOTAL" stays exact when a job older than the 200 loaded ones changes."""
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
    # Exact once the next counts arrive (a count sent before the new row's change may already include it).
    wait_until(lambda: _shown(browser) == "200 of 206 shown", timeout=10, what="the exact total")


@pytest.mark.e2e
def test_live_table_keeps_a_bounded_number_of_rows_while_jobs_pour_in(
    browser: Any, dashboard_url: str, scheduler: Scheduler
) -> None:
    """The live table holds at most 200 rows however many jobs it is told of."""
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


class Page:
    """Reads and clicks on the page. Rows are replaced as changes arrive: each read is one script (a held element
    may be gone by then), and clicks are retried for the same reason."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser

    def text(self, selector: str) -> str | None:
        script = "const e = document.querySelector(arguments[0]); return e && e.textContent"
        found = self.browser.execute_script(script, selector)
        return None if found is None else str(found)

    def texts(self, selector: str) -> list[str]:
        script = "return Array.from(document.querySelectorAll(arguments[0])).map((e) => e.textContent)"
        return [str(t) for t in self.browser.execute_script(script, selector)]

    def attribute(self, selector: str, name: str) -> str | None:
        script = "const e = document.querySelector(arguments[0]); return e && e.getAttribute(arguments[1])"
        found = self.browser.execute_script(script, selector, name)
        return None if found is None else str(found)

    def value(self, selector: str) -> Any:
        script = "const e = document.querySelector(arguments[0]); return e && e.value"
        return self.browser.execute_script(script, selector)

    def click(self, selector: str) -> bool:
        from selenium.common.exceptions import (
            ElementNotInteractableException,
            NoSuchElementException,
            StaleElementReferenceException,
        )

        try:
            self.browser.find_element(By().CSS_SELECTOR, selector).click()
        except (NoSuchElementException, StaleElementReferenceException, ElementNotInteractableException):
            return False
        return True

    def dialog_open(self) -> bool:
        return bool(self.browser.execute_script("return document.getElementById('confirm').open"))

    def confirm(self, answer: bool) -> None:
        """Answer the confirmation dialog, which must be open."""
        wait_until(self.dialog_open, what="the confirmation dialog")
        wait_until(lambda: self.click("#confirm-yes" if answer else "#confirm-no"), what="the dialog's button")
        wait_until(lambda: not self.dialog_open(), what="the dialog to close")

    def message(self) -> str:
        return "" if self.attribute("#message", "hidden") is not None else self.text("#message-text") or ""

    def type_into(self, selector: str, text: str) -> None:
        field = self.browser.find_element(By().CSS_SELECTOR, selector)
        field.clear()
        field.send_keys(text)


def By() -> Any:  # noqa: N802 - selenium's class, imported only once the browser is known to be there
    from selenium.webdriver.common.by import By as by

    return by


@pytest.mark.e2e
def test_what_an_operator_reads_and_does_in_a_real_browser(
    browser: Any, dashboard_url: str, scheduler: Scheduler, start_node: Callable[..., Node]
) -> None:
    node = start_node("--pm", "static", "--min-children", "2", "--max-children", "2")
    # Given a cluster with a limit, some history and jobs in most states.
    scheduler.set_limit("sample_jobs:Echo", concurrency=2, rate="100/m")
    done = [scheduler.add_job("sample_jobs:Echo", {"n": n}) for n in range(3)]
    failed = [scheduler.add_job("sample_jobs:Fail", {"n": n}) for n in range(2)]
    later = scheduler.add_job("sample_jobs:Noop", options={"at": time.time() + 5400})
    blocked = scheduler.add_job("sample_jobs:Gather", None, depends_on=[later])
    cron = scheduler.add_job("sample_jobs:Noop", cron="0 7 * * *", timezone=ZONE)
    unserved = scheduler.add_job("reports.monthly:Summary", {"month": 11})
    scheduler.wait_for([*done, *failed], timeout=20)
    # The lifecycle stores progress 100 at every run's end (core/changes.py); a run that failed part way is stored
    # here as the page should get it, to show that its bar stops where the run stopped.
    scheduler.store.jobs.update_one({"_id": failed[0].id}, {"$set": {"progress": 40.0}})
    page = Page(browser)

    # When an operator opens the dashboard.
    browser.get(dashboard_url + "/")
    wait_until(lambda: page.text("#live.on"), timeout=10, what="the live stream")
    row = 'tr[data-id="{}"]'.format
    wait_until(lambda: page.attribute(row(failed[0].id), "data-status") == "failed", what="the failed rows")

    # Then times read with their date and zone, relative ages and durations, never raw ISO or unix floats.
    assert page.text("#zone") == f"times in {ZONE}"
    created = page.text(f"{row(done[0].id)} td.age") or ""
    assert re.fullmatch(r"now|\d+ (s|min) ago", created), created
    assert SHOWN_TIME.match(page.attribute(f"{row(done[0].id)} td.age time", "title") or ""), "no date and zone"
    assert re.search(r"ended (now|\d+ (s|min) ago) · took \d", page.text(f"{row(done[0].id)} td.when") or "")
    assert re.fullmatch(r"starts in 1 h", page.text(f"{row(later.id)} td.when") or "")
    shown = browser.execute_script("return document.getElementById('list-view').innerText")
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d|\d{10}\.\d", shown), "a raw ISO time or unix float is shown"
    # The error column, the bar of a failed run in its colour, stopped where it stopped; the unserved warning.
    assert (page.text(f"{row(failed[1].id)} td.error") or "").startswith("ValueError: boom: {'n': 1}")
    assert page.text(f"{row(done[0].id)} td.error") == ""
    wait_until(lambda: page.value(f"{row(failed[0].id)} progress") == 40, what="the failed run's bar at 40 %")
    assert "failed" in (page.attribute(f"{row(failed[0].id)} progress", "class") or "")
    assert page.attribute(f"{row(failed[0].id)} progress", "title") == "stopped at 40%"
    wait_until(lambda: page.text(f"{row(unserved.id)} .warn"), what="the unserved class's warning")
    assert page.text(f"{row(later.id)} .warn") is None  # sample_jobs is served by the live node
    # Trends: the chart drawn by the page, and per class over the last hour.
    wait_until(lambda: page.texts('#trends-classes tr[data-class="sample_jobs:Echo"] td.runs') == ["3"],
               what="the per-class trends")
    assert page.text('#trends-classes tr[data-class="sample_jobs:Fail"] td.failure-rate') == "100%"
    p95 = page.text('#trends-classes tr[data-class="sample_jobs:Echo"] td.p95') or ""
    assert re.fullmatch(r"\d+ ms|\d+\.\d s", p95), p95
    assert len(page.texts("#trends-chart svg rect.bar-done")) >= 1
    assert re.match(r"\d+ runs ended in the last hour", page.attribute("#trends-chart svg", "aria-label") or "")
    # Limits with what each holds; schedules.
    wait_until(lambda: page.text('#flow tr[data-key="sample_jobs:Echo"]'), what="the limit")
    assert "2 at once, 100/m" in (page.text('#flow tr[data-key="sample_jobs:Echo"]') or "")
    cron_row = wait_until(lambda: page.text(f'#schedules tr[data-id="{cron.id}"]'), what="the cron schedule")
    assert f"cron 0 7 * * * ({ZONE})" in cron_row
    assert SHOWN_TIME.match((page.text(f'#schedules tr[data-id="{cron.id}"] td.next') or "").split(" (")[0])

    # When they pause a limit key from the page: nothing happens until they confirm.
    page.type_into("#pause-key", "reports")
    wait_until(lambda: page.click("#pause-button"), what="the pause button")
    page.confirm(False)
    assert scheduler.paused() == []
    wait_until(lambda: page.click("#pause-button"), what="the pause button")
    page.confirm(True)
    wait_until(lambda: scheduler.paused() == ["reports"], what="the pause")
    wait_until(lambda: page.text('#flow table.paused tr[data-key="reports"]'), what="the pause on the page")
    assert page.message() == "paused reports"

    screenshot = os.environ.get("DASHBOARD_SCREENSHOT")
    if screenshot:  # the whole main page: jobs in most states, the trends, a limit and a pause, schedules
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1360, min(int(height) + 140, 2200))
        time.sleep(0.3)  # one frame to lay the taller page out (no event says so)
        browser.save_screenshot(str(TESTS_DIR.parent / screenshot))
        browser.set_window_size(1360, 860)

    # When they requeue the failed jobs of the table's filter: told how many first, then what happened.
    wait_until(lambda: page.click("#bulk-requeue"), what="the bulk requeue button")
    wait_until(page.dialog_open, what="the confirmation dialog")
    assert page.text("#confirm-title") == "Requeue 2 jobs?"
    page.confirm(True)
    wait_until(lambda: page.message().startswith("requeued 2 jobs"), what="the bulk requeue's report")
    assert all(scheduler.get_job(job.id).run == 2 for job in failed)

    # A postponed job's page: its next start and its options read as an operator reads them.
    wait_until(lambda: page.click(f"{row(later.id)} td.id a"), what="the postponed job's link")
    wait_until(lambda: page.text("#job-id") == str(later.id), what="its page")
    next_start = wait_until(lambda: page.text(".field-next"), what="its next start")
    assert SHOWN_TIME.match(next_start.split(" (")[0]) and next_start.endswith("(in 1 h)"), next_start
    assert SHOWN_TIME.match(page.text(".field-option-at") or ""), page.text(".field-option-at")
    assert page.text(".field-option-retry") == "0 retries left"
    # A blocked job's page names what blocks it, a link to that job's page.
    browser.get(f"{dashboard_url}/#/job/{blocked.id}")
    wait_until(lambda: page.text(".field-blocked") == str(later.id), what="blocked by")
    wait_until(lambda: page.click(".field-blocked a"), what="the dependency's link")
    wait_until(lambda: page.text("#job-id") == str(later.id), what="the dependency's page")

    # Resume from the page, behind a confirmation too.
    browser.get(dashboard_url + "/#/")
    wait_until(lambda: page.click('#flow table.paused tr[data-key="reports"] button.resume'), what="resume")
    page.confirm(True)
    wait_until(lambda: scheduler.paused() == [], what="the resume")
    wait_until(lambda: page.text('#flow table.paused tr[data-key="reports"]') is None, what="the pause gone")

    severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert severe == [], severe  # no script error, no CSP violation, no failed request
    assert node.stop() == 0
