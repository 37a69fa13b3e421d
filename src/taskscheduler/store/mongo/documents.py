"""What job and event documents are made of: sizes, fingerprints, and the expressions updates are written in.

A capped collection rejects any update that changes a document's BSON size on a real MongoDB, so a job document
is written whole at insert and every later update only rewrites fixed-size fields with values of the same BSON
type: ``status`` (int32), ``started``/``ended``/``alive`` (datetimes, :data:`~taskscheduler.constants.UNSET_TIME`
while unset), ``worker`` (ObjectId, :data:`~taskscheduler.constants.NO_WORKER` while unowned), ``progress``
(double) and ``orphaned`` (int32).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import bson

from ...errors import InvalidArgumentError

Document = dict[str, Any]

#: Largest BSON document MongoDB accepts.
MAX_DOCUMENT_SIZE = 16 * 1024 * 1024
#: Largest job document stored: 15 MB, that is 15 * 1024 * 1024 bytes. A change event carries the whole job
#: document (inserts, and updates read with ``updateLookup``) plus fields of its own, and MongoDB fails a change
#: stream whose event exceeds 16 MB, again at every resume: one larger job would stop every node. Checked before
#: anything is written (add_job, add_job_once, requeue); event results are bounded below it too.
MAX_JOB_SIZE = 15 * 1024 * 1024


def utcnow() -> datetime:
    """Now, as an aware UTC datetime truncated to BSON's millisecond precision."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def encoded_size(value: Any) -> int:
    """BSON size of ``{"v": value}``; InvalidArgumentError when it cannot be stored."""
    try:
        return len(bson.encode({"v": value}))
    except (bson.errors.InvalidDocument, OverflowError, TypeError) as exc:
        raise InvalidArgumentError(f"value cannot be stored in MongoDB (not BSON-encodable): {exc}") from exc


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return [[str(k), _canonical(v)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def fingerprint(*parts: Any) -> str:
    """A hash of values that ignores the key order of documents (for add_job_once)."""
    return hashlib.sha1(bson.encode({"v": _canonical(list(parts))})).hexdigest()


def same_value(a: Any, b: Any) -> bool:
    """Equality of stored values, ignoring document key order."""
    return bool(_canonical(a) == _canonical(b))


def with_prefix(query: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A job-document filter rewritten for change events (``status`` -> ``fullDocument.status``), operators and
    ``$expr`` field paths (``"$status"`` -> ``"$fullDocument.status"``) included."""
    out: dict[str, Any] = {}
    for key, value in query.items():
        if key in ("$and", "$or", "$nor") and isinstance(value, list):
            out[key] = [with_prefix(v, prefix) if isinstance(v, Mapping) else v for v in value]
        elif key == "$expr":
            out[key] = _prefix_paths(value, prefix)
        elif key.startswith("$"):
            out[key] = value
        else:
            out[f"{prefix}{key}"] = value
    return out


def _prefix_paths(expr: Any, prefix: str) -> Any:
    """Field paths of an aggregation expression moved under ``prefix`` (variables such as ``$$NOW`` kept)."""
    if isinstance(expr, str) and expr.startswith("$") and not expr.startswith("$$"):
        return f"${prefix}{expr[1:]}"
    if isinstance(expr, Mapping):
        if "$literal" in expr:
            return expr
        return {k: _prefix_paths(v, prefix) for k, v in expr.items()}
    if isinstance(expr, (list, tuple)):
        return [_prefix_paths(v, prefix) for v in expr]
    return expr



def jobs_filter(
    statuses: Iterable[int] | None = None,
    job_class: str | None = None,
    below: int | None = None,
    *,
    job_id: Any = None,
) -> Document:
    """The filter of jobs in one of ``statuses`` (any when None), or with a status number below ``below``, of class
    ``job_class`` (any when None), with id ``job_id`` (any when None), for the readers that take a MongoDB filter
    (``get_jobs``, the CLI's listings, the dashboard's table and bulk actions)."""
    query: Document = {}
    if statuses is not None:
        query["status"] = {"$in": [int(status) for status in statuses]}
    elif below is not None:
        query["status"] = {"$lt": int(below)}
    if job_class is not None:
        query["class"] = job_class
    if job_id is not None:
        query["_id"] = job_id
    return query


def literal(value: Any) -> Document:
    """An aggregation expression that is exactly ``value`` (never read as a field path or operator)."""
    return {"$literal": value}


#: Server-side expression of "now" on the server's clock (leases never use a client's clock).
SERVER_NOW = "$$NOW"


def lease_end(seconds: float | None = None) -> Document:
    """Server-side expression: the server's now plus a lease (``seconds``, or the job's stored ``lease``)."""
    length: Any = float(seconds) * 1000.0 if seconds is not None else {"$multiply": ["$lease", 1000.0]}
    return {"$add": [SERVER_NOW, length]}


def fields_equal(expect: Mapping[str, Any]) -> Document:
    """Expression: every field has the given value."""
    return {"$and": [{"$eq": [f"${name}", literal(value)]} for name, value in expect.items()]}


def job_size(doc: Mapping[str, Any]) -> int:
    """The BSON size of a job document; InvalidArgumentError (naming the size and the limit) over
    :data:`MAX_JOB_SIZE`, before anything is written."""
    size = len(_encode_document(doc))
    if size > MAX_JOB_SIZE:
        raise InvalidArgumentError(
            f"job {doc.get('_id')} is {size} bytes as stored, over the job limit of {MAX_JOB_SIZE} bytes (15 MB: "
            "a change event carries the whole job, and MongoDB fails events over 16 MB); "
            "pass large payloads by reference (docs/jobs.md, Large payloads)"
        )
    return size


def _encode_document(doc: Mapping[str, Any]) -> bytes:
    try:
        return bson.encode(doc)
    except (bson.errors.InvalidDocument, OverflowError, TypeError) as exc:
        raise InvalidArgumentError(f"job data cannot be stored in MongoDB (not BSON-encodable): {exc}") from exc

