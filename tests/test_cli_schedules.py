"""``taskscheduler schedules [--json]`` (SPEC 7, "Schedules"), run as a real subprocess against the test server:
the recurring jobs with their next start, last run, runs so far and pauses; readable times with date and zone,
ids whole at 80 columns, no control character from stored data."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from rich.console import Console

from helpers import TESTS_DIR, in_a_terminal
from taskscheduler import JobStatus, Scheduler
from taskscheduler.cli.cluster import schedules_table
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.ops.schedules import Schedule, schedules
from taskscheduler.testing import run_jobs

SCRIPT = str(Path(sys.executable).with_name("taskscheduler"))
#: A time far off, with a date no one mistakes for today: 2031-05-06 05:00 UTC (07:00 in Zurich, summer time).
LATER = datetime(2031, 5, 6, 5, 0, tzinfo=timezone.utc)

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run(server: EmbeddedServer, db_name: str) -> Run:
    def call(*args: str, zone: str = "UTC") -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            PYTHONPATH=str(TESTS_DIR),
            TASKSCHEDULER_MONGODB_URI=server.uri,
            TASKSCHEDULER_DATABASE=db_name,
            TZ=zone,  # times are shown in the terminal's zone
        )
        return subprocess.run(
            [sys.executable, "-m", "taskscheduler", *args], capture_output=True, text=True, env=env, timeout=60
        )

    return call


def _add_three(scheduler: Scheduler) -> tuple[Any, Any, Any]:
    hourly = scheduler.add_job("sample_jobs:Noop", interval=3600, at=LATER.timestamp())
    zurich = scheduler.add_job("sample_jobs:Echo", cron="0 7 * * *", timezone="Europe/Zurich", at=LATER.timestamp())
    once = scheduler.add_job("sample_jobs:Noop", at=LATER.timestamp())
    return hourly, zurich, once


def test_json_lists_the_recurring_jobs_with_names_and_utc_times(run: Run, scheduler: Scheduler) -> None:
    hourly, zurich, once = _add_three(scheduler)
    ran = scheduler.add_job("sample_jobs:Fail", interval=600)
    run_jobs(scheduler)
    scheduler.pause("sample_jobs:Echo")
    out = run("schedules", "--json")
    assert out.returncode == 0, out.stderr
    listed = {row["id"]: row for row in json.loads(out.stdout)}
    assert set(listed) == {str(hourly.id), str(zurich.id), str(ran.id)}
    assert str(once.id) not in listed
    assert listed[str(hourly.id)] == {
        "id": str(hourly.id),
        "job_class": "sample_jobs:Noop",
        "kind": "interval",
        "expression": "every 1h",
        "timezone": None,
        "next_start": "2031-05-06T05:00:00.000+00:00",
        "last_status": None,
        "last_end": None,
        "runs": 0,
        "paused": False,
        "status": "POSTPONED",
    }
    cron = listed[str(zurich.id)]
    assert (cron["kind"], cron["expression"], cron["timezone"], cron["paused"]) == (
        "cron",
        "0 7 * * *",
        "Europe/Zurich",
        True,
    )
    assert cron["next_start"] == "2031-05-06T05:00:00.000+00:00"  # 07:00 in Zurich (summer time)
    failed = listed[str(ran.id)]
    assert (failed["last_status"], failed["runs"], failed["status"]) == ("FAILED", 1, "POSTPONED")
    assert failed["last_end"].endswith("+00:00")


def test_the_table_shows_dates_zones_and_the_cron_zone(run: Run, scheduler: Scheduler) -> None:
    hourly, zurich, _ = _add_three(scheduler)
    out = run("schedules")
    assert out.returncode == 0, out.stderr
    assert "2 schedules, soonest first" in out.stdout
    assert str(hourly.id) in out.stdout and str(zurich.id) in out.stdout
    # In the terminal's zone (UTC here) with its date, and the cron's own clock after it.
    assert "2031-05-06 05:00:00 UTC (2031-05-06 07:00:00 Europe/Zurich)" in out.stdout
    assert "every 1h" in out.stdout and "0 7 * * * (Europe/Zurich)" in out.stdout
    local = run("schedules", zone="America/New_York")
    assert "2031-05-06 01:00:00 EDT" in local.stdout
    utc = run("--utc", "schedules", zone="America/New_York")
    assert "2031-05-06 05:00:00 UTC" in utc.stdout and "EDT" not in utc.stdout


def test_no_schedules_says_so(run: Run, scheduler: Scheduler) -> None:
    scheduler.add_job("sample_jobs:Noop", at=LATER.timestamp())
    out = run("schedules")
    assert out.returncode == 0 and "no schedules" in out.stdout, out.stderr
    assert json.loads(run("schedules", "--json").stdout) == []


def test_stored_control_characters_never_reach_the_terminal(run: Run, new_scheduler: Callable[..., Scheduler]) -> None:
    scheduler = new_scheduler()  # without the size guard: this write changes a document's size, as a hostile one may
    job = scheduler.add_job("sample_jobs:Noop", interval=60, at=LATER.timestamp())
    scheduler.store.jobs.update_one({"_id": job.id}, {"$set": {"class": "evil\x1b]0;pwned\x07:Job\n[red]x"}})
    out = run("schedules")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "evil\\x1b]0;pwned\\x07:Job\\x0a[red]x" in out.stdout.replace("\n", "").replace(" ", "")


def test_ids_print_whole_in_an_80_column_terminal(server: EmbeddedServer, db_name: str, scheduler: Scheduler) -> None:
    ids = [p.id for p in _add_three(scheduler)[:2]]
    ids.append(scheduler.add_job("a_rather_long_package_name.with_a_module:AndAVeryLongJobClassName", interval=5).id)
    shown = in_a_terminal(
        "schedules",
        columns=80,
        env={"TASKSCHEDULER_MONGODB_URI": server.uri, "TASKSCHEDULER_DATABASE": db_name, "TZ": "UTC"},
    )
    for job_id in ids:
        assert str(job_id) in shown, shown  # whole, so it can be pasted into show or cancel
    assert max(len(line) for line in shown.splitlines()) <= 80, shown
    hourly_line = next(line for line in shown.splitlines() if str(ids[0]) in line)
    assert "2031-05-06 05:00:00" in hourly_line and "…" not in shown, shown  # its date: not today


def test_the_table_keeps_ids_whole_at_every_width() -> None:
    now = time.time()
    found = [
        Schedule(ObjectId(), "pkg.mod:Long" * 5, "cron", "0 7 * * 1-5", "Asia/Tokyo", now + 9e4, JobStatus.DONE,
                 now - 60, 12, True, JobStatus.POSTPONED),
        Schedule(ObjectId(), "m:X", "interval", "every 1h 30m", None, None, JobStatus.TIMEOUT, now - 5, 3, False,
                 JobStatus.PROCESSING),
        Schedule(ObjectId(), "m:Y", "interval", "every 5m", None, now - 20, None, None, 0, False, JobStatus.WAITING),
    ]  # fmt: skip
    for width in range(40, 201, 7):
        out = Console(width=width, record=True, file=io.StringIO())
        out.print(schedules_table(found, width=width))
        text = out.export_text()
        assert all(str(s.id) in text for s in found), (width, text)
        assert max(len(line) for line in text.splitlines()) <= width, (width, text)
        flat = re.sub(r"\s+", "", text)
        for word in ("running", "paused", "TIMEOUT", "DONE", "duesince", "every1h30m", "(Asia/Tokyo)"):
            assert word in flat, (width, word, text)


def test_schedules_are_listed_soonest_first(scheduler: Scheduler) -> None:
    late = scheduler.add_job("sample_jobs:Noop", interval=60, at=LATER.timestamp())
    soon = scheduler.add_job("sample_jobs:Noop", interval=60, at=time.time() + 60)
    assert [s.id for s in schedules(scheduler)] == [soon.id, late.id]
