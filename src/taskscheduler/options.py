"""Option names, defaults and strict validation: the one place Scheduler, Queue and WorkerManager use.

Validation never coerces: ``"10"`` or ``True`` for an int option is an error, as is an unknown name.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from bson import ObjectId

from . import constants as c
from .errors import InvalidArgumentError
from .recurrence import cron_expression, timezone_name

# Job options.
AT = "at"
INTERVAL = "interval"
INTERVAL_REFERENCE = "interval_reference"
RETRY = "retry"
RETRY_INTERVAL = "retry_interval"
FORCE_SPAWN = "force_spawn"
TIMEOUT = "timeout"
ID = "id"
IGNORE_DATA = "ignore_data"
CRON = "cron"
TIMEZONE = "timezone"
RETRY_BACKOFF = "retry_backoff"
RETRY_MAX_INTERVAL = "retry_max_interval"
RETRY_JITTER = "retry_jitter"
PRIORITY = "priority"
DEPENDS_ON = "depends_on"
LIMIT_KEY = "limit_key"

# Scheduler options.
JOB_QUEUE = "job_queue"
JOB_QUEUE_SIZE = "job_queue_size"
EVENT_QUEUE = "event_queue"
EVENT_QUEUE_SIZE = "event_queue_size"
DEFAULT_AT = "default_at"
DEFAULT_INTERVAL = "default_interval"
DEFAULT_INTERVAL_REFERENCE = "default_interval_reference"
DEFAULT_RETRY = "default_retry"
DEFAULT_RETRY_INTERVAL = "default_retry_interval"
DEFAULT_TIMEOUT = "default_timeout"
JOB_RETENTION = "job_retention"
PROGRESS_RATE_LIMIT = "progress_rate_limit"
#: Upstream's option, which upstream never used: accepted for drop-in code, ignored with a DeprecationWarning.
ORPHANED_RATE_LIMIT = "orphaned_rate_limit"

# Queue node options.
ORPHANED_TIMEOUT = "orphaned_timeout"
JOB_MODULES = "job_modules"
METRICS_PORT = "metrics_port"
METRICS_HOST = "metrics_host"
BURST = "burst"

# Worker manager options.
PM = "pm"
MIN_CHILDREN = "min_children"
MAX_CHILDREN = "max_children"
PM_DYNAMIC = "dynamic"
PM_STATIC = "static"
PM_ONDEMAND = "ondemand"
PM_MODES = (PM_DYNAMIC, PM_STATIC, PM_ONDEMAND)

INTERVAL_REFERENCES = ("start", "end")

Check = Callable[[str, Any], Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Largest value of a job's integer options: they are stored as int32, so updating them in place (``retry``
#: counts down) never changes a capped document's size.
INT32_MAX = 2**31 - 1


def int_at_least(minimum: int, maximum: int | None = None) -> Check:
    def check(name: str, value: Any) -> int:
        if not _is_int(value):
            raise InvalidArgumentError(f"option {name} must be an integer, got {value!r}")
        if value < minimum:
            raise InvalidArgumentError(f"option {name} must be >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise InvalidArgumentError(f"option {name} must be <= {maximum}, got {value!r}")
        return int(value)

    return check


def count_or_endless(name: str, value: Any) -> int:
    """A count where -1 means "no end" (``retry``) or "at once" (``interval``). Upstream reads every value below -1
    as -1 does, so code ported from it may pass one: stored as -1, so every reader sees one meaning."""
    if _is_int(value) and value < -1:
        value = -1
    count: int = int_at_least(-1, INT32_MAX)(name, value)
    return count


class _Ignored:
    """What the check of an ignored option returns: ``validate`` leaves such an option out."""


IGNORED = _Ignored()


def ignored_option(name: str, value: Any) -> _Ignored:
    """An upstream option this port has no use for: accepted (an int, as upstream casts it) and dropped."""
    int_at_least(0)(name, value)
    # stacklevel 4: past this check and validate() to the constructor or set_options the caller called.
    warnings.warn(
        f"option {name} is ignored (upstream never used it either); a queue node's lease is its orphaned_timeout",
        DeprecationWarning,
        stacklevel=4,
    )
    return IGNORED


def positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"option {name} must be a positive number, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"option {name} must be a boolean, got {value!r}")
    return value


def non_empty_string(name: str, value: Any) -> str:
    """A collection name MongoDB accepts: not empty, no ``$`` or NUL, no empty part between dots, not system's."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 200
        or "$" in value
        or "\0" in value
        or "" in value.split(".")
        or value.startswith("system.")
    ):
        raise InvalidArgumentError(f"option {name} must be a valid collection name, got {value!r}")
    return value


