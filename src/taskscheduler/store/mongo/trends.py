"""The dashboard's reads of the event log: how runs ended over a recent window (trends), and the errors of given
run ends (the job table's error column).

An hour of a busy cluster's events can be hundreds of thousands of documents, so nothing here brings them to the
client: one aggregation groups them on the server into at most :data:`TREND_MINUTES` x 4 counts and, per class,
the counts per status and a histogram of run durations on a logarithmic scale (at most a few hundred buckets per
class, :data:`TREND_CLASSES` classes). The window is found through the events' ``time`` index (``time`` in a
capped event collection, ``time_ttl`` in an expiring one), never by their ids: the ids of shared ends are
derived from the run, not from the time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId

from ...constants import UNSET_TIME, JobStatus
from .connection import server_errors
from .deployment import Deployment
from .documents import Document

#: Minutes of the window the dashboard's trends cover (runs ended per minute, per class over the whole window).
TREND_MINUTES = 60
#: Classes returned at most, those with the most runs first (how many there were is said besides).
TREND_CLASSES = 50
#: Buckets of the duration histogram per factor e (2.718) of duration: a percentile read from it is within
#: about 2.5 % of the exact one (half a bucket), whatever the durations.
DURATION_STEPS = 20
#: Longest the trends aggregation may run on the server (milliseconds): a huge window fails, never stalls it.
TRENDS_MAX_MS = 10_000
#: Characters of an error's class and message the error column reads (a message may hold 64 KB).
ERROR_CHARS = 300
#: The statuses that end a run.
ENDS = tuple(int(s) for s in JobStatus if s.is_terminal)


@dataclass(frozen=True)
class ClassTrend:
    """How the runs of one class ended in the window: counts per status and run durations (milliseconds)."""

    job_class: str
    counts: Mapping[int, int]
    #: (histogram bucket, runs): a run that lasted d ms is in bucket floor(ln(1 + d) * DURATION_STEPS).
    durations: tuple[tuple[int, int], ...] = ()

    @property
    def runs(self) -> int:
        return sum(self.counts.values())

    @property
    def timed(self) -> int:
        """Runs with a known duration (a job canceled before it started has none)."""
        return sum(n for _, n in self.durations)

    def percentile(self, p: float) -> float | None:
        """The ``p`` (0..1) percentile of the run durations in seconds, from the histogram (within about 2.5 %),
        or None without any timed run."""
        total = self.timed
        if not total:
            return None
        rank = max(1, math.ceil(p * total))
        seen = 0
        for bucket, count in sorted(self.durations):
            seen += count
            if seen >= rank:
                return bucket_seconds(bucket)
        return bucket_seconds(max(b for b, _ in self.durations))


@dataclass(frozen=True)
class RunTrends:
    """Run ends in ``[since, since + TREND_MINUTES min)``: per minute and status, and per class."""

    since: datetime
    #: (minute index 0..TREND_MINUTES-1, status) -> runs ended in that minute with that status.
    minutes: Mapping[tuple[int, int], int] = field(default_factory=dict)
    #: The classes with the most runs first, at most TREND_CLASSES.
    classes: tuple[ClassTrend, ...] = ()
    #: How many classes had runs (more than ``classes`` holds when it was capped).
    classes_total: int = 0


def bucket_seconds(bucket: int) -> float:
    """The duration a histogram bucket stands for, in seconds: its geometric middle."""
    return max(0.0, math.exp((bucket + 0.5) / DURATION_STEPS) - 1) / 1000


class TrendReads(Deployment):
    """Reads for the dashboard's trends and its error column."""

    def run_trends(self, since: datetime) -> RunTrends:
        """How runs ended from ``since`` for :data:`TREND_MINUTES` minutes, grouped on the server (one
        aggregation, served by the events' ``time`` index, bounded by :data:`TRENDS_MAX_MS`)."""
        until = since + timedelta(minutes=TREND_MINUTES)
        duration = {
            "$cond": [
                {
                    "$and": [
                        {"$eq": [{"$type": "$started"}, "date"]},
                        {"$eq": [{"$type": "$ended"}, "date"]},
                        {"$gt": ["$started", UNSET_TIME]},
                        {"$gte": ["$ended", "$started"]},
                    ]
                },
                {
                    "$floor": {
                        "$multiply": [{"$ln": {"$add": [{"$subtract": ["$ended", "$started"]}, 1]}}, DURATION_STEPS]
                    }
                },
                None,
            ]
        }
        per_status = {f"s{s}": {"$sum": {"$cond": [{"$eq": ["$status", s]}, 1, 0]}} for s in ENDS}
        pipeline: list[Document] = [
            # The window alone first: the index on ``time`` serves it; the statuses are filtered on what it found.
            {"$match": {"time": {"$gte": since, "$lt": until}}},
            {"$match": {"status": {"$in": list(ENDS)}}},
            {
                "$facet": {
                    "minutes": [
                        {
                            "$group": {
                                "_id": {
                                    "m": {"$floor": {"$divide": [{"$subtract": ["$time", since]}, 60_000]}},
                                    "s": "$status",
                                },
                                "n": {"$sum": 1},
                            }
                        }
                    ],
                    "classes": [
                        {"$group": {"_id": {"c": "$class", "b": duration}, "n": {"$sum": 1}, **per_status}},
                        {
                            "$group": {
                                "_id": "$_id.c",
                                "runs": {"$sum": "$n"},
                                **{name: {"$sum": f"${name}"} for name in per_status},
                                "durations": {"$push": {"b": "$_id.b", "n": "$n"}},
                            }
                        },
                        {"$sort": {"runs": -1, "_id": 1}},
                        {"$limit": TREND_CLASSES},
                    ],
                    "count": [{"$group": {"_id": "$class"}}, {"$count": "n"}],
                }
            },
        ]
        with server_errors():
            found = list(self.events.aggregate(pipeline, maxTimeMS=TRENDS_MAX_MS))
        facets: Document = found[0] if found else {}
        minutes: dict[tuple[int, int], int] = {}
        for row in facets.get("minutes", []):
            minute, status = row["_id"].get("m"), row["_id"].get("s")
            if isinstance(minute, (int, float)) and 0 <= minute < TREND_MINUTES and type(status) is int:
                minutes[(int(minute), status)] = minutes.get((int(minute), status), 0) + int(row["n"])
        classes = tuple(_class_trend(row) for row in facets.get("classes", []))
        counted = facets.get("count") or [{"n": 0}]
        return RunTrends(since, minutes, classes, int(counted[0].get("n", 0)))

    def end_errors(self, ids: Iterable[ObjectId]) -> dict[ObjectId, tuple[str | None, str | None]]:
        """The error (class, message) of each given run end that recorded one, each text cut to
        :data:`ERROR_CHARS` on the server (a message may be 64 KB). Found by id (the ``_id`` index)."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        text = {
            name: {
                "$cond": [
                    {"$eq": [{"$type": f"$error.{name}"}, "string"]},
                    {"$substrCP": [f"$error.{name}", 0, ERROR_CHARS]},
                    None,
                ]
            }
            for name in ("class", "message")
        }
        pipeline: list[Document] = [{"$match": {"_id": {"$in": wanted}}}, {"$project": text}]
        with server_errors():
            found = list(self.events.aggregate(pipeline))
        return {
            row["_id"]: (row.get("class"), row.get("message"))
            for row in found
            if row.get("class") is not None or row.get("message") is not None
        }


def _class_trend(row: Mapping[str, Any]) -> ClassTrend:
    # A stored class may be any value (a malformed job's end): named by its repr, never a failed read.
    job_class = row.get("_id")
    name = job_class if isinstance(job_class, str) else repr(job_class)
    counts = {s: int(row.get(f"s{s}", 0)) for s in ENDS if row.get(f"s{s}")}
    durations = tuple(
        sorted(
            (int(d["b"]), int(d["n"]))
            for d in row.get("durations", [])
            if isinstance(d, Mapping) and isinstance(d.get("b"), (int, float)) and not isinstance(d.get("b"), bool)
        )
    )
    return ClassTrend(name, counts, durations)
