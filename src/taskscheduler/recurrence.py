"""When a job runs again: cron expressions in a time zone, and retry delays with backoff and jitter.

Cron expressions are parsed by croniter (Python >= 3.9, MIT, maintained in the Pallets community ecosystem; it
knows the ``@hourly``-style aliases). croniter reads an expression in local wall-clock time; the daylight-saving
rules on top are ours, as Debian's cron documents them: a time skipped when clocks go forward runs once, at the
first instant after the gap; a time that occurs twice when clocks go back runs once, at its first occurrence,
unless the job runs every hour or more often (then each real hour counts).
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from .errors import InvalidArgumentError

#: Aliases croniter accepts in place of five fields.
ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
#: Longest expression accepted: the stored option never grows, and no real expression is longer.
MAX_CRON_LENGTH = 200
#: croniter's random values ("R", "R(1-5)"): another time at each evaluation, so not a schedule.
_RANDOM = re.compile(r"^[Rr](?:$|[(/])")


def cron_expression(name: str, value: Any) -> str:
    """A five-field cron expression (names, ranges, steps) or an alias; ``""`` means none."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"option {name} must be a cron expression string, got {value!r}")
    expr = " ".join(value.split())
    if not expr:
        return ""
    if len(expr) > MAX_CRON_LENGTH:
        raise InvalidArgumentError(f"option {name} must be at most {MAX_CRON_LENGTH} characters, got {len(expr)}")
    if expr.startswith("@"):
        if expr.lower() not in ALIASES:
            raise InvalidArgumentError(f"option {name}: unknown alias {value!r}; known: {', '.join(ALIASES)}")
        return expr.lower()
    fields = expr.split(" ")
    if len(fields) != 5:
        raise InvalidArgumentError(
            f"option {name} must have 5 fields (minute hour day-of-month month day-of-week), got {value!r}"
        )
    if any(_RANDOM.match(token) for field in fields for token in field.split(",")):
        raise InvalidArgumentError(f"option {name}: random fields (R) are not cron, got {value!r}")
    try:
        # A leap day matches within 8 years; an expression without a match (February 30th) fails here.
        croniter(expr, datetime(2000, 1, 1, tzinfo=timezone.utc)).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidArgumentError(f"option {name}: {value!r} never matches a date") from None
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # croniter's errors derive from ValueError
        raise InvalidArgumentError(f"option {name} is not a valid cron expression: {value!r} ({exc})") from None
    return expr


def timezone_name(name: str, value: Any) -> str:
    """An IANA zone name such as ``"Europe/Zurich"`` that this machine's zone database knows."""
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"option {name} must be an IANA time zone name, got {value!r}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe" is a directory of the database
        raise InvalidArgumentError(f"option {name}: unknown time zone {value!r}") from None
    return value


def next_cron_time(expr: str, zone: str, after: float) -> float:
    """Unix time of the first match of ``expr`` (read in ``zone``) strictly after ``after``. InvalidArgumentError
    when there is none (a stored expression that was never validated)."""
    try:
        tz = ZoneInfo(zone)
        matches = croniter(expr, datetime.fromtimestamp(after, tz))
    except (ValueError, KeyError, TypeError, OverflowError, ZoneInfoNotFoundError, OSError) as exc:
        raise InvalidArgumentError(f"cron {expr!r} in {zone!r}: {exc}") from None
    hourly = _every_hour(matches)
    while True:
        try:
            found: datetime = matches.get_next(datetime)
        except (CroniterBadDateError, ValueError, OverflowError) as exc:  # none, or none before the year 10000
            raise InvalidArgumentError(f"cron {expr!r} in {zone!r} has no next match: {exc}") from None
        local = found.astimezone(timezone.utc).astimezone(tz)
        if local.timestamp() <= after:
            continue
        if not hourly and _second_occurrence(local):
            continue  # clocks went back: this wall-clock time already ran an hour ago
        return round(local.timestamp(), 3)


def _every_hour(matches: croniter) -> bool:
    hours = matches.expanded[1]
    return hours == ["*"] or len(hours) >= 24


def _second_occurrence(local: datetime) -> bool:
    """Whether a local time is the later of the two instants a fall-back transition gives it."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def retry_delay(options: dict[str, Any], retry_number: int, rng: random.Random | None = None) -> float:
    """Seconds before retry ``retry_number`` (1 for the first): ``retry_interval * retry_backoff ** (n - 1)``,
    at most ``retry_max_interval``; with ``retry_jitter``, drawn uniformly from [delay / 2, delay]."""
    base = float(options.get("retry_interval", 0))
    factor = float(options.get("retry_backoff", 1.0))
    bound = float(options.get("retry_max_interval", 3600))
    exponent = max(0, retry_number - 1)
    if base <= 0:
        return 0.0
    try:
        delay = min(base * factor**exponent, bound)
    except OverflowError:  # grown past any float: the bound, as the formula's value would be
        delay = bound
    if options.get("retry_jitter"):
        delay = (rng or random).uniform(delay / 2, delay)
    return delay
