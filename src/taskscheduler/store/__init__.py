"""Storage: the seam (:mod:`.protocol`, the verbs the rest of the library uses) and its MongoDB implementation
(:mod:`.mongo`), the only code that talks to pymongo or knows how documents are written.

Two collections: jobs (one document per job for its whole life) and events (one document per status change,
carrying error details and results), both capped by default; beside them the room ledger of a capped job
collection, the add_job_once keys and the node registry.
"""

from __future__ import annotations

from .mongo.connection import connect, sync_twin
from .mongo.deployment import shard_keys
from .mongo.documents import (
    MAX_DOCUMENT_SIZE,
    MAX_JOB_SIZE,
    Document,
    encoded_size,
    fields_equal,
    fingerprint,
    job_size,
    jobs_filter,
    literal,
    same_value,
    utcnow,
    with_prefix,
)
from .mongo.feeds import STATUS_UNKNOWN, ActivityFeed, StatusChange, StatusFeed
from .mongo.jobs import CLAIM_SECONDS, ID_BATCH
from .mongo.store import Store
from .protocol import JobStore

__all__ = [
    "CLAIM_SECONDS",
    "ID_BATCH",
    "MAX_DOCUMENT_SIZE",
    "MAX_JOB_SIZE",
    "ActivityFeed",
    "Document",
    "JobStore",
    "StatusChange",
    "StatusFeed",
    "STATUS_UNKNOWN",
    "Store",
    "connect",
    "encoded_size",
    "fields_equal",
    "fingerprint",
    "job_size",
    "jobs_filter",
    "literal",
    "same_value",
    "shard_keys",
    "sync_twin",
    "utcnow",
    "with_prefix",
]
