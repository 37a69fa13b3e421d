"""The MongoDB implementation of the storage seam (:mod:`taskscheduler.store.protocol`), one module a concept."""

from __future__ import annotations

from .connection import connect, server_errors, sync_twin
from .deployment import MIN_SERVER_VERSION, shard_keys
from .documents import (
    MAX_DOCUMENT_SIZE,
    MAX_JOB_SIZE,
    SERVER_NOW,
    Document,
    encoded_size,
    fields_equal,
    fingerprint,
    job_size,
    lease_end,
    literal,
    same_value,
    utcnow,
    with_prefix,
)
from .feeds import MAX_SERVER_ID_FILTER, STREAM_AWAIT_MS, ActivityFeed, StatusChange, StatusFeed
from .jobs import CLAIM_SECONDS, ID_BATCH
from .ledger import RECONCILE_MARGIN_BYTES, ROOM_CHUNK_BYTES, ROOM_GRANT_MARGIN_SECONDS, ROOM_GRANT_SECONDS
from .store import Store

__all__ = [
    "CLAIM_SECONDS",
    "ID_BATCH",
    "MAX_DOCUMENT_SIZE",
    "MAX_JOB_SIZE",
    "MAX_SERVER_ID_FILTER",
    "MIN_SERVER_VERSION",
    "RECONCILE_MARGIN_BYTES",
    "ROOM_CHUNK_BYTES",
    "ROOM_GRANT_MARGIN_SECONDS",
    "ROOM_GRANT_SECONDS",
    "SERVER_NOW",
    "STREAM_AWAIT_MS",
    "ActivityFeed",
    "Document",
    "StatusChange",
    "StatusFeed",
    "Store",
    "connect",
    "encoded_size",
    "fields_equal",
    "fingerprint",
    "job_size",
    "lease_end",
    "literal",
    "same_value",
    "server_errors",
    "shard_keys",
    "sync_twin",
    "utcnow",
    "with_prefix",
]
