"""Hostile input at the edges (SPEC 2, 3, 7): zone names the zone database answers with an OSError, secrets in URI
options, escape sequences in node registry entries, registry entries of the wrong shape.

In-process and quick: pure checks, or one CLI command run in this process against the session's test server."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pymongo.database import Database

from helpers import as_record, cli_in_process
from taskscheduler import JobStatus, Scheduler
from taskscheduler.constants import DEFAULT_JOB_QUEUE, NODE_REGISTRY
from taskscheduler.core.runs import next_start
from taskscheduler.errors import InvalidArgumentError
from taskscheduler.ops.embedded import EmbeddedServer
from taskscheduler.recurrence import timezone_name
from taskscheduler.redact import redact_uri
from taskscheduler.store import connect

SECRET = "S3CRETPW"
#: Zone names ZoneInfo answers with an OSError (a directory of the zone database, a name too long for a file),
#: where the code catches only ValueError and ZoneInfoNotFoundError.
OS_ERROR_ZONES = ["Europe", "America", "x" * 300]
#: The CLI run in this process leaves its MongoClient to the garbage collector, which warns.
CLI_IN_PROCESS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


_cli = cli_in_process


# -- secrets in URIs (SPEC 7: URI passwords masked everywhere) -----------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        # The TLS key's password is a URI option: an unreadable key file makes connect() quote the whole URI.
        f"mongodb://127.0.0.1:1/?tls=true&tlsCertificateKeyFile=/nonexistent&tlsCertificateKeyFilePassword={SECRET}",
        # An AWS session token in authMechanismProperties; any other mistake in the URI quotes it.
        f"mongodb://127.0.0.1:99999/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:{SECRET}",
    ],
)
def test_a_bad_uri_error_never_shows_a_secret_held_in_a_query_option(uri: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        connect(uri, "x", timeout_ms=100).client.close()
    assert SECRET not in str(caught.value), str(caught.value)
    assert SECRET not in redact_uri(uri)


# -- a stored time zone that makes ZoneInfo raise OSError ----------------------------------------------------------


@pytest.mark.parametrize("zone", OS_ERROR_ZONES)
def test_a_zone_naming_a_directory_is_an_invalid_argument_not_an_os_error(zone: str) -> None:
    """add_job(..., cron=..., timezone="Europe") (an easy slip for "Europe/Zurich") must be InvalidArgumentError:
    the CLI turns only that into one line with exit 2; an IsADirectoryError escapes as a traceback."""
    with pytest.raises(InvalidArgumentError):
        timezone_name("timezone", zone)


@pytest.mark.parametrize("zone", OS_ERROR_ZONES)
def test_the_end_of_a_run_of_a_stored_cron_job_with_such_a_zone_never_raises(zone: str) -> None:
    """A document written straight into the collection (schema.py checks only that ``timezone`` is a string):
    ending its run (a worker's end, or a node's sweep ending an orphaned run FAILED) computes the next cron match,
    and an OSError there escapes RunEnd, so the run can never be recorded as ended."""
    doc = {"options": {"cron": "* * * * *", "timezone": zone, "at": 0.0, "retry": 0}}
    try:
        next_start(as_record(doc), JobStatus.DONE, 1_000_000_000.0)
    except InvalidArgumentError:
        pass  # typed: what the caller handles (or None: the schedule ends with this run)
    except OSError as exc:
        pytest.fail(f"next_start raised {type(exc).__name__}: {exc}")


@CLI_IN_PROCESS
def test_show_of_a_waiting_cron_job_with_a_directory_zone_is_no_traceback(
    server: EmbeddedServer, db: Database[dict[str, Any]], scheduler: Scheduler, db_name: str
) -> None:
    """``show`` computes the next run in the stored zone and catches ValueError and ZoneInfoNotFoundError only."""
    process = scheduler.add_job("sample_jobs:Noop", {}, {"cron": "0 0 1 1 *", "timezone": "UTC"})
    # "Etc" is a directory of the zone database, as long as "UTC": the capped document keeps its size.
    db[DEFAULT_JOB_QUEUE].update_one({"_id": process.id}, {"$set": {"options.timezone": "Etc"}})
    code, out = _cli("show", str(process.id), "--mongodb-uri", server.uri, "--database", db_name)
    assert code in (0, None), (code, out)


# -- control characters from the node registry (SPEC 7: CLI output never passes control characters) --------------


def _registry_entry(node_id: Any, workers: Any) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {
        "_id": node_id,
        "host": "h",
        "pid": 1,
        "started": now,
        "expires": now + timedelta(hours=1),
        "version": "x",
        "modules": ["m"],
        "workers": workers,
    }


@CLI_IN_PROCESS
def test_info_escapes_the_id_of_a_node_registry_entry(
    server: EmbeddedServer, db: Database[dict[str, Any]], scheduler: Scheduler, db_name: str
) -> None:
    """``info`` passes host, pid and modules through ``visible`` but prints the entry's ``_id`` raw: whoever can
    write the registry (anyone who can write the job collection) sets the operator's terminal title, or worse."""
    db[NODE_REGISTRY].insert_one(_registry_entry("\x1b]0;pwned\x07\x1b[2J", []))
    code, out = _cli("info", "--mongodb-uri", server.uri, "--database", db_name)
    assert code in (0, None), (code, out)
    assert "\x1b" not in out and "\x07" not in out, repr(out)


@CLI_IN_PROCESS
def test_info_survives_a_registry_entry_whose_workers_are_not_documents(
    server: EmbeddedServer, db: Database[dict[str, Any]], scheduler: Scheduler, db_name: str
) -> None:
    """cluster_info reads ``w.get("job")`` of every worker: a string among them is an AttributeError, a
    traceback for ``info`` (and the same read in dashboard/views.py node_labels)."""
    db[NODE_REGISTRY].insert_one(_registry_entry("n1", ["not a worker"]))
    code, out = _cli("info", "--mongodb-uri", server.uri, "--database", db_name)
    assert code in (0, None), (code, out)