#: Latest time a job may be postponed to: the end of year 9999, the last a datetime can show.
MAX_TIMESTAMP = 253_402_300_799


def timestamp(name: str, value: Any) -> int | float:
    """Unix seconds (int or float) or an aware datetime, stored as unix seconds."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidArgumentError(f"option {name} must be an aware datetime (with tzinfo), got {value!r}")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"option {name} must be unix seconds >= 0 or an aware datetime, got {value!r}")
    if value > MAX_TIMESTAMP:
        raise InvalidArgumentError(f"option {name} must be a time before the year 10000, got {value!r}")
    return value


def interval_reference(name: str, value: Any) -> str:
    if value not in INTERVAL_REFERENCES or not isinstance(value, str):
        raise InvalidArgumentError(f'option {name} must be "start" or "end", got {value!r}')
    return str(value)


def backoff(name: str, value: Any) -> float:
    """A retry's growth factor: a finite number >= 1, stored as a double."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise InvalidArgumentError(f"option {name} must be a number >= 1, got {value!r}")
    if value > MAX_BACKOFF:
        raise InvalidArgumentError(f"option {name} must be <= {MAX_BACKOFF}, got {value!r}")
    return float(value)


#: Largest retry_backoff: beyond, retry_max_interval is reached by the second retry anyway.
MAX_BACKOFF = 1000.0


def object_id(name: str, value: Any) -> ObjectId:
    if not isinstance(value, ObjectId):
        raise InvalidArgumentError(f"option {name} must be a bson.ObjectId, got {value!r}")
    return value


#: Most jobs one job may depend on (SPEC 8).
MAX_DEPENDENCIES = 100
#: Longest limit key (characters): a key is a class name or a name of the application's.
MAX_LIMIT_KEY = 200


def dependencies(name: str, value: Any) -> list[ObjectId]:
    """Job ids (or Process objects) a job waits for, each once, in the order given; at most MAX_DEPENDENCIES."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise InvalidArgumentError(
            f"option {name} must be a list of job ids (ObjectId) or Process objects, got {type(value).__name__}"
        )
    ids: list[ObjectId] = []
    for item in value:
        job_id = item if isinstance(item, ObjectId) else getattr(item, "id", None)
        if not isinstance(job_id, ObjectId):
            raise InvalidArgumentError(f"option {name} must hold job ids (ObjectId) or Process objects, got {item!r}")
        if job_id not in ids:
            ids.append(job_id)
    if len(ids) > MAX_DEPENDENCIES:
        raise InvalidArgumentError(
            f"option {name} names {len(ids)} jobs; a job may depend on {MAX_DEPENDENCIES} at most"
        )
    return ids


def limit_key(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_LIMIT_KEY or any(ch in value for ch in "\x00\n\r"):
        raise InvalidArgumentError(
            f"option {name} must be a string of at most {MAX_LIMIT_KEY} characters (one line), got {value!r}"
        )
    try:  # a lone surrogate has no UTF-8 form: bson would raise UnicodeEncodeError at the write
        value.encode()
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"option {name} must be text that can be stored (UTF-8), got {value!r}") from None
    return value


def pm_mode(name: str, value: Any) -> str:
    if value not in PM_MODES or not isinstance(value, str):
        raise InvalidArgumentError(f"option {name} must be one of {', '.join(PM_MODES)}, got {value!r}")
    return str(value)


#: Job options: name -> check. Order is the stored order of ``options``.
JOB_OPTIONS: dict[str, Check] = {
    AT: timestamp,
    INTERVAL: count_or_endless,
    INTERVAL_REFERENCE: interval_reference,
    RETRY: count_or_endless,
    RETRY_INTERVAL: int_at_least(0, INT32_MAX),
    FORCE_SPAWN: boolean,
    TIMEOUT: int_at_least(0, INT32_MAX),
    IGNORE_DATA: boolean,
    CRON: cron_expression,
    TIMEZONE: timezone_name,
    RETRY_BACKOFF: backoff,
    RETRY_MAX_INTERVAL: int_at_least(0, INT32_MAX),
    RETRY_JITTER: boolean,
    PRIORITY: int_at_least(-100, 100),
    DEPENDS_ON: dependencies,
    LIMIT_KEY: limit_key,
    ID: object_id,
}

#: Largest capped collection size accepted (1 PiB): beyond, the server refuses it.
MAX_COLLECTION_BYTES = 2**50

SCHEDULER_OPTIONS: dict[str, Check] = {
    JOB_QUEUE: non_empty_string,
    JOB_QUEUE_SIZE: int_at_least(0, MAX_COLLECTION_BYTES),
    EVENT_QUEUE: non_empty_string,
    EVENT_QUEUE_SIZE: int_at_least(0, MAX_COLLECTION_BYTES),
    DEFAULT_AT: timestamp,
    DEFAULT_INTERVAL: count_or_endless,
    DEFAULT_INTERVAL_REFERENCE: interval_reference,
    DEFAULT_RETRY: count_or_endless,
    DEFAULT_RETRY_INTERVAL: int_at_least(0, INT32_MAX),
    DEFAULT_TIMEOUT: int_at_least(0, INT32_MAX),
    JOB_RETENTION: int_at_least(1),
    PROGRESS_RATE_LIMIT: int_at_least(0),
    ORPHANED_RATE_LIMIT: ignored_option,
}

SCHEDULER_DEFAULTS: dict[str, Any] = {
    JOB_QUEUE: c.DEFAULT_JOB_QUEUE,
    JOB_QUEUE_SIZE: c.DEFAULT_JOB_QUEUE_SIZE,
    EVENT_QUEUE: c.DEFAULT_EVENT_QUEUE,
    EVENT_QUEUE_SIZE: c.DEFAULT_EVENT_QUEUE_SIZE,
    DEFAULT_AT: c.DEFAULT_AT,
    DEFAULT_INTERVAL: c.DEFAULT_INTERVAL,
    DEFAULT_INTERVAL_REFERENCE: c.DEFAULT_INTERVAL_REFERENCE,
    DEFAULT_RETRY: c.DEFAULT_RETRY,
    DEFAULT_RETRY_INTERVAL: c.DEFAULT_RETRY_INTERVAL,
    DEFAULT_TIMEOUT: c.DEFAULT_TIMEOUT,
    JOB_RETENTION: c.DEFAULT_JOB_RETENTION,
    PROGRESS_RATE_LIMIT: c.DEFAULT_PROGRESS_RATE_LIMIT,
}

def lease_seconds(name: str, value: Any) -> float:
    """At least one second: a node renews its leases six times per timeout and fences at half of it."""
    positive_number(name, value)
    if value < 1:
        raise InvalidArgumentError(f"option {name} must be at least 1 second, got {value!r}")
    return float(value)


def module_names(name: str, value: Any) -> tuple[str, ...]:
    """A list of importable module names (a node's allow-list)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidArgumentError(f"option {name} must be a list of module names, got {value!r}")
    for module in value:
        if not isinstance(module, str) or not module or not all(part.isidentifier() for part in module.split(".")):
            raise InvalidArgumentError(f"option {name} must hold module names such as 'myapp.jobs', got {module!r}")
    return tuple(value)


def port_or_off(name: str, value: Any) -> int | None:
    """A TCP port (1-65535), or 0/None for off (a node's metrics endpoint)."""
    if value is None or (_is_int(value) and value == 0):
        return None
    port: int = int_at_least(1, 65535)(name, value)
    return port


def bind_address(name: str, value: Any) -> str:
    """An address to listen on: a host name or IP address without port (``0.0.0.0``: every interface)."""
    allowed = (ch.isascii() and (ch.isalnum() or ch in "._-:") for ch in value) if isinstance(value, str) else ()
    if not isinstance(value, str) or not value or not all(allowed):
        raise InvalidArgumentError(
            f"option {name} must be a host name or IP address such as '127.0.0.1' or '0.0.0.0', got {value!r}"
        )
    return value


QUEUE_OPTIONS: dict[str, Check] = {
    ORPHANED_TIMEOUT: lease_seconds,
    JOB_MODULES: module_names,
    METRICS_PORT: port_or_off,
    METRICS_HOST: bind_address,
    BURST: boolean,
    ORPHANED_RATE_LIMIT: ignored_option,
}
QUEUE_DEFAULTS: dict[str, Any] = {
    ORPHANED_TIMEOUT: c.DEFAULT_ORPHANED_TIMEOUT,
    JOB_MODULES: (),
    METRICS_PORT: None,
    METRICS_HOST: c.DEFAULT_METRICS_HOST,
    BURST: False,
}

MANAGER_OPTIONS: dict[str, Check] = {PM: pm_mode, MIN_CHILDREN: int_at_least(0), MAX_CHILDREN: int_at_least(1)}
MANAGER_DEFAULTS: dict[str, Any] = {
    PM: c.DEFAULT_PM,
    MIN_CHILDREN: c.DEFAULT_MIN_CHILDREN,
    MAX_CHILDREN: c.DEFAULT_MAX_CHILDREN,
}


def validate(options: Mapping[str, Any] | None, checks: Mapping[str, Check], kind: str) -> dict[str, Any]:
    """Checked copy of ``options``; raises InvalidArgumentError for an unknown name or a bad value."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidArgumentError(f"{kind} options must be a mapping, got {type(options).__name__}")
    checked: dict[str, Any] = {}
    for name, value in options.items():
        check = checks.get(name) if isinstance(name, str) else None
        if check is None:
            valid = ", ".join(known for known, known_check in checks.items() if known_check is not ignored_option)
            raise InvalidArgumentError(f"invalid {kind} option {name!r} given; valid: {valid}")
        value = check(name, value)
        if value is not IGNORED:
            checked[name] = value
    return checked


def job_options(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Validated job options merged over the scheduler defaults, in stored order (``id`` kept last)."""
    checked = validate(given, JOB_OPTIONS, "job")
    merged: dict[str, Any] = {
        AT: defaults[DEFAULT_AT],
        INTERVAL: defaults[DEFAULT_INTERVAL],
        INTERVAL_REFERENCE: defaults[DEFAULT_INTERVAL_REFERENCE],
        RETRY: defaults[DEFAULT_RETRY],
        RETRY_INTERVAL: defaults[DEFAULT_RETRY_INTERVAL],
        FORCE_SPAWN: False,
        TIMEOUT: defaults[DEFAULT_TIMEOUT],
        IGNORE_DATA: False,
        CRON: c.DEFAULT_CRON,
        TIMEZONE: c.DEFAULT_TIMEZONE,
        RETRY_BACKOFF: c.DEFAULT_RETRY_BACKOFF,
        RETRY_MAX_INTERVAL: c.DEFAULT_RETRY_MAX_INTERVAL,
        RETRY_JITTER: False,
        PRIORITY: c.DEFAULT_PRIORITY,
        DEPENDS_ON: [],
        LIMIT_KEY: "",
    }
    merged.update(checked)
    if merged[CRON] and checked.get(INTERVAL):
        raise InvalidArgumentError(
            f"option cron ({merged[CRON]!r}) cannot be combined with option interval ({merged[INTERVAL]!r}): "
            "a job repeats by one or the other"
        )
    if merged[CRON]:
        merged[INTERVAL] = 0  # a scheduler's default_interval does not apply to a cron job
    return merged


def manager_options(given: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = dict(MANAGER_DEFAULTS)
    merged.update(validate(given, MANAGER_OPTIONS, "worker manager"))
    if merged[MIN_CHILDREN] > merged[MAX_CHILDREN]:
        raise InvalidArgumentError(
            f"option min_children ({merged[MIN_CHILDREN]}) must not be greater than "
            f"option max_children ({merged[MAX_CHILDREN]})"
        )
    return merged
